"""The fetch stage on local rasters: SkyScript's layout, meta pickles, manifest, resume, formats."""

from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_fixture_script
from PIL import Image

from skyscript_build.errors import InputError
from skyscript_build.fetch import FetchConfig, iter_manifest, part_of, run_fetch
from skyscript_build.fetch._writer import MANIFEST_SCHEMA
from skyscript_build.fetch.backends import close_backends
from skyscript_build.meta import load_meta

DATA = Path(__file__).parent / "data" / "fetch"
fixture_data = load_fixture_script("fetch")


@pytest.fixture(autouse=True)
def _fresh_backends():
    yield
    close_backends()


@pytest.fixture
def fx(tmp_path):
    return fixture_data.make_fixture(tmp_path / "fx", n=10, parts=2)


def _config(fx, out: Path, **kw) -> FetchConfig:
    return FetchConfig(
        requests=fx["requests"], out=out, backend="raster", location=str(fx["rasters"]), **kw
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "manifest" not in p.parts
    }


def test_part_of_is_stable_and_in_range():
    assert part_of("a1000_FI_19", 6) == part_of("a1000_FI_19", 6)
    parts = {part_of(f"a{i}_FI_19", 6) for i in range(200)}
    assert parts == set(range(2, 8))


def test_layout_meta_and_manifest(fx, tmp_path):
    out = tmp_path / "ds"
    result = run_fetch(_config(fx, out, shard_size=4))
    assert (result.ok, result.skipped, result.failed) == (10, 0, 0)
    assert "10 ok" in result.summary()
    rows = list(iter_manifest(out))
    assert len(rows) == 10 and len(list((out / "manifest").glob("*.stats.json"))) == 4
    assert pq.read_schema(next((out / "manifest").glob("*.parquet"))) == MANIFEST_SCHEMA
    requests = pq.read_table(fx["requests"] / "part-00000.parquet").to_pylist()
    first = requests[0]
    row = next(r for r in rows if r["key"] == first["key"])
    k = part_of(first["key"], 6)
    assert row["filepath"] == f"images{k}/{first['key']}.jpg"
    assert row["status"] == "ok" and row["bytes"] > 0 and row["image_id"] == "helsinki_2019"
    assert row["collection"] == "Finland/SMK/V/50cm"
    with Image.open(out / row["filepath"]) as im:
        assert im.format == "JPEG" and im.size == (64, 64)
    with open(out / f"meta{k}" / f"{first['key']}.pickle", "rb") as f:
        meta = pickle.load(f)
    assert list(meta) == ["box", "time", "center_tags", "surrounding_tags"]
    assert meta["box"] == (first["west"], first["south"], first["east"], first["north"])
    assert meta["time"] == (2019, 6, 15, 10, 30)
    assert meta["center_tags"] == {"building": "yes", "roof:shape": "flat"}
    assert meta["surrounding_tags"] == [{"highway": "footway"}, {"natural": "tree"}]
    assert load_meta(str(out / f"meta{k}" / f"{first['key']}.pickle")) == meta


def test_rerun_does_nothing_and_is_deterministic(fx, tmp_path):
    out, again = tmp_path / "ds", tmp_path / "ds2"
    run_fetch(_config(fx, out))
    before = _files(out)
    second = run_fetch(_config(fx, out))
    assert second.fetched == 0 and second.shards_run == 0 and second.ok == 10
    assert _files(out) == before
    run_fetch(_config(fx, again, workers=1, shard_size=3))
    assert _files(again) == before  # same files whatever the sharding


def test_permanent_skips_are_recorded_and_rerun_retries_only_failures(fx, tmp_path):
    rows = fixture_data.request_rows(3, seed=1, prefix="n")
    rows += fixture_data.request_rows(2, seed=2, prefix="w", years=(2015,))
    rows += fixture_data.request_rows(1, seed=3, prefix="x", inside=False)
    requests = fixture_data.write_requests(tmp_path / "req", [rows])
    out = tmp_path / "ds"
    cfg = FetchConfig(requests=requests, out=out, backend="raster", location=str(fx["rasters"]))
    result = run_fetch(cfg)
    assert (result.ok, result.skipped, result.failed) == (3, 3, 0)
    assert result.reasons == {"no-image": 3}
    by_key = {r["key"]: r for r in iter_manifest(out)}
    assert by_key["w1000_FI_15"]["filepath"] is None
    assert not list(out.rglob("w1000_FI_15.*"))
    # A failed (retryable) row is refetched on the next run, the others are kept.
    part = out / "manifest" / "part-00000.parquet"
    table = pq.read_table(part).to_pylist()
    table[0].update(status="failed", reason="http-429", filepath=None)
    pq.write_table(pa.Table.from_pylist(table, schema=MANIFEST_SCHEMA), part)
    stats = out / "manifest" / "part-00000.stats.json"
    stats.write_text(json.dumps({**json.loads(stats.read_text()), "retryable": 1}))
    rerun = run_fetch(cfg)
    assert rerun.fetched == 1 and rerun.ok == 3


def test_missing_files_of_an_unfinished_shard_are_refetched(fx, tmp_path):
    out = tmp_path / "ds"
    run_fetch(_config(fx, out))
    victim = next(out.glob("images*/*.jpg"))
    victim.unlink()
    (out / "manifest" / "part-00000.stats.json").unlink()
    (out / "manifest" / "part-00001.stats.json").unlink()
    (victim.parent / f".{victim.name}.abc.tmp").write_bytes(b"half")  # a crash leftover
    result = run_fetch(_config(fx, out))
    assert victim.exists() and result.fetched == 1
    assert not list(out.rglob("*.tmp"))


def test_no_temporary_file_of_a_lost_writer_is_left(fx, tmp_path, monkeypatch):
    """A writer killed during the run (a lost Dask worker) leaves a temporary file that the
    shard's retry does not reuse: the finished dataset has none."""
    import skyscript_build.fetch as fetch

    out = tmp_path / "ds"
    real_fetch_shard = fetch.fetch_shard

    def shard_with_a_lost_writer(shard, *args, **kw):
        result = real_fetch_shard(shard, *args, **kw)
        (out / "images2" / ".n1_FI_19.jpg.lost.tmp").write_bytes(b"half")
        return result

    monkeypatch.setattr(fetch, "fetch_shard", shard_with_a_lost_writer)
    run_fetch(_config(fx, out))
    assert list(out.glob("images*/*.jpg"))
    assert not list(out.rglob("*.tmp"))


def test_webdataset_format(fx, tmp_path):
    out = tmp_path / "wds"
    result = run_fetch(_config(fx, out, format="webdataset", shard_size=5))
    assert result.ok == 10
    tars = sorted((out / "webdataset").glob("*.tar"))
    assert [t.name for t in tars] == ["part-00000.tar", "part-00001.tar"]
    with tarfile.open(tars[0]) as tf:
        names = tf.getnames()
        assert len(names) == 15
        key = names[0].rsplit(".", 1)[0]
        assert names[:3] == [f"{key}.jpg", f"{key}.json", f"{key}.txt"]
        info = json.loads(tf.extractfile(f"{key}.json").read())
        text = tf.extractfile(f"{key}.txt").read().decode()
    assert info["time"] == [2019, 6, 15, 10, 30] and info["image_id"] == "helsinki_2019"
    assert text.startswith("building=yes, roof:shape=flat\nhighway=footway; natural=tree")
    assert not list(out.glob("images*/*.jpg"))
    rows = list(iter_manifest(out))
    assert rows[0]["filepath"].startswith("webdataset/part-00000.tar#")


def test_bad_inputs_are_one_line_errors(fx, tmp_path, cli):
    with pytest.raises(InputError, match="requests folder does not exist"):
        FetchConfig(requests=tmp_path / "none", out=tmp_path / "ds")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"key": ["a"]}), bad / "part-00000.parquet")
    result = cli("fetch", "--requests", bad, "--out", tmp_path / "ds")
    assert result.returncode == 2
    assert "part-00000.parquet: not a requests file: missing column(s)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "ds").exists()
    result = cli("fetch", "--requests", fx["requests"], "--out", tmp_path / "ds", "--parts", "0")
    assert result.returncode == 2 and "--parts must be at least 1" in result.stderr


def test_cli_fetch_raster(fx, tmp_path, cli):
    out = tmp_path / "ds"
    args = ("fetch", "--requests", fx["requests"], "--out", out, "--backend", "raster")
    result = cli(*args, "--location", fx["rasters"], "--parts", "2")
    assert result.returncode == 0, result.stderr
    assert "fetch: 10 ok, 0 skipped, 0 failed" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "images2", "images3", "manifest", "meta2", "meta3",
    ]  # fmt: skip


def test_a_changed_plan_reruns_its_shards(fx, tmp_path):
    out = tmp_path / "ds"
    run_fetch(_config(fx, out))
    rows = fixture_data.request_rows(10, seed=0)
    rows[3] = fixture_data.request_rows(1, seed=9, prefix="n")[0]  # the plan changed one key
    fixture_data.write_requests(fx["requests"], [rows[:5], rows[5:]])
    result = run_fetch(_config(fx, out))
    assert result.shards_run == 1 and result.fetched == 1  # only the new key is fetched
    assert any(r["key"] == "n1000_FI_19" for r in iter_manifest(out))
    assert not list(out.rglob("a1003_FI_19.*"))  # the dropped request's files are gone
    assert len(list(out.glob("images*/*.jpg"))) == len(list(out.glob("meta*/*.pickle"))) == 10


@pytest.mark.slow
def test_a_pipeline_source_reaches_dask_workers(fx, tmp_path):
    """A raster source registered in this process only is used by the worker processes."""
    import image_sources

    source = image_sources.source_from_dict(
        {"alias": "HX", "collection": "test/helsinki", "gsd": 0.5, "years": [2019],
         "backend": "raster", "location": str(fx["rasters"]),
         "coverage": [24.0, 60.0, 25.5, 60.5]}
    )  # fmt: skip
    image_sources.add_source(source, replace=True)
    try:
        rows = fixture_data.request_rows(6, seed=4)
        for row in rows:
            row.update(alias="HX", collection="test/helsinki", key=row["key"].replace("FI", "HX"))
        requests = fixture_data.write_requests(tmp_path / "req", [rows])
        config = FetchConfig(requests=requests, out=tmp_path / "ds", workers=2, shard_size=3)
        result = run_fetch(config)  # no --backend: the source's own (raster, its folder)
    finally:
        image_sources.remove_source("HX")
    assert (result.ok, result.shards_run) == (6, 2), result.summary()
    assert {r["image_id"] for r in iter_manifest(tmp_path / "ds")} == {"helsinki_2019"}


def test_an_alias_the_catalog_lacks_stops_before_any_work(fx, tmp_path, cli):
    """No fallback to the request's collection: an unknown alias is an error, naming the file."""
    rows = fixture_data.request_rows(4, seed=3)
    rows[2].update(alias="ZZ", key=rows[2]["key"].replace("FI", "ZZ"))
    requests = fixture_data.write_requests(tmp_path / "req", [rows])
    out = tmp_path / "ds"
    result = cli("fetch", "--requests", requests, "--out", out, "--backend", "raster",
                 "--location", fx["rasters"])  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "part-00000.parquet" in result.stderr and "image source(s) ZZ not in the catalog" in (
        result.stderr
    )
    assert not out.exists()


def test_a_rerun_repairs_lost_and_damaged_files(fx, tmp_path):
    out = tmp_path / "ds"
    run_fetch(_config(fx, out, shard_size=4))
    clean = _files(out)
    jpgs, metas = sorted(out.glob("images*/*.jpg")), sorted(out.glob("meta*/*.pickle"))
    jpgs[0].unlink()
    metas[1].unlink()
    jpgs[2].write_bytes(jpgs[2].read_bytes()[:100])  # truncated
    part = out / "manifest" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:50])  # a truncated manifest part: its shard is redone
    result = run_fetch(_config(fx, out, shard_size=4))
    assert result.repaired == {"missing": 2, "size": 1, "manifest": 1}
    assert "repaired 4 (manifest 1, missing 2, size 1)" in result.summary()
    assert result.ok == 10 and _files(out) == clean
    assert len(list(iter_manifest(out))) == 10
    # Same size, other bytes: only --verify decodes, and finds it.
    data = jpgs[3].read_bytes()
    jpgs[3].write_bytes(bytes(64) + data[64:])  # its header zeroed
    assert run_fetch(_config(fx, out, shard_size=4)).repaired == {}
    verified = run_fetch(_config(fx, out, shard_size=4, verify=True))
    assert verified.repaired == {"corrupt": 1} and _files(out) == clean
    again = run_fetch(_config(fx, out, shard_size=4, verify=True))
    assert again.repaired == {} and again.fetched == 0 and again.shards_done_before == 4


def test_a_changed_jpeg_encoding_refetches(fx, tmp_path):
    out = tmp_path / "ds"
    run_fetch(_config(fx, out))
    before = _files(out)
    result = run_fetch(_config(fx, out, jpeg_quality=70))
    assert result.fetched == 10
    after = _files(out)
    assert after.keys() == before.keys()
    assert all(len(after[k]) < len(before[k]) for k in after if k.endswith(".jpg"))


def test_bad_backend_settings_stop_before_any_work(fx, tmp_path, cli):
    out = tmp_path / "ds"
    base = ("fetch", "--requests", fx["requests"], "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("--backend", "raster"), "image source FI has no raster folder: give --location"),
        (("--backend", "raster", "--location", empty), "no GeoTIFF files (*.tif) for source FI"),
        (("--backend", "xyz"), "image source FI needs an XYZ URL template"),
        (
            ("--backend", "xyz", "--location", "http://127.0.0.1:9/{z}/{x}/{y}.png"),
            "cannot reach the tile server 127.0.0.1:9 (connection)",
        ),
    ]
    for args, message in cases:
        result = cli(*base, *args, "--max-attempts", "1")
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    result = cli("fetch", "--requests", fx["requests"], "--out", afile, "--backend", "raster")
    assert result.returncode == 2 and f"--out {afile}: is a file, not a folder" in result.stderr
