"""The embedded default, end to end: `skyscript-build run` on the shipped demo pipeline.

The shipped pipelines/demo_helsinki.yaml is run as a user runs it (a subprocess, from a fresh
folder, so `run` renders the synthetic orthophoto itself, starts the Earth Engine emulator,
runs every stage on a local Dask cluster and stops the emulator), cut to a few hundred
requests so that it stays short. A second run must reuse everything and change nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from _chromium import check_page_in_chromium, needs_chromium
from conftest import run_cli

from skyscript_build.meta import load_meta

REPO = Path(__file__).resolve().parent.parent
MAX_REQUESTS = 150
SHARD_SIZE = 10

pytestmark = pytest.mark.slow


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (stats files, which record
    durations, only by name)."""
    return {
        str(p.relative_to(folder)): "stats"
        if p.suffix == ".json" and "stats" in p.name
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def demo_pipeline(work: Path, **changes: dict) -> Path:
    """The shipped demo pipeline, cut short, with ``changes`` merged into its sections."""
    pipeline = yaml.safe_load((REPO / "pipelines" / "demo_helsinki.yaml").read_text())
    pipeline["input"] = str(REPO / pipeline["input"])  # the bundled extract
    pipeline["plan"]["max_requests"] = MAX_REQUESTS
    pipeline["fetch"] = {"shard_size": SHARD_SIZE}  # several shards, for the cluster test
    for key, value in changes.items():
        if isinstance(value, dict):
            pipeline.setdefault(key, {}).update(value)
        else:
            pipeline[key] = value
    path = work / f"{pipeline['build_dir'].split('/')[-1]}.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("demo")
    path = demo_pipeline(work)
    first = run_cli("run", path, cwd=work, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    build = work / "build" / "demo_helsinki"
    digest = tree_digest(build / "dataset")
    second = run_cli("run", path, cwd=work, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"work": work, "build": build, "first": first, "second": second, "digest": digest}


def test_every_stage_ran_and_said_so(demo: dict):
    out = demo["first"].stdout
    lines = out.splitlines()
    for stage in ("extract", "plan", "fetch", "caption", "filter", "report"):
        assert any(line.startswith(f"{stage}: ") for line in lines), out
    assert f"dataset in {demo['build'] / 'dataset'}" in out
    assert f"report at {demo['build'] / 'report' / 'index.html'}" in out
    assert "imagery is synthetic" in out and "ranking is meaningless" in out
    assert "Traceback" not in demo["first"].stderr


def test_run_made_the_demo_data_itself(demo: dict):
    data = demo["work"] / "build" / "demo-data"
    assert (data / "collections.yaml").is_file()
    assert any(data.glob("*.tif"))


def test_dataset_in_skyscript_layout(demo: dict):
    dataset = demo["build"] / "dataset"
    images = sorted(dataset.glob("images*/*.jpg"))
    metas = sorted(dataset.glob("meta*/*.pickle"))
    assert 0 < len(images) <= MAX_REQUESTS
    assert {p.parent.name for p in images} <= {f"images{k}" for k in range(2, 8)}
    assert [(p.parent.name[6:], p.stem) for p in images] == [
        (p.parent.name[4:], p.stem) for p in metas
    ]
    meta = load_meta(str(metas[0]))
    assert set(meta) == {"box", "time", "center_tags", "surrounding_tags"}
    assert meta["time"][0] == 2019 and images[0].stem.endswith("_FI_19")
    with open(dataset / "SkyScript_captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["filepath"] for r in rows] == sorted(str(p.relative_to(dataset)) for p in images)
    assert all(r["title"] for r in rows)
    names = {p.name for p in dataset.glob("*.csv")}
    name = "tiny-random"
    assert {
        "SkyScript_captions.csv",
        f"SkyScript_train_top30pct_filtered_by_{name}.csv",
        f"SkyScript_train_top50pct_filtered_by_{name}.csv",
        f"SkyScript_val_20_filtered_by_{name}.csv",
        f"SkyScript_test_50_filtered_by_{name}.csv",
    } == names
    assert (dataset / "scores.parquet").is_file()
    assert any((dataset / "manifest").glob("part-*.parquet"))
    page = (demo["build"] / "report" / "index.html").read_text(encoding="utf-8")
    assert "Synthetic imagery" in page and "OpenStreetMap contributors, ODbL" in page


@needs_chromium
def test_demo_report_renders_in_chromium(demo: dict):
    state = check_page_in_chromium((demo["build"] / "report" / "index.html").as_uri())
    assert state["errors"] == []
    assert len(state["images"]) == 6 + 12  # the charts and the sample images
    assert all(complete and width > 0 for _, complete, width in state["images"])


def test_second_run_reuses_everything(demo: dict):
    out = demo["second"].stdout
    assert "extract: already done" in out
    assert "0 tiles fetched" in out
    assert "caption: up to date" in out
    stats = json.loads((demo["build"] / "dataset" / "SkyScript_captions.stats.json").read_text())
    assert stats["chunks_by_worker"] and "local" not in stats["chunks_by_worker"]  # on Dask
    assert "0 scored" in out
    assert tree_digest(demo["build"] / "dataset") == demo["digest"]


def test_a_damaged_build_is_repaired_by_a_rerun(demo: dict, tmp_path: Path):
    """Deleted images and metas, truncated JPEGs, a truncated manifest part: a rerun of
    `run` brings every file back with its original bytes, and every CSV row points at an image
    that decodes."""
    import shutil

    from PIL import Image

    work = tmp_path / "work"
    shutil.copytree(demo["work"], work)
    dataset = work / "build" / "demo_helsinki" / "dataset"
    images = sorted(dataset.glob("images*/*.jpg"))
    assert len(images) > 20
    for image in images[:3]:  # the image and its meta file deleted by hand
        image.unlink()
        (dataset / f"meta{image.parent.name[6:]}" / f"{image.stem}.pickle").unlink()
    images[3].unlink()  # an image alone
    for image in images[4:6]:  # cut short, as by a full disk
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    part = sorted((dataset / "manifest").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])

    path = work / "demo_helsinki.yaml"
    rerun = run_cli("run", path, cwd=work, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "repaired" in rerun.stdout, rerun.stdout
    after = tree_digest(dataset)
    for name, digest in demo["digest"].items():
        if name.endswith((".jpg", ".pickle", ".csv")):
            assert after.get(name) == digest, name
    for table in dataset.glob("*.csv"):
        with open(table, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                with Image.open(dataset / row["filepath"]) as img:
                    img.load()


RASTER_PIPELINE = """\
name: raster_sources
input: {pbf}
sources: [HEL]
source_definitions:       # a source of the pipeline's own: Dask workers must know it too
  HEL:
    collection: helsinki-local
    gsd: 0.5
    years: [2019]
    backend: raster
    location: {folder}
    stretch: [0, 200]
plan:
  years: 2019
  max_requests: 25
backend:
  type: raster
  folder: {folder}
cluster:
  workers: {workers}
"""


def write_test_raster(folder: Path) -> None:
    """A seeded RGB GeoTIFF over central Helsinki, acquired in 2019, values 0..200."""
    import numpy as np
    import rasterio
    from rasterio.transform import Affine

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    height, width = 500, 1000
    pixels = rng.integers(0, 200, size=(3, height, width), dtype=np.uint8)
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": Affine(0.1 / width, 0.0, 24.90, 0.0, -0.05 / height, 60.19),
    }
    with rasterio.open(folder / "helsinki_2019.tif", "w", **profile) as dst:
        dst.write(pixels)
        dst.update_tags(ACQUISITION_TIME="2019-06-15T10:30:00Z")


def test_own_sources_reach_dask_workers(tmp_path: Path):
    folder = tmp_path / "rasters"
    write_test_raster(folder)
    path = tmp_path / "raster.yaml"
    pbf = REPO / "data" / "helsinki.osm.pbf"
    path.write_text(RASTER_PIPELINE.format(pbf=pbf, folder=folder, workers=1))
    stages = ["--stage", "extract", "--stage", "plan", "--stage", "fetch"]
    local = run_cli("run", path, *stages, cwd=tmp_path, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    dataset = tmp_path / "build" / "raster_sources" / "dataset"
    inline = {k: v for k, v in tree_digest(dataset).items() if k.endswith((".jpg", ".pickle"))}
    assert len(inline) > 10
    (tmp_path / "inline").mkdir()
    dataset.rename(tmp_path / "inline" / "dataset")
    path.write_text(RASTER_PIPELINE.format(pbf=pbf, folder=folder, workers=2))
    on_dask = run_cli("run", path, "--stage", "fetch", cwd=tmp_path, timeout=300)
    assert on_dask.returncode == 0, on_dask.stderr[-3000:]
    assert "Dask: local cluster of 2 workers" in on_dask.stderr
    # The same stretch (0..200) on the workers as in one process: byte-identical tiles.
    assert {
        k: v for k, v in tree_digest(dataset).items() if k.endswith((".jpg", ".pickle"))
    } == inline


def test_cluster_run_matches_local_run_and_survives_a_lost_worker(demo: dict, dask_cluster):
    work = demo["work"]
    # Slower answers and fewer requests in flight (neither changes any output) so that the
    # fetch is still running when a worker is killed.
    path = demo_pipeline(
        work,
        build_dir="build/demo_cluster",
        backend={"latency_ms": 150, "concurrency": 4},
    )
    dataset = work / "build" / "demo_cluster" / "dataset"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "skyscript_build.cli",
            "run",
            str(path),
            "--scheduler",
            dask_cluster["address"],
        ],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(dataset.glob("images*/*.jpg")):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "the fetch did not start"
            time.sleep(0.05)
        done_at_kill = len(list(dataset.glob("manifest/part-*.stats.json")))
        dask_cluster["workers"][0].kill()  # a worker lost in the middle of the fetch
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err[-3000:]
    shards = len(list(dataset.glob("manifest/part-*.stats.json")))
    # fetch cuts each requests part (plan writes parts per spatial shard) into SHARD_SIZE rows
    requests = sorted((dataset.parent / "requests").glob("part-*.parquet"))
    assert shards == sum(-(-pq.read_metadata(part).num_rows // SHARD_SIZE) for part in requests)
    assert shards >= -(-MAX_REQUESTS // SHARD_SIZE)
    assert done_at_kill < shards, "the worker was killed after the fetch had finished"
    assert f"connected to {dask_cluster['address']}" in err
    dashboards = [line for line in err.splitlines() if "dashboard" in line]
    assert len(dashboards) == 1, err[-3000:]  # one client for the whole run
    # The caption chunks ran on the cluster's surviving worker (w1), not in the client.
    from distributed import Client

    with Client(dask_cluster["address"], timeout="30s") as client:
        alive = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
    assert set(alive) == {"w1"}
    stats = json.loads((dataset / "SkyScript_captions.stats.json").read_text())
    assert set(stats["chunks_by_worker"]) == {alive["w1"]}
    local = demo["digest"]
    remote = tree_digest(dataset)
    # The same file set, byte-identical CSVs, images and meta files.
    assert sorted(remote) == sorted(local)
    for name, digest in local.items():
        if name.endswith((".csv", ".jpg", ".pickle")):
            assert remote[name] == digest, name
