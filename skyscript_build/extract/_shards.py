"""The two shard readers, which split the work about evenly between two processes.

- ``points_lines``: tagged nodes become points (``part-00NNN``) and ways that are not areas
  (open ways; closed ways the area rule calls lines) become lines (``part-01NNN``), both
  decoded in bulk with numpy straight from the PBF (``_ways``: node locations and points from
  the DenseNodes blocks, Way messages parsed across a whole group at once); pyosmium (with a
  node-location index) when a file needs it.
- ``areas``: a first pass over the relations (multipolygons to assemble) and one pass over
  nodes and ways in which osmium assembles areas (closed ways and multipolygon relations,
  ``part-02NNN``).

Each reader lets osmium's C++ filters drop objects without a candidate key before any Python
runs, keeps an object when one of its tags is groundable, and writes rows through a
``PartWriter`` (part number prefix: 0 points, 1 lines, 2 areas).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import osmium
import osmium.filter
import osmium.geom
import pyarrow as pa

from tag_filters import TagFilter, load_tag_filter

from ._dense import PointBlock, Unsupported, iter_point_blocks
from ._parquet import Batch, PartWriter, batch_to_table, columns_to_table, point_wkb
from ._rules import closed_way_is_area
from ._ways import iter_points_and_lines

__all__ = ["ShardSpec", "SHARDS", "SHARD_KINDS", "PART_PREFIX", "run_shard"]

log = logging.getLogger(__name__)

#: Shard index -> what it reads. The layout never depends on the worker count.
SHARDS = ("areas", "points_lines")
#: Output kind -> the part number prefix of its files.
PART_PREFIX = {"n": 0, "w": 1, "a": 2}


@dataclass(frozen=True)
class ShardSpec:
    """One unit of extract work, picklable for a worker process."""

    shard: int
    input: str
    out_dir: str
    tag_filter: str
    rows_per_part: int
    batch_rows: int
    location_index: str
    index_dir: str

    @property
    def kind(self) -> str:
        return SHARDS[self.shard]


Picked = tuple[list[str], list[str], float]


def _tag_picker(tf: TagFilter) -> Callable[..., Picked | None]:
    """A fast function: an osmium object -> (keys, values, max_gsd) of its groundable tags.

    It walks the tags through the C++ accessors (pyosmium's ``TagList`` iterator costs a Python
    frame per tag) and looks up only keys that can be groundable.
    """
    rule = tf.rule
    candidates = tf.candidate_keys()

    def pick(obj: Any) -> Picked | None:
        data = obj._pyosmium_data
        nxt = data.tags_next
        it = data.tags_begin()
        keys: list[str] = []
        values: list[str] = []
        best = -1.0
        for _ in range(data.tags_size()):
            k, v = nxt(it)
            if candidates is not None and k not in candidates:
                continue
            r = rule(k, v)
            if r is not None and r.groundable:
                keys.append(k)
                values.append(v)
                if r.max_gsd is not None and r.max_gsd > best:
                    best = r.max_gsd
        if not keys:
            return None
        return keys, values, best

    return pick


def _pick_properties(tf: TagFilter, props: dict[str, str]) -> Picked | None:
    """Like ``_tag_picker`` for a properties dict (already cut to the candidate keys)."""
    keys: list[str] = []
    values: list[str] = []
    best = -1.0
    rule = tf.rule
    for k, v in props.items():
        r = rule(k, v)
        if r is not None and r.groundable:
            keys.append(k)
            values.append(v)
            if r.max_gsd is not None and r.max_gsd > best:
                best = r.max_gsd
    if not keys:
        return None
    return keys, values, best


def _add(batch: Batch, element: str, oid: int, picked: tuple[list[str], list[str], float]) -> None:
    keys, values, best = picked
    batch.osm_element.append(element)
    batch.ids.append(oid)
    batch.tag_keys.extend(keys)  # in the element's own order (OSM's)
    batch.tag_values.extend(values)
    batch.tag_offsets.append(len(batch.tag_keys))
    batch.max_gsd.append(best)


class _Sink:
    """Collects rows into batches and flushes them as tables to the part writer."""

    def __init__(self, spec: ShardSpec, osm_type: str) -> None:
        self.spec = spec
        self.osm_type = osm_type
        self.writer = PartWriter(Path(spec.out_dir), PART_PREFIX[osm_type], spec.rows_per_part)
        self.dropped: Counter = Counter()
        self.counts: Counter = Counter()
        self.batch = Batch(osm_type)

    def maybe_flush(self) -> None:
        if len(self.batch) >= self.spec.batch_rows:
            self.flush()

    def flush(self) -> None:
        if len(self.batch):
            self.writer.write(batch_to_table(self.batch, self.dropped))
            self.batch = Batch(self.osm_type)


@contextlib.contextmanager
def _location_index(spec: ShardSpec) -> Iterator[Any]:
    """A node location table: in memory, or a file under ``index_dir`` for big inputs."""
    kind = spec.location_index
    if kind.endswith("_file_array"):
        Path(spec.index_dir).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"nodes-{spec.kind}-", suffix=".idx", dir=spec.index_dir)
        os.close(fd)
        try:
            yield osmium.index.create_map(f"{kind},{name}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
    else:
        yield osmium.index.create_map(kind)


def _key_filter(tf: TagFilter) -> Any:
    keys = tf.candidate_keys()
    return osmium.filter.KeyFilter(*sorted(keys)) if keys else osmium.filter.EmptyTagFilter()


class _NodeHandler:
    """Turns tagged nodes into points (behind a KeyFilter and, usually, a GeoInterfaceFilter)."""

    def __init__(self, tf: TagFilter, sink: _Sink, geo: bool) -> None:
        self.tf = tf
        self.pick = _tag_picker(tf)
        self.sink = sink
        self.geo = geo

    def node(self, n: Any) -> None:
        if self.geo:
            feature = n.__geo_interface__
            picked = _pick_properties(self.tf, feature["properties"])
            if picked is None:
                return
            lon, lat = feature["geometry"]["coordinates"]
        else:
            picked = self.pick(n)
            if picked is None:
                return
            loc = n.location
            if not loc.valid():
                self.sink.dropped["invalid_location"] += 1
                return
            lon, lat = loc.lon, loc.lat
        b = self.sink.batch
        _add(b, "node", n.id, picked)
        b.lons.append(lon)
        b.lats.append(lat)
        self.sink.maybe_flush()


class _PointBlocks:
    """Collects point blocks and writes them as tables of about ``batch_rows`` rows."""

    def __init__(self, spec: ShardSpec, sink: _Sink) -> None:
        self.spec, self.sink = spec, sink
        self.pending: list[PointBlock] = []
        self.rows = self.invalid = 0

    def add(self, block: PointBlock) -> None:
        self.invalid += block.invalid
        if len(block):
            self.pending.append(block)
            self.rows += len(block)
        if self.rows >= self.spec.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.sink.writer.write(_points_table(self.pending))
            self.pending, self.rows = [], 0

    def done(self) -> None:
        self.flush()
        if self.invalid:
            self.sink.dropped["invalid_location"] += self.invalid


def _fast_points_lines(spec: ShardSpec, tf: TagFilter, sinks: dict[str, _Sink]) -> bool:
    """Write the points and lines decoded in bulk (``_ways``); False (nothing kept) when the
    file needs pyosmium's reader."""
    counts: Counter = Counter()
    dropped: Counter = Counter()
    points = _PointBlocks(spec, sinks["n"])
    try:
        for kind, item in iter_points_and_lines(
            spec.input,
            tf,
            spec.batch_rows,
            columns_to_table,
            counts,
            dropped,
            # Node locations take 16 bytes a node: on disk with an on-disk node index.
            spec.index_dir if spec.location_index.endswith("_file_array") else None,
        ):
            if kind == "n":
                points.add(item)
            else:
                points.flush()
                sinks["w"].writer.write(item)
        points.done()
    except Unsupported as e:
        log.info("extract: nodes and ways through pyosmium (%s in %s)", e, spec.input)
        for sink in sinks.values():
            sink.writer.abort()
        return False
    sinks["w"].counts.update(+counts)
    sinks["w"].dropped.update(+dropped)
    return True


def _points_lines(spec: ShardSpec, tf: TagFilter, sinks: dict[str, _Sink]) -> None:
    if _fast_points_lines(spec, tf, sinks):
        return
    for kind in sinks:
        sinks[kind] = _Sink(spec, kind)
    if not _dense_points(spec, tf, sinks["n"]):
        sinks["n"] = _Sink(spec, "n")
        _slow_points(spec, tf, sinks["n"])
    _slow_lines(spec, tf, sinks["w"])


def _slow_points(spec: ShardSpec, tf: TagFilter, sink: _Sink) -> None:
    keys = tf.candidate_keys()
    nodes = _NodeHandler(tf, sink, geo=keys is not None)
    # In C++: cut a node's tags to the candidate keys and give its coordinates as a dict.
    node_chain: list[Any] = [osmium.filter.EntityFilter(osmium.osm.NODE), _key_filter(tf)]
    if keys is not None:
        node_chain.append(osmium.filter.GeoInterfaceFilter(tags=sorted(keys)))
    with osmium.io.Reader(spec.input, osmium.osm.NODE) as reader:
        osmium.apply(reader, *node_chain, nodes)


def _slow_lines(spec: ShardSpec, tf: TagFilter, sink: _Sink) -> None:
    pick = _tag_picker(tf)
    wkb = osmium.geom.WKBFactory()
    all_nodes = osmium.geom.use_nodes.ALL
    batch_rows = spec.batch_rows
    with _location_index(spec) as index:
        locations = osmium.NodeLocationsForWays(index)
        locations.ignore_errors()
        reader = osmium.io.Reader(spec.input, osmium.osm.NODE | osmium.osm.WAY)
        try:
            chain = (
                locations,
                osmium.filter.EntityFilter(osmium.osm.WAY),
                _key_filter(tf),
            )
            w: Any
            for w in osmium.OsmFileIterator(reader, *chain):
                picked = pick(w)
                if picked is None:
                    continue
                data = w._pyosmium_data  # C++ accessors: no Python wrapper per call
                size = data.nodes().size(data)
                closed = size >= 4 and data.is_closed()
                if closed and closed_way_is_area(w, picked[0], picked[1]):
                    sink.counts["expected_way_areas"] += 1
                    continue
                try:
                    # UNIQUE drops repeated points (and raises when fewer than two are left)
                    # but also skips a missing node silently: when points went missing, ALL
                    # tells a repeated point from a missing node (it raises on the latter).
                    geom = wkb.create_linestring(w)
                    if (len(geom) - 18) // 32 < size:
                        wkb.create_linestring(w, all_nodes)
                except osmium.InvalidLocationError:
                    sink.dropped["missing_nodes"] += 1
                    continue
                except RuntimeError:
                    sink.dropped["too_few_nodes"] += 1
                    continue
                b = sink.batch
                _add(b, "way", w.id, picked)
                b.geoms.append(geom)
                if len(b) >= batch_rows:
                    sink.flush()
        finally:
            reader.close()


class _AreaHandler:
    """Receives assembled areas from osmium's area manager (second pass)."""

    def __init__(self, tf: TagFilter, sink: _Sink) -> None:
        self.pick = _tag_picker(tf)
        self.wkb = osmium.geom.WKBFactory()
        self.sink = sink

    def area(self, a: Any) -> None:
        picked = self.pick(a)
        if picked is None:
            return
        from_way = a.from_way()
        if from_way and not closed_way_is_area(a, picked[0], picked[1]):
            return
        sink = self.sink
        try:
            geom = self.wkb.create_multipolygon(a)
        except (osmium.InvalidLocationError, RuntimeError):
            sink.dropped["broken_multipolygon" if not from_way else "broken_area"] += 1
            return
        sink.counts["way_areas" if from_way else "relation_areas"] += 1
        _add(sink.batch, "way" if from_way else "relation", a.orig_id(), picked)
        sink.batch.geoms.append(geom)
        sink.maybe_flush()


class _RelationCounter:
    """First pass: counts the multipolygon relations that should become areas."""

    def __init__(self, tf: TagFilter) -> None:
        self.pick = _tag_picker(tf)
        self.expected = 0

    def relation(self, r: Any) -> None:
        if r.tags.get("type") in ("multipolygon", "boundary") and self.pick(r) is not None:
            self.expected += 1


def _points_table(blocks: list[PointBlock]) -> pa.Table:
    offsets = [np.zeros(1, np.int32)]
    base = 0
    for b in blocks:
        offsets.append(b.offsets[1:] + base)
        base += int(b.offsets[-1])
    n = sum(len(b) for b in blocks)
    return columns_to_table(
        "n",
        pa.array(np.full(n, "node", dtype=object), pa.string()),
        np.concatenate([b.ids for b in blocks]),
        np.concatenate(offsets),
        pa.concat_arrays([b.keys for b in blocks]),
        pa.concat_arrays([b.values for b in blocks]),
        np.concatenate([b.max_gsd for b in blocks]),
        point_wkb(
            np.concatenate([b.lons for b in blocks]), np.concatenate([b.lats for b in blocks])
        ),
    )


def _dense_points(spec: ShardSpec, tf: TagFilter, sink: _Sink) -> bool:
    """Write the points decoded in bulk from DenseNodes; False (nothing kept) when the file
    needs pyosmium's reader (see ``_dense``)."""
    points = _PointBlocks(spec, sink)
    try:
        for block in iter_point_blocks(spec.input, tf):
            points.add(block)
        points.done()
    except Unsupported as e:
        log.info("extract: nodes through pyosmium (%s in %s)", e, spec.input)
        sink.writer.abort()
        return False
    return True


def _areas(spec: ShardSpec, tf: TagFilter, sink: _Sink) -> None:
    manager = osmium.area.AreaManager()
    counter = _RelationCounter(tf)
    # Keep references to every osmium object in a chain: osmium does not.
    relation_filter = _key_filter(tf)
    with osmium.io.Reader(spec.input, osmium.osm.RELATION) as reader:
        osmium.apply(reader, relation_filter, counter, manager.first_pass_handler())
    sink.counts["expected_relation_areas"] = counter.expected
    areas = _AreaHandler(tf, sink)
    area_filter = _key_filter(tf)
    with _location_index(spec) as index:
        locations = osmium.NodeLocationsForWays(index)
        locations.ignore_errors()
        second = manager.second_pass_handler(area_filter, areas)
        with osmium.io.Reader(spec.input, osmium.osm.NODE | osmium.osm.WAY) as reader:
            osmium.apply(reader, locations, second)
    missing = counter.expected - sink.counts["relation_areas"] - sink.dropped["broken_multipolygon"]
    if missing > 0:
        sink.dropped["broken_multipolygon"] += missing


_READERS = {"areas": _areas, "points_lines": _points_lines}
#: Shard -> the output kinds it writes.
SHARD_KINDS = {"areas": ("a",), "points_lines": ("n", "w")}


def run_shard(spec: ShardSpec) -> dict[str, Any]:
    """Read one shard and write its parts; return its stats (``error`` set on a read failure).

    Module level so that a worker process can run it.
    """
    start = time.monotonic()
    tf = load_tag_filter(spec.tag_filter)
    read, kinds = _READERS[spec.kind], SHARD_KINDS[spec.kind]
    sinks = {k: _Sink(spec, k) for k in kinds}
    try:
        read(spec, tf, sinks if len(kinds) > 1 else sinks[kinds[0]])  # type: ignore[operator]
        parts: list[str] = []
        for sink in sinks.values():
            sink.flush()
            parts.extend(sink.writer.close())
    except (RuntimeError, OSError, ValueError) as e:
        for sink in sinks.values():
            sink.writer.abort()
        return {"shard": spec.shard, "kind": spec.kind, "error": str(e) or type(e).__name__}
    dropped: Counter = Counter()
    counts: Counter = Counter()
    for sink in sinks.values():
        dropped.update(sink.dropped)
        counts.update(sink.counts)
    return {
        "shard": spec.shard,
        "kind": spec.kind,
        "rows": {k: sink.writer.rows for k, sink in sinks.items()},
        "parts": sorted(parts),
        "dropped": dict(sorted(dropped.items())),
        "counts": dict(sorted(counts.items())),
        "seconds": round(time.monotonic() - start, 3),
    }
