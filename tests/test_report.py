"""The build report: counts, valid PNGs, and a page that loads cleanly in headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _chromium import check_page_in_chromium, needs_chromium
from conftest import load_fixture_script
from PIL import Image

from skyscript_build.report import ReportConfig, run_report
from skyscript_build.report._data import Problems, read_captions

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


# --- damaged builds, refused and failed runs (issue 14) ------------------------------------


def _damaged(build: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(build, copy, ignore=shutil.ignore_patterns("report*"))
    return copy


def test_missing_and_corrupt_sample_images_are_skipped_and_counted(build: Path, tmp_path: Path):
    damaged = _damaged(build, tmp_path)
    dataset = damaged / "dataset"
    candidates = read_captions(dataset / "SkyScript_captions.csv", Problems(), keep=48)
    first = [dataset / row["filepath"] for row in candidates["candidates"][:3]]
    first[0].write_bytes(first[0].read_bytes()[:200])  # a truncated JPEG
    first[1].write_bytes(b"not a jpeg at all")
    first[2].unlink()
    result = run_report(ReportConfig(build_dir=damaged))
    assert result.skipped == {"corrupt image": 2, "missing image": 1}
    assert len(list((damaged / "report" / "samples").glob("*.jpg"))) == 12  # others instead
    page = result.path.read_text(encoding="utf-8")
    assert "Problems found" in page and first[2].name in page and first[0].name in page
    assert "skipped 3 files (2 corrupt image, 1 missing image)" in result.summary()
    assert result.counts["captions"] == candidates["n"]


def test_unreadable_parquet_parts_and_csvs_are_skipped_and_counted(
    build: Path, tmp_path: Path, cli
):
    damaged = _damaged(build, tmp_path)
    manifest = damaged / "dataset" / "manifest" / "part-00000.parquet"
    manifest.write_bytes(manifest.read_bytes()[:100])  # truncated
    objects = damaged / "objects" / "part-00000.parquet"
    shutil.copy(objects, damaged / "objects" / "part-00001.parquet")
    objects.write_bytes(b"PAR1 garbage PAR1")
    (damaged / "dataset" / "scores.parquet").write_bytes(b"")
    bad_csv = damaged / "dataset" / "SkyScript_val_5_filtered_by_tiny.csv"
    bad_csv.write_bytes(b"filepath,title\n\xff\xfe broken\n")
    r = cli("report", damaged)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "skipped 4 files (1 unreadable CSV, 3 unreadable parquet file)" in r.stdout
    page = (damaged / "report" / "index.html").read_text(encoding="utf-8")
    for path in (manifest, objects, bad_csv, damaged / "dataset" / "scores.parquet"):
        assert str(path) in page
    assert "40 objects" in r.stdout  # from the readable part
    assert "No data yet: no fetch manifest" in page


def test_samples_0_shows_none(build: Path, tmp_path: Path, cli):
    out = tmp_path / "r0"
    r = cli("report", build, "--out", out, "--samples", "0")
    assert r.returncode == 0, r.stderr
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "None asked for" in page and not (out / "samples").exists()


@pytest.mark.parametrize("case", ["out-under-a-file", "out-a-file", "no-dataset", "samples"])
def test_refused_report_is_one_line_and_creates_nothing(build: Path, tmp_path: Path, cli, case):
    (tmp_path / "a_file").write_text("x")
    args: list = ["report", build, "--out", tmp_path / "new" / "report"]
    named = {
        "out-under-a-file": tmp_path / "a_file",
        "out-a-file": tmp_path / "a_file",
        "no-dataset": tmp_path / "no-such-dataset",
        "samples": "--samples -1",
    }[case]
    if case == "out-under-a-file":
        args[3] = tmp_path / "a_file" / "report"
    elif case == "out-a-file":
        args[3] = tmp_path / "a_file"
    elif case == "no-dataset":
        args += ["--dataset", named]
    else:
        args += ["--samples", "-1"]
    before = sorted(tmp_path.rglob("*")), sorted(build.iterdir())
    r = cli(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert str(named) in r.stderr
    assert (sorted(tmp_path.rglob("*")), sorted(build.iterdir())) == before


def test_a_failed_report_leaves_the_old_one_and_no_new_folder(
    build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from skyscript_build.report import stage as report_module

    out = tmp_path / "report"
    run_report(ReportConfig(build_dir=build, out=out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):  # the user presses Ctrl-C while the map is drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "_map_chart", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_report(ReportConfig(build_dir=build, out=out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder
    with pytest.raises(KeyboardInterrupt):
        run_report(ReportConfig(build_dir=build, out=tmp_path / "new" / "deeper"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
