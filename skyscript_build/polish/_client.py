"""A small client for OpenAI-compatible chat-completions endpoints (vLLM, llama.cpp, Ollama, ...).

``ChatClient.complete`` posts one request to ``{endpoint}/chat/completions`` and retries what is
worth retrying: 429, 408, 5xx, timeouts, dropped connections and malformed answers, with
exponential backoff and jitter, honouring ``Retry-After`` (a 429 pauses every thread). A
``RateLimiter`` caps requests per minute across threads. The API key goes into the
``Authorization`` header and nowhere else: it is never logged, never in an error message.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests

from ..errors import BackendError

__all__ = ["ChatAnswer", "ChatClient", "RateLimiter", "RequestFailed", "parse_retry_after"]

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429}
_MAX_RETRY_AFTER_S = 600.0


class RequestFailed(Exception):
    """One request failed for good (retries spent, or a refusal not worth retrying)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class ChatAnswer:
    """The text of a completion and what it cost."""

    content: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int


class RateLimiter:
    """At most ``per_minute`` acquisitions per minute, evenly spaced; shared by threads.

    ``pause(s)`` holds every caller back for ``s`` seconds (a server's Retry-After).
    """

    def __init__(self, per_minute: float | None) -> None:
        self._interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._not_before = 0.0
        self._lock = threading.Lock()

    def pause(self, seconds: float) -> None:
        """Hold back every caller until ``seconds`` from now."""
        with self._lock:
            self._not_before = max(self._not_before, time.monotonic() + seconds)

    def acquire(self, stop: threading.Event | None = None) -> None:
        """Wait for the next free slot (returns early if ``stop`` is set)."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next, self._not_before)
            if self._interval:
                self._next = slot + self._interval
        delay = slot - time.monotonic()
        if delay > 0:
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _connection_problem(error: Exception) -> str:
    """ "Connection refused" out of urllib3's nested message, else the message, shortened."""
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
    return found.group(1).strip() if found else _short(str(error), 120)


class ChatClient:
    """Posts chat completions with retries; one ``requests.Session`` per thread."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_rpm: float | None = None,
        temperature: float | None = 0.0,
        max_tokens: int | None = None,
    ) -> None:
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.limiter = RateLimiter(max_rpm)
        self.stop = threading.Event()
        self._local = threading.local()
        self._lock = threading.Lock()
        self.answered = False  # True once any HTTP answer came back: the endpoint is reachable
        self.attempts = 0
        self.retries = 0

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: base * 2**attempt, capped, times 0.5..1."""
        return min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)

    def _count(self, retry: bool) -> None:
        with self._lock:
            self.attempts += 1
            if retry:
                self.retries += 1

    def complete(self, messages: list[dict[str, str]]) -> ChatAnswer:
        """Post ``messages``; return the answer, or raise ``RequestFailed`` / ``BackendError``.

        ``BackendError`` (the run cannot go on) for 401/403 (key refused), 404 (wrong endpoint
        or model) and for an endpoint that never answered after every retry.
        """
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False}
        if self.temperature is not None:
            payload["temperature"] = self.temperature
        if self.max_tokens:
            payload["max_tokens"] = self.max_tokens
        reason, detail = "", ""
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise RequestFailed("stopped")
            self.limiter.acquire(self.stop)
            self._count(retry=attempt > 0)
            wait = self._backoff(attempt)
            try:
                response = self._session().post(
                    self.url, json=payload, headers=self._headers, timeout=self.timeout
                )
            except requests.Timeout:
                reason, detail = "timeout", f"no answer within {self.timeout:g} s"
            except requests.ConnectionError as e:
                reason, detail = "connection", _connection_problem(e)
            except requests.RequestException as e:  # a cut body, a bad encoding, ...
                reason, detail = "transport", _short(f"{type(e).__name__}: {e}")
            else:
                self.answered = True
                answer = self._answer(response, attempt)
                if isinstance(answer, ChatAnswer):
                    return answer
                reason, detail, retry_after = answer
                if retry_after is not None:
                    wait = retry_after + random.uniform(0, 0.1 * self.backoff_base)
                    if reason == "http-429":
                        self.limiter.pause(wait)
            if attempt < self.max_retries:
                log.debug("retrying in %.2f s after %s (%s)", wait, reason, detail)
                self.stop.wait(wait)
        if reason == "connection" and not self.answered:
            raise BackendError(
                f"cannot reach {self.url} ({reason}: {detail}); is the server running and "
                "--endpoint right?"
            )
        raise RequestFailed(reason, detail)

    def _answer(
        self, response: requests.Response, attempt: int
    ) -> ChatAnswer | tuple[str, str, float | None]:
        """The chat answer of an HTTP response, or (reason, detail, Retry-After seconds) of one
        to retry; raises for an answer that no retry can change."""
        status = response.status_code
        if status == 200:
            try:
                data = response.json()
                content = data["choices"][0]["message"].get("content") or ""
                usage = data.get("usage") or {}
                return ChatAnswer(
                    content=str(content),
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                    attempts=attempt + 1,
                )
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                detail = f"HTTP 200 but not a chat completion: {_short(response.text)}"
                return "malformed-response", detail, None
        if status in (401, 403):
            raise BackendError(
                f"{self.url} refused the request (HTTP {status}): check the API key "
                "variable (--api-key-env) and its value"
            )
        if status == 404:
            raise BackendError(
                f"{self.url}: HTTP 404 ({_short(response.text, 120)}); check --endpoint "
                "(it should end in /v1) and --model"
            )
        if status in _RETRY_STATUS or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return f"http-{status}", _short(response.text), retry_after
        raise RequestFailed(f"http-{status}", _short(response.text))
