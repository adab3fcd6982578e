"""The synthetic orthophoto of the demo, rendered from the bundled Helsinki extract."""

from __future__ import annotations

import io

import numpy as np
import pytest
import rasterio
from PIL import Image as PILImage

from skyscript_build.emulator import Emulator, init_ee_client, load_collections
from skyscript_build.errors import ConfigError, InputError
from skyscript_build.orthophoto import ATTRIBUTION, OrthophotoConfig, render_orthophoto


def test_georeferenced_and_labelled_synthetic(demo_orthophoto):
    catalog = load_collections(demo_orthophoto)
    (record,) = catalog.get("Finland/SMK/V/50cm")
    assert record.bands == ("R", "G", "B")
    assert record.time_start == 1560594600000  # 2019-06-15T10:30:00Z
    assert (
        record.properties["SYNTHETIC"] == 1 and "OpenStreetMap" in record.properties["description"]
    )
    with rasterio.open(record.path) as ds:
        assert ds.crs.to_epsg() == 3067 and ds.res == (0.5, 0.5)
        assert ds.count == 3 and ds.dtypes[0] == "uint8"
        assert ds.block_shapes[0] == (256, 256) and ds.compression.value == "DEFLATE"
        tags = ds.tags()
        assert tags["SYNTHETIC"] == "1" and tags["TIFFTAG_IMAGEDESCRIPTION"] == ATTRIBUTION
        # The bundled extract: about 1 km x 1.6 km, fully covered.
        assert 950 < ds.width * 0.5 < 1200 and 1550 < ds.height * 0.5 < 1800
        lon, lat = record.footprint.centroid.x, record.footprint.centroid.y
        assert 24.93 < lon < 24.96 and 60.16 < lat < 60.18
        pixels = ds.read()
    r, g, b = pixels.astype(int)
    green = (g > r + 10) & (g > b + 10)  # parks, grass, forest, trees
    roof_red = (r > g + 40) & (r > b + 40)
    dark = (r < 100) & (g < 100) & (b < 110) & (abs(r - b) < 15)  # asphalt, shadows
    assert 0.05 < green.mean() < 0.5
    assert 0.01 < roof_red.mean() < 0.3
    assert 0.05 < dark.mean() < 0.6
    # Textured: no 128 x 128 tile in the middle of the picture is a flat colour.
    h, w = r.shape
    for y in range(h // 4, 3 * h // 4, 256):
        for x in range(w // 4, 3 * w // 4, 256):
            assert pixels[:, y : y + 128, x : x + 128].std() > 3


def test_rerun_is_a_no_op(demo_orthophoto, helsinki_pbf):
    tif = demo_orthophoto.parent / "helsinki_orthophoto_synthetic.tif"
    before = (tif.stat().st_mtime_ns, demo_orthophoto.stat().st_mtime_ns)
    result = render_orthophoto(OrthophotoConfig(pbf=helsinki_pbf, out=demo_orthophoto.parent))
    assert result.skipped and "up to date" in result.summary()
    assert (tif.stat().st_mtime_ns, demo_orthophoto.stat().st_mtime_ns) == before


def test_deterministic(tmp_path, helsinki_pbf):
    a = render_orthophoto(OrthophotoConfig(pbf=helsinki_pbf, out=tmp_path / "a", gsd=2.0))
    b = render_orthophoto(OrthophotoConfig(pbf=helsinki_pbf, out=tmp_path / "b", gsd=2.0))
    c = render_orthophoto(OrthophotoConfig(pbf=helsinki_pbf, out=tmp_path / "c", gsd=2.0, seed=1))
    assert not a.skipped and a.tif.read_bytes() == b.tif.read_bytes()
    assert a.collections.read_text() == b.collections.read_text()
    assert a.tif.read_bytes() != c.tif.read_bytes()
    assert not list((tmp_path / "a").glob(".*tmp"))


def test_bad_input(tmp_path, helsinki_pbf, cli):
    with pytest.raises(InputError, match="OSM extract not found"):
        OrthophotoConfig(pbf=tmp_path / "none.osm.pbf", out=tmp_path)
    with pytest.raises(ConfigError, match="gsd"):
        OrthophotoConfig(pbf=helsinki_pbf, out=tmp_path, gsd=0)
    with pytest.raises(ConfigError, match="projected"):
        OrthophotoConfig(pbf=helsinki_pbf, out=tmp_path, crs="EPSG:4326")
    junk = tmp_path / "junk.osm.pbf"
    junk.write_bytes(b"this is not a PBF file")
    result = cli("orthophoto", "--pbf", junk, "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "junk.osm.pbf" in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):  # refused before rendering
        result = cli("orthophoto", "--pbf", helsinki_pbf, "--out", out)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert str(out) in result.stderr and "a_file" in result.stderr
    assert (tmp_path / "a_file").read_text() == "x"


def test_served_by_the_emulator(demo_orthophoto):
    ee = pytest.importorskip("ee")
    with Emulator(demo_orthophoto) as emu:
        init_ee_client(emu.url, max_retries=0)
        col = ee.ImageCollection("Finland/SMK/V/50cm")
        point = ee.Geometry.Point([24.9445, 60.1699])  # central Helsinki
        image = col.filterBounds(point).filterDate("2019-01-01", "2020-01-01").first()
        assert image.get("system:index").getInfo() == "helsinki_2019_synthetic"
        tile = ee.data.computePixels(
            {
                "expression": col.mosaic().visualize(bands=["R", "G", "B"], min=0, max=255),
                "fileFormat": "JPEG",
                "grid": {
                    "dimensions": {"width": 512, "height": 512},
                    "affineTransform": {
                        "scaleX": 0.5,
                        "shearX": 0,
                        "translateX": 385700.0,
                        "shearY": 0,
                        "scaleY": -0.5,
                        "translateY": 6672500.0,
                    },
                    "crsCode": "EPSG:32635",
                },
            }
        )
    rgb = np.asarray(PILImage.open(io.BytesIO(tile)))
    assert rgb.shape == (512, 512, 3) and rgb.std() > 10
