"""Benchmark the extract stage against osmium-tool, side by side in one run, at two scales.

Data: the 10x10 and 20x20 tilings of the bundled Helsinki extract (0.8 M and 3.2 M groundable
objects), made once by the shared ``tile_pbf.py`` into the cache folder beside the checkout
(``../cache/k10.osm.pbf``, ``../cache/k20.osm.pbf``; never inside the repo).

Peer: ``osmium tags-filter`` with the same keys (every key that can make a tag groundable in the
default table, ``nwr/KEY``) writing a PBF, then ``osmium export`` of that PBF to GeoJSON
sequence: the C++ command-line way to get tagged features with geometries. It writes more
features than we do (every tagged object of the filtered file, and both a line and an area for
some closed ways), while we also judge values and write GeoParquet; so both read the same file
and the wall times compare.

Ours: ``skyscript-build extract FILE --out DIR --workers 2`` as a subprocess, so start-up
counts. Runs alternate, ``--rounds`` each, best kept. The machine's cores are shared with
other jobs, so only ratios measured in the same run mean something; CPU seconds (user + system
of the process tree) are reported too, as they depend less on other jobs.

Memory (``measure``), sampled every 20 ms with psutil over the process tree: the peak RSS of
each process (the largest reported), the peak of the sum of RSS over the tree, and the peak of
the sum of PSS (proportional set size: pages shared between the parent and its forked workers
count once).

    python bench/bench_extract.py [--rounds 2] [--tiles 10 20] [--workers 2]

``measure``, ``tiled``, ``run_ours`` and ``run_peer`` are meant to be imported by other
benchmarks (``make bench-scale``).
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

CACHE = REPO.parent / "cache"
OUT = HERE / "out" / "extract"
SOURCE = REPO / "data" / "helsinki.osm.pbf"
CLI = [sys.executable, "-m", "skyscript_build.cli"]
MIB = 2**20


def tile_script() -> Path:
    """The shared tiling script: ../shared/bench beside a checkout, or /work/shared/bench."""
    for base in (REPO.parent / "shared", Path("/work/shared")):
        script = base / "bench" / "tile_pbf.py"
        if script.exists():
            return script
    sys.exit("bench: shared/bench/tile_pbf.py not found (expected ../shared beside the repo)")


def tiled(k: int) -> Path:
    """The k x k tiling of the Helsinki extract, made once into ``../cache/k{k}.osm.pbf``."""
    path = CACHE / f"k{k}.osm.pbf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.pbf")
        print(f"making {path} (once; a few minutes)", file=sys.stderr)
        subprocess.run(
            [sys.executable, str(tile_script()), str(SOURCE), str(tmp), str(k)], check=True
        )
        tmp.replace(path)
    return path


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cmd: list[str], cwd: Path = REPO) -> dict:
    """Run ``cmd`` (exit code 0 expected) and sample its process tree's memory: wall and CPU
    ``seconds``, peak RSS in MiB of its largest process (``rss_one``) and of the whole tree
    (``rss_tree``), the tree's peak PSS (``pss_tree``) and most ``processes`` at once."""
    cpu0 = _children_cpu()
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    one = rss_tree = pss_tree = processes = 0
    while proc.poll() is None:
        tree = [proc]
        with contextlib.suppress(psutil.Error):
            tree += proc.children(recursive=True)
        rss = pss = 0
        for p in tree:
            with contextlib.suppress(psutil.Error):
                info = p.memory_full_info()
                rss += info.rss
                pss += info.pss
                one = max(one, info.rss)
        rss_tree, pss_tree = max(rss_tree, rss), max(pss_tree, pss)
        processes = max(processes, len(tree))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr.read().decode()}")
    return {
        "seconds": seconds,
        "cpu": _children_cpu() - cpu0,
        "rss_one": one / MIB,
        "rss_tree": rss_tree / MIB,
        "pss_tree": pss_tree / MIB,
        "processes": processes,
    }


def candidate_keys() -> list[str]:
    from tag_filters import load_tag_filter

    keys = load_tag_filter("default").candidate_keys()
    assert keys is not None
    return sorted(keys)


def run_ours(pbf: Path, workers: int, extra: list[str] | None = None) -> dict:
    """``skyscript-build extract`` of ``pbf``: its usage, objects and tasks."""
    out = OUT / f"ours_{pbf.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*CLI, "-q", "extract", str(pbf), "--out", str(out), "--workers", str(workers)]
    usage = measure(cmd + (extra or []))
    done = json.loads((out / "_extract.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {**usage, "objects": done["objects"], "tasks": done["tasks"]}


def run_peer(pbf: Path, keys: list[str]) -> dict:
    """osmium-tool's ``tags-filter`` + ``export`` of ``pbf`` with ``keys``."""
    OUT.mkdir(parents=True, exist_ok=True)
    filtered = OUT / f"peer_{pbf.stem}.filtered.osm.pbf"
    geojson = OUT / f"peer_{pbf.stem}.geojsonseq"
    script = (
        f"osmium tags-filter -O -o {filtered} {pbf} {' '.join('nwr/' + k for k in keys)} && "
        f"osmium export -O -f geojsonseq -o {geojson} {filtered}"
    )
    usage = measure(["bash", "-c", script])
    with open(geojson, "rb") as f:
        objects = sum(1 for _ in f)
    filtered.unlink()
    geojson.unlink()
    return {**usage, "objects": objects, "tasks": 1}


def best(runs: list[dict]) -> dict:
    """The fastest run, with the largest memory and the least CPU seen over all."""
    top = min(runs, key=lambda r: r["seconds"])
    worst = {k: max(r[k] for r in runs) for k in ("rss_one", "rss_tree", "pss_tree")}
    return {**top, **worst, "cpu": min(r["cpu"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiles", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("osmium"):
        sys.exit("bench_extract: osmium-tool is missing (make bench-extract installs it)")
    keys = candidate_keys()
    files = {k: tiled(k) for k in args.tiles}
    load_before = os.getloadavg()
    results: dict[tuple[str, int], dict] = {}
    for k, pbf in files.items():
        pbf.read_bytes()  # warm the page cache
        ours, peer = [], []
        for _ in range(args.rounds):
            ours.append(run_ours(pbf, args.workers))
            peer.append(run_peer(pbf, keys))
        results[("ours", k)] = best(ours)
        results[("peer", k)] = best(peer)
    load = os.getloadavg()
    lines = [
        f"Inputs: the {', '.join(f'{k}x{k}' for k in files)} tilings of data/helsinki.osm.pbf "
        f"({', '.join(f'{p.stat().st_size / MIB:.0f} MiB' for p in files.values())}); "
        f"{len(keys)} keys. Best of {args.rounds} alternating rounds; load average (1, 5, 15 "
        f"min) before {', '.join(f'{x:.1f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} cores (shared machine: "
        "compare ratios measured in the same run, not times).",
        "",
        "| input | run | objects | tasks | wall s | CPU s | peak RSS of a process MiB "
        "| peak RSS of the tree MiB | peak PSS of the tree MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    label = {"ours": f"skyscript-build extract --workers {args.workers}", "peer": "osmium-tool"}
    for k in files:
        for who in ("ours", "peer"):
            r = results[(who, k)]
            lines.append(
                f"| {k}x{k} | {label[who]} | {r['objects']:,} | {r['tasks']} | {r['seconds']:.1f} "
                f"| {r['cpu']:.1f} | {r['rss_one']:.0f} | {r['rss_tree']:.0f} | {r['pss_tree']:.0f} |"
            )
    lines.append("")
    for k in files:
        o, p = results[("ours", k)], results[("peer", k)]
        lines.append(
            f"- {k}x{k}: wall time ours / osmium-tool **{o['seconds'] / p['seconds']:.2f}** "
            f"(CPU seconds {o['cpu'] / p['cpu']:.2f})."
        )
    big, small = max(files), min(files)
    o = results[("ours", big)]
    ratio = o["seconds"] / results[("peer", big)]["seconds"]
    lines += ["", f"Goals at {big}x{big}:"]
    lines.append(
        f"- speed (wall time at most 1.1x osmium-tool's): {'met' if ratio <= 1.1 else 'NOT met'}"
        f" ({ratio:.2f}x)."
    )
    if small != big:
        s = results[("ours", small)]
        growth = o["rss_one"] / s["rss_one"] - 1
        lines.append(
            f"- memory set by the task, not the input (peak RSS of a process within 30 % from "
            f"{small}x{small} to {big}x{big}): {'met' if abs(growth) <= 0.3 else 'NOT met'} "
            f"({s['rss_one']:.0f} -> {o['rss_one']:.0f} MiB, {growth:+.0%}; the tree's PSS "
            f"{s['pss_tree']:.0f} -> {o['pss_tree']:.0f} MiB)."
        )
    fits = max(o["rss_one"], o["pss_tree"]) <= 1024
    lines.append(
        f"- at most 1 GiB (a process, and the whole tree's PSS): {'met' if fits else 'NOT met'} "
        f"({o['rss_one']:.0f} and {o['pss_tree']:.0f} MiB; the tree's RSS, counting the pages "
        f"the forked workers share with the parent once per process, {o['rss_tree']:.0f} MiB)."
    )
    body = "\n".join(lines + ["", NOTES])
    print(body)
    record("extract", "extract: skyscript-build extract vs osmium tags-filter + export", body)


NOTES = """\
How the work is cut: each input into node tasks (`--task-mb`, 16 MiB of compressed blobs each:
points, the node locations of the task written to disk, the relations to assemble), way tasks
(a quarter of that: lines, areas from closed ways assembled by osmium from ways written with
their locations, member ways of relations), relation tasks by relation id range; with several
inputs, a merge by id. A process holds one task at a time, so its memory is set by the task
size and not by the input; the workers' node-store pages are memory maps opened per lookup."""


if __name__ == "__main__":
    main()
