"""Benchmark the fetch stage against the Earth Engine emulator: tiles/s vs the concurrency bound.

Data: the demo's synthetic Helsinki orthophoto (``make demo-data``), served by the emulator
(``skyscript-build emulator``, its own process) as ``Finland/SMK/V/50cm``; N requests of
PX x PX tiles at 0.5 m at seeded random places inside it, in 4 requests parts.

1. Bound and peer: the emulator adds 500 ms to every request and fetch may have 40 requests
   in flight, so no client can do better than 40 / 0.5 = 80 tiles/s (each tile is one ``computePixels``;
   the image lookup is one more request per shard of 200). Goal: >= 90 % of the bound. The
   peer, a bare HTTP client (40 threads POSTing ready-made requests, nothing else), measures
   in the same run what the machine and the emulator allow at that moment.
2. CPU cost: the same at zero latency: tiles/s, and CPU ms per tile of the fetch process and
   of the emulator process.
3. Profile: the zero-latency run again under ``py-spy record`` (all threads, idle excluded):
   the functions where the fetch process spends its CPU (self time, and time under a few
   entry points).

Every fetch is ``skyscript-build fetch`` as a subprocess (a fresh output folder); tiles/s is
taken from its own summary (``run_fetch``'s wall time: client start-up, image lookups and
every tile included, interpreter start-up excluded). Peak RSS is the fetch process's
``ru_maxrss``. The machine's 2 cores are shared with other developers' jobs: read the ratios
to the bound and to the peer together.

    python bench/bench_fetch.py [--tiles 3200] [--px 256] [--latency-ms 500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from pyproj import Transformer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _results import record  # noqa: E402

DEMO = REPO / "build" / "demo-data" / "collections.yaml"
ORTHO = REPO / "build" / "demo-data" / "helsinki_orthophoto_synthetic.tif"
OUT = HERE / "out" / "fetch"
PY = sys.executable
GSD = 0.5


def write_requests(folder: Path, n: int, px: int, seed: int = 0) -> Path:
    """``n`` seeded requests of ``px`` x ``px`` tiles inside the orthophoto, in 4 parts."""
    from skyscript_build.plan import SCHEMA as schema  # the plan stage's requests schema

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with rasterio.open(ORTHO) as ds:
        left, bottom, right, top = ds.bounds
        crs = ds.crs.to_string()
    rng = np.random.default_rng(seed)
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    side = px * GSD
    rows = []
    for i in range(n):
        x0 = left + float(rng.integers(0, int(right - left - side)))
        y1 = top - float(rng.integers(0, int(top - bottom - side)))
        x1, y0 = x0 + side, y1 - side
        lons, lats = to_ll.transform([x0, x1, x0, x1], [y0, y0, y1, y1])
        rows.append(
            {
                "key": f"a{100000 + i}_FI_19", "osm_type": "a", "osm_id": 100000 + i,
                "osm_element": "way", "alias": "FI", "collection": "Finland/SMK/V/50cm",
                "gsd": GSD, "years": [2019], "crs": crs, "x_min": x0, "y_min": y0,
                "x_max": x1, "y_max": y1, "width": px, "height": px, "west": min(lons),
                "south": min(lats), "east": max(lons), "north": max(lats),
                "center_tags": [("building", "yes")],
                "surrounding_tags": [[("highway", "footway")]],
            }
        )  # fmt: skip
    per = -(-n // 4)
    for p in range(4):
        table = pa.Table.from_pylist(rows[p * per : (p + 1) * per], schema=schema)
        pq.write_table(table, folder / f"part-{p:05d}.parquet")
    return folder


class EmulatorProcess:
    """``skyscript-build emulator`` in its own process."""

    def __init__(self, latency_ms: float) -> None:
        cmd = [PY, "-m", "skyscript_build.cli", "emulator", "--collections", str(DEMO)]
        cmd += ["--port", "0", "--latency-ms", str(latency_ms)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if not match:
            self.proc.kill()
            raise SystemExit(f"the emulator did not start: {line!r}")
        self.url = match.group(1)
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def run_fetch(
    requests: Path, url: str, concurrency: int, rate: float, profile: Path | None = None
) -> dict:
    """One ``skyscript-build fetch`` into a fresh folder; its numbers."""
    out = OUT / "dataset"
    if out.exists():
        shutil.rmtree(out)
    cmd = [PY, "-m", "skyscript_build.cli", "fetch", "--requests", str(requests), "--out", str(out)]
    cmd += ["--backend", "earthengine", "--ee-url", url, "--project", "bench"]
    cmd += ["--concurrency", str(concurrency), "--rate", str(rate)]
    if profile is not None:
        spy = [str(Path(PY).with_name("py-spy")), "record", "-r", "200", "-f", "raw"]
        cmd = [*spy, "-o", str(profile), "--", *cmd]
    env = {**os.environ, "SKYSCRIPT_NO_PROGRESS": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    match = re.search(
        r"fetch: (\d+) ok.*?(\d+) tiles fetched in ([\d.]+)s \(client start ([\d.]+)s\)", stdout
    )
    if os.waitstatus_to_exitcode(status) != 0 or not match:
        raise SystemExit(f"fetch failed:\n{stdout}\n{stderr[-3000:]}")
    ok, fetched, seconds = int(match.group(1)), int(match.group(2)), float(match.group(3))
    startup = float(match.group(4))
    return {
        "ok": ok,
        "fetched": fetched,
        "seconds": seconds,
        "startup": startup,
        "wall": wall,
        "tiles_per_s": fetched / seconds,
        "steady_tiles_per_s": fetched / max(seconds - startup, 1e-9),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mib": usage.ru_maxrss / 1024,
    }


def bare_client(requests_dir: Path, url: str, concurrency: int) -> dict:
    """The peer: the least a client can do, 40 threads POSTing ready-made computePixels bodies.

    The expression is serialised once (the ee client, against the same emulator); each tile is
    one POST of its grid, the JPEG is read and dropped: no ee client per request, no checks, no
    files. Its tiles/s is what this machine and emulator allow at the moment of the run.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import ee
    import requests as http

    from skyscript_build.emulator import init_ee_client

    init_ee_client(url, "bench")
    visual = ee.Image("Finland/SMK/V/50cm/helsinki_2019_synthetic").select(["R", "G", "B"])
    expression = ee.serializer.encode(visual.visualize(min=0, max=255))
    rows = [r for p in sorted(requests_dir.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    endpoint = f"{url}/v1/projects/bench/image:computePixels"
    local = threading.local()

    def post(row: dict) -> int:
        session = getattr(local, "session", None) or http.Session()
        local.session = session
        body = {
            "expression": expression,
            "fileFormat": "JPEG",
            "grid": {
                "dimensions": {"width": row["width"], "height": row["height"]},
                "affineTransform": {
                    "scaleX": GSD,
                    "shearX": 0,
                    "translateX": row["x_min"],
                    "shearY": 0,
                    "scaleY": -GSD,
                    "translateY": row["y_max"],
                },  # fmt: skip
                "crsCode": row["crs"],
            },
        }
        response = session.post(endpoint, json=body, timeout=60)
        response.raise_for_status()
        return len(response.content)

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        sizes = list(pool.map(post, rows))
    seconds = time.monotonic() - t0
    return {"tiles": len(sizes), "seconds": seconds, "tiles_per_s": len(sizes) / seconds}


def top_functions(
    raw: Path, n: int = 12
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(self-time share, inclusive share) of the top functions in py-spy's raw output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        frames = [re.sub(r" \((.*?):\d+\)$", r" (\1)", f) for f in stack.split(";")]
        frames = [
            f.replace(str(REPO) + "/", "").replace(str(Path(PY).parent.parent), "venv")
            for f in frames
        ]
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
        total += c
    total = max(total, 1)
    return (
        [(f, c / total) for f, c in own.most_common(n)],
        [(f, c / total) for f, c in incl.most_common(40) if "skyscript_build" in f][:n],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=3200)
    parser.add_argument("--zero-tiles", type=int, default=800)
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=500)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not DEMO.exists():
        raise SystemExit(f"{DEMO}: missing; run `make demo-data` first")
    OUT.mkdir(parents=True, exist_ok=True)

    bound = args.concurrency / (args.latency_ms / 1000)
    requests = write_requests(OUT / "requests", args.tiles, args.px)
    emu = EmulatorProcess(args.latency_ms)
    peers, slows = [], []
    try:
        for _ in range(args.rounds):  # alternate, keep the best of each (a shared machine)
            peers.append(bare_client(requests, emu.url, args.concurrency))
            print(f"peer (bare HTTP) at {args.latency_ms:g} ms: {peers[-1]}", flush=True)
            slows.append(run_fetch(requests, emu.url, args.concurrency, rate=100))
            print(f"latency {args.latency_ms:g} ms: {slows[-1]}", flush=True)
    finally:
        emu.stop()
    peer = max(peers, key=lambda r: r["tiles_per_s"])
    slow = max(slows, key=lambda r: r["tiles_per_s"])

    # Zero latency, no rate cap: what one tile costs in CPU.
    zero_requests = write_requests(OUT / "requests_zero", args.zero_tiles, args.px, seed=1)
    emu = EmulatorProcess(0)
    try:
        emu_cpu0 = emu.cpu_s()
        fast = run_fetch(zero_requests, emu.url, args.concurrency, rate=1e6)
        emu_cpu = emu.cpu_s() - emu_cpu0
        profile_path = OUT / "profile.raw"
        run_fetch(zero_requests, emu.url, args.concurrency, rate=1e6, profile=profile_path)
    finally:
        emu.stop()
    print(f"latency 0: {fast}", flush=True)
    own, incl = top_functions(profile_path)
    shutil.rmtree(OUT / "dataset", ignore_errors=True)

    ratio = slow["tiles_per_s"] / bound
    steady = slow["steady_tiles_per_s"] / bound
    load = os.getloadavg()[0]
    lines = [
        f"{args.tiles} tiles of {args.px} x {args.px} px (0.5 m) from the demo orthophoto; "
        f"the emulator in its own process; `skyscript-build fetch --concurrency "
        f"{args.concurrency}` in one process (threads). Fetch and peer alternate, "
        f"{args.rounds} rounds, best of each kept. Load average at the end: {load:.1f} "
        "on 2 cores shared with other jobs (the ratios move with it: the fetch process needs "
        "about 5 ms of CPU per tile under one GIL, the peer about 1).",
        "",
        "| run | tiles | tiles/s (whole run) | tiles/s (after client start) | bound | ratio "
        "(whole / after start) | fetch CPU ms/tile | emulator CPU ms/tile | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| latency {args.latency_ms:g} ms, --rate 100 | {slow['fetched']} | "
        f"{slow['tiles_per_s']:.1f} | {slow['steady_tiles_per_s']:.1f} | {bound:.0f} | "
        f"**{ratio:.1%}** / **{steady:.1%}** | {1000 * slow['cpu_s'] / slow['fetched']:.1f} | | "
        f"{slow['rss_mib']:.0f} MiB |",
        f"| peer: bare HTTP client, latency {args.latency_ms:g} ms | {peer['tiles']} | "
        f"{peer['tiles_per_s']:.1f} | | {bound:.0f} | {peer['tiles_per_s'] / bound:.1%} | | | |",
        f"| latency 0, no rate cap | {fast['fetched']} | {fast['tiles_per_s']:.1f} | "
        f"{fast['steady_tiles_per_s']:.1f} | | | {1000 * fast['cpu_s'] / fast['fetched']:.1f} | "
        f"{1000 * emu_cpu / fast['fetched']:.1f} | {fast['rss_mib']:.0f} MiB |",
        "",
        f"Fetch against the peer in the same run (what machine and emulator allowed then): "
        f"**{slow['tiles_per_s'] / peer['tiles_per_s']:.1%}**.",
        "",
        f"Goal: >= 90 % of the bound ({args.concurrency} / {args.latency_ms / 1000:g} s): "
        f"**{'met' if ratio >= 0.9 else 'met after client start' if steady >= 0.9 else 'NOT met'}**. "
        f"Client start (opening the ee client: discovery document, "
        f"algorithm list) took {slow['startup']:.1f} s. Fetch CPU ms/tile is the whole "
        "process's CPU time (start-up included) over the tiles.",
        "",
        "Profile of the zero-latency run (py-spy, all threads, idle excluded), self time:",
        "",
        "| function | share of samples |",
        "|---|---|",
        *[f"| `{f}` | {s:.1%} |" for f, s in own],
        "",
        "Inclusive time under the fetch stage's own functions:",
        "",
        "| function | share of samples |",
        "|---|---|",
        *[f"| `{f}` | {s:.1%} |" for f, s in incl],
    ]
    body = "\n".join(lines)
    print(body)
    record("fetch", "fetch: tiles/s against the emulator (bench/bench_fetch.py)", body)


if __name__ == "__main__":
    main()
