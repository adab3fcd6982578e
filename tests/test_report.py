"""The build report: counts, valid PNGs, and a page that loads cleanly in headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _chromium import check_page_in_chromium, needs_chromium
from conftest import load_fixture_script
from PIL import Image

from skyscript_build.report import ReportConfig, run_report

make_build = load_fixture_script("report").make_build


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_build(tmp_path_factory.mktemp("report") / "build")


@pytest.fixture(scope="module")
def report(build: Path) -> Path:
    result = run_report(ReportConfig(build_dir=build))
    assert result.path == build / "report" / "index.html"
    return result.path


def test_report_counts_every_stage(build: Path, report: Path):
    result = run_report(ReportConfig(build_dir=build, out=build / "report2"))
    counts = result.counts
    assert counts["objects"] == 40
    assert counts["requests"] == 32  # every fifth object has no tile
    assert counts["fetched ok"] + counts["fetched skipped"] + counts["fetched failed"] == 32
    assert counts["captions"] == counts["fetched ok"]
    assert counts["SkyScript_train_top30pct_filtered_by_tiny.csv"] == counts["captions"] * 3 // 10
    assert "40 objects" in result.summary()


def test_report_page_says_what_it_must(report: Path):
    page = report.read_text(encoding="utf-8")
    assert "(c)" in page and "OpenStreetMap contributors, ODbL" in page
    assert "Synthetic imagery" in page  # the fixture's backend is the emulator
    assert "CLIP ranking is meaningless" in page  # and its model has random weights
    for heading in (
        "Counts per stage",
        "Per image source",
        "Tag keys (top 50)",
        "Caption lengths",
        "Map of tiles",
        "Sample images",
        "Failures by reason",
        "CLIP scores",
    ):
        assert heading in page
    assert "skipped: no-image" in page and "failed: http-500" in page
    assert "No data yet" not in page


def test_report_images_are_valid_and_relative(report: Path):
    out = report.parent
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "caption_lengths.png",
        "failures.png",
        "map.png",
        "scores.png",
        "sources.png",
        "tag_keys.png",
    ]
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    samples = sorted((out / "samples").glob("*.jpg"))
    assert len(samples) == 12
    page = report.read_text(encoding="utf-8")
    assert 'src="samples/000.jpg"' in page and "file://" not in page and 'src="/' not in page


def test_report_on_an_empty_build_says_no_data(tmp_path: Path, cli):
    (tmp_path / "empty").mkdir()
    result = cli("report", tmp_path / "empty")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "empty" / "report" / "index.html").read_text(encoding="utf-8")
    assert page.count("No data yet") == 7
    assert "Synthetic imagery" not in page and "meaningless" not in page
    assert "not run" in page


def test_report_of_missing_folder_is_one_line_exit_2(tmp_path: Path, cli):
    result = cli("report", tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "build folder not found" in result.stderr


def test_report_after_partial_build(build: Path, tmp_path: Path):
    partial = tmp_path / "partial"
    shutil.copytree(build / "objects", partial / "objects")
    shutil.copytree(build / "requests", partial / "requests")
    result = run_report(ReportConfig(build_dir=partial))
    page = result.path.read_text(encoding="utf-8")
    assert result.counts == {"objects": 40, "requests": 32}
    assert "No data yet: no caption CSV" in page and "No data yet: no fetch manifest" in page
    assert (partial / "report" / "map.png").is_file()


@needs_chromium
def test_report_loads_in_chromium_without_errors(report: Path):
    state = check_page_in_chromium(report.as_uri())
    assert state["errors"] == []
    assert len(state["images"]) == 18  # 6 charts + 12 samples
    broken = [src for src, complete, width in state["images"] if not complete or width == 0]
    assert broken == []


@needs_chromium
def test_chromium_check_catches_broken_images_and_errors(tmp_path: Path):
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png"><script>console.error("boom")</script></body></html>'
    )
    state = check_page_in_chromium(page.as_uri())
    assert any("boom" in e for e in state["errors"])
    assert state["images"] == [["missing.png", True, 0]]


def test_report_without_notes_for_real_imagery_and_weights(build: Path, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    real = tmp_path / "real"
    shutil.copytree(build, real, ignore=shutil.ignore_patterns("report*", "pipeline.json"))
    scores = pq.read_table(real / "dataset" / "scores.parquet")
    scores = scores.set_column(
        scores.schema.get_field_index("pretrained"),
        "pretrained",
        pa.array(["openai"] * scores.num_rows),
    )
    pq.write_table(scores, real / "dataset" / "scores.parquet")
    page = run_report(ReportConfig(build_dir=real)).path.read_text(encoding="utf-8")
    assert "Synthetic imagery" not in page and "meaningless" not in page
    assert "pretrained openai" in page
