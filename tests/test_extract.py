"""The extract stage on the real Helsinki extract and on small OPL fixtures.

Counts are checked against an independent pass made here with osmium's own filters and area
assembly; regions cut with osmium-tool must give the objects of the whole file; many tasks the
rows of one; bad inputs go through the real command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import osmium
import osmium.filter
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from conftest import load_fixture_script

from skyscript_build.errors import ConfigError, InputError
from skyscript_build.extract import OSM_CREDIT, ExtractConfig, run_extract
from skyscript_build.extract._rules import is_area
from tag_filters import load_tag_filter

PROBLEMS_OPL = load_fixture_script("extract").PROBLEMS_OPL
opl_to_pbf = load_fixture_script("extract").opl_to_pbf
rechunk = load_fixture_script("extract").rechunk

COLUMNS = ["osm_type", "osm_id", "osm_element", "tags", "max_gsd", "geometry", "bbox"]
#: geopandas reads a GeoParquet 1.1 covering column as metadata of the geometry, not a column.
GPD_COLUMNS = COLUMNS[:-1]


def _rows(out: Path) -> pa.Table:
    """Every row of an extract, parts read in name order (what the plan stage reads)."""
    parts = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


@pytest.fixture(scope="module")
def helsinki_out(helsinki_pbf: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("extract") / "objects"
    result = run_extract(ExtractConfig(helsinki_pbf, out, workers=2))
    return out, result


@pytest.fixture(scope="module")
def helsinki_df(helsinki_out) -> gpd.GeoDataFrame:
    return gpd.read_parquet(helsinki_out[0])


def _groundable(tags) -> dict[str, str]:
    tf = load_tag_filter("default")
    return {t.k: t.v for t in tags if tf.is_groundable(t.k, t.v)}


def _expected_ids(pbf: Path) -> dict[str, set[int]]:
    """Ids per osm_type computed with osmium's own filters, locations and area assembly."""
    keys = sorted(load_tag_filter("default").candidate_keys() or ())
    expected: dict[str, set[int]] = {"n": set(), "w": set(), "a": set()}
    nodes = osmium.FileProcessor(str(pbf), osmium.osm.NODE).with_filter(
        osmium.filter.KeyFilter(*keys)
    )
    for n in nodes:
        if _groundable(n.tags):
            expected["n"].add(n.id)
    ways = (
        osmium.FileProcessor(str(pbf), osmium.osm.NODE | osmium.osm.WAY)
        .with_locations()
        .with_filter(osmium.filter.EntityFilter(osmium.osm.WAY))
        .with_filter(osmium.filter.KeyFilter(*keys))
    )
    for w in ways:
        tags = {t.k: t.v for t in w.tags}
        if not _groundable(w.tags):
            continue
        if w.is_closed() and len(w.nodes) >= 4 and is_area(tags):
            continue
        if all(n.location.valid() for n in w.nodes):
            unique = {(n.location.x, n.location.y) for n in w.nodes}
            if len(unique) >= 2:
                expected["w"].add(w.id)
    areas = (
        osmium.FileProcessor(str(pbf))
        .with_areas()
        .with_filter(osmium.filter.EntityFilter(osmium.osm.AREA))
    )
    for a in areas:
        tags = {t.k: t.v for t in a.tags}
        if _groundable(a.tags) and (not a.from_way() or is_area(tags)):
            expected["a"].add(a.orig_id())
    return expected


def test_helsinki_objects_match_an_independent_osmium_pass(helsinki_pbf, helsinki_df):
    expected = _expected_ids(helsinki_pbf)
    for osm_type, ids in expected.items():
        got = set(helsinki_df.loc[helsinki_df.osm_type == osm_type, "osm_id"])
        assert got == ids, osm_type
    assert len(helsinki_df) == sum(len(v) for v in expected.values())
    assert len(expected["n"]) > 1000 and len(expected["w"]) > 1000 and len(expected["a"]) > 500


def test_helsinki_rows_hold_only_groundable_tags_and_their_max_gsd(helsinki_pbf, helsinki_df):
    tf = load_tag_filter("default")
    some = {int(i) for i in helsinki_df.loc[helsinki_df.osm_type == "n", "osm_id"][:300]}
    originals = {
        n.id: _groundable(n.tags)
        for n in osmium.FileProcessor(str(helsinki_pbf), osmium.osm.NODE)
        if n.id in some
    }
    rows = helsinki_df[(helsinki_df.osm_type == "n") & helsinki_df.osm_id.isin(some)]
    for row in rows.itertuples():
        tags = dict(row.tags)
        assert list(row.tags) == list(originals[row.osm_id].items())  # OSM's order
        assert row.max_gsd == tf.max_gsd(tags)
    assert not any(
        k.startswith(("name", "addr:", "source")) for t in helsinki_df.tags for k, _ in t
    )


def test_helsinki_schema_geometry_and_round_trip(helsinki_out, helsinki_df, tmp_path):
    out, result = helsinki_out
    assert list(helsinki_df.columns) == GPD_COLUMNS
    table = _rows(out)
    assert table.column_names == COLUMNS
    assert helsinki_df.crs.to_epsg() == 4326
    assert helsinki_df.is_valid.all() and not helsinki_df.is_empty.any()
    kinds = helsinki_df.groupby("osm_type").geometry.apply(lambda g: set(g.geom_type))
    assert kinds["n"] == {"Point"}
    assert kinds["w"] <= {"LineString", "MultiLineString"}
    assert kinds["a"] <= {"Polygon", "MultiPolygon"}
    assert set(helsinki_df.osm_element) == {"node", "way", "relation"}
    assert (helsinki_df.loc[helsinki_df.osm_type == "n", "osm_element"] == "node").all()
    west, south, east, north = helsinki_df.total_bounds
    assert 24.9 < west < east < 25.0 and 60.1 < south < north < 60.2
    assert not helsinki_df.duplicated(["osm_type", "osm_element", "osm_id"]).any()
    # bbox: the geometry's bounds, declared as GeoParquet 1.1's covering.
    bounds = np.array(
        [[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in table["bbox"].to_pylist()]
    )
    assert (bounds == shapely.bounds(helsinki_df.geometry.values)).all()
    # Rows in the contract's order: points, lines, areas from ways, from relations, each by id.
    order = {"n": 0, "w": 1}
    keys = [
        (order.get(t, 2 if e == "way" else 3), i)
        for t, e, i in zip(
            helsinki_df.osm_type, helsinki_df.osm_element, helsinki_df.osm_id, strict=True
        )
    ]
    assert keys == sorted(keys)
    # The parquet metadata credits OSM; geopandas writes and reads it back unchanged.
    for part in sorted(out.glob("part-*.parquet")):
        meta = pq.read_schema(part).metadata
        assert meta[b"osm_copyright"].decode() == OSM_CREDIT
        geo = json.loads(meta[b"geo"])
        assert geo["version"] == "1.1.0"
        assert geo["columns"]["geometry"]["encoding"] == "WKB"
        assert geo["columns"]["geometry"]["covering"]["bbox"]["xmax"] == ["bbox", "xmax"]
    helsinki_df.to_parquet(tmp_path / "copy.parquet")
    again = gpd.read_parquet(tmp_path / "copy.parquet")
    assert again.geometry.geom_equals(helsinki_df.geometry).all()
    for column in ["osm_type", "osm_id", "osm_element", "max_gsd"]:
        assert again[column].tolist() == helsinki_df[column].tolist(), column
    assert [dict(t) for t in again.tags] == [dict(t) for t in helsinki_df.tags]
    assert result.objects == len(helsinki_df) and sum(result.by_type.values()) == result.objects
    assert result.dropped.get("missing_nodes", 0) > 0  # the extract is clipped at its edges


def test_rerun_of_a_finished_extract_is_a_no_op(helsinki_pbf, helsinki_out):
    out, first = helsinki_out
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_extract(ExtractConfig(helsinki_pbf, out, workers=2))
    assert again.skipped and again.objects == first.objects and again.seconds < 2
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before


@pytest.fixture(scope="module")
def chunked_pbf(helsinki_pbf, tmp_path_factory) -> Path:
    """Helsinki written again in blobs of 400 objects: a small file of many blobs."""
    return rechunk(helsinki_pbf, tmp_path_factory.mktemp("chunked") / "chunked.osm.pbf")


def test_many_tasks_give_the_rows_of_one(chunked_pbf, helsinki_out, tmp_path):
    """Tiny tasks (a few blobs each, several way and relation tasks, on two processes) give the
    same rows in the same order as one task per pass; only where parts begin differs."""
    out = tmp_path / "objects"
    result = run_extract(ExtractConfig(chunked_pbf, out, workers=2, task_mb=0.02))
    markers = [p.name.split("-")[1] for p in (out / "_markers").glob("*.done.json")]
    assert markers.count("nodes") > 10 and markers.count("ways") > 5
    assert markers.count("relations") >= 2
    assert result.tasks == len(markers) and len(result.parts) > len(helsinki_out[1].parts)
    assert _rows(out).equals(_rows(helsinki_out[0]))
    assert not (out / "_work").exists()


# Three regions of Helsinki that share borders, cut the way Geofabrik's extracts are: an object
# crossing a border is whole in every region it touches (osmium-tool's "smart" strategy).
REGIONS = ["24.93,60.16,24.944,60.172", "24.944,60.16,24.96,60.172", "24.93,60.172,24.96,60.18"]


@pytest.fixture(scope="module")
def regions(helsinki_pbf, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("regions")
    for i, box in enumerate(REGIONS):
        cut = ["osmium", "extract", "--strategy", "smart", "-b", box, str(helsinki_pbf)]
        subprocess.run([*cut, "-o", str(folder / f"r{i}.osm.pbf")], check=True)
    return folder


def test_regions_give_the_objects_of_the_whole_file(regions, helsinki_out, tmp_path):
    out = tmp_path / "objects"
    result = run_extract(ExtractConfig(regions, out, workers=2))
    assert result.inputs == 3 and result.duplicates > 100  # objects on a border, kept once
    assert _rows(out).equals(_rows(helsinki_out[0]))
    assert result.objects == helsinki_out[1].objects
    assert not (out / "_runs").exists() and not (out / "_work").exists()


def test_inputs_as_a_list_a_folder_or_a_glob(regions, helsinki_out, cli, tmp_path):
    """Any order of listing gives the same objects: copies are chosen by path."""
    files = sorted(regions.glob("*.osm.pbf"))
    forms = {
        "list": [files[2], files[0], files[1]],
        "folder": [regions],
        "glob": [regions / "r*.osm.pbf"],
    }
    for form, inputs in forms.items():
        out = tmp_path / form
        proc = cli("extract", *inputs, "--out", out, "--workers", "1")
        assert proc.returncode == 0, proc.stderr
        assert "from 3 inputs" in proc.stdout, form
        assert _rows(out).equals(_rows(helsinki_out[0])), form


MERGE_A = """\
n1 v1 x24.9400000 y60.1700000 Tamenity=bench
n2 v1 x24.9410000 y60.1700000
n3 v1 x24.9420000 y60.1700000
w10 v1 Nn1,n2,n3 Thighway=residential
"""
MERGE_B = """\
n1 v1 x24.9400000 y60.1700000 Tamenity=bench
n2 v1 x24.9410000 y60.1700000
n3 v1 x24.9420000 y60.1700000
n4 v1 x24.9430000 y60.1700000
w10 v1 Nn1,n2,n3,n4 Thighway=residential
w11 v1 Nn2,n3 Thighway=service
"""


def test_of_two_copies_the_longer_geometry_is_kept(tmp_path):
    """A way cut at a border by a simple extract is kept whole where it is whole; equal copies
    come from the first input by path."""
    a = opl_to_pbf(MERGE_A, tmp_path / "a.osm.pbf")  # w10 without n4: a shorter line
    b = opl_to_pbf(MERGE_B, tmp_path / "b.osm.pbf")
    out = tmp_path / "objects"
    result = run_extract(ExtractConfig([b, a], out, workers=1))
    rows = _rows(out)
    assert rows["osm_id"].to_pylist() == [1, 10, 11] and result.duplicates == 2
    line = shapely.from_wkb(rows["geometry"][1].as_py())
    assert len(line.coords) == 4  # b's copy
    assert result.summary().endswith(f"2 copies across inputs kept once; {result.seconds:.1f} s")


def test_one_bad_input_of_several(cli, tmp_path, regions):
    files = sorted(regions.glob("*.osm.pbf"))
    missing = tmp_path / "nope.osm.pbf"
    out = tmp_path / "out"
    _assert_user_error(cli("extract", *files, missing, "--out", out), missing, "not found", out)
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(cli("extract", files[0], empty, "--out", out), empty, "no .osm.pbf", out)
    data = bytearray(files[1].read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(2000)  # zeroes inside a compressed block
    bad = tmp_path / "bad.osm.pbf"
    bad.write_bytes(bytes(data))
    proc = cli("extract", files[0], bad, files[2], "--out", out, "--workers", "2")
    _assert_user_error(proc, bad, "OSM PBF", out)
    assert not out.exists()


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    pbf = opl_to_pbf(PROBLEMS_OPL, tmp_path_factory.mktemp("fx") / "problems.osm.pbf")
    out = pbf.parent / "objects"
    result = run_extract(ExtractConfig(pbf, out, workers=1))
    df = gpd.read_parquet(out)
    return result, {(r.osm_type, r.osm_id): r for r in df.itertuples()}


def test_closed_ways_are_areas_or_lines_by_their_tags(problems):
    _, rows = problems
    assert rows[("a", 100)].geometry.geom_type == "Polygon"  # building
    assert ("w", 100) not in rows
    assert rows[("w", 101)].geometry.geom_type == "LineString"  # footway around a block
    assert rows[("w", 102)].geometry.geom_type == "LineString"  # fence
    assert rows[("a", 103)].osm_element == "way"  # pedestrian area=yes
    assert rows[("a", 201)].osm_element == "relation"  # same id space kept apart
    assert dict(rows[("w", 106)].tags) == {"highway": "service", "surface": "asphalt"}


def test_per_object_problems_are_dropped_and_counted(problems):
    result, rows = problems
    assert ("w", 104) not in rows  # a node is missing
    assert ("a", 200) not in rows  # multipolygon whose ring does not close
    assert ("a", 105) not in rows  # self-intersecting ring osmium cannot assemble
    assert ("n", 7) not in rows and ("w", 107) not in rows  # only a name
    assert ("a", 202) not in rows  # a route is no area
    assert result.dropped == {"broken_area": 1, "broken_multipolygon": 1, "missing_nodes": 1}
    assert "dropped 3" in result.summary()


def test_odd_tag_values_survive(problems):
    _, rows = problems
    tags = dict(rows[("n", 14)].tags)
    assert tags["landuse"] == 'piha, "sisä"\nrivi'
    assert tags["sport"] == "boules;pétanque"
    assert dict(rows[("n", 8)].tags) == {"leaf_type": "broadleaved", "natural": "tree"}


def test_a_custom_tag_filter_keeps_only_its_tags(tmp_path):
    table = tmp_path / "only_buildings.csv"
    table.write_text("key,value,groundable,max_gsd,note\nbuilding,*,1,1,\n")
    pbf = opl_to_pbf(PROBLEMS_OPL, tmp_path / "p.osm.pbf")
    result = run_extract(ExtractConfig(pbf, tmp_path / "out", tag_filter=str(table), workers=1))
    df = gpd.read_parquet(tmp_path / "out")
    assert result.objects == len(df) == 2
    assert {k for t in df.tags for k, _ in t} == {"building"}


def _assert_user_error(proc, path: Path, words: str, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(path) in errors[0] and words in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not list(out.glob("part-*")), list(out.iterdir())


def test_missing_input_file(cli, tmp_path):
    missing = tmp_path / "nope.osm.pbf"
    out = tmp_path / "out"
    _assert_user_error(cli("extract", missing, "--out", out), missing, "not found", out)


def test_input_that_is_not_a_pbf(cli, tmp_path):
    text = tmp_path / "roads.osm.pbf"
    text.write_text('<?xml version="1.0"?>\n<osm version="0.6"></osm>\n')
    out = tmp_path / "out"
    _assert_user_error(cli("extract", text, "--out", out), text, "not an OSM PBF", out)


def test_truncated_pbf(cli, tmp_path, helsinki_pbf):
    cut = tmp_path / "cut.osm.pbf"
    cut.write_bytes(helsinki_pbf.read_bytes()[:300_000])
    out = tmp_path / "out"
    _assert_user_error(cli("extract", cut, "--out", out), cut, "truncated", out)


def test_corrupt_blob_inside_a_pbf(cli, tmp_path, helsinki_pbf):
    data = bytearray(helsinki_pbf.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(2000)  # zeroes inside a compressed block
    bad = tmp_path / "bad.osm.pbf"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = cli("extract", bad, "--out", out, "--workers", "2")
    _assert_user_error(proc, bad, "OSM PBF", out)
    assert not out.exists()  # the run made the folder, so it takes it away again


def test_stale_parts_of_another_input_are_replaced(tmp_path, helsinki_pbf):
    pbf = opl_to_pbf(PROBLEMS_OPL, tmp_path / "p.osm.pbf")
    out = tmp_path / "out"
    run_extract(ExtractConfig(pbf, out, workers=1))
    stale = out / "part-1-00999-0000.parquet"
    stale.write_bytes(b"left over")
    os.utime(pbf, ns=(0, 0))  # the input changed: every shard is done again
    result = run_extract(ExtractConfig(pbf, out, workers=1))
    assert not result.skipped and not stale.exists()
    assert len(gpd.read_parquet(out)) == result.objects


def test_bad_config_values():
    with pytest.raises(ConfigError, match="workers"):
        ExtractConfig("x.osm.pbf", "out", workers=-1)
    with pytest.raises(ConfigError, match="task-mb"):
        ExtractConfig("x.osm.pbf", "out", task_mb=0)
    with pytest.raises(ConfigError, match="at least one input"):
        ExtractConfig([], "out")
    with pytest.raises(ConfigError, match="tag filter"):
        ExtractConfig("x.osm.pbf", "out", tag_filter="no_such_table")
    with pytest.raises(InputError, match="not found"):
        run_extract(ExtractConfig("/nonexistent/x.osm.pbf", "out"))


def test_cli_summary_line(cli, tmp_path):
    pbf = opl_to_pbf(PROBLEMS_OPL, tmp_path / "p.osm.pbf")
    proc = cli("extract", pbf, "--out", tmp_path / "out", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("extract: 13 objects (5 points, 5 lines, 3 areas) from 1 input")


def test_invalid_area_geometries_are_repaired_or_dropped():
    from collections import Counter

    from skyscript_build.extract._parquet import area_geometries

    bowtie = shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])  # self-intersecting
    flat = shapely.Polygon([(0, 0), (1, 1), (2, 2), (0, 0)])  # no area left after repair
    square = shapely.MultiPolygon([shapely.box(0, 0, 1, 1)])  # osmium writes MultiPolygons
    dropped: Counter = Counter()
    hexes = [shapely.to_wkb(g, hex=True) for g in (bowtie, flat, square)]
    wkb, bbox, keep = area_geometries(hexes, dropped)
    assert keep.tolist() == [True, False, True]
    assert dropped == {"repaired_geometry": 1, "invalid_geometry": 1}
    geoms = shapely.from_wkb(wkb.to_pylist())
    assert shapely.is_valid(geoms[keep]).all()
    assert shapely.get_type_id(geoms[keep]).tolist() == [6, 3]  # two triangles; one polygon
    assert shapely.area(geoms[0]) == pytest.approx(0.5)
    assert bbox[2].tolist() == [0, 0, 1, 1]


def test_blobs_decoded_by_pyosmium_give_the_same_rows(
    chunked_pbf, helsinki_out, tmp_path, monkeypatch
):
    """Blobs the bulk decoders do not cover (plain nodes, another compression, an odd field
    order) go through pyosmium: forced here for every blob, the rows are the same."""
    from skyscript_build.extract import _nodes, _waytask
    from skyscript_build.extract._pbf import Unsupported

    def unsupported(*args, **kwargs):
        raise Unsupported("forced for the test")

    monkeypatch.setattr(_nodes, "_bulk", unsupported)
    monkeypatch.setattr(_waytask, "decode_way_group", unsupported)
    out = tmp_path / "objects"
    run_extract(ExtractConfig(chunked_pbf, out, workers=1, task_mb=0.05))
    assert _rows(out).equals(_rows(helsinki_out[0]))


def test_tasks_on_dask_workers_of_1_5_gib_give_the_same_rows(
    chunked_pbf, helsinki_out, tmp_path, dask_cluster, cli
):
    out = tmp_path / "objects"
    address = dask_cluster["address"]  # two workers of --memory-limit 1.5GiB (conftest)
    proc = cli("extract", chunked_pbf, "--out", out, "--scheduler", address, "--task-mb", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert _rows(out).equals(_rows(helsinki_out[0]))


def test_a_killed_run_resumes_with_the_tasks_not_done(chunked_pbf, helsinki_out, tmp_path):
    """SIGKILL in the middle of a run: the rerun keeps the tasks marked done (their markers
    and parts untouched), runs the rest, and gives the rows of an uninterrupted run."""
    out = tmp_path / "objects"
    args = [sys.executable, "-m", "skyscript_build.cli", "-q", "extract", str(chunked_pbf)]
    args += ["--out", str(out), "--workers", "1", "--task-mb", "0.005"]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL, start_new_session=True)
    markers = out / "_markers"
    deadline = time.monotonic() + 120
    while len(list(markers.glob("*-ways-*.done.json"))) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.done.json")}
    assert not (out / "_extract.json").exists()
    result = run_extract(ExtractConfig(chunked_pbf, out, workers=1, task_mb=0.005))
    again = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.done.json")}
    assert {k: again[k] for k in done} == done and len(again) > len(done)
    assert result.tasks == len(again)
    assert _rows(out).equals(_rows(helsinki_out[0]))


def test_a_resumed_run_redoes_the_tasks_whose_files_are_gone(
    chunked_pbf, helsinki_out, tmp_path, monkeypatch
):
    """The node stores live in the work folder: if it is lost between a crash and the rerun,
    the node tasks run again instead of the way tasks failing."""
    out, work = tmp_path / "objects", tmp_path / "work"
    config = ExtractConfig(chunked_pbf, out, workers=1, task_mb=0.05, work_dir=work)
    from skyscript_build.extract import stage

    real = stage.run_task

    def crash_in_the_ways(task):
        if type(task).__name__ == "WayTask":
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(stage, "run_task", crash_in_the_ways)
    with pytest.raises(KeyboardInterrupt):
        run_extract(config)
    monkeypatch.undo()
    shutil.rmtree(work)
    run_extract(config)
    assert _rows(out).equals(_rows(helsinki_out[0]))
    assert not work.exists() or not list(work.iterdir())


EDGE_WAYS_OPL = "\n".join(
    [f"n{i} v1 x{24 + i * 0.001:.3f} y60.1" for i in range(1, 8)]
    + [
        "n8 v1 x24.001 y60.1",  # the location of n1 under another id
        "w1 v1 Thighway=residential Nn1,n1,n2,n2,n3",  # repeated points dropped
        "w2 v1 Thighway=residential Nn99,n1,n2",  # a leading missing node
        "w3 v1 Thighway=residential Nn1,n99,n2",  # a missing node after a located one
        "w4 v1 Thighway=residential Nn1,n8,n1",  # one distinct location: too few points
        "w5 v1 Thighway=residential Nn99,n1",  # too few points and a missing node
        "w6 v1 Thighway=residential Nn1",  # one node
        "w7 v1 Thighway=residential,area=yes Nn1,n2,n3,n1",  # a closed way that is an area
        "w8 v1 Tbarrier=fence,landuse=grass Nn1,n2,n3,n1",  # an area by its non-groundable tag
        "w9 v1 Tbarrier=fence,area=no Nn1,n2,n3,n1",  # a ring-shaped line
        "w10 v1 Tname=x Nn1,n2",  # nothing groundable
        "w11 v1 Tbuilding=yes,highway=service Nn4,n5,n6,n7",  # open: a line
    ]
)


def _osmium_lines(pbf: Path) -> dict[int, bytes]:
    """Lines as osmium's WKB factory makes them (node locations from osmium's own index):
    its UNIQUE rule, a missing node after a located one an error, too few points an error."""
    wkb = osmium.geom.WKBFactory()
    lines = {}
    for w in (
        osmium.FileProcessor(str(pbf))
        .with_locations()
        .with_filter(osmium.filter.EntityFilter(osmium.osm.WAY))
    ):
        tags = {t.k: t.v for t in w.tags}
        if not _groundable(w.tags) or (w.is_closed() and len(w.nodes) >= 4 and is_area(tags)):
            continue
        try:
            geom = wkb.create_linestring(w)
            if (len(geom) - 18) // 32 < len(w.nodes):  # points went missing: a missing node?
                wkb.create_linestring(w, osmium.geom.use_nodes.ALL)
        except (osmium.InvalidLocationError, RuntimeError):
            continue
        lines[w.id] = bytes.fromhex(geom)
    return lines


def test_lines_follow_osmium_s_point_rules(tmp_path):
    """Repeated points, missing nodes (leading or not), too few points, closed ways: the bulk
    line builder keeps, drops and writes each way exactly as osmium's WKB factory does."""
    pbf = opl_to_pbf(EDGE_WAYS_OPL + "\n", tmp_path / "edge.osm.pbf")
    result = run_extract(ExtractConfig(pbf, tmp_path / "out", workers=1))
    # w7 and w8 are rings of three points on a line: no area either.
    assert result.dropped == {"broken_area": 2, "missing_nodes": 2, "too_few_nodes": 3}
    lines = _rows(tmp_path / "out").filter(
        pa.compute.equal(_rows(tmp_path / "out")["osm_type"], "w")
    )
    got = dict(zip(lines["osm_id"].to_pylist(), lines["geometry"].to_pylist(), strict=True))
    assert got == _osmium_lines(pbf)
    assert sorted(got) == [1, 9, 11]


def test_lines_of_helsinki_are_osmium_s(helsinki_pbf, helsinki_df):
    lines = helsinki_df[helsinki_df.osm_type == "w"]
    got = dict(zip(lines.osm_id, shapely.to_wkb(lines.geometry.values), strict=True))
    expected = _osmium_lines(helsinki_pbf)
    assert got == expected and len(got) > 3000
