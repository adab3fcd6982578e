#!/usr/bin/env python3
"""Make the emulator's test collections: small seeded GeoTIFFs and their collections.yaml.

``make_collections(folder)`` writes (about 0.5 MB in all):

- ``Finland/SMK/V/50cm``: two 8-bit RGB images (bands R, G, B) in EPSG:3067 at 0.5 m inside
  the bundled Helsinki extract: ``ortho_2019`` (400x300 px, 2019-06-15T10:30Z,
  CLOUDY_PIXEL_PERCENTAGE 5) and ``ortho_2021`` (the same area shifted 50 m east,
  2021-07-01T09:00Z, CLOUDY_PIXEL_PERCENTAGE 40).
- ``TEST/UTM_UINT16``: one 4-band 16-bit image (bands B1..B4 by default) in EPSG:32635 at 10 m.

Run as a script to write them to a folder: ``python tests/data/emulator/data.py OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

# Upper-left corners (EPSG:3067 metres) and sizes, so tests can compute windows.
ORTHO_ORIGIN = (385800.0, 6672400.0)
ORTHO_SIZE = (400, 300)  # width, height in pixels
ORTHO_GSD = 0.5
SHIFT_2021 = 50.0
UTM_ORIGIN = (385000.0, 6674000.0)


def _write(path: Path, data: np.ndarray, crs: str, transform, **extra) -> None:
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 128,
        "blockysize": 128,
        "compress": "deflate",
        **extra,
    }
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)


def _pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """RGB uint8: smooth gradients plus noise, so every pixel position is distinguishable."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = (xx * 255 // max(w - 1, 1)).astype(np.int32)
    g = (yy * 255 // max(h - 1, 1)).astype(np.int32)
    b = rng.integers(0, 256, (h, w))
    noise = rng.integers(-20, 21, (3, h, w))
    return np.clip(np.stack([r, g, b]) + noise, 0, 255).astype(np.uint8)


def make_collections(folder: str | Path, seed: int = 0) -> Path:
    """Write the test GeoTIFFs and ``collections.yaml`` into ``folder``; return the YAML path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = ORTHO_SIZE
    x0, y0 = ORTHO_ORIGIN
    _write(
        folder / "ortho_2019.tif",
        _pattern(rng, h, w),
        "EPSG:3067",
        from_origin(x0, y0, ORTHO_GSD, ORTHO_GSD),
    )
    _write(
        folder / "ortho_2021.tif",
        _pattern(rng, h, w),
        "EPSG:3067",
        from_origin(x0 + SHIFT_2021, y0, ORTHO_GSD, ORTHO_GSD),
    )
    _write(
        folder / "utm_uint16.tif",
        rng.integers(0, 10000, (4, 64, 64)).astype(np.uint16),
        "EPSG:32635",
        from_origin(*UTM_ORIGIN, 10.0, 10.0),
    )
    (folder / "collections.yaml").write_text(
        "# Test collections for the Earth Engine emulator (made by tests/data/emulator/data.py)\n"
        "Finland/SMK/V/50cm:\n"
        "  - path: ortho_2019.tif\n"
        "    time_start: 2019-06-15T10:30:00Z\n"
        "    id: ortho_2019\n"
        "    bands: [R, G, B]\n"
        "    properties: {CLOUDY_PIXEL_PERCENTAGE: 5, SYNTHETIC: 1}\n"
        "  - path: ortho_2021.tif\n"
        "    time_start: 2021-07-01T09:00:00Z\n"
        "    id: ortho_2021\n"
        "    bands: [R, G, B]\n"
        "    properties: {CLOUDY_PIXEL_PERCENTAGE: 40, SYNTHETIC: 1}\n"
        "TEST/UTM_UINT16:\n"
        "  - path: utm_uint16.tif\n"
        "    time_start: 2020-01-01\n"
    )
    return folder / "collections.yaml"


if __name__ == "__main__":
    print(make_collections(sys.argv[1] if len(sys.argv) > 1 else "emulator_data"))
