"""Benchmark of the plan stage: objects/s and peak RSS, against a naive per-object loop.

Objects: the extract stage's output for the 10 x 10 Helsinki tiling
(bench/data/helsinki_10x10.osm.pbf, made by shared/bench/tile_pbf.py) when extract runs; else
a seeded synthetic set of the same size and mix (about 880 K objects: the 8.8 K groundable
objects of the Helsinki extract times 100), said so in the results.

Ours: ``run_plan`` on all objects in a fresh process: choice, framing and the surroundings
(wall on 2 threads, the partitions' writing switched off; median of 3), then end to end on 2
threads, 1 thread and 2 Dask workers. Peer: the same rules written the obvious way, one
object at a time (shapely per geometry, pyproj per object, STRtree.query per tile, the tag
filter per neighbour), run on a seeded sample of the same objects. Both in one run; the ratio is
what counts. Peak RSS of each process (ru_maxrss); ours also at 1/10 of the input.

Usage: python bench/bench_plan.py [--sample 3000] [--synthetic]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _results import record  # noqa: E402

OUT = HERE / "out" / "plan"
PBF = HERE / "data" / "helsinki_10x10.osm.pbf"
TILER = REPO.parent / "shared" / "bench" / "tile_pbf.py"
# The Helsinki extract: its bounds, and its groundable objects by type (counted with pyosmium).
HELSINKI = (24.9352, 60.1642, 24.9534, 60.1791)
PER_COPY = {"n": 4042, "w": 4670, "r": 100}
POINT_TAGS = [
    ("natural", "tree", 0.5),
    ("highway", "street_lamp", 0.15),
    ("highway", "crossing", 0.1),
    ("amenity", "bench", 0.1),
    ("barrier", "bollard", 0.1),
    ("amenity", "waste_basket", 0.05),
]
AREA_TAGS = [
    ("landuse", "grass", 0.3),
    ("leisure", "park", 0.2),
    ("amenity", "parking", 0.2),
    ("landuse", "residential", 0.15),
    ("leisure", "playground", 0.1),
    ("natural", "water", 0.05),
]
LINE_TAGS = [
    ("highway", "footway", 0.4),
    ("highway", "residential", 0.2),
    ("highway", "service", 0.2),
    ("highway", "cycleway", 0.1),
    ("barrier", "fence", 0.1),
]


def synthetic_objects(folder: Path, copies: int = 10, seed: int = 0) -> int:
    """Write a seeded synthetic objects set like the copies x copies Helsinki tiling."""
    from tag_filters import load_tag_filter

    rng = np.random.default_rng(seed)
    tf = load_tag_filter("default")
    w0, s0, e0, n0 = HELSINKI
    dx, dy = (e0 - w0) * 1.05, (n0 - s0) * 1.05
    m_lon = 1 / (111_320 * np.cos(np.radians(60.17)))
    m_lat = 1 / 110_574
    rows_type, rows_el, geoms, tags = [], [], [], []
    for cy in range(copies):
        for cx in range(copies):
            west, south = w0 + cx * dx, s0 + cy * dy

            def xy(n, west=west, south=south):
                return west + rng.uniform(0, e0 - w0, n), south + rng.uniform(0, n0 - s0, n)

            n_pts = PER_COPY["n"]
            x, y = xy(n_pts)
            geoms.append(shapely.points(x, y))
            tags += _pick(rng, POINT_TAGS, n_pts)
            rows_type += ["n"] * n_pts
            rows_el += ["node"] * n_pts
            n_bld = int(PER_COPY["w"] * 0.6)
            x, y = xy(n_bld)
            size = rng.uniform(8, 45, n_bld)
            geoms.append(shapely.box(x, y, x + size * m_lon, y + size * 0.8 * m_lat))
            tags += [{"building": "yes"}] * n_bld
            rows_type += ["a"] * n_bld
            rows_el += ["way"] * n_bld
            n_line = int(PER_COPY["w"] * 0.3)
            x, y = xy(n_line)
            k = 5
            steps = rng.normal(0, 30, (n_line, k, 2)).cumsum(axis=1)
            coords = np.stack(
                [x[:, None] + steps[..., 0] * m_lon, y[:, None] + steps[..., 1] * m_lat], -1
            )
            geoms.append(
                shapely.linestrings(coords.reshape(-1, 2), indices=np.repeat(np.arange(n_line), k))
            )
            tags += _pick(rng, LINE_TAGS, n_line)
            rows_type += ["w"] * n_line
            rows_el += ["way"] * n_line
            n_area = PER_COPY["w"] - n_bld - n_line + PER_COPY["r"]
            x, y = xy(n_area)
            size = rng.uniform(30, 400, n_area)
            geoms.append(shapely.box(x, y, x + size * m_lon, y + size * 0.7 * m_lat))
            tags += _pick(rng, AREA_TAGS, n_area)
            rows_type += ["a"] * n_area
            rows_el += ["way"] * (n_area - PER_COPY["r"]) + ["relation"] * PER_COPY["r"]
    geometry = np.concatenate(geoms)
    n = len(geometry)
    gsd: dict[tuple, float] = {}
    max_gsd = np.array([gsd.setdefault(tuple(t.items()), tf.max_gsd(t) or 10.0) for t in tags])
    table = pa.table(
        {
            "osm_type": pa.array(rows_type),
            "osm_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
            "osm_element": pa.array(rows_el),
            "tags": pa.array(
                [list(t.items()) for t in tags], type=pa.map_(pa.string(), pa.string())
            ),
            "max_gsd": pa.array(max_gsd),
            "geometry": pa.array(shapely.to_wkb(geometry), type=pa.binary()),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    per = 250_000
    for k in range(0, n, per):
        pq.write_table(table.slice(k, per), folder / f"part-{k // per:05d}.parquet")
    return n


def _pick(rng, table, n):
    probs = np.array([p for *_, p in table])
    choice = rng.choice(len(table), size=n, p=probs / probs.sum())
    dicts = [{k: v} for k, v, _ in table]
    return [dicts[c] for c in choice]


def extracted_objects(folder: Path) -> bool:
    """Run the extract stage on the 10x10 tiling in a subprocess; False when it cannot."""
    if list(folder.glob("part-*.parquet")):
        return True
    if not PBF.exists() and TILER.exists():
        subprocess.run(
            [sys.executable, str(TILER), str(REPO / "data" / "helsinki.osm.pbf"), str(PBF), "10"],
            check=False,
        )
    if not PBF.exists():
        return False
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from skyscript_build.extract import ExtractConfig, run_extract
        run_extract(ExtractConfig(input=Path({str(PBF)!r}), out=Path({str(folder)!r}), workers=2))
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=1200
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0 and bool(list(folder.glob("part-*.parquet")))


OURS = """
import json, resource, sys, threading, time
from pathlib import Path
import psutil
peak = [0]
def sample():  # peak RSS of this process and its children (Dask workers) together
    me = psutil.Process()
    while True:
        try:
            procs = [me, *me.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
objects, out, limit, cap = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
workers, mode = int(sys.argv[5]), sys.argv[6]
if mode == "no-write":
    # Choice, framing and surroundings alone: the partitions skip the parquet parts.
    import skyscript_build.plan._partition as partition
    partition.write_parts = lambda *a, **k: []
from skyscript_build.plan import PlanConfig, run_plan
if limit:
    import pyarrow.parquet as pq
    parts = sorted(objects.glob("part-*.parquet"))
    sub = out.parent / (out.name + "-objects")
    sub.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(parts[0]).slice(0, limit), sub / "part-00000.parquet")
    objects = sub
import shutil
shutil.rmtree(out, ignore_errors=True)
scheduler, cluster = None, None
if mode == "dask":
    from distributed import LocalCluster
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    scheduler = cluster.scheduler_address
wall = time.perf_counter()
r = run_plan(PlanConfig(objects=objects, out=out, seed=0, max_surrounding=cap, workers=workers,
                        scheduler=scheduler))
wall = time.perf_counter() - wall
if cluster is not None:
    cluster.close()
print(json.dumps({"objects": r.objects, "requests": r.requests, "surrounding": r.surrounding,
                  "timings": r.timings, "skipped": r.skipped, "by_source": list(r.by_source),
                  "partitions": r.partitions, "scan_tasks": r.scan_tasks,
                  "wall": wall,
                  "rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_mb": max(peak[0] / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""

PEER = """
import hashlib, json, resource, sys, time
from pathlib import Path
import numpy as np, pyarrow.parquet as pq, shapely, shapely.ops
from pyproj import Transformer
import image_sources
from tag_filters import load_tag_filter

objects, sample = Path(sys.argv[1]), int(sys.argv[2])
seed, min_px, max_px, point_px, margin, shift, cap = 0, 256, 1024, 512, 0.1, 0.8, 50
table = pq.read_table(sorted(objects.glob("part-*.parquet")))
types = table["osm_type"].to_pylist(); ids = table["osm_id"].to_pylist()
tags = [dict(t) for t in table["tags"].to_pylist()]; max_gsd = table["max_gsd"].to_pylist()
geoms = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
sources = [image_sources.get_source(a) for a in image_sources.list_sources()]
for s in sources:
    shapely.prepare(s.coverage)
tf = load_tag_filter("default")
tree = shapely.STRtree(geoms)
cache = {}
def tr(epsg, inverse=False):
    if (epsg, inverse) not in cache:
        cache[epsg, inverse] = Transformer.from_crs(*((epsg, 4326) if inverse else (4326, epsg)), always_xy=True)
    return cache[epsg, inverse]
def rand(*parts):
    d = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2**64
rng = np.random.default_rng(1)
todo = rng.choice(len(geoms), size=min(sample, len(geoms)), replace=False)
t0 = time.process_time(); n_req = n_sur = 0
for i in todo:
    g = geoms[i]
    for s in sources:
        if not s.is_global and not s.coverage.contains(g):
            continue
        if s.gsd > max_gsd[i]:
            continue
        c = g.centroid
        epsg = int(s.crs[5:]) if s.crs else (32600 if c.y >= 0 else 32700) + int((c.x + 180) // 6) + 1
        pg = shapely.ops.transform(tr(epsg).transform, g)
        x0, y0, x1, y1 = pg.bounds
        extent = max(x1 - x0, y1 - y0)
        floor = point_px if types[i] != "a" else min_px
        px = max(int(np.ceil(extent * (1 + 2 * margin) / s.gsd)), floor)
        if px <= max_px:
            break
    else:
        continue
    side = px * s.gsd
    bx0 = x0 - (side - (x1 - x0)) * (0.5 + shift * (rand(seed, types[i], ids[i], "x") - 0.5))
    by0 = y0 - (side - (y1 - y0)) * (0.5 + shift * (rand(seed, types[i], ids[i], "y") - 0.5))
    lon, lat = tr(epsg, True).transform([bx0, bx0 + side, bx0 + side, bx0], [by0, by0, by0 + side, by0 + side])
    center = tf.groundable_tags(tags[i], s.gsd)
    around = []
    for j in tree.query(shapely.box(min(lon), min(lat), max(lon), max(lat))):
        if j == i:
            continue
        visible = tf.groundable_tags(tags[j], s.gsd)
        if not visible:
            continue
        a0, b0, a1, b1 = shapely.ops.transform(tr(epsg).transform, geoms[j]).bounds
        if a0 >= bx0 and b0 >= by0 and a1 <= bx0 + side and b1 <= by0 + side:
            around.append(visible)
    around = around[:cap]
    n_req += 1; n_sur += len(around)
dt = time.process_time() - t0
print(json.dumps({"objects": len(todo), "requests": n_req, "surrounding": n_sur, "seconds": dt,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cores_available(seconds: float = 3.0) -> float:
    """CPU seconds per wall second two numpy threads get now (2.0 on two idle cores).

    Each thread sorts its own arrays (numpy releases the GIL while sorting), so the figure
    says how much of the 2 cores the other processes on the machine leave to us.
    """
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    data = [rng.random(2_000_000) for _ in range(2)]
    stop = time.perf_counter() + seconds

    def work(a: np.ndarray) -> int:
        n = 0
        while time.perf_counter() < stop:
            np.sort(a)
            n += 1
        return n

    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, data))
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def run_json(code: str, *args: object) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "SKYSCRIPT_NO_PROGRESS": "1"},
    )  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=3000, help="objects the naive peer plans")
    parser.add_argument("--synthetic", action="store_true", help="skip extract, use synthetic")
    args = parser.parse_args()
    objects = OUT / "objects"
    t0 = time.perf_counter()
    real = not args.synthetic and extracted_objects(objects)
    if real:
        origin = "the extract stage's objects of bench/data/helsinki_10x10.osm.pbf"
    else:
        objects = OUT / "objects-synthetic"
        if not list(objects.glob("part-*.parquet")):
            synthetic_objects(objects)
        origin = (
            "a SYNTHETIC seeded set shaped like the 10x10 Helsinki tiling (extract's objects "
            "were not available): 100 copies of the extract's 4,042 points, 4,670 ways, "
            "100 relations, random geometry"
        )
    print(f"objects ready ({time.perf_counter() - t0:.0f} s): {origin}", flush=True)

    load_before = os.getloadavg()
    cores_before = cores_available()
    phases = "scan", "partitions", "surround+write"
    no_write = [
        run_json(OURS, objects, OUT / "requests-nw", 0, 50, 2, "no-write") for _ in range(3)
    ]
    no_write.sort(key=lambda r: sum(r["timings"][k] for k in phases))
    walls = [sum(r["timings"][k] for k in phases) for r in no_write]
    n = no_write[0]["objects"]
    rate_median, rate_best = n / walls[1], n / walls[0]
    print(f"ours, no writing, 2 threads: {walls} s -> {rate_median:,.0f}/s", flush=True)
    one_nw = run_json(OURS, objects, OUT / "requests-nw", 0, 50, 1, "no-write")
    ours = run_json(OURS, objects, OUT / "requests", 0, 50, 2, "full")
    print("ours, 2 threads:", json.dumps(ours), flush=True)
    one = run_json(OURS, objects, OUT / "requests-1", 0, 50, 1, "full")
    print("ours, 1 thread:", json.dumps(one), flush=True)
    dask = run_json(OURS, objects, OUT / "requests-dask", 0, 50, 2, "dask")
    print("ours, 2 Dask workers:", json.dumps(dask), flush=True)

    def parts(name: str) -> list[bytes]:
        return [p.read_bytes() for p in sorted((OUT / name).glob("part-*.parquet"))]

    same = parts("requests") == parts("requests-1") == parts("requests-dask")

    def cpu_rate(run: dict) -> float:
        tt = run["timings"]
        return run["objects"] / (tt["cpu_scan"] + tt["cpu_partitions"] + tt["cpu_surround+write"])

    rate_cpu = cpu_rate(one_nw)
    t, t1 = ours["timings"], one["timings"]
    small = run_json(OURS, objects, OUT / "requests-tenth", n // 10, 50, 2, "full")
    peer = run_json(PEER, objects, args.sample)
    peer_rate = peer["objects"] / peer["seconds"]
    print("peer:", json.dumps(peer), flush=True)
    load_after = os.getloadavg()
    cores = f"{cores_before:.1f} of the 2 cores before ours, {cores_available():.1f} after the peer"
    pairs = ours["surrounding"] / max(1, ours["requests"])
    load = ", ".join(f"{x:.1f}" for x in (*load_before, *load_after))
    body = f"""
Objects: {n:,} — {origin}.
All sources of the catalog (the objects are in Finland: FI at 0.5 m, S2 for areas too large
for a 1024 px FI tile); seed 0; defaults (256-1024 px, points 512 px, at most 50 surrounding
objects): {ours["requests"]:,} requests with {ours["surrounding"]:,} surrounding objects
({pairs:.0f} per tile). Load average (1, 5, 15 min) before and after the benchmark {load}; two
numpy threads sorting got {cores}. The peer is a per-object Python loop (shapely per geometry,
pyproj per object, STRtree.query per tile, the tag filter per neighbour) on
{peer["objects"]:,} sampled objects, CPU time. Wall-clock figures on this shared 2-core
machine vary from run to run; compare the ratios.

| run | objects/s | peak RSS |
|---|---|---|
| choice + framing + surroundings (no parts written), 2 threads, wall (median of 3) | **{rate_median:,.0f}** | {no_write[1]["rss_mb"]:,.0f} MB |
| the same, best of 3 | {rate_best:,.0f} | |
| the same, 1 thread, per CPU second | {rate_cpu:,.0f} | |
| end to end (read, plan, write the parts), 2 threads, wall | {n / ours["wall"]:,.0f} | {ours["rss_mb"]:,.0f} MB |
| end to end, 1 thread, wall | {n / one["wall"]:,.0f} | {one["rss_mb"]:,.0f} MB |
| end to end, 2 Dask workers (LocalCluster, `scheduler=`), wall incl. its start | {n / dask["wall"]:,.0f} | {dask["rss_mb"]:,.0f} MB |
| naive per-object loop (peer), per CPU second | {peer_rate:,.0f} | {peer["rss_mb"]:,.0f} MB |
| ratio ours / peer, per CPU second | **{rate_cpu / peer_rate:,.0f}x** | |

End to end on 2 threads, wall s (CPU s of the process): scan {t["scan"]:.1f}
({t["cpu_scan"]:.1f}), partitions {t["surround+write"]:.1f} ({t["cpu_surround+write"]:.1f});
the partitions' own CPU s: read, decide, frame and halo {t["partitions_cpu_frame"]:.1f},
surroundings {t["partitions_cpu_surround"]:.1f}, build + write the parts
{t["partitions_cpu_write"]:.1f}. On 1 thread, CPU s: scan {t1["scan_cpu"]:.1f}, partitions
{t1["partitions_cpu_frame"]:.1f} + {t1["partitions_cpu_surround"]:.1f} +
{t1["partitions_cpu_write"]:.1f}. {ours["partitions"]} partitions, {ours["scan_tasks"]} scan
tasks. Parts on 2 threads, 1 thread and 2 Dask workers byte-identical:
{"yes" if same else "NO"}.

Memory: peak RSS {small["rss_mb"]:,.0f} MB at 1/10 of the objects ({small["objects"]:,}),
{ours["rss_mb"]:,.0f} MB at all of them: the tasks' sizes set it (scan units of whole row
groups, partitions of at most `--partition-objects` objects), not the input. `make
bench-scale` measures it at the 10x10 and 20x20 tilings against osmium-tool.
"""
    print(body)
    record("plan", "plan: objects/s and peak RSS (vs a naive per-object loop)", body)


if __name__ == "__main__":
    main()
