"""Fabricate a small build folder, as the stages write it, for the report's tests.

Follows the schemas of docs/architecture.md: ``objects/`` (GeoParquet), ``requests/``, the
dataset (``images{k}/``, ``meta{k}/``, ``manifest/``, the caption CSV, a filtered CSV,
``scores.parquet``) and the ``pipeline.json`` that ``run`` writes. Seeded: the same call gives
the same files. Run ``python tests/data/report/data.py OUT_DIR`` to look at one.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from shapely.geometry import Point, box

from skyscript_build.meta import dumps_meta, make_meta

TAGS = [
    {"building": "yes"},
    {"amenity": "fountain"},
    {"highway": "footway"},
    {"landuse": "grass"},
    {"natural": "tree"},
    {"leisure": "park", "name_ignored": "x"},
    {"power": "pole"},
]
PARTS = 2


def _caption(tags: dict[str, str]) -> str:
    return ", ".join(f"{k} of {v}" if v != "yes" else k for k, v in tags.items())


def make_build(root: Path, *, n_objects: int = 40, seed: int = 0) -> Path:
    """Write a build folder under ``root`` and return it."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "objects").mkdir(exist_ok=True)
    (root / "requests").mkdir(exist_ok=True)
    dataset = root / "dataset"
    (dataset / "manifest").mkdir(parents=True, exist_ok=True)

    rows, requests, manifest, captions = [], [], [], []
    for i in range(n_objects):
        lon = 24.93 + rng.random() * 0.02
        lat = 60.16 + rng.random() * 0.01
        tags = dict(rng.choice(TAGS))
        tags.pop("name_ignored", None)
        osm_type = "a" if i % 2 else "n"
        geom = box(lon, lat, lon + 0.0003, lat + 0.0002) if osm_type == "a" else Point(lon, lat)
        rows.append(
            {
                "osm_type": osm_type,
                "osm_id": 1000 + i,
                "osm_element": "way" if osm_type == "a" else "node",
                "tags": tags,
                "max_gsd": 1.0,
                "geometry": geom,
            }
        )
        if i % 5 == 4:  # not every object gets a tile
            continue
        alias = "FI" if i % 3 else "S2"
        key = f"{osm_type}{1000 + i}_{alias}_19"
        part = 2 + i % PARTS
        w, s, e, n = lon - 0.001, lat - 0.0005, lon + 0.001, lat + 0.0005
        requests.append(
            {
                "key": key,
                "osm_type": osm_type,
                "osm_id": 1000 + i,
                "osm_element": rows[-1]["osm_element"],
                "alias": alias,
                "collection": "Finland/SMK/V/50cm" if alias == "FI" else "COPERNICUS/S2",
                "gsd": 0.5,
                "years": [2019],
                "crs": "EPSG:32635",
                "x_min": 0.0,
                "y_min": 0.0,
                "x_max": 128.0,
                "y_max": 128.0,
                "width": 256,
                "height": 256,
                "west": w,
                "south": s,
                "east": e,
                "north": n,
                "center_tags": list(tags.items()),
                "surrounding_tags": [[("natural", "tree")]],
            }
        )
        status = "ok" if i % 7 else ("skipped" if i % 2 else "failed")
        reason = {"ok": None, "skipped": "no-image", "failed": "http-500"}[status]
        filepath = f"images{part}/{key}.jpg" if status == "ok" else None
        nbytes = 0
        if status == "ok":
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            img_path = dataset / filepath
            img_path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (256, 256), colour).save(img_path, quality=90)
            nbytes = img_path.stat().st_size
            meta_path = dataset / f"meta{part}" / f"{key}.pickle"
            meta_path.parent.mkdir(parents=True, exist_ok=True)
            meta_path.write_bytes(
                dumps_meta(
                    make_meta((w, s, e, n), (2019, 6, 15, 10, 30), tags, [{"natural": "tree"}])
                )
            )
            captions.append(
                {
                    "filepath": filepath,
                    "title": _caption(tags),
                    "title_multi_objects": _caption(tags) + ", surrounded by natural tree",
                }
            )
        manifest.append(
            {
                "key": key,
                "status": status,
                "reason": reason,
                "attempts": 1,
                "bytes": nbytes,
                "collection": requests[-1]["collection"],
                "image_id": f"{requests[-1]['collection']}/img_2019" if status == "ok" else None,
                "acquisition_time": pd.Timestamp("2019-06-15T10:30:00Z")
                if status == "ok"
                else None,
                "filepath": filepath,
            }
        )

    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
    gdf["tags"] = gdf["tags"].map(lambda t: list(t.items()))
    table = pa.Table.from_pandas(gdf.to_wkb(), preserve_index=False)
    table = table.set_column(
        table.schema.get_field_index("tags"),
        "tags",
        pa.array([list(r["tags"].items()) for r in rows], type=pa.map_(pa.string(), pa.string())),
    )
    geo = {
        "version": "1.0.0",
        "primary_column": "geometry",
        "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Point", "Polygon"]}},
    }
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    pq.write_table(table, root / "objects" / "part-00000.parquet")

    req = pd.DataFrame(requests)
    req_table = pa.Table.from_pandas(req, preserve_index=False)
    for col, typ in (
        ("center_tags", pa.map_(pa.string(), pa.string())),
        ("surrounding_tags", pa.list_(pa.map_(pa.string(), pa.string()))),
    ):
        req_table = req_table.set_column(
            req_table.schema.get_field_index(col), col, pa.array(req[col].tolist(), type=typ)
        )
    pq.write_table(req_table, root / "requests" / "part-00000.parquet")

    man = pd.DataFrame(manifest)
    man["acquisition_time"] = pd.to_datetime(man["acquisition_time"], utc=True)
    pq.write_table(
        pa.Table.from_pandas(man, preserve_index=False), dataset / "manifest" / "part-00000.parquet"
    )

    captions.sort(key=lambda r: r["filepath"])
    with open(dataset / "SkyScript_captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["filepath", "title", "title_multi_objects"])
        writer.writeheader()
        writer.writerows(captions)

    scores = pd.DataFrame(
        {
            "filepath": [c["filepath"] for c in captions],
            "similarity": [round(rng.uniform(-0.1, 0.4), 6) for _ in captions],
            "model": "tiny-random",
            "pretrained": "none:seed0",
        }
    )
    pq.write_table(pa.Table.from_pandas(scores, preserve_index=False), dataset / "scores.parquet")
    top = scores.sort_values("similarity", ascending=False).head(max(1, len(scores) * 3 // 10))
    with open(
        dataset / "SkyScript_train_top30pct_filtered_by_tiny.csv", "w", newline="", encoding="utf-8"
    ) as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "title_multi_objects", "similarity_tiny"])
        by_path = {c["filepath"]: c for c in captions}
        for fp, sim in zip(top["filepath"], top["similarity"], strict=True):
            writer.writerow([fp, by_path[fp]["title"], by_path[fp]["title_multi_objects"], sim])

    (root / "pipeline.json").write_text(
        json.dumps(
            {
                "name": "fabricated",
                "backend": {"type": "emulator"},
                "filter": {"model": "tiny-random", "pretrained": "none", "name": "tiny"},
            },
            indent=2,
        )
    )
    return root


if __name__ == "__main__":
    out = make_build(Path(sys.argv[1] if len(sys.argv) > 1 else "build/report-fixture"))
    print(out)
