"""The caption stage: the paper's rules, the CSV, the safe meta reader, the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import random
import shutil
import threading
import uuid
from pathlib import Path

import pandas as pd
import pytest
from conftest import load_fixture_script

from skyscript_build.caption import (
    CaptionConfig,
    list_rules,
    load_rules,
    make_captioner,
    resolve_rules,
    run_caption,
    stats_path,
)
from skyscript_build.caption._worker import csv_row, find_meta_folders
from skyscript_build.errors import ConfigError, InputError
from skyscript_build.meta import MetaError, dumps_meta, load_meta, loads_meta, make_meta

data = load_fixture_script("caption")


@pytest.fixture(scope="module")
def caption():
    return make_captioner(resolve_rules(None))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return data.make_dataset(tmp_path / "ds")


def _meta(center, around=()):
    return dumps_meta(make_meta((0, 0, 1, 1), (2020, 1, 2, 3, 4), center, list(around)))


def _add(dataset: Path, meta_dir: str, stem: str, payload: bytes) -> None:
    """A meta file and its image, as fetch writes them."""
    (dataset / f"images{meta_dir[4:]}" / f"{stem}.jpg").write_bytes(data.jpeg_bytes())
    (dataset / meta_dir / f"{stem}.pickle").write_bytes(payload)


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")


# --- rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stem,center,around,title,multi", data.PAPER_EXAMPLES)
def test_paper_examples_exactly(caption, stem, center, around, title, multi):
    assert caption(center, around) == (title, multi)


def test_paper_attribute_order():
    # the paper's example: the primary key first, then the tags in the meta's (OSM's) order
    tags = {
        "power": "plant",
        "plant:source": "solar",
        "plant:method": "thermal",
        "plant:output:electricity": "19.9 MW",
    }
    meta = loads_meta(_meta(tags))  # through a pickle, as a meta file gives them
    title, multi = make_captioner(load_rules("default"))(meta["center_tags"], [])
    assert title == (
        "power plant, plant source of solar, plant method of thermal, "
        "plant output electricity of 19.9 MW"
    )
    assert multi == (
        "power plant with plant source of solar and plant method of thermal and "
        "plant output electricity of 19.9 MW"
    )


def test_object_tags_order_and_separators(caption):
    # primary keys first (in the rules' order), then the others in the dict's order, not by
    # key; 3 tags read "A with B and C", 4 tags "A with B and C and D".
    tags = {"voltage": "400000", "cables": "6", "power": "line"}
    assert caption(tags, []) == (
        "power line, voltage of 400000, cables of 6",
        "power line with voltage of 400000 and cables of 6",
    )
    four = {"surface": "asphalt", "lanes": "2", "highway": "primary", "amenity": "parking"}
    title, multi = caption(four, [])
    assert title == "amenity of parking, road of primary, surface of asphalt, lanes of 2"
    assert multi == "amenity of parking with road of primary and surface of asphalt and lanes of 2"
    # reversed: the primary keys keep the rules' order, the others follow the dict
    assert caption(dict(reversed(list(four.items()))), []) == (
        "amenity of parking, road of primary, lanes of 2, surface of asphalt",
        "amenity of parking with road of primary and lanes of 2 and surface of asphalt",
    )
    # the object cache does not mix up two orders of the same tags
    assert caption(four, []) == (title, multi)


def test_surroundings_order_separators_and_duplicates(caption):
    around = [
        {"highway": "footway"},
        {"natural": "tree"},
        {"natural": "tree"},  # the same reading twice: named once
        {"name": "only a name"},  # reads as nothing: skipped
        {},
        {"building": "yes", "building:levels": "3"},
    ]
    assert caption({"amenity": "fountain"}, around)[1] == (
        "amenity of fountain, surrounded by road of footway; natural tree; "
        "building with building levels of 3"
    )


def test_empty_surroundings(caption):
    assert caption({"landuse": "grass"}, []) == ("landuse of grass", "landuse of grass")
    assert caption({"landuse": "grass"}, [{"name": "x"}, {}]) == (
        "landuse of grass",
        "landuse of grass",
    )


def test_value_rules(caption):
    assert caption({"building": "yes"}, [])[0] == "building"
    assert caption({"building": "Yes", "bridge": "no"}, [])[0] == "building"
    assert caption({"sport": "soccer;tennis; soccer;"}, [])[0] == "sport of soccer and tennis"
    assert caption({"cuisine": "a;b;c"}, [])[0] == "cuisine of a, b and c"
    assert caption({"roof:shape": "gable"}, [])[0] == "roof shape of gable"
    assert caption({"man_made": "water_tower"}, [])[0] == "man made water tower"
    assert caption({"height": "35 m", "power": "tower"}, [])[0] == "power tower, height of 35 m"
    assert caption({"scale": "1:1000"}, [])[0] == "scale of 1:1000"
    assert caption({"natural": "water\n\tlake  "}, [])[0] == "natural water lake"
    # keys that never describe what is seen are left out; nothing left is an empty caption
    assert caption({"name": "Kauppatori", "addr:street": "x", "amenity": "marketplace"}, [])[0] == (
        "amenity of marketplace"
    )
    assert caption({"name": "Kauppatori"}, [{"natural": "tree"}]) == ("", "")


def test_bad_tag_types_are_refused(caption):
    with pytest.raises(MetaError) as e:
        caption({"building": ["yes"]}, [])
    assert e.value.reason == "bad-tags"
    assert caption({"lanes": 2}, [])[0] == "lanes of 2"


def test_rules_file_changes_the_output(tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "key_aliases: {amenity: facility}\n"
        "category_keys: [power, natural, man_made, amenity]\n"
        "joiners: {surroundings: ' | ', surrounded_by: ' near '}\n"
    )
    cap = make_captioner(resolve_rules(str(rules)))
    assert cap({"amenity": "fountain"}, [{"natural": "tree"}, {"highway": "footway"}]) == (
        "facility fountain",
        "facility fountain near natural tree | road of footway",
    )
    assert "default" in list_rules()
    assert load_rules("default").key_aliases["highway"] == "road"


@pytest.mark.parametrize(
    "text,message",
    [
        ("colour: red\n", "unknown caption rules setting 'colour'"),
        ("templates: {key_value: '{key} of {valeu}'}\n", "template 'key_value'"),
        ("category_keys: power\n", "'category_keys' must be a list"),
        ("joiners: [1, 2]\n", "'joiners' must be a mapping"),
        ("key_aliases: {a: [\n", "not valid YAML"),
    ],
)
def test_bad_rules_file_is_one_clear_error(tmp_path: Path, text, message):
    rules = tmp_path / "bad.yaml"
    rules.write_text(text)
    with pytest.raises(ConfigError, match="bad.yaml") as e:
        resolve_rules(str(rules))
    assert message in str(e.value)


# --- the CSV ---------------------------------------------------------------------------------


def test_csv_row_is_the_csv_module(tmp_path: Path):
    rng = random.Random(0)
    alphabet = ["a", "b", " ", ",", '"', "\n", "é", "面", ";", "'"]
    for _ in range(2000):
        fields = tuple("".join(rng.choices(alphabet, k=rng.randrange(0, 8))) for _ in range(3))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        assert csv_row(*fields) == buf.getvalue(), fields


def test_run_writes_sorted_csv_that_round_trips(dataset: Path, caption):
    # "x-1.jpg" sorts before "x.jpg" although stem "x" sorts before "x-1": rows sort by filepath
    for stem in ("x", "x-1"):
        _add(dataset, "meta2", stem, _meta({"natural": "tree"}))
    result = run_caption(CaptionConfig(dataset=dataset, workers=1))
    out = dataset / "SkyScript_captions.csv"
    assert result.out == out
    raw = out.read_bytes()
    assert raw.startswith(b"filepath,title,title_multi_objects\n") and b"\r" not in raw
    df = _read_csv(out)
    assert list(df["filepath"]) == sorted(df["filepath"])
    assert list(df["filepath"]).index("images2/x-1.jpg") < list(df["filepath"]).index(
        "images2/x.jpg"
    )
    # images10/ sorts between images1... and images2/, as strings do
    folders = [p.split("/")[0] for p in df["filepath"]]
    assert folders == sorted(folders, key=lambda f: f + "/") and "images10" in folders
    # every row equals the caption of its meta file, through the CSV and pandas
    expected = {}
    for meta_dir in ("meta2", "meta3", "meta10"):
        for p in sorted((dataset / meta_dir).glob("*.pickle")):
            meta = load_meta(p)
            title, multi = caption(meta["center_tags"], meta["surrounding_tags"])
            if title:
                expected[f"images{meta_dir[4:]}/{p.stem}.jpg"] = (title, multi)
    got = {r.filepath: (r.title, r.title_multi_objects) for r in df.itertuples()}
    assert got == expected
    for _stem, _, _, title, multi in data.PAPER_EXAMPLES:
        assert title in {t for t, _ in got.values()} and multi in {m for _, m in got.values()}
    odd = [v for k, v in got.items() if "a11_CH_19" in k][0]
    assert odd[0] == 'amenity of café, "Zum Löwen"'
    assert odd[1] == 'amenity of café, "Zum Löwen", surrounded by shop of bäckerei and 面包'
    assert result.written == len(expected) and result.empty == 1 and result.n_refused == 0
    assert result.files == result.written + result.empty
    assert not [p for p in dataset.iterdir() if p.name.startswith(".")]  # no temp files
    stats = json.loads(stats_path(out).read_text())
    assert stats["written"] == result.written and stats["folders"] == ["meta10", "meta2", "meta3"]


def test_function_rules_with_odd_text_round_trip(dataset: Path, tmp_path: Path):
    rules = tmp_path / "my_rules.py"
    rules.write_text(
        "def caption(center, around):\n"
        "    k = sorted(center)[0]\n"
        "    return f'{k}=\"{center[k]}\",\\nline\\r\\nend', f'{len(around)} around;\\rx'\n"
    )
    out = tmp_path / "custom.csv"
    result = run_caption(
        CaptionConfig(dataset=dataset, out=out, rules=f"{rules}:caption", workers=2)
    )
    assert result.n_refused == 0 and result.empty == 0
    df = _read_csv(out)
    assert len(df) == result.written == result.files
    row = df[df.filepath.str.contains("a198234555_CH_19")].iloc[0]
    assert row.title == 'landuse="quarry",\nline\nend'  # "\r\n" and "\r" become "\n"
    assert row.title_multi_objects == "0 around;\nx"


def test_function_rules_errors_are_counted(dataset: Path, tmp_path: Path):
    rules = tmp_path / "broken_rules.py"
    rules.write_text(
        "def caption(center, around):\n"
        "    if 'landuse' in center:\n"
        "        raise KeyError('boom')\n"
        "    return 'ok', 42\n"
    )
    result = run_caption(
        CaptionConfig(dataset=dataset, out=tmp_path / "x.csv", rules=f"{rules}:caption", workers=1)
    )
    assert result.written == 0 and result.refused == {"rule-error": result.files}
    assert any("KeyError" in d for _, _, d in result.examples)
    assert any("not a string" in d for _, _, d in result.examples)


def test_same_bytes_whatever_the_workers_and_chunks(dataset: Path, tmp_path: Path):
    outputs = []
    for workers, chunk in ((1, 4096), (2, 7), (3, 1)):
        out = tmp_path / f"w{workers}.csv"
        run_caption(CaptionConfig(dataset=dataset, out=out, workers=workers, chunk_size=chunk))
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_workers_start_safely_beside_threads(dataset: Path, tmp_path: Path):
    # a process running threads (a Dask client, say) must not fork: forkserver workers then
    run_caption(CaptionConfig(dataset=dataset, out=tmp_path / "a.csv", workers=1))
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        run_caption(CaptionConfig(dataset=dataset, out=tmp_path / "b.csv", workers=2))
    finally:
        stop.set()
        thread.join()
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_rerun_is_skipped_until_inputs_or_rules_change(dataset: Path, tmp_path: Path):
    out = tmp_path / "c.csv"
    stale = tmp_path / ".c.csv.x1y2.chunks"  # what a killed run leaves
    stale.mkdir()
    (stale / "chunk-0000000.csv").write_text("half")
    first = run_caption(CaptionConfig(dataset=dataset, out=out, workers=1))
    assert not stale.exists()
    before = out.read_bytes()
    again = run_caption(CaptionConfig(dataset=dataset, out=out, workers=1))
    assert again.up_to_date and not first.up_to_date
    assert again.written == first.written and "up to date" in again.summary()
    assert out.read_bytes() == before
    assert not run_caption(CaptionConfig(dataset=dataset, out=out, force=True)).up_to_date
    with open(out, "a") as f:  # a CSV changed by hand is made again
        f.write("x,y,z\n")
    assert not run_caption(CaptionConfig(dataset=dataset, out=out, workers=1)).up_to_date
    assert out.read_bytes() == before
    # a new meta file (written atomically, as fetch does) is captioned by the next run
    (dataset / "images3" / "zz_new_FI_19.jpg").write_bytes(data.jpeg_bytes())
    tmp = dataset / "meta3" / ".new.tmp"
    tmp.write_bytes(_meta({"landuse": "grass"}))
    tmp.rename(dataset / "meta3" / "zz_new_FI_19.pickle")
    third = run_caption(CaptionConfig(dataset=dataset, out=out, workers=1))
    assert not third.up_to_date and third.written == first.written + 1
    rules = tmp_path / "r.yaml"
    rules.write_text("key_aliases: {landuse: land use}\n")
    fourth = run_caption(CaptionConfig(dataset=dataset, out=out, rules=str(rules), workers=1))
    assert not fourth.up_to_date and "land use of grass" in out.read_text()


# --- the safe meta reader ----------------------------------------------------------------------


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _crafted() -> dict[str, bytes]:
    """Hand-made hostile streams: every way a pickle can name or call something."""
    return {
        "global": b"cos\nsystem\n(S'true'\ntR.",
        "stack_global": b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins"
        b"\x94\x8c\x04eval\x94\x93\x94\x8c\x041+1\x94\x85\x94R\x94.",
        "inst": b"(S'true'\nios\nsystem\n.",
        "ext": b"\x80\x02\x82\x01.",
        "persid": b"Pfoo\n.",
    }


@pytest.mark.parametrize("name", list(_crafted()))
def test_crafted_streams_are_refused(name):
    with pytest.raises(MetaError) as e:
        loads_meta(_crafted()[name])
    assert e.value.reason in ("unsafe", "corrupt")
    if name != "ext":  # EXT asks copyreg's registry, which is empty: refused as corrupt
        assert e.value.reason == "unsafe"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_scalars_are_read_as_numbers_without_numpy(protocol):
    np = pytest.importorskip("numpy")
    meta = {
        "box": tuple(np.array([24.9, 60.1, 24.91, 60.11])),
        "time": (np.int64(2019), np.int32(6), np.uint8(1), np.int16(10), 30),
        "center_tags": {"lanes": np.float32(2.5), "power": "pole"},
        "surrounding_tags": [],
    }
    got = loads_meta(pickle.dumps(meta, protocol=protocol))
    assert got["box"] == (24.9, 60.1, 24.91, 60.11) and got["time"] == (2019, 6, 1, 10, 30)
    assert all(type(v) in (int, float) for v in got["box"] + got["time"])
    assert got["center_tags"]["lanes"] == 2.5


def test_numpy_objects_other_than_scalars_are_refused():
    np = pytest.importorskip("numpy")
    base = make_meta((0, 0, 1, 1), (2020, 1, 1, 0, 0), {"a": "b"}, [])
    for bad in (np.array([1.0, 2.0]), np.dtype("O"), np.str_("x"), np.datetime64("2019-01-01")):
        with pytest.raises(MetaError) as e:
            loads_meta(pickle.dumps({**base, "box": bad}))
        assert e.value.reason == "unsafe", bad
    # the stand-ins accept nothing but what numpy scalars and protocol-2 bytes need
    abuse = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00utf-8\x86R."
    with pytest.raises(MetaError, match="latin1") as e:
        loads_meta(abuse)
    assert e.value.reason == "unsafe"
    abuse = b"\x80\x02cnumpy\ndtype\nX\x01\x00\x00\x00O\x85R."
    with pytest.raises(MetaError, match="only numbers") as e:
        loads_meta(abuse)


def test_malicious_pickle_is_refused_and_never_runs(dataset: Path, tmp_path: Path):
    marker = Path(f"/tmp/PWNED-{uuid.uuid4().hex}")
    evil = {**make_meta((0, 0, 1, 1), (2020, 1, 1, 0, 0), {"amenity": "x"}, [])}
    evil["center_tags"] = _Evil(f"touch {marker}")
    _add(dataset, "meta2", "zz_evil_CH_19", pickle.dumps(evil))
    _add(dataset, "meta3", "zz_evil2_CH_19", pickle.dumps(_Evil(f"touch {marker}")))
    with pytest.raises(MetaError, match="posix.system"):
        load_meta(dataset / "meta2" / "zz_evil_CH_19.pickle")
    for workers in (1, 2):
        result = run_caption(
            CaptionConfig(dataset=dataset, out=tmp_path / "o.csv", workers=workers, force=True)
        )
        assert result.refused == {"unsafe": 2}
        assert not marker.exists()
    assert "evil" not in (tmp_path / "o.csv").read_text()
    files = {e[0] for e in result.examples}
    assert files == {"meta2/zz_evil_CH_19.pickle", "meta3/zz_evil2_CH_19.pickle"}


def test_broken_meta_files_are_skipped_and_counted(dataset: Path, tmp_path: Path):
    good = _meta({"landuse": "grass"})
    broken = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "garbage": b"\x00\xffnot a pickle at all",
        "missing": dumps_meta({"box": (0, 0, 1, 1), "time": (2020, 1, 1, 0, 0), "center_tags": {}}),
        "list": pickle.dumps([1, 2, 3]),
        "bad_around": dumps_meta(
            {"box": (0,), "time": (0,), "center_tags": {"a": "b"}, "surrounding_tags": "x"}
        ),
    }
    for name, payload in broken.items():
        _add(dataset, "meta3", f"zz_{name}_FI_19", payload)
    result = run_caption(CaptionConfig(dataset=dataset, out=tmp_path / "o.csv", workers=1))
    assert result.refused == {"bad-tags": 1, "corrupt": 3, "missing-key": 1, "not-a-dict": 1}
    details = {f.split("/")[1]: d for f, _, d in result.examples}
    assert "lacks surrounding_tags" in details["zz_missing_FI_19.pickle"]
    assert "truncated" in details["zz_truncated_FI_19.pickle"]
    df = _read_csv(tmp_path / "o.csv")
    assert not df.filepath.str.contains("zz_").any()
    assert "6 files refused (bad-tags 1, corrupt 3, missing-key 1, not-a-dict 1)" in (
        result.summary()
    )


def test_a_meta_file_without_its_image_gets_no_row_and_is_counted(dataset: Path, tmp_path: Path):
    out = tmp_path / "o.csv"
    first = run_caption(CaptionConfig(dataset=dataset, out=out, workers=2))
    assert first.missing_images == 0 and "without their image" not in first.summary()
    rows = set(_read_csv(out).filepath)
    gone = sorted(rows)[:3]
    for filepath in gone:
        (dataset / filepath).unlink()
    (dataset / "images3" / "a2_US_20.jpg").unlink()  # the farmland
    (dataset / "images3" / "a2_US_20.jpg").mkdir()  # a folder is no image either
    second = run_caption(CaptionConfig(dataset=dataset, out=out, workers=2))
    assert not second.up_to_date  # the image folders changed
    assert second.missing_images == 4 and second.files == first.files
    assert second.written == first.written - 4
    assert set(_read_csv(out).filepath) == rows - set(gone) - {"images3/a2_US_20.jpg"}
    assert "4 without their image (no row)" in second.summary()
    stats = json.loads(stats_path(out).read_text())
    assert stats["missing_images"] == 4 and stats["written"] == second.written
    missing = {e["file"] for e in stats["refused_examples"] if e["reason"] == "missing-image"}
    assert missing == {f"meta{p[6:]}".replace(".jpg", ".pickle") for p in gone} | {
        "meta3/a2_US_20.pickle"
    }
    again = run_caption(CaptionConfig(dataset=dataset, out=out, workers=1))
    assert again.up_to_date and "4 without their image" in again.summary()
    # an image back (fetch writes it atomically) is a row again
    (dataset / gone[0]).write_bytes(data.jpeg_bytes())
    fourth = run_caption(CaptionConfig(dataset=dataset, out=out, workers=1))
    assert fourth.missing_images == 3 and gone[0] in set(_read_csv(out).filepath)


def test_a_missing_images_folder_counts_all_its_meta_files(dataset: Path, tmp_path: Path):
    n_meta3 = len(list((dataset / "meta3").glob("*.pickle")))
    shutil.rmtree(dataset / "images3")
    result = run_caption(CaptionConfig(dataset=dataset, out=tmp_path / "o.csv", workers=1))
    assert result.missing_images == n_meta3
    assert not _read_csv(tmp_path / "o.csv").filepath.str.startswith("images3/").any()


def test_no_images_at_all_is_refused_unless_meta_only(tmp_path: Path):
    dataset = data.make_dataset(tmp_path / "metas", images=False)
    out = tmp_path / "new" / "c.csv"
    with pytest.raises(InputError, match=r"no images\*/ folder beside meta10/, meta2/, meta3/: "):
        run_caption(CaptionConfig(dataset=dataset, out=out))
    assert not (tmp_path / "new").exists()
    result = run_caption(CaptionConfig(dataset=dataset, out=out, meta_only=True))
    n_meta = len(list(dataset.rglob("*.pickle")))
    assert result.files == n_meta and result.written == n_meta - 1  # one empty caption
    assert result.missing_images == 0 and "images not looked for" in result.summary()
    assert json.loads(stats_path(out).read_text())["meta_only"] is True


def test_a_failed_run_leaves_nothing(dataset: Path, tmp_path: Path):
    rules = tmp_path / "stop_rules.py"  # a user pressing Ctrl-C half-way
    rules.write_text(
        "def caption(center, around):\n"
        "    if 'landuse' in center:\n"
        "        raise KeyboardInterrupt\n"
        "    return 'x', 'y'\n"
    )
    out = tmp_path / "new" / "deeper" / "c.csv"
    with pytest.raises(KeyboardInterrupt):
        run_caption(CaptionConfig(dataset=dataset, out=out, rules=f"{rules}:caption", workers=1))
    assert not (tmp_path / "new").exists()
    out = tmp_path / "c.csv"
    out.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        run_caption(CaptionConfig(dataset=dataset, out=out, rules=f"{rules}:caption", workers=1))
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "c.csv",
        "ds",
        "stop_rules.py",
    ]


def test_a_killed_run_resumes_with_the_chunks_it_finished(dataset: Path, tmp_path: Path, cli):
    """SIGKILL half-way (no clean-up runs): the rerun captions only the chunks not marked
    done and writes the CSV a clean run writes."""
    calls = tmp_path / "calls.log"
    rules = tmp_path / "kill_rules.py"
    rules.write_text(
        "import os, signal\n"
        "def caption(center, around):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write('x\\n')\n"
        "    if os.environ.get('KILL_AT') and os.path.getsize("
        f"{str(calls)!r}) >= 2 * int(os.environ['KILL_AT']):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return ', '.join(sorted(center)), ''\n"
    )
    args = ["caption", "--dataset", dataset, "--rules", f"{rules}:caption", "--workers", "1"]
    clean = cli(*args, "--out", tmp_path / "clean.csv", "--chunk-size", "4")
    assert clean.returncode == 0, clean.stderr
    total = calls.stat().st_size // 2
    assert total > 12
    calls.unlink()
    out = tmp_path / "c.csv"
    killed = cli(*args, "--out", out, "--chunk-size", "4", env={"KILL_AT": "10"})
    assert killed.returncode == -9 and not out.exists()
    assert len(list((tmp_path / ".c.csv.chunks" / "_shards").glob("*.done.json"))) == 2
    calls.unlink()
    again = cli(*args, "--out", out, "--chunk-size", "4")
    assert again.returncode == 0, again.stderr
    assert calls.stat().st_size // 2 == total - 8, "the two chunks finished before are kept"
    assert out.read_bytes() == (tmp_path / "clean.csv").read_bytes()
    assert not (tmp_path / ".c.csv.chunks").exists()


# --- the stage's errors and the CLI ------------------------------------------------------------


def test_config_errors(tmp_path: Path):
    with pytest.raises(InputError, match="dataset folder not found"):
        CaptionConfig(dataset=tmp_path / "missing")
    with pytest.raises(ConfigError, match="workers"):
        CaptionConfig(dataset=tmp_path, workers=-1)
    with pytest.raises(ConfigError, match="no bundled caption rules named 'fancy'"):
        CaptionConfig(dataset=tmp_path, rules="fancy")
    with pytest.raises(ConfigError, match="cannot import"):
        CaptionConfig(dataset=tmp_path, rules="no_such_module_xyz:caption")
    (tmp_path / "meta2").mkdir()  # a meta folder without pickles does not count
    with pytest.raises(InputError, match="no meta"):
        run_caption(CaptionConfig(dataset=tmp_path))
    assert find_meta_folders(tmp_path) == []


def test_cli_runs_and_prints_counts(cli, dataset: Path, tmp_path: Path):
    _add(dataset, "meta2", "zz_bad_CH_19", b"junk")
    out = tmp_path / "sub" / "captions.csv"
    r = cli("caption", "--dataset", dataset, "--out", out, "--workers", "2")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert "captions written to" in line and "1 empty captions" in line
    assert "1 files refused (corrupt 1)" in line
    assert out.exists() and stats_path(out).exists()


@pytest.mark.parametrize(
    "case", ["missing", "no-meta", "bad-rules", "no-images", "out-under-a-file", "out-a-folder"]
)
def test_cli_bad_input_is_one_line_exit_2(cli, tmp_path: Path, case):
    args = ["caption", "--dataset", tmp_path / "nope"]
    named = tmp_path / "nope"
    if case == "no-meta":
        (tmp_path / "images2").mkdir()
        args = ["caption", "--dataset", tmp_path]
        named = tmp_path
    elif case == "bad-rules":
        data.make_dataset(tmp_path / "ds", n_random=0)
        (tmp_path / "r.yaml").write_text("colour: red\n")
        args = ["caption", "--dataset", tmp_path / "ds", "--rules", tmp_path / "r.yaml"]
        named = tmp_path / "r.yaml"
    elif case == "no-images":
        named = data.make_dataset(tmp_path / "ds", n_random=0, images=False)
        args = ["caption", "--dataset", named, "--out", tmp_path / "new" / "c.csv"]
    elif case.startswith("out-"):
        data.make_dataset(tmp_path / "ds", n_random=0)
        (tmp_path / "a_file").write_text("x")
        named = tmp_path / "a_file" / "c.csv" if case == "out-under-a-file" else tmp_path
        args = ["caption", "--dataset", tmp_path / "ds", "--out", named]
    before = sorted(tmp_path.rglob("*"))
    r = cli(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("skyscript-build caption: error: ")
    assert str(named) in r.stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing made


def test_cli_meta_only(cli, tmp_path: Path):
    dataset = data.make_dataset(tmp_path / "ds", n_random=0, images=False)
    r = cli("caption", "--dataset", dataset, "--meta-only")
    assert r.returncode == 0, r.stderr
    assert "images not looked for" in r.stdout
    assert len(_read_csv(dataset / "SkyScript_captions.csv")) == 12


def test_cli_module_function_rules(cli, dataset: Path, tmp_path: Path):
    (tmp_path / "my_caption_rules.py").write_text(
        "def caption(center, around):\n    return 'tags: ' + ', '.join(sorted(center)), ''\n"
    )
    out = tmp_path / "m.csv"
    r = cli(
        "caption", "--dataset", dataset, "--out", out, "--rules", "my_caption_rules:caption",
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    df = _read_csv(out)
    assert df.title.str.startswith("tags: ").all() and (df.title_multi_objects == "").all()


# --- on a Dask cluster (last: the cluster's threads stay up until the module ends) ------------


@pytest.fixture(scope="module")
def dask_cluster():
    """A LocalCluster of two worker processes on 127.0.0.1 (real Dask processes)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster


def test_chunks_run_on_dask_workers_same_bytes(dataset: Path, tmp_path: Path, dask_cluster):
    rules = tmp_path / "r.yaml"  # rules of a file: built on each worker from the task
    rules.write_text("joiners:\n  surrounded_by: ', next to '\n")
    local = run_caption(
        CaptionConfig(dataset=dataset, out=tmp_path / "local.csv", rules=str(rules), workers=1)
    )
    assert local.chunks_by_worker == {"local": 3}  # one chunk per meta folder
    out = tmp_path / "dask.csv"
    result = run_caption(
        CaptionConfig(
            dataset=dataset,
            out=out,
            rules=str(rules),
            scheduler=dask_cluster.scheduler_address,
            chunk_size=5,
        )
    )
    assert out.read_bytes() == (tmp_path / "local.csv").read_bytes()
    assert b", next to " in out.read_bytes()
    workers = set(dask_cluster.scheduler_info["workers"])
    assert len(workers) == 2
    assert set(result.chunks_by_worker) <= workers  # every chunk ran on a cluster worker
    assert sum(result.chunks_by_worker.values()) > 3
    stats = json.loads(stats_path(out).read_text())
    assert stats["chunks_by_worker"] == result.chunks_by_worker
    assert (result.files, result.written, result.empty) == (local.files, local.written, local.empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dask.csv",
        "dask.stats.json",
        "ds",
        "local.csv",
        "local.stats.json",
        "r.yaml",
    ]  # fmt: skip: no chunk folder left


def test_cli_scheduler_flag(cli, dataset: Path, tmp_path: Path, dask_cluster):
    out = tmp_path / "c.csv"
    r = cli(
        "caption", "--dataset", dataset, "--out", out, "--scheduler",
        dask_cluster.scheduler_address, "--chunk-size", "4",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "captions written to" in r.stdout
    assert f"on Dask ({dask_cluster.scheduler_address})" in r.stderr
    local = tmp_path / "l.csv"
    run_caption(CaptionConfig(dataset=dataset, out=local, workers=1))
    assert out.read_bytes() == local.read_bytes()
    assert "local" not in json.loads(stats_path(out).read_text())["chunks_by_worker"]
