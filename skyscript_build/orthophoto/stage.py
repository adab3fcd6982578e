"""The synthetic orthophoto of the demo: an OSM extract rendered at 0.5 m into a GeoTIFF.

No real imagery ships with the project, so the demo's Earth Engine emulator serves this
picture as collection ``Finland/SMK/V/50cm``: ground, land use, grass, parks, forest and scrub,
water, plazas, roads by class, rail and tram lines, trees, and buildings with roof tones, gable
shading and cast shadows, plus seeded texture so that tiles are not flat colour. It is
synthetic, and says so: in its GeoTIFF tags, in the collection's ``SYNTHETIC`` property and in
every description. Map data (c) OpenStreetMap contributors, ODbL.

The same PBF, settings and seed give a byte-identical file; a rerun whose outputs match the
inputs does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError
from ..files import atomic_path, atomic_write_text, check_out_dir, leave_no_empty_folders
from ..settings import check_settings, setting
from ._osm import read_osm
from ._render import render

__all__ = [
    "OrthophotoConfig",
    "OrthophotoResult",
    "render_orthophoto",
    "run_orthophoto",
    "ATTRIBUTION",
]

log = logging.getLogger(__name__)

ATTRIBUTION = "synthetic, rendered from OpenStreetMap data (c) OpenStreetMap contributors, ODbL"
RENDERER_VERSION = "2"


@dataclass(frozen=True)
class OrthophotoConfig:
    """Settings of one rendering, checked on creation (each field's help is its declaration)."""

    pbf: Path = setting(help="the OSM extract (.osm.pbf)")
    out: Path = setting(help="output folder (the GeoTIFF and collections.yaml)")
    gsd: float = setting(0.5, help="metres per pixel", minimum=0.05, maximum=100)
    crs: str = setting("EPSG:3067", help="projected CRS of the GeoTIFF")
    seed: int = setting(0, help="seed of the texture", minimum=0)
    collection: str = setting(
        "Finland/SMK/V/50cm", help="collection id registered in collections.yaml"
    )
    time_start: str = setting(
        "2019-06-15T10:30:00Z", help="acquisition time registered for the image (ISO 8601)"
    )
    force: bool = setting(False, help="render even if matching outputs exist")

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.pbf.is_file():
            raise InputError(self.pbf, "OSM extract not found")
        check_out_dir(self.out, "--out")
        from pyproj import CRS

        try:
            crs = CRS.from_user_input(self.crs)
        except Exception:  # noqa: BLE001 - pyproj's CRSError
            raise ConfigError(f"unknown CRS {self.crs!r}") from None
        if not crs.is_projected:
            raise ConfigError(f"the CRS must be projected (metres), got {self.crs}")
        from ..emulator.collections import parse_time_ms

        try:
            parse_time_ms(self.time_start)
        except ValueError:
            raise ConfigError(f"time_start {self.time_start!r} is not ISO 8601") from None

    @property
    def tif_path(self) -> Path:
        """The GeoTIFF written."""
        return self.out / "helsinki_orthophoto_synthetic.tif"

    @property
    def collections_path(self) -> Path:
        """The emulator's collections file written."""
        return self.out / "collections.yaml"


@dataclass(frozen=True)
class OrthophotoResult:
    """What a rendering produced."""

    tif: Path
    collections: Path
    width: int
    height: int
    features: int
    skipped: bool
    seconds: float

    def summary(self) -> str:
        """One line for the CLI."""
        if self.skipped:
            return f"orthophoto: up to date, {self.tif} ({self.width}x{self.height} px)"
        return (
            f"orthophoto: {self.tif} ({self.width}x{self.height} px, {self.features} features, "
            f"{ATTRIBUTION}) and {self.collections} in {self.seconds:.1f} s"
        )


def _settings_key(config: OrthophotoConfig) -> str:
    h = hashlib.sha256()
    with open(config.pbf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(
        repr(
            (
                RENDERER_VERSION,
                config.gsd,
                config.crs,
                config.seed,
                config.collection,
                config.time_start,
            )
        ).encode()
    )
    return h.hexdigest()[:16]


def _collections_yaml(config: OrthophotoConfig, key: str) -> str:
    import yaml

    entry = {
        "path": config.tif_path.name,
        "time_start": config.time_start,
        "id": f"helsinki_{config.time_start[:4]}_synthetic",
        "bands": ["R", "G", "B"],
        "properties": {
            "SYNTHETIC": 1,
            "description": ATTRIBUTION,
            "source": config.pbf.name,
            "render_key": key,
        },
    }
    header = (
        "# Written by `skyscript-build orthophoto`: the demo's synthetic orthophoto as an\n"
        f"# Earth Engine collection for the emulator. {ATTRIBUTION}.\n"
    )
    return header + yaml.safe_dump({config.collection: [entry]}, sort_keys=False)


def _up_to_date(config: OrthophotoConfig, key: str) -> tuple[int, int] | None:
    import rasterio

    if not (config.tif_path.is_file() and config.collections_path.is_file()):
        return None
    try:
        with rasterio.open(config.tif_path) as ds:
            if ds.tags().get("RENDER_KEY") != key:
                return None
            size = (ds.width, ds.height)
    except rasterio.errors.RasterioIOError:
        return None
    if config.collections_path.read_text() != _collections_yaml(config, key):
        return None
    return size


def render_orthophoto(config: OrthophotoConfig) -> OrthophotoResult:
    """Render ``config.pbf`` into ``config.tif_path`` and write ``config.collections_path``.

    Both files appear atomically; a failed run leaves no folder it made.
    """
    with leave_no_empty_folders(config.out):
        return _render(config)


def _render(config: OrthophotoConfig) -> OrthophotoResult:
    import rasterio

    start = time.perf_counter()
    key = _settings_key(config)
    if not config.force:
        size = _up_to_date(config, key)
        if size is not None:
            log.debug("orthophoto: %s is up to date", config.tif_path)
            return OrthophotoResult(
                config.tif_path, config.collections_path, size[0], size[1], 0, True, 0.0
            )
    osm = read_osm(config.pbf)
    pixels, transform, features = render(config, osm)
    _, h, w = pixels.shape
    config.out.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 3,
        "dtype": "uint8",
        "crs": config.crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "photometric": "RGB",
        "interleave": "pixel",
    }
    with atomic_path(config.tif_path) as tmp, rasterio.open(tmp, "w", **profile) as ds:
        ds.write(pixels)
        ds.update_tags(
            TIFFTAG_IMAGEDESCRIPTION=ATTRIBUTION,
            TIFFTAG_COPYRIGHT="Map data (c) OpenStreetMap contributors, ODbL",
            TIFFTAG_SOFTWARE="skyscript-build orthophoto",
            SYNTHETIC="1",
            ATTRIBUTION=ATTRIBUTION,
            RENDER_KEY=key,
        )
        ds.descriptions = ("R", "G", "B")
    atomic_write_text(config.collections_path, _collections_yaml(config, key))
    seconds = time.perf_counter() - start
    return OrthophotoResult(
        config.tif_path, config.collections_path, w, h, features, False, seconds
    )


run_orthophoto = render_orthophoto
