"""Load a page in headless Chromium (Debian's ``chromium``) and report console errors and images.

Used by the report's tests. Chromium is driven over ``--remote-debugging-pipe`` (DevTools
protocol messages on fds 3 and 4, NUL-separated): no port, no websocket library.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

__all__ = ["CHROMIUM", "needs_chromium", "check_page_in_chromium"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make system-deps-test`)"
)


# Runs in the child: put the DevTools pipe on fds 3 and 4, then become Chromium.
_EXEC_WITH_PIPE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


def _fd_above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def check_page_in_chromium(url: str, timeout: float = 60) -> dict[str, Any]:
    """Load ``url`` in headless Chromium over the DevTools pipe; report errors and images.

    Uses ``--remote-debugging-pipe`` (DevTools messages on fds 3 and 4, NUL-separated), so no
    port and no websocket library are needed. Returns ``{"errors": [...], "images": [...]}``
    where each image is ``[src, complete, naturalWidth]``.
    """
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    # The child's ends go to fds 3 and 4; moving them above 9 first means neither dup2
    # clobbers the other.
    to_chrome_r, from_chrome_w = _fd_above_9(to_chrome_r), _fd_above_9(from_chrome_w)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    args = [
        sys.executable,
        "-c",
        _EXEC_WITH_PIPE,
        str(to_chrome_r),
        str(from_chrome_w),
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--remote-debugging-pipe",
        "about:blank",
    ]
    proc = subprocess.Popen(
        args,
        pass_fds=(to_chrome_r, from_chrome_w),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    deadline = time.monotonic() + timeout
    buffer = b""
    events: list[dict[str, Any]] = []
    next_id = 0

    def send(method: str, params: dict | None = None, session: str | None = None) -> int:
        nonlocal next_id
        next_id += 1
        message: dict[str, Any] = {"id": next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(to_chrome_w, json.dumps(message).encode() + b"\0")
        return next_id

    def receive(want: int | None = None, event: str | None = None) -> dict[str, Any]:
        nonlocal buffer
        while True:
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if want is not None and message.get("id") == want:
                    if "error" in message:
                        raise RuntimeError(f"DevTools error: {message['error']}")
                    return message["result"]
                events.append(message)
                if event is not None and message.get("method") == event:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer within {timeout} s")
            ready, _, _ = select.select([from_chrome_r], [], [], left)
            if ready:
                chunk = os.read(from_chrome_r, 1 << 16)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                buffer += chunk

    try:
        target = receive(send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = receive(send("Target.attachToTarget", {"targetId": target, "flatten": True}))[
            "sessionId"
        ]
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            receive(send(method, session=session))
        receive(send("Page.navigate", {"url": url}, session=session))
        receive(event="Page.loadEventFired")
        images = receive(
            send(
                "Runtime.evaluate",
                {
                    "expression": "JSON.stringify(Array.from(document.images)"
                    ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]))",
                    "returnByValue": True,
                },
                session=session,
            )
        )["result"]["value"]
        send("Browser.close")
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    errors = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            errors.append(str(params.get("args")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
    return {"errors": errors, "images": json.loads(images)}
