"""The paper's attribute order, from OSM to the caption (issue 14, item 8).

SkyScript's released meta files keep each object's tags in OSM's order, and its captions follow
that order after the primary key. So every stage keeps it: extract (both of its readers: the
bulk numpy one and pyosmium's, points, lines, way areas and relation areas), plan
(``center_tags`` and each map of ``surrounding_tags``), the meta writer, and the caption.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import load_fixture_script

from skyscript_build.caption import load_rules, make_captioner
from skyscript_build.extract import ExtractConfig, run_extract
from skyscript_build.fetch.backends.base import TileRequest
from skyscript_build.meta import dumps_meta, loads_meta, make_meta
from skyscript_build.plan import PlanConfig, run_plan

opl_to_pbf = load_fixture_script("extract").opl_to_pbf

# Tags in an order that is not sorted by key (sorted, each would read differently).
ORDER_OPL = "\n".join(
    [
        "n1 v1 x24.9400000 y60.1700000 Tnatural=tree,leaf_type=needleleaved,name=Kuusi",
        "n2 v1 x24.9402000 y60.1702000",
        "n3 v1 x24.9403000 y60.1702000",
        "n4 v1 x24.9403000 y60.1703000",
        "n5 v1 x24.9402000 y60.1703000",
        "n6 v1 x24.9396000 y60.1696000",
        "n7 v1 x24.9397000 y60.1696000",
        "n8 v1 x24.9397000 y60.1697000",
        "n9 v1 x24.9396000 y60.1697000",
        "n10 v1 x24.9398000 y60.1699000",
        "n11 v1 x24.9399000 y60.1699500",
        "w10 v1 Nn10,n11 Ttracktype=grade1,highway=track,surface=asphalt",
        "w11 v1 Nn2,n3,n4,n5,n2 Troof:shape=gabled,building=yes,roof:material=tiles,"
        "roof:colour=red",
        "w12 v1 Nn6,n7,n8,n9,n6",
        "r20 v1 Mw12@outer Ttype=multipolygon,water=pond,natural=water",
    ]
)
OSM_ORDER = {
    ("n", 1): [("natural", "tree"), ("leaf_type", "needleleaved")],
    ("w", 10): [("tracktype", "grade1"), ("highway", "track"), ("surface", "asphalt")],
    ("a", 11): [
        ("roof:shape", "gabled"),
        ("building", "yes"),
        ("roof:material", "tiles"),
        ("roof:colour", "red"),
    ],
    ("a", 20): [("water", "pond"), ("natural", "water")],
}


def _tags_by_object(objects: Path) -> dict[tuple[str, int], list[tuple[str, str]]]:
    table = pq.read_table(objects, columns=["osm_type", "osm_id", "tags"]).to_pylist()
    return {(r["osm_type"], r["osm_id"]): r["tags"] for r in table}


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("order")
    pbf = opl_to_pbf(ORDER_OPL + "\n", root / "order.osm.pbf")
    out = root / "objects"
    run_extract(ExtractConfig(pbf, out, workers=1))
    return out


def test_extract_keeps_each_element_s_tag_order(objects: Path):
    assert _tags_by_object(objects) == OSM_ORDER


def test_extract_s_pyosmium_readers_keep_it_too(objects: Path, tmp_path: Path, monkeypatch):
    from skyscript_build.extract import _nodes, _waytask
    from skyscript_build.extract._pbf import Unsupported

    def unsupported(*args, **kwargs):
        raise Unsupported("forced for the test")

    # Every blob through pyosmium: its nodes, ways and relations.
    monkeypatch.setattr(_nodes, "_bulk", unsupported)
    monkeypatch.setattr(_waytask, "decode_way_group", unsupported)
    pbf = opl_to_pbf(ORDER_OPL + "\n", tmp_path / "order.osm.pbf")
    run_extract(ExtractConfig(pbf, tmp_path / "objects", workers=1))
    assert _tags_by_object(tmp_path / "objects") == OSM_ORDER


def test_plan_meta_and_caption_keep_it(objects: Path, tmp_path: Path):
    out = tmp_path / "requests"
    run_plan(PlanConfig(objects=objects, out=out, sources=("FI",), seed=0))
    rows = {
        (r["osm_type"], r["osm_id"]): r
        for part in sorted(out.glob("part-*.parquet"))
        for r in pq.read_table(part).to_pylist()
    }
    assert set(rows) == set(OSM_ORDER)
    for obj, row in rows.items():
        assert row["center_tags"] == OSM_ORDER[obj]
        for around in row["surrounding_tags"]:
            assert around in OSM_ORDER.values()
    tree = rows[("n", 1)]
    assert len(tree["surrounding_tags"]) == 3  # the track, the building and the pond
    # the meta file, as fetch writes it
    request = TileRequest.from_row(tree)
    meta = make_meta(
        request.box, (2022, 6, 1, 10, 0), request.center_tags, list(request.surrounding_tags)
    )
    meta = loads_meta(dumps_meta(meta))
    assert list(meta["center_tags"].items()) == OSM_ORDER[("n", 1)]
    assert [list(t.items()) for t in meta["surrounding_tags"]] == tree["surrounding_tags"]
    caption = make_captioner(load_rules("default"))
    title, multi = caption(meta["center_tags"], meta["surrounding_tags"])
    assert title == "natural tree, leaf type of needleleaved"
    assert "road of track with tracktype of grade1 and surface of asphalt" in multi
    assert (
        "building with roof shape of gabled and roof material of tiles and roof colour of red"
        in multi
    )
    assert "natural water with water of pond" in multi  # two primary keys: the rules' order
