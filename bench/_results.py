"""Record a benchmark's results in bench/RESULTS.md, in the section that benchmark owns.

Each benchmark rewrites only its own section (between ``<!-- NAME -->`` markers), so several
benchmarks can be run in any order and the file keeps them all.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is rewritten by its `make bench-<stage>` run.\n"


def machine() -> str:
    """One line naming the machine: CPU model, cores, memory, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=RESULTS.parent,
    ).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, Python {platform.python_version()}, "
        f"commit {commit or '?'}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )


def record(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``title`` and ``body``."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    section = (
        f"<!-- {name} -->\n## {title}\n\nMachine: {machine()}\n\n{body.strip()}\n<!-- /{name} -->"
    )
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)
