"""Block requests: the planner, and block-cut tiles against per-tile requests through the
emulator with the real ``ee`` client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import load_fixture_script

import skyscript_build.emulator.pixels as emulator_pixels
from skyscript_build.emulator import Emulator
from skyscript_build.errors import ConfigError
from skyscript_build.fetch import FetchConfig, iter_manifest, run_fetch
from skyscript_build.fetch._blocks import BlockSettings, block_grid, plan_blocks, split
from skyscript_build.fetch.backends import close_backends
from skyscript_build.fetch.backends.base import PixelGrid

REPO = Path(__file__).resolve().parent.parent
fixture_data = load_fixture_script("fetch")


@pytest.fixture(autouse=True)
def _fresh_backends():
    yield
    close_backends()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """30 crowded 64 px tiles in a 256 m raster, their corners off the pixel lattice (as plan
    frames them), in 2 parts."""
    out = tmp_path_factory.mktemp("blocks-fx")
    fx = fixture_data.make_fixture(out, n=2, parts=1)
    rows = fixture_data.request_rows(30, seed=21)
    rng = np.random.default_rng(5)
    for row in rows:
        dx, dy = (float(v) for v in rng.uniform(-0.24, 0.24, 2))
        row.update(x_min=row["x_min"] + dx, x_max=row["x_max"] + dx)
        row.update(y_min=row["y_min"] + dy, y_max=row["y_max"] + dy)
    fx["requests"] = fixture_data.write_requests(out / "crowded", [rows[:18], rows[18:]])
    return fx


def _ee(fx, out: Path, emu: Emulator, **kw) -> FetchConfig:
    kw.setdefault("backoff_s", 0.01)
    return FetchConfig(
        requests=kw.pop("requests", fx["requests"]),
        out=out,
        backend="earthengine",
        ee_url=emu.url,
        project="p",
        **kw,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "manifest" not in p.parts
    }


def _grid(col: int, row: int, w: int = 64, h: int = 64) -> PixelGrid:
    return PixelGrid("EPSG:3067", 0.5, col, row, w, h)


def test_planner_blocks_crowded_tiles_and_leaves_sparse_ones_single():
    settings = BlockSettings(overhead_ms=500, ms_per_mpx=100, max_px=2048)
    crowded = [_grid(10 * i, 7 * i) for i in range(20)]  # overlapping: one block
    far = [_grid(100_000 * (i + 1), 0) for i in range(3)]  # far apart: one request each
    plan = plan_blocks(crowded + far, settings)
    assert plan == [list(range(20)), [20], [21], [22]]
    assert block_grid(crowded) == _grid(0, 0, 254, 197)
    assert plan_blocks(crowded, BlockSettings(mode="off")) == [[i] for i in range(20)]


def test_planner_follows_the_cost_model_and_the_limits():
    pair = [_grid(0, 0), _grid(200, 0)]  # 264 x 64 px together: 8,704 px more than apart
    assert plan_blocks(pair, BlockSettings(overhead_ms=500, ms_per_mpx=100)) == [[0, 1]]
    # At 100,000 ms per Mpx the extra pixels (871 ms) cost more than a request (500 ms).
    assert plan_blocks(pair, BlockSettings(overhead_ms=500, ms_per_mpx=100_000)) == [[0], [1]]
    assert plan_blocks(pair, BlockSettings(max_px=200)) == [[0], [1]]  # 264 px: too wide
    row = [_grid(60 * i, 0) for i in range(40)]  # 2,404 px long: blocks of at most 1,024
    plan = plan_blocks(row, BlockSettings(max_px=1024))
    assert sorted(i for group in plan for i in group) == list(range(40))
    assert all(block_grid([row[i] for i in g]).width <= 1024 for g in plan) and len(plan) == 3
    assert split(row[:4]) == ([0, 1], [2, 3])
    with pytest.raises(ConfigError, match="--blocks must be one of"):
        BlockSettings(mode="on")
    with pytest.raises(ConfigError, match="--block-max-px must be"):
        BlockSettings(max_px=40_000)


def test_block_cut_tiles_equal_per_tile_requests(fx, tmp_path):
    with Emulator(fx["collections"]) as emu:
        alone = run_fetch(_ee(fx, tmp_path / "alone", emu, blocks="off"))
        per_tile = emu.stats.count("image:computePixels")
        emu.reset()
        blocks = run_fetch(_ee(fx, tmp_path / "blocks", emu))
        block_requests = emu.stats.count("image:computePixels")
        assert emu.stats.count(status=400) == 0  # every request valid for the API
    assert alone.ok == blocks.ok == 30
    assert per_tile == 30 and block_requests <= 4 and blocks.blocks == block_requests
    assert _files(tmp_path / "blocks") == _files(tmp_path / "alone")  # byte for byte
    rows = list(iter_manifest(tmp_path / "blocks"))
    assert all(r["block"] is not None for r in rows)
    assert all(r["block"] is None for r in iter_manifest(tmp_path / "alone"))
    # The block named in the manifest holds the tile.
    crs, gsd, rest = rows[0]["block"].split("/")
    col, row, size = rest.split("_")
    assert (crs, gsd) == ("EPSG:3067", "0.5m") and "x" in size
    # Faults on the block requests are retried; the bytes stay the same.
    with Emulator(fx["collections"], faults="500:0.3,truncate:0.2", seed=2) as emu:
        faulty = run_fetch(_ee(fx, tmp_path / "faulty", emu, max_attempts=12))
        assert sum(emu.stats.faults.values()) > 0
    assert faulty.ok == 30 and _files(tmp_path / "faulty") == _files(tmp_path / "alone")


def test_a_block_too_large_for_earth_engine_is_split(fx, tmp_path, monkeypatch):
    with Emulator(fx["collections"]) as emu:
        whole = run_fetch(_ee(fx, tmp_path / "whole", emu, blocks="off"))
        # Room for a tile and a little more, not for the planned blocks.
        monkeypatch.setattr(emulator_pixels, "MAX_REQUEST_BYTES", 96 * 96 * 3)
        emu.reset()
        split_run = run_fetch(_ee(fx, tmp_path / "split", emu))
        refused = emu.stats.count("image:computePixels", 400)
        answered = emu.stats.count("image:computePixels", 200)
    assert refused >= 2 and answered > refused  # blocks refused, then their halves answered
    assert whole.ok == split_run.ok == 30 and split_run.failed == 0
    assert _files(tmp_path / "split") == _files(tmp_path / "whole")


def test_sigkill_during_block_fetching_then_rerun_equals_a_clean_run(fx, tmp_path):
    rows = fixture_data.request_rows(48, seed=8)
    requests = fixture_data.write_requests(tmp_path / "req", [rows[:24], rows[24:]])
    common = ["--concurrency", "2", "--shard-size", "8", "--block-max-px", "128"]
    with Emulator(fx["collections"], latency_ms=150, latency_ms_per_mpx=20_000) as emu:
        reference = run_fetch(_ee(fx, tmp_path / "ref", emu, requests=requests, blocks="off"))
        assert reference.ok == 48
        emu.reset()
        out = tmp_path / "ds"
        cmd = [sys.executable, "-m", "skyscript_build.cli", "fetch", "--requests", str(requests)]
        cmd += ["--out", str(out), "--backend", "earthengine", "--ee-url", emu.url]
        cmd += ["--project", "p", *common]
        env = {**os.environ, "SKYSCRIPT_NO_PROGRESS": "1"}
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        journals = out / "manifest"
        while time.monotonic() < deadline and not list(journals.glob("_*.journal.jsonl")):
            time.sleep(0.02)
        time.sleep(0.3)  # some blocks written, others in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        killed_with = len(list(out.glob("images*/*.jpg")))
        assert 0 < killed_with < 48  # it really was mid-run
        assert emu.stats.max_concurrency <= 2  # a block is a request for the caps
        emu.reset()
        rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        resent = emu.stats.count("image:computePixels")
    assert "48 ok, 0 skipped, 0 failed" in rerun.stdout
    assert resent < reference.ok  # the blocks finished before the kill were not fetched again
    assert _files(out) == _files(tmp_path / "ref")
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.journal.jsonl"))


def test_pipeline_fetch_settings_reach_the_stage(fx, tmp_path):
    import shutil

    import skyscript_build.fetch as fetch_module
    from skyscript_build.pipeline import load_pipeline
    from skyscript_build.pipeline._stages import STAGE_SPECS, RunContext

    text = f"""\
name: blocks
build_dir: {tmp_path / "build"}
input: data/helsinki.osm.pbf
sources: [FI]
backend:
  type: emulator
  collections: {fx["collections"]}
  latency_ms_per_mpx: 50
fetch:
  blocks: off
  block_ms_per_mpx: 20
  jpeg_quality: 80
  jpeg_encoder: pillow-optimize
  verify: true
"""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    pipeline = load_pipeline(path)
    assert pipeline.backend.latency_ms_per_mpx == 50
    shutil.copytree(fx["requests"], pipeline.requests_dir)
    config = STAGE_SPECS["fetch"].build(pipeline, RunContext(emulator_url="http://x"), fetch_module)
    assert (config.blocks, config.block_ms_per_mpx, config.jpeg_quality) == ("off", 20, 80)
    assert config.jpeg_encoder == "pillow-optimize" and config.verify
    path.write_text(text.replace("blocks: off", "blocks: sometimes"))
    with pytest.raises(ConfigError, match="fetch.blocks: 'sometimes' is not one of auto, off"):
        load_pipeline(path)
