"""``skyscript-build polish``: rewrite rule captions with a model behind an OpenAI-compatible API."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..polish import COLUMNS, DEFAULT_API_KEY_ENV, PolishConfig, run_polish

HELP = "rewrite rule captions into natural language with any OpenAI-compatible chat endpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags, one per ``PolishConfig`` field."""
    parser.add_argument("--captions", type=Path, required=True, help="caption CSV to polish")
    parser.add_argument(
        "--out", type=Path, help="output CSV (default: <captions stem>_polished.csv beside it)"
    )
    parser.add_argument(
        "--endpoint",
        required=True,
        help="base URL of the API, e.g. http://127.0.0.1:8000/v1 (vLLM), "
        "http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:8080/v1 (llama.cpp)",
    )
    parser.add_argument("--model", required=True, help="model name the endpoint serves")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help=f"environment variable holding the API key (default: {DEFAULT_API_KEY_ENV} when "
        "set; when named, it must be set)",
    )
    parser.add_argument("--prompt", type=Path, help="prompt file (default: the packaged one)")
    parser.add_argument("--column", choices=COLUMNS, default="title", help="caption to polish")
    parser.add_argument("--batch", type=int, default=8, help="captions per request (default 8)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-rpm", type=float, help="cap on requests per minute")
    parser.add_argument("--limit", type=int, help="polish only the first N rows")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for one answer (default 60)"
    )
    parser.add_argument("--cache", type=Path, help="answer cache (default: <out>.cache.sqlite)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0)"
    )
    parser.add_argument(
        "--max-tokens", type=int, help="cap on the tokens of one answer (default: the server's)"
    )
    parser.add_argument(
        "--max-retries", type=int, default=5, help="retries per request (default 5)"
    )
    parser.add_argument(
        "--backoff-base",
        type=float,
        default=1.0,
        help="first retry delay in seconds; doubles per retry, with jitter (default 1)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the number of requests and estimated tokens; send nothing",
    )


def main(args: argparse.Namespace) -> int:
    """Run the stage; print its summary. Exit 1 when some requests failed (rerun to retry)."""
    config = PolishConfig(
        captions=args.captions,
        out=args.out,
        endpoint=args.endpoint,
        model=args.model,
        api_key_env=args.api_key_env,
        prompt=args.prompt,
        column=args.column,
        batch=args.batch,
        concurrency=args.concurrency,
        max_rpm=args.max_rpm,
        limit=args.limit,
        timeout=args.timeout,
        cache=args.cache,
        dry_run=args.dry_run,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        max_retries=args.max_retries,
        backoff_base=args.backoff_base,
    )
    result = run_polish(config)
    print(result.summary())
    if result.failed_requests:
        print(
            f"{result.failed_requests} requests failed; their rows keep the rule caption and "
            "are not cached: run the same command again to retry them"
        )
        return 1
    return 0
