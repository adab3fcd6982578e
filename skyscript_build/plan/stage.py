"""The plan stage: ``objects/`` -> ``requests/part-*.parquet``, one row per image to fetch.

For every object: the image source (the finest that covers it, is fine enough for its
``max_gsd`` and gives a tile of ``min_px``..``max_px`` pixels), the year (the latest the source
has within ``years``), a square tile in a projected CRS (the source's own or the local UTM
zone) shifted off-centre by a seeded random amount, and the surrounding objects inside the tile
that are groundable at its GSD. Per-tag quotas (``per_tag_cap``) balance the tags.

The plan runs in two passes, in memory set by the size of a task, never by the input's:

1. ``_scan``: one task per few row groups of the objects reads only their small columns (ids,
   tags, box, ``max_gsd``), chooses the sources and writes the objects, sorted by the cell of a
   fixed lon/lat grid, into the work folder, with per-tag and per-cell counts;
2. ``_partition``: one task per spatial partition (a ``shard_deg`` block of the grid, or a
   quarter of one where it holds more than ``partition_objects`` objects) decides the requests
   from the global tag counts and the seed alone, frames the tiles, reads the halo of objects
   around it, finds the surroundings and writes its parts.

Both run through ``runner.run_shards``: on threads here, or as Dask tasks on ``scheduler``;
each finished task is marked, so a killed run resumes. The rows are byte-identical for the same
objects, settings and seed, whatever the workers or the partitions. ``dry_run`` estimates the
fetch's cost and writes nothing.

    >>> result = run_plan(PlanConfig(objects=Path("build/x/objects"), out=Path("build/x/requests")))
    >>> print(result.summary())
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from image_sources import Catalog, ImageSource, default_catalog

from .._memory import give_back_memory
from ..cluster import ClusterConfig, dask_client
from ..errors import ConfigError
from ..files import atomic_path, remove_temp_files, write_json_atomic, write_parquet_atomic
from ..runner import RunnerConfig, clear_markers, run_shards
from ..settings import check_settings, scheduler_setting, seed_setting, setting, tag_filter_setting
from ._geo import distinct
from ._objects import object_parts, read_units
from ._output import SCHEMA
from ._partition import (
    LIMIT_BINS,
    LimitNumbers,
    PartitionSettings,
    PartitionStats,
    PartitionTask,
    partition_limit_numbers,
    plan_partitions,
    run_partition,
)
from ._scan import Grid, ScanSettings, ScanStats, ScanTask, run_scan, scan_path, sum_counts
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
#: The scan files and counts of a run (removed once the plan is finished).
WORK_DIR = "_work"
#: Bumped when the rules change, so that an older plan is not reused.
_RULES_VERSION = 4
#: PlanConfig fields that do not decide the requests (of the catalog, the sources chosen from
#: are hashed, by their fingerprints).
_NOT_HASHED = ("dry_run", "out", "objects", "workers", "scheduler", "partition_objects", "catalog")


def _year_range(years: tuple[int, ...]) -> str | None:
    if len(years) > 2:
        return "give one year or a range [first, last]"
    if len(years) == 2 and years[0] > years[1]:
        return f"{years[0]}-{years[1]} runs backwards"
    return None


@dataclass(frozen=True)
class PlanConfig:
    """Settings of the plan stage, checked on creation (each field's help is its declaration).

    ``years`` is a range ``(first, last)`` or ``(year,)``; the output does not depend on
    ``workers``, ``shard_deg``, ``partition_objects`` nor ``scheduler``.
    """

    objects: Path = setting(help="extract's objects folder (part-*.parquet)")
    out: Path = setting(help="requests folder to write")
    sources: tuple[str, ...] = setting(
        (),
        help="image source aliases to choose from, comma-separated (default: every source of "
        "the catalog)",
        pipeline="sources",
        split=",",
        unique=True,
        metavar="ALIAS,...",
    )
    years: tuple[int, ...] = setting(
        (),
        help="acquisition years allowed: YYYY or a range YYYY-YYYY (default: any year a source "
        "has)",
        pipeline="plan.years",
        split="-",
        minimum=1900,
        maximum=2100,
        check=_year_range,
        metavar="YYYY[-YYYY]",
    )
    seed: int = seed_setting()
    min_px: int = setting(
        256,
        help="smallest tile side in pixels",
        pipeline="plan.min_px",
        minimum=1,
        maximum=100_000,
        at_most="max_px",
    )
    max_px: int = setting(
        1024, help="largest tile side in pixels", pipeline="plan.max_px", minimum=1, maximum=100_000
    )
    point_px: int = setting(
        512,
        help="tile side of points and short lines, in pixels (clamped into min_px..max_px)",
        pipeline="plan.point_px",
        minimum=1,
        maximum=100_000,
    )
    margin: float = setting(
        0.1,
        help="space around an area's (or long line's) bounding box, a fraction of its extent on "
        "each side",
        pipeline="plan.margin",
        minimum=0,
        maximum=10,
    )
    shift: float = setting(
        0.8,
        help="how far off-centre a tile may be shifted at random: 0 centred, 1 the object may "
        "touch the edge",
        pipeline="plan.shift",
        minimum=0,
        maximum=1,
    )
    per_tag_cap: int | None = setting(
        None,
        help="most objects per key=value tag, keeping rare tags (default: every object)",
        pipeline="plan.per_tag_cap",
        minimum=1,
    )
    max_surrounding: int = setting(
        50, help="most surrounding objects per tile", pipeline="plan.max_surrounding", minimum=0
    )
    max_requests: int | None = setting(
        None,
        help="most requests, a seeded random subset (default: no limit)",
        pipeline="plan.max_requests",
        minimum=1,
    )
    tag_filter: str = tag_filter_setting()
    dry_run: bool = setting(
        False,
        help="print the fetch's cost (requests, pixels, disk, time per source); write nothing",
    )
    rows_per_part: int = setting(100_000, help="requests per output part file", cli=None, minimum=1)
    workers: int = setting(
        0,
        help="threads that run the tasks of both passes, 0 = one per core; the output is the "
        "same for any number",
        minimum=0,
    )
    shard_deg: float = setting(
        0.05,
        help="side in degrees of the blocks of the lon/lat grid that partition the objects (by "
        "the centre of their box) for the second pass",
        above=0,
        maximum=360,
    )
    partition_objects: int = setting(
        100_000,
        help="the most objects of a partition (blocks of one row are joined up to it, a block "
        "holding more is cut into quarters): it sets a task's memory (about 350 MB at 100,000) "
        "and how many tasks read every scan file",
        minimum=1,
    )
    scheduler: str | None = scheduler_setting(
        "an existing Dask scheduler to run the tasks on (default: threads here)"
    )
    #: the image sources (the default catalog when the config is made, or a pipeline's own)
    catalog: Catalog = field(default_factory=default_catalog)

    def __post_init__(self) -> None:
        check_settings(self)
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
        aliases = self.sources or tuple(self.catalog.aliases())
        first, last = self.year_range
        out = []
        for alias in aliases:
            source = self.catalog.get_source(alias)
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
            f.name: str(getattr(self, f.name)) for f in fields(self) if f.name not in _NOT_HASHED
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
    scan_tasks: int = 0
    partitions: int = 0
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
                text += f" (resumed: {self.resumed_shards:,} partitions were already done)"
        return text

    def estimate_lines(self) -> list[str]:
        """The dry-run table: requests, megapixels, disk and time per source."""
        lines = [f"{'source':<8}{'requests':>12}{'megapixels':>14}{'disk':>12}{'time':>12}"]
        total = {"requests": 0.0, "megapixels": 0.0, "bytes": 0.0, "seconds": 0.0}
        for alias, v in self.by_source.items():
            lines.append(
                f"{alias:<8}{int(v['requests']):>12,}{v['megapixels']:>14,.1f}"
                f"{_bytes(v['bytes']):>12}{_duration(v['seconds']):>12}"
            )
            for k in total:
                total[k] += v[k]
        # Sources have separate quotas but share the project's: the time adds up.
        lines.append(
            f"{'total':<8}{int(total['requests']):>12,}{total['megapixels']:>14,.1f}"
            f"{_bytes(total['bytes']):>12}{_duration(total['seconds']):>12}"
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


def run_plan(config: PlanConfig) -> PlanResult:
    """Plan the requests for ``config.objects`` into ``config.out`` (see the module doc).

    Raises:
        InputError: the objects folder is missing, empty or not the extract's format.
        ConfigError: bad settings (unknown source, empty pixel range, ...).
    """
    t0 = time.perf_counter()
    sources = tuple(config.image_sources())
    settings_hash = config.settings_hash(_objects_fingerprint(config.objects))
    reused = None if config.dry_run else _finished(config.out, settings_hash)
    if reused is not None:
        reused.duration_s = time.perf_counter() - t0
        log.info("plan: %s is up to date (settings %s)", config.out, settings_hash)
        return reused
    units = read_units(config.objects)  # bad parts fail here, before anything is written
    if not config.dry_run and config.max_surrounding > 0:
        # numba's start-up (~0.5 s) overlaps the scan instead of delaying the first partition.
        threading.Thread(target=warm_up, name="plan-numba-warm-up", daemon=True).start()
    clock = _Clock()
    result = PlanResult(out=str(config.out), dry_run=config.dry_run, settings_hash=settings_hash)
    if config.dry_run:
        base = config.out.parent if config.out.parent.is_dir() else None
        work = Path(tempfile.mkdtemp(prefix=".plan-dry-run-", dir=base))
    else:
        _prepare(config.out, settings_hash)
        work = config.out / WORK_DIR
    try:
        with _runner_client(config) as client:
            _plan(config, sources, units, work, settings_hash, client, clock, result)
    finally:
        if config.dry_run:
            shutil.rmtree(work, ignore_errors=True)
    result.timings = clock.laps
    result.duration_s = time.perf_counter() - t0
    if config.dry_run:
        return result
    record = asdict(result)
    record.pop("reused")
    record.pop("dry_run")
    write_json_atomic(config.out / MARKER, record)
    (config.out / PENDING).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    log.info("plan: wrote %d requests to %s", result.requests, config.out)
    return result


def _plan(
    config: PlanConfig,
    sources: tuple[ImageSource, ...],
    units: list,
    work: Path,
    settings_hash: str,
    client: Any,
    clock: _Clock,
    result: PlanResult,
) -> None:
    """The two passes (see the module doc); fills ``result``."""
    grid = Grid(config.shard_deg, tuple(sorted({s.gsd for s in sources})))
    runner = RunnerConfig(
        cluster=ClusterConfig(workers=config.workers, scheduler=config.scheduler),
        local="threads",
        markers=work / "_shards",
        fingerprint=settings_hash,
        desc="plan: scan",
    )
    names = [f"scan-{i:05d}" for i in range(len(units))]
    scanned = _scan_pass(config, sources, grid, units, names, work, runner, client)
    clock.lap("scan")
    threads = 1 if client is not None else config.n_workers()  # on Dask: a thread per task
    shared = _partition_settings(config, sources, grid, names, work, threads)
    rects = plan_partitions(
        grid, [scan_path(work, n, "cells.parquet") for n in names], config.partition_objects
    )
    parts = [PartitionTask(f"p{k:05d}", k, rect, shared) for k, rect in enumerate(rects)]
    clock.lap("partitions")
    cut = None
    if config.max_requests is not None:
        cut = _limit_cut(parts, config.max_requests, runner, client)
        clock.lap("limit")
    parts = [replace(p, limit_cut=cut, mode="decide" if config.dry_run else "write") for p in parts]
    done: list[PartitionStats] = run_shards(
        run_partition, parts, replace(
            runner, markers=None if config.dry_run else config.out / "_shards",
            desc="plan: partitions",
        ), client=client, priority=[r[2] * r[3] for r in rects], record=PartitionStats,
    )  # fmt: skip
    clock.lap("partitions" if config.dry_run else "surround+write")
    result.partitions, result.scan_tasks = len(parts), len(units)
    _tally(result, sources, scanned, done, clock)


def _scan_pass(
    config: PlanConfig,
    sources: tuple[ImageSource, ...],
    grid: Grid,
    units: list,
    names: list[str],
    work: Path,
    runner: RunnerConfig,
    client: Any,
) -> list[ScanStats]:
    """Pass 1: one scan task per unit of the objects (marked, so a rerun skips it)."""
    point_px = min(max(config.point_px, config.min_px), config.max_px)
    scan = ScanSettings(
        work=str(work), grid=grid, sources=sources, px=(config.min_px, point_px, config.margin),
        max_px=config.max_px, tag_filter=config.tag_filter, threads=1,
    )  # fmt: skip
    tasks = [ScanTask(name, unit, scan) for name, unit in zip(names, units, strict=True)]
    scanned: list[ScanStats] = run_shards(run_scan, tasks, runner, client=client, record=ScanStats)
    return scanned


def _partition_settings(
    config: PlanConfig,
    sources: tuple[ImageSource, ...],
    grid: Grid,
    names: list[str],
    work: Path,
    threads: int,
) -> PartitionSettings:
    """What pass 2's tasks share, with the global counts of pass 1 written to ``work``: the
    common tags' counts (with ``per_tag_cap``) and the keys of the relation areas."""
    tag_counts = None
    if config.per_tag_cap is not None:
        counts = sum_counts([scan_path(work, n, "tags.parquet") for n in names], "tag", "count")
        common = counts.filter(pc.greater(counts["count"], config.per_tag_cap))
        tag_counts = work / "tag_counts.parquet"
        write_parquet_atomic(common.sort_by("tag"), tag_counts)
    give_back_memory()  # what the scan tasks freed, before the partitions' peak
    relation_keys = work / "relation_keys.npy"
    keys = [np.load(scan_path(work, n, "relations.npy")) for n in names]
    with atomic_path(relation_keys) as tmp, open(tmp, "wb") as f:
        np.save(f, distinct(np.concatenate(keys)) if keys else np.zeros(0, np.int64))
    del keys
    source_years = tuple(
        tuple(sorted(s.years_within(*config.year_range), reverse=True)) for s in sources
    )
    return PartitionSettings(
        out=str(config.out), grid=grid, scans=tuple(str(scan_path(work, n)) for n in names),
        sources=sources, source_years=source_years, seed=config.seed, shift=config.shift,
        per_tag_cap=config.per_tag_cap, tag_counts=None if tag_counts is None else str(tag_counts),
        relation_keys=str(relation_keys),
        max_surrounding=config.max_surrounding, rows_per_part=config.rows_per_part,
        threads=threads,
    )  # fmt: skip


def _tally(
    result: PlanResult,
    sources: tuple[ImageSource, ...],
    scanned: list[ScanStats],
    done: list[PartitionStats],
    clock: _Clock,
) -> None:
    """The passes' counts into ``result``: objects, requests and skips, per source with the
    fetch's cost (pixels, disk, time at the source's quota), CPU time per phase."""
    skipped: Counter[str] = Counter()
    for scan in scanned:
        skipped.update({**scan.dropped, **scan.skipped})
    by_source: dict[str, dict[str, float]] = {}
    for part in done:
        skipped.update(part.skipped)
        for alias, v in part.by_source.items():
            mine = by_source.setdefault(alias, {"requests": 0, "megapixels": 0.0})
            mine["requests"] += v["requests"]
            mine["megapixels"] += v["megapixels"]
    result.objects = sum(r.objects + sum(r.dropped.values()) for r in scanned)
    result.requests = sum(r.requests for r in done)
    result.surrounding = sum(r.surrounding for r in done)
    result.resumed_shards = sum(r.already_done for r in done)
    result.skipped = {k: v for k, v in sorted(skipped.items()) if v}
    rank = {s.alias: k for k, s in enumerate(sources)}
    rate = {s.alias: s.quota.rate() for s in sources}
    result.by_source = {
        alias: {
            **v,
            "bytes": v["megapixels"] * 1e6 * JPEG_BYTES_PER_PIXEL,
            "seconds": v["requests"] / rate[alias],
        }
        for alias, v in sorted(by_source.items(), key=lambda kv: rank[kv[0]])
    }
    for phase in ("frame", "surround", "write"):
        cpu = sum(getattr(r, f"cpu_{phase}") for r in done)
        clock.laps[f"partitions_cpu_{phase}"] = round(cpu, 4)
    clock.laps["scan_cpu"] = round(sum(r.cpu for r in scanned), 4)


def _limit_cut(
    parts: list[PartitionTask], most: int, runner: RunnerConfig, client: Any
) -> float | None:
    """The number below which exactly ``most`` requests rank (None: all fit), found in two
    rounds over the partitions: a histogram of the ranking numbers, then the values in the bin
    where the cut falls."""
    total = np.zeros(LIMIT_BINS, dtype=np.int64)

    def add(_: int, r: LimitNumbers) -> None:
        assert r.bins is not None and r.counts is not None
        np.add.at(total, r.bins, r.counts)

    quiet = replace(runner, markers=None, desc="plan: max-requests")
    run_shards(partition_limit_numbers, [replace(p, mode="histogram") for p in parts], quiet,
               client=client, on_result=add)  # fmt: skip
    if total.sum() <= most:
        return None
    cumulative = np.cumsum(total)
    b = int(np.searchsorted(cumulative, most))  # the bin holding the most-th number
    before = int(cumulative[b - 1]) if b else 0
    values: list[LimitNumbers] = run_shards(
        partition_limit_numbers,
        [replace(p, mode="values", limit_bin=b) for p in parts],
        quiet,
        client=client,
    )
    in_bin = np.sort(np.concatenate([r.values for r in values]))
    return float(np.nextafter(in_bin[most - before - 1], np.inf))


@contextlib.contextmanager
def _runner_client(config: PlanConfig) -> Iterator[Any]:
    """One Dask client for the whole plan when a scheduler is given, else None."""
    if config.scheduler is None:
        yield None
        return
    with dask_client(ClusterConfig(scheduler=config.scheduler)) as client:
        yield client


def _finished(out: Path, settings_hash: str) -> PlanResult | None:
    """The result a finished plan of the same settings recorded in ``out``, or None."""
    try:
        stored = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if stored.get("settings_hash") != settings_hash:
        return None
    result = PlanResult(**{k: v for k, v in stored.items() if k in _RESULT_FIELDS})
    result.reused, result.dry_run = True, False
    return result


_RESULT_FIELDS = {f.name for f in fields(PlanResult)}


class _Clock:
    """Seconds spent per phase: wall clock, and the process's CPU time under ``cpu_<phase>``
    (steadier on a shared machine)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()
        self._last_cpu = time.process_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = round(now - self._last, 4)
        self.laps[f"cpu_{name}"] = round(cpu - self._last_cpu, 4)
        self._last, self._last_cpu = now, cpu


def _prepare(out: Path, settings_hash: str) -> bool:
    """Make ``out`` ready for the passes; True when it holds an unfinished run of the same
    settings (its finished tasks are kept), else every earlier plan file is removed."""
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
    clear_markers(out / "_shards")
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    write_json_atomic(pending, {"settings_hash": settings_hash})
    return False
