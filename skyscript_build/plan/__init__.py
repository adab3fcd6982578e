"""The plan stage: ``objects/`` -> ``requests/part-*.parquet``, one row per image to fetch.

For every object: the image source (the finest that covers it, is fine enough for its
``max_gsd`` and gives a tile of ``min_px``..``max_px`` pixels), the year (the latest the source
has within ``years``), a square tile in a projected CRS (the source's own or the local UTM
zone) shifted off-centre by a seeded random amount, and the surrounding objects inside the tile
that are groundable at its GSD. Per-tag quotas (``per_tag_cap``) balance the tags. Choice,
sampling and framing run in one global pass; the surroundings and the parts run in spatial shards
(``_shards``: a fixed lon/lat grid, in process or on Dask). Everything is vectorised with numpy
and shapely 2 array functions; the output is byte-identical for the same objects, settings and
seed, whatever the worker count. ``dry_run`` estimates the fetch's cost and writes nothing.

    >>> result = run_plan(PlanConfig(objects=Path("build/x/objects"), out=Path("build/x/requests")))
    >>> print(result.summary())
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

import image_sources
from image_sources import ImageSource

from ..cluster import ClusterConfig, map_shards
from ..errors import ConfigError
from ..files import remove_temp_files, write_json_atomic
from ..progress import progress_bar
from ._choose import DUPLICATE, OVER_LIMIT, SAMPLED_OUT, choose_sources, frame, limit
from ._choose import sample_by_tag as _sample_by_tag
from ._geo import ProjectedBounds, distinct, give_back_memory, object_hash
from ._objects import Objects, object_parts, read_objects
from ._output import SCHEMA, write_parts
from ._shards import (
    ShardTask,
    halo_indexes,
    halo_members,
    run_shard,
    shard_cells,
    shard_done_path,
    subset,
)
from ._surround import warm_up

__all__ = ["PlanConfig", "PlanResult", "run_plan", "SCHEMA", "JPEG_BYTES_PER_PIXEL", "MARKER"]

log = logging.getLogger(__name__)

#: Typical size of an aerial RGB JPEG (quality ~90) per pixel, for the disk estimate.
JPEG_BYTES_PER_PIXEL = 0.35
#: Written last into the requests folder: the settings hash and the counts. Names starting
#: with ``_`` are skipped by parquet dataset readers (``pd.read_parquet("requests")``).
MARKER = "_plan.json"
#: Written before the first shard, removed after the marker: an unfinished run's settings
#: hash, so that a rerun with the same settings keeps the shards it finished.
PENDING = "_plan.pending.json"
STATS_DIR = "_stats"
#: Bumped when the rules change, so that an older plan is not reused.
_RULES_VERSION = 2


@dataclass(frozen=True)
class PlanConfig:
    """Settings of the plan stage (validated on creation).

    Attributes:
        objects: the extract stage's objects folder (``part-*.parquet``).
        out: the requests folder to write (``part-*.parquet`` + stats).
        sources: image source aliases to choose from; empty: every registered source.
        years: acquisition years allowed, as a range ``(first, last)`` or ``(year,)``;
            empty: any year a source has.
        seed: seed of the random shift, the sampling and the surroundings order.
        min_px, max_px: tile side in pixels allowed.
        point_px: tile side of points and short lines (clamped into min_px..max_px).
        margin: space around an area's (or long line's) bounding box, as a fraction of its
            extent on each side.
        shift: fraction of the free space around the object the random shift may use
            (0: centred, 1: the object may touch the edge).
        per_tag_cap: per ``key=value`` quota of objects (None: keep every object).
        max_surrounding: most surrounding objects per tile.
        max_requests: most requests (a seeded random subset); None: no limit.
        tag_filter: groundability table (name or CSV path) deciding which tags are visible
            at a tile's GSD.
        dry_run: estimate requests, pixels, disk and time per source; write nothing.
        rows_per_part: requests per output part file.
        workers: threads (0: one per core) for the global pass and the shards; the output
            does not depend on it.
        shard_deg: side (degrees) of the lon/lat grid cells that shard the surroundings and
            the parts (a shard: the requests whose tile centre is in one cell).
        scheduler: address of an existing Dask scheduler to run the shards on (as Dask
            tasks); without it the shards run on threads in this process.
    """

    objects: Path
    out: Path
    sources: tuple[str, ...] = ()
    years: tuple[int, ...] = ()
    seed: int = 0
    min_px: int = 256
    max_px: int = 1024
    point_px: int = 512
    margin: float = 0.1
    shift: float = 0.8
    per_tag_cap: int | None = None
    max_surrounding: int = 50
    max_requests: int | None = None
    tag_filter: str = "default"
    dry_run: bool = False
    rows_per_part: int = 100_000
    workers: int = 0
    shard_deg: float = 0.05
    scheduler: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", Path(self.objects))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "years", tuple(int(y) for y in self.years))
        if self.min_px < 1:
            raise ConfigError(f"min_px must be at least 1, got {self.min_px}")
        if self.min_px > self.max_px:
            raise ConfigError(
                f"min_px ({self.min_px}) is larger than max_px ({self.max_px}): "
                "the tile size range is empty"
            )
        if self.point_px < 1:
            raise ConfigError(f"point_px must be at least 1, got {self.point_px}")
        if not 0 <= self.margin <= 10:
            raise ConfigError(f"margin must be between 0 and 10 (a fraction), got {self.margin}")
        if not 0 <= self.shift <= 1:
            raise ConfigError(f"shift must be between 0 and 1, got {self.shift}")
        if self.per_tag_cap is not None and self.per_tag_cap < 1:
            raise ConfigError(f"per_tag_cap must be at least 1, got {self.per_tag_cap}")
        if self.max_surrounding < 0:
            raise ConfigError(f"max_surrounding must be 0 or more, got {self.max_surrounding}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError(f"max_requests must be at least 1, got {self.max_requests}")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 (one per core) or more, got {self.workers}")
        if not 0 < self.shard_deg <= 360:
            raise ConfigError(f"shard_deg must be in (0, 360] degrees, got {self.shard_deg}")
        if self.rows_per_part < 1:
            raise ConfigError(f"rows_per_part must be at least 1, got {self.rows_per_part}")
        if len(self.years) > 2 or any(not 1900 <= y <= 2100 for y in self.years):
            raise ConfigError(f"years must be (first, last) or (year,), got {self.years}")
        if len(self.years) == 2 and self.years[0] > self.years[1]:
            raise ConfigError(f"years {self.years[0]}-{self.years[1]} runs backwards")
        self.image_sources()  # unknown aliases and empty year ranges fail here

    def n_workers(self) -> int:
        """The threads to use: ``workers``, or one per core."""
        return ClusterConfig(workers=self.workers).n_workers()

    @property
    def year_range(self) -> tuple[int | None, int | None]:
        """(first, last) allowed year; None where open."""
        if not self.years:
            return None, None
        return self.years[0], self.years[-1]

    def image_sources(self) -> list[ImageSource]:
        """The sources to choose from, finest first, each with a year in range."""
        explicit = bool(self.sources)
        aliases = self.sources or tuple(image_sources.list_sources())
        first, last = self.year_range
        out = []
        for alias in aliases:
            source = image_sources.get_source(alias)
            if not source.years_within(first, last):
                if explicit:
                    raise ConfigError(
                        f"image source {alias} has no imagery in {_years_text(first, last)} "
                        f"(it has {source.years[0]}-{source.years[-1]})"
                    )
                continue
            out.append(source)
        if not out:
            raise ConfigError(f"no image source has imagery in {_years_text(first, last)}")
        return sorted(out, key=lambda s: (s.gsd, s.alias))

    def settings_hash(self, objects_fingerprint: str = "") -> str:
        """Hash of everything that decides the output (not ``dry_run``, ``out``)."""
        from tag_filters import get_tag_filter_path

        settings: dict[str, Any] = {
            f.name: str(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("dry_run", "out", "objects", "workers", "scheduler")
        }
        settings["sources"] = [s.fingerprint() for s in self.image_sources()]
        settings["tag_filter_file"] = hashlib.sha256(
            get_tag_filter_path(self.tag_filter).read_bytes()
        ).hexdigest()
        settings["objects"] = objects_fingerprint
        settings["rules_version"] = _RULES_VERSION
        text = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _years_text(first: int | None, last: int | None) -> str:
    if first is None:
        return "any year"
    return f"{first}" if first == last else f"{first}-{last}"


@dataclass
class PlanResult:
    """What a plan run did (or, with ``dry_run``, would cost)."""

    objects: int = 0
    requests: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, dict[str, float]] = field(default_factory=dict)
    surrounding: int = 0
    duration_s: float = 0.0
    out: str = ""
    dry_run: bool = False
    reused: bool = False
    settings_hash: str = ""
    resumed_shards: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: requests per source, skips by reason, time."""
        per = ", ".join(f"{a} {int(v['requests']):,}" for a, v in self.by_source.items())
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped.items()))
        verb = "would request" if self.dry_run else "planned"
        text = f"plan: {verb} {self.requests:,} images from {self.objects:,} objects"
        if per:
            text += f" ({per})"
        if skipped:
            text += f"; skipped {skipped:,} ({reasons})"
        if self.reused:
            text += f"; already planned with these settings, nothing to do -> {self.out}"
        elif not self.dry_run:
            text += f" in {self.duration_s:.1f} s -> {self.out}"
            if self.resumed_shards:
                text += f" (resumed: {self.resumed_shards:,} shards were already written)"
        return text

    def estimate_lines(self) -> list[str]:
        """The dry-run table: requests, megapixels, disk and time per source."""
        lines = [f"{'source':<8}{'requests':>12}{'megapixels':>14}{'disk':>12}{'time':>12}"]
        for alias, v in self.by_source.items():
            lines.append(
                f"{alias:<8}{int(v['requests']):>12,}{v['megapixels']:>14,.1f}"
                f"{_bytes(v['bytes']):>12}{_duration(v['seconds']):>12}"
            )
        return lines


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _objects_fingerprint(folder: Path) -> str:
    parts = object_parts(folder)
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts)


def _entry_gsd(objs: Objects, tag_filter: str) -> np.ndarray:
    """The coarsest GSD each tag entry is visible at (the object's max_gsd when unknown)."""
    from tag_filters import load_tag_filter

    tf = load_tag_filter(tag_filter)
    owner = objs.entry_owner
    # One entry of each code (every entry of a code has the same key and value).
    some = np.full(len(objs.tag_names), -1, dtype=np.int64)
    some[objs.tag_code] = np.arange(len(objs.tag_code))
    codes = np.flatnonzero(some >= 0)
    keys = objs.tag_keys.take(some[codes]).to_pylist()
    values = objs.tag_values.take(some[codes]).to_pylist()
    per_code = np.full(len(objs.tag_names), np.nan)
    for code, k, v in zip(codes, keys, values, strict=True):
        g = tf.tag_max_gsd(k, v)
        per_code[code] = np.nan if g is None else g
    gsd = per_code[objs.tag_code]
    unknown = np.isnan(gsd)
    gsd[unknown] = objs.max_gsd[owner[unknown]]
    return gsd


def run_plan(config: PlanConfig) -> PlanResult:
    """Plan the requests for ``config.objects`` into ``config.out`` (see the module doc).

    Raises:
        InputError: the objects folder is missing, empty or not the extract's format.
        ConfigError: bad settings (unknown source, empty pixel range, ...).
    """
    t0 = time.perf_counter()
    sources = config.image_sources()
    fingerprint = _objects_fingerprint(config.objects)
    settings_hash = config.settings_hash(fingerprint)
    marker = config.out / MARKER
    if not config.dry_run and marker.exists():
        try:
            stored = json.loads(marker.read_text())
        except (OSError, ValueError):
            stored = {}
        if stored.get("settings_hash") == settings_hash:
            result = PlanResult(**{k: v for k, v in stored.items() if k in _RESULT_FIELDS})
            result.reused, result.dry_run = True, False
            result.duration_s = time.perf_counter() - t0
            log.info("plan: %s is up to date (settings %s)", config.out, settings_hash)
            return result

    if not config.dry_run and config.max_surrounding > 0:
        # numba's start-up (~0.5 s) overlaps the reading instead of delaying the first shard.
        threading.Thread(target=warm_up, name="plan-numba-warm-up", daemon=True).start()
    clock = _Clock()
    objs = read_objects(config.objects)
    give_back_memory()  # the parquet pages and the WKB
    clock.lap("read")
    log.info("plan: %d objects from %s", len(objs), config.objects)
    result = PlanResult(objects=len(objs) + sum(objs.dropped.values()), out=str(config.out))
    result.dry_run, result.settings_hash = config.dry_run, settings_hash
    skipped = dict(objs.dropped)

    entry_gsd = _entry_gsd(objs, config.tag_filter)
    visible = np.maximum.reduceat(entry_gsd, objs.tag_offsets[:-1]) if len(objs) else entry_gsd
    objs.max_gsd = np.where(np.isfinite(objs.max_gsd), objs.max_gsd, visible)
    h = object_hash(config.seed, objs.kind, objs.element, objs.osm_id)
    threads = config.n_workers()
    proj = ProjectedBounds(objs.geometry, threads)
    point_px = min(max(config.point_px, config.min_px), config.max_px)
    px = (config.min_px, point_px, config.margin)

    choice = choose_sources(objs, sources, proj, px, config.max_px)
    skipped.update({reason: n for reason, n in choice.skipped.items() if n})
    idx = np.flatnonzero(choice.source >= 0)
    if config.per_tag_cap is not None and len(idx):
        keep = _sample_by_tag(objs, idx, h, config.per_tag_cap)
        _count(skipped, SAMPLED_OUT, int((~keep).sum()))
        idx = idx[keep]
    src = choice.source[idx]
    if len(idx) > 1:
        dup = np.r_[
            False,
            (objs.kind[idx[1:]] == objs.kind[idx[:-1]])
            & (objs.osm_id[idx[1:]] == objs.osm_id[idx[:-1]])
            & (src[1:] == src[:-1]),
        ]
        _count(skipped, DUPLICATE, int(dup.sum()))
        idx, src = idx[~dup], src[~dup]
    if config.max_requests is not None:
        keep = limit(idx, h, config.max_requests)
        _count(skipped, OVER_LIMIT, int((~keep).sum()))
        idx, src = idx[keep], src[keep]
    result.skipped = skipped
    result.requests = len(idx)
    clock.lap("choose")
    pixels = choice.pixels[idx]
    gsd = np.array([s.gsd for s in sources], dtype=np.float64)[src] if len(idx) else np.zeros(0)
    for k, source in enumerate(sources):
        mine = src == k
        n = int(mine.sum())
        if n == 0:
            continue
        mpx = float((pixels[mine].astype(np.float64) ** 2).sum()) / 1e6
        result.by_source[source.alias] = {
            "requests": n,
            "megapixels": mpx,
            "bytes": mpx * 1e6 * JPEG_BYTES_PER_PIXEL,
            "seconds": n / source.quota.rate(),
        }
    if config.dry_run:
        result.duration_s = time.perf_counter() - t0
        result.timings = clock.laps
        return result

    epsg = choice.epsg[idx]
    frames = frame(objs, idx, epsg, gsd, pixels, proj, h, config.shift)
    clock.lap("frame")
    source_years = [
        tuple(sorted(s.years_within(*config.year_range), reverse=True)) for s in sources
    ]
    resume = _prepare(config.out, settings_hash)
    if not len(idx):
        write_parts(lambda a, b: SCHEMA.empty_table(), 0, config.out, config.rows_per_part)
    else:
        frames_src = (src, epsg, gsd, pixels, frames)
        shards = _run_shards(
            config, objs, visible, entry_gsd, h, idx, frames_src, sources, source_years, proj,
            resume,
        )  # fmt: skip
        result.surrounding = sum(r["surrounding"] for r in shards)
        result.resumed_shards = sum(bool(r.get("resumed")) for r in shards)
    clock.lap("surround+write")
    if len(idx):
        # CPU seconds of the shards themselves (on Dask: in the workers), per phase.
        for phase in ("surround", "write"):
            clock.laps[f"shards_cpu_{phase}"] = round(sum(r[f"cpu_{phase}"] for r in shards), 4)
    result.timings = clock.laps
    result.duration_s = time.perf_counter() - t0
    record = asdict(result)
    record.pop("reused")
    record.pop("dry_run")
    write_json_atomic(marker, record)
    (config.out / PENDING).unlink(missing_ok=True)
    log.info("plan: wrote %d requests to %s", len(idx), config.out)
    return result


_RESULT_FIELDS = {f.name for f in fields(PlanResult)}


def _run_shards(
    config: PlanConfig,
    objs: Objects,
    visible: np.ndarray,
    entry_gsd: np.ndarray,
    h: np.ndarray,
    idx: np.ndarray,
    framed: tuple,
    sources: list[ImageSource],
    source_years: list[tuple[int, ...]],
    proj: ProjectedBounds,
    resume: bool,
) -> list[dict[str, Any]]:
    """Run the spatial shards (on threads, or on Dask); returns their counts and CPU times.
    The objects' geometries are dropped once the projected bounds the shards need are known.
    With ``resume``, a shard an earlier run of the same settings finished is not run again."""
    src, epsg, gsd, pixels, frames = framed
    number, order = shard_cells(frames.lonlat, config.shard_deg)
    n_shards = int(number.max()) + 1
    ends = np.searchsorted(number[order], np.arange(1, n_shards + 1))
    starts = np.r_[0, ends[:-1]]
    n_parts = -(-(ends - starts) // config.rows_per_part)
    first_part = np.r_[0, np.cumsum(n_parts)[:-1]]
    threads = proj.threads
    # Without a scheduler the shards run on threads here (the surroundings kernel and the
    # parquet writer release the GIL): a local Dask cluster would only add the shipping of
    # every shard's arrays to its processes. Few shards: threads inside each shard instead.
    inline = config.scheduler is None
    per_shard = max(1, threads // n_shards) if inline else 1
    log.info("plan: %d shards of %.3g degrees", n_shards, config.shard_deg)
    # Every bounds a shard needs (objects visible at a tile's GSD, in its CRS) computed here,
    # once: the shards get bounds, not geometries.
    for code in distinct(epsg) if config.max_surrounding > 0 else []:
        finest = float(gsd[epsg == code].min())
        need = np.flatnonzero(visible >= finest * (1 - 1e-9))
        proj.get(np.full(len(need), code, dtype=np.int64), need)
    # Nothing needs the geometries any more: freed before the shards' peak.
    objs.geometry = proj.geoms = np.zeros(0, dtype=object)
    give_back_memory()

    # Per tile GSD, the objects visible at it in a lon/lat index (for the shards' halos).
    halo = (
        halo_indexes(objs.bounds, visible, gsd, config.shard_deg / 4)
        if config.max_surrounding
        else {}
    )

    def task(k: int) -> ShardTask:
        rows = order[starts[k] : ends[k]]
        members = idx[rows]
        if halo:
            near = halo_members(halo, gsd[rows], frames.lonlat[rows])
            members = distinct(np.concatenate([near, members]))
        sub, entries = subset(objs, members)
        return ShardTask(
            number=k, first_part=int(first_part[k]), objs=sub, visible=visible[members],
            entry_gsd=entry_gsd[entries], h=h[members],
            focus=np.searchsorted(members, idx[rows]), src=src[rows], epsg=epsg[rows],
            pixels=pixels[rows], xy=frames.xy[rows], lonlat=frames.lonlat[rows],
            sources=sources, source_years=source_years, cap=config.max_surrounding,
            out=config.out, rows_per_part=config.rows_per_part,
            threads=per_shard, projected=proj.take(members),
        )  # fmt: skip

    done: dict[int, dict[str, Any]] = {}
    for k in range(n_shards) if resume else []:
        path = shard_done_path(config.out, k)
        if path.exists():
            done[k] = {**json.loads(path.read_text()), "resumed": True}
    todo = [k for k in range(n_shards) if k not in done]
    if done:
        log.info("plan: resuming, %d of %d shards were already written", len(done), n_shards)
    if not inline:
        cluster = ClusterConfig(scheduler=config.scheduler)
        tasks = [task(k) for k in todo]
        ran = dict(
            zip(todo, map_shards(run_shard, tasks, cluster, desc="plan: shards"), strict=True)
        )
        return [done[k] if k in done else ran[k] for k in range(n_shards)]
    with (
        ThreadPoolExecutor(max_workers=max(1, threads // per_shard)) as pool,
        progress_bar(total=len(todo), desc="plan: shards", unit="shard") as bar,
    ):
        # Largest shards first, so that no big one is left running alone at the end.
        largest_first = [
            k for k in np.argsort(starts - ends, kind="stable").tolist() if k not in done
        ]
        futures = {k: pool.submit(_task_and_run, task, k) for k in largest_first}
        for _ in as_completed(futures.values()):
            bar.update(1)
    return [done[k] if k in done else futures[k].result() for k in range(n_shards)]


def _task_and_run(task: Callable[[int], ShardTask], k: int) -> dict[str, Any]:
    return run_shard(task(k))


class _Clock:
    """Seconds spent per phase (read, choose, frame, surround, write): wall clock, and the
    process's CPU time under ``cpu_<phase>`` (steadier on a shared machine)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()
        self._last_cpu = time.process_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = round(now - self._last, 4)
        self.laps[f"cpu_{name}"] = round(cpu - self._last_cpu, 4)
        self._last, self._last_cpu = now, cpu


def _count(skipped: dict[str, int], reason: str, n: int) -> None:
    if n:
        skipped[reason] = skipped.get(reason, 0) + n


def _prepare(out: Path, settings_hash: str) -> bool:
    """Make ``out`` ready for the shards; True when it holds an unfinished run of the same
    settings (its finished shards are kept), else every earlier plan file is removed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # first, so that a crash never looks finished
    remove_temp_files(out)
    pending = out / PENDING
    try:
        if json.loads(pending.read_text()).get("settings_hash") == settings_hash:
            return True
    except (OSError, ValueError):
        pass
    for path in [*sorted(out.glob("part-*")), *sorted((out / STATS_DIR).glob("*.json"))]:
        path.unlink()
    write_json_atomic(pending, {"settings_hash": settings_hash})
    return False


def describe(config: PlanConfig) -> dict[str, Any]:
    """The settings as plain values (for logs and the report)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}
