"""What each extract task returns: a typed record, kept in the task's marker by the runner.

A task that cannot read its input returns a record with ``error`` set (the run then stops with
one line naming the input). ``run_task`` adds the task's timings and its process's peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runner import ShardRecord

__all__ = ["TaskStats", "NodeStats", "WayStats", "RelationStats", "MergeStats"]


@dataclass
class TaskStats(ShardRecord):
    """What every extract task returns: its parts, its drops by reason, and timings."""

    parts: list[str] = field(default_factory=list)  # file names in the task's folder
    dropped: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mib: int = 0
    pid: int = 0
    already_done: bool = field(default=False, metadata={"saved": False})

    def files(self, folder: Path) -> list[Path]:
        """Every file the task left for later steps (its parts in ``folder``, ...)."""
        return [folder / p for p in self.parts]


@dataclass
class NodeStats(TaskStats):
    """A node task: its points, the node store, and what the later passes need."""

    rows: dict[str, int] = field(default_factory=dict)  # by osm_type: n
    store: dict[str, Any] | None = None  # the node store's files (``_nodestore``)
    way_blobs: list[list[int]] = field(default_factory=list)  # [offset, size]
    relation_blobs: list[list[int]] = field(default_factory=list)  # + first and last id
    relations: dict[str, Any] | None = None  # the candidate relations' file, id range
    members: dict[str, Any] | None = None  # their member ways' ids file, id range
    hist: list[list[int]] = field(default_factory=list)  # [last id, work] pieces

    def files(self, folder: Path) -> list[Path]:
        out = super().files(folder)
        if self.store:
            out += [Path(self.store[f]) for f in ("xy", "ids") if self.store[f]]
        out += [Path(x["path"]) for x in (self.relations, self.members) if x]
        return out


@dataclass
class WayStats(TaskStats):
    """A way task: lines, areas from closed ways, member ways for the relation tasks."""

    rows: dict[str, int] = field(default_factory=dict)  # by osm_type: w, a
    side: dict[str, Any] | None = None  # the member ways with their locations

    def files(self, folder: Path) -> list[Path]:
        out = super().files(folder)
        if self.side:
            out += [Path(self.side[f]) for f in ("data", "index") if self.side[f]]
        return out


@dataclass
class RelationStats(TaskStats):
    """A relation task: areas from relations."""

    rows: dict[str, int] = field(default_factory=dict)  # by osm_type: a


@dataclass
class MergeStats(TaskStats):
    """A merge task (several inputs): one id range of one kind, each object once."""

    kind: str = ""  # osm_type: n, w or a
    rows: int = 0
    duplicates: int = 0
