"""Make the filter stage's fixture: small JPEGs, meta pickles and a caption CSV (seeded).

Layout as the fetch stage writes it: ``images2/``, ``images3/`` with ``<key>.jpg``, the
matching ``meta2/``, ``meta3/`` with ``<key>.pickle`` (boxes spread over a few 0.1-degree grid
cells around Helsinki), and ``SkyScript_captions.csv`` (``filepath,title,title_multi_objects``).

Run ``python tests/data/filter/data.py OUT_DIR`` to write it by hand; tests call ``make``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from skyscript_build.meta import dumps_meta, make_meta

TAGS = [
    ({"building": "yes"}, "building"),
    ({"landuse": "grass"}, "landuse of grass"),
    ({"highway": "footway"}, "road of footway"),
    ({"natural": "tree"}, "natural tree"),
    ({"amenity": "parking"}, "amenity of parking"),
    ({"leisure": "park"}, "leisure of park"),
]


def make(root: Path, n: int = 40, seed: int = 0, size: int = 48) -> Path:
    """Write ``n`` image/meta pairs and the caption CSV under ``root``; return the CSV path."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        part = 2 + i % 2
        osm_type = "anw"[i % 3]
        key = f"{osm_type}{1000 + i}_FI_19"
        img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        img[: size // 2] = (img[: size // 2] // 4 + rng.integers(0, 192)).astype(np.uint8)
        (root / f"images{part}").mkdir(parents=True, exist_ok=True)
        (root / f"meta{part}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"images{part}" / f"{key}.jpg", quality=90)
        cell = i % 5  # five grid cells of 0.1 degree
        lon = 24.0 + 0.1 * cell + 0.05 + rng.uniform(-0.03, 0.03)
        lat = 60.1 + 0.05 + rng.uniform(-0.03, 0.03)
        tags, title = TAGS[i % len(TAGS)]
        meta = make_meta(
            (lon - 0.001, lat - 0.001, lon + 0.001, lat + 0.001),
            (2019, 6, 1, 10, 0),
            tags,
            [{"natural": "tree"}],
        )
        (root / f"meta{part}" / f"{key}.pickle").write_bytes(dumps_meta(meta))
        rows.append((f"images{part}/{key}.jpg", title, f"{title}, surrounded by natural tree"))
    csv_path = root / "SkyScript_captions.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filepath", "title", "title_multi_objects"])
        writer.writerows(sorted(rows))
    return csv_path


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
