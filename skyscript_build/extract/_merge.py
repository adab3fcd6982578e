"""Several inputs, one set of parts: a streaming merge that keeps each object once.

Every input is extracted on its own into sorted runs (``_runs/iNNN/part-K-*``: points, lines,
areas from ways, areas from relations, each by id). Regional extracts overlap at their borders
(``osmium extract`` puts an object that crosses a border, whole, in both), so the runs of one
kind are merged by id, and of the copies of an object the one with the longest geometry (WKB)
is kept, the first input (by path) on a tie: a way cut at a border by a simple extract, or a
relation complete in one region only, is kept whole where it is.

The merge is cut into tasks by id ranges chosen from the parts' row-group statistics, so each
task reads only the row groups overlapping its range.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ._parquet import PartWriter, remove_parts
from ._records import MergeStats

__all__ = ["MergeTask", "plan_merges", "merge_task", "KINDS"]

#: Part kinds, in the order of the output: points, lines, areas from ways, from relations.
KINDS = (0, 1, 2, 3)
_LOWEST, _HIGHEST = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class MergeTask:
    """Objects of part kind ``kind`` with ids in [low, high): picklable for a worker.

    ``sources``: (input rank, part path, row groups to read), the ranks in path order.
    """

    name: str
    kind: int
    index: int
    low: int
    high: int
    sources: tuple[tuple[int, str, tuple[int, ...]], ...]
    out_dir: str
    rows_per_part: int


def _row_groups(runs: list[Path], kind: int) -> list[tuple[int, int, int, str, int, int]]:
    """(min id, max id, rows, part, row group, input rank) of every row group of a kind."""
    found = []
    for rank, run in enumerate(runs):
        for part in sorted(run.glob(f"part-{kind}-*.parquet")):
            meta = pq.ParquetFile(part).metadata
            column = meta.schema.names.index("osm_id")
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                stats = group.column(column).statistics
                if group.num_rows == 0:
                    continue
                low, high = (stats.min, stats.max) if stats is not None else (_LOWEST, _HIGHEST)
                found.append((low, high, group.num_rows, str(part), g, rank))
    return found


def plan_merges(
    runs: list[Path], out: Path, rows_per_task: int, rows_per_part: int
) -> list[MergeTask]:
    """Merge tasks over the runs (one folder per input, in path order) of about
    ``rows_per_task`` rows each, in output order."""
    tasks: list[MergeTask] = []
    for kind in KINDS:
        groups = sorted(_row_groups(runs, kind))
        if not groups:
            continue
        cuts = [_LOWEST]
        rows = 0
        for low, _, n, *_ in groups:
            if rows >= rows_per_task and low > cuts[-1]:
                cuts.append(low)
                rows = 0
            rows += n
        cuts.append(_HIGHEST)
        by_task: list[dict[tuple[int, str], list[int]]] = [{} for _ in cuts[1:]]
        for g_low, g_high, _, part, g, rank in groups:
            first = bisect.bisect_right(cuts, g_low) - 1
            last = min(bisect.bisect_right(cuts, g_high) - 1, len(by_task) - 1)
            for i in range(first, last + 1):
                by_task[i].setdefault((rank, part), []).append(g)
        for i, sources in enumerate(by_task):
            tasks.append(
                MergeTask(
                    f"merge-{kind}-{i:05d}",
                    kind,
                    i,
                    cuts[i],
                    cuts[i + 1],
                    tuple((rank, part, tuple(gs)) for (rank, part), gs in sorted(sources.items())),
                    str(out),
                    rows_per_part,
                )
            )
    return tasks


def merge_task(task: MergeTask) -> MergeStats:
    """Merge the task's id range of every input, one row per id; write it (``part-K-*``)."""
    out = Path(task.out_dir)
    prefix = f"{task.kind}-{task.index:05d}"
    remove_parts(out, prefix)
    tables = []
    ranks = []
    for rank, part, groups in task.sources:
        table = pq.ParquetFile(part).read_row_groups(list(groups))
        ids = table["osm_id"]
        inside = pc.and_(pc.greater_equal(ids, task.low), pc.less(ids, task.high))
        table = table.filter(inside)
        tables.append(table)
        ranks.append(np.full(table.num_rows, rank, np.int64))
    writer = PartWriter(out, prefix, task.rows_per_part)
    total = sum(t.num_rows for t in tables)
    kept = 0
    if total:
        table = pa.concat_tables(tables)
        ids = table["osm_id"].to_numpy()
        size = pc.binary_length(table["geometry"]).to_numpy()
        order = np.lexsort((np.concatenate(ranks), -size, ids))
        first = np.ones(order.size, bool)
        first[1:] = ids[order][1:] != ids[order][:-1]
        table = table.take(pa.array(order[first]))
        writer.write(table)
        kept = table.num_rows
    kind = "n" if task.kind == 0 else "w" if task.kind == 1 else "a"
    return MergeStats(kind=kind, rows=kept, duplicates=total - kept, parts=writer.close())
