"""Seeded fixtures of the fetch tests: a GeoTIFF orthophoto, an emulator collections file, and
plan-stage requests that follow docs/architecture.md's schema exactly.

Run ``python tests/data/fetch/data.py OUT_DIR`` to write them; the tests call ``make_fixture``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import yaml
from pyproj import Transformer
from rasterio.transform import from_origin

from skyscript_build.plan import SCHEMA as PLAN_SCHEMA

CRS = "EPSG:3067"
ORIGIN = (385000.0, 6672500.0)  # central Helsinki, ETRS-TM35FIN metres (west, north)
GSD = 0.5
SIZE = 512  # raster pixels on a side (256 m)
COLLECTION = "Finland/SMK/V/50cm"
ALIAS = "FI"
TIME = "2019-06-15T10:30:00Z"

#: docs/architecture.md's requests schema: the plan stage's own, so the two cannot drift.
REQUESTS_SCHEMA = PLAN_SCHEMA


def write_raster(path: Path, seed: int = 0, time: str = TIME, size: int = SIZE) -> Path:
    """A textured 3-band uint8 GeoTIFF (bands described R, G, B) with its acquisition time."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(30, 226, size=(3, size // 16, size // 16), dtype=np.uint8)
    data = np.kron(blocks, np.ones((1, 16, 16), dtype=np.uint8))
    noise = rng.integers(0, 20, size=data.shape, dtype=np.uint8)
    data = (data + noise).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs=CRS,
        transform=from_origin(ORIGIN[0], ORIGIN[1], GSD, GSD),
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as ds:
        ds.write(data)
        ds.descriptions = ("R", "G", "B")
        ds.update_tags(ACQUISITION_TIME=time)
    return path


S2 = "COPERNICUS/S2_SR_HARMONIZED"


def write_s2(folder: Path, seed: int = 0) -> list[dict]:
    """Two Sentinel-2-like scenes (B4, B3, B2, QA60; uint16; 10 m) of 2021 over the fixture
    area: ``s2_cloudy`` (scene cloud 60 %) and ``s2_clear`` (5 %, QA60 bit 10 set on its
    western half). Returns their collections entries."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, cloud, day in (("s2_cloudy", 60, "2021-07-01"), ("s2_clear", 5, "2021-06-01")):
        data = rng.integers(200, 2800, size=(4, 64, 64)).astype(np.uint16)
        data[3] = 0
        if name == "s2_clear":
            data[3, :, :32] = 1 << 10
        path = folder / f"{name}.tif"
        with rasterio.open(
            path,
            "w",
            driver="GTiff",
            width=64,
            height=64,
            count=4,
            dtype="uint16",
            crs=CRS,
            transform=from_origin(ORIGIN[0] - 200, ORIGIN[1] + 200, 10.0, 10.0),
        ) as ds:
            ds.write(data)
        entries.append(
            {
                "path": str(path),
                "time_start": f"{day}T10:00:00Z",
                "id": name,
                "bands": ["B4", "B3", "B2", "QA60"],
                "properties": {"CLOUDY_PIXEL_PERCENTAGE": cloud},
            }
        )
    return entries


def write_collections(path: Path, raster: Path, extra: dict | None = None) -> Path:
    """The emulator's collections YAML serving ``raster`` as COLLECTION."""
    entry = {
        "path": str(raster),
        "time_start": TIME,
        "id": "helsinki_2019",
        "bands": ["R", "G", "B"],
    }
    path.write_text(yaml.safe_dump({COLLECTION: [entry], **(extra or {})}, sort_keys=True))
    return path


def request_rows(
    n: int,
    seed: int = 0,
    px: int = 64,
    years: tuple[int, ...] = (2019,),
    prefix: str = "a",
    inside: bool = True,
) -> list[dict]:
    """``n`` requests of ``px`` x ``px`` tiles at GSD inside the raster (or outside it)."""
    rng = np.random.default_rng(seed)
    to_lonlat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    side = px * GSD
    rows = []
    for i in range(n):
        if inside:
            x0 = ORIGIN[0] + float(rng.integers(0, int(SIZE * GSD - side)))
            y1 = ORIGIN[1] - float(rng.integers(0, int(SIZE * GSD - side)))
        else:
            x0, y1 = ORIGIN[0] + 5000.0 + i * side, ORIGIN[1] + 5000.0
        x1, y0 = x0 + side, y1 - side
        lons, lats = to_lonlat.transform([x0, x1, x0, x1], [y0, y0, y1, y1])
        osm_id = 1000 + i
        rows.append(
            {
                "key": f"{prefix}{osm_id}_{ALIAS}_{years[0] % 100:02d}",
                "osm_type": prefix,
                "osm_id": osm_id,
                "osm_element": "way",
                "alias": ALIAS,
                "collection": COLLECTION,
                "gsd": GSD,
                "years": list(years),
                "crs": CRS,
                "x_min": x0,
                "y_min": y0,
                "x_max": x1,
                "y_max": y1,
                "width": px,
                "height": px,
                "west": min(lons),
                "south": min(lats),
                "east": max(lons),
                "north": max(lats),
                "center_tags": [("building", "yes"), ("roof:shape", "flat")],
                "surrounding_tags": [[("highway", "footway")], [("natural", "tree")]],
            }
        )
    return rows


def write_requests(folder: Path, parts: list[list[dict]]) -> Path:
    """Write request rows as ``folder/part-NNNNN.parquet``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(parts):
        pq.write_table(
            pa.Table.from_pylist(rows, schema=REQUESTS_SCHEMA), folder / f"part-{i:05d}.parquet"
        )
    return folder


def make_fixture(
    out: Path, n: int = 12, parts: int = 2, px: int = 64, seed: int = 0
) -> dict[str, Path]:
    """The whole fixture under ``out``: rasters/, collections.yaml, requests/."""
    raster = write_raster(out / "rasters" / "helsinki_2019.tif", seed=seed)
    collections = write_collections(out / "collections.yaml", raster)
    rows = request_rows(n, seed=seed, px=px)
    per = -(-n // parts)
    requests = write_requests(out / "requests", [rows[i : i + per] for i in range(0, n, per)])
    return {
        "raster": raster,
        "rasters": raster.parent,
        "collections": collections,
        "requests": requests,
    }


if __name__ == "__main__":
    print(make_fixture(Path(sys.argv[1] if len(sys.argv) > 1 else "build/fetch-fixture")))
