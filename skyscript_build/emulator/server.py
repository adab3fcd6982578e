"""The emulator's HTTP side: the REST surface the ``ee`` client talks to, latency and faults.

Served on 127.0.0.1 only:

- ``GET /$discovery/rest``: the Earth Engine discovery document shipped with earthengine-api,
  its root URL rewritten to this server;
- ``GET /v1*/projects/P/algorithms``: the algorithm list shipped with earthengine-api;
- ``POST /v1*/projects/P/value:compute``: ``{"result": <value>}`` of an expression graph;
- ``POST /v1*/projects/P/image:computePixels``: the pixels of an image expression in a grid;
- ``GET /v1*/projects/P/assets/ID``: what ``ee.data.getAsset`` answers for a collection or image.

Errors have Earth Engine's JSON body ``{"error": {"code", "message", "status"}}``. Latency and
faults apply to ``value:compute`` and ``image:computePixels`` only, so a client always
initialises. The latency model is ``latency_ms + latency_ms_per_mpx * megapixels``, the
megapixels being those of a ``computePixels`` grid (0 for ``value:compute``): a fixed cost per
request plus one that grows with the request's size, as Earth Engine's does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..settings import check_settings, setting
from .collections import Catalog, load_collections
from .evaluate import EvalError, compute_pixels, compute_value
from .faults import FaultPlan, parse_faults

__all__ = ["Emulator", "EmulatorStats", "HTTP_STATUS"]

log = logging.getLogger(__name__)

HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_FAULT_MESSAGES = {
    429: "Too many concurrent aggregations.",
    500: "An internal error has occurred (request ID: emulated).",
    503: "The service is currently unavailable.",
}
_HTML = (
    b"<!DOCTYPE html><html><head><title>Error 502 (Server Error)!!1</title></head>"
    b"<body><p><b>502.</b> That's an error.</p><p>The server encountered a temporary error "
    b"and could not complete your request.</p></body></html>"
)


def _ee_file(name: str) -> bytes:
    return (resources.files("ee") / "tests" / name).read_bytes()


@dataclass
class EmulatorStats:
    """What the emulator saw: requests by (endpoint, status), faults, concurrency peak."""

    requests: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)  # quota refusals: concurrency, rate
    bytes_sent: Counter = field(default_factory=Counter)  # answer bodies by endpoint
    max_concurrency: int = 0
    concurrency: int = 0

    def count(self, endpoint: str | None = None, status: int | None = None) -> int:
        """Requests seen, optionally only of one endpoint and/or one status."""
        return sum(
            n
            for (e, s), n in self.requests.items()
            if (endpoint is None or e == endpoint) and (status is None or s == status)
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {
            "requests": {f"{e} {s}": n for (e, s), n in sorted(self.requests.items())},
            "faults": dict(sorted(self.faults.items())),
            "refused": dict(sorted(self.refused.items())),
            "bytes_sent": dict(sorted(self.bytes_sent.items())),
            "max_concurrency": self.max_concurrency,
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # never keep the process alive; stop() waits for them itself
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True
    emulator: Emulator

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve each connection in its own thread, registered so stop() can join it."""
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self.emulator._lock:
            self.emulator._threads.add(thread)
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.emulator._lock:
                self.emulator._threads.discard(threading.current_thread())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms delayed ACK
    server: _Server
    server_version = "ee-emulator"
    sys_version = ""

    # -- plumbing ---------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)

    def setup(self) -> None:
        super().setup()
        self.server.emulator._connection_opened(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.emulator._connection_closed(self.connection)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        endpoint: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.server.emulator._record(endpoint, status, len(body))
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def _error(self, status: int, message: str, endpoint: str, **headers: str) -> None:
        body = json.dumps(
            {"error": {"code": status, "message": message, "status": HTTP_STATUS[status]}}
        ).encode()
        self._send(status, body, "application/json; charset=UTF-8", endpoint, headers)

    def _route(self) -> tuple[str, str]:
        path = self.path.split("?", 1)[0]
        if path.startswith("/$discovery/rest"):
            return "discovery", ""
        parts = path.strip("/").split("/", 3)
        if len(parts) >= 3 and parts[0].startswith("v1") and parts[1] == "projects":
            rest = parts[2] if len(parts) == 3 else parts[2] + "/" + parts[3]
            _, _, action = rest.partition("/")
            if action == "algorithms":
                return "algorithms", ""
            if action in ("value:compute", "image:computePixels"):
                return action, ""
            if action.startswith("assets/"):
                return "assets", action[len("assets/") :]
        return "unknown", path

    # -- methods ----------------------------------------------------------------------
    def do_GET(self) -> None:
        endpoint, arg = self._route()
        emu = self.server.emulator
        if endpoint == "discovery":
            self._send(200, emu._discovery, "application/json; charset=UTF-8", endpoint)
        elif endpoint == "algorithms":
            self._send(200, emu._algorithms, "application/json; charset=UTF-8", endpoint)
        elif endpoint == "assets":
            info = emu._asset_info(arg)
            if info is None:
                self._error(404, f"Asset '{arg}' not found.", endpoint)
            else:
                self._send(200, json.dumps(info).encode(), "application/json", endpoint)
        else:
            self._error(404, f"Unknown path {self.path}", endpoint)

    def do_POST(self) -> None:
        endpoint, _ = self._route()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(400, "Invalid Content-Length header.", endpoint)
            return
        raw = self.rfile.read(length) if length else b""
        if endpoint not in ("value:compute", "image:computePixels"):
            self._error(404, f"Unknown path {self.path}", endpoint)
            return
        emu = self.server.emulator
        refusal = emu._enter()
        try:
            if refusal:
                self._error(429, refusal, endpoint, **{"Retry-After": "1"})
            else:
                self._api_call(endpoint, raw)
        finally:
            emu._leave()

    def _api_call(self, endpoint: str, raw: bytes) -> None:
        emu = self.server.emulator
        try:
            body: Any = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = None
        delay_ms = emu.latency_for(endpoint, body)
        if delay_ms:
            emu._stopping.wait(delay_ms / 1000)
        fault = emu._next_fault()
        if fault in ("429", "500", "503"):
            status = int(fault)
            headers = {"Retry-After": str(emu.faults.retry_after_s)} if status == 429 else {}
            self._error(status, _FAULT_MESSAGES[status], endpoint, **headers)
            return
        if fault == "timeout":
            emu._stopping.wait(emu.faults.stall_s)
            self.close_connection = True
            if emu._stopping.is_set():
                return
        if fault == "memory":
            self._error(400, "User memory limit exceeded.", endpoint)
            return
        if fault == "html":
            self._send(200, _HTML, "text/html; charset=UTF-8", endpoint)
            return
        try:
            if not isinstance(body, dict):
                raise EvalError("Invalid JSON payload received.")
            if endpoint == "value:compute":
                result = compute_value(emu.catalog, body)
                payload = json.dumps({"result": result}).encode()
                content_type = "application/json; charset=UTF-8"
            else:
                payload, content_type = compute_pixels(emu.catalog, body, emu.max_request_bytes)
        except EvalError as e:
            self._error(e.code, str(e), endpoint)
            return
        except Exception as e:  # a bug in the emulator: answer like EE's internal error
            log.exception("emulator: error evaluating a request")
            self._error(500, f"An internal error has occurred: {type(e).__name__}: {e}", endpoint)
            return
        if fault == "truncate":
            self.server.emulator._record(endpoint, 200)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
            return
        self._send(200, payload, content_type, endpoint)


@dataclass(frozen=True)
class EmulatorConfig:
    """The emulator's settings (``skyscript-build emulator``'s flags; a pipeline's ``backend:``
    section of type ``emulator`` gives ``collections`` and the latencies). Each field's help is
    its declaration."""

    collections: Path = setting(
        help="the collections YAML: collection id -> images",
        pipeline="backend.collections",
        backends=("emulator",),
    )
    port: int = setting(8765, help="port on 127.0.0.1, 0 = any free one", minimum=0, maximum=65535)
    latency_ms: float = setting(
        0.0,
        help="fixed delay added to each API request, in milliseconds",
        pipeline="backend.latency_ms",
        backends=("emulator",),
        minimum=0,
    )
    latency_ms_per_mpx: float = setting(
        0.0,
        help="more delay per megapixel of a computePixels request (latency = BASE + COST x Mpx)",
        pipeline="backend.latency_ms_per_mpx",
        backends=("emulator",),
        minimum=0,
    )
    fault: str | None = setting(
        None,
        help="fault rates, e.g. 429:0.1,500:0.05,503:0.05,timeout:0.02,truncate:0.02,html:0.01,"
        "memory:0.01",
    )
    seed: int = setting(0, help="seed of the fault sequence", minimum=0)
    stall_s: float = setting(30.0, help="how long a 'timeout' fault stalls, in seconds", minimum=0)
    retry_after: int = setting(1, help="Retry-After seconds of a 429 fault", minimum=0)
    max_request_bytes: int | None = setting(
        None, help="computePixels size limit (default: Earth Engine's 50331648)", minimum=1
    )
    max_concurrent: int | None = setting(
        None,
        help="answer 429 past this many requests in flight (Earth Engine's quota: 40)",
        minimum=1,
    )
    max_rps: float | None = setting(None, help="answer 429 past this many requests/s", above=0)

    def __post_init__(self) -> None:
        check_settings(self)


class Emulator:
    """A local Earth Engine REST server over the GeoTIFFs of a collections file.

    Use as a context manager (``with Emulator(path) as emu: emu.url``) or call ``start()`` and
    ``stop()``. ``stats`` counts the requests; ``reset()`` clears it.

    Args:
        collections_file: the collections YAML (see ``load_collections``).
        port: TCP port on 127.0.0.1; 0 picks a free one.
        latency_ms: fixed delay added to every API request.
        latency_ms_per_mpx: more delay per megapixel of a ``computePixels`` grid.
        faults: a FaultPlan, or a spec string like ``"429:0.1,500:0.05"``.
        seed: seed of the fault sequence (when ``faults`` is a string).
        stall_s: how long a ``timeout`` fault stalls (when ``faults`` is a string).
        retry_after_s: the Retry-After of a 429 fault (when ``faults`` is a string).
        max_request_bytes: computePixels size limit (Earth Engine's: 48 MiB), lower it to
            make large tiles fail with Earth Engine's "Total request size" error.
        max_concurrent: refuse (429 "Too many concurrent aggregations.") an API request that
            would exceed this many in flight, as Earth Engine does past a project's quota (40).
        max_rps: refuse (429) API requests beyond this many per second (token bucket).
    """

    def __init__(
        self,
        collections_file: str | Path | Catalog,
        port: int = 0,
        latency_ms: float = 0,
        latency_ms_per_mpx: float = 0,
        faults: FaultPlan | str | None = None,
        seed: int = 0,
        stall_s: float = 30.0,
        retry_after_s: int = 1,
        max_request_bytes: int | None = None,
        max_concurrent: int | None = None,
        max_rps: float | None = None,
    ) -> None:
        if latency_ms < 0 or latency_ms_per_mpx < 0:
            raise ConfigError("latency must not be negative")
        if not 0 <= port < 65536:
            raise ConfigError(f"bad port {port}")
        self.catalog = (
            collections_file
            if isinstance(collections_file, Catalog)
            else load_collections(collections_file)
        )
        self.port = port
        self.latency_ms = latency_ms
        self.latency_ms_per_mpx = latency_ms_per_mpx
        self.faults = (
            faults
            if isinstance(faults, FaultPlan)
            else parse_faults(faults, seed=seed, stall_s=stall_s, retry_after_s=retry_after_s)
        )
        if max_request_bytes is not None and max_request_bytes <= 0:
            raise ConfigError("max_request_bytes must be positive")
        self.max_request_bytes = max_request_bytes
        if (max_concurrent is not None and max_concurrent < 1) or (
            max_rps is not None and max_rps <= 0
        ):
            raise ConfigError("max_concurrent and max_rps must be positive")
        self.max_concurrent = max_concurrent
        self.max_rps = max_rps
        self._tokens = float(max_rps or 0)
        self._token_time = time.monotonic()
        self.stats = EmulatorStats()
        self._lock = threading.Lock()
        self._fault_n = 0
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._algorithms = _ee_file("algorithms.json")
        self._discovery = b""

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL to pass to ``ee.Initialize(opt_url=...)``."""
        if self._server is None:
            raise RuntimeError("the emulator is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Emulator:
        """Bind 127.0.0.1:port and serve in a background thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        try:
            server = _Server(("127.0.0.1", self.port), _Handler)
        except OSError as e:
            raise ConfigError(f"cannot listen on 127.0.0.1:{self.port}: {e.strerror}") from None
        server.emulator = self
        self._server = server
        doc = json.loads(_ee_file("cloud_api_discovery_document.json"))
        doc["rootUrl"] = doc["baseUrl"] = self.url + "/"
        self._discovery = json.dumps(doc).encode()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        log.debug("Earth Engine emulator serving on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving: wake stalled requests, close open connections, join the threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        deadline = time.monotonic() + 5.0
        with self._lock:
            threads = list(self._threads)
        for thread in threads:  # the request threads end once their connection is closed
            thread.join(max(deadline - time.monotonic(), 0.01))
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @classmethod
    def from_config(cls, config: EmulatorConfig) -> Emulator:
        """The emulator ``config`` describes (not started yet)."""
        return cls(
            config.collections,
            port=config.port,
            latency_ms=config.latency_ms,
            latency_ms_per_mpx=config.latency_ms_per_mpx,
            faults=config.fault,
            seed=config.seed,
            stall_s=config.stall_s,
            retry_after_s=config.retry_after,
            max_request_bytes=config.max_request_bytes,
            max_concurrent=config.max_concurrent,
            max_rps=config.max_rps,
        )

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Start (if needed) and block until interrupted (Ctrl-C), then stop."""
        self.start()
        try:
            while not self._stopping.wait(3600):
                pass
        finally:
            self.stop()

    def reset(self) -> None:
        """Clear the request log and restart the fault sequence."""
        with self._lock:
            self.stats = EmulatorStats()
            self._fault_n = 0

    def latency_for(self, endpoint: str, body: Any) -> float:
        """Milliseconds to wait before answering an API request (the latency model)."""
        delay = self.latency_ms
        if self.latency_ms_per_mpx and endpoint == "image:computePixels":
            try:
                dims = body["grid"]["dimensions"]
                mpx = int(dims["width"]) * int(dims["height"]) / 1e6
            except (ValueError, KeyError, TypeError):
                mpx = 0.0  # a bad body: answered with its error after the fixed latency
            delay += self.latency_ms_per_mpx * mpx
        return delay

    # -- bookkeeping (called by the handler threads) -------------------------------------
    def _record(self, endpoint: str, status: int, nbytes: int = 0) -> None:
        with self._lock:
            self.stats.requests[(endpoint, status)] += 1
            self.stats.bytes_sent[endpoint] += nbytes

    def _enter(self) -> str | None:
        """Count a request in; the message of a quota refusal (429), or None."""
        with self._lock:
            self.stats.concurrency += 1
            self.stats.max_concurrency = max(self.stats.max_concurrency, self.stats.concurrency)
            if self.max_concurrent and self.stats.concurrency > self.max_concurrent:
                self.stats.refused["concurrency"] += 1
                return "Too many concurrent aggregations."
            if self.max_rps:
                now = time.monotonic()
                self._tokens = min(
                    self.max_rps, self._tokens + (now - self._token_time) * self.max_rps
                )
                self._token_time = now
                if self._tokens < 1:
                    self.stats.refused["rate"] += 1
                    return "Quota exceeded: too many requests per second."
                self._tokens -= 1
        return None

    def _leave(self) -> None:
        with self._lock:
            self.stats.concurrency -= 1

    def _next_fault(self) -> str | None:
        with self._lock:
            n = self._fault_n
            self._fault_n += 1
            fault = self.faults.fault_for(n)
            if fault:
                self.stats.faults[fault] += 1
        return fault

    def _connection_opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _asset_info(self, asset_id: str) -> dict[str, Any] | None:
        name = f"projects/earthengine-public/assets/{asset_id}"
        asset_id = asset_id.removeprefix("projects/earthengine-public/assets/")
        if self.catalog.get(asset_id) is not None:
            return {"type": "IMAGE_COLLECTION", "name": name, "id": asset_id}
        record = self.catalog.image(asset_id)
        if record is None:
            return None
        return {
            "type": "IMAGE",
            "name": name,
            "id": asset_id,
            "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.time_start / 1000)),
            "properties": record.properties,
        }
