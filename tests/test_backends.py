"""Imagery backends on generated rasters and a local XYZ tile server; caps and retries."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from conftest import load_fixture_script
from rasterio.windows import from_bounds

from skyscript_build.errors import BackendError, ConfigError
from skyscript_build.fetch._quality import QualityConfig, check_tile
from skyscript_build.fetch.backends import BackendConfig, TileRequest, close_backends, get_backend
from skyscript_build.fetch.backends.base import FetchError, RetryPolicy, call_with_retries
from skyscript_build.fetch.backends.limits import Limits, LimitsConfig, TokenBucket
from skyscript_build.fetch.backends.xyz import zoom_for_gsd

DATA = Path(__file__).parent / "data" / "fetch"


fixture_data = load_fixture_script("fetch")
tileserver = load_fixture_script("fetch", "tileserver.py")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return fixture_data.make_fixture(tmp_path_factory.mktemp("fetch-fx"), n=6, parts=1)


@pytest.fixture(autouse=True)
def _fresh_backends():
    yield
    close_backends()


def _requests(fx) -> list[TileRequest]:
    table = pq.read_table(fx["requests"] / "part-00000.parquet")
    return [TileRequest.from_row(r) for r in table.to_pylist()]


def test_request_row_maps_and_keys(fx):
    r = _requests(fx)[0]
    assert r.center_tags == {"building": "yes", "roof:shape": "flat"}
    assert r.surrounding_tags == ({"highway": "footway"}, {"natural": "tree"})
    assert r.key_for_year(2021) == r.key[:-2] + "21"
    grid = r.grid
    assert grid.transform == (0.5, 0.0, r.x_min, 0.0, -0.5, r.y_max)  # on the lattice already
    assert grid.bounds == (r.x_min, r.y_min, r.x_max, r.y_max)
    piece = grid.quarters()[3]
    assert (piece.width, piece.height) == (32, 32)
    assert piece.bounds[2:] == (r.x_max, r.y_min + 16) and grid.window(piece) == (
        slice(32, 64),
        slice(32, 64),
    )


def test_tile_corners_snap_to_the_pixel_lattice(fx):
    r = _requests(fx)[0]
    off = replace(
        r, x_min=r.x_min + 0.2, x_max=r.x_max + 0.2, y_min=r.y_min - 0.3, y_max=r.y_max - 0.3
    )
    assert off.grid == replace(r.grid, row=r.grid.row + 1)  # 0.2 m rounds back, 0.3 m on
    assert off.grid.transform[2] == r.x_min and off.grid.transform[5] == r.y_max - 0.5


def test_raster_tile_is_the_raster_window(fx):
    backend = get_backend(BackendConfig(backend="raster", location=str(fx["rasters"])))
    r = _requests(fx)[0]
    result = backend.fetch(r)
    assert result.status == "ok", result
    assert result.image_id == "helsinki_2019"
    assert result.acquisition_time.isoformat() == "2019-06-15T10:30:00+00:00"
    with rasterio.open(fx["raster"]) as ds:
        window = from_bounds(r.x_min, r.y_min, r.x_max, r.y_max, ds.transform)
        expected = np.moveaxis(ds.read(window=window), 0, -1)
    assert result.rgb.shape == (64, 64, 3)
    assert np.array_equal(result.rgb, expected)
    assert result.valid.all()


def test_raster_reprojects_to_another_grid(fx):
    backend = get_backend(BackendConfig(backend="raster", location=str(fx["rasters"])))
    r = _requests(fx)[1]
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:3067", "EPSG:32635", always_xy=True)
    cx, cy = to_utm.transform((r.x_min + r.x_max) / 2, (r.y_min + r.y_max) / 2)
    utm = replace(r, crs="EPSG:32635", x_min=cx - 16, x_max=cx + 16, y_min=cy - 16, y_max=cy + 16)
    result = backend.fetch(utm)
    assert result.status == "ok"
    assert result.valid.mean() > 0.99
    assert result.rgb.std() > 10


def test_raster_year_without_imagery_is_no_image(fx):
    backend = get_backend(BackendConfig(backend="raster", location=str(fx["rasters"])))
    r = replace(_requests(fx)[0], years=(2018, 2019))
    assert backend.fetch(r).reason == "no-image"
    nxt = get_backend(
        BackendConfig(backend="raster", location=str(fx["rasters"]), allow_next_year=True)
    )
    result = nxt.fetch(r)
    assert result.status == "ok" and result.year == 2019


def test_raster_missing_folder_is_a_backend_error(tmp_path):
    backend = get_backend(BackendConfig(backend="raster", location=str(tmp_path / "nope")))
    with pytest.raises(BackendError, match="does not exist"):
        backend.fetch(_requests_at(tmp_path))


def _requests_at(tmp_path: Path) -> TileRequest:
    return TileRequest.from_row(fixture_data.request_rows(1)[0])


def test_xyz_matches_the_raster_and_retries_429(fx):
    r = _requests(fx)[2]
    with tileserver.TileServer(fx["raster"], fail_first=1) as ts:
        cfg = BackendConfig(backend="xyz", location=ts.template, backoff_s=0.01)
        result = get_backend(cfg).fetch(r)
        assert result.status == "ok", result
        assert result.attempts >= 2  # every tile answered 429 once, then 200
        assert all(n == 2 for n in ts.hits.values())
        again = get_backend(cfg).fetch(r)  # neighbouring requests share the tile cache
        assert sum(ts.hits.values()) == 2 * len(ts.hits)
        assert np.array_equal(again.rgb, result.rgb)
    raster = get_backend(BackendConfig(backend="raster", location=str(fx["rasters"]))).fetch(r)
    diff = np.abs(result.rgb.astype(int) - raster.rgb.astype(int))[2:-2, 2:-2]
    assert diff.mean() < 25  # the same place, resampled twice
    assert result.acquisition_time.year == 2019


def test_xyz_outside_the_server_is_no_image(fx):
    far = TileRequest.from_row(fixture_data.request_rows(1, inside=False)[0])
    with tileserver.TileServer(fx["raster"]) as ts:
        result = get_backend(BackendConfig(backend="xyz", location=ts.template)).fetch(far)
    assert (result.status, result.reason) == ("skipped", "no-image")


def test_xyz_needs_a_template(fx):
    with pytest.raises(BackendError, match="URL template"):
        get_backend(BackendConfig(backend="xyz", location="http://x/tiles")).fetch(_requests(fx)[0])


def test_zoom_for_gsd():
    assert zoom_for_gsd(0.5, 60.17) == 18  # 0.30 m pixels at z18, 0.60 m at z17
    assert zoom_for_gsd(10.0, 0.0) == 14


def test_retry_honours_retry_after_and_gives_up():
    waits: list[float] = []
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise FetchError("http-429", retryable=True, retry_after=2.0)
        return "ok"

    value, attempts = call_with_retries(
        flaky, RetryPolicy(5, 0.01, 30), sleep=waits.append, rng=random.Random(0)
    )
    assert (value, attempts) == ("ok", 3)
    assert waits and all(w >= 2.0 for w in waits)

    def permanent() -> None:
        raise FetchError("no-image")

    with pytest.raises(FetchError) as e:
        call_with_retries(permanent, RetryPolicy(5), sleep=waits.append)
    assert e.value.attempts == 1

    def always() -> None:
        raise FetchError("http-5xx", retryable=True)

    with pytest.raises(FetchError) as e:
        call_with_retries(always, RetryPolicy(3, 0.0), sleep=lambda s: None)
    assert e.value.attempts == 3


def test_backoff_grows_exponentially_with_jitter():
    policy, rng = RetryPolicy(10, 1.0, 30.0), random.Random(1)
    for attempt, cap in ((1, 1.0), (3, 4.0), (9, 30.0)):
        d = policy.delay(attempt, None, rng)
        assert cap / 2 <= d <= cap


def test_limits_cap_concurrency_across_threads():
    limits = Limits(LimitsConfig(concurrency=3, rate=10_000))

    def work() -> None:
        with limits.slot():
            time.sleep(0.01)

    threads = [threading.Thread(target=work) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert limits.high_water == 3
    assert limits.requests == 24


def test_token_bucket_holds_the_rate():
    bucket = TokenBucket(rate=50, burst=1)
    t0 = time.monotonic()
    for _ in range(11):
        bucket.take()
    assert time.monotonic() - t0 >= 0.19  # 10 intervals of 20 ms


def test_limits_split_the_rate_between_processes():
    assert LimitsConfig(40, 100.0, processes=4).process_rate == 25.0
    with pytest.raises(ConfigError):
        LimitsConfig(concurrency=0)


def test_quality_checks():
    rng = np.random.default_rng(0)
    rgb = rng.integers(30, 200, (32, 32, 3), dtype=np.uint8)
    q = QualityConfig()
    assert check_tile(rgb, None, q, cloud_rule=False) is None
    holes = rgb.copy()
    holes[:16] = 0
    assert check_tile(holes, None, q, cloud_rule=False) == "nodata"
    assert check_tile(np.full_like(rgb, 90), None, q, cloud_rule=False) == "blank"
    cloudy = rgb.copy()
    cloudy[:20] = 245
    assert check_tile(cloudy, None, q, cloud_rule=True) == "cloudy"
    assert check_tile(cloudy, None, q, cloud_rule=False) is None
