"""Benchmark the Earth Engine emulator: 512 x 512 JPEG tiles/s at zero latency, in one run.

Data: the demo's synthetic orthophoto (``build/demo-data``, made by ``make demo-data``; rendered
here if missing). Tiles: 512 x 512 px at 0.5 m in EPSG:32635 (UTM 35N, what the fetch stage
asks for), at seeded random places inside the image, so every tile is warped from the
EPSG:3067 source.

Side by side:

- bound, in process, no HTTP: the emulator's own window read + JPEG encode (``read_record`` +
  ``encode``), on 2 threads;
- peer, in process, no HTTP: what one would write with rasterio and PIL alone: a WarpedVRT
  window read (nearest) + PIL JPEG encode, on 2 threads;
- emulator over HTTP with light clients: ``skyscript-build emulator`` in its own process, hit
  by 2 client processes x 4 threads posting pre-serialised ``image:computePixels`` bodies
  (``requests``); also the emulator's CPU time per tile, hence its capacity on 2 cores;
- emulator over HTTP with real ``ee`` clients: 8 and 40 concurrent clients (processes x
  threads) building the expression and calling ``ee.data.computePixels`` per tile, as the
  fetch stage's Earth Engine backend does. Clients and server share the same 2 cores.

Peak RSS: the emulator process (VmHWM). The machine's cores are shared with other jobs, so the
ratios measured in one run are what counts.

    python bench/bench_emulator.py [--tiles 400] [--seconds 6]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _results import record  # noqa: E402

FI = "Finland/SMK/V/50cm"
DEMO = REPO / "build" / "demo-data"


def demo_collections() -> Path:
    """build/demo-data/collections.yaml, rendered if missing."""
    from skyscript_build.orthophoto import OrthophotoConfig, render_orthophoto

    result = render_orthophoto(OrthophotoConfig(pbf=REPO / "data" / "helsinki.osm.pbf", out=DEMO))
    return result.collections


def tile_grids(collections: Path, n: int, seed: int = 0) -> list[dict]:
    """n computePixels grids of 512 x 512 px at 0.5 m in EPSG:32635 inside the orthophoto."""
    from skyscript_build.emulator import load_collections

    (rec,) = load_collections(collections).get(FI)
    _, _, x0, _, _, y0 = rec.transform
    rng = np.random.default_rng(seed)
    grids = []
    for _ in range(n):
        col = rng.uniform(0, rec.width - 520)
        row = rng.uniform(0, rec.height - 520)
        grids.append(
            {
                "dimensions": {"width": 512, "height": 512},
                "affineTransform": {
                    "scaleX": 0.5,
                    "shearX": 0,
                    "translateX": round(x0 + col * 0.5, 2),
                    "shearY": 0,
                    "scaleY": -0.5,
                    "translateY": round(y0 - row * 0.5, 2),
                },
                "crsCode": "EPSG:32635",
            }
        )
    return grids


# -- in-process: bound and peer ---------------------------------------------------------------
def run_threads(fn, items: list, threads: int = 2) -> tuple[float, float]:
    """(items/s, CPU ms per item) of fn over items on a thread pool (after a warm-up call)."""
    fn(items[0])
    start, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, items))
    cpu_ms = 1000 * (time.process_time() - cpu) / len(items)
    return len(items) / (time.perf_counter() - start), cpu_ms


def bound_tiles_per_s(collections: Path, grids: list[dict]) -> tuple[float, float]:
    from affine import Affine

    from skyscript_build.emulator import load_collections
    from skyscript_build.emulator.pixels import Grid, encode, read_record

    (rec,) = load_collections(collections).get(FI)

    def one(g: dict) -> bytes:
        t = g["affineTransform"]
        grid = Grid(
            g["crsCode"],
            Affine(t["scaleX"], 0, t["translateX"], 0, t["scaleY"], t["translateY"]),
            512,
            512,
        )
        data, mask = read_record(rec, grid, [0, 1, 2])
        return encode(data, mask, ["R", "G", "B"], "JPEG", grid)[0]

    return run_threads(one, grids)


def peer_tiles_per_s(collections: Path, grids: list[dict]) -> tuple[float, float]:
    import rasterio
    from affine import Affine
    from PIL import Image
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import from_bounds

    from skyscript_build.emulator import load_collections

    (rec,) = load_collections(collections).get(FI)
    local = threading.local()

    def one(g: dict) -> bytes:
        if not hasattr(local, "vrt"):
            local.src = rasterio.open(rec.path)
            local.vrt = WarpedVRT(local.src, crs="EPSG:32635", resampling=Resampling.nearest)
        t = g["affineTransform"]
        transform = Affine(t["scaleX"], 0, t["translateX"], 0, t["scaleY"], t["translateY"])
        left, top = transform.c, transform.f
        window = from_bounds(left, top - 256, left + 256, top, local.vrt.transform)
        data = local.vrt.read(window=window, out_shape=(3, 512, 512), boundless=False)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(data.transpose(1, 2, 0))).save(
            buf, format="JPEG", quality=85
        )
        return buf.getvalue()

    return run_threads(one, grids)


# -- over HTTP ----------------------------------------------------------------------------------
def start_emulator(collections: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "skyscript_build.cli",
            "-q",
            "emulator",
            "--collections",
            str(collections),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("Earth Engine emulator on "):
        proc.kill()
        raise SystemExit(f"the emulator did not start: {line!r}")
    return proc, line.split()[4]


def expression(grid: dict):
    import ee

    t = grid["affineTransform"]
    x, y = t["translateX"], t["translateY"]
    region = ee.Geometry.Rectangle([x, y - 256, x + 256, y], "EPSG:32635", False)
    return (
        ee.ImageCollection(FI)
        .filterBounds(region)
        .filterDate("2019-01-01", "2020-01-01")
        .sort("system:time_start", False)
        .mosaic()
        .visualize(bands=["R", "G", "B"], min=0, max=255)
    )


def _client(
    url: str,
    mode: str,
    grids: list[dict],
    bodies: list[bytes],
    threads: int,
    seconds: float,
    ready: Any,
    out: mp.Queue,
) -> None:
    """A client process: `threads` threads requesting tiles until `seconds` have passed."""
    import requests

    from skyscript_build.emulator import init_ee_client

    if mode == "ee":
        import ee

        init_ee_client(url, max_retries=0)
    counts = [0] * threads
    errors = [0] * threads
    ready.wait()  # every client process is set up: start together
    start_at = time.time()

    def loop(k: int) -> None:
        session = requests.Session()
        i = k
        while time.time() < start_at + seconds:
            try:
                if mode == "ee":
                    g = grids[i % len(grids)]
                    data = ee.data.computePixels(
                        {"expression": expression(g), "fileFormat": "JPEG", "grid": g}
                    )
                else:
                    r = session.post(
                        f"{url}/v1alpha/projects/demo/image:computePixels",
                        data=bodies[i % len(bodies)],
                        headers={"Content-Type": "application/json"},
                        timeout=30,
                    )
                    r.raise_for_status()
                    data = r.content
                counts[k] += data[:2] == b"\xff\xd8"
            except Exception:  # noqa: BLE001 - counted
                errors[k] += 1
            i += threads

    pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((sum(counts), sum(errors)))


def http_tiles_per_s(
    url: str,
    server: psutil.Process,
    mode: str,
    grids: list[dict],
    bodies: list[bytes],
    procs: int,
    threads: int,
    seconds: float,
) -> dict:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    ready = ctx.Barrier(procs + 1)  # spawned clients import ee / requests first
    workers = [
        ctx.Process(target=_client, args=(url, mode, grids, bodies, threads, seconds, ready, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    ready.wait(timeout=300)
    cpu0 = sum(server.cpu_times()[:2])
    time.sleep(seconds)
    cpu1 = sum(server.cpu_times()[:2])
    results = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join()
    tiles = sum(r[0] for r in results)
    return {
        "tiles_per_s": tiles / seconds,
        "errors": sum(r[1] for r in results),
        "server_cpu_ms_per_tile": 1000 * (cpu1 - cpu0) / max(tiles, 1),
    }


def serialized_bodies(url: str, grids: list[dict]) -> list[bytes]:
    import ee

    from skyscript_build.emulator import init_ee_client

    init_ee_client(url, max_retries=0)
    return [
        json.dumps(
            {
                "expression": ee.serializer.encode(expression(g), for_cloud_api=True),
                "fileFormat": "JPEG",
                "grid": g,
            }
        ).encode()
        for g in grids
    ]


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    collections = demo_collections()
    grids = tile_grids(collections, args.tiles)

    bound, bound_cpu = bound_tiles_per_s(collections, grids)
    peer, peer_cpu = peer_tiles_per_s(collections, grids)
    print(
        f"in process, 2 threads: emulator read+encode {bound:.0f} tiles/s ({bound_cpu:.2f} ms "
        f"CPU/tile), rasterio WarpedVRT + PIL {peer:.0f} tiles/s ({peer_cpu:.2f} ms CPU/tile)"
    )

    proc, url = start_emulator(collections)
    try:
        server = psutil.Process(proc.pid)
        bodies = serialized_bodies(url, grids)
        import requests

        for b in bodies[:20]:  # warm up: the first request decodes the raster into memory
            requests.post(f"{url}/v1alpha/projects/demo/image:computePixels", data=b, timeout=60)
        raw = http_tiles_per_s(url, server, "raw", grids, bodies, 2, 4, args.seconds)
        print(f"HTTP, 2x4 raw clients: {raw}")
        ee8 = http_tiles_per_s(url, server, "ee", grids, bodies, 2, 4, args.seconds)
        print(f"HTTP, 8 ee clients: {ee8}")
        ee40 = http_tiles_per_s(url, server, "ee", grids, bodies, 4, 10, args.seconds)
        print(f"HTTP, 40 ee clients: {ee40}")
        rss = vm_hwm_mib(proc.pid)
    finally:
        proc.send_signal(2)
        proc.communicate(timeout=30)

    http_cpu = raw["server_cpu_ms_per_tile"]
    body = f"""
512 x 512 JPEG tiles at 0.5 m in EPSG:32635 (warped from the EPSG:3067 demo orthophoto),
{args.tiles} seeded tile positions, zero latency. Goal: >= 300 tiles/s on 2 cores.
The 2 cores are shared with other jobs (load average during runs: 5 to 25), so wall-clock
tiles/s vary from run to run; CPU time per tile is the steadier measure.

| what | tiles/s (wall) | CPU ms per tile | tiles/s on 2 free cores (2000 / CPU ms) |
|---|---:|---:|---:|
| bound: the emulator's read + encode in process, 2 threads, no HTTP | {bound:.0f} | {bound_cpu:.2f} | {2000 / bound_cpu:.0f} |
| peer: rasterio WarpedVRT read + PIL encode in process, 2 threads | {peer:.0f} | {peer_cpu:.2f} | {2000 / peer_cpu:.0f} |
| **emulator over HTTP** (server process CPU), 2 x 4 light clients | {raw["tiles_per_s"]:.0f} | {http_cpu:.2f} | **{2000 / http_cpu:.0f}** |
| emulator over HTTP, 8 real `ee` clients (2 processes x 4 threads) | {ee8["tiles_per_s"]:.0f} | {ee8["server_cpu_ms_per_tile"]:.2f} | {2000 / ee8["server_cpu_ms_per_tile"]:.0f} |
| emulator over HTTP, 40 real `ee` clients (4 processes x 10 threads) | {ee40["tiles_per_s"]:.0f} | {ee40["server_cpu_ms_per_tile"]:.2f} | {2000 / ee40["server_cpu_ms_per_tile"]:.0f} |

- The HTTP layer, JSON parsing and expression evaluation cost {http_cpu / bound_cpu:.2f}x the
  bare read + encode in CPU; the emulator alone serves {2000 / http_cpu:.0f} tiles/s on 2 cores
  (goal 300). Over HTTP the clients ran on the same 2 cores; the real `ee` clients' own
  request building (serialising the expression, googleapiclient) then limits the wall rate.
- The peer (GDAL warping per request) costs {peer_cpu / bound_cpu:.1f}x the emulator's read
  path, which decodes the raster once and samples it with a separable nearest-neighbour map.
- Errors: {raw["errors"]} (light clients), {ee8["errors"]} (8 ee), {ee40["errors"]} (40 ee).
- Emulator peak RSS: {rss:.0f} MiB (the 22 MB orthophoto decoded once in memory).
- Profile (cProfile of `compute_pixels` over these tiles, no HTTP): JPEG encoding (PIL) ~30 %
  of the CPU, window read + warp ~25 %, expression evaluation (filters, geometry) ~20 %; under
  py-spy the HTTP server's time goes mostly to writing answers and waiting for requests.
"""
    if not args.no_record:
        record(
            "emulator",
            "emulator: 512 px JPEG tiles/s at zero latency (bench/bench_emulator.py)",
            body,
        )
    print(body)


if __name__ == "__main__":
    main()
