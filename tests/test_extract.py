"""The extract stage on the real Helsinki extract and on small OPL fixtures.

Counts are checked against an independent pass made here with osmium's own filters and area
assembly; bad inputs go through the real command line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import osmium
import osmium.filter
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

COLUMNS = ["osm_type", "osm_id", "osm_element", "tags", "max_gsd", "geometry"]


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
    assert list(helsinki_df.columns) == COLUMNS
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
    # The parquet metadata credits OSM; geopandas writes and reads it back unchanged.
    for part in sorted(out.glob("part-*.parquet")):
        meta = pq.read_schema(part).metadata
        assert meta[b"osm_copyright"].decode() == OSM_CREDIT
        assert json.loads(meta[b"geo"])["columns"]["geometry"]["encoding"] == "WKB"
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


def test_disk_backed_index_and_one_worker_give_the_same_bytes(helsinki_pbf, helsinki_out, tmp_path):
    out = tmp_path / "objects"
    index_dir = tmp_path / "index"
    result = run_extract(
        ExtractConfig(
            helsinki_pbf, out, workers=1, location_index="sparse_file_array", index_dir=index_dir
        )
    )
    assert not index_dir.exists() or not list(index_dir.iterdir())
    # The same file set and bytes, whatever the worker count and node index.
    first = helsinki_out[0]
    assert sorted(p.name for p in out.glob("part-*")) == result.parts
    assert result.parts == sorted(p.name for p in first.glob("part-*"))
    for name in result.parts:
        assert (out / name).read_bytes() == (first / name).read_bytes(), name


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
    stale = out / "part-01999.parquet"
    stale.write_bytes(b"left over")
    os.utime(pbf, ns=(0, 0))  # the input changed: every shard is done again
    result = run_extract(ExtractConfig(pbf, out, workers=1))
    assert not result.skipped and not stale.exists()
    assert len(gpd.read_parquet(out)) == result.objects


def test_bad_config_values():
    with pytest.raises(ConfigError, match="workers"):
        ExtractConfig("x.osm.pbf", "out", workers=-1)
    with pytest.raises(ConfigError, match="location-index"):
        ExtractConfig("x.osm.pbf", "out", location_index="mmap")
    with pytest.raises(ConfigError, match="tag filter"):
        ExtractConfig("x.osm.pbf", "out", tag_filter="no_such_table")
    with pytest.raises(InputError, match="not found"):
        run_extract(ExtractConfig("/nonexistent/x.osm.pbf", "out"))


def test_cli_summary_line(cli, tmp_path):
    pbf = opl_to_pbf(PROBLEMS_OPL, tmp_path / "p.osm.pbf")
    proc = cli("extract", pbf, "--out", tmp_path / "out", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("extract: 13 objects (5 points, 5 lines, 3 areas)")


def test_invalid_area_geometries_are_repaired_or_dropped():
    from collections import Counter

    from skyscript_build.extract._parquet import Batch, batch_to_table

    bowtie = shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])  # self-intersecting
    flat = shapely.Polygon([(0, 0), (1, 1), (2, 2), (0, 0)])  # no area left after repair
    square = shapely.box(0, 0, 1, 1)
    batch = Batch("a")
    for i, g in enumerate([bowtie, flat, square], start=1):
        batch.osm_element.append("way")
        batch.ids.append(i)
        batch.tag_keys.append("building")
        batch.tag_values.append("yes")
        batch.tag_offsets.append(i)
        batch.max_gsd.append(1.0)
        batch.geoms.append(shapely.to_wkb(g, hex=True))
    dropped: Counter = Counter()
    table = batch_to_table(batch, dropped)
    assert table["osm_id"].to_pylist() == [1, 3]
    assert dropped == {"repaired_geometry": 1, "invalid_geometry": 1}
    geoms = shapely.from_wkb(table["geometry"].to_pylist())
    assert shapely.is_valid(geoms).all()
    assert shapely.get_type_id(geoms).tolist() == [6, 3]  # the bowtie is two triangles
    assert shapely.area(geoms[0]) == pytest.approx(0.5)


def test_points_decoded_in_bulk_equal_osmium_s_nodes(
    helsinki_pbf, helsinki_out, tmp_path, monkeypatch
):
    """The numpy DenseNodes reader and pyosmium's node handler give the same point rows."""
    from skyscript_build.extract import _shards
    from skyscript_build.extract._dense import Unsupported

    def unsupported(*args, **kwargs):
        raise Unsupported("forced for the test")
        yield  # pragma: no cover

    monkeypatch.setattr(_shards, "iter_point_blocks", unsupported)
    monkeypatch.setattr(_shards, "_fast_points_lines", lambda *a: False)
    out = tmp_path / "objects"
    run_extract(ExtractConfig(helsinki_pbf, out, workers=1))
    points = pq.read_table(out / "part-00000.parquet")
    bulk = pq.read_table(helsinki_out[0] / "part-00000.parquet")
    assert points.num_rows > 1000
    assert points.equals(bulk)


def test_shards_on_a_dask_scheduler_give_the_same_bytes(helsinki_pbf, helsinki_out, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as c:
        out = tmp_path / "objects"
        result = run_extract(ExtractConfig(helsinki_pbf, out, scheduler=c.scheduler_address))
    assert result.objects == helsinki_out[1].objects
    for name in helsinki_out[1].parts:
        assert (out / name).read_bytes() == (helsinki_out[0] / name).read_bytes(), name


def _lines_both_ways(
    pbf: Path, out: Path, monkeypatch, index: str = "flex_mem"
) -> tuple[dict, dict]:
    """Run the points + lines shard through the numpy reader, then through pyosmium (points
    through ``_dense``): (stats, stats)."""
    from skyscript_build.extract import _shards

    stats = {}
    for mode in ("bulk", "pyosmium"):
        if mode == "pyosmium":
            monkeypatch.setattr(_shards, "_fast_points_lines", lambda *a: False)
        spec = _shards.ShardSpec(
            shard=1,
            input=str(pbf),
            out_dir=str(out / mode),
            tag_filter="default",
            rows_per_part=700,
            batch_rows=300,
            location_index=index,
            index_dir=str(out / "index"),
        )
        (out / mode).mkdir(parents=True)
        stats[mode] = _shards.run_shard(spec)
        stats[mode].pop("seconds")
    return stats["bulk"], stats["pyosmium"]


def test_lines_decoded_in_bulk_equal_osmium_s_ways(helsinki_pbf, tmp_path, monkeypatch):
    """The numpy Way reader and pyosmium's give the same parts, byte for byte, and counts
    (small parts and batches, so that batch and part boundaries fall inside blocks)."""
    bulk, slow = _lines_both_ways(helsinki_pbf, tmp_path, monkeypatch)
    assert bulk == slow
    assert bulk["rows"]["w"] > 3000 and len(bulk["parts"]) > 4
    assert bulk["counts"]["expected_way_areas"] > 1000
    for name in bulk["parts"]:
        a = (tmp_path / "bulk" / name).read_bytes()
        assert a == (tmp_path / "pyosmium" / name).read_bytes(), name


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


@pytest.mark.parametrize("index", ["flex_mem", "sparse_file_array"])
def test_lines_in_bulk_follow_osmium_s_point_rules(tmp_path, monkeypatch, index):
    """Repeated points, missing nodes (leading or not), too few points, closed ways: the numpy
    reader keeps, drops and counts each way exactly as the pyosmium reader does (node
    locations in memory, or in temporary files with an on-disk node index)."""
    pbf = opl_to_pbf(EDGE_WAYS_OPL + "\n", tmp_path / "edge.osm.pbf")
    bulk, slow = _lines_both_ways(pbf, tmp_path, monkeypatch, index)
    assert bulk == slow
    assert bulk["dropped"] == {"missing_nodes": 2, "too_few_nodes": 3}
    assert bulk["rows"] == {"n": 0, "w": 3}  # no tagged node: an empty points part
    table = pq.read_table(tmp_path / "bulk" / "part-01000.parquet")
    assert table["osm_id"].to_pylist() == [1, 9, 11]
    for name in bulk["parts"]:
        a = (tmp_path / "bulk" / name).read_bytes()
        assert a == (tmp_path / "pyosmium" / name).read_bytes(), name
