"""polish against a real HTTP server on 127.0.0.1 (tests/openai_stub_server.py) with faults."""

from __future__ import annotations

import csv
import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skyscript_build.caption import CaptionConfig, run_caption
from skyscript_build.errors import ConfigError
from skyscript_build.meta import dumps_meta, make_meta
from skyscript_build.polish import (
    PolishConfig,
    check_rewrite,
    focus_keywords,
    parse_answer,
    run_polish,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_stub_server import StubServer, polite  # noqa: E402

# (stem, part, center tags, title, title_multi_objects); the tags go into meta files.
ROWS = [
    ("n1_FI_19", 2, {"amenity": "fountain"}, "amenity of fountain",
     "amenity of fountain, surrounded by natural tree; road of footway"),
    ("a2_FI_19", 3, {"landuse": "farmland", "crop": "cotton"},
     "landuse of farmland, crop of cotton", "landuse of farmland with crop of cotton"),
    ("n3_FI_19", 2, {"power": "pole"}, "power pole",
     "power pole, surrounded by power line with cables of 3 and voltage of 16000"),
    ("w4_FI_19", 4, {"man_made": "pier"}, "man made pier",
     "man made pier, surrounded by waterway of river"),
    ("a5_FI_19", 2, {"building": "yes"}, "building", "building"),
    ("a6_FI_19", 3, {"landuse": "quarry", "resource": "bauxite"},
     "landuse of quarry, resource of bauxite", "landuse of quarry with resource of bauxite"),
]  # fmt: skip
EXTRA = 17  # more rows, without meta files, so batches do not divide the row count


def _dataset(root: Path) -> Path:
    """A caption CSV with meta files beside images{k}/ (as the caption stage writes them)."""
    rows = []
    for stem, part, tags, title, multi in ROWS:
        meta = make_meta(
            (24.9, 60.1, 24.91, 60.11), (2019, 6, 1, 10, 0), tags, [{"natural": "tree"}]
        )
        (root / f"meta{part}").mkdir(parents=True, exist_ok=True)
        (root / f"meta{part}" / f"{stem}.pickle").write_bytes(dumps_meta(meta))
        rows.append((f"images{part}/{stem}.jpg", title, multi))
    for i in range(EXTRA):
        rows.append(
            (f"images5/n{100 + i}_FI_19.jpg", f"leisure of park {i}", f"leisure of park {i}")
        )
    path = root / "SkyScript_captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filepath", "title", "title_multi_objects"])
        writer.writerows(rows)
    return path


@pytest.fixture
def captions(tmp_path: Path) -> Path:
    return _dataset(tmp_path / "dataset")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _config(captions: Path, url: str, **kw) -> PolishConfig:
    kw.setdefault("out", captions.parent / "polished.csv")
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("timeout", 5.0)
    return PolishConfig(captions=captions, endpoint=url, model="stub-model", **kw)


def _input(captions: Path) -> list[dict[str, str]]:
    return _read(captions)


# --- the whole stage against the server -------------------------------------------------


def test_batches_come_back_once_in_input_order_despite_shuffled_answers(captions: Path) -> None:
    faults = ["reverse", "drop", "extra", "duplicate", "fenced", "reverse"]
    with StubServer(faults=faults) as server:
        result = run_polish(_config(captions, server.url, batch=4, concurrency=3))
        sent = server.captions_sent()
    rows = _read(captions.parent / "polished.csv")
    source = _input(captions)
    assert [r["filepath"] for r in rows] == [r["filepath"] for r in source]
    assert [r["title_raw"] for r in rows] == [r["title"] for r in source]
    assert [r["title"] for r in rows] == [polite(r["title"]) for r in source]
    assert result.polished == len(source) and not result.fallback
    # The dropped answer and the duplicated id were asked again, alone; nothing else was.
    assert len(sent) == len(source) + 2
    assert result.requests == 6 + 2
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert list(rows[0]) == ["filepath", "title_raw", "title"]
    stats = json.loads((captions.parent / "polished.stats.json").read_text())
    assert stats["polished"] == len(source) and stats["requests"] == 8


def test_tags_from_meta_files_are_sent(captions: Path) -> None:
    with StubServer() as server:
        run_polish(
            _config(captions, server.url, batch=32, column="title_multi_objects", max_tokens=500)
        )
        body = json.loads(server.bodies[0])
    items = [json.loads(line) for line in body["messages"][-1]["content"].splitlines()]
    assert items[0]["tags"] == {"amenity": "fountain"}
    assert items[0]["surrounding"] == [{"natural": "tree"}]
    assert items[0]["caption"].startswith("amenity of fountain, surrounded by")
    assert "tags" not in items[-1]  # no meta file for it
    assert [i["id"] for i in items] == list(range(1, len(items) + 1))
    assert body["model"] == "stub-model" and body["temperature"] == 0.0
    assert body["max_tokens"] == 500


def test_transient_faults_are_retried_with_backoff_and_retry_after(captions: Path) -> None:
    faults = ["429", "500", "stall", "malformed"]
    with StubServer(faults=faults, retry_after="0.3", stall_s=1.5) as server:
        result = run_polish(_config(captions, server.url, batch=8, concurrency=1, timeout=0.5))
        times = server.request_times
    rows = _read(captions.parent / "polished.csv")
    assert all(r["title"] == polite(r["title_raw"]) for r in rows)
    assert result.retries == 4 and result.failed_requests == 0
    assert times[1] - times[0] >= 0.3  # the 429's Retry-After was honoured


def test_failed_requests_fall_back_uncached_and_a_rerun_retries_them(captions: Path) -> None:
    with StubServer(faults=["500"] * 4) as server:
        result = run_polish(_config(captions, server.url, batch=8, concurrency=1, max_retries=1))
    assert result.failed_requests == 2
    assert result.fallback == {"request-failed": 16}
    rows = _read(captions.parent / "polished.csv")
    assert [r["title"] for r in rows[:16]] == [r["title_raw"] for r in rows[:16]]
    with StubServer() as server:
        again = run_polish(_config(captions, server.url, batch=8, concurrency=1))
        assert len(server.captions_sent()) == 16
    assert again.cached == len(rows) - 16 and again.polished == len(rows)


def test_cache_makes_a_rerun_free_and_a_resumed_run_pays_only_the_rest(captions: Path) -> None:
    out = captions.parent / "polished.csv"
    with StubServer() as server:
        first = run_polish(_config(captions, server.url, batch=4, limit=10))
        assert first.rows == 10 and len(server.captions_sent()) == 10
        full = run_polish(_config(captions, server.url, batch=4))
        assert len(server.captions_sent()) == len(_input(captions))  # only the 13 missing
        assert full.cached == 10
        before = server.requests
        data = out.read_bytes()
        again = run_polish(_config(captions, server.url, batch=4))
        assert server.requests == before  # zero requests
    assert again.cached == again.rows == again.polished and again.requests == 0
    assert out.read_bytes() == data
    # Another model or prompt is a miss.
    prompt = captions.parent / "prompt.txt"
    prompt.write_text("Rewrite the captions.\n")
    with StubServer() as server:
        other = {"captions": captions, "endpoint": server.url, "out": out, "limit": 3}
        run_polish(PolishConfig(model="other-model", **other))
        run_polish(PolishConfig(model="stub-model", prompt=prompt, **other))
        assert len(server.captions_sent()) == 6


def test_guard_rejects_bad_rewrites_retries_once_then_falls_back(captions: Path) -> None:
    rules = {"fountain": "nokeyword", "pier": "empty", "farmland": "long", "quarry": "omit"}
    with StubServer(rules=rules) as server:
        result = run_polish(_config(captions, server.url, batch=8))
        sent = server.captions_sent()
    assert result.fallback == {
        "missing-keyword": 1,
        "empty": 1,
        "too-long": 1,
        "unanswered": 1,
    }
    assert result.polished == result.rows - 4
    for word in rules:
        assert sum(word in c for c in sent) == 2  # sent, then retried once alone
    by_raw = {r["title_raw"]: r["title"] for r in _read(captions.parent / "polished.csv")}
    assert by_raw["amenity of fountain"] == "amenity of fountain"
    assert by_raw["power pole"] == polite("power pole")
    # Fallbacks are final answers: cached, not paid for again.
    with StubServer(rules=rules) as server:
        again = run_polish(_config(captions, server.url, batch=8))
        assert server.requests == 0
    assert again.fallback == result.fallback


def test_rate_cap_spaces_requests(captions: Path) -> None:
    with StubServer() as server:
        run_polish(_config(captions, server.url, batch=4, concurrency=4, max_rpm=600))
        times = server.request_times
    assert len(times) == 6
    assert times[-1] - times[0] >= 5 * 0.1 * 0.9


def test_dry_run_sends_nothing_and_writes_nothing(captions: Path) -> None:
    with StubServer() as server:
        result = run_polish(_config(captions, server.url, batch=4, dry_run=True))
        assert server.requests == 0
    assert result.requests == 6 and result.estimated_input_tokens > 0
    assert result.estimated_output_tokens > 0
    assert "characters / 4" in result.summary()
    assert not any(p.name.startswith("polished") for p in captions.parent.iterdir())


def test_a_killed_run_resumes_paying_only_for_what_is_missing(captions: Path) -> None:
    out, cache = captions.parent / "p.csv", captions.parent / "answers.sqlite"
    with StubServer(latency=0.05) as server:
        args = ["--captions", captions, "--out", out, "--cache", cache, "--endpoint", server.url,
                "--model", "stub-model", "--batch", "1", "--concurrency", "1"]  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "skyscript_build.cli", "polish", *map(str, args)]
        )
        try:
            deadline = time.monotonic() + 60
            while server.requests < 9 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()
    assert server.requests >= 9  # so at least 7 answers had come back (50 ms each) and were saved
    assert not out.exists()  # no partial output
    done = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert 7 <= done < len(_input(captions))
    with StubServer() as server:
        result = run_polish(_config(captions, server.url, out=out, cache=cache, batch=1))
        assert len(server.captions_sent()) == len(_input(captions)) - done
    assert result.cached == done and result.polished == result.rows
    assert [r["title"] for r in _read(out)] == [polite(r["title"]) for r in _input(captions)]


def test_captions_of_the_caption_stage_keep_their_key_words(tmp_path: Path) -> None:
    tags = [
        {"highway": "footway"}, {"building": "yes"}, {"natural": "water", "water": "pond"},
        {"leisure": "pitch", "sport": "tennis"}, {"power": "line", "cables": "3"},
        {"man_made": "water_tower"}, {"amenity": "parking", "parking": "surface"},
        {"landuse": "farmland", "crop": "cotton"}, {"waterway": "river"}, {"railway": "rail"},
    ]  # fmt: skip
    dataset = tmp_path / "ds"
    (dataset / "meta2").mkdir(parents=True)
    for i, t in enumerate(tags):
        meta = make_meta((0, 0, 1, 1), (2020, 1, 1, 0, 0), t, [{"natural": "tree"}])
        (dataset / "meta2" / f"n{i}_FI_20.pickle").write_bytes(dumps_meta(meta))
    csv_path = dataset / "SkyScript_captions.csv"
    run_caption(CaptionConfig(dataset=dataset, out=csv_path, workers=1, meta_only=True))
    for row in _read(csv_path):
        center = tags[int(Path(row["filepath"]).stem.split("_")[0][1:])]
        for column in ("title", "title_multi_objects"):
            words = focus_keywords(row[column], center)
            assert words, row[column]
            assert check_rewrite(row[column], polite(row[column]), words) is None
            assert check_rewrite(row[column], "An aerial image of a place.", words)
    with StubServer() as server:
        result = run_polish(_config(csv_path, server.url, batch=3))
    assert result.polished == len(tags) and result.with_tags == len(tags)


# --- the command line: errors, exit codes, the key ----------------------------------------


def test_api_key_is_sent_but_never_written_or_logged(captions: Path, cli) -> None:
    key = "sk-test-5e3c1b7a9d2f4e6a8c0b"
    out = captions.parent / "p.csv"
    args = ["--captions", captions, "--out", out, "--model", "m", "--api-key-env", "MY_POLISH_KEY"]
    with StubServer(api_key=key, faults=["500", "429"]) as server:
        done = cli("-v", "polish", *args, "--endpoint", server.url, "--backoff-base", "0.01",
                   env={"MY_POLISH_KEY": key})  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert server.auth_headers[-1] == f"Bearer {key}"
        args[3] = captions.parent / "p2.csv"  # a fresh output and cache: nothing cached
        wrong = cli("polish", *args, "--endpoint", server.url, env={"MY_POLISH_KEY": "wrong"})
    assert wrong.returncode == 2 and "HTTP 401" in wrong.stderr, wrong.stderr
    assert not args[3].exists()
    assert "polished" in done.stdout
    for text in (done.stdout, done.stderr, wrong.stdout, wrong.stderr):
        assert key not in text
    for path in captions.parent.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_missing_key_variable_is_a_clear_error(captions: Path, cli) -> None:
    out = captions.parent / "p.csv"
    done = cli("polish", "--captions", captions, "--out", out, "--endpoint", "http://127.0.0.1:9/v1",
               "--model", "m", "--api-key-env", "NO_SUCH_POLISH_KEY")  # fmt: skip
    assert done.returncode == 2
    assert "NO_SUCH_POLISH_KEY is not set" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not out.exists()


def test_unreachable_endpoint_is_a_clear_error(captions: Path, cli) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = captions.parent / "p.csv"
    before = [p.name for p in captions.parent.iterdir()]
    done = cli("polish", "--captions", captions, "--out", out, "--endpoint",
               f"http://127.0.0.1:{port}/v1", "--model", "m", "--max-retries", "2",
               "--backoff-base", "0.01")  # fmt: skip
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("skyscript-build polish: error: cannot reach")
    assert f"127.0.0.1:{port}" in error and "Connection refused" in error
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in captions.parent.iterdir()) == sorted(before)


@pytest.mark.parametrize("case", ["unreachable", "no-rows", "out-under-a-file", "cache-a-folder"])
def test_refused_or_failed_polish_creates_nothing(captions: Path, cli, case) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = captions.parent.parent
    (root / "a_file").write_text("x")
    out = root / "new" / "deeper" / "p.csv"
    args = ["polish", "--captions", captions, "--endpoint", f"http://127.0.0.1:{port}/v1",
            "--model", "m", "--max-retries", "0", "--out", out]  # fmt: skip
    named: Path = out
    if case == "no-rows":
        named = root / "empty.csv"
        named.write_text("filepath,title,title_multi_objects\n")
        args[2] = named
    elif case == "out-under-a-file":
        named = root / "a_file" / "p.csv"
        args[-1] = named
    elif case == "cache-a-folder":
        named = root / "dataset"
        args += ["--cache", named]
    before = sorted(root.rglob("*"))
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and lines[-1].startswith("skyscript-build polish: error")
    if case == "unreachable":  # found by the first request (after the log line saying so)
        assert "cannot reach" in lines[-1]
    else:  # refused before any work
        assert len(lines) == 1 and str(named) in lines[0]
    assert sorted(root.rglob("*")) == before  # no folder, no cache, no output


def test_bad_caption_csv_is_a_clear_error(tmp_path: Path, cli) -> None:
    bad = tmp_path / "caps.csv"
    bad.write_text("filepath,caption\nimages2/a.jpg,x\n")
    done = cli("polish", "--captions", bad, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m")
    assert done.returncode == 2
    assert str(bad) in done.stderr and "no column 'title'" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_is_validated_up_front(captions: Path) -> None:
    with pytest.raises(ConfigError, match="--batch"):
        _config(captions, "http://127.0.0.1:9/v1", batch=0)
    with pytest.raises(ConfigError, match="--endpoint"):
        _config(captions, "127.0.0.1:9")
    with pytest.raises(ConfigError, match="--out"):
        _config(captions, "http://127.0.0.1:9/v1", out=captions)


def test_a_corrupt_cache_is_a_clear_error(captions: Path) -> None:
    cache = captions.parent / "cache.sqlite"
    cache.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(Exception, match="not a polish cache"):
        run_polish(_config(captions, "http://127.0.0.1:9/v1", cache=cache))
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(cache).execute("SELECT 1 FROM answers")


# --- the parser and the guard ----------------------------------------------------------------


def test_parse_answer_matches_by_id_and_drops_ambiguity() -> None:
    content = '{"id": 2, "text": "b"}\n{"id": "1", "text": "a"}\n{"id": 9, "text": "z"}'
    assert parse_answer(content, 2) == ({1: "a", 2: "b"}, 1)
    dup = '{"id": 1, "text": "a"}\n{"id": 1, "text": "other"}\n{"id": 2, "text": "b"}'
    assert parse_answer(dup, 2) == ({2: "b"}, 2)
    fenced = 'Sure!\n```json\n[{"id": 1, "caption": "a"}, {"id": 2, "text": "b"}]\n```'
    assert parse_answer(fenced, 2) == ({1: "a", 2: "b"}, 0)
    wrapped = '{"captions": [{"id": 1, "text": "a"}]}'
    assert parse_answer(wrapped, 1) == ({1: "a"}, 0)
    assert parse_answer('"An aerial image of a pier."', 1) == ({1: "An aerial image of a pier."}, 0)
    thinking = '<think>{"id": 1, "text": "draft"}</think>\n{"id": 1, "text": "final"}'
    assert parse_answer(thinking, 1) == ({1: "final"}, 0)
    assert parse_answer("not json at all", 2) == ({}, 0)
    assert parse_answer('{"id": 1, "text": "a"', 1) == ({}, 0)


def test_guard_and_focus_keywords() -> None:
    assert focus_keywords("amenity of fountain", {"amenity": "fountain"}) == ["fountain"]
    assert focus_keywords("building", {"building": "yes"}) == ["building"]
    assert focus_keywords("man made pier", {"man_made": "pier"}) == ["pier"]
    assert focus_keywords("road of footway", {"highway": "footway"}) == ["footway"]
    assert focus_keywords("amenity of drinking water", {"amenity": "drinking_water"}) == [
        "drinking water"
    ]
    assert focus_keywords("landuse of farmland, crop of cotton", None) == ["farmland"]
    assert focus_keywords("power pole", None) == ["pole"]
    assert (
        check_rewrite("amenity of fountain", "An aerial image of a Fountain.", ["fountain"]) is None
    )
    assert check_rewrite("amenity of fountain", "  ", ["fountain"]) == "empty"
    assert check_rewrite("a", "x" * 205, []) == "too-long"
    assert check_rewrite("a", "x" * 204, []) is None
    assert check_rewrite("amenity of fountain", "A park.", ["fountain"]) == "missing-keyword"
    assert check_rewrite("x", "Drinking_Water tap", ["drinking water"]) is None
