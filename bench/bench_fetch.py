"""Benchmark fetch: a request per tile against block requests, in one run, on the emulator.

Data:

1. The demo's requests: ``data/helsinki.osm.pbf`` extracted and planned as
   ``pipelines/demo_helsinki.yaml`` does (FI, 2019, tiles of 256-1024 px), fetched from the
   demo's synthetic orthophoto (``make demo-data``).
2. A planned 10 x 10 tiling of the same extract (``/work/cache/k10.osm.pbf``, made there with
   ``shared/bench/tile_pbf.py`` when absent): the whole plan's requests and pixels are counted
   for both ways (the planner alone), and the first requests part (a few thousand tiles) is
   fetched both ways, its imagery the orthophoto moved under each copy (one VRT per copy).

Every fetch is ``skyscript-build fetch`` as a subprocess (one process, threads), against
``skyscript-build emulator`` in its own process with the latency model
``BASE + COST x megapixels`` per request; the block planner is given the same model (what a
user who measured their project's latency would set). For each: requests sent (computePixels
and value:compute, from the emulator), bytes moved (the emulator's answer bodies), tiles/s
(the fetch's own wall time), CPU per tile (the fetch process's user + system time). The files
of the two ways are compared byte for byte. Goal: on the demo at 500 ms + 50 ms/Mpx, at least
10x fewer requests and 5x the tiles/s with identical pixels.

The break-even: with per-tile requests R_t of P_t megapixels in all, and blocks R_b of P_b,
the requests' summed time is R x BASE + COST x P; blocks lose only where
COST > BASE x (R_t - R_b) / (P_b - P_t), and never when they move fewer pixels (P_b < P_t).

    python bench/bench_fetch.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import rasterio
from pyproj import Transformer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _results import record  # noqa: E402

DEMO_DATA = REPO / "build" / "demo-data"
ORTHO = DEMO_DATA / "helsinki_orthophoto_synthetic.tif"
OUT = HERE / "out" / "fetch"
PY = sys.executable
PBF = REPO / "data" / "helsinki.osm.pbf"
K10 = Path(os.environ.get("BENCH_K10_PBF", "/work/cache/k10.osm.pbf"))
TILE_PBF = REPO.parent / "shared" / "bench" / "tile_pbf.py"
PLAN_ARGS = ["--sources", "FI", "--years", "2019", "--min-px", "256", "--max-px", "1024"]


def cli(*args: str | Path) -> str:
    """Run ``skyscript-build ARGS``; its stdout (exit on failure)."""
    cmd = [PY, "-m", "skyscript_build.cli", *map(str, args)]
    env = {**os.environ, "SKYSCRIPT_NO_PROGRESS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return done.stdout


def planned(pbf: Path, folder: Path) -> Path:
    """Extract and plan ``pbf`` into ``folder`` (kept for the next run); the requests folder."""
    requests = folder / "requests"
    if not (requests / "_plan.json").exists():
        cli("extract", pbf, "--out", folder / "objects")
        cli("plan", "--objects", folder / "objects", "--out", requests, *PLAN_ARGS)
    return requests


def k10_pbf() -> Path:
    if not K10.exists():
        K10.parent.mkdir(parents=True, exist_ok=True)
        print(f"making {K10} with {TILE_PBF}", flush=True)
        subprocess.run([PY, str(TILE_PBF), str(PBF), str(K10), "10"], check=True)
    return K10


def copy_offsets(k: int = 10) -> tuple[list[tuple[float, float]], tuple[float, ...]]:
    """tile_pbf.py's shifts of each copy (degrees), and the extract's lon/lat bounds."""
    import osmium

    west, south, east, north = 180.0, 90.0, -180.0, -90.0
    for o in osmium.FileProcessor(str(PBF), osmium.osm.NODE):
        west, east = min(west, o.location.lon), max(east, o.location.lon)
        south, north = min(south, o.location.lat), max(north, o.location.lat)
    dx, dy = (east - west) * 1.05, (north - south) * 1.05
    return [((c // k) * dx, (c % k) * dy) for c in range(k * k)], (west, south, east, north)


def k10_collections(folder: Path) -> Path:
    """The orthophoto moved under each copy of the tiling (a VRT per copy), as a collection."""
    shifts, _ = copy_offsets()
    with rasterio.open(ORTHO) as ds:
        crs, t, w, h = ds.crs.to_string(), ds.transform, ds.width, ds.height
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    to_xy = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    cx, cy = t.c + t.a * w / 2, t.f + t.e * h / 2
    lon, lat = to_ll.transform(cx, cy)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["Finland/SMK/V/50cm:"]
    for c, (sx, sy) in enumerate(shifts):
        x, y = to_xy.transform(lon + sx, lat + sy)
        ox = t.c + round((x - cx) / t.a) * t.a  # whole pixels: the copy stays on the lattice
        oy = t.f + round((y - cy) / -t.e) * -t.e
        bands = "".join(
            f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>'
            f'<SourceFilename relativeToVRT="0">{ORTHO}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
            for b in (1, 2, 3)
        )
        (folder / f"copy{c:03d}.vrt").write_text(
            f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><SRS>{crs}</SRS>'
            f"<GeoTransform>{ox}, {t.a}, 0, {oy}, 0, {t.e}</GeoTransform>{bands}</VRTDataset>"
        )
        lines += [
            f"- path: copy{c:03d}.vrt",
            "  time_start: '2019-06-15T10:30:00Z'",
            f"  id: copy{c:03d}",
            "  bands: [R, G, B]",
        ]
    path = folder / "collections.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def k10_sample(requests: Path, folder: Path, n: int) -> Path:
    """The first ``n`` requests of the tiling's first part, in fetch order (neighbours)."""
    from skyscript_build.fetch.stage import ORDER_COLUMNS, fetch_order

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    table = pq.read_table(sorted(requests.glob("part-*.parquet"))[0])
    order = fetch_order(table.select(list(ORDER_COLUMNS)))[:n]
    pq.write_table(table.take(sorted(order)), folder / "part-00000.parquet")
    return folder


def plan_counts(requests: Path, shard_size: int, overhead_ms: float, ms_per_mpx: float) -> dict:
    """Requests and megapixels of a whole plan, per tile and in blocks (the planner alone;
    tiles grouped by the copy of the tiling they lie in, each copy its own image)."""
    from skyscript_build.fetch._blocks import BlockSettings, block_grid, plan_blocks
    from skyscript_build.fetch.backends.base import TileRequest
    from skyscript_build.fetch.stage import ORDER_COLUMNS, fetch_order

    shifts, (west, south, east, north) = copy_offsets()
    dx, dy = shifts[10][0], shifts[1][1]
    settings = BlockSettings(overhead_ms=overhead_ms, ms_per_mpx=ms_per_mpx)
    tiles = blocks = 0
    px_tiles = px_blocks = 0
    columns = [*ORDER_COLUMNS, "gsd", "width", "height", "west", "south", "east", "north"]
    for part in sorted(requests.glob("part-*.parquet")):
        table = pq.read_table(part, columns=columns)
        table = table.take(fetch_order(table.select(list(ORDER_COLUMNS))))
        rows = table.to_pylist()
        for start in range(0, len(rows), shard_size):
            groups: dict[tuple, list] = {}
            for row in rows[start : start + shard_size]:
                row.update(years=[2019], collection="", center_tags={}, surrounding_tags=[])
                grid = TileRequest.from_row(row).grid
                lon, lat = (row["west"] + row["east"]) / 2, (row["south"] + row["north"]) / 2
                copy = (math.floor((lon - west) / dx), math.floor((lat - south) / dy))
                groups.setdefault(copy, []).append(grid)
            for grids in groups.values():
                plan = plan_blocks(grids, settings)
                tiles += len(grids)
                px_tiles += sum(g.pixels for g in grids)
                blocks += len(plan)
                px_blocks += sum(block_grid([grids[i] for i in g]).pixels for g in plan)
    return {"tiles": tiles, "mpx_tiles": px_tiles / 1e6, "requests": blocks, "mpx": px_blocks / 1e6}


class Emulator:
    """``skyscript-build emulator`` in its own process; ``stop()`` returns its stats."""

    def __init__(self, collections: Path, base_ms: float, ms_per_mpx: float) -> None:
        cmd = [PY, "-m", "skyscript_build.cli", "emulator", "--collections", str(collections)]
        cmd += [
            "--port",
            "0",
            "--latency-ms",
            str(base_ms),
            "--latency-ms-per-mpx",
            str(ms_per_mpx),
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if not match:
            self.proc.kill()
            raise SystemExit(f"the emulator did not start: {line!r}")
        self.url = match.group(1)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        match = re.search(r"emulator stopped: (\{.*\})", out)
        return json.loads(match.group(1)) if match else {}


def fetch(
    requests: Path,
    collections: Path,
    out: Path,
    mode: str,
    base: float,
    cost: float,
    *extra: str,
    fresh: bool = True,
) -> dict:
    """One ``skyscript-build fetch`` into ``out`` (a fresh one unless ``fresh`` is false); its
    numbers and the emulator's."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    emu = Emulator(collections, base, cost)
    cmd = [PY, "-m", "skyscript_build.cli", "fetch", "--requests", str(requests), "--out", str(out)]
    cmd += ["--backend", "earthengine", "--ee-url", emu.url, "--project", "bench"]
    cmd += ["--blocks", mode, "--block-overhead-ms", str(max(base, 1.0))]
    cmd += ["--block-ms-per-mpx", str(cost), *extra]
    env = {**os.environ, "SKYSCRIPT_NO_PROGRESS": "1"}
    try:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        stdout_b, stderr_b = proc.communicate()
    finally:
        stats = emu.stop()
    stdout, stderr = stdout_b.decode(), stderr_b.decode()
    match = re.search(r"fetch: (\d+) ok.*?(\d+) tiles fetched .*? in ([\d.]+)s", stdout)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"fetch failed:\n{stdout}\n{stderr[-3000:]}")
    ok, fetched, seconds = int(match.group(1)), int(match.group(2)), float(match.group(3))
    cpu = _children_cpu()
    requests_by = stats.get("requests", {})
    return {
        "ok": ok,
        "tiles": fetched,
        "seconds": seconds,
        "tiles_per_s": fetched / seconds,
        "pixels": sum(n for k, n in requests_by.items() if k.startswith("image:computePixels")),
        "lookups": sum(n for k, n in requests_by.items() if k.startswith("value:compute")),
        "bytes": sum(stats.get("bytes_sent", {}).values()),
        "cpu_ms_per_tile": 1000 * cpu / max(fetched, 1),
    }


_CPU_SEEN = [0.0]


def _children_cpu() -> float:
    """CPU seconds of the children waited for since the last call: a fetch and its emulator."""
    usage = os.times()
    total = usage.children_user + usage.children_system
    spent, _CPU_SEEN[0] = total - _CPU_SEEN[0], total
    return spent


def check_cost(dataset: Path) -> dict:
    """What fetch's check of earlier work costs per manifest part and per file, in this
    process, one thread: read every part's check columns, then ``FilesWriter.all_present``
    (a stat per file, relative to its open folder), as ``fetch._still_done`` does."""
    import pyarrow.compute as pc

    from skyscript_build.fetch._writer import FilesWriter
    from skyscript_build.fetch.stage import CHECK_COLUMNS

    parts = sorted((dataset / "manifest").glob("part-*.parquet"))
    for _ in range(2):  # the second round: without the first call's start-up (arrow's kernels)
        t0 = time.perf_counter()
        tables = [pq.ParquetFile(p).read(columns=CHECK_COLUMNS) for p in parts]
        oks = [t.filter(pc.equal(t["status"], "ok")) for t in tables]
        read_s = time.perf_counter() - t0
    writer = FilesWriter(dataset, 6)
    t0 = time.perf_counter()
    for ok in oks:
        keys, sizes = ok["key"].to_pylist(), ok["bytes"].to_pylist()
        assert writer.all_present(keys, sizes, ok["meta_bytes"].to_pylist())
    stat_s = time.perf_counter() - t0
    files = 2 * sum(len(ok) for ok in oks)
    return {"ms_per_part": 1000 * read_s / len(parts), "us_per_file": 1e6 * stat_s / files}


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "manifest" not in p.parts
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the goal point on the demo")
    parser.add_argument(
        "--sample", type=int, default=4000, help="tiles of the 10x10 tiling fetched both ways"
    )
    args = parser.parse_args()
    if not ORTHO.exists():
        raise SystemExit(f"{ORTHO}: missing; run `make demo-data` first")
    OUT.mkdir(parents=True, exist_ok=True)
    demo = planned(PBF, OUT / "demo")
    demo_collections = DEMO_DATA / "collections.yaml"
    runs: list[tuple[str, float, float, dict, dict]] = []

    def compare(name: str, requests: Path, collections: Path, base: float, cost: float) -> None:
        out = {m: OUT / "datasets" / m for m in ("off", "auto")}
        got = {m: fetch(requests, collections, out[m], m, base, cost) for m in ("off", "auto")}
        same = digest(out["off"]) == digest(out["auto"])
        got["auto"]["identical"] = got["off"]["identical"] = same
        runs.append((name, base, cost, got["off"], got["auto"]))
        print(name, base, cost, json.dumps(got), flush=True)

    compare("demo", demo, demo_collections, 500, 50)
    # A rerun of the finished dataset: every file checked (one stat each), nothing fetched.
    done = OUT / "datasets" / "auto"
    files = sum(1 for p in done.rglob("*") if p.is_file() and "manifest" not in p.parts)
    checks = {
        label: fetch(demo, demo_collections, done, "auto", 0, 0, *flag, fresh=False)
        for label, flag in (("stat", ()), ("verify", ("--verify",)))
    }
    check = check_cost(done)
    if not args.quick:
        for cost in (0, 50, 200):
            compare("demo", demo, demo_collections, 300, cost)
        k10 = planned(k10_pbf(), OUT / "k10")
        sample = k10_sample(k10, OUT / "k10-sample", args.sample)
        name = f"10x10, first {args.sample:,} of part 0"
        compare(name, sample, k10_collections(OUT / "k10-imagery"), 500, 50)
    shutil.rmtree(OUT / "datasets", ignore_errors=True)

    rows = []
    for name, base, cost, off, auto in runs:
        rows.append(
            f"| {name} | {base:g} + {cost:g} | {off['tiles']} | "
            f"{off['pixels']} + {off['lookups']} | {auto['pixels']} + {auto['lookups']} | "
            f"{(off['pixels'] + off['lookups']) / (auto['pixels'] + auto['lookups']):.0f}x | "
            f"{off['bytes'] / 2**20:.0f} / {auto['bytes'] / 2**20:.0f} | "
            f"{off['tiles_per_s']:.1f} / {auto['tiles_per_s']:.1f} | "
            f"**{auto['tiles_per_s'] / off['tiles_per_s']:.1f}x** | "
            f"{off['cpu_ms_per_tile']:.1f} / {auto['cpu_ms_per_tile']:.1f} | "
            f"{'yes' if auto['identical'] else 'NO'} |"
        )
    goal = runs[0]
    fewer = (goal[3]["pixels"] + goal[3]["lookups"]) / (goal[4]["pixels"] + goal[4]["lookups"])
    faster = goal[4]["tiles_per_s"] / goal[3]["tiles_per_s"]
    met = fewer >= 10 and faster >= 5 and goal[4]["identical"]
    lines = [
        "Per tile (`--blocks off`) against blocks (`--blocks auto`, the planner given the same "
        "latency model as the emulator) in one run: each fetch a `skyscript-build fetch` "
        "subprocess (one process, threads, 40 requests in flight), each against its own "
        "`skyscript-build emulator` process answering after BASE + COST x megapixels. "
        "Requests: computePixels + value:compute (image lookups, one per shard of 200, and the "
        "settings probe). MiB: answer bodies sent by the emulator (NPY pixels, lossless). "
        "CPU: the fetch process and the emulator's, over the tiles (both on these 2 cores). "
        "Identical: every JPEG and pickle byte-identical between the two ways.",
        "",
        "| requests | latency ms + ms/Mpx | tiles | requests per tile | requests in blocks | "
        "fewer | MiB per tile / blocks | tiles/s per tile / blocks | faster | CPU ms/tile "
        "per tile / blocks | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Goal (demo, 500 ms + 50 ms/Mpx): >= 10x fewer requests ({fewer:.0f}x) and >= 5x the "
        f"tiles/s ({faster:.1f}x) with identical pixels: **{'met' if met else 'NOT met'}**.",
    ]
    stat_s, verify_s = checks["stat"]["seconds"], checks["verify"]["seconds"]
    lines += [
        "",
        f"A rerun of the finished demo dataset ({files:,} files, nothing to fetch): "
        f"{stat_s:.1f} s in all with one stat per file, {verify_s:.1f} s with `--verify` "
        "(every JPEG decoded, every pickle loaded); both include the client start and the "
        f"settings probe. Measured alone (one thread, warm page cache): "
        f"{check['ms_per_part']:.2f} ms to read a manifest part, {check['us_per_file']:.1f} µs "
        "per file checked; so SkyScript's 5.2 M tiles (26,000 shards of 200, 10.4 M files) "
        f"take about {26_000 * check['ms_per_part'] / 1000 + 10.4e6 * check['us_per_file'] / 1e6:.0f}"
        " s on one thread (fetch checks 8 shards at once).",
    ]
    if not args.quick:
        counts = plan_counts(OUT / "k10" / "requests", 200, 500, 50)
        demo_counts = plan_counts(demo, 200, 500, 50)
        lines += ["", "Whole plans, counted by the planner alone (500 ms + 50 ms/Mpx):", ""]
        lines += [
            "| plan | tiles | Mpx per tile | requests in blocks | Mpx in blocks | "
            "fewer requests | fewer Mpx | break-even ms/Mpx |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, c in (("demo", demo_counts), ("10x10 tiling", counts)):
            more_px = c["mpx"] - c["mpx_tiles"]
            even = (
                f"{500 * (c['tiles'] - c['requests']) / more_px:.0f}"
                if more_px > 0
                else "none (blocks move fewer pixels)"
            )
            lines.append(
                f"| {name} | {c['tiles']:,} | {c['mpx_tiles']:,.0f} | {c['requests']:,} | "
                f"{c['mpx']:,.0f} | {c['tiles'] / c['requests']:.0f}x | "
                f"{c['mpx_tiles'] / c['mpx']:.1f}x | {even} |"
            )
        sweep = [r for r in runs if r[0] == "demo" and r[1] == 300]
        lines += [
            "",
            "Break-even: blocks lose only where COST > BASE x (R_t - R_b) / (P_b - P_t); on "
            "these plans blocks move fewer pixels than per-tile requests, so they win at every "
            "per-megapixel cost (the sweep at 300 ms: "
            + ", ".join(
                f"{r[2]:g} ms/Mpx {r[4]['tiles_per_s'] / r[3]['tiles_per_s']:.1f}x" for r in sweep
            )
            + " the tiles/s). Where tiles are sparse (farther apart than a request's overhead buys in "
            "pixels) the planner leaves them single, so blocks never cost more than per-tile "
            "requests when the cost model matches the service.",
        ]
    load = os.getloadavg()
    lines += [
        "",
        f"Load average at the end (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, "
        f"{load[2]:.1f} on 2 cores shared with other jobs: compare the ratios.",
    ]
    body = "\n".join(lines)
    print(body)
    record("fetch", "fetch: a request per tile against block requests (bench/bench_fetch.py)", body)


if __name__ == "__main__":
    main()
