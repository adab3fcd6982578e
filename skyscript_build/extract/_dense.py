"""Tagged nodes -> point tables straight from the PBF's DenseNodes groups, in bulk with numpy;
and the judging of tags that the bulk readers of nodes, ways and relations share.

Handing each node to Python through pyosmium costs several microseconds; with millions of
candidate nodes that was most of an extract's time. Here a group's nodes come decoded in bulk
(``_pbf.dense_nodes``), the groundable tags are judged once per distinct (key, value) string
pair of the block, and a block's points become Arrow columns without a Python object per node.
The rows, their order and the coordinates are the same as through osmium (coordinates are
osmium's 1e-7 degree integers divided by 1e7).

A tag string stored as string 0, or odd ``keys_vals``, raise ``Unsupported`` before any row is
returned for the blob; the caller then reads its nodes through pyosmium.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tag_filters import TagFilter

from ._pbf import DenseNodes, StringTable, Unsupported, packed_varints

__all__ = ["PointBlock", "TagJudge", "dense_points", "judge_tags", "by_owner"]

#: osmium's valid locations, in its 1e-7 degree integers.
LIMIT_X, LIMIT_Y = 1_800_000_000, 900_000_000


class PointBlock:
    """The points of one block as columns (tags in the node's own order within a row)."""

    def __init__(
        self,
        ids: np.ndarray,
        offsets: np.ndarray,
        keys: pa.Array,
        values: pa.Array,
        max_gsd: np.ndarray,
        lons: np.ndarray,
        lats: np.ndarray,
        invalid: int,
    ) -> None:
        self.ids, self.offsets, self.keys, self.values = ids, offsets, keys, values
        self.max_gsd, self.lons, self.lats, self.invalid = max_gsd, lons, lats, invalid

    def __len__(self) -> int:
        return len(self.ids)


class TagJudge:
    """(key, value) -> (groundable, max_gsd), cached over the whole file."""

    def __init__(self, tf: TagFilter) -> None:
        self.rule = tf.rule
        self.candidates = tf.candidate_keys()
        self.cache: dict[tuple[str, str], tuple[bool, float]] = {}

    def is_candidate(self, key: str) -> bool:
        return self.candidates is None or key in self.candidates

    def __call__(self, key: str, value: str) -> tuple[bool, float]:
        hit = self.cache.get((key, value))
        if hit is None:
            r = self.rule(key, value)
            ok = r is not None and r.groundable
            gsd = r.max_gsd if ok and r is not None and r.max_gsd is not None else -1.0
            hit = self.cache[(key, value)] = (ok, float(gsd))
        return hit


def dense_points(
    block: bytes, nodes: DenseNodes, table: StringTable, judge: TagJudge
) -> PointBlock | None:
    """The points (nodes with a groundable tag) of one DenseNodes group."""
    if nodes.keys_vals is None:
        return None
    kv = packed_varints(block, nodes.keys_vals)
    if kv.size == 0:
        return None
    kv = kv.astype(np.int64)
    is_end = kv == 0
    if int(is_end.sum()) != nodes.ids.size:
        raise Unsupported("a tag string stored as string 0 in DenseNodes")
    node_of = np.cumsum(is_end) - is_end  # node index of every entry
    entries = np.flatnonzero(~is_end)
    if entries.size % 2:
        raise Unsupported("odd DenseNodes keys_vals")
    kidx, vidx = kv[entries[0::2]], kv[entries[1::2]]
    pair_node = node_of[entries[0::2]]
    judged = judge_tags(judge, table, kidx, vidx)
    if judged is None:
        return None
    keep, gsd = judged
    pnode = pair_node[keep]
    order = by_owner(pnode)
    keep, gsd, pnode = keep[order], gsd[order], pnode[order]
    tagged, first, counts = np.unique(pnode, return_index=True, return_counts=True)
    offsets = np.zeros(tagged.size + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    best = np.maximum.reduceat(gsd, first)
    x, y = nodes.x[tagged], nodes.y[tagged]
    valid = (np.abs(x) <= LIMIT_X) & (np.abs(y) <= LIMIT_Y)
    keys = table.arrow(kidx[keep])
    values = table.arrow(vidx[keep])
    block_out = PointBlock(
        nodes.ids[tagged], offsets, keys, values, best, x / 1e7, y / 1e7, int((~valid).sum())
    )
    if not valid.all():
        block_out = _only_valid(block_out, valid)
    return block_out


def _only_valid(b: PointBlock, valid: np.ndarray) -> PointBlock:
    lengths = np.diff(b.offsets)
    tag_keep = np.repeat(valid, lengths)
    offsets = np.zeros(int(valid.sum()) + 1, np.int32)
    np.cumsum(lengths[valid], out=offsets[1:])
    mask = pa.array(tag_keep)
    return PointBlock(
        b.ids[valid],
        offsets,
        b.keys.filter(mask),
        b.values.filter(mask),
        b.max_gsd[valid],
        b.lons[valid],
        b.lats[valid],
        b.invalid,
    )


def judge_tags(
    judge: TagJudge, table: StringTable, kidx: np.ndarray, vidx: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices, max GSDs) of the groundable tags among a block's (key, value) index pairs.

    Each distinct candidate string pair of the block is judged once; None when none is kept.
    """
    if kidx.max(initial=0) >= len(table) or vidx.max(initial=0) >= len(table):
        raise Unsupported("a string index past the string table")
    used = np.unique(kidx).tolist()
    candidate = np.zeros(len(table), bool)
    candidate[used] = [judge.is_candidate(table[k]) for k in used]
    cand = np.flatnonzero(candidate[kidx])
    if cand.size == 0:
        return None
    width = len(table)
    pairs, inverse = np.unique(kidx[cand] * width + vidx[cand], return_inverse=True)
    verdict = [judge(table[p // width], table[p % width]) for p in pairs.tolist()]
    ok = np.array([v[0] for v in verdict], bool)[inverse]
    gsd = np.array([v[1] for v in verdict], np.float64)[inverse]
    keep = cand[ok]
    if keep.size == 0:
        return None
    return keep, gsd[ok]


def by_owner(owner: np.ndarray) -> np.ndarray:
    """The order of tag entries (given in file order) by owner (node or way, in file order),
    then as the element lists its tags: OSM's order, which SkyScript's captions follow."""
    return np.argsort(owner, kind="stable")
