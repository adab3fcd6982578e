"""The build report: counts, valid PNGs, and a page that loads cleanly in headless Chromium."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from skyscript_build.report import ReportConfig, run_report

sys.path.insert(0, str(Path(__file__).parent / "data" / "report"))
from data import make_build  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make system-deps-test`)"
)


# Runs in the child: put the DevTools pipe on fds 3 and 4, then become Chromium.
_EXEC_WITH_PIPE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


def _fd_above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


def check_page_in_chromium(url: str, timeout: float = 60) -> dict[str, Any]:
    """Load ``url`` in headless Chromium over the DevTools pipe; report errors and images.

    Uses ``--remote-debugging-pipe`` (DevTools messages on fds 3 and 4, NUL-separated), so no
    port and no websocket library are needed. Returns ``{"errors": [...], "images": [...]}``
    where each image is ``[src, complete, naturalWidth]``.
    """
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    # The child's ends go to fds 3 and 4; moving them above 9 first means neither dup2
    # clobbers the other.
    to_chrome_r, from_chrome_w = _fd_above_9(to_chrome_r), _fd_above_9(from_chrome_w)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    args = [
        sys.executable,
        "-c",
        _EXEC_WITH_PIPE,
        str(to_chrome_r),
        str(from_chrome_w),
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--remote-debugging-pipe",
        "about:blank",
    ]
    proc = subprocess.Popen(
        args,
        pass_fds=(to_chrome_r, from_chrome_w),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    deadline = time.monotonic() + timeout
    buffer = b""
    events: list[dict[str, Any]] = []
    next_id = 0

    def send(method: str, params: dict | None = None, session: str | None = None) -> int:
        nonlocal next_id
        next_id += 1
        message: dict[str, Any] = {"id": next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(to_chrome_w, json.dumps(message).encode() + b"\0")
        return next_id

    def receive(want: int | None = None, event: str | None = None) -> dict[str, Any]:
        nonlocal buffer
        while True:
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if want is not None and message.get("id") == want:
                    if "error" in message:
                        raise RuntimeError(f"DevTools error: {message['error']}")
                    return message["result"]
                events.append(message)
                if event is not None and message.get("method") == event:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer within {timeout} s")
            ready, _, _ = select.select([from_chrome_r], [], [], left)
            if ready:
                chunk = os.read(from_chrome_r, 1 << 16)
                if not chunk:
                    raise EOFError("Chromium closed the DevTools pipe")
                buffer += chunk

    try:
        target = receive(send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = receive(send("Target.attachToTarget", {"targetId": target, "flatten": True}))[
            "sessionId"
        ]
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            receive(send(method, session=session))
        receive(send("Page.navigate", {"url": url}, session=session))
        receive(event="Page.loadEventFired")
        images = receive(
            send(
                "Runtime.evaluate",
                {
                    "expression": "JSON.stringify(Array.from(document.images)"
                    ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]))",
                    "returnByValue": True,
                },
                session=session,
            )
        )["result"]["value"]
        send("Browser.close")
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    errors = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            errors.append(str(params.get("args")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
    return {"errors": errors, "images": json.loads(images)}


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
