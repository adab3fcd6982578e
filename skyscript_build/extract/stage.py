"""Config, result and orchestration of the extract stage.

Inputs: one or more ``.osm.pbf`` files (folders and glob patterns name several). Each input is
cut into tasks by ranges of its blobs, run in three passes through the shard runner
(``runner.run_shards``: local processes, or Dask tasks on a scheduler):

1. node tasks (``_nodes``): points, each task's node locations as a store on disk, the blobs
   holding ways, and the relations to assemble with their member ways;
2. way tasks (``_waytask``): lines, areas from closed ways, member ways with their locations;
3. relation tasks (``_areas.relation_task``), by relation id range: areas from relations.

One input writes its parts straight into ``out``; several are extracted into runs
(``out/_runs/``) that a merge (``_merge``) joins into ``out``, keeping each object once. Parts
read in name order hold points by id, lines by id, areas from ways by id, then areas from
relations by id, whatever the number of tasks (only where parts begin and end changes).

A finished task is marked by the runner (``out/_markers``); ``_extract.json``, written last,
marks the whole extract finished with the inputs' sizes and mtimes and a hash of the settings.
A rerun with the same inputs and settings does nothing; a rerun after a crash runs only the
tasks not marked. Bookkeeping files start with ``_`` so that ``geopandas.read_parquet(DIR)``
reads only parts.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tag_filters import get_tag_filter_path, load_tag_filter

from .._memory import give_back_memory
from ..cluster import ClusterConfig
from ..errors import InputError
from ..files import remove_temp_files, write_json_atomic
from ..runner import RunnerConfig, finished_result, marker_path, run_shards
from ..settings import check_settings, scheduler_setting, setting, tag_filter_setting
from ._areas import RelationTask, relation_task
from ._merge import MergeTask, merge_task, plan_merges
from ._nodes import NodeTask, node_task
from ._parquet import OSM_CREDIT, write_empty_part
from ._pbf import Blobs, check_pbf, file_fingerprint, sha256_file
from ._records import MergeStats, NodeStats, RelationStats, TaskStats, WayStats
from ._waytask import WayTask, way_task

__all__ = ["ExtractConfig", "ExtractResult", "run_extract", "resolve_inputs"]

log = logging.getLogger(__name__)

#: Bumped when the output of the same input and settings changes.
FORMAT_VERSION = 2
MARKER = "_extract.json"
MARKERS = "_markers"
RUN_STATE = "_run.json"
RUNS = "_runs"
_KIND_NAMES = {"n": "points", "w": "lines", "a": "areas"}
#: A way task reads this many times fewer blobs than a node task: a way costs more.
WAY_COST = 4
#: A relation task's share per MiB of ``task_mb``: this many relations and member ways (its
#: memory then stays below a way task's).
RELATION_WORK_PER_MB = 2_500
#: Rows a merge task reads (several inputs).
MERGE_ROWS = 250_000

_NO_INPUT = "needs at least one input (.osm.pbf file, folder or glob)"


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one extract, checked on creation (each field's help is its declaration).

    ``input`` takes one entry or several; several inputs (regional extracts) make one set of
    objects, each object once. With ``scheduler`` the inputs and ``out`` must be on a file
    system the workers share.
    """

    input: str | Path | Sequence[str | Path] = setting(
        help="OSM PBF file(s) (.osm.pbf), folders of them, or quoted glob patterns "
        "('regions/*.osm.pbf'); several inputs (regional extracts that overlap at their "
        "borders) make one set of objects, each object once",
        cli="INPUT",
        pipeline="input",
        unique=True,
        check=lambda entries: None if entries else _NO_INPUT,
    )
    out: Path = setting(help="output folder (objects/ of a build)")
    tag_filter: str = tag_filter_setting()
    workers: int = setting(
        0, help="worker processes, 0 = one per core, 1 = in this process", minimum=0
    )
    task_mb: float = setting(
        16.0,
        help="compressed input per node or way task in MiB: each process's memory grows with it",
        above=0,
    )
    work_dir: Path | None = setting(
        None,
        help="folder for the node locations and other files the tasks share, removed at the "
        "end; on a cluster one every worker sees (default: OUT/_work)",
    )
    rows_per_part: int = setting(1_000_000, help="most rows per part", minimum=1)
    batch_rows: int = setting(
        10_000, help="rows converted to Arrow at a time (bounds memory)", cli=None, minimum=1
    )
    force: bool = setting(False, help="extract again even if OUT holds a finished extract")
    scheduler: str | None = scheduler_setting(
        "a Dask scheduler to run the tasks on (default: here, or local processes)"
    )

    def __post_init__(self) -> None:
        check_settings(self)
        get_tag_filter_path(self.tag_filter)  # raises ConfigError for an unknown name

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The input entries (files, folders, glob patterns) as given."""
        return self.input  # type: ignore[return-value]  # a tuple since __post_init__


@dataclass
class ExtractResult:
    """What an extract did (or found already done)."""

    out: Path
    objects: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    duplicates: int = 0
    inputs: int = 1
    tasks: int = 0
    parts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False

    def summary(self) -> str:
        """One line for the end of the run."""
        kinds = ", ".join(f"{v} {k}" for k, v in self.by_type.items())
        dropped = sum(self.dropped.values())
        why = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v)
        head = "extract: already done, " if self.skipped else "extract: "
        inputs = f"{self.inputs} inputs" if self.inputs > 1 else "1 input"
        tasks = f"{self.tasks} task{'s' if self.tasks != 1 else ''}"
        parts = f"{len(self.parts)} part{'s' if len(self.parts) != 1 else ''}"
        dups = f", {self.duplicates} copies across inputs kept once" if self.inputs > 1 else ""
        return (
            f"{head}{self.objects} objects ({kinds}) from {inputs} in {tasks}, {parts} under "
            f"{self.out}; dropped {dropped}"
            f"{f' ({why})' if why else ''}, repaired {self.repaired}{dups}; {self.seconds:.1f} s"
        )


def resolve_inputs(entries: Sequence[Path]) -> list[Path]:
    """Files named by paths, folders (their ``*.osm.pbf``) and glob patterns, absolute, sorted
    by path, each once. Raises ``InputError`` for an entry that names no file."""
    found: dict[str, Path] = {}
    for entry in entries:
        text = str(entry)
        if entry.is_dir():
            files = sorted(entry.glob("*.osm.pbf"))
            if not files:
                raise InputError(entry, "no .osm.pbf file in this folder")
        elif glob.has_magic(text) and not entry.exists():
            files = [Path(p) for p in sorted(glob.glob(text))]
            if not files:
                raise InputError(entry, "no file matches this pattern")
        else:
            files = [entry]
        for f in files:
            found.setdefault(str(f.absolute()), f.absolute())
    return [found[k] for k in sorted(found)]


def _fingerprint(config: ExtractConfig, inputs: list[Path]) -> str:
    settings = {
        "format": FORMAT_VERSION,
        "inputs": [file_fingerprint(p) for p in inputs],
        "tag_filter_sha256": sha256_file(get_tag_filter_path(config.tag_filter)),
        "rows_per_part": config.rows_per_part,
        "batch_rows": config.batch_rows,
        "task_mb": config.task_mb,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class _Input:
    """One input and where its tasks write."""

    path: Path
    key: str
    blobs: Blobs
    parts: Path
    work: Path


def _chunks(blobs: list[tuple[int, int]], budget: float) -> list[tuple[tuple[int, int], ...]]:
    """Consecutive blobs in groups of about ``budget`` bytes."""
    groups: list[tuple[tuple[int, int], ...]] = []
    current: list[tuple[int, int]] = []
    size = 0
    for blob in blobs:
        current.append(blob)
        size += blob[1]
        if size >= budget:
            groups.append(tuple(current))
            current, size = [], 0
    if current:
        groups.append(tuple(current))
    return groups


def _node_tasks(config: ExtractConfig, inp: _Input) -> list[NodeTask]:
    blobs = list(zip(inp.blobs.offsets.tolist(), inp.blobs.sizes.tolist(), strict=True))
    return [
        NodeTask(
            f"{inp.key}-nodes-{i:05d}",
            str(inp.path),
            i,
            chunk,
            str(inp.parts),
            str(inp.work),
            config.tag_filter,
            config.rows_per_part,
            config.batch_rows,
        )
        for i, chunk in enumerate(_chunks(blobs, config.task_mb * 2**20))
    ]


def _way_tasks(config: ExtractConfig, inp: _Input, nodes: list[NodeStats]) -> list[WayTask]:
    blobs = [(b[0], b[1]) for r in nodes for b in r.way_blobs]
    stores = tuple(r.store for r in nodes if r.store)
    members = tuple(r.members for r in nodes if r.members)
    return [
        WayTask(
            f"{inp.key}-ways-{i:05d}",
            str(inp.path),
            i,
            chunk,
            stores,
            members,
            str(inp.parts),
            str(inp.work),
            config.tag_filter,
            config.rows_per_part,
            config.batch_rows,
        )
        for i, chunk in enumerate(_chunks(blobs, config.task_mb * 2**20 / WAY_COST))
    ]


def _relation_tasks(
    config: ExtractConfig, inp: _Input, nodes: list[NodeStats], ways: list[WayStats]
) -> list[RelationTask]:
    """Relation tasks of about ``RELATION_WORK_PER_MB * task_mb`` relations and member ways
    each, cut by relation id."""
    hist = sorted((last, work) for r in nodes for last, work in r.hist)
    if not hist:
        return []
    total = sum(w for _, w in hist)
    share = total / math.ceil(total / (RELATION_WORK_PER_MB * config.task_mb))
    cuts = [-(2**63)]
    work = 0
    for last, w in hist[:-1]:
        work += w
        if work >= share * len(cuts):
            cuts.append(last + 1)
    cuts.append(2**63 - 1)
    lists = [r.relations for r in nodes if r.relations]
    blobs = [b for r in nodes for b in r.relation_blobs]
    sides = tuple(r.side for r in ways if r.side)
    tasks = []
    for i, (low, high) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        tasks.append(
            RelationTask(
                f"{inp.key}-relations-{i:05d}",
                str(inp.path),
                i,
                low,
                high,
                tuple(x for x in lists if x["min"] < high and x["max"] >= low),
                tuple((b[0], b[1]) for b in blobs if b[2] < high and b[3] >= low),
                sides,
                str(inp.parts),
                config.tag_filter,
                config.rows_per_part,
            )
        )
    return tasks


def _clear(out: Path, work: Path) -> None:
    """Remove every part and bookkeeping file of an earlier extract in ``out``."""
    for path in out.glob("part-*.parquet"):
        path.unlink()
    for name in (MARKER,):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for folder in (out / MARKERS, out / RUNS, out / "_stats", work):
        shutil.rmtree(folder, ignore_errors=True)


#: Each kind of task: its function and the record it returns.
_TASKS: dict[type, tuple[Callable[[Any], TaskStats], type[TaskStats]]] = {
    NodeTask: (node_task, NodeStats),
    WayTask: (way_task, WayStats),
    RelationTask: (relation_task, RelationStats),
    MergeTask: (merge_task, MergeStats),
}


def run_task(task: NodeTask | WayTask | RelationTask | MergeTask) -> TaskStats:
    """Run any extract task and time it (module level: what a worker runs)."""
    start, cpu = time.monotonic(), time.process_time()
    result = _TASKS[type(task)][0](task)
    give_back_memory()  # a worker runs many tasks: the last one's peak should not stay
    result.seconds = round(time.monotonic() - start, 3)
    result.cpu_seconds = round(time.process_time() - cpu, 3)
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    result.pid = os.getpid()
    return result


def _forget_lost(tasks: list[Any], runner: RunnerConfig) -> None:
    """Unmark the finished tasks whose files are gone (a work folder on a disk that was
    wiped, parts deleted by hand), so that they run again."""
    assert runner.markers is not None
    for task in tasks:
        done = finished_result(runner.markers, task.name, runner.fingerprint)
        if done is None:
            continue
        files = _TASKS[type(task)][1].from_json(done).files(Path(task.out_dir))
        if not all(f.exists() for f in files):
            log.info("extract: %s ran before but its files are gone: running it again", task.name)
            marker_path(runner.markers, task.name).unlink(missing_ok=True)


def _inputs(paths: list[Path], blobs: list[Blobs], out: Path, work: Path) -> list[_Input]:
    """Each input with its key and folders: one input writes its parts into ``out``, several
    into runs (``out/_runs/iNNN``) merged at the end."""
    several = len(paths) > 1
    return [
        _Input(p, f"i{i:03d}", b, out / RUNS / f"i{i:03d}" if several else out, work / f"i{i:03d}")
        for i, (p, b) in enumerate(zip(paths, blobs, strict=True))
    ]


class _Failed(Exception):
    """A task could not read its input."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


def run_extract(config: ExtractConfig) -> ExtractResult:
    """Extract the groundable objects of ``config.input`` into parts under ``config.out``.

    Raises:
        InputError: an input is missing, not an OSM PBF, truncated or unreadable; no parts
            are left behind.
    """
    start = time.monotonic()
    paths = resolve_inputs(config.inputs)
    blobs = [check_pbf(p) for p in paths]
    out = config.out.absolute()  # tasks may run on workers started elsewhere
    fingerprint = _fingerprint(config, paths)
    done = None if config.force else _read_json(out / MARKER)
    if done is not None and done.get("fingerprint") == fingerprint:
        log.info("extract: %s is up to date", out)
        result = _result_from(done, time.monotonic() - start)
        result.skipped = True
        return result
    load_tag_filter(config.tag_filter)  # a bad table fails here, before any worker starts
    created = not out.exists()
    work = out / "_work"
    if config.work_dir is not None:
        work = config.work_dir.absolute() / f"skyscript-extract-{fingerprint}"
    state = _read_json(out / MARKERS / RUN_STATE)
    if config.force or state is None or state.get("fingerprint") != fingerprint:
        _clear(out, work)
        write_json_atomic(out / MARKERS / RUN_STATE, {"fingerprint": fingerprint})
    remove_temp_files(out)
    inputs = _inputs(paths, blobs, out, work)
    runner = RunnerConfig(
        cluster=ClusterConfig(workers=config.workers, scheduler=config.scheduler),
        local="processes",
        markers=out / MARKERS,
        fingerprint=fingerprint,
    )
    log.info(
        "extract: %s -> %s (%s)",
        ", ".join(str(p) for p in paths),
        out,
        f"on Dask {config.scheduler}"
        if config.scheduler
        else f"{runner.cluster.n_workers()} worker process(es)",
    )
    try:
        results = _run_all(config, inputs, runner, out)
    except _Failed as e:
        _clear(out, work)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise InputError(e.path, f"cannot be read as OSM PBF: {e.message}") from None
    record = _summarise(config, paths, results, out)
    record["fingerprint"] = fingerprint
    if not record["parts"]:
        record["parts"] = [write_empty_part(out)]
    write_json_atomic(out / MARKER, record)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out / RUNS, ignore_errors=True)
    return _result_from(record, time.monotonic() - start)


def _run_all(
    config: ExtractConfig, inputs: list[_Input], runner: RunnerConfig, out: Path
) -> dict[str, list[Any]]:
    """The three passes over every input (and the merge of several); every task's result."""

    def run(per_input: dict[str, list[Any]], desc: str, record: type[TaskStats]) -> dict[str, list]:
        tasks = [t for inp in inputs for t in per_input[inp.key]]
        owners = [inp for inp in inputs for _ in per_input[inp.key]]
        _forget_lost(tasks, runner)
        step = replace(runner, desc=f"extract {desc}")
        results: list[TaskStats] = run_shards(run_task, tasks, step, record=record)
        by_input: dict[str, list[Any]] = {inp.key: [] for inp in inputs}
        for inp, r in zip(owners, results, strict=True):
            if r.error is not None:
                raise _Failed(inp.path, r.error)
            by_input[inp.key].append(r)
        return by_input

    nodes = run({i.key: _node_tasks(config, i) for i in inputs}, "nodes", NodeStats)
    ways = run({i.key: _way_tasks(config, i, nodes[i.key]) for i in inputs}, "ways", WayStats)
    relations = run(
        {i.key: _relation_tasks(config, i, nodes[i.key], ways[i.key]) for i in inputs},
        "relations",
        RelationStats,
    )
    results = {
        name: [r for inp in inputs for r in phase[inp.key]]
        for name, phase in (("nodes", nodes), ("ways", ways), ("relations", relations))
    }
    results["merge"] = []
    if len(inputs) > 1:
        merges = plan_merges([i.parts for i in inputs], out, MERGE_ROWS, config.rows_per_part)
        _forget_lost(merges, runner)
        step = replace(runner, desc="extract merge")
        results["merge"] = run_shards(run_task, merges, step, record=MergeStats)
    return results


def _summarise(
    config: ExtractConfig, paths: list[Path], results: dict[str, list[Any]], out: Path
) -> dict[str, Any]:
    dropped: Counter = Counter()
    rows: Counter = Counter()
    parts: list[str] = []
    for phase in ("nodes", "ways", "relations"):
        for r in results[phase]:
            dropped.update(r.dropped)
            rows.update(r.rows)
            parts += r.parts
    duplicates = 0
    if results["merge"]:
        parts = [p for r in results["merge"] for p in r.parts]
        duplicates = sum(r.duplicates for r in results["merge"])
        rows = Counter()
        for r in results["merge"]:
            rows[r.kind] += r.rows
    repaired = dropped.pop("repaired_geometry", 0)
    return {
        "inputs": [str(p) for p in paths],
        "tag_filter": str(config.tag_filter),
        "objects": sum(rows.values()),
        "by_type": {name: rows.get(k, 0) for k, name in _KIND_NAMES.items()},
        "dropped": {k: v for k, v in sorted(dropped.items()) if v},
        "repaired": repaired,
        "duplicates": duplicates,
        "tasks": sum(len(v) for v in results.values()),
        "parts": sorted(parts),
        "copyright": OSM_CREDIT,
        "config": {k: str(v) for k, v in asdict(config).items()},
    }


def _result_from(record: dict[str, Any], seconds: float) -> ExtractResult:
    return ExtractResult(
        out=Path(record["config"]["out"]),
        objects=record["objects"],
        by_type={name: record["by_type"].get(name, 0) for name in _KIND_NAMES.values()},
        dropped=record["dropped"],
        repaired=record["repaired"],
        duplicates=record["duplicates"],
        inputs=len(record["inputs"]),
        tasks=record["tasks"],
        parts=record["parts"],
        seconds=seconds,
    )
