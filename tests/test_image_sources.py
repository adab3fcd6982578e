"""The imagery catalog: the ten SkyScript sources, coverage, and adding sources."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import shapely
import yaml

import image_sources as cat
from skyscript_build.errors import ConfigError, InputError

DESIGN_TABLE = {
    "US": ("USDA/NAIP/DOQQ", ("R", "G", "B")),
    "DE": ("Germany/Brandenburg/orthos/20cm", ("R", "G", "B")),
    "FI": ("Finland/SMK/V/50cm", ("R", "G", "B")),
    "CH": ("ORTHO/Switzerland/SWISSIMAGE/10cm", ("R", "G", "B")),
    "ES": ("Spain/PNOA/PNOA10", ("R", "G", "B")),
    "P3": ("SKYSAT/GEN-A/PUBLIC/ORTHO/RGB", ("R", "G", "B")),
    "P5": ("SKYSAT/GEN-A/PUBLIC/ORTHO/MULTISPECTRAL", ("R", "G", "B")),
    "S2": ("COPERNICUS/S2_SR_HARMONIZED", ("B4", "B3", "B2")),
    "L8": ("LANDSAT/LC08/C02/T1_TOA", ("B4", "B3", "B2")),
    "L9": ("LANDSAT/LC09/C02/T1_TOA", ("B4", "B3", "B2")),
}


def test_the_ten_sources_of_the_design():
    assert set(cat.list_sources()) >= set(DESIGN_TABLE)
    for alias, (collection, bands) in DESIGN_TABLE.items():
        s = cat.get_source(alias)
        assert s.collection == collection and s.bands == bands and s.backend == "earthengine"
        assert s.years == tuple(sorted(s.years)) and s.stretch[0] < s.stretch[1]
    gsds = [cat.get_source(a).gsd for a in cat.list_sources()]
    assert gsds == sorted(gsds), "list_sources is finest first"
    assert cat.get_source("CH").gsd == 0.1 and cat.get_source("S2").gsd == 10
    assert cat.get_source("P5").stretch[1] > 255, "SkySat multispectral is 16-bit"


def test_finland_has_the_demo_year_and_crs():
    fi = cat.get_source("FI")
    assert 2019 in fi.years and fi.crs == "EPSG:3067" and fi.gsd == 0.5


@pytest.mark.parametrize(
    ("alias", "inside", "outside"),
    [
        ("CH", (7.4474, 46.948), (6.14, 46.2 - 0.3)),  # Bern; south of Geneva (France)
        ("FI", (24.94, 60.17), (18.07, 59.33)),  # Helsinki; Stockholm
        ("DE", (13.06, 52.40), (13.40, 52.52)),  # Potsdam; Berlin (not Brandenburg)
        ("ES", (-3.70, 40.42), (-9.14, 38.72)),  # Madrid; Lisbon
        ("US", (-98.0, 39.0), (-99.13, 19.43)),  # Kansas; Mexico City
    ],
)
def test_coverage(alias, inside, outside):
    cov = cat.get_source(alias).coverage
    assert cov.contains(shapely.Point(inside))
    assert not cov.contains(shapely.Point(outside))


def test_global_sources_and_cloud_rules():
    for alias in ("S2", "L8", "L9"):
        s = cat.get_source(alias)
        assert s.is_global and s.cloud is not None
    assert cat.get_source("S2").cloud == cat.CloudRule(
        "CLOUDY_PIXEL_PERCENTAGE", 20.0, "QA60", (10, 11)
    )
    assert cat.get_source("L8").cloud.mask_band == "QA_PIXEL"
    assert set(cat.get_source("L9").cloud.mask_bits) >= {3, 4}
    assert cat.get_source("CH").cloud is None and not cat.get_source("CH").is_global


def test_unknown_alias_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown image source 'XX'.*CH.*S2"):
        cat.get_source("XX")


def test_add_override_and_remove():
    local = cat.source_from_dict(
        {
            "alias": "MYTIF",
            "backend": "raster",
            "location": "/data/tifs",
            "gsd": 0.3,
            "years": "2018-2020",
            "coverage": [24.0, 60.0, 25.0, 61.0],
        }
    )
    assert local.years == (2018, 2019, 2020) and local.collection == "MYTIF"
    try:
        cat.add_source(local)
        assert cat.get_source("MYTIF") is local
        with pytest.raises(ConfigError, match="already exists"):
            cat.add_source(local)
        cat.add_source(cat.source_from_dict({"alias": "MYTIF", "gsd": 0.25}), replace=True)
        assert cat.get_source("MYTIF").gsd == 0.25
        assert cat.get_source("MYTIF").location == "/data/tifs", "override keeps other fields"
    finally:
        cat.remove_source("MYTIF")
    assert "MYTIF" not in cat.list_sources()
    # An override of a built-in keeps everything not given.
    fi = cat.source_from_dict({"alias": "FI", "years": [2019]})
    assert fi.years == (2019,) and fi.collection == "Finland/SMK/V/50cm"
    assert cat.get_source("FI").years != (2019,), "source_from_dict does not register"


def test_xyz_source_and_bad_definitions():
    xyz = cat.source_from_dict(
        {
            "alias": "OSMTILES",
            "backend": "xyz",
            "location": "http://127.0.0.1:8080/{z}/{x}/{y}.png",
            "gsd": 0.6,
            "years": [2024],
        }
    )
    assert xyz.is_global and xyz.quota.concurrency > 0
    with pytest.raises(ConfigError, match="unknown key"):
        cat.source_from_dict({"alias": "A1", "gsd": 1, "years": [2020], "colour": "red"})
    with pytest.raises(ConfigError, match="letters and digits"):
        cat.source_from_dict({"alias": "MY_SRC", "gsd": 1, "years": [2020]})
    with pytest.raises(ConfigError, match="needs 'gsd' and 'years'"):
        cat.source_from_dict({"alias": "NEW1"})
    with pytest.raises(ConfigError, match="needs a location"):
        cat.source_from_dict({"alias": "NEW2", "gsd": 1, "years": [2020], "backend": "raster"})
    with pytest.raises(ConfigError, match="coverage"):
        cat.source_from_dict({"alias": "NEW3", "gsd": 1, "years": [2020], "coverage": [1, 2]})


def test_raster_source_covers_its_files(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    path = tmp_path / "tile.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=100, height=100, count=3, dtype="uint8",
        crs="EPSG:3067", transform=from_origin(385000, 6673000, 0.5, 0.5),
    ) as ds:  # fmt: skip
        ds.write(np.zeros((3, 100, 100), dtype=np.uint8))
    src = cat.source_from_dict(
        {
            "alias": "LOCAL",
            "backend": "raster",
            "location": str(tmp_path),
            "gsd": 0.5,
            "years": [2019],
            "crs": "EPSG:3067",
        }  # fmt: skip
    )
    w, s, e, n = src.coverage.bounds
    assert 24.9 < w < e < 25.0 and 60.1 < s < n < 60.2
    (tmp_path / "tile.tif").unlink()
    with pytest.raises(InputError, match="no GeoTIFF"):
        cat.source_from_dict(
            {
                "alias": "LOCAL",
                "backend": "raster",
                "location": str(tmp_path),
                "gsd": 0.5,
                "years": [2019],
            }  # fmt: skip
        )


def test_the_builtin_sources_are_the_data_file_beside_the_module():
    assert cat.CATALOG_FILE.parent == Path(cat.__file__).parent
    data = yaml.safe_load(cat.CATALOG_FILE.read_text())
    assert sorted(data) == sorted(DESIGN_TABLE) == sorted(cat.builtin_catalog().aliases())


def test_a_catalog_is_an_immutable_value():
    base = cat.builtin_catalog()
    fi_2019 = cat.source_from_dict({"alias": "FI", "years": [2019]}, base)
    mine = base.with_sources(fi_2019, replace=True)
    assert mine.get_source("FI").years == (2019,)
    assert base.get_source("FI").years != (2019,) and cat.get_source("FI").years != (2019,)
    assert mine != base and mine == base.with_sources(fi_2019, replace=True)
    again = pickle.loads(pickle.dumps(mine))  # how a catalog reaches Dask workers
    assert again == mine and hash(again) == hash(mine) and again.aliases() == mine.aliases()
    with pytest.raises(ConfigError, match="already exists"):
        base.with_sources(fi_2019)
    assert "CH" not in base.without("CH") and "CH" in base
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.sources = ()  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown image source 'XX'"):
        mine.get_source("XX")


def test_load_catalog_adds_a_users_own_file(tmp_path):
    path = tmp_path / "my_sources.yaml"
    path.write_text(
        "MINE:\n  gsd: 0.25\n  years: 2020-2021\n  coverage: [24.0, 60.0, 25.0, 61.0]\n"
        "FI:\n  years: [2019]\n"
    )
    mine = cat.load_catalog(path)
    assert mine.get_source("MINE").years == (2020, 2021) and mine.get_source("FI").gsd == 0.5
    assert mine.get_source("FI").years == (2019,) and "MINE" not in cat.list_sources()
    assert set(mine.aliases()) == set(cat.builtin_catalog().aliases()) | {"MINE"}
    path.write_text("NEW:\n  gsd: 1\n")
    with pytest.raises(InputError, match="my_sources.yaml.*needs 'gsd' and 'years'"):
        cat.load_catalog(path)
    path.write_text("- just a list\n")
    with pytest.raises(InputError, match="my_sources.yaml.*mapping of alias"):
        cat.load_catalog(path)
