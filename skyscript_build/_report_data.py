"""Reading a build folder's files for the report (``skyscript_build.report``).

Each reader returns None when its stage has not written anything yet. Only the files' schemas
(docs/architecture.md) are used, never the stages' code.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "find_dataset_files",
    "read_objects",
    "read_requests",
    "read_manifest",
    "read_captions",
    "count_rows",
    "read_scores",
    "load_pipeline_snapshot",
]

log = logging.getLogger(__name__)
_KEY_ALIAS = re.compile(r"_([A-Z][A-Z0-9_]*?)_\d{2}$")
_MAX_MAP_POINTS = 200_000


def find_dataset_files(dataset: Path) -> dict[str, Any]:
    """The caption CSV, the filtered CSVs and scores.parquet of a dataset folder."""
    csvs = sorted(dataset.glob("*.csv")) if dataset.is_dir() else []
    filtered = [p for p in csvs if "_filtered_by_" in p.name]
    captions = [p for p in csvs if p not in filtered]
    preferred = [p for p in captions if p.name == "SkyScript_captions.csv"]
    scores = dataset / "scores.parquet"
    return {
        "captions": (preferred or captions)[0] if captions else None,
        "filtered": filtered,
        "scores": scores if scores.is_file() else None,
    }


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def read_objects(folder: Path) -> dict[str, Any] | None:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import shapely

    files = _parts(folder)
    if not files:
        return None
    n, keys, types = 0, Counter[str](), Counter[str]()
    bounds = [np.inf, np.inf, -np.inf, -np.inf]
    for path in files:
        table = pq.read_table(path, columns=["osm_type", "tags", "geometry"])
        n += table.num_rows
        for chunk in table.column("tags").chunks:
            for item in pc.value_counts(chunk.keys).to_pylist():
                keys[item["values"]] += item["counts"]
        for item in pc.value_counts(table.column("osm_type")).to_pylist():
            types[item["values"]] += item["counts"]
        geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
        b = shapely.total_bounds(geoms)
        if np.isfinite(b).all():
            bounds = [
                min(bounds[0], b[0]),
                min(bounds[1], b[1]),
                max(bounds[2], b[2]),
                max(bounds[3], b[3]),
            ]
    extent = tuple(float(v) for v in bounds) if np.isfinite(bounds).all() else None
    return {"n": n, "keys": keys, "types": types, "extent": extent}


def read_requests(folder: Path) -> dict[str, Any] | None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = _parts(folder)
    if not files:
        return None
    n, aliases = 0, Counter[str]()
    lons: list[float] = []
    lats: list[float] = []
    labels: list[str] = []
    for path in files:
        table = pq.read_table(path, columns=["alias", "west", "south", "east", "north"])
        n += table.num_rows
        for item in pc.value_counts(table.column("alias")).to_pylist():
            aliases[item["values"]] += item["counts"]
        if len(lons) < _MAX_MAP_POINTS:
            take = table.slice(0, _MAX_MAP_POINTS - len(lons))
            west, east = take.column("west").to_pylist(), take.column("east").to_pylist()
            south, north = take.column("south").to_pylist(), take.column("north").to_pylist()
            lons += [(w + e) / 2 for w, e in zip(west, east, strict=True)]
            lats += [(s + n_) / 2 for s, n_ in zip(south, north, strict=True)]
            labels += take.column("alias").to_pylist()
    return {"n": n, "aliases": aliases, "lons": lons, "lats": lats, "labels": labels}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    files = _parts(folder)
    if not files:
        return None
    status, reasons = Counter[str](), Counter[str]()
    per_alias: dict[str, Counter[str]] = {}
    nbytes = 0
    synthetic = False
    for path in files:
        columns = [
            c
            for c in ("key", "status", "reason", "bytes", "image_id", "collection")
            if c in pq.read_schema(path).names
        ]
        table = pq.read_table(path, columns=columns).to_pydict()
        for i, st in enumerate(table.get("status", [])):
            status[st] += 1
            if st != "ok":
                reasons[
                    f"{st}: {table['reason'][i] or 'unknown'}" if "reason" in table else st
                ] += 1
            m = _KEY_ALIAS.search(table["key"][i] or "") if "key" in table else None
            per_alias.setdefault(m.group(1) if m else "?", Counter())[st] += 1
        nbytes += sum(b or 0 for b in table.get("bytes", []))
        ids = [str(x).lower() for x in table.get("image_id", []) if x]
        synthetic = synthetic or any("synthetic" in x for x in ids)
    return {
        "status": status,
        "reasons": reasons,
        "per_alias": per_alias,
        "bytes": nbytes,
        "synthetic": synthetic,
    }


def read_captions(path: Path | None, keep: int = 48) -> dict[str, Any] | None:
    """Stream a caption CSV: row count, word counts and ``keep`` sample candidates.

    Memory stays bounded for millions of rows: the candidates are the ``keep`` rows whose
    file path hashes lowest (a deterministic, uniform choice), kept in a heap.
    """
    if path is None:
        return None
    n, title_words, multi_words = 0, 0, 0
    lengths: Counter[int] = Counter()
    heap: list[tuple[int, dict[str, str]]] = []  # (-hash, row): the largest hash on top
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            n += 1
            words = len((row.get("title_multi_objects") or "").split())
            lengths[words] += 1
            multi_words += words
            title_words += len((row.get("title") or "").split())
            digest = hashlib.blake2b((row.get("filepath") or "").encode(), digest_size=8)
            h = int.from_bytes(digest.digest(), "big")
            if len(heap) < keep:
                heapq.heappush(heap, (-h, row))
            elif -heap[0][0] > h:
                heapq.heapreplace(heap, (-h, row))
    candidates = [row for _, row in sorted(heap, key=lambda item: -item[0])]
    return {
        "n": n,
        "lengths": lengths,
        "title_words": title_words,
        "multi_words": multi_words,
        "candidates": candidates,
    }


def count_rows(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def read_scores(path: Path | None) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    if path is None:
        return None
    table = pq.read_table(path).to_pydict()
    return {
        "similarity": [float(s) for s in table.get("similarity", []) if s is not None],
        "model": sorted({str(m) for m in table.get("model", [])}),
        "pretrained": sorted({str(p) for p in table.get("pretrained", [])}),
    }


def load_pipeline_snapshot(build_dir: Path) -> dict[str, Any]:
    path = build_dir / "pipeline.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s: unreadable, ignored", path)
        return {}
    return data if isinstance(data, dict) else {}
