"""The emulator's catalog: local GeoTIFFs registered as Earth Engine image collections.

A collections file is YAML mapping each collection id to a list of images::

    Finland/SMK/V/50cm:
      - path: helsinki_ortho.tif          # relative to the collections file
        time_start: 2019-06-15T10:30:00Z  # ISO 8601, UTC when no offset is given
        id: helsinki_2019                 # optional: the image's system:index
        bands: [R, G, B]                  # optional: names of the file's bands in order
        properties: {SYNTHETIC: 1}        # optional: more image properties
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import rasterio
import yaml
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape
from shapely.geometry.base import BaseGeometry

from ..errors import InputError

__all__ = ["ImageRecord", "Catalog", "load_collections", "parse_time_ms"]


@dataclass(frozen=True)
class ImageRecord:
    """One registered image: a local raster with Earth Engine metadata."""

    collection: str
    index: str  # system:index
    path: Path
    time_start: int  # milliseconds since the epoch, UTC
    bands: tuple[str, ...]
    properties: dict[str, Any]
    crs: str
    transform: tuple[float, float, float, float, float, float]  # rasterio Affine a..f
    width: int
    height: int
    dtype: str
    nodata: float | None
    asset_size: int
    footprint: BaseGeometry  # EPSG:4326
    footprint_geojson: dict[str, Any] = field(repr=False)

    @property
    def id(self) -> str:
        """The full asset id, ``collection/index``."""
        return f"{self.collection}/{self.index}"

    def all_properties(self) -> dict[str, Any]:
        """The image's properties as Earth Engine lists them, system ones included."""
        return {
            **self.properties,
            "system:index": self.index,
            "system:time_start": self.time_start,
            "system:footprint": self.footprint_geojson,
            "system:asset_size": self.asset_size,
        }


@dataclass(frozen=True)
class Catalog:
    """Every registered collection: id -> images (in file order)."""

    collections: dict[str, tuple[ImageRecord, ...]]
    source: Path | None = None

    def get(self, collection_id: str) -> tuple[ImageRecord, ...] | None:
        """The images of ``collection_id``, or None when it is not registered."""
        return self.collections.get(collection_id)

    def image(self, asset_id: str) -> ImageRecord | None:
        """The image with the full id ``asset_id``, or None."""
        collection, _, index = asset_id.rpartition("/")
        for record in self.collections.get(collection, ()):
            if record.index == index:
                return record
        return None


def parse_time_ms(value: Any) -> int:
    """Milliseconds since the epoch of an ISO 8601 string, date, datetime or number (ms)."""
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)
    else:
        raise ValueError(f"not a time: {value!r}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(round(dt.timestamp() * 1000))


def _record(collection: str, entry: Any, base: Path, n: int, file: Path) -> ImageRecord:
    where = f"collection {collection!r}, image {n}"
    if not isinstance(entry, dict) or "path" not in entry or "time_start" not in entry:
        raise InputError(file, f"{where}: each image needs 'path' and 'time_start'")
    unknown = set(entry) - {"path", "time_start", "id", "bands", "properties"}
    if unknown:
        raise InputError(file, f"{where}: unknown keys {sorted(unknown)}")
    path = (base / str(entry["path"])).resolve()
    try:
        time_start = parse_time_ms(entry["time_start"])
    except ValueError:
        raise InputError(
            file, f"{where}: time_start {entry['time_start']!r} is not ISO 8601"
        ) from None
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise InputError(file, f"{where}: {path} has no CRS")
            crs = ds.crs.to_string()
            transform = tuple(ds.transform)[:6]
            width, height, count, dtype = ds.width, ds.height, ds.count, ds.dtypes[0]
            nodata = ds.nodata
            bounds = ds.bounds
    except rasterio.errors.RasterioIOError as e:
        raise InputError(file, f"{where}: cannot open {path}: {e}") from None
    bands = tuple(str(b) for b in entry.get("bands") or [f"B{i + 1}" for i in range(count)])
    if len(bands) != count:
        raise InputError(file, f"{where}: {len(bands)} band names for {count} bands in {path}")
    properties = entry.get("properties") or {}
    if not isinstance(properties, dict):
        raise InputError(file, f"{where}: 'properties' must be a mapping")
    footprint_geojson = transform_geom(crs, "EPSG:4326", mapping(box(*bounds)), precision=9)
    footprint_geojson = {"type": "LinearRing", "coordinates": footprint_geojson["coordinates"][0]}
    footprint = shape({"type": "Polygon", "coordinates": [footprint_geojson["coordinates"]]})
    return ImageRecord(
        collection=collection,
        index=str(entry.get("id") or f"{path.stem}"),
        path=path,
        time_start=time_start,
        bands=bands,
        properties={str(k): v for k, v in properties.items()},
        crs=crs,
        transform=transform,  # type: ignore[arg-type]
        width=width,
        height=height,
        dtype=dtype,
        nodata=nodata,
        asset_size=path.stat().st_size,
        footprint=footprint,
        footprint_geojson=footprint_geojson,
    )


def load_collections(path: str | Path) -> Catalog:
    """Read and check a collections YAML file (every raster is opened once)."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise InputError(file, "collections file not found") from None
    except (OSError, yaml.YAMLError) as e:
        raise InputError(file, f"not a readable YAML file: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(file, "expected a mapping of collection id -> list of images")
    collections: dict[str, tuple[ImageRecord, ...]] = {}
    for collection, entries in data.items():
        if not isinstance(entries, list):
            raise InputError(file, f"collection {collection!r}: expected a list of images")
        records = [_record(str(collection), e, file.parent, n, file) for n, e in enumerate(entries)]
        ids = [r.index for r in records]
        if len(set(ids)) != len(ids):
            raise InputError(file, f"collection {collection!r}: duplicate image ids")
        collections[str(collection)] = tuple(records)
    return Catalog(collections=collections, source=file.resolve())
