"""The ``requests/part-*.parquet`` table, built column by column from numpy arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from image_sources import ImageSource

from ..files import atomic_path, write_json_atomic
from ._geo import ranges
from ._objects import Objects

MAP = pa.map_(pa.string(), pa.string())
#: Requests per parquet row group (built and written one at a time): a row group's tag maps
#: (about 50 per request) are a shard's largest piece of memory; 20 000 cost 200 MB more peak
#: RSS on the 10x10 tiling than 5 000, for 1.5 % smaller files.
ROW_GROUP = 5_000
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("osm_type", pa.string()),
        ("osm_id", pa.int64()),
        ("osm_element", pa.string()),
        ("alias", pa.string()),
        ("collection", pa.string()),
        ("gsd", pa.float64()),
        ("years", pa.list_(pa.int32())),
        ("crs", pa.string()),
        ("x_min", pa.float64()),
        ("y_min", pa.float64()),
        ("x_max", pa.float64()),
        ("y_max", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("west", pa.float64()),
        ("south", pa.float64()),
        ("east", pa.float64()),
        ("north", pa.float64()),
        ("center_tags", MAP),
        ("surrounding_tags", pa.list_(MAP)),
    ]
)


def tag_maps(
    objs: Objects, owners: np.ndarray, gsd: np.ndarray, entry_gsd: np.ndarray
) -> pa.MapArray:
    """One map per ``owners[i]``: its tags visible at ``gsd[i]`` (entry_gsd >= gsd)."""
    starts = objs.tag_offsets[owners]
    lengths = objs.tag_offsets[owners + 1] - starts
    entries = ranges(starts, lengths)
    slot = np.repeat(np.arange(len(owners)), lengths)
    keep = entry_gsd[entries] >= gsd[slot] * (1 - 1e-9)
    entries, slot = entries[keep], slot[keep]
    offsets = np.zeros(len(owners) + 1, dtype=np.int32)
    np.cumsum(np.bincount(slot, minlength=len(owners)), out=offsets[1:])
    take = pa.array(entries, type=pa.int64())
    return pa.MapArray.from_arrays(
        pa.array(offsets), objs.tag_keys.take(take), objs.tag_values.take(take)
    )


def keys_for(objs: Objects, focus: np.ndarray, alias: pa.Array, year: np.ndarray) -> pa.Array:
    """``{osm_type}{osm_id}_{ALIAS}_{yy}`` for every request."""
    yy = pc.utf8_lpad(pa.array(year % 100).cast(pa.string()), 2, "0")
    ids = pa.array(objs.osm_id[focus]).cast(pa.string())
    types = pa.array(objs.osm_type[focus])
    head = pc.binary_join_element_wise(types, ids, "")
    return pc.binary_join_element_wise(head, alias, yy, "_")


def build_table(
    objs: Objects,
    sources: Sequence[ImageSource],
    source_years: Sequence[tuple[int, ...]],
    focus: np.ndarray,
    src: np.ndarray,
    epsg: np.ndarray,
    xy: np.ndarray,
    lonlat: np.ndarray,
    pixels: np.ndarray,
    entry_gsd: np.ndarray,
    pair_req: np.ndarray,
    pair_obj: np.ndarray,
) -> pa.Table:
    """The requests table (schema ``SCHEMA``), one row per entry of ``focus``."""
    gsd = np.array([s.gsd for s in sources], dtype=np.float64)[src]
    aliases = pa.array([s.alias for s in sources]).take(pa.array(src))
    collections = pa.array([s.collection for s in sources]).take(pa.array(src))
    flat_years = np.concatenate([np.array(y, dtype=np.int32) for y in source_years])
    y_len = np.array([len(y) for y in source_years], dtype=np.int64)
    y_start = np.cumsum(y_len) - y_len
    years_entries = ranges(y_start[src], y_len[src])
    year_offsets = np.zeros(len(src) + 1, dtype=np.int32)
    np.cumsum(y_len[src], out=year_offsets[1:])
    years = pa.ListArray.from_arrays(pa.array(year_offsets), pa.array(flat_years[years_entries]))
    first_year = flat_years[y_start[src]]
    crs = pc.binary_join_element_wise("EPSG:", pa.array(epsg).cast(pa.string()), "")
    centre = tag_maps(objs, focus, gsd, entry_gsd)
    around = tag_maps(objs, pair_obj, gsd[pair_req], entry_gsd)
    list_offsets = np.zeros(len(focus) + 1, dtype=np.int32)
    np.cumsum(np.bincount(pair_req, minlength=len(focus)), out=list_offsets[1:])
    surrounding = pa.ListArray.from_arrays(pa.array(list_offsets), around)
    width = pa.array(pixels.astype(np.int32))
    columns = [
        keys_for(objs, focus, aliases, first_year),
        pa.array(objs.osm_type[focus]),
        pa.array(objs.osm_id[focus]),
        pa.array(objs.osm_element[focus]),
        aliases,
        collections,
        pa.array(gsd),
        years,
        crs,
        *(pa.array(xy[:, k]) for k in range(4)),
        width,
        width,
        *(pa.array(lonlat[:, k]) for k in range(4)),
        centre,
        surrounding,
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def write_parts(
    build: Callable[[int, int], pa.Table],
    rows: int,
    out: Path,
    rows_per_part: int,
    threads: int = 1,
    stem: str = "part-00000",
) -> list[Path]:
    """Write ``<stem>-KKK.parquet`` files (atomically), each with ``_stats/<stem>-KKK.json``.

    ``build(start, stop)`` makes the table of requests ``start:stop``, so only the parts being
    written (``threads`` at a time) are in memory. Part boundaries depend only on
    ``rows_per_part``, never on ``threads``.
    """
    n_parts = max(1, -(-rows // rows_per_part))

    def one(k: int) -> Path:
        start, stop = k * rows_per_part, min(rows, (k + 1) * rows_per_part)
        path = out / f"{stem}-{k:03d}.parquet"
        by_source: dict[str, int] = {}
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as w:
            # Row groups built one at a time: memory is one row group's, not the part's.
            for lo in range(start, max(stop, start + 1), ROW_GROUP):
                table = build(lo, min(stop, lo + ROW_GROUP))
                w.write_table(table)
                for c in pc.value_counts(table["alias"]).to_pylist():
                    by_source[c["values"]] = by_source.get(c["values"], 0) + c["counts"]
        write_json_atomic(
            out / "_stats" / f"{stem}-{k:03d}.json",
            {"rows": stop - start, "by_source": by_source},
        )
        return path

    if threads <= 1 or n_parts == 1:
        return [one(k) for k in range(n_parts)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, range(n_parts)))
