"""Language-polished captions through any OpenAI-compatible chat-completions endpoint.

``run_polish(PolishConfig(...))`` reads a caption CSV and writes ``filepath,title_raw,title``;
see ``core`` for the stage, ``client`` for the HTTP client, ``cache`` for the answer cache and
``prompt`` for the messages, the answer parser and the guard against bad rewrites.
"""

from ._prompt import DEFAULT_PROMPT_PATH, check_rewrite, focus_keywords, parse_answer
from .stage import COLUMNS, DEFAULT_API_KEY_ENV, PolishConfig, PolishResult, run_polish

__all__ = [
    "COLUMNS",
    "DEFAULT_API_KEY_ENV",
    "DEFAULT_PROMPT_PATH",
    "PolishConfig",
    "PolishResult",
    "run_polish",
    "check_rewrite",
    "focus_keywords",
    "parse_answer",
]
