"""Reading the extract stage's ``objects/part-*.parquet`` into flat numpy arrays.

Tags stay flat (one entry per tag, with per-object offsets) so that choosing, sampling and
writing never loop over objects in Python.
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

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("osm_type", "osm_id", "osm_element", "tags", "max_gsd", "geometry")
_TYPE_CODES = {"n": 1, "w": 2, "a": 3}
_ELEMENT_CODES = {"node": 1, "way": 2, "relation": 3}


@dataclass
class Objects:
    """The objects, sorted by (osm_type, osm_id, osm_element).

    Attributes:
        osm_type, osm_element: numpy arrays of str.
        osm_id: int64 array.
        kind: int8 code of ``osm_type`` (1 point, 2 line, 3 area); ``element``: likewise.
        geometry: shapely geometries (lon/lat).
        bounds: (N, 4) lon/lat bounds.
        max_gsd: float64 (inf when unknown).
        tag_offsets: (N + 1) offsets into the tag entries.
        tag_keys, tag_values: pyarrow string arrays, one entry per tag.
        tag_code: int32 id of each entry's ``key=value`` (dense, sorted by text).
        tag_names: the ``key=value`` text of each code.
        dropped: objects left out while reading, by reason.
    """

    osm_type: np.ndarray
    osm_id: np.ndarray
    osm_element: np.ndarray
    kind: np.ndarray
    element: np.ndarray
    geometry: np.ndarray
    bounds: np.ndarray
    max_gsd: np.ndarray
    tag_offsets: np.ndarray
    tag_keys: pa.Array
    tag_values: pa.Array
    tag_code: np.ndarray
    tag_names: list[str]
    dropped: dict[str, int]

    def __len__(self) -> int:
        return len(self.osm_id)

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


def read_objects(folder: Path) -> Objects:
    """Read every part of ``folder``; a part without the objects columns is an InputError."""
    tables = []
    for part in object_parts(folder):
        try:
            schema = pq.read_schema(part)
        except (OSError, pa.ArrowException) as e:
            raise InputError(part, f"not a readable parquet file ({e})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise InputError(part, f"not an objects file: missing column(s) {', '.join(missing)}")
        try:
            table = pq.read_table(part, columns=list(REQUIRED_COLUMNS))
        except (OSError, pa.ArrowException) as e:
            raise InputError(part, f"cannot read ({e})") from None
        tables.append(table)
    # One copy into contiguous arrays (not one per part and another for all of them).
    table = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    del tables
    return _to_objects(table, folder)


def _flat_tags(column: pa.ChunkedArray | pa.Array, folder: Path) -> tuple:
    tags = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_map(tags.type):
        offsets = tags.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        keys, values = tags.keys, tags.items
    elif pa.types.is_list(tags.type) and pa.types.is_struct(tags.type.value_type):
        offsets = tags.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        keys, values = tags.values.field(0), tags.values.field(1)
    else:
        raise InputError(folder, f"the tags column is {tags.type}, expected map<string,string>")
    # Offsets of a sliced array start past 0: rebase onto the flat children.
    start, end = int(offsets[0]), int(offsets[-1])
    keys = keys.slice(start, end - start).cast(pa.string())
    values = values.slice(start, end - start).cast(pa.string())
    offsets = offsets - start
    if tags.null_count:
        # A null map has equal offsets already; nothing to fix.
        pass
    return offsets, keys, values


def _to_objects(table: pa.Table, folder: Path) -> Objects:
    dropped: dict[str, int] = {}
    osm_type = table["osm_type"].to_numpy(zero_copy_only=False).astype(str)
    osm_element = table["osm_element"].to_numpy(zero_copy_only=False).astype(str)
    osm_id = table["osm_id"].to_numpy(zero_copy_only=False).astype(np.int64)
    kind = np.array([_TYPE_CODES.get(t, 0) for t in np.unique(osm_type)], dtype=np.int8)
    kind = kind[np.searchsorted(np.unique(osm_type), osm_type)]
    uniq_el = np.unique(osm_element)
    element = np.array([_ELEMENT_CODES.get(e, 0) for e in uniq_el], dtype=np.int8)
    element = element[np.searchsorted(uniq_el, osm_element)]
    bad_type = kind == 0
    if bad_type.any():
        bad = sorted(set(osm_type[bad_type]))[:3]
        raise InputError(folder, f"osm_type must be n, w or a; found {', '.join(bad)}")
    max_gsd = pc.fill_null(table["max_gsd"].combine_chunks().cast(pa.float64()), np.inf)
    max_gsd = max_gsd.to_numpy(zero_copy_only=False).copy()
    max_gsd[~np.isfinite(max_gsd)] = np.inf
    wkb = table["geometry"].combine_chunks()
    try:
        geometry = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False), on_invalid="ignore")
    except shapely.errors.GEOSException as e:
        raise InputError(folder, f"the geometry column is not WKB ({e})") from None
    offsets, keys, values = _flat_tags(table["tags"], folder)

    ok = ~(shapely.is_missing(geometry) | shapely.is_empty(geometry))
    n_tags = np.diff(offsets)
    ok &= n_tags > 0
    if not ok.all():
        dropped["no-geometry-or-tags"] = int((~ok).sum())
    order = np.lexsort((element, osm_id, kind))
    order = order[ok[order]]

    # Reorder the flat tags with the objects.
    starts, lengths = offsets[order], n_tags[order]
    new_offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    entry_index = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    take = pa.array(entry_index)
    keys, values = keys.take(take), values.take(take)
    names = pc.binary_join_element_wise(keys, values, "=")
    encoded = names.dictionary_encode()
    dict_names = encoded.dictionary.to_pylist()
    # Dense codes sorted by text, so codes do not depend on the order objects came in.
    rank = np.argsort(np.argsort(np.array(dict_names, dtype=object)))
    tag_code = rank[encoded.indices.to_numpy(zero_copy_only=False)].astype(np.int32)
    tag_names = sorted(dict_names)

    geometry = geometry[order]
    return Objects(
        osm_type=osm_type[order],
        osm_id=osm_id[order],
        osm_element=osm_element[order],
        kind=kind[order],
        element=element[order],
        geometry=geometry,
        bounds=shapely.bounds(geometry),
        max_gsd=max_gsd[order],
        tag_offsets=new_offsets,
        tag_keys=keys,
        tag_values=values,
        tag_code=tag_code,
        tag_names=tag_names,
        dropped=dropped,
    )
