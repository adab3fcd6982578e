"""The imagery catalog: image source alias -> collection, GSD, bands, stretch, years, coverage.

The ten sources SkyScript used (Wang et al. 2024) are data: ``image_sources.yaml``, shipped
beside this module, gives their Earth Engine collection ids, the GSD a tile is fetched at, the
RGB bands, the stretch to 8 bits, the years each collection has, a simplified coverage polygon
(lon/lat) and, for Sentinel-2 and Landsat, a cloud rule.

A ``Catalog`` is an immutable set of sources. Each stage that needs sources (plan, fetch) gets
its catalog in its config; a pipeline's ``source_definitions`` make a new catalog from the
default one, which no other pipeline sees. Your own sources, without editing the package:

- in a pipeline file, under ``source_definitions`` (the keys of ``source_from_dict``);
- in a YAML file of the same form as ``image_sources.yaml``: ``load_catalog(path)``;
- in Python: ``builtin_catalog().with_sources(source_from_dict({...}))`` handed to a stage
  config (``catalog=``), or ``add_source(source)``, which changes the default catalog that
  the stage configs made afterwards start from.

    >>> from image_sources import get_source, list_sources
    >>> get_source("CH").gsd
    0.1
    >>> "S2" in list_sources()
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

__all__ = [
    "BACKENDS",
    "CATALOG_FILE",
    "Catalog",
    "CloudRule",
    "Quota",
    "ImageSource",
    "GLOBE",
    "builtin_catalog",
    "default_catalog",
    "load_catalog",
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


# --- the catalog: an immutable set of sources ------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class Catalog:
    """An immutable set of image sources, by alias, finest GSD first (ties by alias).

    A stage gets the catalog it plans or fetches with in its config; changing a catalog makes
    a new one (``with_sources``, ``without``), so no run sees another's sources. Two catalogs
    are equal when their sources are (``digest``).

        >>> mine = builtin_catalog().with_sources(source_from_dict({...}))
        >>> run_plan(PlanConfig(objects=..., out=..., sources=("MINE",), catalog=mine))
    """

    sources: tuple[ImageSource, ...] = ()
    _by_alias: dict[str, ImageSource] = field(init=False, repr=False)
    _digest: list[str] = field(init=False, repr=False)  # computed on first use

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.sources, key=lambda s: (s.gsd, s.alias)))
        by_alias: dict[str, ImageSource] = {}
        for source in ordered:
            if source.alias in by_alias:
                raise _config_error(f"image source '{source.alias}' is defined twice")
            by_alias[source.alias] = source
        object.__setattr__(self, "sources", ordered)
        object.__setattr__(self, "_by_alias", by_alias)
        object.__setattr__(self, "_digest", [])

    def __reduce__(self) -> tuple[Any, ...]:
        return (Catalog, (self.sources,))

    def __contains__(self, alias: object) -> bool:
        return alias in self._by_alias

    def __iter__(self) -> Iterator[str]:
        return iter(self.aliases())

    def __len__(self) -> int:
        return len(self.sources)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"Catalog({', '.join(self.aliases())})"

    @property
    def digest(self) -> str:
        """A hash of every source's every field (``ImageSource.fingerprint``)."""
        if not self._digest:
            text = "\n".join(s.fingerprint() for s in self.sources)
            self._digest.append(hashlib.sha256(text.encode()).hexdigest())
        return self._digest[0]

    def aliases(self) -> list[str]:
        """Every alias, finest GSD first (ties by alias)."""
        return [s.alias for s in self.sources]

    def get_source(self, alias: str) -> ImageSource:
        """The source ``alias``; an unknown alias is a ConfigError naming the known ones."""
        source = self._by_alias.get(alias)
        if source is None:
            raise _config_error(
                f"unknown image source '{alias}': known sources are {', '.join(self.aliases())}"
            )
        return source

    def with_sources(self, *sources: ImageSource, replace: bool = False) -> Catalog:
        """A new catalog with ``sources`` added; an existing alias needs ``replace=True``."""
        by_alias = dict(self._by_alias)
        for source in sources:
            if source.alias in by_alias and not replace:
                raise _config_error(
                    f"image source '{source.alias}' already exists: choose another alias or "
                    "replace it explicitly"
                )
            by_alias[source.alias] = source
        return Catalog(tuple(by_alias.values()))

    def without(self, *aliases: str) -> Catalog:
        """A new catalog without the sources ``aliases`` (unknown aliases are ignored)."""
        return Catalog(tuple(s for s in self.sources if s.alias not in aliases))


#: The built-in sources' data file, shipped beside this module.
CATALOG_FILE = Path(__file__).with_name("image_sources.yaml")


def load_catalog(path: str | Path, base: Catalog | None = None) -> Catalog:
    """``base`` (default: the built-in catalog) plus the sources of a YAML file.

    The file maps each alias to the keys of ``source_from_dict``, as a pipeline's
    ``source_definitions`` does; an alias ``base`` has already is overridden, keeping the
    fields the file does not give. A bad file is an InputError naming it.
    """
    return _read_catalog(Path(path), builtin_catalog() if base is None else base)


@functools.cache
def builtin_catalog() -> Catalog:
    """The sources shipped with the package (``image_sources.yaml``)."""
    return _read_catalog(CATALOG_FILE, Catalog())


def _read_catalog(path: Path, base: Catalog) -> Catalog:
    import yaml

    from skyscript_build.errors import ConfigError, InputError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(path, f"not a readable image source catalog ({e})") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
        raise InputError(path, "expected a mapping of alias -> source fields")
    try:
        sources = [source_from_dict({**v, "alias": str(k)}, base) for k, v in data.items()]
    except ConfigError as e:
        raise InputError(path, str(e)) from None
    return base.with_sources(*sources, replace=True)


# The catalog ``list_sources``, ``get_source`` and a stage config without its own start from:
# the built-in one plus what this process's ``add_source`` calls added.
_LOCK = threading.Lock()
_DEFAULT: list[Catalog] = []


def default_catalog() -> Catalog:
    """The built-in catalog plus the sources ``add_source`` added in this process."""
    return _update_default(lambda catalog: catalog)


def _update_default(change: Callable[[Catalog], Catalog]) -> Catalog:
    with _LOCK:
        _DEFAULT[:] = [change(_DEFAULT[0] if _DEFAULT else builtin_catalog())]
        return _DEFAULT[0]


def list_sources() -> list[str]:
    """Aliases of the default catalog, finest GSD first (ties by alias)."""
    return default_catalog().aliases()


def get_source(alias: str) -> ImageSource:
    """The default catalog's source ``alias``; an unknown alias is a ConfigError."""
    return default_catalog().get_source(alias)


def add_source(source: ImageSource, replace: bool = False) -> None:
    """Add ``source`` to the default catalog (an existing alias needs ``replace=True``).

    Stage configs made afterwards start from it; catalogs made before do not change.
    """
    _update_default(lambda catalog: catalog.with_sources(source, replace=replace))


def remove_source(alias: str) -> None:
    """Take the source ``alias`` out of the default catalog (unknown aliases are ignored)."""
    _update_default(lambda catalog: catalog.without(alias))


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


def source_from_dict(d: Mapping[str, Any], catalog: Catalog | None = None) -> ImageSource:
    """Build a source from a mapping (a pipeline's or a catalog file's entry); fields not given
    come from the source of the same alias in ``catalog`` (default: the default catalog) when
    it has one (an override), else from the defaults. Registers nothing.

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
    base = catalog if catalog is not None else default_catalog()
    kw = _parse_fields(d, alias)
    if alias in base:
        return dataclasses.replace(base.get_source(alias), **kw)
    kw.setdefault("collection", alias)
    if "gsd" not in kw or "years" not in kw:
        raise _config_error(f"image source '{alias}': a new source needs 'gsd' and 'years'")
    if kw.get("backend") == "raster" and "coverage" not in kw and kw.get("location"):
        kw["coverage"] = _raster_coverage(kw["location"], alias)
    if kw.get("backend") in ("raster", "xyz") and "quota" not in kw:
        kw["quota"] = Quota(requests_per_s=50.0, concurrency=8, latency_s=0.2)
    return ImageSource(alias=alias, **kw)


def _cloud_rule(value: Any, alias: str) -> CloudRule:
    cloud = dict(value)
    if "mask_bits" in cloud:
        cloud["mask_bits"] = tuple(int(b) for b in cloud["mask_bits"])
    return CloudRule(**cloud)


# How each key of a source mapping becomes a field (any other key: its text).
_FIELD_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "gsd": lambda v, alias: float(v),
    "bands": lambda v, alias: tuple(str(b) for b in v),
    "stretch": lambda v, alias: tuple(float(x) for x in v),
    "gamma": lambda v, alias: float(v),
    "years": _parse_years,
    "coverage": _parse_coverage,
    "cloud": _cloud_rule,
    "quota": lambda v, alias: Quota(**dict(v)),
}


def _parse_fields(d: Mapping[str, Any], alias: str) -> dict[str, Any]:
    """The fields a source mapping gives (None values left out), parsed."""
    kw: dict[str, Any] = {}
    for key, value in d.items():
        if key == "alias" or value is None:
            continue
        try:
            kw[key] = _FIELD_PARSERS.get(key, lambda v, alias: str(v))(value, alias)
        except (TypeError, ValueError) as e:
            raise _config_error(f"image source '{alias}': bad {key} ({e})") from None
    return kw
