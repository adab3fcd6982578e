"""The fetch stage: ``requests/`` -> ``images{k}/<key>.jpg``, ``meta{k}/<key>.pickle``, ``manifest/``.

Requests are cut into shards (``shard_size`` rows of one requests part). A shard fetches its
tiles on a thread pool (the backends' caps bound what is in flight), checks each tile
(``quality``), writes the JPEG then the pickle atomically, and, last, its manifest part and its
stats json. A rerun skips shards whose stats say nothing retryable is left, and inside a shard
it refetches only keys that are not ``ok`` with both files present or a permanent skip. A run
killed at any point and rerun ends with the same files as an uninterrupted run: temporary files
are removed at start, a key's files are (re)written atomically, and a key that ends not ``ok``
has its files removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from .backends import (
    BACKENDS,
    RETRYABLE_REASONS,
    BackendConfig,
    SourceInfo,
    TileRequest,
    TileResult,
    get_backend,
    resolve_source,
    source_info,
    use_sources,
)
from .backends.limits import LimitsConfig
from .cluster import ClusterConfig, dask_client, map_shards
from .errors import ConfigError, InputError
from .fetch_writer import (
    FilesWriter,
    WebDatasetWriter,
    part_of,
    read_manifest,
    write_manifest,
)
from .files import remove_temp_files, write_json_atomic
from .meta import dumps_meta, make_meta
from .progress import progress_bar
from .quality import QualityConfig, QualityError, check_tile, decode_jpeg, encode_jpeg

__all__ = ["FetchConfig", "FetchResult", "FetchShard", "run_fetch", "fetch_shard", "part_of"]

log = logging.getLogger(__name__)

FORMATS = ("files", "webdataset")
REQUIRED_COLUMNS = (
    "key", "alias", "collection", "gsd", "years", "crs", "x_min", "y_min", "x_max", "y_max",
    "width", "height", "west", "south", "east", "north", "center_tags", "surrounding_tags",
)  # fmt: skip
# Shards in flight at once in one process, so one shard's slow start overlaps another's tiles.
SHARDS_IN_FLIGHT = 2


@dataclass(frozen=True)
class FetchConfig:
    """Settings of the fetch stage (the CLI's flags, one to one).

    Attributes:
        requests: the plan's ``requests/`` folder.
        out: the dataset folder.
        backend: ``earthengine``, ``raster`` or ``xyz``; None takes each source's own.
        ee_url, project, key_file: Earth Engine endpoint, Cloud project, service-account key.
        location: a raster folder or XYZ URL template, overriding the source's.
        parts: number of ``images{k}``/``meta{k}`` folders (k = 2 .. parts+1).
        format: ``files`` (SkyScript's layout) or ``webdataset`` (tar shards).
        workers: worker processes (1: this process only; 0: one per core).
        scheduler: an existing Dask scheduler's address.
        concurrency, rate: requests in flight and requests/s for the whole run.
        shard_size: requests per shard.
        timeout_s, max_attempts: per request.
        allow_next_year: a year without imagery falls back to the request's next year.
        quality: thresholds of the quality checks.
    """

    requests: Path
    out: Path
    backend: str | None = None
    ee_url: str | None = None
    project: str | None = None
    key_file: str | None = None
    location: str | None = None
    parts: int = 6
    format: str = "files"
    workers: int = 1
    scheduler: str | None = None
    concurrency: int = 40
    rate: float = 100.0
    shard_size: int = 200
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_s: float = 0.5
    allow_next_year: bool = False
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", Path(self.requests))
        object.__setattr__(self, "out", Path(self.out))
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(
                f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.parts < 1:
            raise ConfigError(f"--parts must be at least 1, got {self.parts}")
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be at least 1, got {self.shard_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 (one per core) or more, got {self.workers}")
        LimitsConfig(self.concurrency, self.rate)  # validates both
        if not self.requests.is_dir():
            raise InputError(self.requests, "requests folder does not exist (run the plan stage)")
        parts = self.request_parts()
        if not parts:
            raise InputError(self.requests, "no part-*.parquet files (run the plan stage)")
        for part in parts:
            try:
                names = set(pq.read_schema(part).names)
            except Exception as e:
                raise InputError(part, f"not a readable parquet file ({e})") from None
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise InputError(
                    part, f"not a requests file: missing column(s) {', '.join(missing)}"
                )

    def request_parts(self) -> list[Path]:
        """The requests parts, sorted."""
        return sorted(self.requests.glob("part-*.parquet"))

    @property
    def cluster(self) -> ClusterConfig:
        return ClusterConfig(workers=self.workers, scheduler=self.scheduler)

    def backend_config(self, name: str, limits: LimitsConfig | None = None) -> BackendConfig:
        """The ``BackendConfig`` of backend ``name`` for this run."""
        return BackendConfig(
            backend=name,
            ee_url=self.ee_url,
            project=self.project,
            key_file=self.key_file,
            location=self.location,
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
            backoff_s=self.backoff_s,
            allow_next_year=self.allow_next_year,
            limits=limits or LimitsConfig(self.concurrency, self.rate),
        )


@dataclass(frozen=True)
class FetchShard:
    """One shard: rows ``start:stop`` of one requests part."""

    index: int
    requests_file: Path
    start: int
    stop: int
    config: FetchConfig
    limits: LimitsConfig
    keys_hash: str = ""  # of the shard's request keys: a changed plan reruns the shard
    sources: tuple[SourceInfo, ...] = ()  # resolved by the driver, for the workers

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


@dataclass
class FetchResult:
    """Counts over the whole dataset after the run."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shards_run: int = 0
    shards_done_before: int = 0
    fetched: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0

    def summary(self) -> str:
        """One line for the end of the run."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())) or "none"
        return (
            f"fetch: {self.ok} ok, {self.skipped} skipped, {self.failed} failed "
            f"(reasons: {reasons}); {self.fetched} tiles fetched in {self.seconds:.1f}s "
            f"(client start {self.startup_seconds:.1f}s), "
            f"{self.shards_run} shards run, {self.shards_done_before} already done"
        )


def list_shards(
    config: FetchConfig, limits: LimitsConfig, sources: tuple[SourceInfo, ...] = ()
) -> list[FetchShard]:
    """Every shard of the run, in a fixed order (requests part, then row)."""
    shards: list[FetchShard] = []
    for part in config.request_parts():
        keys = pq.read_table(part, columns=["key"]).column("key").to_pylist()
        for start in range(0, len(keys), config.shard_size):
            stop = min(len(keys), start + config.shard_size)
            digest = hashlib.blake2b("\n".join(keys[start:stop]).encode(), digest_size=8)
            shards.append(
                FetchShard(
                    len(shards), part, start, stop, config, limits, digest.hexdigest(), sources
                )
            )
    return shards


def _stats_path(shard: FetchShard) -> Path:
    return shard.config.out / "manifest" / f"{shard.name}.stats.json"


def _shard_finished(shard: FetchShard) -> bool:
    path = _stats_path(shard)
    if not path.exists():
        return False
    try:
        stats = json.loads(path.read_text())
    except (ValueError, OSError):
        return False
    return int(stats.get("retryable", 1)) == 0 and stats.get("keys_hash") == shard.keys_hash


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_EXECUTOR_LOCK = threading.Lock()


def _executor(threads: int) -> ThreadPoolExecutor:
    """This process's tile thread pool (shared by its shards)."""
    with _EXECUTOR_LOCK:
        pool = _EXECUTORS.get(threads)
        if pool is None:
            pool = _EXECUTORS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="fetch")
        return pool


def _backend_name(config: FetchConfig, alias: str, collection: str) -> str:
    return config.backend or source_info(alias, collection).backend


def _remove_files(writer: Any, key: str) -> None:
    if isinstance(writer, FilesWriter):
        for rel in writer.paths(key):
            with contextlib.suppress(FileNotFoundError):
                (writer.out / rel).unlink()


def _process_tile(
    request: TileRequest, shard: FetchShard, writer: FilesWriter | WebDatasetWriter
) -> dict[str, Any]:
    """Fetch, check and write one tile; return its manifest row (never raises)."""
    config = shard.config
    source = source_info(request.alias, request.collection)
    try:
        backend = get_backend(
            config.backend_config(
                _backend_name(config, request.alias, request.collection), shard.limits
            )
        )
        result = backend.fetch(request)
    except Exception as e:  # a bug in a backend must not kill the shard: the tile is data
        log.exception("fetching %s failed unexpectedly", request.key)
        result = TileResult.failed("error", detail=type(e).__name__)
    key = request.key_for_year(result.year) if result.year else request.key
    row: dict[str, Any] = {
        "key": key,
        "request_key": request.key,
        "status": result.status,
        "reason": result.reason,
        "attempts": result.attempts,
        "bytes": None,
        "collection": source.collection or request.collection,
        "image_id": result.image_id,
        "acquisition_time": result.acquisition_time,
        "filepath": None,
    }
    if result.status == "ok":
        rgb, jpeg = result.rgb, result.jpeg
        reason: str | None = None
        if rgb is None and jpeg is not None:
            try:
                rgb = decode_jpeg(jpeg)
            except QualityError:
                row.update(status="failed", reason="corrupt")
                return row
        assert rgb is not None
        reason = check_tile(rgb, result.valid, config.quality, source.has_cloud_rule)
        if reason is not None:
            row.update(status="skipped", reason=reason)
        else:
            if jpeg is None:
                jpeg = encode_jpeg(rgb, config.quality.jpeg_quality)
            t = result.acquisition_time
            assert t is not None
            meta = make_meta(
                request.box,
                (t.year, t.month, t.day, t.hour, t.minute),
                request.center_tags,
                list(request.surrounding_tags),
            )
            info = {
                **meta,
                "key": key,
                "collection": row["collection"],
                "image_id": result.image_id,
                "acquisition_time": t.isoformat(),
            }
            row["filepath"] = writer.write(key, jpeg, dumps_meta(meta), info)
            row["bytes"] = len(jpeg)
            return row
    _remove_files(writer, key)
    return row


def fetch_shard(shard: FetchShard, on_tile: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fetch one shard (module-level: a Dask task); return its stats (also written last)."""
    config = shard.config
    use_sources(shard.sources)
    stats_path = _stats_path(shard)
    if _shard_finished(shard):
        return json.loads(stats_path.read_text())
    t0 = time.monotonic()
    table = pq.read_table(shard.requests_file).slice(shard.start, shard.stop - shard.start)
    requests = [TileRequest.from_row(r) for r in table.to_pylist()]
    writer: FilesWriter | WebDatasetWriter
    if config.format == "webdataset":
        writer = WebDatasetWriter(config.out, config.parts, shard.name)
    else:
        writer = FilesWriter(config.out, config.parts)
    manifest_path = config.out / "manifest" / f"{shard.name}.parquet"
    old = {row["request_key"]: row for row in read_manifest(manifest_path)}
    current = {r.key for r in requests}
    for gone in [row for key, row in old.items() if key not in current]:
        _remove_files(writer, gone["key"])  # the plan dropped this request since
    rows: dict[str, dict[str, Any]] = {}
    todo: list[TileRequest] = []
    for request in requests:
        prev = old.get(request.key)
        if prev is not None and (
            (prev["status"] == "ok" and writer.done(prev["key"]))
            or (prev["status"] == "skipped" and prev["reason"] not in RETRYABLE_REASONS)
        ):
            rows[request.key] = prev
        else:
            todo.append(request)
    by_backend: dict[str, list[TileRequest]] = {}
    for request in todo:
        by_backend.setdefault(_backend_name(config, request.alias, request.collection), []).append(
            request
        )
    for name, group in by_backend.items():
        get_backend(config.backend_config(name, shard.limits)).prepare(group)
    # More threads than request slots: a thread encoding, decoding or writing holds no slot.
    pool = _executor(min(256, 2 * config.concurrency + 2))
    for row in pool.map(lambda r: _process_tile(r, shard, writer), todo):
        rows[row["request_key"]] = row
        if on_tile is not None:
            on_tile(1)
    ordered = [rows[r.key] for r in requests]
    writer.finish(shard.name, [row["key"] for row in ordered if row["status"] == "ok"])
    write_manifest(ordered, manifest_path)
    counts = Counter(row["status"] for row in ordered)
    reasons = Counter(row["reason"] for row in ordered if row["reason"])
    stats = {
        "shard": shard.name,
        "requests_file": shard.requests_file.name,
        "rows": [shard.start, shard.stop],
        "keys_hash": shard.keys_hash,
        "ok": counts.get("ok", 0),
        "skipped": counts.get("skipped", 0),
        "failed": counts.get("failed", 0),
        "reasons": dict(sorted(reasons.items())),
        "retryable": sum(1 for row in ordered if row["status"] == "failed"),
        "fetched": len(todo),
        "attempts": sum(
            int(row["attempts"] or 0)
            for row in ordered
            if row["request_key"] in {r.key for r in todo}
        ),
        "seconds": round(time.monotonic() - t0, 3),
    }
    write_json_atomic(stats_path, stats)
    if on_tile is not None and len(requests) > len(todo):
        on_tile(len(requests) - len(todo))
    return stats


def _run_local(shards: list[FetchShard]) -> list[dict[str, Any]]:
    """Run shards in this process, ``SHARDS_IN_FLIGHT`` at a time, with a tile progress bar."""
    total = sum(s.stop - s.start for s in shards)
    with (
        progress_bar(total=total, desc="fetch", unit="tile") as bar,
        ThreadPoolExecutor(SHARDS_IN_FLIGHT, thread_name_prefix="shard") as outer,
    ):
        lock = threading.Lock()

        def tick(n: int) -> None:
            with lock:
                bar.update(n)

        return list(outer.map(lambda s: fetch_shard(s, tick), shards))


def _resolve_sources(config: FetchConfig) -> tuple[SourceInfo, ...]:
    """The sources of every (alias, collection) the requests name, from the catalog now."""
    pairs: set[tuple[str, str]] = set()
    for part in config.request_parts():
        table = pq.read_table(part, columns=["alias", "collection"])
        aliases, collections = (
            table.column("alias").to_pylist(),
            table.column("collection").to_pylist(),
        )
        pairs.update(zip(aliases, collections, strict=True))
    return tuple(resolve_source(alias, collection) for alias, collection in sorted(pairs))


def run_fetch(config: FetchConfig) -> FetchResult:
    """Fetch every request not yet done; return counts over the whole dataset."""
    t0 = time.monotonic()
    local = LimitsConfig(config.concurrency, config.rate)
    sources = _resolve_sources(config)
    use_sources(sources)
    # Open every backend here first: bad credentials or settings fail before any output.
    for name in sorted({config.backend or s.backend for s in sources}):
        get_backend(config.backend_config(name, local))
    startup = time.monotonic() - t0
    config.out.mkdir(parents=True, exist_ok=True)
    removed = remove_temp_files(config.out)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    cluster = config.cluster
    results: list[dict[str, Any]]
    if cluster.inline:
        shards = list_shards(config, local, sources)
        pending = [s for s in shards if not _shard_finished(s)]
        results = _run_local(pending)
    else:
        with dask_client(cluster) as client:
            processes = max(1, len(client.scheduler_info().get("workers", {})))
            name = f"skyscript-fetch-{zlib.crc32(str(config.out.resolve()).encode()):08x}"
            limits = LimitsConfig(config.concurrency, config.rate, processes, name)
            shards = list_shards(config, limits, sources)
            pending = [s for s in shards if not _shard_finished(s)]
            results = map_shards(fetch_shard, pending, cluster, desc="fetch", client=client)
    # A worker lost in the middle of writing a file leaves its temporary name behind (the
    # retried shard wrote the file itself); every shard is done now, so nothing else is writing.
    remove_temp_files(config.out)
    result = _summarise(config, len(shards) - len(pending), results, time.monotonic() - t0)
    result.startup_seconds = startup
    return result


def _summarise(
    config: FetchConfig, done_before: int, results: list[dict[str, Any]], seconds: float
) -> FetchResult:
    result = FetchResult(shards_run=len(results), shards_done_before=done_before, seconds=seconds)
    reasons: Counter[str] = Counter()
    for path in sorted((config.out / "manifest").glob("part-*.stats.json")):
        stats = json.loads(path.read_text())
        result.ok += stats["ok"]
        result.skipped += stats["skipped"]
        result.failed += stats["failed"]
        reasons.update(stats["reasons"])
    result.reasons = dict(reasons)
    result.fetched = sum(int(r.get("fetched", 0)) for r in results)
    return result


def iter_manifest(out: Path) -> Iterator[dict[str, Any]]:
    """Every manifest row of a dataset, in shard order."""
    for path in sorted((Path(out) / "manifest").glob("part-*.parquet")):
        yield from read_manifest(path)
