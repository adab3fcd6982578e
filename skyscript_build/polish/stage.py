"""The polish stage: caption CSV -> language-polished caption CSV via a chat-completions API.

Reads ``filepath,title,title_multi_objects`` (the caption stage's CSV), sends the chosen
column's rule captions, with the tags from the meta files beside the images when they exist,
to an OpenAI-compatible endpoint, and writes ``filepath,title_raw,title`` in the input's order
(``title_raw`` the rule caption, ``title`` the rewrite), atomically. Answers go to a SQLite
cache as they arrive, so a rerun or a resumed run pays only for what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputError
from ..files import check_out_file, leave_no_empty_folders, write_json_atomic
from ..progress import progress_bar
from ..settings import check_settings, setting
from ._cache import PolishCache, key_maker
from ._client import ChatAnswer, ChatClient, RequestFailed
from ._inputs import load_items, read_rows, write_output
from ._prompt import (
    PolishItem,
    build_messages,
    check_rewrite,
    focus_keywords,
    load_prompt,
    parse_answer,
    system_message,
)

__all__ = ["PolishConfig", "PolishResult", "run_polish", "DEFAULT_API_KEY_ENV", "COLUMNS"]

log = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
COLUMNS = ("title", "title_multi_objects")
POLISHED = "polished"


@dataclass(frozen=True)
class PolishConfig:
    """Settings of one polish run, checked on creation (each field's help is its declaration).

    The API key is read from the environment when needed, never stored in the config. An
    answer cut short by ``max_tokens`` loses its last captions, which are then asked again
    alone.
    """

    captions: Path = setting(help="caption CSV to polish (filepath,title,title_multi_objects)")
    endpoint: str = setting(
        help="base URL of the API, e.g. http://127.0.0.1:8000/v1 (vLLM), "
        "http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:8080/v1 (llama.cpp)",
        pattern=(r"https?://\S+", "an http(s) URL such as http://127.0.0.1:8000/v1"),
    )
    model: str = setting(help="model name the endpoint serves")
    out: Path | None = setting(
        None, help="output CSV (default: <captions stem>_polished.csv beside it)"
    )
    api_key_env: str | None = setting(
        None,
        help=f"environment variable holding the API key (default: {DEFAULT_API_KEY_ENV} when "
        "set; when named, it must be set)",
        metavar="VAR",
    )
    prompt: Path | None = setting(None, help="prompt file (default: the packaged one)")
    column: str = setting("title", help="caption column to polish", choices=COLUMNS)
    batch: int = setting(8, help="captions per request", minimum=1, maximum=1000)
    concurrency: int = setting(8, help="requests in flight", minimum=1, maximum=1000)
    max_rpm: float | None = setting(None, help="cap on requests per minute", above=0)
    limit: int | None = setting(None, help="polish only the first N rows", minimum=0)
    timeout: float = setting(60.0, help="seconds to wait for one answer", above=0)
    cache: Path | None = setting(None, help="answer cache (default: <out>.cache.sqlite)")
    dry_run: bool = setting(
        False, help="print the number of requests and estimated tokens; send nothing"
    )
    temperature: float | None = setting(0.0, help="sampling temperature", minimum=0)
    max_tokens: int | None = setting(
        None, help="cap on the tokens of one answer (default: the server's)", minimum=1
    )
    max_retries: int = setting(
        5, help="retries per request (429, 5xx, timeouts, malformed answers)", minimum=0
    )
    backoff_base: float = setting(
        1.0, help="first retry delay in seconds; doubles per retry, with jitter", minimum=0
    )
    backoff_max: float = setting(60.0, help="longest retry delay in seconds", cli=None, minimum=0)

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.captions.is_file():
            raise InputError(self.captions, "caption CSV not found")
        if self.prompt is not None:
            if not self.prompt.is_file():
                raise InputError(self.prompt, "prompt file not found")
            if not self.prompt.read_text(encoding="utf-8", errors="replace").strip():
                raise InputError(self.prompt, "prompt file is empty")
        if self.output_path.resolve() == self.captions.resolve():
            raise ConfigError("--out: must not be the input caption CSV")
        check_out_file(self.output_path, "--out")
        check_out_file(self.cache_path, "--cache")
        if (
            self.api_key_env is not None
            and not self.dry_run
            and not os.environ.get(self.api_key_env)
        ):
            raise ConfigError(
                f"--api-key-env {self.api_key_env}: the environment variable "
                f"{self.api_key_env} is not set (export it, or drop --api-key-env for an "
                "endpoint that needs no key)"
            )

    @property
    def output_path(self) -> Path:
        """The output CSV."""
        if self.out is not None:
            return self.out
        return self.captions.with_name(f"{self.captions.stem}_polished.csv")

    @property
    def stats_path(self) -> Path:
        """The run's stats JSON (written after the output)."""
        return self.output_path.with_suffix(".stats.json")

    @property
    def cache_path(self) -> Path:
        """The SQLite cache file."""
        if self.cache is not None:
            return self.cache
        out = self.output_path
        return out.with_name(out.name + ".cache.sqlite")

    def api_key(self) -> str | None:
        """The API key from the environment (never stored in the config itself)."""
        return os.environ.get(self.api_key_env or DEFAULT_API_KEY_ENV) or None


@dataclass
class PolishResult:
    """Counts of one polish run."""

    out: Path | None
    rows: int = 0
    polished: int = 0
    cached: int = 0
    fallback: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    with_tags: int = 0
    requests: int = 0
    http_attempts: int = 0
    retries: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dry_run: bool = False
    estimated_input_tokens: int = 0
    estimated_output_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        """Tokens used (prompt + completion), as the endpoint reported them."""
        return self.prompt_tokens + self.completion_tokens

    def stats(self) -> dict[str, object]:
        """The counts as a JSON-ready dict (the stats file)."""
        stats = dataclasses.asdict(self)
        stats["out"] = str(self.out) if self.out else None
        return stats

    def summary(self) -> str:
        """One line: rows, outcomes, requests and tokens."""
        if self.dry_run:
            return (
                f"polish dry run: {self.rows} rows, {self.cached} cached, "
                f"{self.requests} requests to send, about {self.estimated_input_tokens} input "
                f"+ {self.estimated_output_tokens} output tokens (estimated as characters / 4)"
            )
        fallback = sum(self.fallback.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.fallback.items()))
        return (
            f"polish: {self.rows} rows: {self.polished} polished, {fallback} fallback"
            + (f" ({reasons})" if reasons else "")
            + f", {self.cached} from cache; {self.requests} requests ({self.retries} retries, "
            f"{self.failed_requests} failed), {self.prompt_tokens}+{self.completion_tokens} "
            f"tokens, {self.seconds:.1f} s -> {self.out}"
        )


def _batches(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _estimate(system: str, items: list[PolishItem], todo: list[int], batch: int) -> tuple[int, int]:
    """Estimated (input, output) tokens of the requests for ``todo``: characters / 4."""
    chars_in = chars_out = 0
    for chunk in _batches(todo, batch):
        messages = build_messages(system, [items[i] for i in chunk])
        chars_in += sum(len(m["content"]) for m in messages)
        # An answer line: {"id": n, "text": "An aerial image of ..."} ~ caption + 40 chars.
        chars_out += sum(int(1.2 * len(items[i].raw)) + 40 for i in chunk)
    return math.ceil(chars_in / 4), math.ceil(chars_out / 4)


class _Run:
    """The state of one run: items, outcomes, cache, client, counters."""

    def __init__(self, config: PolishConfig, items: list[PolishItem], system: str) -> None:
        self.config = config
        self.items = items
        self.system = system
        self.titles: list[str | None] = [None] * len(items)
        make_key = key_maker(config.model, system)
        self.keys = [make_key(item.cache_input()) for item in items]
        self.fallback: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.polished = 0
        self.requests = 0
        self.failed_requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def finish(self, index: int, title: str, status: str) -> None:
        self.titles[index] = title
        if status == POLISHED:
            self.polished += 1
        else:
            self.fallback[status.removeprefix("fallback:")] += 1

    def handle_answer(
        self, chunk: list[int], attempt: int, answer: ChatAnswer
    ) -> tuple[list[int], list[tuple[str, str, str, str]]]:
        """Judge each caption's answer; return (indices to retry alone, rows for the cache)."""
        self.prompt_tokens += answer.prompt_tokens
        self.completion_tokens += answer.completion_tokens
        answers, unusable = parse_answer(answer.content, len(chunk))
        if unusable:
            log.debug("%d unusable answer objects in one request", unusable)
        retry: list[int] = []
        cache_rows: list[tuple[str, str, str, str]] = []
        for local_id, index in enumerate(chunk, start=1):
            item = self.items[index]
            text = answers.get(local_id)
            reason = (
                "unanswered"
                if text is None
                else check_rewrite(item.raw, text, focus_keywords(item.raw, item.center_tags))
            )
            if reason is None:
                status, title = POLISHED, " ".join(str(text).split())
            else:
                self.rejected[reason] += 1
                if attempt == 1:
                    retry.append(index)
                    continue
                status, title = f"fallback:{reason}", item.raw
            self.finish(index, title, status)
            cache_rows.append((self.keys[index], title, status, self.config.model))
        return retry, cache_rows


def run_polish(config: PolishConfig) -> PolishResult:
    """Polish the captions of ``config.captions``; see the module docstring.

    A run that fails (an endpoint that cannot be reached, a refused key) leaves no folder it
    made and, when it got no answer, no cache; answers it did get stay cached.
    """
    with leave_no_empty_folders(config.output_path.parent, config.cache_path.parent):
        return _polish(config)


def _polish(config: PolishConfig) -> PolishResult:
    started = time.monotonic()
    system = system_message(load_prompt(config.prompt))
    rows = read_rows(config.captions, config.column, config.limit)
    items = load_items(config.captions.parent, rows, config.column)
    run = _Run(config, items, system)
    out = config.output_path
    result = PolishResult(out=None if config.dry_run else out, rows=len(rows))
    result.with_tags = sum(1 for item in items if item.center_tags)
    cache_file_existed = config.cache_path.exists()
    cache = None if config.dry_run and not cache_file_existed else PolishCache(config.cache_path)
    todo = _answered_before(run, items, cache, result)
    if config.dry_run:
        if cache is not None:
            cache.close()
        result.dry_run = True
        result.requests = math.ceil(len(todo) / config.batch)
        result.estimated_input_tokens, result.estimated_output_tokens = _estimate(
            system, items, todo, config.batch
        )
        result.seconds = time.monotonic() - started
        return result
    assert cache is not None
    log.info(
        "polish: %d rows, %d from cache, %d to send in about %d requests to %s (model %s)",
        len(rows), result.cached, len(todo), math.ceil(len(todo) / config.batch),
        config.endpoint, config.model,
    )  # fmt: skip
    client = _client(config)
    try:
        _send_all(config, run, client, cache, todo)
    except BaseException:
        if not cache_file_existed and len(cache) == 0:
            cache.close()
            for suffix in ("", "-wal", "-shm"):  # leave nothing behind a run that did nothing
                Path(f"{config.cache_path}{suffix}").unlink(missing_ok=True)
        raise
    finally:
        client.stop.set()
        cache.close()
    titles = [t if t is not None else items[i].raw for i, t in enumerate(run.titles)]
    write_output(out, rows, titles)
    _tally(result, run, client)
    result.seconds = time.monotonic() - started
    write_json_atomic(config.stats_path, result.stats())
    log.debug("rejected answers (before retrying alone): %s", dict(run.rejected))
    return result


def _answered_before(
    run: _Run, items: list[PolishItem], cache: PolishCache | None, result: PolishResult
) -> list[int]:
    """Settle the rows with an empty caption or a cached answer; the indices of the others."""
    hits = cache.get_many(run.keys) if cache is not None else {}
    todo: list[int] = []
    for index, item in enumerate(items):
        if not item.raw.strip():
            run.finish(index, item.raw, "fallback:empty-input")
        elif run.keys[index] in hits:
            title, status = hits[run.keys[index]]
            run.finish(index, title, status)
            result.cached += 1
        else:
            todo.append(index)
    return todo


def _client(config: PolishConfig) -> ChatClient:
    return ChatClient(
        config.endpoint,
        config.model,
        api_key=config.api_key(),
        timeout=config.timeout,
        max_retries=config.max_retries,
        backoff_base=config.backoff_base,
        backoff_max=config.backoff_max,
        max_rpm=config.max_rpm,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
    )


def _tally(result: PolishResult, run: _Run, client: ChatClient) -> None:
    result.polished = run.polished
    result.fallback = dict(run.fallback)
    result.rejected = dict(run.rejected)
    result.requests = run.requests
    result.http_attempts = client.attempts
    result.retries = client.retries
    result.failed_requests = run.failed_requests
    result.prompt_tokens = run.prompt_tokens
    result.completion_tokens = run.completion_tokens


def _send_all(
    config: PolishConfig, run: _Run, client: ChatClient, cache: PolishCache, todo: list[int]
) -> None:
    """Send ``todo`` in batches; retry unanswered or refused captions once, alone."""
    first = _batches(todo, config.batch)
    alone: deque[int] = deque()
    in_flight: dict[Future[ChatAnswer], tuple[list[int], int]] = {}
    bar = progress_bar(total=len(todo), desc="polish", unit="caption")
    with ThreadPoolExecutor(config.concurrency, thread_name_prefix="polish") as pool:
        try:
            while True:
                while len(in_flight) < 2 * config.concurrency:
                    if alone:
                        chunk, attempt = [alone.popleft()], 2
                    else:
                        chunk, attempt = next(first, []), 1
                        if not chunk:
                            break
                    messages = build_messages(run.system, [run.items[i] for i in chunk])
                    in_flight[pool.submit(client.complete, messages)] = (chunk, attempt)
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    chunk, attempt = in_flight.pop(future)
                    run.requests += 1
                    try:
                        answer = future.result()
                    except RequestFailed as e:
                        run.failed_requests += 1
                        log.warning("a request for %d captions failed: %s", len(chunk), e)
                        for index in chunk:  # not cached: a rerun tries again
                            run.finish(index, run.items[index].raw, "fallback:request-failed")
                        bar.update(len(chunk))
                        continue
                    retry, cache_rows = run.handle_answer(chunk, attempt, answer)
                    alone.extend(retry)
                    cache.put_many(cache_rows)
                    bar.update(len(cache_rows))
                    bar.set_postfix_str(
                        f"tokens={run.prompt_tokens + run.completion_tokens} "
                        f"retries={client.retries}",
                        refresh=False,
                    )
        except BaseException:
            # A fatal endpoint error or an interrupt: stop the threads' retries at once.
            client.stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
