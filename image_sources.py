"""The imagery catalog: image source alias -> collection, GSD, bands, stretch, years, coverage.

The ten sources SkyScript used (Wang et al. 2024) are built in, with their Earth Engine
collection ids, the GSD a tile is fetched at, the RGB bands, the stretch to 8 bits, the years
each collection has, a simplified coverage polygon (lon/lat) and, for Sentinel-2 and Landsat,
a cloud rule. A pipeline adds or overrides entries (a local raster folder or a tile server
under its own alias) with ``add_source(source_from_dict({...}), replace=True)``.

    >>> from image_sources import get_source, list_sources
    >>> get_source("CH").gsd
    0.1
    >>> "S2" in list_sources()
    True

Coverage polygons are deliberately simple (a few dozen vertices, generous along coasts): they
decide which source plan *tries* for an object; fetch records a ``no-image`` skip where a
collection turns out to be empty. Years and GSDs follow the Earth Engine catalog pages (dataset
availability) as of 2025; SkySat's public collection is a sparse set of scenes, so its coverage
is a conservative set of boxes around known scenes.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import shapely
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

__all__ = [
    "BACKENDS",
    "CloudRule",
    "Quota",
    "ImageSource",
    "GLOBE",
    "list_sources",
    "get_source",
    "add_source",
    "remove_source",
    "source_from_dict",
]

#: The imagery backends a source can use.
BACKENDS = ("earthengine", "raster", "xyz")
#: An alias is part of every file name (``a123_CH_19``): letters and digits only.
_ALIAS = re.compile(r"^[A-Za-z0-9]+$")
GLOBE: BaseGeometry = box(-180.0, -90.0, 180.0, 90.0)


def _config_error(message: str) -> Exception:
    from skyscript_build.errors import ConfigError

    return ConfigError(message)


@dataclass(frozen=True)
class CloudRule:
    """How clouds are kept out of a tile.

    Attributes:
        scene_property: scene metadata property with the scene's cloud percentage
            (``CLOUDY_PIXEL_PERCENTAGE`` for Sentinel-2, ``CLOUD_COVER`` for Landsat).
        max_scene_percent: scenes above this cloud percentage are not used.
        mask_band: per-pixel quality band (``QA60``, ``QA_PIXEL``); None for no pixel mask.
        mask_bits: bits of ``mask_band`` that flag a bad pixel (cloud, cirrus, shadow).
    """

    scene_property: str
    max_scene_percent: float = 20.0
    mask_band: str | None = None
    mask_bits: tuple[int, ...] = ()


@dataclass(frozen=True)
class Quota:
    """What a source allows, for the dry-run time estimate and fetch's rate limiter.

    Attributes:
        requests_per_s: most requests per second (across the whole cluster).
        concurrency: most requests in flight at once.
        latency_s: typical time one request takes (with ``concurrency`` it bounds the rate).
    """

    requests_per_s: float
    concurrency: int
    latency_s: float = 1.0

    def rate(self) -> float:
        """Requests per second one can expect: the lower of the two limits."""
        return min(self.requests_per_s, self.concurrency / max(self.latency_s, 1e-9))


EARTH_ENGINE_QUOTA = Quota(requests_per_s=100.0, concurrency=40, latency_s=1.0)


@dataclass(frozen=True)
class ImageSource:
    """One imagery source of the catalog.

    Attributes:
        alias: short name used in file names (``CH`` in ``a123_CH_19.jpg``).
        collection: Earth Engine collection id, or a label for raster and xyz sources.
        gsd: metres per pixel a tile is fetched at.
        bands: the three band names, in R, G, B order.
        stretch: (min, max): source values mapped linearly onto 0..255.
        years: the acquisition years the source has, ascending.
        coverage: where the source has imagery (shapely geometry, lon/lat).
        gamma: optional gamma applied after the stretch.
        cloud: cloud rule (scene limit and pixel mask), or None.
        backend: ``earthengine``, ``raster`` (a folder of GeoTIFFs) or ``xyz`` (tile server).
        location: the raster folder, or the xyz URL template; None for Earth Engine.
        quota: request rate and concurrency the source allows.
        crs: the source's native projected CRS (``EPSG:3067``); None for a local UTM zone.
        description: one line for humans.
    """

    alias: str
    collection: str
    gsd: float
    bands: tuple[str, str, str] = ("R", "G", "B")
    stretch: tuple[float, float] = (0.0, 255.0)
    years: tuple[int, ...] = ()
    coverage: BaseGeometry = field(default=GLOBE, repr=False)
    gamma: float | None = None
    cloud: CloudRule | None = None
    backend: str = "earthengine"
    location: str | None = None
    quota: Quota = EARTH_ENGINE_QUOTA
    crs: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        where = f"image source '{self.alias}'"
        if not isinstance(self.alias, str) or not _ALIAS.match(self.alias):
            raise _config_error(
                f"image source alias '{self.alias}' must be letters and digits only"
            )
        if not (self.gsd > 0):
            raise _config_error(f"{where}: gsd must be positive, got {self.gsd}")
        if len(self.bands) != 3:
            raise _config_error(f"{where}: bands must name 3 bands (R, G, B), got {self.bands}")
        if len(self.stretch) != 2 or not self.stretch[0] < self.stretch[1]:
            raise _config_error(f"{where}: stretch must be (min, max) with min < max")
        if not self.years:
            raise _config_error(f"{where}: years must list at least one year")
        if tuple(sorted(set(self.years))) != tuple(self.years):
            object.__setattr__(self, "years", tuple(sorted(set(self.years))))
        if self.backend not in BACKENDS:
            raise _config_error(f"{where}: backend must be one of {', '.join(BACKENDS)}")
        if self.backend != "earthengine" and not self.location:
            raise _config_error(f"{where}: a {self.backend} source needs a location")
        if self.coverage is None or self.coverage.is_empty:
            raise _config_error(f"{where}: coverage is empty")
        if not self.coverage.is_valid:
            object.__setattr__(self, "coverage", shapely.make_valid(self.coverage))
        if self.gamma is not None and not self.gamma > 0:
            raise _config_error(f"{where}: gamma must be positive")

    @property
    def is_global(self) -> bool:
        """True when the coverage is the whole globe (no coverage test needed)."""
        return bool(self.coverage.equals(GLOBE))

    def years_within(self, first: int | None, last: int | None) -> tuple[int, ...]:
        """The source's years within [first, last] (either bound may be None)."""
        return tuple(
            y for y in self.years if (first is None or y >= first) and (last is None or y <= last)
        )

    def fingerprint(self) -> str:
        """A stable text of every field (coverage as WKB hex), for settings hashes."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "coverage":
                value = shapely.to_wkb(value, hex=True, output_dimension=2)
            parts.append(f"{f.name}={value!r}")
        return ";".join(parts)


# --- coverage: simplified outlines (lon, lat), generous along coasts ------------------------

_SWITZERLAND = [
    (5.95, 46.13), (6.15, 46.10), (6.32, 46.30), (6.85, 46.40), (6.78, 46.14), (7.04, 45.91),
    (7.35, 45.89), (7.87, 45.91), (8.05, 46.10), (8.44, 46.26), (8.44, 46.47), (8.68, 46.10),
    (8.88, 45.95), (8.95, 45.82), (9.08, 45.82), (9.04, 46.03), (9.30, 46.50), (9.42, 46.47),
    (9.67, 46.30), (10.05, 46.22), (10.15, 46.40), (10.05, 46.55), (10.45, 46.53),
    (10.50, 46.87), (10.10, 46.85), (9.88, 46.92), (9.60, 47.06), (9.53, 47.27),
    (9.67, 47.45), (9.55, 47.55), (9.10, 47.68), (8.90, 47.70), (8.65, 47.82), (8.40, 47.70),
    (8.20, 47.63), (7.70, 47.60), (7.55, 47.61), (7.40, 47.45), (7.00, 47.50), (6.85, 47.38),
    (6.95, 47.25), (6.45, 46.95), (6.10, 46.60), (6.05, 46.40), (5.95, 46.13),
]  # fmt: skip

_BRANDENBURG = [
    (11.26, 52.88), (11.55, 53.07), (12.10, 53.26), (12.60, 53.25), (13.20, 53.28),
    (13.60, 53.52), (13.95, 53.57), (14.30, 53.45), (14.45, 53.30), (14.15, 52.85),
    (14.62, 52.58), (14.55, 52.30), (14.72, 51.95), (14.75, 51.55), (14.60, 51.43),
    (14.00, 51.40), (13.50, 51.42), (13.15, 51.50), (12.85, 51.68), (12.40, 51.80),
    (12.25, 51.98), (12.30, 52.25), (12.20, 52.55), (12.25, 52.85), (11.80, 52.80),
    (11.26, 52.88),
]  # fmt: skip
_BERLIN = [
    (13.09, 52.42), (13.12, 52.60), (13.30, 52.66), (13.50, 52.68), (13.66, 52.57),
    (13.76, 52.46), (13.63, 52.36), (13.40, 52.38), (13.18, 52.39), (13.09, 52.42),
]  # fmt: skip

_FINLAND = [
    (19.30, 59.75), (22.50, 59.65), (23.50, 59.80), (25.50, 59.95), (27.00, 60.30),
    (27.80, 60.50), (29.00, 61.15), (30.00, 61.80), (31.30, 62.50), (31.60, 62.90),
    (31.20, 63.20), (30.00, 63.80), (30.55, 64.30), (29.60, 64.90), (30.10, 65.70),
    (29.20, 66.00), (29.90, 66.90), (29.00, 67.60), (30.00, 67.70), (28.70, 68.20),
    (28.40, 68.90), (28.90, 69.05), (29.35, 69.50), (28.80, 69.80), (27.90, 70.10),
    (27.00, 69.95), (26.00, 69.75), (25.80, 69.05), (24.90, 68.60), (23.90, 68.85),
    (22.40, 68.75), (21.00, 69.30), (20.50, 69.06), (21.60, 68.40), (23.10, 68.00),
    (23.55, 67.00), (23.90, 66.60), (24.15, 65.80), (25.10, 65.25), (24.30, 64.55),
    (23.00, 63.75), (21.20, 63.30), (21.00, 62.30), (21.15, 61.00), (19.30, 60.60),
    (19.30, 59.75),
]  # fmt: skip

_SPAIN_MAINLAND = [
    (-9.40, 43.25), (-8.00, 43.85), (-5.80, 43.70), (-3.80, 43.55), (-1.80, 43.45),
    (-1.40, 43.05), (-0.70, 42.80), (0.70, 42.87), (1.45, 42.60), (1.75, 42.50),
    (3.20, 42.45), (3.40, 41.90), (2.30, 41.30), (1.00, 41.00), (0.20, 40.40),
    (-0.20, 39.60), (0.30, 38.75), (-0.55, 37.95), (-0.85, 37.55), (-1.90, 36.65),
    (-4.40, 36.65), (-5.35, 36.10), (-5.65, 35.95), (-6.35, 36.45), (-6.95, 37.15),
    (-7.45, 37.15), (-7.00, 38.00), (-7.35, 39.40), (-6.90, 40.20), (-6.80, 41.00),
    (-6.20, 41.60), (-6.60, 41.95), (-8.20, 41.85), (-8.95, 41.85), (-9.40, 43.25),
]  # fmt: skip
_SPAIN_BALEARICS = (1.10, 38.55, 4.40, 40.15)
_SPAIN_CANARIES = (-18.25, 27.55, -13.30, 29.50)

_US_CONTIGUOUS = [
    (-124.80, 48.45), (-123.00, 49.00), (-95.15, 49.00), (-94.80, 49.40), (-89.60, 48.00),
    (-84.50, 46.60), (-82.40, 45.30), (-82.40, 43.00), (-79.00, 43.50), (-76.50, 44.25),
    (-74.90, 45.05), (-71.50, 45.05), (-70.00, 46.70), (-69.20, 47.50), (-67.75, 47.10),
    (-66.90, 44.80), (-70.00, 43.50), (-69.90, 41.40), (-74.00, 40.30), (-75.40, 35.10),
    (-81.00, 31.00), (-79.90, 26.50), (-80.30, 24.90), (-81.90, 24.40), (-82.90, 27.90),
    (-84.50, 29.70), (-89.00, 30.00), (-89.60, 28.90), (-94.00, 29.40), (-97.20, 25.90),
    (-99.50, 27.50), (-101.40, 29.80), (-103.30, 28.95), (-104.70, 29.90), (-106.50, 31.75),
    (-108.20, 31.75), (-108.20, 31.33), (-111.10, 31.33), (-114.80, 32.50), (-117.13, 32.53),
    (-118.50, 33.90), (-120.70, 34.40), (-122.60, 37.50), (-124.50, 40.40), (-124.60, 42.00),
    (-124.20, 46.00), (-124.80, 48.45),
]  # fmt: skip

# Known scenes of the public SkySat collection (catalog example sites), 0.3 deg boxes.
_SKYSAT_SITES = [(-70.892, 41.6555), (-6.131, 40.323)]


def _polygon(points: Sequence[tuple[float, float]]) -> BaseGeometry:
    return shapely.Polygon(points)


def _builtin_sources() -> list[ImageSource]:
    spain = shapely.union_all(
        [_polygon(_SPAIN_MAINLAND), box(*_SPAIN_BALEARICS), box(*_SPAIN_CANARIES)]
    )
    skysat = shapely.union_all(
        [box(x - 0.15, y - 0.15, x + 0.15, y + 0.15) for x, y in _SKYSAT_SITES]
    )
    brandenburg = _polygon(_BRANDENBURG).difference(_polygon(_BERLIN))
    s2_cloud = CloudRule("CLOUDY_PIXEL_PERCENTAGE", 20.0, "QA60", (10, 11))
    landsat_cloud = CloudRule("CLOUD_COVER", 20.0, "QA_PIXEL", (3, 4))
    return [
        ImageSource(
            alias="US",
            collection="USDA/NAIP/DOQQ",
            gsd=0.6,
            years=tuple(range(2003, 2024)),
            coverage=_polygon(_US_CONTIGUOUS),
            description="NAIP aerial imagery, contiguous US (0.6-1 m, fetched at 0.6 m)",
        ),
        ImageSource(
            alias="DE",
            collection="Germany/Brandenburg/orthos/20cm",
            gsd=0.2,
            years=(2021, 2022),
            coverage=brandenburg,
            crs="EPSG:25833",
            description="Brandenburg (Germany) orthophotos 20 cm",
        ),
        ImageSource(
            alias="FI",
            collection="Finland/SMK/V/50cm",
            gsd=0.5,
            years=tuple(range(2015, 2023)),
            coverage=_polygon(_FINLAND),
            crs="EPSG:3067",
            description="Finland RGB NLS orthophotos 50 cm by SMK",
        ),
        ImageSource(
            alias="CH",
            collection="ORTHO/Switzerland/SWISSIMAGE/10cm",
            gsd=0.1,
            years=tuple(range(2017, 2022)),
            coverage=_polygon(_SWITZERLAND),
            crs="EPSG:2056",
            description="SWISSIMAGE 10 cm RGB orthophotos, Switzerland",
        ),
        ImageSource(
            alias="ES",
            collection="Spain/PNOA/PNOA10",
            gsd=0.1,
            years=tuple(range(2007, 2019)),
            coverage=spain,
            description="Spain PNOA RGB orthophotos 10 cm",
        ),
        ImageSource(
            alias="P3",
            collection="SKYSAT/GEN-A/PUBLIC/ORTHO/RGB",
            gsd=0.8,
            years=(2014, 2015, 2016),
            coverage=skysat,
            description="Planet SkySat public ortho imagery, RGB (sparse scenes)",
        ),
        ImageSource(
            alias="P5",
            collection="SKYSAT/GEN-A/PUBLIC/ORTHO/MULTISPECTRAL",
            gsd=2.0,
            stretch=(200.0, 6000.0),
            years=(2014, 2015, 2016),
            coverage=skysat,
            description="Planet SkySat public ortho imagery, multispectral 16-bit (sparse)",
        ),
        ImageSource(
            alias="S2",
            collection="COPERNICUS/S2_SR_HARMONIZED",
            gsd=10.0,
            bands=("B4", "B3", "B2"),
            stretch=(0.0, 3000.0),
            years=tuple(range(2017, 2026)),
            cloud=s2_cloud,
            description="Sentinel-2 MSI level-2A surface reflectance (harmonized)",
        ),
        ImageSource(
            alias="L8",
            collection="LANDSAT/LC08/C02/T1_TOA",
            gsd=30.0,
            bands=("B4", "B3", "B2"),
            stretch=(0.0, 0.4),
            gamma=1.2,
            years=tuple(range(2013, 2026)),
            cloud=landsat_cloud,
            description="Landsat 8 collection 2 tier 1 TOA reflectance",
        ),
        ImageSource(
            alias="L9",
            collection="LANDSAT/LC09/C02/T1_TOA",
            gsd=30.0,
            bands=("B4", "B3", "B2"),
            stretch=(0.0, 0.4),
            gamma=1.2,
            years=tuple(range(2021, 2026)),
            cloud=landsat_cloud,
            description="Landsat 9 collection 2 tier 1 TOA reflectance",
        ),
    ]


_LOCK = threading.Lock()
_REGISTRY: dict[str, ImageSource] = {s.alias: s for s in _builtin_sources()}


def list_sources() -> list[str]:
    """Aliases of every registered source, finest GSD first (ties by alias)."""
    with _LOCK:
        return [s.alias for s in sorted(_REGISTRY.values(), key=lambda s: (s.gsd, s.alias))]


def get_source(alias: str) -> ImageSource:
    """The source registered under ``alias``; an unknown alias is a ConfigError."""
    with _LOCK:
        source = _REGISTRY.get(alias)
    if source is None:
        raise _config_error(
            f"unknown image source '{alias}': known sources are {', '.join(list_sources())}"
        )
    return source


def add_source(source: ImageSource, replace: bool = False) -> None:
    """Register ``source`` under its alias; an existing alias needs ``replace=True``."""
    with _LOCK:
        if source.alias in _REGISTRY and not replace:
            raise _config_error(
                f"image source '{source.alias}' already exists: choose another alias or "
                "replace it explicitly"
            )
        _REGISTRY[source.alias] = source


def remove_source(alias: str) -> None:
    """Forget the source ``alias`` (tests and pipelines that registered their own)."""
    with _LOCK:
        _REGISTRY.pop(alias, None)


# --- building a source from a pipeline's YAML mapping ----------------------------------------

_DICT_KEYS = {f.name for f in dataclasses.fields(ImageSource)}


def _parse_years(value: Any, alias: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d{4})\s*(?:-\s*(\d{4})\s*)?", value)
        if not m:
            raise _config_error(f"image source '{alias}': years '{value}' is not YYYY or YYYY-YYYY")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first:
            raise _config_error(f"image source '{alias}': years '{value}' runs backwards")
        return tuple(range(first, last + 1))
    if isinstance(value, Iterable):
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _config_error(f"image source '{alias}': year {v!r} is not a whole number")
            out.append(v)
        return tuple(out)
    raise _config_error(f"image source '{alias}': years must be a list or 'YYYY-YYYY'")


def _parse_coverage(value: Any, alias: str) -> BaseGeometry:
    try:
        if isinstance(value, str):
            return shapely.from_wkt(value)
        if isinstance(value, Mapping):
            return shape(value)
        if isinstance(value, Sequence) and len(value) == 4:
            west, south, east, north = (float(v) for v in value)
            if not (west < east and south < north):
                raise ValueError("need west < east and south < north")
            return box(west, south, east, north)
    except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException) as e:
        raise _config_error(f"image source '{alias}': bad coverage ({e})") from None
    raise _config_error(
        f"image source '{alias}': coverage must be [west, south, east, north], WKT or GeoJSON"
    )


def _raster_coverage(folder: str, alias: str) -> BaseGeometry:
    """The union of the lon/lat bounds of the GeoTIFFs in ``folder``."""
    from pathlib import Path

    import rasterio
    from rasterio.warp import transform_bounds

    files = sorted(
        p for p in Path(folder).glob("**/*") if p.suffix.lower() in (".tif", ".tiff", ".vrt")
    )
    if not files:
        from skyscript_build.errors import InputError

        raise InputError(folder, f"image source '{alias}': no GeoTIFF files in this folder")
    boxes = []
    for path in files:
        with rasterio.open(path) as ds:
            boxes.append(box(*transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)))
    return shapely.union_all(boxes)


def source_from_dict(d: Mapping[str, Any]) -> ImageSource:
    """Build a source from a pipeline mapping; fields not given come from the source of the
    same alias when there is one (an override), else from the defaults.

    Keys: ``alias`` (required), ``collection``, ``gsd``, ``bands``, ``stretch`` ([min, max]),
    ``gamma``, ``years`` (list or ``"2015-2022"``), ``coverage`` ([w, s, e, n], WKT or GeoJSON;
    a raster source without one covers its files' bounds), ``cloud`` (mapping with
    ``scene_property``, ``max_scene_percent``, ``mask_band``, ``mask_bits``), ``backend``,
    ``location``, ``quota`` (``requests_per_s``, ``concurrency``, ``latency_s``), ``crs``,
    ``description``.
    """
    if not isinstance(d, Mapping) or "alias" not in d:
        raise _config_error("an image source needs at least an 'alias'")
    alias = str(d["alias"])
    unknown = sorted(set(d) - _DICT_KEYS)
    if unknown:
        raise _config_error(
            f"image source '{alias}': unknown key(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_DICT_KEYS))})"
        )
    with _LOCK:
        base = _REGISTRY.get(alias)
    kw: dict[str, Any] = {}
    for key, value in d.items():
        if key == "alias" or value is None:
            continue
        try:
            if key == "gsd":
                kw[key] = float(value)
            elif key == "bands":
                kw[key] = tuple(str(b) for b in value)
            elif key == "stretch":
                kw[key] = tuple(float(v) for v in value)
            elif key == "gamma":
                kw[key] = float(value)
            elif key == "years":
                kw[key] = _parse_years(value, alias)
            elif key == "coverage":
                kw[key] = _parse_coverage(value, alias)
            elif key == "cloud":
                cloud = dict(value)
                if "mask_bits" in cloud:
                    cloud["mask_bits"] = tuple(int(b) for b in cloud["mask_bits"])
                kw[key] = CloudRule(**cloud)
            elif key == "quota":
                kw[key] = Quota(**dict(value))
            else:
                kw[key] = str(value)
        except (TypeError, ValueError) as e:
            raise _config_error(f"image source '{alias}': bad {key} ({e})") from None
    if base is not None:
        return dataclasses.replace(base, **kw)
    kw.setdefault("collection", alias)
    if "gsd" not in kw or "years" not in kw:
        raise _config_error(f"image source '{alias}': a new source needs 'gsd' and 'years'")
    if kw.get("backend") == "raster" and "coverage" not in kw and kw.get("location"):
        kw["coverage"] = _raster_coverage(kw["location"], alias)
    if kw.get("backend") in ("raster", "xyz") and "quota" not in kw:
        kw["quota"] = Quota(requests_per_s=50.0, concurrency=8, latency_s=0.2)
    return ImageSource(alias=alias, **kw)
