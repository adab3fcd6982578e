"""Make small objects folders (the extract stage's GeoParquet) for the plan tests.

Usage: python tests/data/plan/data.py OUT_DIR   (writes OUT_DIR/<scenario>/part-00000.parquet)

The tests call ``write_objects`` and the scenario functions directly, into a temporary folder.
Coordinates are lon/lat (EPSG:4326); tags are only groundable tags of the default tag filter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

Row = tuple[str, int, str, Mapping[str, str], float, Any]

# Places used by the tests (lon, lat).
BERN = (7.4474, 46.9480)  # Switzerland (CH, 0.1 m)
HELSINKI = (24.9384, 60.1699)  # Finland (FI, 0.5 m)
ATLANTIC = (-30.0, 40.0)  # open sea: only the global sources cover it


def write_objects(folder: str | Path, rows: Iterable[Row], part: int = 0) -> Path:
    """Write ``rows`` (osm_type, osm_id, osm_element, tags, max_gsd, geometry) as one part."""
    rows = list(rows)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gdf = gpd.GeoDataFrame(
        {
            "osm_type": [r[0] for r in rows],
            "osm_id": np.array([r[1] for r in rows], dtype=np.int64),
            "osm_element": [r[2] for r in rows],
            "max_gsd": np.array([r[4] for r in rows], dtype=np.float64),
        },
        geometry=[r[5] for r in rows],
        crs="EPSG:4326",
    )
    path = folder / f"part-{part:05d}.parquet"
    gdf.to_parquet(path, index=False)  # GeoParquet: WKB geometry + "geo" metadata
    table = pq.read_table(path)
    tags = pa.array(
        [sorted(dict(r[3]).items()) for r in rows], type=pa.map_(pa.string(), pa.string())
    )
    table = table.add_column(3, "tags", tags)
    pq.write_table(table, path)
    return path


def offset(origin: tuple[float, float], dx_m: float, dy_m: float) -> tuple[float, float]:
    """The point ``dx_m`` east and ``dy_m`` north of ``origin`` (small distances)."""
    lon, lat = origin
    return (
        lon + dx_m / (111_320.0 * np.cos(np.radians(lat))),
        lat + dy_m / 110_574.0,
    )


def square(origin: tuple[float, float], dx_m: float, dy_m: float, size_m: float) -> Any:
    """A square area of ``size_m`` metres with its south-west corner at the offset."""
    x0, y0 = offset(origin, dx_m, dy_m)
    x1, y1 = offset(origin, dx_m + size_m, dy_m + size_m)
    return shapely.box(x0, y0, x1, y1)


def point(origin: tuple[float, float], dx_m: float = 0.0, dy_m: float = 0.0) -> Any:
    return shapely.Point(offset(origin, dx_m, dy_m))


def line(origin: tuple[float, float], dx_m: float, dy_m: float, length_m: float) -> Any:
    return shapely.LineString([offset(origin, dx_m, dy_m), offset(origin, dx_m + length_m, dy_m)])


def switzerland() -> list[Row]:
    """A tree in Bern, a 3 km farmland near it, a building and a few things around."""
    return [
        ("n", 1, "node", {"natural": "tree"}, 0.6, point(BERN)),
        ("a", 2, "way", {"landuse": "farmland"}, 10.0, square(BERN, 2000, 2000, 3000)),
        ("a", 3, "way", {"building": "yes"}, 1.0, square(BERN, 5, 5, 12)),
        ("w", 4, "way", {"highway": "residential"}, 1.0, line(BERN, -10, -3, 15)),
        ("n", 5, "node", {"natural": "tree"}, 0.6, point(BERN, 3, 2)),
    ]


def outside() -> list[Row]:
    """A building in the open Atlantic: only S2/L8/L9 cover it, all too coarse for it."""
    return [("a", 10, "way", {"building": "yes"}, 1.0, square(ATLANTIC, 0, 0, 20))]


def city(n: int, seed: int, origin: tuple[float, float] = HELSINKI, size_m: float = 2000.0):
    """``n`` random objects in a ``size_m`` square: buildings, trees, roads, a few landuses.

    Tag frequencies are skewed (buildings common, some tags rare) for the sampling tests.
    """
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    kinds = rng.choice(4, size=n, p=[0.55, 0.25, 0.15, 0.05])
    xs = rng.uniform(0, size_m, n)
    ys = rng.uniform(0, size_m, n)
    sizes = rng.uniform(8, 40, n)
    rare = ["landuse=quarry", "landuse=vineyard", "natural=water"]
    for i in range(n):
        oid = i + 1
        k = kinds[i]
        if k == 0:
            rows.append(("a", oid, "way", {"building": "yes"}, 1.0,
                         square(origin, xs[i], ys[i], sizes[i])))  # fmt: skip
        elif k == 1:
            rows.append(("n", oid, "node", {"natural": "tree"}, 0.6, point(origin, xs[i], ys[i])))
        elif k == 2:
            rows.append(("w", oid, "way", {"highway": "footway"}, 1.0,
                         line(origin, xs[i], ys[i], sizes[i] * 3)))  # fmt: skip
        else:
            key, value = rare[i % len(rare)].split("=")
            rows.append(("a", oid, "way", {key: value}, 10.0,
                         square(origin, xs[i], ys[i], sizes[i] * 4)))  # fmt: skip
    return rows


def main(out: str) -> None:
    scenarios = {"switzerland": switzerland(), "outside": outside(), "city": city(500, 7)}
    for name, rows in scenarios.items():
        write_objects(Path(out) / name, rows)
    print(json.dumps({name: len(rows) for name, rows in scenarios.items()}))


if __name__ == "__main__":
    main(sys.argv[1])
