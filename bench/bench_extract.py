"""Benchmark the extract stage against osmium-tool, side by side in one run.

Data: the bundled Helsinki extract (1x) and its 10x10 tiling (100x, about 2.4 M nodes), made
with the shared ``tile_pbf.py`` into bench/data/ (cached).

Peer: ``osmium tags-filter`` with the same keys (every key that can make a tag groundable in the
default table, ``nwr/KEY``) writing a PBF, then ``osmium export`` of that PBF to GeoJSON
sequence: the C++ command-line way to get tagged features with geometries. It writes more
features than we do (every tagged object of the filtered file, and both a line and an area for
some closed ways), while we also judge values and write GeoParquet; so both objects/s and the
wall time for the same input are reported.

Ours: ``skyscript-build extract FILE --out DIR --workers 2 --force`` as a subprocess, so start-up
counts. Runs alternate, ``--rounds`` each, best kept. The machine's cores are shared with
other jobs, so only ratios measured in the same run mean something; CPU seconds (user + system
of the process tree) are reported too, as they depend less on other jobs. Peak memory is the
peak of the sum of PSS (proportional set size: pages shared between the parent and its forked
workers count once) over the process tree, sampled every 20 ms with psutil.

    python bench/bench_extract.py [--rounds 2] [--tiles 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _results import record  # noqa: E402

DATA = HERE / "data"
OUT = HERE / "out" / "extract"
SOURCE = REPO / "data" / "helsinki.osm.pbf"
CLI = [sys.executable, "-m", "skyscript_build.cli"]


def tile_script() -> Path:
    """The shared tiling script: /work/shared/bench here, ../shared/bench beside a checkout."""
    for base in (REPO.parent / "shared", Path("/work/shared")):
        script = base / "bench" / "tile_pbf.py"
        if script.exists():
            return script
    sys.exit(
        "bench_extract: shared/bench/tile_pbf.py not found (expected ../shared beside the repo)"
    )


def tiled(k: int) -> Path:
    """The k x k tiling of the Helsinki extract (cached in bench/data/)."""
    if k == 1:
        return SOURCE
    path = DATA / f"helsinki_{k}x{k}.osm.pbf"
    if not path.exists() or path.stat().st_mtime < SOURCE.stat().st_mtime:
        DATA.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.pbf")
        print(f"making {path.name} (once; a few minutes)", file=sys.stderr)
        subprocess.run(
            [sys.executable, str(tile_script()), str(SOURCE), str(tmp), str(k)], check=True
        )
        tmp.replace(path)
    return path


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """Run ``cmd``; return (seconds, peak PSS MiB over its process tree, CPU seconds)."""
    cpu0 = _children_cpu()
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    peak = 0
    while proc.poll() is None:
        total = 0
        with_children = [proc]
        with contextlib.suppress(psutil.Error):
            with_children += proc.children(recursive=True)
        for p in with_children:
            with contextlib.suppress(psutil.Error):
                # PSS: a page shared by the parent and its forked workers counts once.
                total += p.memory_full_info().pss
        peak = max(peak, total)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench_extract: {' '.join(cmd)} failed:\n{proc.stderr.read().decode()}")
    return seconds, peak / 2**20, _children_cpu() - cpu0


def candidate_keys() -> list[str]:
    from tag_filters import load_tag_filter

    keys = load_tag_filter("default").candidate_keys()
    assert keys is not None
    return sorted(keys)


def run_ours(pbf: Path, workers: int, extra: list[str] | None = None) -> dict:
    out = OUT / f"ours_{pbf.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*CLI, "-q", "extract", str(pbf), "--out", str(out), "--workers", str(workers)]
    seconds, rss, cpu = measure(cmd + (extra or []))
    objects = json.loads((out / "_extract.json").read_text())["objects"]
    return {"seconds": seconds, "rss": rss, "cpu": cpu, "objects": objects}


def run_peer(pbf: Path, keys: list[str]) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    filtered = OUT / f"peer_{pbf.stem}.filtered.osm.pbf"
    geojson = OUT / f"peer_{pbf.stem}.geojsonseq"
    script = (
        f"osmium tags-filter -O -o {filtered} {pbf} {' '.join('nwr/' + k for k in keys)} && "
        f"osmium export -O -f geojsonseq -o {geojson} {filtered}"
    )
    seconds, rss, cpu = measure(["bash", "-c", script])
    with open(geojson, "rb") as f:
        objects = sum(1 for _ in f)
    return {"seconds": seconds, "rss": rss, "cpu": cpu, "objects": objects}


def best(runs: list[dict]) -> dict:
    top = min(runs, key=lambda r: r["seconds"])
    return {**top, "rss": max(r["rss"] for r in runs), "cpu": min(r["cpu"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiles", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("osmium"):
        sys.exit("bench_extract: osmium-tool is missing (make bench-extract installs it)")
    keys = candidate_keys()
    files = {1: tiled(1), args.tiles * args.tiles: tiled(args.tiles)}
    load_before = os.getloadavg()
    results: dict[tuple[str, int], dict] = {}
    for scale, pbf in files.items():
        pbf.read_bytes()  # warm the page cache
        ours, peer = [], []
        for _ in range(args.rounds):
            ours.append(run_ours(pbf, args.workers))
            peer.append(run_peer(pbf, keys))
        results[("ours", scale)] = best(ours)
        results[("peer", scale)] = best(peer)
        if scale > 1:
            results[("ours-1", scale)] = best([run_ours(pbf, 1)])
            results[("ours-disk", scale)] = best(
                [run_ours(pbf, args.workers, ["--location-index", "sparse_file_array"])]
            )
    load = os.getloadavg()
    big = args.tiles * args.tiles
    rows = [
        ("ours", f"skyscript-build extract --workers {args.workers}"),
        ("ours-1", "skyscript-build extract --workers 1"),
        ("ours-disk", f"ours, --workers {args.workers}, node index on disk (sparse_file_array)"),
        ("peer", "osmium tags-filter + osmium export (geojsonseq)"),
    ]
    lines = [
        f"Input: data/helsinki.osm.pbf (1x, {files[1].stat().st_size / 2**20:.1f} MiB) and its "
        f"{args.tiles}x{args.tiles} tiling ({big}x, {files[big].stat().st_size / 2**20:.1f} MiB); "
        f"{len(keys)} keys. Best of {args.rounds} alternating rounds; load average (1, 5, 15 min) "
        f"before {', '.join(f'{x:.1f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} cores (shared machine: "
        "compare ratios measured in the same run, not times).",
        "",
        f"| {big}x input | objects | wall s | objects/s | CPU s | peak PSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in rows:
        r = results.get((key, big))
        if r:
            lines.append(
                f"| {label} | {r['objects']} | {r['seconds']:.1f} | "
                f"{r['objects'] / r['seconds']:,.0f} | {r['cpu']:.1f} | {r['rss']:.0f} |"
            )
    o, p = results[("ours", big)], results[("peer", big)]
    o1, p1 = results[("ours", 1)], results[("peer", 1)]
    lines += [
        "",
        f"Ratio ours / osmium-tool at {big}x: objects/s "
        f"{(o['objects'] / o['seconds']) / (p['objects'] / p['seconds']):.2f}, "
        f"wall time {o['seconds'] / p['seconds']:.2f} (below 1 = we are faster), "
        f"CPU seconds {o['cpu'] / p['cpu']:.2f}.",
        "",
        "Peak PSS, 1x -> {}x: ours {:.0f} -> {:.0f} MiB, osmium-tool {:.0f} -> {:.0f} MiB "
        "(1x wall: ours {:.1f} s, osmium-tool {:.1f} s).".format(
            big, o1["rss"], o["rss"], p1["rss"], p["rss"], o1["seconds"], p1["seconds"]
        ),
    ]
    # Both read the same file, so input objects/s compare as the inverse of the wall times. The
    # output counts differ: osmium-tool writes every feature with one of the keys (whatever the
    # value) and some closed ways both as a line and as an area; we keep groundable objects only.
    met = o["seconds"] <= p["seconds"]
    lines += [
        "",
        f"Goal (at least osmium-tool's speed on the same file and keys, i.e. input objects/s = "
        f"1 / wall time, using both cores): {'met' if met else 'NOT met'} "
        f"({p['seconds'] / o['seconds']:.2f}x osmium-tool's input objects/s). Output objects/s "
        f"compare at {(o['objects'] / o['seconds']) / (p['objects'] / p['seconds']):.2f} because "
        f"osmium-tool writes {p['objects'] / o['objects']:.2f}x as many features (every feature "
        "with one of the keys whatever its value, some closed ways as both line and area). "
        "Our CPU seconds are the steadier measure on this shared machine. Two shards of about "
        "equal CPU time: points + lines (decoded in bulk with numpy straight from the PBF: "
        "node locations and tagged nodes from the DenseNodes blocks, Way messages parsed a "
        "whole group at a time, tags judged once per string pair of a block; no Python object "
        "per node or way) and areas (osmium's area assembly through pyosmium, the larger "
        "shard now), so with two free cores the wall time approaches the larger shard's CPU "
        "time. With the node index on disk (big inputs) our node locations go to memory-mapped "
        "temporary files too. "
        "osmium-tool's peak RSS depends on the id range, not the file size (its id sets): the "
        "1x file has OSM's real 12-digit ids, the tiling renumbers them densely. Ours is the "
        "sum over the parent and two forked workers (libraries loaded once per process); it "
        "grows from 1x to 100x by the 10,000-row batches (which a 0.7 MiB file never fills) "
        "and the in-memory node index (past 256 MiB of input the index goes to a file).",
    ]
    body = "\n".join(lines)
    print(body)
    record("extract", "extract: skyscript-build extract vs osmium tags-filter + export", body)


if __name__ == "__main__":
    main()
