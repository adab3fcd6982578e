"""A deterministic OpenAI-compatible chat-completions server on 127.0.0.1, with injectable faults.

Used by tests/test_polish.py (in a thread) and bench/bench_polish.py (as a subprocess:
``python tests/openai_stub_server.py --latency 0.3`` prints its base URL and serves).

It reads the JSON-lines request polish sends (``{"id": n, "caption": ...}`` per line) and
answers ``{"id": n, "text": "An aerial image. It shows: <caption>."}`` per line. Faults:

* ``faults``: a queue of per-request faults, taken in arrival order: ``429`` (with
  ``Retry-After``), ``500``, ``stall`` (sleeps ``stall_s`` before answering), ``malformed``
  (HTTP 200, body not JSON), ``reverse`` (answers in reverse order), ``drop`` (last answer
  missing), ``extra`` (an answer for an id not asked), ``duplicate`` (first id twice, different
  texts), ``fenced`` (a JSON array in a code fence with prose around it), ``ok``.
* ``rules``: caption substring -> bad answer, every time that caption is sent: ``empty``,
  ``long``, ``nokeyword`` (drops the caption's words), ``omit`` (no answer for it).
* ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def polite(caption: str) -> str:
    """The stub's rewrite of a caption."""
    return f"An aerial image. It shows: {caption}."


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    stub: StubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a stall past its timeout)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            body = {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}
            self._send(200, json.dumps(body).encode())
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        stub = self.server.stub
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        fault = stub._record(raw, self.headers.get("Authorization"))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, b'{"error": {"message": "unknown path"}}')
            return
        if stub.api_key and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
            self._send(401, b'{"error": {"message": "invalid api key"}}')
            return
        if stub.latency:
            time.sleep(stub.latency)
        if fault == "429":
            self._send(
                429, b'{"error": {"message": "rate limited"}}', {"Retry-After": stub.retry_after}
            )
            return
        if fault == "500":
            self._send(500, b'{"error": {"message": "internal error"}}')
            return
        if fault == "stall":
            time.sleep(stub.stall_s)
        if fault == "malformed":
            self._send(200, b'{"choices": [{"message": {"content": "cut')
            return
        try:
            request = json.loads(raw)
            user = [m for m in request["messages"] if m["role"] == "user"][-1]["content"]
            items = [json.loads(line) for line in user.splitlines() if line.strip()]
        except (ValueError, KeyError, IndexError, TypeError):
            self._send(400, b'{"error": {"message": "bad request"}}')
            return
        content = stub.answer(items, fault)
        prompt_chars = sum(len(m.get("content") or "") for m in request["messages"])
        body = {
            "id": f"chatcmpl-{stub.requests}",
            "object": "chat.completion",
            "model": request.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_chars // 4,
                "completion_tokens": len(content) // 4,
                "total_tokens": prompt_chars // 4 + len(content) // 4,
            },
        }
        self._send(200, json.dumps(body).encode())


class StubServer:
    """The server, run in a daemon thread; use as a context manager."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        faults: list[str] | None = None,
        rules: dict[str, str] | None = None,
        retry_after: str = "0.2",
        stall_s: float = 1.0,
        port: int = 0,
    ) -> None:
        self.latency = latency
        self.api_key = api_key
        self.faults: deque[str] = deque(faults or [])
        self.rules = dict(rules or {})
        self.retry_after = retry_after
        self.stall_s = stall_s
        self.requests = 0
        self.bodies: list[bytes] = []
        self.auth_headers: list[str | None] = []
        self.request_times: list[float] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.stub = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to pass as ``--endpoint``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _record(self, raw: bytes, auth: str | None) -> str:
        with self._lock:
            self.requests += 1
            self.bodies.append(raw)
            self.auth_headers.append(auth)
            self.request_times.append(time.monotonic())
            return self.faults.popleft() if self.faults else "ok"

    def captions_sent(self) -> list[str]:
        """Every caption of every request received, in arrival order."""
        out = []
        for raw in self.bodies:
            try:
                user = json.loads(raw)["messages"][-1]["content"]
                out += [json.loads(line)["caption"] for line in user.splitlines()]
            except (ValueError, KeyError, IndexError):
                continue
        return out

    def answer(self, items: list[dict[str, Any]], fault: str) -> str:
        """The answer text for ``items`` under ``fault`` and the caption rules."""
        answers = []
        for item in items:
            caption = str(item.get("caption", ""))
            rule = next((mode for sub, mode in self.rules.items() if sub in caption), None)
            text = polite(caption)
            if rule == "omit":
                continue
            if rule == "empty":
                text = ""
            elif rule == "long":
                text = polite(caption) * 50 + " " * 10 + "x" * 400
            elif rule == "nokeyword":
                text = "An aerial image of something."
            answers.append({"id": item.get("id"), "text": text})
        if fault == "reverse":
            answers.reverse()
        elif fault == "drop" and answers:
            answers.pop()
        elif fault == "extra":
            answers.append({"id": len(items) + 7, "text": "An aerial image of nothing asked."})
        elif fault == "duplicate" and answers:
            answers.append({"id": answers[0]["id"], "text": "A different text for the same id."})
        if fault == "fenced":
            return "Here are the captions:\n```json\n" + json.dumps(answers, indent=1) + "\n```\n"
        return "\n".join(json.dumps(a) for a in answers)

    def start(self) -> StubServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Serve until killed; print the base URL on the first line of stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    args = parser.parse_args()
    stub = StubServer(latency=args.latency, port=args.port)
    print(stub.url, flush=True)
    try:
        stub._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stub._server.server_close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
