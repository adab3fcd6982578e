"""The Earth Engine backend: the real ``ee`` client against the emulator over HTTP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import load_fixture_script
from PIL import Image

import skyscript_build.emulator.pixels as emulator_pixels
from skyscript_build.cli import main
from skyscript_build.emulator import Emulator
from skyscript_build.fetch import FetchConfig, iter_manifest, run_fetch
from skyscript_build.fetch.backends import close_backends
from skyscript_build.meta import load_meta

DATA = Path(__file__).parent / "data" / "fetch"
REPO = Path(__file__).resolve().parent.parent
fixture_data = load_fixture_script("fetch")


@pytest.fixture(autouse=True)
def _fresh_backends():
    yield
    close_backends()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return fixture_data.make_fixture(tmp_path_factory.mktemp("ee-fx"), n=12, parts=2)


def _ee(fx, out: Path, emu: Emulator, **kw) -> FetchConfig:
    kw.setdefault("backoff_s", 0.01)
    return FetchConfig(
        requests=kw.pop("requests", fx["requests"]),
        out=out,
        backend="earthengine",
        ee_url=emu.url,
        project="demo-project",
        **kw,
    )


def _decode(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "JPEG"
        return np.asarray(im.convert("RGB"))


def _check_dataset(out: Path) -> set[str]:
    """Every jpg decodes, every pickle loads, no temp files; return the file set."""
    files = {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "manifest" not in p.parts
    }
    for name in files:
        if name.endswith(".jpg"):
            _decode(out / name)
        elif name.endswith(".pickle"):
            load_meta(str(out / name))
    assert not [f for f in files if f.endswith(".tmp")]
    return files


def test_happy_path_matches_the_raster(fx, tmp_path):
    with Emulator(fx["collections"]) as emu:
        result = run_fetch(_ee(fx, tmp_path / "ds", emu, blocks="off"))
        stats = emu.stats
    assert (result.ok, result.skipped, result.failed) == (12, 0, 0)
    assert stats.count("image:computePixels") == 12
    assert stats.count("value:compute") == 3  # the settings probe, one image lookup per shard
    rows = list(iter_manifest(tmp_path / "ds"))
    assert {r["image_id"] for r in rows} == {"Finland/SMK/V/50cm/helsinki_2019"}
    assert {r["acquisition_time"].isoformat() for r in rows} == {"2019-06-15T10:30:00+00:00"}
    assert all(r["attempts"] == 1 for r in rows)
    # The emulator's JPEG shows the same pixels the raster backend cuts from the file.
    raster = run_fetch(
        FetchConfig(
            requests=fx["requests"],
            out=tmp_path / "raster",
            backend="raster",
            location=str(fx["rasters"]),
        )
    )
    assert raster.ok == 12
    for row in rows[:4]:
        ee_rgb = _decode(tmp_path / "ds" / row["filepath"]).astype(int)
        local = _decode(tmp_path / "raster" / row["filepath"]).astype(int)
        aligned = np.abs(ee_rgb - local).mean()
        shifted = np.abs(ee_rgb[1:, 1:] - local[:-1, :-1]).mean()
        assert aligned < 10 and aligned < shifted / 2  # the same grid, two JPEG encodings
    meta = load_meta(str(next((tmp_path / "ds").glob("meta*/*.pickle"))))
    assert meta["time"] == (2019, 6, 15, 10, 30)


@pytest.mark.parametrize(
    "faults",
    [
        "429:0.5",  # a 429 storm (Retry-After: 0)
        "500:0.25,503:0.15",  # server errors
        "truncate:0.3,html:0.2",  # cut bodies and garbled answers
    ],
)
def test_faults_are_retried_until_ok(fx, tmp_path, faults):
    with Emulator(fx["collections"], faults=faults, seed=3, retry_after_s=0) as emu:
        result = run_fetch(_ee(fx, tmp_path / "ds", emu, max_attempts=12, blocks="off"))
        assert sum(emu.stats.faults.values()) > 0
    assert (result.ok, result.failed) == (12, 0), result.summary()
    rows = list(iter_manifest(tmp_path / "ds"))
    assert sum(r["attempts"] for r in rows) > 12
    assert len(_check_dataset(tmp_path / "ds")) == 24


def test_stalls_time_out_and_are_retried(fx, tmp_path):
    with Emulator(fx["collections"], faults="timeout:0.3", seed=1, stall_s=2.0) as emu:
        result = run_fetch(_ee(fx, tmp_path / "ds", emu, timeout_s=0.5, max_attempts=10))
        assert emu.stats.faults["timeout"] > 0
    assert (result.ok, result.failed) == (12, 0), result.summary()


def test_exhausted_retries_are_failed_then_refetched(fx, tmp_path, cli):
    out = tmp_path / "ds"
    with Emulator(fx["collections"], faults="500:1.0") as emu:
        result = run_fetch(_ee(fx, out, emu, max_attempts=2))
    assert (result.ok, result.failed) == (0, 12)
    assert result.reasons == {"http-5xx": 12}
    assert not list(out.glob("images*/*.jpg"))
    with Emulator(fx["collections"]) as emu:
        args = ["fetch", "--requests", fx["requests"], "--out", out, "--backend", "earthengine"]
        done = cli(*args, "--ee-url", emu.url, "--project", "p", "--blocks", "off")
        assert done.returncode == 0, done.stderr
        assert emu.stats.count("image:computePixels") == 12
    assert "12 ok, 0 skipped, 0 failed" in done.stdout


def test_no_imagery_is_a_recorded_skip_or_the_next_year(fx, tmp_path):
    rows = fixture_data.request_rows(3, seed=5, years=(2018, 2019))
    requests = fixture_data.write_requests(tmp_path / "req", [rows])
    with Emulator(fx["collections"]) as emu:
        skip = run_fetch(_ee(fx, tmp_path / "a", emu, requests=requests))
        assert (skip.skipped, skip.reasons) == (3, {"no-image": 3})
        nxt = run_fetch(_ee(fx, tmp_path / "b", emu, requests=requests, allow_next_year=True))
    assert nxt.ok == 3
    manifest = list(iter_manifest(tmp_path / "b"))
    assert sorted((r["request_key"], r["key"]) for r in manifest) == [
        (f"a{1000 + i}_FI_18", f"a{1000 + i}_FI_19") for i in range(3)
    ]
    assert all(r["filepath"].endswith("_FI_19.jpg") for r in manifest)


def test_too_large_answers_are_split_and_stitched(fx, tmp_path, monkeypatch):
    with Emulator(fx["collections"]) as emu:
        whole = run_fetch(_ee(fx, tmp_path / "whole", emu, blocks="off"))
        monkeypatch.setattr(emulator_pixels, "MAX_REQUEST_BYTES", 64 * 64 * 3 - 1)
        emu.reset()
        split = run_fetch(_ee(fx, tmp_path / "split", emu, blocks="off"))
        assert emu.stats.count("image:computePixels", 400) == 12
        assert emu.stats.count("image:computePixels", 200) == 48
    assert whole.ok == split.ok == 12
    for row in list(iter_manifest(tmp_path / "split"))[:3]:
        a = _decode(tmp_path / "whole" / row["filepath"]).astype(int)
        b = _decode(tmp_path / "split" / row["filepath"]).astype(int)
        for part in (np.s_[:32, :32], np.s_[:32, 32:], np.s_[32:, :32], np.s_[32:, 32:]):
            aligned = np.abs(a[part] - b[part]).mean()
            shifted = np.abs(np.roll(a, 1, axis=1)[part] - b[part]).mean()
            assert aligned < 8 and aligned < shifted / 2  # each piece in its place


def test_concurrency_cap_is_never_exceeded(fx, tmp_path):
    with Emulator(fx["collections"], latency_ms=40) as emu:
        result = run_fetch(_ee(fx, tmp_path / "ds", emu, concurrency=3, blocks="off"))
        assert result.ok == 12
        assert 2 <= emu.stats.max_concurrency <= 3


def test_bad_key_or_missing_project_is_a_clear_error(fx, tmp_path, cli, capsys, monkeypatch):
    base = ["fetch", "--requests", str(fx["requests"]), "--out", str(tmp_path / "ds")]
    base += ["--backend", "earthengine"]

    def run(*args: str) -> tuple[int, str]:
        code = main([*base, *map(str, args)])
        return code, capsys.readouterr().err

    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account", "private_key": "TOPSECRET-KEY-MATERIAL"}')
    code, err = run("--project", "p", "--key-file", key)
    assert code == 2
    assert err.strip() == (
        f"skyscript-build fetch: error: {key}: not a service-account key "
        "(missing client_email, token_uri)"
    )
    assert "TOPSECRET" not in err
    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", '{"private_key": "TOPSECRET"}')
    code, err = run("--project", "p")
    assert code == 2 and "EE_SERVICE_ACCOUNT_KEY: not a service-account key" in err
    assert "TOPSECRET" not in err
    monkeypatch.delenv("EE_SERVICE_ACCOUNT_KEY")
    code, err = run("--key-file", tmp_path / "nope.json", "--project", "p")
    assert code == 2 and "nope.json: service-account key file does not exist" in err
    # As a user runs it: a subprocess, one line on stderr, exit 2, no output folder.
    no_project = cli(*base, "--ee-url", "http://127.0.0.1:9")
    assert no_project.returncode == 2
    assert "needs a Google Cloud project: pass --project" in no_project.stderr
    assert len(no_project.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists()


def _token_server(token: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_credentials_never_reach_logs_errors_or_manifest(fx, tmp_path, caplog):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    token = "ya29.SECRET-ACCESS-TOKEN-0123456789"
    server = _token_server(token)
    key = {
        "type": "service_account",
        "project_id": "key-project",
        "private_key_id": "abc123",
        "private_key": pem,
        "client_email": "fetcher@key-project.iam.gserviceaccount.com",
        "token_uri": f"http://127.0.0.1:{server.server_address[1]}/token",
    }
    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps(key))
    caplog.set_level(logging.DEBUG)
    try:
        with Emulator(fx["collections"], faults="429:0.3,500:0.2", retry_after_s=0) as emu:
            config = FetchConfig(
                requests=fx["requests"],
                out=tmp_path / "ds",
                backend="earthengine",
                ee_url=emu.url,
                key_file=str(key_file),  # the project comes from the key
                backoff_s=0.01,
                max_attempts=12,
            )
            result = run_fetch(config)
    finally:
        server.shutdown()
        server.server_close()
    assert result.ok == 12
    secret_bits = [token, "SECRET", pem.splitlines()[1], "BEGIN PRIVATE KEY"]
    texts = [caplog.text, result.summary()]
    texts += [p.read_text() for p in (tmp_path / "ds" / "manifest").glob("*.json")]
    texts += [json.dumps(list(iter_manifest(tmp_path / "ds")), default=str)]
    for text in texts:
        for bit in secret_bits:
            assert bit not in text


def test_sigkill_and_resume_give_the_same_files(fx, tmp_path):
    rows = fixture_data.request_rows(40, seed=7)
    requests = fixture_data.write_requests(tmp_path / "req", [rows[:20], rows[20:]])
    with Emulator(fx["collections"], latency_ms=120) as emu:
        reference = run_fetch(_ee(fx, tmp_path / "ref", emu, requests=requests, concurrency=8))
        assert reference.ok == 40
        out = tmp_path / "ds"
        cmd = [sys.executable, "-m", "skyscript_build.cli", "fetch", "--requests", str(requests)]
        cmd += ["--out", str(out), "--backend", "earthengine", "--ee-url", emu.url]
        cmd += ["--project", "p", "--concurrency", "4", "--shard-size", "8"]
        env = {**os.environ, "SKYSCRIPT_NO_PROGRESS": "1"}
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(out.glob("images*/*.jpg"))) < 10:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        killed_with = len(list(out.glob("images*/*.jpg")))
        assert 10 <= killed_with < 40  # it really was mid-run
        rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
    assert "40 ok, 0 skipped, 0 failed" in rerun.stdout
    assert _check_dataset(out) == _check_dataset(tmp_path / "ref")


@pytest.mark.slow
def test_cap_holds_across_dask_worker_processes(fx, tmp_path):
    rows = fixture_data.request_rows(24, seed=11)
    requests = fixture_data.write_requests(tmp_path / "req", [rows])
    with Emulator(fx["collections"], latency_ms=40) as emu:
        config = _ee(
            fx,
            tmp_path / "ds",
            emu,
            requests=requests,
            concurrency=3,
            shard_size=4,
            rate=1000.0,
            blocks="off",
        )
        config = FetchConfig(**{**config.__dict__, "workers": 2})
        result = run_fetch(config)
        assert result.ok == 24 and result.shards_run == 6
        assert 2 <= emu.stats.max_concurrency <= 3  # two processes, one cluster-wide cap


def test_cloud_rule_picks_the_clear_scene_and_masks_clouds(fx, tmp_path):
    entries = fixture_data.write_s2(tmp_path / "s2")
    collections = fixture_data.write_collections(
        tmp_path / "collections.yaml", fx["raster"], extra={fixture_data.S2: entries}
    )
    rows = []
    for i, (x0, y1) in enumerate(((385180.0, 6672620.0), (384810.0, 6672620.0))):
        row = fixture_data.request_rows(1, seed=i, years=(2021,), prefix="n")[0]
        to_ll = fixture_data.Transformer.from_crs("EPSG:3067", "EPSG:4326", always_xy=True)
        lons, lats = to_ll.transform([x0, x0 + 160], [y1 - 160, y1])
        row.update(
            key=f"n{i}_S2_21", alias="S2", collection=fixture_data.S2, gsd=10.0,
            x_min=x0, x_max=x0 + 160, y_min=y1 - 160, y_max=y1, width=16, height=16,
            west=min(lons), east=max(lons), south=min(lats), north=max(lats),
        )  # fmt: skip
        rows.append(row)
    requests = fixture_data.write_requests(tmp_path / "req", [rows])
    with Emulator(collections) as emu:
        result = run_fetch(_ee(fx, tmp_path / "ds", emu, requests=requests))
    by_key = {r["key"]: r for r in iter_manifest(tmp_path / "ds")}
    clear, masked = by_key["n0_S2_21"], by_key["n1_S2_21"]
    assert (clear["status"], clear["image_id"]) == ("ok", f"{fixture_data.S2}/s2_clear")
    assert clear["acquisition_time"].isoformat() == "2021-06-01T10:00:00+00:00"
    assert (masked["status"], masked["reason"]) == ("skipped", "nodata")  # QA60 cloud bits
    assert result.ok == 1


def test_without_any_credentials_the_error_says_what_to_do(fx, tmp_path, capsys, monkeypatch):
    for name in ("EE_SERVICE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud application-default credentials
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # and no metadata server to ask
    args = ["fetch", "--requests", str(fx["requests"]), "--out", str(tmp_path / "ds")]
    assert main([*args, "--backend", "earthengine", "--project", "p"]) == 2
    err = capsys.readouterr().err
    assert "no Earth Engine credentials: pass --key-file" in err
    assert not (tmp_path / "ds").exists()


def test_an_unknown_collection_stops_before_any_work(fx, tmp_path, cli):
    entries = fixture_data.write_s2(tmp_path / "s2")
    only_s2 = tmp_path / "collections.yaml"
    only_s2.write_text(json.dumps({fixture_data.S2: entries}))  # JSON is YAML
    out = tmp_path / "ds"
    with Emulator(only_s2) as emu:
        args = ["fetch", "--requests", fx["requests"], "--out", out, "--backend", "earthengine"]
        result = cli(*args, "--ee-url", emu.url, "--project", "p")
        assert emu.stats.count("image:computePixels") == 0
    assert result.returncode == 2
    assert "refused the settings check of collection(s) Finland/SMK/V/50cm" in result.stderr
    assert "not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
