"""Config, result and orchestration of the extract stage.

Work is cut into two shards (areas; points + lines; see ``_shards``) that read the file
independently, so two processes share the work: a local process pool, or Dask tasks when a
scheduler is given. Each shard writes its parts atomically and then its stats
(``_stats/shard-NN.json``); ``_extract.json``, written last, marks the whole extract finished
and records the input's size and mtime and a hash of the settings. A rerun with the same input
and settings does nothing; a rerun after a crash redoes only the shards without stats.
Bookkeeping files start with ``_`` so that ``geopandas.read_parquet(DIR)`` reads only parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tag_filters import get_tag_filter_path, load_tag_filter

from ..cluster import ClusterConfig, map_shards
from ..errors import ConfigError, InputError
from ..files import remove_temp_files, write_json_atomic
from ..progress import progress_bar
from ._parquet import OSM_CREDIT, iter_parts
from ._pbf import check_pbf, file_fingerprint, sha256_file
from ._shards import PART_PREFIX, SHARD_KINDS, SHARDS, ShardSpec, run_shard

__all__ = ["ExtractConfig", "ExtractResult", "run_extract"]

log = logging.getLogger(__name__)

#: Bumped when the output of the same input and settings changes.
FORMAT_VERSION = 1
MARKER = "_extract.json"
STATS_DIR = "_stats"
_KIND_NAMES = {"n": "points", "w": "lines", "a": "areas"}
_INDEX_KINDS = ("auto", "flex_mem", "sparse_mem_array", "sparse_file_array", "dense_file_array")
#: Inputs up to this size keep node locations in memory ("auto").
IN_MEMORY_LIMIT = 256 * 2**20


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one extract.

    Attributes:
        input: the ``.osm.pbf`` file.
        out: the output folder (``objects/`` of a build).
        tag_filter: a shipped table name (``default``) or a CSV path (see tag_filters).
        workers: processes; 0 = one per shard up to the number of cores, 1 = in this process.
        location_index: osmium node-location index; ``auto`` keeps it in memory for files up
            to 256 MiB and in a file (``sparse_file_array``) beyond.
        index_dir: folder for a file-backed index (default: ``OUT/_tmp``).
        rows_per_part: the most rows in one parquet part.
        batch_rows: rows converted to Arrow at a time (bounds memory).
        force: extract again even when ``out`` holds a finished extract of the same input.
        scheduler: address of a Dask scheduler (``tcp://host:8786``): the shards run there as
            Dask tasks (the input and ``out`` must be on a file system the workers share);
            None runs them here or in a local process pool (``workers``).
    """

    input: Path
    out: Path
    tag_filter: str = "default"
    workers: int = 0
    location_index: str = "auto"
    index_dir: Path | None = None
    rows_per_part: int = 1_000_000
    batch_rows: int = 10_000
    force: bool = False
    scheduler: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "out", Path(self.out))
        if self.index_dir is not None:
            object.__setattr__(self, "index_dir", Path(self.index_dir))
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 (auto) or more, not {self.workers}")
        if self.location_index not in _INDEX_KINDS:
            raise ConfigError(
                f"--location-index must be one of {', '.join(_INDEX_KINDS)}, "
                f"not '{self.location_index}'"
            )
        if self.rows_per_part < 1 or self.batch_rows < 1:
            raise ConfigError("rows_per_part and batch_rows must be at least 1")
        get_tag_filter_path(self.tag_filter)  # raises ConfigError for an unknown name

    def n_workers(self) -> int:
        """Processes to use (at most one per shard)."""
        if self.workers > 0:
            return min(self.workers, len(SHARDS))
        return max(1, min(len(SHARDS), os.cpu_count() or 1))

    def resolved_index(self) -> str:
        """The location index kind ``auto`` stands for, given the input's size."""
        if self.location_index != "auto":
            return self.location_index
        size = self.input.stat().st_size
        return "flex_mem" if size <= IN_MEMORY_LIMIT else "sparse_file_array"


@dataclass
class ExtractResult:
    """What an extract did (or found already done)."""

    out: Path
    objects: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    parts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False

    def summary(self) -> str:
        """One line for the end of the run."""
        kinds = ", ".join(f"{v} {k}" for k, v in self.by_type.items())
        dropped = sum(self.dropped.values())
        why = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v)
        head = "extract: already done, " if self.skipped else "extract: "
        return (
            f"{head}{self.objects} objects ({kinds}) in {len(self.parts)} parts under "
            f"{self.out}; dropped {dropped}{f' ({why})' if why else ''}, "
            f"repaired {self.repaired}; {self.seconds:.1f} s"
        )


def _settings_hash(config: ExtractConfig) -> str:
    settings = {
        "format": FORMAT_VERSION,
        "tag_filter_sha256": sha256_file(get_tag_filter_path(config.tag_filter)),
        "rows_per_part": config.rows_per_part,
        "shards": SHARDS,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(config: ExtractConfig) -> dict[str, Any]:
    return {**file_fingerprint(config.input), "settings": _settings_hash(config)}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stats_path(out: Path, shard: int) -> Path:
    return out / STATS_DIR / f"shard-{shard:02d}.json"


def _remove_shard(out: Path, shard: int) -> None:
    for kind in SHARD_KINDS[SHARDS[shard]]:
        for part in iter_parts(out, PART_PREFIX[kind]):
            part.unlink()
    with contextlib.suppress(FileNotFoundError):
        _stats_path(out, shard).unlink()


def _result_from(out: Path, stats: list[dict[str, Any]], seconds: float) -> ExtractResult:
    dropped: Counter = Counter()
    counts: Counter = Counter()
    result = ExtractResult(out=out, seconds=seconds)
    for s in stats:
        dropped.update(s["dropped"])
        counts.update(s["counts"])
        for kind, rows in s["rows"].items():
            result.by_type[_KIND_NAMES[kind]] = rows
        result.parts.extend(s["parts"])
    result.repaired = dropped.pop("repaired_geometry", 0)
    # Closed ways the points + lines shard left to the areas shard but osmium could not assemble.
    broken = counts["expected_way_areas"] - counts["way_areas"] - dropped["broken_area"]
    if broken > 0:
        dropped["broken_area"] += broken
    result.dropped = {k: v for k, v in sorted(dropped.items()) if v}
    result.by_type = {k: result.by_type.get(k, 0) for k in _KIND_NAMES.values()}
    result.parts.sort()
    result.objects = sum(result.by_type.values())
    return result


def run_extract(config: ExtractConfig) -> ExtractResult:
    """Extract the groundable objects of ``config.input`` into parts under ``config.out``.

    Raises:
        InputError: the input is missing, not an OSM PBF, truncated or unreadable; no parts
            are left behind.
    """
    start = time.monotonic()
    check_pbf(config.input)
    out = config.out
    fingerprint = _fingerprint(config)
    marker = None if config.force else _read_json(out / MARKER)
    if marker is not None and marker.get("fingerprint") == fingerprint:
        log.info("extract: %s is up to date", out)
        finished = [_read_json(_stats_path(out, i)) for i in range(len(SHARDS))]
        if all(s is not None for s in finished):
            result = _result_from(out, [s for s in finished if s], time.monotonic() - start)
            result.skipped = True
            return result
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (out / MARKER).unlink()
    remove_temp_files(out)
    load_tag_filter(config.tag_filter)  # a bad table fails here, before any worker starts

    todo: list[ShardSpec] = []
    done: list[dict[str, Any]] = []
    index = config.resolved_index()
    index_dir = config.index_dir or out / "_tmp"
    for i in range(len(SHARDS)):
        stats = _read_json(_stats_path(out, i))
        if not config.force and stats is not None and stats.get("fingerprint") == fingerprint:
            done.append(stats)
            continue
        _remove_shard(out, i)
        todo.append(
            ShardSpec(
                shard=i,
                input=str(config.input),
                out_dir=str(out),
                tag_filter=str(config.tag_filter),
                rows_per_part=config.rows_per_part,
                batch_rows=config.batch_rows,
                location_index=index,
                index_dir=str(index_dir),
            )
        )
    log.info(
        "extract: %s -> %s (%d shards to do, %s, node index %s)",
        config.input,
        out,
        len(todo),
        f"on Dask {config.scheduler}" if config.scheduler else f"{config.n_workers()} workers",
        index,
    )
    if config.scheduler and todo:
        cluster = ClusterConfig(scheduler=config.scheduler)
        new_stats = map_shards(run_shard, todo, cluster, desc="extract")
    else:
        new_stats = _run_shards(todo, config.n_workers())
    errors = [s for s in new_stats if "error" in s]
    if errors:
        for i in range(len(SHARDS)):
            _remove_shard(out, i)
        shutil.rmtree(index_dir, ignore_errors=True)
        if created:
            shutil.rmtree(out / STATS_DIR, ignore_errors=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise InputError(config.input, f"cannot be read as OSM PBF: {errors[0]['error']}")
    for s in new_stats:
        s["fingerprint"] = fingerprint
        write_json_atomic(_stats_path(out, s["shard"]), s)
    shutil.rmtree(index_dir, ignore_errors=True)
    all_stats = sorted(done + new_stats, key=lambda s: s["shard"])
    result = _result_from(out, all_stats, time.monotonic() - start)
    write_json_atomic(
        out / MARKER,
        {
            "fingerprint": fingerprint,
            "input": str(config.input),
            "tag_filter": str(config.tag_filter),
            "objects": result.objects,
            "by_type": result.by_type,
            "dropped": result.dropped,
            "repaired": result.repaired,
            "parts": result.parts,
            "copyright": OSM_CREDIT,
            "config": {k: str(v) for k, v in asdict(config).items()},
        },
    )
    return result


def _run_shards(todo: list[ShardSpec], workers: int) -> list[dict[str, Any]]:
    """Run shards in this process (one worker) or in a pool of worker processes."""
    if not todo:
        return []
    bar = progress_bar(total=len(todo), desc="extract", unit="shard")
    results: list[dict[str, Any]] = []
    try:
        if workers <= 1 or len(todo) == 1:
            for spec in todo:
                results.append(run_shard(spec))
                bar.update()
            return results
        order = todo
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
            futures = [pool.submit(run_shard, spec) for spec in order]
            for future in as_completed(futures):
                try:
                    stats = future.result()
                except BrokenProcessPool as e:
                    raise RuntimeError(f"an extract worker died: {e}") from e
                results.append(stats)
                bar.update()
        return sorted(results, key=lambda s: s["shard"])
    finally:
        bar.close()
