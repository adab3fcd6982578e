"""A local Earth Engine emulator: the real ``ee`` client talks to it over HTTP.

Local GeoTIFFs, listed in a collections YAML (``load_collections``), are served as Earth Engine
image collections on 127.0.0.1::

    from skyscript_build.emulator import Emulator, init_ee_client

    with Emulator("build/demo-data/collections.yaml", latency_ms=0, faults="429:0.1") as emu:
        init_ee_client(emu.url)              # ee.Initialize(..., opt_url=emu.url)
        ...                                  # plain ee code: getInfo(), ee.data.computePixels
        emu.stats.count("image:computePixels", 200), emu.stats.max_concurrency

Or from the shell: ``skyscript-build emulator --collections FILE --port 8765``.

What it answers (``value:compute`` = getInfo, ``image:computePixels`` = pixels in a grid given
by ``crsCode``, ``affineTransform`` and ``dimensions``; JPEG, PNG, GEO_TIFF, NPY):

- collections: ImageCollection.load, Collection.filter / limit (sort) / first / size / toList
  / map / geometry, AggregateFeatureCollection.array (aggregate_array),
  ImageCollection.fromImages / mosaic;
- filters: Filter.intersects (filterBounds), Filter.dateRangeContains (filterDate), the
  comparisons (eq, neq, lt, lte, gt, gte, inList, string matches), rangeContains,
  calendarRange, and, or, not, notNull;
- images: Image.load, select, rename, bandNames, constant, visualize (bands, min, max, gain,
  bias, gamma, palette), clip, updateMask, unmask, arithmetic, comparisons and bitwise
  operators, casts (toByte ...), date, geometry; reproject / resample pass through (pixels
  are always computed in the request's grid, nearest neighbour);
- elements: Element.get, set, setMulti, propertyNames, toDictionary; Date, Date.millis /
  advance / get / fromYMD, DateRange; Projection, GeometryConstructors.* (with ``proj``),
  Geometry.bounds, Feature.

Errors use Earth Engine's JSON body and wording: an unknown collection is "ImageCollection
asset '...' not found"; a null where an algorithm needs a value is "<Algorithm>: Parameter
'<name>' is required."; anything the emulator does not implement is a 400 naming the
algorithm. Empty collections behave as in Earth Engine: ``size()`` is 0, ``first()`` is null
(``getInfo()`` returns None, and using it, e.g. ``first().visualize(...)``, fails with
"Image.visualize: Parameter 'image' is required."), and ``mosaic()`` is an image with no bands,
so ``mosaic().select(['R', ...])`` fails with "Image.select: Pattern 'R' did not match any
bands."; a grid partly outside every image gets masked pixels there (0 in JPEG/NPY/GeoTIFF,
transparent in PNG). A computePixels answer over 48 MiB is refused with "Total request size
(N bytes) must be less than or equal to 50331648 bytes." (the limit is settable).

Faults (``faults.py``): 429 with Retry-After, 500, 503, stalls past the client's timeout,
bodies cut short, HTML instead of JSON, "User memory limit exceeded."; seeded, so a seed always
gives the same sequence; plus a latency per request, fixed or growing with the request's
megapixels (``latency_ms + latency_ms_per_mpx * Mpx``).
"""

from __future__ import annotations

from .client import init_ee_client
from .collections import Catalog, ImageRecord, load_collections
from .faults import FAULT_MODES, FaultPlan, parse_faults
from .server import Emulator, EmulatorConfig, EmulatorStats

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "EmulatorStats",
    "Catalog",
    "ImageRecord",
    "load_collections",
    "FaultPlan",
    "FAULT_MODES",
    "parse_faults",
    "init_ee_client",
]
