"""Benchmark extract and plan at two input sizes against osmium-tool, side by side in one run.

Inputs: the 10x10 and 20x20 tilings of the Helsinki extract (``shared/bench/tile_pbf.py``,
made once into ``../cache/`` beside the repository, as bench_extract does). Peer: ``osmium tags-filter`` with the keys that can make a tag
groundable, then ``osmium export`` to GeoJSON sequences (the C++ command-line way to get tagged
features with geometries), on the same file, in the same run. Ours: ``skyscript-build extract``
and ``skyscript-build plan --per-tag-cap 20000`` as subprocesses (start-up counts).

Recorded per run: wall time, CPU seconds of the process tree, peak RSS of the largest single
process and of the whole tree (sampled every 20 ms), and the tasks it ran. The goals (issue
"planet scale"): at 20x20, extract's wall time at most 1.1x osmium-tool's and plan's at most
2.0x; peak RSS per process at most 1 GiB and within 30 % between the two sizes.

    python bench/bench_scale.py [--sizes 10 20] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import record  # noqa: E402
from bench_extract import candidate_keys, measure, run_peer, tiled  # noqa: E402

OUT = HERE / "out" / "scale"
CLI = [sys.executable, "-m", "skyscript_build.cli"]


def run_extract(pbf: Path, objects: Path) -> dict:
    shutil.rmtree(objects, ignore_errors=True)
    r = measure([*CLI, "extract", str(pbf), "--out", str(objects)])
    marker = json.loads((objects / "_extract.json").read_text())
    r["objects"] = marker["objects"]
    r["tasks"] = marker["tasks"]
    return r


def run_plan(objects: Path, requests: Path) -> dict:
    shutil.rmtree(requests, ignore_errors=True)
    cmd = [*CLI, "plan", "--objects", str(objects), "--out", str(requests)]
    r = measure([*cmd, "--per-tag-cap", "20000"])
    marker = json.loads((requests / "_plan.json").read_text())
    r["requests"] = marker["requests"]
    r["tasks"] = marker["scan_tasks"] + marker["partitions"]
    r["detail"] = f"{marker['scan_tasks']} scan + {marker['partitions']} partitions"
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("osmium"):
        sys.exit("bench_scale: osmium-tool is missing (make bench-scale installs it)")
    keys = candidate_keys()
    load_before = os.getloadavg()
    rows: dict[int, dict[str, dict]] = {}
    for k in args.sizes:
        pbf = tiled(k)
        pbf.read_bytes()  # warm the page cache
        objects, requests = OUT / f"objects-{k}", OUT / f"requests-{k}"
        runs: dict[str, list[dict]] = {"peer": [], "extract": [], "plan": []}
        for _ in range(args.rounds):  # alternating, best of each kept
            runs["peer"].append(run_peer(pbf, keys))
            runs["extract"].append(run_extract(pbf, objects))
            runs["plan"].append(run_plan(objects, requests))
        rows[k] = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
        print(k, {n: round(r["seconds"], 1) for n, r in rows[k].items()}, flush=True)
    load = os.getloadavg()
    body = _report(rows, args, load_before, load, pbf_sizes={k: tiled(k) for k in args.sizes})
    print(body)
    record("scale", "scale: extract and plan at two sizes vs osmium-tool", body)


def _report(
    rows: dict, args: argparse.Namespace, before: tuple, after: tuple, pbf_sizes: dict
) -> str:
    lines = [
        "Inputs: "
        + ", ".join(
            f"the {k}x{k} tiling ({p.stat().st_size / 2**20:.0f} MiB)" for k, p in pbf_sizes.items()
        )
        + f" of data/helsinki.osm.pbf. Best of {args.rounds} alternating round(s). Load "
        f"average before {', '.join(f'{x:.1f}' for x in before)}, after "
        f"{', '.join(f'{x:.1f}' for x in after)} on {os.cpu_count()} cores: the machine is "
        "shared, compare the ratios measured in the same run.",
        "",
        "| tiling | run | wall s | vs osmium-tool | CPU s | peak RSS, largest process | "
        "peak RSS, process tree | tasks | output |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, r in rows.items():
        peer = r["peer"]["seconds"]
        for name, label, out in (
            ("peer", "osmium tags-filter + export", f"{r['peer']['objects']:,} features"),
            ("extract", "skyscript-build extract", f"{r['extract']['objects']:,} objects"),
            (
                "plan",
                "skyscript-build plan --per-tag-cap 20000",
                f"{r['plan']['requests']:,} requests",
            ),
        ):
            x = r[name]
            tasks = x.get("detail", x.get("tasks", "")) if name != "peer" else ""
            lines.append(
                f"| {k}x{k} | {label} | {x['seconds']:.1f} | {x['seconds'] / peer:.2f}x | "
                f"{x['cpu']:.1f} | {x.get('rss_one', x.get('rss', 0)):.0f} MiB | "
                f"{x.get('rss_tree', x.get('rss', 0)):.0f} MiB | {tasks} | {out} |"
            )
    if len(rows) >= 2:
        small, big = sorted(rows)[0], sorted(rows)[-1]
        growth = {
            n: rows[big][n]["rss_one"] / rows[small][n]["rss_one"] - 1 for n in ("extract", "plan")
        }
        e = rows[big]["extract"]["seconds"] / rows[big]["peer"]["seconds"]
        p = rows[big]["plan"]["seconds"] / rows[big]["peer"]["seconds"]
        biggest = max(rows[big][n]["rss_one"] for n in ("extract", "plan"))
        lines += [
            "",
            f"Goals at {big}x{big}: extract at most 1.1x osmium-tool's wall time: "
            f"{'met' if e <= 1.1 else 'NOT met'} ({e:.2f}x); plan at most 2.0x: "
            f"{'met' if p <= 2.0 else 'NOT met'} ({p:.2f}x); peak RSS per process at most "
            f"1 GiB: {'met' if biggest <= 1024 else 'NOT met'} ({biggest:.0f} MiB); within 30 % "
            f"from {small}x{small} to {big}x{big}: extract {growth['extract']:+.0%}, plan "
            f"{growth['plan']:+.0%} ({'met' if max(growth.values()) <= 0.3 else 'NOT met'}).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
