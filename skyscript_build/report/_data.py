"""Reading a build folder's files for the report (``skyscript_build.report``).

Each reader returns None when its stage has not written anything yet. Only the files' schemas
(docs/architecture.md) are used, never the stages' code. A file that cannot be read (a
truncated parquet part, a CSV that is not UTF-8) is skipped: the reader notes it in
``problems`` (``Problems.add``) and goes on with the others.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Problems",
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
#: Files listed by name (each kind of problem is counted whatever its number).
MAX_LISTED = 100
LOGGED = 10


class Problems:
    """Files the report skipped, by kind (``unreadable parquet file``, ``missing image``, ...)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.files: list[tuple[str, str, str]] = []  # (kind, file, detail)

    def add(self, kind: str, path: Path | str, detail: str) -> None:
        """Count one skipped file; list and log the first ones."""
        detail = " ".join(detail.split())[:300]
        self.counts[kind] += 1
        if len(self.files) < MAX_LISTED:
            self.files.append((kind, str(path), detail))
        if sum(self.counts.values()) <= LOGGED:
            log.warning("report: %s skipped (%s): %s", path, kind, detail)

    def __bool__(self) -> bool:
        return bool(self.counts)


def _read_parquet(
    path: Path, columns: Sequence[str] | None, problems: Problems, *, optional: bool = False
) -> Any:
    """The ``columns`` (with ``optional``: those of them it has) of one parquet file, or None
    (noted in ``problems``) when it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if optional and columns is not None:
            names = set(pq.read_schema(path).names)
            columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException, ValueError) as e:
        problems.add("unreadable parquet file", path, str(e) or type(e).__name__)
        return None


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


def read_objects(folder: Path, problems: Problems) -> dict[str, Any] | None:
    import numpy as np
    import pyarrow.compute as pc
    import shapely

    files = _parts(folder)
    if not files:
        return None
    n, keys, types, read = 0, Counter[str](), Counter[str](), 0
    bounds = [np.inf, np.inf, -np.inf, -np.inf]
    for path in files:
        table = _read_parquet(path, ["osm_type", "tags", "geometry"], problems)
        if table is None:
            continue
        try:
            geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
        except shapely.errors.GEOSException as e:
            problems.add("unreadable parquet file", path, f"geometry is not WKB ({e})")
            continue
        read += 1
        n += table.num_rows
        for chunk in table.column("tags").chunks:
            for item in pc.value_counts(chunk.keys).to_pylist():
                keys[item["values"]] += item["counts"]
        for item in pc.value_counts(table.column("osm_type")).to_pylist():
            types[item["values"]] += item["counts"]
        b = shapely.total_bounds(geoms)
        if np.isfinite(b).all():
            bounds = [
                min(bounds[0], b[0]),
                min(bounds[1], b[1]),
                max(bounds[2], b[2]),
                max(bounds[3], b[3]),
            ]
    if not read:
        return None
    extent = tuple(float(v) for v in bounds) if np.isfinite(bounds).all() else None
    return {"n": n, "keys": keys, "types": types, "extent": extent}


def read_requests(folder: Path, problems: Problems) -> dict[str, Any] | None:
    import pyarrow.compute as pc

    files = _parts(folder)
    if not files:
        return None
    n, aliases, read = 0, Counter[str](), 0
    lons: list[float] = []
    lats: list[float] = []
    labels: list[str] = []
    for path in files:
        table = _read_parquet(path, ["alias", "west", "south", "east", "north"], problems)
        if table is None:
            continue
        read += 1
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
    if not read:
        return None
    return {"n": n, "aliases": aliases, "lons": lons, "lats": lats, "labels": labels}


def read_manifest(folder: Path, problems: Problems) -> dict[str, Any] | None:
    files = _parts(folder)
    if not files:
        return None
    status, reasons = Counter[str](), Counter[str]()
    per_alias: dict[str, Counter[str]] = {}
    nbytes = read = 0
    synthetic = False
    wanted = ("key", "status", "reason", "bytes", "image_id", "collection")
    for path in files:
        part = _read_parquet(path, wanted, problems, optional=True)
        if part is None:
            continue
        read += 1
        table = part.to_pydict()
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
    if not read:
        return None
    return {
        "status": status,
        "reasons": reasons,
        "per_alias": per_alias,
        "bytes": nbytes,
        "synthetic": synthetic,
    }


def read_captions(path: Path | None, problems: Problems, keep: int = 48) -> dict[str, Any] | None:
    """Stream a caption CSV: row count, word counts and ``keep`` sample candidates.

    Memory stays bounded for millions of rows: the candidates are the ``keep`` rows whose
    file path hashes lowest (a deterministic, uniform choice), kept in a heap.
    """
    if path is None:
        return None
    n, title_words, multi_words = 0, 0, 0
    lengths: Counter[int] = Counter()
    heap: list[tuple[int, dict[str, str]]] = []  # (-hash, row): the largest hash on top
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                n += 1
                words = len((row.get("title_multi_objects") or "").split())
                lengths[words] += 1
                multi_words += words
                title_words += len((row.get("title") or "").split())
                if keep <= 0:
                    continue
                digest = hashlib.blake2b((row.get("filepath") or "").encode(), digest_size=8)
                h = int.from_bytes(digest.digest(), "big")
                if len(heap) < keep:
                    heapq.heappush(heap, (-h, row))
                elif -heap[0][0] > h:
                    heapq.heapreplace(heap, (-h, row))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        problems.add("unreadable CSV", path, str(e) or type(e).__name__)
        return None
    candidates = [row for _, row in sorted(heap, key=lambda item: -item[0])]
    return {
        "n": n,
        "lengths": lengths,
        "title_words": title_words,
        "multi_words": multi_words,
        "candidates": candidates,
    }


def count_rows(path: Path, problems: Problems) -> int | None:
    """Data rows of a CSV, or None (noted in ``problems``) when it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return max(0, sum(1 for _ in csv.reader(f)) - 1)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        problems.add("unreadable CSV", path, str(e) or type(e).__name__)
        return None


def read_scores(path: Path | None, problems: Problems) -> dict[str, Any] | None:
    if path is None:
        return None
    whole = _read_parquet(path, None, problems)
    if whole is None:
        return None
    table = whole.to_pydict()
    return {
        "similarity": [float(s) for s in table.get("similarity", []) if s is not None],
        "model": sorted({str(m) for m in table.get("model", [])}),
        "pretrained": sorted({str(p) for p in table.get("pretrained", [])}),
    }


def load_pipeline_snapshot(build_dir: Path, problems: Problems) -> dict[str, Any]:
    path = build_dir / "pipeline.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.add("unreadable JSON", path, str(e) or type(e).__name__)
        return {}
    return data if isinstance(data, dict) else {}
