"""The Earth Engine emulator, exercised through the real ``ee`` client over HTTP."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import rasterio
import requests
from PIL import Image as PILImage

ee = pytest.importorskip("ee")

from skyscript_build.emulator import Emulator, init_ee_client, load_collections  # noqa: E402
from skyscript_build.emulator.faults import parse_faults  # noqa: E402
from skyscript_build.emulator.pixels import JPEG_QUALITY  # noqa: E402
from skyscript_build.errors import ConfigError, InputError  # noqa: E402

FI = "Finland/SMK/V/50cm"
X0, Y0 = 385800.0, 6672400.0  # upper-left of ortho_2019 (tests/data/emulator/data.py)


def grid(col: int, row: int, width: int, height: int, crs: str = "EPSG:3067", gsd=0.5):
    """A computePixels grid whose upper-left is pixel (col, row) of ortho_2019."""
    return {
        "dimensions": {"width": width, "height": height},
        "affineTransform": {
            "scaleX": gsd,
            "shearX": 0,
            "translateX": X0 + col * 0.5,
            "shearY": 0,
            "scaleY": -gsd,
            "translateY": Y0 - row * 0.5,
        },
        "crsCode": crs,
    }


def source_pixels(folder, name="ortho_2019.tif"):
    with rasterio.open(folder / name) as ds:
        return ds.read()


def region_2019():
    """A lon/lat rectangle inside ortho_2019 only (west part)."""
    return ee.Geometry.Rectangle([X0 + 10, Y0 - 100, X0 + 40, Y0 - 10], "EPSG:3067", False)


def test_client_initialises_and_reads_metadata(ee_emulator):
    col = ee.ImageCollection(FI)
    assert col.size().getInfo() == 2
    newest = col.sort("system:time_start", False).first()
    info = ee.Dictionary(
        {"id": newest.get("system:index"), "t": newest.get("system:time_start")}
    ).getInfo()
    assert info == {"id": "ortho_2021", "t": 1625130000000}
    assert newest.date().millis().getInfo() == 1625130000000
    image_info = newest.getInfo()
    assert image_info["id"] == f"{FI}/ortho_2021"
    assert [b["id"] for b in image_info["bands"]] == ["R", "G", "B"]
    assert image_info["bands"][0]["crs"] == "EPSG:3067"
    footprint = newest.geometry().getInfo()
    assert footprint["type"] == "Polygon"
    lon, lat = np.asarray(footprint["coordinates"][0]).mean(axis=0)
    assert 24.93 < lon < 24.96 and 60.16 < lat < 60.18
    assert col.aggregate_array("system:index").getInfo() == ["ortho_2019", "ortho_2021"]
    assert ee.ImageCollection("TEST/UTM_UINT16").first().bandNames().getInfo() == [
        "B1",
        "B2",
        "B3",
        "B4",
    ]


def test_filters_bounds_dates_and_properties(ee_emulator):
    col = ee.ImageCollection(FI)
    assert col.filterBounds(region_2019()).size().getInfo() == 1
    assert col.filterDate("2021-01-01", "2022-01-01").aggregate_array("system:index").getInfo() == [
        "ortho_2021"
    ]
    assert col.filter(ee.Filter.lt("CLOUDY_PIXEL_PERCENTAGE", 10)).aggregate_array(
        "system:index"
    ).getInfo() == ["ortho_2019"]
    assert col.filter(ee.Filter.gt("CLOUDY_PIXEL_PERCENTAGE", 10)).size().getInfo() == 1
    assert col.filter(ee.Filter.calendarRange(2019, 2019, "year")).size().getInfo() == 1
    assert col.limit(1, "system:time_start", False).first().get("system:index").getInfo() == (
        "ortho_2021"
    )
    assert col.map(lambda i: i.set("x", 1)).first().get("x").getInfo() == 1


def test_compute_pixels_npy_is_exact(ee_emulator, emulator_collections):
    src = source_pixels(emulator_collections.parent)
    image = ee.ImageCollection(FI).filterDate("2019-01-01", "2020-01-01").first()
    arr = ee.data.computePixels(
        {"expression": image, "fileFormat": "NUMPY_NDARRAY", "grid": grid(37, 21, 128, 96)}
    )
    assert arr.dtype.names == ("R", "G", "B") and arr.shape == (96, 128)
    got = np.stack([arr["R"], arr["G"], arr["B"]])
    np.testing.assert_array_equal(got, src[:, 21:117, 37:165])
    # Half outside the image: zeros (masked) there, the pixels inside.
    arr = ee.data.computePixels(
        {
            "expression": image.select("G"),
            "fileFormat": "NUMPY_NDARRAY",
            "grid": grid(-50, 0, 100, 10),
        }
    )
    np.testing.assert_array_equal(arr["G"][:, :50], 0)
    np.testing.assert_array_equal(arr["G"][:, 50:], src[1, 0:10, 0:50])


def test_compute_pixels_formats_and_visualize(ee_emulator, emulator_collections):
    src = source_pixels(emulator_collections.parent)
    vis = (
        ee.ImageCollection(FI)
        .filterBounds(region_2019())
        .filterDate("2019-01-01", "2020-01-01")
        .sort("system:time_start", False)
        .mosaic()
        .select(["R", "G", "B"])
        .visualize(min=0, max=255)
    )
    params = {"expression": vis, "grid": grid(100, 50, 64, 64)}
    jpeg = ee.data.computePixels({**params, "fileFormat": "JPEG"})
    assert jpeg[:3] == b"\xff\xd8\xff"
    decoded = np.asarray(PILImage.open(io.BytesIO(jpeg))).transpose(2, 0, 1).astype(int)
    buf = io.BytesIO()  # lossy: compare with a JPEG round trip of the source window
    window = src[:, 50:114, 100:164].transpose(1, 2, 0)
    PILImage.fromarray(window).save(buf, format="JPEG", quality=JPEG_QUALITY)
    roundtrip = np.asarray(PILImage.open(buf)).transpose(2, 0, 1).astype(int)
    assert np.abs(decoded - roundtrip).max() <= 1
    tif = ee.data.computePixels({**params, "fileFormat": "GEO_TIFF"})
    with rasterio.MemoryFile(tif) as mem, mem.open() as ds:
        assert ds.crs.to_epsg() == 3067 and ds.transform.c == X0 + 50 and ds.count == 3
        np.testing.assert_array_equal(ds.read(), src[:, 50:114, 100:164])
    # PNG: pixels outside the image are transparent.
    png = ee.data.computePixels(
        {"expression": vis, "grid": grid(-32, 0, 64, 64), "fileFormat": "PNG"}
    )
    rgba = np.asarray(PILImage.open(io.BytesIO(png)))
    assert rgba.shape == (64, 64, 4)
    assert (rgba[:, :32, 3] == 0).all() and (rgba[:, 32:, 3] == 255).all()
    np.testing.assert_array_equal(rgba[:, 32:, :3].transpose(2, 0, 1), src[:, 0:64, 0:32])
    # visualize stretches and applies gamma like Earth Engine: (v - min) / (max - min).
    stretched = ee.data.computePixels(
        {
            "expression": vis.select(["vis-red"]).visualize(min=0, max=127),
            "grid": grid(0, 0, 16, 16),
            "fileFormat": "NUMPY_NDARRAY",
        }
    )
    want = np.rint(np.clip(src[0, :16, :16] / 127, 0, 1) * 255)
    np.testing.assert_array_equal(stretched["vis-gray"], want)


def test_compute_pixels_in_another_crs(ee_emulator, emulator_collections):
    # EPSG:32635 (UTM 35N, WGS 84) and EPSG:3067 (TM35FIN, ETRS89) share their projection, so
    # the warped tile equals the source window but for datum rounding at pixel edges.
    src = source_pixels(emulator_collections.parent)
    image = ee.ImageCollection(FI).filterDate("2019-01-01", "2020-01-01").first()
    arr = ee.data.computePixels(
        {
            "expression": image,
            "fileFormat": "NUMPY_NDARRAY",
            "grid": grid(40, 40, 100, 100, crs="EPSG:32635"),
        }
    )
    got = np.stack([arr["R"], arr["G"], arr["B"]])
    assert (got == src[:, 40:140, 40:140]).mean() > 0.95
    # At twice the pixel size, nearest-neighbour resampling picks every other pixel (the one
    # below-right of each 1 m pixel centre, which falls on a corner of the 0.5 m pixels).
    arr = ee.data.computePixels(
        {
            "expression": image.select("R"),
            "fileFormat": "NUMPY_NDARRAY",
            "grid": grid(0, 0, 50, 50, gsd=1.0),
        }
    )
    assert (arr["R"] == src[0, 1:100:2, 1:100:2]).mean() > 0.95


def test_empty_collection_answers(ee_emulator):
    old = ee.ImageCollection(FI).filterDate("2000-01-01", "2001-01-01")
    assert old.size().getInfo() == 0
    assert old.first().getInfo() is None
    far = ee.ImageCollection(FI).filterBounds(ee.Geometry.Point([10.0, 50.0]))
    assert far.size().getInfo() == 0
    g = grid(0, 0, 32, 32)
    # Mosaic of nothing: an image with no bands, so selecting bands fails as in Earth Engine.
    with pytest.raises(ee.EEException, match="Pattern 'R' did not match any bands"):
        ee.data.computePixels(
            {"expression": old.mosaic().select(["R", "G", "B"]), "fileFormat": "JPEG", "grid": g}
        )
    # first() of nothing is null: the next algorithm misses its required argument.
    with pytest.raises(ee.EEException, match="Image.visualize: Parameter 'image' is required"):
        ee.data.computePixels(
            {"expression": old.first().visualize(min=0, max=255), "fileFormat": "JPEG", "grid": g}
        )
    with pytest.raises(ee.EEException, match="Element.get: Parameter 'object' is required"):
        old.first().get("system:index").getInfo()
    # Server-side guards work as in Earth Engine: If evaluates only the branch it takes.
    for col, want in ((old, "none"), (ee.ImageCollection(FI), "ortho_2019")):
        guarded = ee.Algorithms.If(col.size().gt(0), col.first().get("system:index"), "none")
        assert guarded.getInfo() == want
    assert old.aggregate_max("system:time_start").getInfo() is None
    assert ee.ImageCollection(FI).aggregate_max("system:time_start").getInfo() == 1625130000000


def test_errors_are_earth_engine_json(ee_emulator):
    with pytest.raises(ee.EEException, match="ImageCollection asset 'NOPE/X' not found"):
        ee.ImageCollection("NOPE/X").size().getInfo()
    with pytest.raises(ee.EEException, match="Total request size"):
        ee.data.computePixels(
            {
                "expression": ee.ImageCollection(FI).first(),
                "fileFormat": "NPY",
                "grid": grid(0, 0, 8000, 8000),
            }
        )
    url = f"{ee_emulator.url}/v1alpha/projects/demo/value:compute"
    unknown = {
        "expression": {
            "result": "0",
            "values": {"0": {"functionInvocationValue": {"functionName": "Image.frobnicate"}}},
        }
    }
    cycle = {"expression": {"result": "0", "values": {"0": {"valueReference": "0"}}}}
    bodies = (
        json.dumps(unknown),
        "{not json",
        json.dumps({"expression": {"x": 1}}),
        json.dumps(cycle),
    )
    for body in bodies:
        r = requests.post(url, data=body, timeout=5)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT" and error["message"]
    r = requests.get(f"{ee_emulator.url}/v1alpha/projects/demo/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    assert ee_emulator.stats.count("value:compute", 400) >= 4


def test_request_size_limit_and_assets(emulator_collections):
    with Emulator(emulator_collections, max_request_bytes=100_000) as emu:
        init_ee_client(emu.url, max_retries=0)
        image = ee.ImageCollection(FI).first()
        small = ee.data.computePixels(
            {"expression": image, "fileFormat": "NUMPY_NDARRAY", "grid": grid(0, 0, 100, 100)}
        )
        assert small.shape == (100, 100)  # 30 000 bytes
        with pytest.raises(ee.EEException, match=r"Total request size \(196608 bytes\)"):
            ee.data.computePixels(
                {"expression": image, "fileFormat": "NPY", "grid": grid(0, 0, 256, 256)}
            )
        assert ee.data.getAsset(FI)["type"] == "IMAGE_COLLECTION"
        assert ee.data.getAsset(f"{FI}/ortho_2019")["type"] == "IMAGE"
        with pytest.raises(ee.EEException, match="not found"):
            ee.data.getAsset("NOPE/X")


def _outcome(session: requests.Session, url: str) -> str:
    body = {"expression": {"result": "0", "values": {"0": {"constantValue": 7}}}}
    try:
        r = session.post(url, json=body, timeout=0.25)
    except requests.exceptions.Timeout:
        return "timeout"
    except requests.exceptions.ConnectionError:  # urllib3 IncompleteRead
        return "truncate"
    except requests.exceptions.ChunkedEncodingError:
        return "truncate"
    if r.headers["Content-Type"].startswith("text/html"):
        return "html"
    if r.status_code == 429:
        assert r.headers["Retry-After"] == "2"
    if r.status_code != 200:
        assert r.json()["error"]["code"] == r.status_code
        if r.status_code == 400:
            assert r.json()["error"]["message"] == "User memory limit exceeded."
            return "memory"
        return str(r.status_code)
    assert r.json() == {"result": 7}
    return "ok"


def test_faults_follow_their_rates_and_seed(emulator_collections):
    spec = "429:0.15,500:0.1,503:0.1,html:0.1,truncate:0.1,timeout:0.02,memory:0.05"
    outcomes = {}
    for seed in (1, 1, 2):
        with Emulator(
            emulator_collections, faults=spec, seed=seed, stall_s=0.6, retry_after_s=2
        ) as emu:
            url = f"{emu.url}/v1alpha/projects/demo/value:compute"
            with requests.Session() as s:
                got = [_outcome(s, url) for _ in range(300)]
            stats = emu.stats
        plan = parse_faults(spec, seed=seed)
        assert got == [plan.fault_for(n) or "ok" for n in range(300)]
        assert stats.faults == {m: got.count(m) for m in set(got) - {"ok"}}
        for mode, rate in plan.rates:
            assert abs(got.count(mode) / 300 - rate) < 0.06, (mode, got.count(mode))
        outcomes.setdefault(seed, []).append(got)
    assert outcomes[1][0] == outcomes[1][1] and outcomes[1][0] != outcomes[2][0]


def test_latency_and_client_retries(emulator_collections):
    with Emulator(emulator_collections, latency_ms=150) as emu:
        init_ee_client(emu.url, max_retries=0)
        start = time.perf_counter()
        assert ee.Number(3).getInfo() == 3
        assert time.perf_counter() - start >= 0.15
    # Every request here is a 429: the ee client retries it by itself when allowed to
    # (googleapiclient treats 429 as retryable), then raises Earth Engine's message.
    for retries in (0, 1):
        with Emulator(emulator_collections, faults="429:1.0", retry_after_s=0) as emu:
            init_ee_client(emu.url, max_retries=retries)
            with pytest.raises(ee.EEException, match="Too many concurrent aggregations"):
                ee.Number(3).getInfo()
            assert emu.stats.count("value:compute", 429) == 1 + retries


def test_latency_grows_with_the_megapixels_of_a_request(emulator_collections):
    with Emulator(emulator_collections, latency_ms=50, latency_ms_per_mpx=2000) as emu:
        init_ee_client(emu.url, max_retries=0)
        image = ee.ImageCollection(FI).first()
        times = {}
        for side in (10, 500):  # 0.0001 and 0.25 Mpx: 50 ms and 550 ms
            start = time.perf_counter()
            ee.data.computePixels(
                {"expression": image, "fileFormat": "NPY", "grid": grid(0, 0, side, side)}
            )
            times[side] = time.perf_counter() - start
        start = time.perf_counter()
        assert ee.Number(3).getInfo() == 3  # value:compute: the fixed latency only
        value_s = time.perf_counter() - start
    assert 0.05 <= times[10] < 0.4 and times[500] >= 0.55 and 0.05 <= value_s < 0.4
    assert emu.stats.bytes_sent["image:computePixels"] > 500 * 500 * 3


def test_forty_concurrent_clients(emulator_collections):
    n = 40
    with Emulator(emulator_collections, latency_ms=400) as emu:
        init_ee_client(emu.url, max_retries=0)
        vis = ee.ImageCollection(FI).mosaic().visualize(bands=["R", "G", "B"], min=0, max=255)
        barrier = threading.Barrier(n)
        results: list = [None] * n

        def client(i: int) -> None:
            barrier.wait()
            try:
                results[i] = ee.data.computePixels(
                    {"expression": vis, "fileFormat": "JPEG", "grid": grid(i * 5, 0, 64, 64)}
                )
            except Exception as e:  # noqa: BLE001 - reported by the assert below
                results[i] = e

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(isinstance(r, bytes) and r[:2] == b"\xff\xd8" for r in results), results
        assert emu.stats.count("image:computePixels", 200) == n
        assert emu.stats.max_concurrency == n


def test_quotas_refuse_with_429(emulator_collections):
    body = {"expression": {"result": "0", "values": {"0": {"constantValue": 1}}}}
    with Emulator(emulator_collections, latency_ms=300, max_concurrent=3) as emu:
        url = f"{emu.url}/v1alpha/projects/demo/value:compute"
        codes: list[int] = []
        threads = [
            threading.Thread(target=lambda: codes.append(requests.post(url, json=body).status_code))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [200, 200, 200, 429, 429, 429]
        assert emu.stats.refused["concurrency"] == 3
    with Emulator(emulator_collections, max_rps=5) as emu:
        url = f"{emu.url}/v1alpha/projects/demo/value:compute"
        with requests.Session() as s:
            codes = [s.post(url, json=body).status_code for _ in range(8)]
        assert codes.count(429) >= 2 and codes[:5] == [200] * 5
        r = s.post(url, json=body)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert "Quota exceeded" in r.json()["error"]["message"]


def test_shutdown_is_clean(emulator_collections):
    before = threading.active_count()
    emu = Emulator(emulator_collections, faults="timeout:1.0", stall_s=60).start()
    url = emu.url
    port = int(url.rsplit(":", 1)[1])
    stalled = threading.Thread(
        target=lambda: (
            requests.post(f"{url}/v1alpha/projects/demo/value:compute", json={}, timeout=30)
            if True
            else None
        ),
    )
    stalled.start()
    idle = requests.Session()
    assert idle.get(f"{url}/$discovery/rest", timeout=5).status_code == 200  # keep-alive
    time.sleep(0.2)
    start = time.perf_counter()
    emu.stop()
    assert time.perf_counter() - start < 5  # the 60 s stall was woken up
    stalled.join(5)
    assert not stalled.is_alive()
    assert threading.active_count() <= before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    emu.stop()  # idempotent
    idle.close()


def test_collections_file_errors(tmp_path, emulator_collections):
    bad = tmp_path / "c.yaml"
    bad.write_text("X:\n  - path: missing.tif\n    time_start: 2020-01-01\n")
    with pytest.raises(InputError, match="c.yaml.*cannot open"):
        load_collections(bad)
    bad.write_text(
        f"X:\n  - path: {emulator_collections.parent}/ortho_2019.tif\n    time_start: 2020-01-01\n    bands: [A]\n"
    )
    with pytest.raises(InputError, match="1 band names for 3 bands"):
        load_collections(bad)
    bad.write_text("X:\n  - path: a.tif\n")
    with pytest.raises(InputError, match="needs 'path' and 'time_start'"):
        load_collections(bad)
    with pytest.raises(InputError, match="not found"):
        load_collections(tmp_path / "none.yaml")
    for spec in ("429", "429:2", "boom:0.1", "429:0.7,500:0.7"):
        with pytest.raises(ConfigError):
            parse_faults(spec)


def test_cli_serves_until_interrupted(emulator_collections, cli, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "skyscript_build.cli",
            "emulator",
            "--collections",
            str(emulator_collections),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("Earth Engine emulator on http://127.0.0.1:")
        url = line.split()[4]
        body = {"expression": {"result": "0", "values": {"0": {"constantValue": 1}}}}
        r = requests.post(f"{url}/v1alpha/projects/demo/value:compute", json=body, timeout=5)
        assert r.json() == {"result": 1}
    finally:
        proc.send_signal(2)  # Ctrl-C
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    bad = cli("emulator", "--collections", tmp_path / "none.yaml")
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().count("\n") == 0
        and "none.yaml: collections file not found" in bad.stderr
    )
