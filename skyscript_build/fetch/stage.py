"""The fetch stage: ``requests/`` -> ``images{k}/<key>.jpg``, ``meta{k}/<key>.pickle``, ``manifest/``.

Requests are cut into shards: ``shard_size`` requests of one requests part, in fetch order (by
source and CRS, then along a Z-order curve of the tile centres), so that a shard's tiles are
neighbours. A shard looks up each tile's image, groups the tiles of one image that crowd
together into block requests (``fetch_blocks``; ``--blocks off``: one request per tile),
fetches the pixels losslessly, cuts each tile from its block, checks it (``quality``), encodes
the JPEG locally and writes the JPEG then the pickle atomically. A tile's bytes do not depend
on how it was fetched. After each request's tiles are written, their manifest rows are
appended to the shard's journal; last come its manifest part and its stats json.

Every run checks the work of earlier runs: for each key a shard's manifest calls done, one
``stat`` per file (present, and of the recorded size; ``verify`` also decodes every JPEG and
loads every pickle); a damaged or missing file, or an unreadable manifest part, is fetched
again and counted as repaired. A run killed at any point and rerun ends with the same files as
an uninterrupted run: temporary files are removed at start, a key's files are (re)written
atomically, the journal keeps the tiles of every finished request (only requests in flight
are lost), and a key that ends not ``ok`` has its files removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from image_sources import Catalog, ImageSource, default_catalog

from .._once import once_per_process
from ..cluster import ClusterConfig, dask_client
from ..errors import InputError, SkyScriptError
from ..files import check_out_dir, leave_no_empty_folders, remove_temp_files, write_json_atomic
from ..meta import dumps_meta, make_meta
from ..progress import progress_bar
from ..runner import RunnerConfig, run_shards
from ..settings import Form, check_settings, nested, scheduler_setting, setting
from ._blocks import (
    BLOCK_MODES,
    MAX_SIDE,
    RGB_BYTES,
    BlockSettings,
    block_grid,
    block_id,
    plan_blocks,
    split,
)
from ._quality import JPEG_ENCODERS, QualityConfig, check_tile, encode_jpeg
from ._writer import (
    FilesWriter,
    ManifestError,
    ManifestRow,
    ShardStats,
    WebDatasetWriter,
    part_of,
    read_manifest,
    write_manifest,
)
from .backends import (
    BACKENDS,
    RETRYABLE_REASONS,
    Backend,
    BackendConfig,
    FetchError,
    TileRequest,
    TileResult,
    get_backend,
)
from .backends.base import ImageChoice
from .backends.limits import LimitsConfig

__all__ = [
    "FetchConfig",
    "FetchResult",
    "FetchShard",
    "run_fetch",
    "fetch_shard",
    "fetch_order",
    "part_of",
]

log = logging.getLogger(__name__)

FORMATS = ("files", "webdataset")
REQUIRED_COLUMNS = (
    "key", "alias", "collection", "gsd", "years", "crs", "x_min", "y_min", "x_max", "y_max",
    "width", "height", "west", "south", "east", "north", "center_tags", "surrounding_tags",
)  # fmt: skip
ORDER_COLUMNS = ("key", "alias", "crs", "x_min", "y_min", "x_max", "y_max")
# Shards in flight at once in one process, so one shard's image lookup and slow start overlap
# another's tiles.
SHARDS_IN_FLIGHT = 8


def _on_off(value: Any) -> Any:
    # YAML reads a bare ``off`` (``on``) as false (true): taken as meant.
    if isinstance(value, bool):
        return "auto" if value else "off"
    return value


_BLOCKS_YAML = Form(_on_off, {"type": "boolean"}, "YAML's bare on/off read as meant")
_BLOCKS = "block requests"


@dataclass(frozen=True)
class FetchConfig:
    """Settings of the fetch stage, checked on creation (each field's help is its declaration).

    A pipeline file gives the backend's settings under ``backend:``, the layout under
    ``output:`` and the rest under ``fetch:``. The image sources the requests name (``catalog``: the default catalog when the config is
    made, or a pipeline's own) travel to every worker with the config.
    """

    requests: Path = setting(help="the plan's requests/ folder")
    out: Path = setting(help="the dataset folder to write")
    backend: str | None = setting(
        None, help="imagery backend (default: each source's own)", choices=BACKENDS
    )
    ee_url: str | None = setting(
        None,
        help="Earth Engine endpoint, e.g. an emulator's URL (default: the high-volume endpoint)",
        pipeline="backend.url",
        pattern=(r"https?://\S+", "an http(s) URL"),
        backends=("earthengine",),
    )
    project: str | None = setting(
        None,
        help="Google Cloud project registered for Earth Engine (default: the key file's)",
        pipeline="backend.project",
        backends=("earthengine",),
    )
    key_file: Path | None = setting(
        None,
        help="service-account key JSON (default: $EE_SERVICE_ACCOUNT_KEY, else Google's default "
        "credentials)",
        pipeline="backend.key_file",
        backends=("earthengine",),
    )
    location: str | None = setting(
        None,
        help="a folder of GeoTIFFs / COGs (raster) or a tile URL template such as "
        "https://host/{z}/{x}/{y}.png (xyz), overriding the source's own",
        pipeline="backend.location",
        backends=("raster", "xyz"),
        deprecated=("backend.folder",),
    )
    parts: int = setting(
        6,
        help="images{k}/ and meta{k}/ folders, k = 2..PARTS+1",
        pipeline="output.parts",
        minimum=1,
        maximum=1000,
    )
    format: str = setting(
        "files",
        help="output layout: files (SkyScript's) or webdataset (tar shards)",
        pipeline="output.format",
        choices=FORMATS,
    )
    workers: int = setting(1, help="worker processes, 0 = one per core", minimum=0)
    scheduler: str | None = scheduler_setting("an existing Dask scheduler to run the shards on")
    concurrency: int = setting(
        40,
        help="requests in flight, run-wide (Earth Engine's quota: 40)",
        pipeline="backend.concurrency",
        minimum=1,
        maximum=10_000,
    )
    rate: float = setting(
        100.0,
        help="requests per second, run-wide (Earth Engine's quota: 100)",
        pipeline="backend.rate",
        above=0,
    )
    shard_size: int = setting(
        200, help="requests per shard", pipeline="fetch.shard_size", minimum=1, maximum=1_000_000
    )
    timeout_s: float = setting(
        60.0,
        help="seconds to wait for one request",
        cli="--timeout",
        pipeline="backend.timeout_s",
        above=0,
    )
    max_attempts: int = setting(
        6, help="tries per request", pipeline="fetch.max_attempts", minimum=1, maximum=100
    )
    backoff_s: float = 0.5
    allow_next_year: bool = setting(
        False,
        help="when a year has no imagery, try the request's next candidate year",
        pipeline="fetch.allow_next_year",
    )
    blocks: str = setting(
        "auto",
        help="auto: block requests where the cost model says they pay; off: one per tile",
        pipeline="fetch.blocks",
        choices=BLOCK_MODES,
        form=_BLOCKS_YAML,
        group=_BLOCKS,
    )
    block_overhead_ms: float = setting(
        500.0,
        help="cost model: milliseconds per request",
        pipeline="fetch.block_overhead_ms",
        minimum=0,
        group=_BLOCKS,
    )
    block_ms_per_mpx: float = setting(
        100.0,
        help="cost model: milliseconds per megapixel",
        pipeline="fetch.block_ms_per_mpx",
        minimum=0,
        group=_BLOCKS,
    )
    block_max_px: int = setting(
        2048,
        help="largest block side in pixels",
        pipeline="fetch.block_max_px",
        minimum=1,
        maximum=MAX_SIDE,
        group=_BLOCKS,
    )
    block_memory_mb: int = setting(
        512,
        help="megabytes of block pixels a process holds at once",
        pipeline="fetch.block_memory_mb",
        minimum=1,
        group=_BLOCKS,
    )
    jpeg_quality: int = setting(
        90,
        help="quality of the JPEGs written",
        pipeline="fetch.jpeg_quality",
        minimum=1,
        maximum=100,
    )
    jpeg_encoder: str = setting(
        "pillow",
        help="JPEG encoder (changing it or the quality refetches the tiles encoded otherwise)",
        pipeline="fetch.jpeg_encoder",
        choices=tuple(JPEG_ENCODERS),
    )
    verify: bool = setting(
        False,
        help="also decode every JPEG and load every pickle of earlier runs (a rerun always "
        "checks each file's presence and size); damaged files are fetched again",
        pipeline="fetch.verify",
    )
    quality: QualityConfig = nested(QualityConfig, help="thresholds of the quality checks")
    catalog: Catalog = field(default_factory=default_catalog)

    def __post_init__(self) -> None:
        check_settings(self)
        self.block_settings  # noqa: B018 - the cost model needs an overhead or a per-Mpx cost
        check_out_dir(self.out)
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

    @property
    def block_settings(self) -> BlockSettings:
        return BlockSettings(
            mode=self.blocks,
            overhead_ms=self.block_overhead_ms,
            ms_per_mpx=self.block_ms_per_mpx,
            max_px=self.block_max_px,
        )

    @property
    def encoding(self) -> str:
        """The JPEG encoder, its quality and library version: what a JPEG's bytes depend on."""
        import PIL

        return f"{self.jpeg_encoder} q{self.jpeg_quality} (Pillow {PIL.__version__})"

    def backend_config(self, name: str, limits: LimitsConfig | None = None) -> BackendConfig:
        """The ``BackendConfig`` of backend ``name`` for this run."""
        return BackendConfig(
            backend=name,
            ee_url=self.ee_url,
            project=self.project,
            key_file=str(self.key_file) if self.key_file is not None else None,
            location=self.location,
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
            backoff_s=self.backoff_s,
            allow_next_year=self.allow_next_year,
            limits=limits or LimitsConfig(self.concurrency, self.rate),
            catalog=self.catalog,
        )


@dataclass(frozen=True)
class FetchShard:
    """One shard: positions ``start:stop`` of one requests part in fetch order."""

    index: int
    requests_file: Path
    start: int
    stop: int
    config: FetchConfig
    limits: LimitsConfig
    keys_hash: str = ""  # of the shard's request keys: a changed plan reruns the shard

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
    repaired: dict[str, int] = field(default_factory=dict)
    shards_run: int = 0
    shards_done_before: int = 0
    fetched: int = 0
    requests: int = 0
    blocks: int = 0
    block_tiles: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0

    def summary(self) -> str:
        """One line for the end of the run."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())) or "none"
        repaired = ""
        if self.repaired:
            what = ", ".join(f"{k} {v}" for k, v in sorted(self.repaired.items()))
            repaired = f"; repaired {sum(self.repaired.values())} ({what})"
        return (
            f"fetch: {self.ok} ok, {self.skipped} skipped, {self.failed} failed "
            f"(reasons: {reasons}){repaired}; {self.fetched} tiles fetched with "
            f"{self.requests} pixel requests ({self.blocks} blocks holding {self.block_tiles} "
            f"tiles) in {self.seconds:.1f}s (client start {self.startup_seconds:.1f}s), "
            f"{self.shards_run} shards run, {self.shards_done_before} already done"
        )


# --- shards -------------------------------------------------------------------------------


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """The 16 low bits of ``v`` spread to the even bits of a uint64 (for a Z-order code)."""
    v = v.astype(np.uint64) & np.uint64(0xFFFF)
    for shift, mask in ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def fetch_order(table: pa.Table) -> np.ndarray:
    """Row positions of a requests part in fetch order: by source (alias) and CRS, then along a
    Z-order curve of the tile centres (65,536 steps across the part's extent), then by key."""
    n = table.num_rows
    if n == 0:
        return np.zeros(0, np.int64)

    def steps(lo: str, hi: str) -> np.ndarray:
        c = (table.column(lo).to_numpy() + table.column(hi).to_numpy()) / 2
        span = max(float(c.max() - c.min()), 1e-9)
        return np.floor((c - c.min()) / span * 65535).astype(np.int64)

    code = _spread_bits(steps("x_min", "x_max")) | (_spread_bits(steps("y_min", "y_max")) << 1)
    keys = pa.table(
        {
            "alias": table.column("alias"),
            "crs": table.column("crs"),
            "code": code,
            "key": table.column("key"),
            "pos": np.arange(n),
        }
    )
    by = [("alias", "ascending"), ("crs", "ascending"), ("code", "ascending"), ("key", "ascending")]
    return keys.sort_by(by).column("pos").to_numpy()


def list_shards(config: FetchConfig, limits: LimitsConfig) -> list[FetchShard]:
    """Every shard of the run, in a fixed order (requests part, then fetch order)."""
    shards: list[FetchShard] = []
    for part in config.request_parts():
        table = pq.read_table(part, columns=list(ORDER_COLUMNS))
        keys = table.column("key").take(fetch_order(table)).to_pylist()
        for start in range(0, len(keys), config.shard_size):
            stop = min(len(keys), start + config.shard_size)
            digest = hashlib.blake2b("\n".join(keys[start:stop]).encode(), digest_size=8)
            shards.append(
                FetchShard(len(shards), part, start, stop, config, limits, digest.hexdigest())
            )
    return shards


@functools.lru_cache(maxsize=2)
def _ordered_part(path: str, mtime_ns: int, size: int) -> pa.Table:
    """A requests part in fetch order (kept for the part's next shards in this process)."""
    table = pq.read_table(path)
    return table.take(fetch_order(table.select(list(ORDER_COLUMNS))))


def _shard_requests(shard: FetchShard) -> list[TileRequest]:
    st = shard.requests_file.stat()
    table = _ordered_part(str(shard.requests_file), st.st_mtime_ns, st.st_size)
    rows = table.slice(shard.start, shard.stop - shard.start).to_pylist()
    return [TileRequest.from_row(r) for r in rows]


def _manifest_dir(config: FetchConfig) -> Path:
    return config.out / "manifest"


def _stats_path(shard: FetchShard) -> Path:
    return _manifest_dir(shard.config) / f"{shard.name}.stats.json"


def _journal_path(shard: FetchShard) -> Path:
    # "_" first: readers of manifest/ as a parquet dataset skip it.
    return _manifest_dir(shard.config) / f"_{shard.name}.journal.jsonl"


@once_per_process
def _executor(threads: int) -> ThreadPoolExecutor:
    """This process's request thread pool (shared by its shards)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="fetch")


class _ByteBudget:
    """Bytes of block pixels one process holds at once (a block larger than the whole
    budget waits until it is alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = min(n, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


@once_per_process
def _budget(megabytes: int) -> _ByteBudget:
    """This process's budget of block pixels (shared by its shards)."""
    return _ByteBudget(megabytes * 2**20)


class _Journal:
    """The manifest rows of a shard's finished requests, appended as they finish (one JSON
    line per request, written with one ``write``: a line cut by a crash is ignored)."""

    def __init__(self, path: Path, encoding: str) -> None:
        self.path = path
        self.encoding = encoding
        self._lock = threading.Lock()

    def add(self, rows: list[ManifestRow]) -> None:
        line = json.dumps({"encoding": self.encoding, "rows": [r.to_json() for r in rows]})
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)

    def read(self) -> dict[str, ManifestRow]:
        """Rows by request key (later lines win); lines of another encoding are ignored."""
        rows: dict[str, ManifestRow] = {}
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return rows
        for line in lines:
            try:
                entry = json.loads(line)
                if entry.get("encoding") != self.encoding:
                    continue
                for data in entry["rows"]:
                    row = ManifestRow.from_json(data)
                    rows[row.request_key] = row
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # the line a crash cut short
        return rows

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class _ShardRun:
    """What a shard's requests share while they run."""

    shard: FetchShard
    writer: FilesWriter | WebDatasetWriter
    journal: _Journal
    on_tile: Callable[[int], None] | None
    budget: _ByteBudget


def _backend_name(config: FetchConfig, alias: str) -> str:
    return config.backend or config.catalog.get_source(alias).backend


def _remove_files(writer: Any, key: str) -> None:
    if isinstance(writer, FilesWriter):
        for rel in writer.paths(key):
            with contextlib.suppress(FileNotFoundError):
                (writer.out / rel).unlink()


def _finish_tile(
    request: TileRequest, result: TileResult, run: _ShardRun, block: str | None
) -> ManifestRow:
    """Check, encode and write one fetched tile; return its manifest row."""
    config = run.shard.config
    source = config.catalog.get_source(request.alias)
    key = request.key_for_year(result.year) if result.year else request.key
    row = ManifestRow(
        key=key,
        request_key=request.key,
        status=result.status,
        reason=result.reason,
        attempts=result.attempts,
        collection=source.collection,
        image_id=result.image_id,
        acquisition_time=result.acquisition_time,
        block=block,
    )
    if result.status == "ok":
        assert result.rgb is not None and result.acquisition_time is not None
        reason = check_tile(result.rgb, result.valid, config.quality, source.cloud is not None)
        if reason is None:
            _write_tile(request, result, row, run)
            return row
        row.status, row.reason = "skipped", reason
    _remove_files(run.writer, key)
    return row


def _write_tile(request: TileRequest, result: TileResult, row: ManifestRow, run: _ShardRun) -> None:
    """Encode the tile's JPEG and write it with its meta pickle; fill in ``row``'s files."""
    config = run.shard.config
    assert result.rgb is not None and result.acquisition_time is not None
    jpeg = encode_jpeg(result.rgb, config.jpeg_quality, config.jpeg_encoder)
    t = result.acquisition_time
    meta = make_meta(
        request.box,
        (t.year, t.month, t.day, t.hour, t.minute),
        request.center_tags,
        list(request.surrounding_tags),
    )
    info = {
        **meta,
        "key": row.key,
        "collection": row.collection,
        "image_id": result.image_id,
        "acquisition_time": t.isoformat(),
    }
    meta_bytes = dumps_meta(meta)
    row.filepath = run.writer.write(row.key, jpeg, meta_bytes, info)
    row.bytes, row.meta_bytes = len(jpeg), len(meta_bytes)


def _failure(error: FetchError, attempts: int) -> TileResult:
    retry_later = error.retryable or error.reason in RETRYABLE_REASONS
    make = TileResult.failed if retry_later else TileResult.skipped
    return make(error.reason, attempts=attempts, detail=error.detail)


def _guarded(
    job: Callable[[], list[ManifestRow]], requests: Sequence[TileRequest], run: _ShardRun
) -> list[ManifestRow]:
    """Run one request's job; record its rows in the journal. A bug in a backend fails the
    job's tiles (retried by the next run) with one log entry; a settings error stops the run."""
    try:
        rows = job()
    except SkyScriptError:
        raise
    except Exception as e:
        log.exception("fetching %s failed unexpectedly", requests[0].key)
        rows = [
            _finish_tile(r, TileResult.failed("error", detail=type(e).__name__), run, None)
            for r in requests
        ]
    run.journal.add(rows)
    if run.on_tile is not None:
        run.on_tile(len(rows))
    return rows


def _run_tile(backend: Backend, request: TileRequest, run: _ShardRun) -> list[ManifestRow]:
    return [_finish_tile(request, backend.fetch(request), run, None)]


def _run_block(
    backend: Backend,
    members: list[tuple[TileRequest, ImageChoice]],
    run: _ShardRun,
    spent: int = 0,
) -> list[ManifestRow]:
    """Fetch one request (a tile alone, or the block of several) and write its tiles."""
    requests = [r for r, _ in members]
    image = members[0][1]
    grid = block_grid([r.grid for r in requests])
    single = len(members) == 1
    error: FetchError | None = None
    with run.budget.hold(grid.pixels * RGB_BYTES):
        try:
            rgb, attempts = backend.fetch_grid(requests[0], image, grid, split=single)
        except FetchError as e:
            error = e
        else:
            name = None if single else block_id(grid)
            rows = []
            for request in requests:
                tile = TileResult(
                    "ok",
                    rgb=rgb[grid.window(request.grid)],
                    image_id=image.image_id,
                    acquisition_time=image.acquisition_time,
                    year=image.year,
                    attempts=spent + attempts,
                )
                rows.append(_finish_tile(request, tile, run, name))
            return rows
    spent += getattr(error, "attempts", 1)
    if error.reason == "too-large" and not single:
        log.debug("block %s too large: split in two", block_id(grid))
        left, right = split([r.grid for r in requests])
        return _run_block(backend, [members[i] for i in left], run, spent) + _run_block(
            backend, [members[i] for i in right], run, spent
        )
    return [_finish_tile(r, _failure(error, spent), run, None) for r in requests]


#: One request to send (a tile alone, or a block of tiles): the job, and the tiles it covers.
_Job = tuple[Callable[[], list[ManifestRow]], list[TileRequest]]


def _jobs(todo: list[TileRequest], run: _ShardRun) -> tuple[list[_Job], list[ManifestRow]]:
    """The shard's requests as jobs (one request each: a tile, or a block of tiles), and the
    rows of tiles settled without a pixel request (no image, a failed lookup)."""
    config = run.shard.config
    by_backend: dict[str, list[TileRequest]] = {}
    for request in todo:
        name = _backend_name(config, request.alias)
        by_backend.setdefault(name, []).append(request)
    jobs: list[_Job] = []
    settled: list[ManifestRow] = []
    for name, group in by_backend.items():
        backend = get_backend(config.backend_config(name, run.shard.limits))
        if not backend.supports_blocks:
            jobs += [(functools.partial(_run_tile, backend, r, run), [r]) for r in group]
            continue
        by_image: dict[tuple[Any, ...], list[tuple[TileRequest, ImageChoice]]] = {}
        for request, choice in zip(group, backend.choose_images(group), strict=True):
            if isinstance(choice, TileResult):
                settled.append(_finish_tile(request, choice, run, None))
            else:
                image = (request.alias, request.collection, choice.image_id, request.crs)
                by_image.setdefault((*image, request.gsd), []).append((request, choice))
        for members in by_image.values():
            for block in plan_blocks([r.grid for r, _ in members], config.block_settings):
                chosen = [members[i] for i in block]
                job = functools.partial(_run_block, backend, chosen, run)
                jobs.append((job, [r for r, _ in chosen]))
    if settled:
        run.journal.add(settled)
        if run.on_tile is not None:
            run.on_tile(len(settled))
    return jobs, settled


def _previous_rows(
    shard: FetchShard, journal: _Journal, stats: ShardStats | None
) -> tuple[dict[str, ManifestRow], bool]:
    """The rows earlier runs left for this shard (manifest part, then journal), by request key,
    and whether the manifest part was unreadable. Rows of another JPEG encoding are dropped."""
    unreadable = False
    try:
        rows = read_manifest(_manifest_dir(shard.config) / f"{shard.name}.parquet")
    except ManifestError as e:
        log.warning("%s: its shard is fetched again", e)
        rows, unreadable = [], True
    if stats is not None and stats.encoding not in (None, shard.config.encoding):
        rows = []  # encoded otherwise: fetched again
    old = {row.request_key: row for row in rows}
    old.update(journal.read())
    return old, unreadable


CHECK_COLUMNS = ["key", "status", "reason", "bytes", "meta_bytes"]


def _still_done(shard: FetchShard, writer: FilesWriter | WebDatasetWriter) -> bool:
    """Whether a shard an earlier run finished needs nothing: its manifest part reads (only
    the columns the check needs), it has a row per request, nothing in it is retryable, and
    every ``ok`` key's files are there (``all_present``, or ``writer.check`` with ``verify``
    or a WebDataset). The common case of a rerun: measured (bench/bench_fetch.py, the check's
    cost per part and per file), kept cheap."""
    path = _manifest_dir(shard.config) / f"{shard.name}.parquet"
    try:
        table = pq.ParquetFile(path).read(columns=CHECK_COLUMNS)
    except (OSError, ValueError, pa.ArrowException):
        return False  # the full path says what is wrong with it
    if table.num_rows != shard.stop - shard.start:
        return False
    if isinstance(writer, FilesWriter) and not shard.config.verify:
        status = table["status"].to_pylist()
        reason = table["reason"].to_pylist()
        if any(
            st != "ok" and (st != "skipped" or why in RETRYABLE_REASONS)
            for st, why in zip(status, reason, strict=True)
        ):
            return False
        ok = table.filter(pc.equal(table["status"], "ok"))
        return writer.all_present(
            ok["key"].to_pylist(), ok["bytes"].to_pylist(), ok["meta_bytes"].to_pylist()
        )
    verify = shard.config.verify
    for key, status, reason, jpeg_bytes, meta_bytes in zip(
        *(table.column(c).to_pylist() for c in CHECK_COLUMNS), strict=True
    ):
        if status == "ok":
            if writer.check(key, jpeg_bytes, meta_bytes, verify) is not None:
                return False
        elif status != "skipped" or reason in RETRYABLE_REASONS:
            return False
    return True


@dataclass
class ShardOutcome:
    """What ``fetch_shard`` did: the shard's stats, the keys an earlier run wrote that the shard
    no longer has (``orphans``: their files go at the end of the run), and whether it only
    checked the files of an earlier run (``checked_only``)."""

    stats: ShardStats
    orphans: list[str] = field(default_factory=list)
    checked_only: bool = False


def _writer(shard: FetchShard) -> FilesWriter | WebDatasetWriter:
    config = shard.config
    if config.format == "webdataset":
        return WebDatasetWriter(config.out, config.parts, shard.name)
    return FilesWriter(config.out, config.parts)


def fetch_shard(shard: FetchShard, on_tile: Callable[[int], None] | None = None) -> ShardOutcome:
    """Check and fetch one shard (module-level: a Dask task); its stats are written last."""
    config = shard.config
    t0 = time.monotonic()
    stats_before = ShardStats.read(_stats_path(shard))
    journal = _Journal(_journal_path(shard), config.encoding)
    writer = _writer(shard)
    finished_before = (
        stats_before is not None
        and stats_before.keys_hash == shard.keys_hash
        and stats_before.encoding in (None, config.encoding)
        and not journal.path.exists()
    )
    if stats_before is not None and finished_before and _still_done(shard, writer):
        if on_tile is not None:
            on_tile(shard.stop - shard.start)
        stats = dataclasses.replace(stats_before, fetched=0, repaired={})
        return ShardOutcome(stats, checked_only=True)
    requests = _shard_requests(shard)
    old, unreadable = _previous_rows(shard, journal, stats_before)
    current = {r.key for r in requests}
    orphans = [row.key for k, row in old.items() if k not in current and row.status == "ok"]
    rows, todo, repaired = _kept_rows(requests, old, writer, config.verify)
    if unreadable:
        repaired["manifest"] += 1
    if on_tile is not None and len(rows):
        on_tile(len(rows))
    run = _ShardRun(shard, writer, journal, on_tile, _budget(config.block_memory_mb))
    stats = _fetch_todo(todo, run, rows)
    ordered = [rows[r.key] for r in requests]
    writer.finish(shard.name, [row.key for row in ordered if row.status == "ok"])
    write_manifest(ordered, _manifest_dir(config) / f"{shard.name}.parquet")
    counts = Counter(row.status for row in ordered)
    stats.shard, stats.requests_file = shard.name, shard.requests_file.name
    stats.positions, stats.keys_hash = [shard.start, shard.stop], shard.keys_hash
    stats.encoding = config.encoding
    stats.ok, stats.skipped, stats.failed = counts["ok"], counts["skipped"], counts["failed"]
    stats.reasons = dict(sorted(Counter(row.reason for row in ordered if row.reason).items()))
    stats.retryable = counts["failed"]
    stats.repaired = dict(sorted(repaired.items()))
    stats.seconds = round(time.monotonic() - t0, 3)
    write_json_atomic(_stats_path(shard), dataclasses.asdict(stats))
    journal.remove()
    return ShardOutcome(stats, orphans)


def _kept_rows(
    requests: list[TileRequest],
    old: dict[str, ManifestRow],
    writer: FilesWriter | WebDatasetWriter,
    verify: bool,
) -> tuple[dict[str, ManifestRow], list[TileRequest], Counter[str]]:
    """The earlier rows that stand (``ok`` with sound files, permanent skips), by request key;
    the requests to fetch; what was repaired, by problem."""
    rows: dict[str, ManifestRow] = {}
    todo: list[TileRequest] = []
    repaired: Counter[str] = Counter()
    for request in requests:
        prev = old.get(request.key)
        if prev is not None and prev.status == "ok":
            problem = writer.check(prev.key, prev.bytes, prev.meta_bytes, verify)
            if problem is None:
                rows[request.key] = prev
                continue
            repaired[problem] += 1
        elif prev is not None and prev.status == "skipped" and prev.reason not in RETRYABLE_REASONS:
            rows[request.key] = prev
            continue
        todo.append(request)
    return rows, todo, repaired


def _fetch_todo(
    todo: list[TileRequest], run: _ShardRun, rows: dict[str, ManifestRow]
) -> ShardStats:
    """Fetch the tiles of ``todo`` into ``rows`` (by request key); the counts of the requests
    sent (the rest of the shard's stats is filled in by the caller)."""
    stats = ShardStats(fetched=len(todo))
    jobs, settled = _jobs(todo, run)
    for row in settled:
        rows[row.request_key] = row
    # More threads than request slots: a thread encoding or writing tiles holds no slot.
    pool = _executor(min(256, 2 * run.shard.config.concurrency + 2))
    for job_rows in pool.map(lambda job: _guarded(job[0], job[1], run), jobs):
        for row in job_rows:
            rows[row.request_key] = row
        stats.pixel_requests += max(int(row.attempts or 0) for row in job_rows)
        if job_rows[0].block is not None:
            stats.blocks += 1
            stats.block_tiles += len(job_rows)
    return stats


# --- the run --------------------------------------------------------------------------------


def _run_local(shards: list[FetchShard]) -> list[ShardOutcome]:
    """Run shards through the runner on this process's threads, ``SHARDS_IN_FLIGHT`` at a
    time, with a tile progress bar. No shard is ever skipped as done: a finished one only
    checks its files."""
    total = sum(s.stop - s.start for s in shards)
    runner = RunnerConfig(
        cluster=ClusterConfig(workers=SHARDS_IN_FLIGHT), local="threads", progress=False
    )
    with progress_bar(total=total, desc="fetch", unit="tile") as bar:
        lock = threading.Lock()

        def tick(n: int) -> None:
            with lock:
                bar.update(n)

        return run_shards(functools.partial(fetch_shard, on_tile=tick), shards, runner)


@dataclass(frozen=True)
class FetchGroup:
    """Shards that one Dask task fetches side by side on threads (a request waits on the
    network: one shard at a time would leave a worker idle)."""

    index: int
    shards: tuple[FetchShard, ...]

    @property
    def name(self) -> str:
        return f"group-{self.index:05d}"


def fetch_group(group: FetchGroup) -> list[ShardOutcome]:
    """A Dask task: its shards on threads; what each did, in order."""
    with ThreadPoolExecutor(len(group.shards), thread_name_prefix="shard") as pool:
        return list(pool.map(fetch_shard, group.shards))


def _sources_of(config: FetchConfig) -> tuple[ImageSource, ...]:
    """The sources the requests name, by alias; an alias the catalog does not know stops the
    run before any work."""
    aliases: set[str] = set()
    for part in config.request_parts():
        names = set(pq.read_table(part, columns=["alias"]).column("alias").unique().to_pylist())
        unknown = sorted(names - set(config.catalog))
        if unknown:
            raise InputError(
                part,
                f"image source(s) {', '.join(unknown)} not in the catalog (known: "
                f"{', '.join(config.catalog)}): define them as the plan did (a pipeline's "
                "source_definitions, or image_sources.add_source)",
            )
        aliases |= names
    return tuple(config.catalog.get_source(alias) for alias in sorted(aliases))


def _samples(config: FetchConfig, aliases: set[str]) -> list[TileRequest]:
    """The first request of each source in ``aliases`` (a place for a probe request)."""
    found: dict[str, TileRequest] = {}
    for part in config.request_parts():
        column = pq.read_table(part, columns=["alias"]).column("alias").to_pylist()
        wanted = [i for i, a in enumerate(column) if a in aliases and a not in found]
        if wanted:
            table = pq.read_table(part)
            for i in wanted:
                row = table.slice(i, 1).to_pylist()[0]
                found.setdefault(row["alias"], TileRequest.from_row(row))
        if len(found) == len(aliases):
            break
    return [found[a] for a in sorted(found)]


def _check_backends(
    config: FetchConfig, sources: tuple[ImageSource, ...], limits: LimitsConfig
) -> None:
    """Open every backend the requests need and check its settings (one probe request where
    one is needed): a bad setting raises before anything is created."""
    by_backend: dict[str, list[ImageSource]] = {}
    for source in sources:
        by_backend.setdefault(config.backend or source.backend, []).append(source)
    for name in sorted(by_backend):
        backend = get_backend(config.backend_config(name, limits))
        group = by_backend[name]
        samples = _samples(config, {s.alias for s in group}) if name == "xyz" else []
        backend.check(group, samples)


def _clean_up(config: FetchConfig, shards: list[FetchShard], orphans: list[str]) -> None:
    """Remove what no current shard owns: the parts of shards that no longer exist (fewer
    shards than before), and the files of keys an earlier run wrote that no manifest now
    calls done (the plan dropped them)."""
    folder = _manifest_dir(config)
    stale = [
        p
        for p in folder.glob("part-*.parquet")
        if int(p.name[len("part-") : -len(".parquet")]) >= len(shards)
    ]
    for part in stale:
        with contextlib.suppress(ManifestError):
            orphans += [r.key for r in read_manifest(part) if r.status == "ok"]
        name = part.name[: -len(".parquet")]
        for path in (
            part,
            folder / f"{name}.stats.json",
            config.out / "webdataset" / f"{name}.tar",
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if not orphans or config.format != "files":
        return
    done: set[str] = set()
    for shard in shards:
        with contextlib.suppress(ManifestError):
            part = folder / f"{shard.name}.parquet"
            done.update(r.key for r in read_manifest(part) if r.status == "ok")
    writer = FilesWriter(config.out, config.parts)
    for key in sorted(set(orphans) - done):
        _remove_files(writer, key)


def run_fetch(config: FetchConfig) -> FetchResult:
    """Check earlier work, then fetch every request not yet done; return counts over the whole
    dataset."""
    t0 = time.monotonic()
    local = LimitsConfig(config.concurrency, config.rate)
    _check_backends(config, _sources_of(config), local)  # before anything is created
    startup = time.monotonic() - t0
    with leave_no_empty_folders(config.out, depth=1):
        result = _fetch_all(config, local)
    result.seconds = time.monotonic() - t0
    result.startup_seconds = startup
    return result


def _fetch_all(config: FetchConfig, local: LimitsConfig) -> FetchResult:
    config.out.mkdir(parents=True, exist_ok=True)
    _manifest_dir(config).mkdir(exist_ok=True)
    removed = remove_temp_files(config.out)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    cluster = config.cluster
    results: list[ShardOutcome]
    if cluster.inline:
        shards = list_shards(config, local)
        results = _run_local(shards)
    else:
        with dask_client(cluster) as client:
            processes = max(1, len(client.scheduler_info().get("workers", {})))
            name = f"skyscript-fetch-{zlib.crc32(str(config.out.resolve()).encode()):08x}"
            limits = LimitsConfig(config.concurrency, config.rate, processes, name)
            shards = list_shards(config, limits)
            groups = [
                FetchGroup(k, tuple(shards[i : i + SHARDS_IN_FLIGHT]))
                for k, i in enumerate(range(0, len(shards), SHARDS_IN_FLIGHT))
            ]
            runner = RunnerConfig(cluster=cluster, desc="fetch")
            done = run_shards(fetch_group, groups, runner, client=client)
            results = [outcome for group in done for outcome in group]
    _clean_up(config, shards, [k for r in results for k in r.orphans])
    # A worker lost in the middle of writing a file leaves its temporary name behind (the
    # retried shard wrote the file itself); every shard is done now, so nothing else is writing.
    remove_temp_files(config.out)
    return _summarise(results)


def _summarise(outcomes: list[ShardOutcome]) -> FetchResult:
    result = FetchResult()
    reasons: Counter[str] = Counter()
    repaired: Counter[str] = Counter()
    for outcome in outcomes:
        stats = outcome.stats
        result.ok += stats.ok
        result.skipped += stats.skipped
        result.failed += stats.failed
        reasons.update(stats.reasons)
        repaired.update(stats.repaired)
        if outcome.checked_only:
            result.shards_done_before += 1
            continue
        result.shards_run += 1
        result.fetched += stats.fetched
        result.requests += stats.pixel_requests
        result.blocks += stats.blocks
        result.block_tiles += stats.block_tiles
    result.reasons = dict(reasons)
    result.repaired = dict(repaired)
    return result


def iter_manifest(out: Path) -> Iterator[dict[str, Any]]:
    """Every manifest row of a dataset, in shard order, as a dict of its columns."""
    for path in sorted((Path(out) / "manifest").glob("part-*.parquet")):
        yield from (dataclasses.asdict(row) for row in read_manifest(path))
