"""The groundability tables: the shipped default and the loader's lookup rules."""

from __future__ import annotations

import csv

import pytest

from skyscript_build.errors import ConfigError, InputError
from tag_filters import (
    GSD_LEVELS,
    get_tag_filter_path,
    list_tag_filters,
    load_tag_filter,
    normalise_value,
    parse_length,
)


@pytest.fixture(scope="module")
def tf():
    return load_tag_filter("default")


def test_default_table_is_large_clean_and_shipped():
    assert "default" in list_tag_filters()
    path = get_tag_filter_path("default")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert len(rows) >= 500
    pairs = [(r["key"], r["value"]) for r in rows]
    assert len(pairs) == len(set(pairs)), "duplicate key,value rows"
    for r in rows:
        if r["groundable"] == "1":
            assert float(r["max_gsd"]) in GSD_LEVELS, r
        else:
            assert r["groundable"] == "0" and r["max_gsd"] == "", r
    keys = {k for k, _ in pairs}
    for key in (
        "building",
        "landuse",
        "natural",
        "leisure",
        "amenity",
        "highway",
        "railway",
        "waterway",
        "water",
        "man_made",
        "power",
        "aeroway",
        "barrier",
        "surface",
        "sport",
        "crop",
        "roof:shape",
        "tourism",
        "historic",
        "golf",
        "bridge",
        "tunnel",
    ):
        assert key in keys, key


@pytest.mark.parametrize(
    ("key", "value", "gsd"),
    [
        ("amenity", "bench", 0.1),
        ("highway", "street_lamp", 0.1),
        ("amenity", "parking", 0.6),
        ("natural", "tree", 0.6),
        ("building", "yes", 1.0),
        ("building", "church", 1.0),
        ("amenity", "place_of_worship", 1.0),
        ("highway", "primary", 1.0),
        ("landuse", "farmland", 10.0),
        ("natural", "wood", 10.0),
        ("natural", "water", 10.0),
        ("landuse", "some_new_landuse", 10.0),  # key=* row
        ("crop", "cotton", 10.0),
        ("roof:shape", "gabled", 0.6),
    ],
)
def test_visible_tags_and_their_coarsest_gsd(tf, key, value, gsd):
    assert tf.is_groundable(key, value)
    assert tf.tag_max_gsd(key, value) == gsd


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "Helsinki"),
        ("name:fi", "Helsinki"),
        ("addr:street", "Mannerheimintie"),
        ("source", "survey"),
        ("source:geometry", "aerial"),
        ("ref", "E 12"),
        ("operator", "HSL"),
        ("website", "https://example.org"),
        ("phone", "+358 1"),
        ("opening_hours", "24/7"),
        ("wikidata", "Q1757"),
        ("wikipedia", "fi:Helsinki"),
        ("note", "x"),
        ("fixme", "x"),
        ("contact:email", "a@b"),
        ("brand:wikidata", "Q1"),
        ("check_date:surface", "2024-01-01"),
        ("religion", "christian"),
        ("denomination", "lutheran"),
        ("tunnel", "yes"),
        ("amenity", "restaurant"),
        ("shop", "clothes"),
        ("building", "no"),
        ("highway", "proposed"),
        ("disused:railway", "rail"),
        ("some_unknown_key", "x"),
    ],
)
def test_never_visual_tags(tf, key, value):
    assert not tf.is_groundable(key, value)
    assert tf.tag_max_gsd(key, value) is None


def test_lookup_order_exact_then_any_then_prefix(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text(
        "key,value,groundable,max_gsd,note\n"
        "# a comment line\n"
        "demo,*,1,1,\n"
        "demo,small,1,0.1,\n"
        "demo,hidden,0,,\n"
        "demo*,*,1,10,prefix\n"
        "dem*,*,0,,shorter prefix\n"
    )
    tf = load_tag_filter(table)
    assert tf.tag_max_gsd("demo", "small") == 0.1
    assert tf.tag_max_gsd("demo", "Small ") == 0.1  # values are normalised
    assert tf.tag_max_gsd("demo", "other") == 1.0
    assert not tf.is_groundable("demo", "hidden")
    assert not tf.is_groundable("demo", "no")  # a negative value needs an exact row
    assert tf.tag_max_gsd("demo:part", "x") == 10.0  # the longest prefix wins
    assert not tf.is_groundable("demx", "x")
    assert tf.candidate_keys() is None  # a groundable prefix row: no C++ key pre-filter


def test_max_gsd_of_an_object_is_its_most_visible_tag(tf):
    tags = {"amenity": "bench", "natural": "tree", "name": "x"}
    assert tf.max_gsd(tags) == 0.6
    assert tf.max_gsd({"name": "x"}) is None
    assert tf.groundable_tags(tags) == {"amenity": "bench", "natural": "tree"}
    assert tf.groundable_tags(tags, gsd=0.6) == {"natural": "tree"}


def test_candidate_keys_cover_the_groundable_rows(tf):
    keys = tf.candidate_keys()
    assert keys is not None and {"building", "highway", "natural", "amenity"} <= keys
    assert not keys & {"name", "addr:street", "source", "religion", "tunnel"}


def test_value_normalisation_and_lengths():
    assert normalise_value(" Yes ") == "yes"
    assert normalise_value("true") == "yes"
    assert normalise_value("1") == "yes"
    assert normalise_value("Paving Stones;grass") == "paving_stones"
    assert parse_length("20 cm") == pytest.approx(0.2)
    assert parse_length("3,5") == pytest.approx(3.5)
    assert parse_length("12 ft") == pytest.approx(3.6576)
    assert parse_length("6'3\"") == pytest.approx(1.905)
    assert parse_length("2 km") == pytest.approx(2000)
    assert parse_length("tall") is None


def test_bad_tables_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown tag filter"):
        load_tag_filter("no_such_table")
    bad = tmp_path / "bad.csv"
    bad.write_text("key,value,groundable,max_gsd,note\nbuilding,*,1,5,\n")
    with pytest.raises(InputError, match="line 2: max_gsd 5.0 is not one of"):
        load_tag_filter(bad)
    bad.write_text("key,value,groundable,max_gsd,note\nbuilding,*,1,,\n")
    with pytest.raises(InputError, match="needs a max_gsd"):
        load_tag_filter(bad)
    bad.write_text("k,v\n")
    with pytest.raises(InputError, match="expected the columns"):
        load_tag_filter(bad)
    with pytest.raises(InputError, match="not found"):
        load_tag_filter(tmp_path / "missing.csv")
