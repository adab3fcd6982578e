"""Column batches -> GeoParquet parts (EPSG:4326, WKB geometry), written atomically.

Geometries arrive as WKB (hex strings from osmium's factory, or lon/lat pairs for points) and
are checked in bulk with shapely: an invalid geometry is repaired with ``make_valid`` when the
repair keeps its kind (polygonal stays polygonal, lineal stays lineal) and dropped otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from ..files import atomic_path

__all__ = ["SCHEMA", "Batch", "PartWriter", "OSM_CREDIT", "part_name", "remove_parts"]

OSM_CREDIT = "(c) OpenStreetMap contributors, ODbL 1.0 (https://www.openstreetmap.org/copyright)"

_BBOX = ("xmin", "ymin", "xmax", "ymax")
_FIELDS = [
    pa.field("osm_type", pa.string(), nullable=False),
    pa.field("osm_id", pa.int64(), nullable=False),
    pa.field("osm_element", pa.string(), nullable=False),
    pa.field("tags", pa.map_(pa.string(), pa.string()), nullable=False),
    pa.field("max_gsd", pa.float64(), nullable=False),
    pa.field("geometry", pa.binary(), nullable=False),
    pa.field(
        "bbox",
        pa.struct([pa.field(k, pa.float64(), nullable=False) for k in _BBOX]),
        nullable=False,
    ),
]


#: PROJJSON of EPSG:4326, fixed here so that every part carries the same bytes (pyproj's
#: output depends on the PROJ database state of the process).
_EPSG_4326 = {
    "$schema": "https://proj.org/schemas/v0.7/projjson.schema.json",
    "area": "World.",
    "bbox": {
        "east_longitude": 180,
        "north_latitude": 90,
        "south_latitude": -90,
        "west_longitude": -180,
    },
    "coordinate_system": {
        "axis": [
            {
                "abbreviation": "Lat",
                "direction": "north",
                "name": "Geodetic latitude",
                "unit": "degree",
            },
            {
                "abbreviation": "Lon",
                "direction": "east",
                "name": "Geodetic longitude",
                "unit": "degree",
            },
        ],
        "subtype": "ellipsoidal",
    },
    "datum_ensemble": {
        "accuracy": "2.0",
        "ellipsoid": {
            "inverse_flattening": 298.257223563,
            "name": "WGS 84",
            "semi_major_axis": 6378137,
        },
        "id": {"authority": "EPSG", "code": 6326},
        "members": [
            {
                "id": {"authority": "EPSG", "code": 1166},
                "name": "World Geodetic System 1984 (Transit)",
            },
            {
                "id": {"authority": "EPSG", "code": 1152},
                "name": "World Geodetic System 1984 (G730)",
            },
            {
                "id": {"authority": "EPSG", "code": 1153},
                "name": "World Geodetic System 1984 (G873)",
            },
            {
                "id": {"authority": "EPSG", "code": 1154},
                "name": "World Geodetic System 1984 (G1150)",
            },
            {
                "id": {"authority": "EPSG", "code": 1155},
                "name": "World Geodetic System 1984 (G1674)",
            },
            {
                "id": {"authority": "EPSG", "code": 1156},
                "name": "World Geodetic System 1984 (G1762)",
            },
            {
                "id": {"authority": "EPSG", "code": 1309},
                "name": "World Geodetic System 1984 (G2139)",
            },
            {
                "id": {"authority": "EPSG", "code": 1383},
                "name": "World Geodetic System 1984 (G2296)",
            },
        ],
        "name": "World Geodetic System 1984 ensemble",
    },
    "id": {"authority": "EPSG", "code": 4326},
    "name": "WGS 84",
    "scope": "Horizontal component of 3D system.",
    "type": "GeographicCRS",
}


@functools.lru_cache(maxsize=1)
def _geo_metadata() -> bytes:
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": [],
                "crs": _EPSG_4326,
                "covering": {"bbox": {k: ["bbox", k] for k in _BBOX}},
            },
        },
    }
    return json.dumps(geo, sort_keys=True).encode()


def schema() -> pa.Schema:
    """The objects schema, with GeoParquet and OSM credit metadata."""
    return pa.schema(
        _FIELDS,
        metadata={
            b"geo": _geo_metadata(),
            b"osm_copyright": OSM_CREDIT.encode(),
            b"skyscript_build": b"objects",
        },
    )


SCHEMA = _FIELDS


@dataclass
class Batch:
    """Rows gathered by a reader before they become a table.

    ``geoms`` holds WKB hex strings; for points ``lons``/``lats`` are used instead.
    """

    osm_type: str
    osm_element: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    tag_keys: list[str] = field(default_factory=list)
    tag_values: list[str] = field(default_factory=list)
    tag_offsets: list[int] = field(default_factory=lambda: [0])
    max_gsd: list[float] = field(default_factory=list)
    geoms: list[str] = field(default_factory=list)
    lons: list[float] = field(default_factory=list)
    lats: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _fix_geometries(
    geoms: np.ndarray, kind: str, dropped: Counter
) -> tuple[np.ndarray, np.ndarray]:
    """Repair or drop invalid geometries; return (geometries, keep mask)."""
    keep = ~shapely.is_missing(geoms)
    valid = shapely.is_valid(geoms)
    bad = keep & ~valid
    if bad.any():
        fixed = shapely.make_valid(geoms[bad])
        # Keep Polygon/MultiPolygon parts of an area, LineString/MultiLineString of a line.
        fixed = _only(fixed, (3, 6) if kind == "a" else (1, 5))
        ok = ~shapely.is_empty(fixed) & ~shapely.is_missing(fixed)
        geoms[bad] = fixed
        idx = np.flatnonzero(bad)
        keep[idx[~ok]] = False
        dropped["invalid_geometry"] += int((~ok).sum())
        dropped["repaired_geometry"] += int(ok.sum())
    return geoms, keep


def _only(geoms: np.ndarray, types: tuple[int, ...]) -> np.ndarray:
    """Keep the parts of each geometry whose type id is in ``types`` (as a multi-geometry)."""
    out = geoms.copy()
    for i, g in enumerate(geoms):
        if g is None:
            continue
        t = shapely.get_type_id(g)
        if t in types:
            continue
        parts = [p for p in shapely.get_parts(g) if shapely.get_type_id(p) in types]
        flat: list[Any] = []
        for p in parts:
            flat.extend(shapely.get_parts(p))
        if not flat:
            out[i] = None
        elif types[0] == 3:
            out[i] = shapely.multipolygons(flat)
        else:
            out[i] = shapely.multilinestrings(flat)
    return out


_POINT_WKB = np.dtype([("order", "u1"), ("type", "<u4"), ("x", "<f8"), ("y", "<f8")])


def point_wkb(lons: Any, lats: Any) -> pa.Array:
    """Little-endian WKB points, built in bulk (21 bytes each)."""
    rows = np.empty(len(lons), dtype=_POINT_WKB)
    rows["order"] = 1
    rows["type"] = 1
    rows["x"] = lons
    rows["y"] = lats
    offsets = np.arange(0, 21 * (len(lons) + 1), 21, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.binary(), len(lons), [None, pa.py_buffer(offsets), pa.py_buffer(rows.tobytes())]
    )


def area_geometries(hexes: list[str], dropped: Counter) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """osmium's area WKB (hex) -> (WKB, bbox, keep): checked and repaired with shapely, and a
    MultiPolygon of one polygon written as that Polygon; ``keep`` is False where dropped."""
    raw = bytes.fromhex("".join(hexes))
    ends = np.cumsum([len(h) // 2 for h in hexes]).tolist()
    wkbs = np.empty(len(hexes), dtype=object)
    wkbs[:] = [raw[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    geoms = shapely.from_wkb(wkbs, on_invalid="ignore")
    geoms, keep = _fix_geometries(geoms, "a", dropped)
    single = keep & (shapely.get_type_id(geoms) == 6)
    single &= shapely.get_num_geometries(geoms) == 1
    if single.any():
        geoms[single] = shapely.get_geometry(geoms[single], 0)
    return pa.array(shapely.to_wkb(geoms), pa.binary()), shapely.bounds(geoms), keep


def batch_to_table(batch: Batch, dropped: Counter) -> pa.Table:
    """Turn a batch of points or areas into a table of the objects schema, repairing or
    dropping invalid areas (``area_geometries``)."""
    if batch.osm_type == "n":
        keep = np.ones(len(batch), dtype=bool)
        wkb = point_wkb(batch.lons, batch.lats)
        bbox = np.array([batch.lons, batch.lats, batch.lons, batch.lats], np.float64).T
    else:
        wkb, bbox, keep = area_geometries(batch.geoms, dropped)
    table = columns_to_table(
        batch.osm_type,
        pa.array(batch.osm_element, pa.string()),
        pa.array(batch.ids, pa.int64()),
        np.asarray(batch.tag_offsets, dtype=np.int32),
        pa.array(batch.tag_keys, pa.string()),
        pa.array(batch.tag_values, pa.string()),
        pa.array(batch.max_gsd, pa.float64()),
        wkb,
        bbox,
    )
    if not keep.all():
        table = table.filter(pa.array(keep))
    return table


def bbox_array(bbox: np.ndarray) -> pa.StructArray:
    """An (n, 4) array of (xmin, ymin, xmax, ymax) -> the ``bbox`` column."""
    bbox = np.nan_to_num(np.asarray(bbox, np.float64).reshape(-1, 4))  # dropped rows: NaN
    return pa.StructArray.from_arrays(
        [pa.array(bbox[:, i]) for i in range(4)], fields=list(_FIELDS[-1].type)
    )


def columns_to_table(
    osm_type: str,
    element: pa.Array,
    ids: Any,
    tag_offsets: np.ndarray,
    tag_keys: pa.Array,
    tag_values: pa.Array,
    max_gsd: Any,
    wkb: pa.Array,
    bbox: np.ndarray,
) -> pa.Table:
    """Columns (tags as offsets + keys + values, ``bbox`` as an (n, 4) array) -> a table of
    the objects schema."""
    n = len(wkb)
    tags = pa.MapArray.from_arrays(pa.array(tag_offsets), tag_keys, tag_values)
    return pa.table(
        [
            pa.array(np.full(n, osm_type, dtype=object), pa.string()),
            pa.array(ids, pa.int64()),
            element,
            tags,
            pa.array(max_gsd, pa.float64()),
            wkb,
            bbox_array(bbox),
        ],
        schema=schema(),
    )


def part_name(prefix: str, number: int) -> str:
    """``part-{prefix}-{number:04d}.parquet``; ``prefix`` is ``{kind}-{task:05d}``."""
    return f"part-{prefix}-{number:04d}.parquet"


class PartWriter:
    """Writes a task's rows of one kind into ``part-{prefix}-NNNN.parquet`` files of at most
    ``rows_per_part`` rows (none for a task without rows).

    Each part is written under a temporary name and renamed when complete.
    """

    def __init__(self, out_dir: Path, prefix: str, rows_per_part: int) -> None:
        self.out_dir = out_dir
        self.prefix = prefix
        self.rows_per_part = rows_per_part
        self.parts: list[str] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._ctx: Any = None
        self._part_rows = 0

    def _open(self) -> None:
        name = part_name(self.prefix, len(self.parts))
        self._ctx = atomic_path(self.out_dir / name)
        tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(tmp, schema(), compression="zstd")
        self.parts.append(name)
        self._part_rows = 0

    def write(self, table: pa.Table) -> None:
        """Append rows, starting a new part when the current one is full."""
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._open()
            assert self._writer is not None
            take = min(self.rows_per_part - self._part_rows, table.num_rows - start)
            self._writer.write_table(table.slice(start, take))
            self._part_rows += take
            self.rows += take
            start += take
            if self._part_rows >= self.rows_per_part:
                self._close_part()

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._ctx.__exit__(None, None, None)

    def close(self) -> list[str]:
        """Finish the last part; return the names of all."""
        self._close_part()
        return self.parts

    def abort(self) -> None:
        """Drop the part being written and every part this writer finished."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            err = RuntimeError("aborted")
            with contextlib.suppress(RuntimeError):  # the context deletes its temporary file
                self._ctx.__exit__(type(err), err, None)
        for name in self.parts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.out_dir / name)


def remove_parts(out_dir: Path, prefix: str) -> None:
    """Delete the parts ``part-{prefix}-*`` a killed run of a task left."""
    for path in out_dir.glob(f"part-{prefix}-[0-9][0-9][0-9][0-9].parquet"):
        path.unlink(missing_ok=True)


def write_empty_part(out_dir: Path) -> str:
    """One part without rows (an extract that found nothing still has a part to read)."""
    writer = PartWriter(out_dir, "0-00000", 1)
    writer._open()
    return writer.close()[0]
