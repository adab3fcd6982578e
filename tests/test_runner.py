"""The one shard runner: the same results inline, on threads and on processes; finished
shards are marked and not run again; a changed fingerprint or an incomplete shard runs again."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from skyscript_build.cluster import ClusterConfig
from skyscript_build.runner import RunnerConfig, ShardRecord, marker_path, run_shards


@dataclass(frozen=True)
class _Shard:
    name: str
    value: int
    log: str


def _square(shard: _Shard) -> dict:
    with open(shard.log, "a") as f:  # one line per run of the shard, from any process
        f.write(f"{shard.name}\n")
    return {"square": shard.value**2, "pid": os.getpid(), "incomplete": shard.value < 0}


def _shards(tmp_path: Path) -> list[_Shard]:
    log = str(tmp_path / "runs.log")
    return [_Shard(f"s{v:02d}", v, log) for v in (3, 1, 2, -4)]


def _runs(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs.log"
    return sorted(path.read_text().split()) if path.exists() else []


@pytest.mark.parametrize("local,workers", [("inline", 1), ("threads", 2), ("processes", 2)])
def test_results_in_shard_order_and_markers(tmp_path: Path, local: str, workers: int):
    config = RunnerConfig(
        cluster=ClusterConfig(workers=workers), local=local, markers=tmp_path / "m", fingerprint="a"
    )  # type: ignore[arg-type]
    shards = _shards(tmp_path)
    results = run_shards(_square, shards, config)
    assert [r["square"] for r in results] == [9, 1, 4, 16]
    assert _runs(tmp_path) == ["s-4", "s01", "s02", "s03"]
    assert marker_path(tmp_path / "m", "s03").exists()
    assert not marker_path(tmp_path / "m", "s-4").exists()  # incomplete: not marked

    again = run_shards(_square, shards, config, priority=[0, 0, 0, 1])
    assert [r["square"] for r in again] == [9, 1, 4, 16]
    assert [bool(r.get("already_done")) for r in again] == [True, True, True, False]
    assert _runs(tmp_path) == ["s-4", "s-4", "s01", "s02", "s03"]  # only the incomplete one

    changed = RunnerConfig(cluster=config.cluster, local=config.local, markers=config.markers)
    run_shards(_square, shards[:1], changed)  # another fingerprint: the marker is stale
    assert _runs(tmp_path).count("s03") == 2


def test_without_markers_everything_runs(tmp_path: Path):
    config = RunnerConfig(cluster=ClusterConfig(workers=1))
    run_shards(_square, _shards(tmp_path), config)
    run_shards(_square, _shards(tmp_path), config)
    assert len(_runs(tmp_path)) == 8


def test_duplicate_names_refused(tmp_path: Path):
    shard = _shards(tmp_path)[0]
    with pytest.raises(ValueError, match="unique"):
        run_shards(_square, [shard, shard], RunnerConfig())


@dataclass
class _Squared(ShardRecord):
    square: int
    pid: int
    already_done: bool = field(default=False, metadata={"saved": False})


def _square_record(shard: _Shard) -> _Squared:
    return _Squared(**{k: v for k, v in _square(shard).items() if k != "incomplete"})


def test_typed_results_are_marked_and_read_back_as_records(tmp_path: Path):
    config = RunnerConfig(local="inline", markers=tmp_path / "m", fingerprint="a")
    shards = _shards(tmp_path)[:3]
    first = run_shards(_square_record, shards, config, record=_Squared)
    assert [type(r) for r in first] == [_Squared] * 3 and not any(r.already_done for r in first)
    saved = json.loads(marker_path(tmp_path / "m", "s03").read_text())["result"]
    assert saved == {"square": 9, "pid": os.getpid()}  # already_done is not saved
    again = run_shards(_square_record, shards, config, record=_Squared)
    assert [(r.square, r.already_done) for r in again] == [(9, True), (1, True), (4, True)]
    assert _runs(tmp_path) == ["s01", "s02", "s03"]  # each ran once
