"""Shared fixtures: the bundled Helsinki extract and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("SKYSCRIPT_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def helsinki_pbf() -> Path:
    """The real OSM extract of central Helsinki ((c) OpenStreetMap contributors, ODbL)."""
    return REPO / "data" / "helsinki.osm.pbf"


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``skyscript-build ARGS`` in a subprocess, as a user would; capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "skyscript_build.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture
def cli():
    """The ``run_cli`` function, as a fixture."""
    return run_cli
