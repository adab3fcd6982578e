"""What polish sends and how it reads the answers: messages, answer parsing, the rewrite guard.

A request carries one or more captions, each under a small integer ``id`` (1..n within the
request). The model is asked for one JSON object per caption, ``{"id": i, "text": "..."}``;
answers are matched back by ``id``, never by position. The parser is lenient about the shape
(JSON lines, a JSON array, an object holding a list, code fences, prose around the objects) and
strict about identity: an id named twice with different texts, or an id that was not asked for,
is not used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_PROMPT_PATH",
    "FORMAT_INSTRUCTIONS",
    "PolishItem",
    "load_prompt",
    "system_message",
    "build_messages",
    "parse_answer",
    "focus_keywords",
    "check_rewrite",
    "normalise",
]

DEFAULT_PROMPT_PATH = Path(__file__).resolve().parent / "default_prompt.txt"

# Appended to every prompt (the parser depends on it, so users' prompt files need not say it).
FORMAT_INSTRUCTIONS = (
    'Input format: one JSON object per line, with an integer "id", the rule-based '
    '"caption" and the OSM "tags" it was made from.\n'
    "Answer format: exactly one JSON object per input line, one per line, and nothing else:\n"
    '{"id": <the same id>, "text": "<the rewritten caption>"}'
)

# Keys under which models put the rewritten caption, most likely first.
_TEXT_KEYS = ("text", "title", "rewrite", "polished", "output", "answer", "caption")
# Tag values that read as the key alone in the rule captions ("building=yes" -> "building").
_KEY_ONLY_VALUES = {"yes", "no", "true", "false", "1", "0"}
# Most surrounding objects passed to the model with a multi-object caption.
MAX_SURROUNDING = 20


@dataclass(frozen=True)
class PolishItem:
    """One caption to polish: its row, the rule caption, the tags it came from."""

    index: int
    raw: str
    center_tags: Mapping[str, str] | None = None
    surrounding_tags: Sequence[Mapping[str, str]] = ()

    def payload(self, local_id: int) -> dict[str, Any]:
        """The JSON object sent for this item under ``local_id``."""
        obj: dict[str, Any] = {"id": local_id, "caption": self.raw}
        if self.center_tags:
            obj["tags"] = dict(self.center_tags)
        if self.surrounding_tags:
            obj["surrounding"] = [dict(t) for t in self.surrounding_tags[:MAX_SURROUNDING]]
        return obj

    def cache_input(self) -> str:
        """The item's input as one canonical string (part of its cache key)."""
        return json.dumps(self.payload(0), sort_keys=True, ensure_ascii=False)


def load_prompt(path: str | Path | None) -> str:
    """The prompt file's text (the packaged default when ``path`` is None), stripped."""
    return Path(path or DEFAULT_PROMPT_PATH).read_text(encoding="utf-8").strip()


def system_message(prompt: str) -> str:
    """The full system message: the user's prompt plus the answer format polish parses."""
    return f"{prompt}\n\n{FORMAT_INSTRUCTIONS}"


def build_messages(system: str, items: Sequence[PolishItem]) -> list[dict[str, str]]:
    """Chat messages for one request; item ``k`` of ``items`` is sent under id ``k + 1``."""
    lines = [
        json.dumps(item.payload(k + 1), ensure_ascii=False, sort_keys=True)
        for k, item in enumerate(items)
    ]
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n".join(lines)},
    ]


_THINK = re.compile(r"<think>.*?</think>", re.S)
_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)


def _as_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _text_of(obj: Mapping[str, Any]) -> str | None:
    for key in _TEXT_KEYS:
        value = obj.get(key)
        if isinstance(value, str):
            return value
    return None


def _json_objects(text: str) -> list[Any]:
    """Every JSON value that parses as a whole, else every ``{...}`` object found in ``text``."""
    try:
        whole = json.loads(text)
    except ValueError:
        pass
    else:
        if isinstance(whole, list):
            return whole
        if isinstance(whole, dict):
            if "id" in whole:
                return [whole]
            for value in whole.values():  # {"items": [...]} and the like
                if isinstance(value, list):
                    return value
            return [whole]
        return []
    decoder = json.JSONDecoder()
    found: list[Any] = []
    pos = text.find("{")
    while pos != -1:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        found.append(obj)
        pos = text.find("{", end)
    return found


def parse_answer(content: str, n_items: int) -> tuple[dict[int, str], int]:
    """Read a model's answer for ids 1..``n_items``.

    Returns:
        ``(answers, unusable)``: ``answers`` maps each id named exactly once (or several times
        with the same text) to its text; ``unusable`` counts objects with an unknown id, no
        text, or an id named again with a different text (such ids are left out).
    """
    content = _THINK.sub("", content or "")  # reasoning models' scratchpad
    fenced = _FENCE.findall(content)
    body = "\n".join(fenced) if fenced else content
    texts: dict[int, set[str]] = {}
    unusable = 0
    for obj in _json_objects(body.strip()):
        if not isinstance(obj, dict):
            unusable += 1
            continue
        local_id, text = _as_id(obj.get("id")), _text_of(obj)
        if local_id is None or text is None or not 1 <= local_id <= n_items:
            unusable += 1
            continue
        texts.setdefault(local_id, set()).add(text.strip())
    answers: dict[int, str] = {}
    for local_id, options in texts.items():
        if len(options) == 1:
            answers[local_id] = options.pop()
        else:
            unusable += len(options)
    if not answers and n_items == 1 and "{" not in body:
        # A single caption answered in plain text: take the text itself.
        plain = body.strip().strip('"').strip()
        if plain:
            answers[1] = plain
    return answers, unusable


def normalise(text: str) -> str:
    """Lower case, ``_`` and ``:`` as spaces, runs of white space as one space."""
    return " ".join(text.lower().replace("_", " ").replace(":", " ").split())


def _caption_keyword(raw: str) -> str | None:
    """The focus object's key word read from a rule caption ("amenity of fountain" -> fountain)."""
    first = raw.split(", surrounded by", 1)[0].split(", ", 1)[0].split(" with ", 1)[0].strip()
    if not first:
        return None
    if " of " in first:
        return first.rsplit(" of ", 1)[1].strip() or None
    return first.split()[-1]


def focus_keywords(raw: str, center_tags: Mapping[str, str] | None) -> list[str]:
    """The words a rewrite of ``raw`` must keep: the focus object's first tag value.

    ``amenity=fountain`` -> ``fountain``; a ``yes`` value reads as its key (``building``). The
    tag word is required only when the rule caption itself contains it; without usable tags
    the word is read from the caption (the value after " of ", else the last word).
    """
    norm_raw = normalise(raw)
    if center_tags:
        key, value = next(iter(center_tags.items()))
        word = normalise(str(key) if normalise(str(value)) in _KEY_ONLY_VALUES else str(value))
        if word and word in norm_raw:
            return [word]
    guess = _caption_keyword(raw)
    if guess and normalise(guess) in norm_raw:
        return [normalise(guess)]
    return []


def check_rewrite(raw: str, text: str, keywords: Sequence[str]) -> str | None:
    """Why the rewrite ``text`` of ``raw`` is refused, or None when it is accepted.

    Reasons: ``empty``; ``too-long`` (over 4x the rule caption + 200 characters);
    ``missing-keyword`` (drops a focus key word, compared with ``normalise``).
    """
    text = text.strip()
    if not text:
        return "empty"
    if len(text) > 4 * len(raw) + 200:
        return "too-long"
    norm = normalise(text)
    if any(normalise(k) not in norm for k in keywords):
        return "missing-keyword"
    return None
