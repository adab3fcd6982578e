"""Reading the extract stage's ``objects/part-*.parquet``: the small columns only.

The plan never needs an object's geometry, only its lon/lat box (the extract's ``bbox``
column; computed from the WKB for objects folders written without it). Parts are read in
units of whole row groups (``read_units``), so that a scan task holds a bounded slice of the
input. Tags stay flat (one entry per tag, with per-object offsets), in the object's own order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely

from ..errors import InputError
from ._geo import ranges

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("osm_type", "osm_id", "osm_element", "tags", "max_gsd", "geometry")
#: Integer codes of ``osm_type`` and ``osm_element``; object order is (kind, osm_id, element).
TYPE_NAMES = np.array(["", "n", "w", "a"])
ELEMENT_NAMES = np.array(["", "node", "way", "relation"])
_TYPE_CODES = {"n": 1, "w": 2, "a": 3}
_ELEMENT_CODES = {"node": 1, "way": 2, "relation": 3}
#: Rows of one read unit (whole row groups, at least one); more for a big input, so that no
#: more than about MAX_UNITS scan files are made (every partition reads from each of them),
#: up to MAX_UNIT_ROWS (a scan task's memory grows with its unit).
UNIT_ROWS = 262_144
MAX_UNITS = 1024
MAX_UNIT_ROWS = 2_097_152


@dataclass
class Objects:
    """Objects as flat arrays.

    Attributes:
        kind: int8 code of ``osm_type`` (1 point, 2 line, 3 area); ``element``: of
            ``osm_element`` (1 node, 2 way, 3 relation).
        osm_id: int64.
        bounds: (N, 4) lon/lat boxes (west, south, east, north).
        max_gsd: float64 (inf when unknown).
        tag_offsets: (N + 1) offsets into the tag entries.
        tag_keys, tag_values: pyarrow string arrays, one entry per tag.
        dropped: objects left out while reading, by reason.
    """

    kind: np.ndarray
    element: np.ndarray
    osm_id: np.ndarray
    bounds: np.ndarray
    max_gsd: np.ndarray
    tag_offsets: np.ndarray
    tag_keys: pa.Array
    tag_values: pa.Array
    dropped: dict[str, int]

    def __len__(self) -> int:
        return len(self.osm_id)

    @property
    def osm_type(self) -> np.ndarray:
        return TYPE_NAMES[self.kind]

    @property
    def osm_element(self) -> np.ndarray:
        return ELEMENT_NAMES[self.element]

    @property
    def entry_owner(self) -> np.ndarray:
        """The object index of every tag entry."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.tag_offsets))


def object_parts(folder: Path) -> list[Path]:
    """The objects part files of ``folder``, sorted; none is an InputError."""
    if not folder.is_dir():
        raise InputError(folder, "objects folder not found (run `skyscript-build extract` first)")
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise InputError(
            folder, "no part-*.parquet files in the objects folder (run extract first)"
        )
    return parts


@dataclass(frozen=True)
class ReadUnit:
    """Whole row groups of one part: what one scan task reads."""

    part: str
    row_groups: tuple[int, ...]
    rows: int


def read_units(folder: Path, unit_rows: int | None = None) -> list[ReadUnit]:
    """Cut every part of ``folder`` into units of whole row groups of about ``unit_rows``
    (default: ``UNIT_ROWS``, or more for a big input, see ``MAX_UNITS``).

    Reads only the parts' footers; a part that is not an objects file is an InputError.
    """
    metas = []
    for part in object_parts(folder):
        try:
            meta = pq.read_metadata(part)
        except (OSError, pa.ArrowException) as e:
            raise InputError(part, f"not a readable parquet file ({e})") from None
        names = meta.schema.to_arrow_schema().names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise InputError(part, f"not an objects file: missing column(s) {', '.join(missing)}")
        metas.append((part, meta))
    if unit_rows is None:
        total = sum(meta.num_rows for _, meta in metas)
        unit_rows = min(max(UNIT_ROWS, total // MAX_UNITS), MAX_UNIT_ROWS)
    units = []
    for part, meta in metas:
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if groups and rows + n > unit_rows:
                units.append(ReadUnit(str(part), tuple(groups), rows))
                groups, rows = [], 0
            groups.append(g)
            rows += n
        if groups or not units or units[-1].part != str(part):
            units.append(ReadUnit(str(part), tuple(groups), rows))
    return units


def read_unit(unit: ReadUnit) -> Objects:
    """The objects of one unit, in file order (objects without tags or a box are dropped)."""
    part = Path(unit.part)
    try:
        pf = pq.ParquetFile(part)
        has_bbox = "bbox" in pf.schema_arrow.names
        columns = [c for c in REQUIRED_COLUMNS if c != "geometry" or not has_bbox]
        table = pf.read_row_groups(
            list(unit.row_groups), columns=[*columns, *(["bbox"] if has_bbox else [])]
        )
    except (OSError, pa.ArrowException) as e:
        raise InputError(part, f"cannot read ({e})") from None
    return _to_objects(table, part)


def _flat_tags(column: pa.ChunkedArray | pa.Array, part: Path) -> tuple:
    tags = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_map(tags.type):
        keys, values = tags.keys, tags.items
    elif pa.types.is_list(tags.type) and pa.types.is_struct(tags.type.value_type):
        keys, values = tags.values.field(0), tags.values.field(1)
    else:
        raise InputError(part, f"the tags column is {tags.type}, expected map<string,string>")
    offsets = tags.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    # Offsets of a sliced array start past 0: rebase onto the flat children.
    start, end = int(offsets[0]), int(offsets[-1])
    keys = keys.slice(start, end - start).cast(pa.string())
    values = values.slice(start, end - start).cast(pa.string())
    return offsets - start, keys, values


def _codes(column: pa.ChunkedArray, codes: dict[str, int], part: Path, name: str) -> np.ndarray:
    encoded = column.combine_chunks().dictionary_encode()
    names = encoded.dictionary.to_pylist()
    bad = [n for n in names if n not in codes]
    if bad:
        expected = ", ".join(codes)
        raise InputError(part, f"{name} must be one of {expected}; found {', '.join(bad[:3])}")
    table = np.array([codes[n] for n in names], dtype=np.int8)
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    return table[indices] if len(names) else np.zeros(0, dtype=np.int8)


def _bounds(table: pa.Table, part: Path) -> np.ndarray:
    if "bbox" in table.column_names:
        box = table["bbox"].combine_chunks()
        fields = ("xmin", "ymin", "xmax", "ymax")
        try:
            cols = [pc.fill_null(box.field(f), np.nan) for f in fields]
        except KeyError:
            raise InputError(part, "the bbox column lacks xmin, ymin, xmax or ymax") from None
        return np.column_stack([c.to_numpy(zero_copy_only=False) for c in cols]).astype(np.float64)
    wkb = table["geometry"].combine_chunks()
    try:
        geometry = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False), on_invalid="ignore")
    except shapely.errors.GEOSException as e:
        raise InputError(part, f"the geometry column is not WKB ({e})") from None
    return shapely.bounds(geometry)


def _to_objects(table: pa.Table, part: Path) -> Objects:
    kind = _codes(table["osm_type"], _TYPE_CODES, part, "osm_type")
    element = _codes(table["osm_element"], _ELEMENT_CODES, part, "osm_element")
    osm_id = table["osm_id"].to_numpy().astype(np.int64)
    max_gsd = pc.fill_null(table["max_gsd"].combine_chunks().cast(pa.float64()), np.inf)
    max_gsd = max_gsd.to_numpy(zero_copy_only=False).copy()
    max_gsd[~np.isfinite(max_gsd)] = np.inf
    bounds = _bounds(table, part)
    offsets, keys, values = _flat_tags(table["tags"], part)
    n_tags = np.diff(offsets)
    ok = np.isfinite(bounds).all(axis=1) & (n_tags > 0)
    dropped = {} if ok.all() else {"no-geometry-or-tags": int((~ok).sum())}
    if not ok.all():
        rows = np.flatnonzero(ok)
        entries = ranges(offsets[rows], n_tags[rows])
        take = pa.array(entries, type=pa.int64())
        keys, values = keys.take(take), values.take(take)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(n_tags[rows], out=offsets[1:])
        kind, element, osm_id = kind[rows], element[rows], osm_id[rows]
        bounds, max_gsd = bounds[rows], max_gsd[rows]
    return Objects(
        kind=kind,
        element=element,
        osm_id=osm_id,
        bounds=bounds,
        max_gsd=max_gsd,
        tag_offsets=offsets,
        tag_keys=keys,
        tag_values=values,
        dropped=dropped,
    )
