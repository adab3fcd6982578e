"""One way to run a stage's shards, and one way to mark a shard finished.

Every stage cuts its work into shards: picklable descriptions with a ``name`` that is unique
within the stage and stable across runs. ``run_shards`` applies a module-level function to
each and returns the results in shard order:

- inline (one after the other, in this process), on threads or on processes of this machine,
  or as Dask tasks on a scheduler (``ClusterConfig.scheduler``, or an open client), retried
  on a lost worker;
- with a ``markers`` folder, a shard that returns is marked finished by
  ``<markers>/<name>.done.json`` (its result and the run's ``fingerprint``), written where
  the shard ran, after its own outputs. A rerun with the same fingerprint reads the result
  back instead of running the shard again, so a killed run (or a killed worker) resumes the
  same way in every stage. A shard whose result says ``"incomplete": true`` is not marked,
  and runs again next time.

A shard's result is a typed record (a ``ShardRecord`` dataclass; ``run_shards(...,
record=Type)`` reads a marker back as one) or a JSON-able dict.

A shard function writes its outputs atomically (``files.atomic_path``), so that a shard
retried after a crash never meets half a file of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .cluster import ClusterConfig, dask_client
from .files import write_json_atomic
from .progress import progress_bar

__all__ = [
    "Local",
    "RunnerConfig",
    "ShardRecord",
    "run_shards",
    "finished_result",
    "marker_path",
    "clear_markers",
]

log = logging.getLogger(__name__)

#: How shards run without a scheduler: one after the other here, on threads (work that
#: releases the GIL: numpy, numba, arrow, I/O), or on worker processes (pure Python work).
Local = Literal["inline", "threads", "processes"]
MARKER_SUFFIX = ".done.json"


class ShardRecord:
    """Base of a shard's result as a typed record: a dataclass of JSON-able fields.

    The runner keeps ``to_json()`` in the shard's marker and, given ``record=`` the class,
    reads it back with ``from_json`` (keys the class does not know are left out, so a marker
    of an older version still reads). A field whose metadata says ``{"saved": False}`` is not
    kept (``already_done``, which the runner sets on a result read back from a marker).
    """

    def to_json(self) -> dict[str, Any]:
        """The saved fields, in declaration order."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.metadata.get("saved", True)
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Any:
        """The record of ``data`` (as ``to_json`` wrote it)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


def _saved(result: Any) -> dict[str, Any]:
    return result.to_json() if isinstance(result, ShardRecord) else result


@dataclass(frozen=True)
class RunnerConfig:
    """Where and how a stage's shards run.

    Attributes:
        cluster: workers (0: one per core) and an optional Dask scheduler address.
        local: without a scheduler, ``threads`` or ``processes`` (one per worker); with one
            worker, shards run inline.
        markers: folder of the finished shards' markers; None keeps no markers.
        fingerprint: settings hash of the run: a marker of another fingerprint is stale.
        desc: the progress bar's label.
        progress: show a bar of shards (off for a stage that shows its own, of items).
    """

    cluster: ClusterConfig = ClusterConfig()
    local: Local = "processes"
    markers: Path | None = None
    fingerprint: str = ""
    desc: str = "shards"
    progress: bool = True


def marker_path(markers: Path, name: str) -> Path:
    """The file that marks shard ``name`` finished."""
    return Path(markers) / f"{name}{MARKER_SUFFIX}"


def finished_result(markers: Path | None, name: str, fingerprint: str) -> dict[str, Any] | None:
    """The result a finished shard recorded, or None when it must run (again)."""
    if markers is None:
        return None
    try:
        record = json.loads(marker_path(markers, name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    result = record.get("result")
    return result if isinstance(result, dict) else None


def clear_markers(markers: Path) -> int:
    """Remove every shard marker of ``markers``; return how many."""
    count = 0
    for path in Path(markers).glob(f"*{MARKER_SUFFIX}"):
        path.unlink(missing_ok=True)
        count += 1
    return count


def run_and_mark(
    func: Callable[[Any], Any], shard: Any, markers: str | None, fingerprint: str
) -> Any:
    """Run one shard and mark it finished (module level: what a worker runs)."""
    result = func(shard)
    if markers is not None:
        saved = _saved(result)
        if not saved.get("incomplete"):
            record = {"fingerprint": fingerprint, "result": saved}
            write_json_atomic(marker_path(Path(markers), shard.name), record)
    return result


def run_shards(
    func: Callable[[Any], Any],
    shards: Sequence[Any],
    config: RunnerConfig,
    *,
    client: Any = None,
    priority: Sequence[float] | None = None,
    on_result: Callable[[int, Any], None] | None = None,
    record: type[ShardRecord] | None = None,
) -> list[Any]:
    """Run ``func`` on every shard not finished yet; the results of all, in shard order.

    Args:
        func: module-level function of one shard returning its result: a ``ShardRecord`` or
            a JSON-able dict (anything picklable when there are no markers).
        shards: shard descriptions, each with a ``name``.
        config: where they run and where their markers go.
        client: an open ``distributed.Client`` to use (else ``config.cluster`` decides).
        priority: per shard, higher starts first (the largest shards, say); default: in order.
        on_result: called with (shard index, result) as each shard finishes (in this process).
        record: the ``ShardRecord`` class of the results, to read finished shards' markers
            back as; None: markers are read back as dicts.
    """
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("shard names must be unique")
    results: list[Any] = [None] * len(shards)
    todo: list[int] = []
    for i, shard in enumerate(shards):
        done = finished_result(config.markers, shard.name, config.fingerprint)
        if done is not None:
            done = {**done, "already_done": True}
            results[i] = record.from_json(done) if record is not None else done
        else:
            todo.append(i)
    if len(todo) < len(shards):
        log.info(
            "%s: %d of %d shards already done", config.desc, len(shards) - len(todo), len(shards)
        )
    if priority is not None:
        todo.sort(key=lambda i: -priority[i])
    if todo:
        if config.markers is not None:
            Path(config.markers).mkdir(parents=True, exist_ok=True)
        run = _Run(func, shards, todo, results, config, on_result)
        if client is not None:
            run.on_client(client)
        elif config.cluster.scheduler:
            with dask_client(config.cluster) as own:
                run.on_client(own)
        else:
            run.here()
    return [r for r in results if r is not None]


class _Run:
    """The shards left to run: where they run, and each result put in its place as it comes
    (with the progress bar and the caller's ``on_result``)."""

    def __init__(
        self,
        func: Callable[[Any], Any],
        shards: Sequence[Any],
        todo: list[int],
        results: list[Any],
        config: RunnerConfig,
        on_result: Callable[[int, Any], None] | None,
    ) -> None:
        self.func, self.shards, self.todo, self.results = func, shards, todo, results
        self.config, self.on_result = config, on_result
        self.markers = None if config.markers is None else str(config.markers)
        shown = {} if config.progress else {"disable": True}
        self.bar = progress_bar(None, total=len(todo), desc=config.desc, unit="shard", **shown)

    def args(self, i: int) -> tuple[Any, ...]:
        """What ``run_and_mark`` gets for shard ``i``."""
        return self.func, self.shards[i], self.markers, self.config.fingerprint

    def done(self, i: int, result: Any) -> None:
        self.results[i] = result
        if self.on_result is not None:
            self.on_result(i, result)
        self.bar.update(1)

    def here(self) -> None:
        """Inline, or on a pool of this machine's threads or processes."""
        workers = min(self.config.cluster.n_workers(), len(self.todo))
        with self.bar:
            if workers <= 1 or self.config.local == "inline":
                for i in self.todo:
                    self.done(i, run_and_mark(*self.args(i)))
                return
            pool: Executor
            if self.config.local == "threads":
                pool = ThreadPoolExecutor(workers, thread_name_prefix=self.config.desc)
            else:
                pool = ProcessPoolExecutor(workers, mp_context=_process_context())
            with pool:
                futures = {pool.submit(run_and_mark, *self.args(i)): i for i in self.todo}
                for future in as_completed(futures):
                    try:
                        result = future.result()
                    except BrokenProcessPool as e:
                        raise RuntimeError(
                            f"{self.config.desc}: a worker process died ({e})"
                        ) from e
                    self.done(futures[future], result)

    def on_client(self, client: Any) -> None:
        """Every shard a Dask task (retried on a lost worker), in priority order."""
        from distributed import as_completed as dask_completed

        futures = {}
        for rank, i in enumerate(self.todo):
            name = f"{self.config.desc}-{self.shards[i].name}-{uuid.uuid4().hex[:12]}"
            future = client.submit(
                run_and_mark, *self.args(i), key=name, pure=False,
                retries=self.config.cluster.retries, priority=len(self.todo) - rank,
            )  # fmt: skip
            futures[future] = i
        with self.bar:
            for future in dask_completed(list(futures)):
                self.done(futures[future], future.result())


def _process_context() -> Any:
    """fork (workers start in milliseconds) unless threads run here (a Dask client, say),
    which fork would copy mid-lock: then forkserver."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and _only_main_thread():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _only_main_thread() -> bool:
    try:
        from tqdm._monitor import TMonitor
    except ImportError:  # pragma: no cover - tqdm moved it
        TMonitor = ()  # type: ignore[assignment,misc]  # noqa: N806
    main = threading.main_thread()
    return all(t is main or isinstance(t, TMonitor) for t in threading.enumerate()) and (
        os.name == "posix"
    )
