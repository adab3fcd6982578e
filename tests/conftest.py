"""Shared fixtures: the bundled Helsinki extract and a CLI runner."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("SKYSCRIPT_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def helsinki_pbf() -> Path:
    """The real OSM extract of central Helsinki ((c) OpenStreetMap contributors, ODbL)."""
    return REPO / "data" / "helsinki.osm.pbf"


def load_fixture_script(name: str, filename: str = "data.py") -> ModuleType:
    """Import ``tests/data/<name>/<filename>`` under a unique module name.

    Every fixture folder has its own ``data.py``; importing them all as ``data`` would let the
    first one loaded shadow the others within one pytest session.
    """
    path = REPO / "tests" / "data" / name / filename
    module_name = f"fixture_{name}_{Path(filename).stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


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


# --- Earth Engine emulator fixtures (skyscript_build.emulator) -----------------------------


@pytest.fixture(scope="session")
def emulator_collections(tmp_path_factory) -> Path:
    """collections.yaml of small seeded GeoTIFFs (tests/data/emulator/data.py)."""
    module = load_fixture_script("emulator")
    return module.make_collections(tmp_path_factory.mktemp("emulator_data"))


@pytest.fixture
def ee_emulator(emulator_collections):
    """A running emulator on the test collections, with the ``ee`` client initialised on it.

    The client is set to not retry by itself (``max_retries=0``). Yields the ``Emulator``;
    stops it afterwards. For latency or faults, start your own ``Emulator(...)``.
    """
    from skyscript_build.emulator import Emulator, init_ee_client

    with Emulator(emulator_collections) as emu:
        init_ee_client(emu.url, max_retries=0)
        yield emu


@pytest.fixture(scope="session")
def demo_orthophoto(tmp_path_factory, helsinki_pbf) -> Path:
    """collections.yaml of the demo's synthetic orthophoto (Finland/SMK/V/50cm), rendered once."""
    from skyscript_build.orthophoto import OrthophotoConfig, render_orthophoto

    out = tmp_path_factory.mktemp("demo_data")
    return render_orthophoto(OrthophotoConfig(pbf=helsinki_pbf, out=out)).collections


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )


@pytest.fixture
def dask_cluster(tmp_path: Path):
    """``dask scheduler`` and two ``dask worker`` processes (no nanny) on 127.0.0.1, each
    limited to 1.5 GiB, as the planet-scale docs ask of a cluster's workers."""
    dask = str(Path(sys.executable).parent / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    procs = [
        _start(
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ],
            tmp_path / "scheduler.log",
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, "the Dask scheduler did not start"
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        workers = [
            _start(
                [
                    dask,
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--name",
                    f"w{i}",
                    "--memory-limit",
                    "1.5GiB",
                ],
                tmp_path / f"worker{i}.log",
            )
            for i in range(2)
        ]
        procs += workers
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield {"address": address, "workers": workers}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
