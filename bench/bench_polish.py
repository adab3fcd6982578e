"""Benchmark polish: captions/s against a chat endpoint with 300 ms per request, vs the bound.

The endpoint is tests/openai_stub_server.py in its own process, answering every request after
a fixed latency. With ``concurrency`` requests in flight and ``batch`` captions per request the
bound is ``concurrency * batch / latency`` captions/s; each setting runs about six rounds of
requests and its ratio to the bound is reported. Also: a rerun from the cache (zero requests)
and the client's peak RSS. Records bench/RESULTS.md section ``polish``.

Run: ``make bench-polish`` (about a minute).
"""

from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("SKYSCRIPT_NO_PROGRESS", "1")

from bench._results import record  # noqa: E402
from skyscript_build.polish import PolishConfig, run_polish  # noqa: E402

LATENCY = 0.3
BATCHES = (1, 8, 32)
CONCURRENCIES = (1, 8, 32)
ROUNDS = 6


def _captions(path: Path, rows: int) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filepath", "title", "title_multi_objects"])
        for i in range(rows):
            title = f"amenity of fountain {i}"
            writer.writerow(
                [f"images2/n{i}_FI_19.jpg", title, f"{title}, surrounded by natural tree"]
            )
    return path


def _start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "openai_stub_server.py"), "--latency", str(LATENCY)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise SystemExit("the stub server did not start")
    return proc, url


def main() -> None:
    """Run every setting, print a table, record it."""
    proc, url = _start_server()
    lines = [
        "| batch | concurrency | captions | requests | seconds | captions/s | bound/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rerun_line = ""
    try:
        with tempfile.TemporaryDirectory(prefix="bench_polish_") as tmp:
            folder = Path(tmp)
            source = _captions(folder / "captions.csv", ROUNDS * max(BATCHES) * max(CONCURRENCIES))
            for batch in BATCHES:
                for concurrency in CONCURRENCIES:
                    rows = ROUNDS * batch * concurrency
                    config = PolishConfig(
                        captions=source,
                        endpoint=url,
                        model="stub-model",
                        out=folder / f"out_b{batch}_c{concurrency}.csv",
                        batch=batch,
                        concurrency=concurrency,
                        limit=rows,
                        timeout=30,
                    )
                    start = time.perf_counter()
                    result = run_polish(config)
                    seconds = time.perf_counter() - start
                    assert result.polished == rows and result.failed_requests == 0, result
                    rate = rows / seconds
                    bound = concurrency * batch / LATENCY
                    line = (
                        f"| {batch} | {concurrency} | {rows} | {result.requests} | "
                        f"{seconds:.2f} | {rate:.1f} | {bound:.1f} | {rate / bound:.2f} |"
                    )
                    print(line, flush=True)
                    lines.append(line)
            # The largest setting again: every answer from the cache, no request.
            start = time.perf_counter()
            again = run_polish(config)
            seconds = time.perf_counter() - start
            assert again.requests == 0 and again.cached == again.rows
            rerun_line = (
                f"Rerun of the last setting from the cache: {again.rows} rows, 0 requests, "
                f"{seconds:.2f} s ({again.rows / seconds:.0f} captions/s)."
            )
            print(rerun_line)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body = "\n".join(
        [
            f"Endpoint: tests/openai_stub_server.py in its own process, {LATENCY * 1000:.0f} ms "
            "per request. Bound = concurrency x batch / latency; ratio = measured / bound. "
            f"Each setting runs {ROUNDS} rounds of requests (fresh cache), threads + requests.",
            "",
            *lines,
            "",
            rerun_line,
            f"Peak RSS of the client process: {peak_mib:.0f} MiB.",
        ]
    )
    print(f"peak RSS {peak_mib:.0f} MiB")
    record("polish", "polish: captions/s vs the concurrency x batch / latency bound", body)


if __name__ == "__main__":
    main()
