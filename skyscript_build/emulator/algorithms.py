"""The Earth Engine algorithms the emulator implements (the subset imagery backends send).

Each implementation takes ``(evaluator, name, args)`` with the evaluated arguments by name.
Required arguments are checked first against ``ee``'s own algorithm list, so a null where an
image is required gets Earth Engine's ``"<Algorithm>: Parameter '<name>' is required."``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import shapely
from pyproj import Transformer
from rasterio.features import geometry_mask
from shapely import geometry as sg
from shapely.ops import unary_union

from .collections import ImageRecord, parse_time_ms
from .pixels import Grid, crs_of, read_record
from .values import Closure, Coll, DateRange, EEDate, EvalError, Feature, Filter, Geom, Img

__all__ = ["ALGORITHMS", "visualize_image", "record_image"]

Impl = Callable[[Any, str, dict[str, Any]], Any]
ALGORITHMS: dict[str, Impl] = {}


def alg(*names: str) -> Callable[[Impl], Impl]:
    """Register an implementation under one or more algorithm names."""

    def wrap(fn: Impl) -> Impl:
        for name in names:
            ALGORITHMS[name] = fn
        return fn

    return wrap


@lru_cache(maxsize=1)
def required_arguments() -> dict[str, tuple[str, ...]]:
    """Algorithm name -> its required argument names, from ``ee``'s algorithm list."""
    data = json.loads((resources.files("ee") / "tests" / "algorithms.json").read_bytes())
    return {
        a["name"].removeprefix("algorithms/"): tuple(
            x["argumentName"] for x in a.get("arguments", []) if not x.get("optional")
        )
        for a in data["algorithms"]
    }


def check_required(name: str, args: dict[str, Any]) -> None:
    """Raise Earth Engine's error when a required argument is missing or null."""
    for arg in required_arguments().get(name, ()):
        if args.get(arg) is None:
            raise EvalError(f"{name}: Parameter '{arg}' is required.")


# -- conversions -------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return {
        Img: "Image",
        Coll: "ImageCollection",
        Geom: "Geometry",
        EEDate: "Date",
        Feature: "Feature",
    }.get(type(value), type(value).__name__)


def as_image(value: Any, name: str, arg: str) -> Img:
    """An image argument; numbers become constant images, as in Earth Engine."""
    if isinstance(value, Img):
        return value
    if isinstance(value, int | float | list) and not isinstance(value, bool):
        return constant_image(value)
    raise EvalError(f"{name}: Invalid type for '{arg}': expected Image, got {_type_name(value)}.")


def as_coll(value: Any, name: str, arg: str) -> Coll:
    """A collection argument."""
    if isinstance(value, Coll):
        return value
    raise EvalError(
        f"{name}: Invalid type for '{arg}': expected Collection, got {_type_name(value)}."
    )


def as_geom(value: Any, name: str, arg: str) -> Geom:
    """A geometry argument (a Feature gives its geometry; GeoJSON is accepted)."""
    if isinstance(value, Geom):
        return value
    if isinstance(value, Feature) and value.geometry is not None:
        return value.geometry
    if isinstance(value, Img) and value.footprint is not None:
        return Geom(value.footprint)
    if isinstance(value, dict) and "type" in value:
        try:
            return Geom(sg.shape(value))
        except Exception:  # noqa: BLE001 - shapely raises several types
            pass
    raise EvalError(
        f"{name}: Invalid type for '{arg}': expected Geometry, got {_type_name(value)}."
    )


def as_millis(value: Any, name: str) -> int:
    """A date argument (Date, number of ms, or ISO 8601 string) in ms."""
    if isinstance(value, EEDate):
        return value.millis
    try:
        return parse_time_ms(value)
    except (ValueError, TypeError):
        raise EvalError(f"{name}: Unable to parse date '{value}'.") from None


def _reproject(shape: Any, transformer: Transformer) -> Any:
    def fn(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(shape, fn)


@lru_cache(maxsize=64)
def _to_wgs84(crs: str) -> Transformer:
    return Transformer.from_crs(crs_of(crs), "EPSG:4326", always_xy=True)


@lru_cache(maxsize=64)
def _from_wgs84(crs: str) -> Transformer:
    return Transformer.from_crs("EPSG:4326", crs_of(crs), always_xy=True)


def _crs_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "crs" in value:
        return str(value["crs"])
    raise EvalError(f"Invalid projection {value!r}.")


def _in_wgs84(shape: Any, crs: Any) -> Geom:
    text = _crs_text(crs)
    if text and text.upper() not in ("EPSG:4326", "WGS84"):
        try:
            shape = _reproject(shape, _to_wgs84(text))
        except Exception:  # noqa: BLE001 - pyproj/rasterio CRS errors
            raise EvalError(f"Projection: Unknown projection '{text}'.") from None
    return Geom(shape)


def _prop(element: Any, field: str) -> Any:
    if field in (".all", ".geo"):
        if isinstance(element, Img):
            return Geom(element.footprint) if element.footprint is not None else None
        if isinstance(element, Feature):
            return element.geometry
        return None
    props = element.props if isinstance(element, Img | Feature | Coll) else {}
    return props.get(field)


# -- images --------------------------------------------------------------------------------
def record_image(record: ImageRecord) -> Img:
    """The image of one registered raster."""

    def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return read_record(record, grid, bands)

    return Img(
        bands=record.bands,
        dtype=np.dtype(record.dtype),
        props=record.all_properties(),
        render=render,
        footprint=record.footprint,
        record=record,
    )


def constant_image(value: Any) -> Img:
    """Image.constant: one band per value."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int | float) for v in values):
        raise EvalError(f"Image.constant: Invalid value {value!r}.")
    dtype = np.dtype(np.int32 if all(isinstance(v, int) for v in values) else np.float64)
    names = (
        ("constant",) if len(values) == 1 else tuple(f"constant_{i}" for i in range(len(values)))
    )

    def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        data = np.empty((len(bands), grid.height, grid.width), dtype=dtype)
        for k, b in enumerate(bands):
            data[k] = values[b]
        return data, np.ones((grid.height, grid.width), dtype=bool)

    return Img(bands=names, dtype=dtype, props={}, render=render)


def _empty_image() -> Img:
    def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.zeros((len(bands), grid.height, grid.width), np.uint8),
            np.zeros((grid.height, grid.width), bool),
        )

    return Img(bands=(), dtype=np.dtype(np.uint8), props={}, render=render)


def _mask3(mask: np.ndarray, n: int) -> np.ndarray:
    return np.broadcast_to(mask, (n, *mask.shape[-2:])) if mask.ndim == 2 else mask


@alg("ImageCollection.load")
def _load_collection(ev: Any, name: str, a: dict[str, Any]) -> Coll:
    cid = str(a["id"])
    records = ev.catalog.get(cid)
    if records is None:
        raise EvalError(
            f"ImageCollection.load: ImageCollection asset '{cid}' not found "
            "(does not exist or caller does not have access).",
            code=400,
        )
    return Coll([record_image(r) for r in records], cid=cid)


@alg("Image.load")
def _load_image(ev: Any, name: str, a: dict[str, Any]) -> Img:
    record = ev.catalog.image(str(a["id"]))
    if record is None:
        raise EvalError(
            f"Image.load: Image asset '{a['id']}' not found "
            "(does not exist or caller does not have access)."
        )
    return record_image(record)


@alg("ImageCollection.fromImages")
def _from_images(ev: Any, name: str, a: dict[str, Any]) -> Coll:
    return Coll([as_image(i, name, "images") for i in a["images"]])


@alg("ImageCollection.mosaic")
def _mosaic(ev: Any, name: str, a: dict[str, Any]) -> Img:
    images = as_coll(a["collection"], name, "collection").images
    if not images:
        return _empty_image()
    if len(images) == 1:
        img = images[0]
        return img.derive(props={}, record=None)
    names = images[0].bands
    dtype = np.result_type(*[i.dtype for i in images])
    layers = []
    for img in images:
        if all(b in img.bands for b in names):
            layers.append((img, [img.bands.index(b) for b in names]))

    def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        data = np.zeros((len(bands), grid.height, grid.width), dtype=dtype)
        mask = np.zeros_like(data, dtype=bool)
        for img, index in layers:  # later images on top
            d, m = img.render(grid, [index[b] for b in bands])
            m = _mask3(m, len(bands))
            np.copyto(data, d, where=m, casting="unsafe")
            mask |= m
        return data, mask

    footprints = [i.footprint for i in images]
    footprint = None if any(f is None for f in footprints) else unary_union(footprints)
    return Img(bands=names, dtype=dtype, props={}, render=render, footprint=footprint)


@alg("Image.select")
def _select(ev: Any, name: str, a: dict[str, Any]) -> Img:
    img = as_image(a["input"], name, "input")
    selectors = a["bandSelectors"]
    selectors = selectors if isinstance(selectors, list) else [selectors]
    new_names = a.get("newNames")
    return img.select(
        selectors, new_names if isinstance(new_names, list) or new_names is None else [new_names]
    )


@alg("Image.rename")
def _rename(ev: Any, name: str, a: dict[str, Any]) -> Img:
    img = as_image(a["input"], name, "input")
    names = a["names"] if isinstance(a["names"], list) else [a["names"]]
    if len(names) != len(img.bands):
        raise EvalError(f"Image.rename: Can't rename {len(img.bands)} bands to {len(names)} names.")
    return img.derive(bands=tuple(str(n) for n in names))


@alg("Image.bandNames")
def _band_names(ev: Any, name: str, a: dict[str, Any]) -> list[str]:
    return list(as_image(a["image"], name, "image").bands)


@alg("Image.constant")
def _constant(ev: Any, name: str, a: dict[str, Any]) -> Img:
    return constant_image(a["value"])


def _per_band(value: Any, n: int, default: float, what: str) -> list[float]:
    if value is None:
        return [default] * n
    if isinstance(value, str):
        value = [float(v) for v in value.split(",")]
    values = value if isinstance(value, list) else [value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise EvalError(f"Image.visualize: Invalid {what} {value!r}.") from None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise EvalError(f"Image.visualize: Expected 1 or {n} {what} values, got {len(values)}.")
    return values


def _palette(colors: Any) -> np.ndarray:
    if isinstance(colors, str):
        colors = colors.split(",")
    out = []
    named = {
        "black": "000000",
        "white": "ffffff",
        "red": "ff0000",
        "green": "00ff00",
        "blue": "0000ff",
    }
    for c in colors:
        text = named.get(str(c).strip().lower(), str(c).strip().lstrip("#"))
        if len(text) == 3:
            text = "".join(ch * 2 for ch in text)
        try:
            out.append([int(text[i : i + 2], 16) for i in (0, 2, 4)])
        except ValueError:
            raise EvalError(f"Image.visualize: Invalid palette color '{c}'.") from None
    return np.asarray(out, dtype=np.float64)


def visualize_image(
    image: Img,
    bands: Any = None,
    vmin: Any = None,
    vmax: Any = None,
    gamma: Any = None,
    palette: Any = None,
    gain: Any = None,
    bias: Any = None,
    opacity: Any = None,
) -> Img:
    """Image.visualize: 8-bit RGB (or gray) bands ``vis-*`` scaled from [min, max]."""
    if bands is not None:
        sel = bands.split(",") if isinstance(bands, str) else bands
        image = image.select([s.strip() if isinstance(s, str) else s for s in sel], None)
    n = len(image.bands)
    if n not in (1, 3):
        raise EvalError(
            f"Image.visualize: Cannot visualize {n} bands; use 1 or 3 bands "
            "(select them with 'bands')."
        )
    if palette is not None and n != 1:
        raise EvalError("Image.visualize: Can't specify a palette with more than 1 band.")
    if gain is not None or bias is not None:
        g = _per_band(gain, n, 1.0, "gain")
        b = _per_band(bias, n, 0.0, "bias")
        lo = [-bb / gg for gg, bb in zip(g, b, strict=True)]
        hi = [(255 - bb) / gg for gg, bb in zip(g, b, strict=True)]
    else:
        lo = _per_band(vmin, n, 0.0, "min")
        hi = _per_band(vmax, n, 1.0, "max")
    gammas = _per_band(gamma, n, 1.0, "gamma")
    pal = _palette(palette) if palette is not None else None
    identity = (
        image.dtype == np.uint8
        and pal is None
        and all(v == 0 for v in lo)
        and all(v == 255 for v in hi)
        and all(v == 1 for v in gammas)
    )
    src_render = image.render
    out_bands = (
        ("vis-red", "vis-green", "vis-blue") if (n == 3 or pal is not None) else ("vis-gray",)
    )

    def render(grid: Grid, wanted: list[int]) -> tuple[np.ndarray, np.ndarray]:
        data, mask = src_render(grid, list(range(n)))
        valid = mask if mask.ndim == 2 else mask.all(axis=0)
        if identity:
            out = data
        else:
            out = np.empty(data.shape, dtype=np.uint8)
            for k in range(n):
                span = (hi[k] - lo[k]) or 1e-12
                v = np.clip((data[k].astype(np.float32) - lo[k]) / span, 0, 1)
                if gammas[k] != 1:
                    v = v ** (1.0 / gammas[k])
                if pal is not None:
                    out = np.empty((3, *data.shape[1:]), dtype=np.uint8)
                    stops = np.linspace(0, 1, len(pal))
                    for c in range(3):
                        out[c] = np.rint(np.interp(v, stops, pal[:, c]))
                    break
                out[k] = np.rint(v * 255)
        if opacity is not None and float(opacity) <= 0:
            valid = np.zeros_like(valid)
        if wanted != list(range(out.shape[0])):
            out = out[wanted]
        return out, np.asarray(valid, dtype=bool)

    return Img(
        bands=out_bands,
        dtype=np.dtype(np.uint8),
        props=image.props,
        render=render,
        footprint=image.footprint,
        record=image.record,
    )


@alg("Image.visualize")
def _visualize(ev: Any, name: str, a: dict[str, Any]) -> Img:
    return visualize_image(
        as_image(a["image"], name, "image"),
        bands=a.get("bands"),
        vmin=a.get("min"),
        vmax=a.get("max"),
        gamma=a.get("gamma"),
        palette=a.get("palette"),
        gain=a.get("gain"),
        bias=a.get("bias"),
        opacity=a.get("opacity"),
    )


@alg("Image.clip")
def _clip(ev: Any, name: str, a: dict[str, Any]) -> Img:
    img = as_image(a["input"], name, "input")
    geom = as_geom(a["geometry"], name, "geometry").shape
    parent = img.render

    def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        data, mask = parent(grid, bands)
        shape = _reproject(geom, _from_wgs84(grid.crs))
        inside = ~geometry_mask(
            [shape], out_shape=(grid.height, grid.width), transform=grid.transform
        )
        return data, mask & inside

    footprint = geom if img.footprint is None else img.footprint.intersection(geom)
    return img.derive(render=render, footprint=footprint)


@alg("Image.updateMask")
def _update_mask(ev: Any, name: str, a: dict[str, Any]) -> Img:
    img = as_image(a["image"], name, "image")
    mask_img = as_image(a["mask"], name, "mask")
    if len(mask_img.bands) not in (1, len(img.bands)):
        raise EvalError(
            f"Image.updateMask: Mask has {len(mask_img.bands)} bands, image has {len(img.bands)}."
        )
    parent = img.render

    def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        data, mask = parent(grid, bands)
        md, mm = mask_img.render(grid, [0] if len(mask_img.bands) == 1 else bands)
        new = (md != 0) & _mask3(mm, md.shape[0])
        return data, _mask3(mask, len(bands)) & new

    return img.derive(render=render)


@alg("Image.unmask")
def _unmask(ev: Any, name: str, a: dict[str, Any]) -> Img:
    img = as_image(a["input"], name, "input")
    value = a.get("value") or 0
    parent = img.render

    def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        data, mask = parent(grid, bands)
        data = np.where(_mask3(mask, len(bands)), data, value).astype(img.dtype)
        return data, np.ones((grid.height, grid.width), bool)

    return img.derive(render=render)


def _binary(op: Callable[[np.ndarray, np.ndarray], np.ndarray], out_dtype: Any = None) -> Impl:
    def impl(ev: Any, name: str, a: dict[str, Any]) -> Img:
        i1 = as_image(a["image1"], name, "image1")
        i2 = as_image(a["image2"], name, "image2")
        n1, n2 = len(i1.bands), len(i2.bands)
        if n1 != n2 and 1 not in (n1, n2):
            raise EvalError(f"{name}: Images must have the same number of bands or 1 band.")
        names = i1.bands if n1 >= n2 else i2.bands
        dtype = np.dtype(out_dtype) if out_dtype else np.result_type(i1.dtype, i2.dtype)

        def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
            d1, m1 = i1.render(grid, [0] * len(bands) if n1 == 1 else bands)
            d2, m2 = i2.render(grid, [0] * len(bands) if n2 == 1 else bands)
            with np.errstate(all="ignore"):
                data = op(d1, d2).astype(dtype)
            return data, _mask3(m1, len(bands)) & _mask3(m2, len(bands))

        props = i1.props if isinstance(a["image1"], Img) else {}
        return Img(
            bands=tuple(names), dtype=dtype, props=props, render=render, footprint=i1.footprint
        )

    return impl


for _name, _op, _dt in (
    ("Image.add", np.add, None),
    ("Image.subtract", np.subtract, None),
    ("Image.multiply", np.multiply, None),
    ("Image.divide", np.true_divide, np.float64),
    (
        "Image.bitwiseAnd",
        lambda x, y: np.bitwise_and(x.astype(np.int64), y.astype(np.int64)),
        np.int64,
    ),
    (
        "Image.bitwiseOr",
        lambda x, y: np.bitwise_or(x.astype(np.int64), y.astype(np.int64)),
        np.int64,
    ),
    ("Image.eq", np.equal, np.uint8),
    ("Image.neq", np.not_equal, np.uint8),
    ("Image.lt", np.less, np.uint8),
    ("Image.lte", np.less_equal, np.uint8),
    ("Image.gt", np.greater, np.uint8),
    ("Image.gte", np.greater_equal, np.uint8),
    ("Image.and", lambda x, y: (x != 0) & (y != 0), np.uint8),
    ("Image.or", lambda x, y: (x != 0) | (y != 0), np.uint8),
    ("Image.min", np.minimum, None),
    ("Image.max", np.maximum, None),
):
    ALGORITHMS[_name] = _binary(_op, _dt)


@alg("Image.not")
def _not(ev: Any, name: str, a: dict[str, Any]) -> Img:
    img = as_image(a["value"], name, "value")
    parent = img.render

    def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
        data, mask = parent(grid, bands)
        return (data == 0).astype(np.uint8), mask

    return img.derive(render=render, dtype=np.dtype(np.uint8))


def _cast(dtype: Any) -> Impl:
    def impl(ev: Any, name: str, a: dict[str, Any]) -> Img:
        img = as_image(a["value"], name, "value")
        parent = img.render
        target = np.dtype(dtype)

        def render(grid: Grid, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
            data, mask = parent(grid, bands)
            if target.kind in "ui" and data.dtype.kind == "f":
                info = np.iinfo(target)
                data = np.clip(np.rint(data), info.min, info.max)
            return data.astype(target), mask

        return img.derive(render=render, dtype=target)

    return impl


_casts: tuple[tuple[str, Any], ...] = (
    ("Image.toByte", np.uint8),
    ("Image.toUint8", np.uint8),
    ("Image.toInt16", np.int16),
    ("Image.toUint16", np.uint16),
    ("Image.toInt32", np.int32),
    ("Image.toInt", np.int32),
    ("Image.toFloat", np.float32),
    ("Image.toDouble", np.float64),
)
for _name, _target in _casts:
    ALGORITHMS[_name] = _cast(_target)


@alg("Image.reproject", "Image.setDefaultProjection", "Image.resample")
def _pass_through(ev: Any, name: str, a: dict[str, Any]) -> Img:
    # Pixels are always computed in the request's grid, so these change nothing here.
    key = "image" if "image" in a else "input"
    return as_image(a[key], name, key)


@alg("Image.date")
def _image_date(ev: Any, name: str, a: dict[str, Any]) -> EEDate:
    img = as_image(a["image"], name, "image")
    t = img.props.get("system:time_start")
    if t is None:
        raise EvalError("Image.date: Image has no 'system:time_start' property.")
    return EEDate(int(t))


@alg("Image.geometry", "Element.geometry", "Feature.geometry")
def _geometry(ev: Any, name: str, a: dict[str, Any]) -> Geom | None:
    element = a.get("feature", a.get("element", a.get("image")))
    if isinstance(element, Img):
        return Geom(element.footprint) if element.footprint is not None else None
    if isinstance(element, Feature):
        return element.geometry
    raise EvalError(f"{name}: Invalid type: expected Element, got {_type_name(element)}.")


# -- elements and properties ---------------------------------------------------------------
@alg("Element.get")
def _get(ev: Any, name: str, a: dict[str, Any]) -> Any:
    obj = a["object"]
    if isinstance(obj, dict):
        return obj.get(a["property"])
    if not isinstance(obj, Img | Feature | Coll):
        raise EvalError(f"Element.get: Invalid type: expected Element, got {_type_name(obj)}.")
    return obj.props.get(str(a["property"]))


@alg("Element.propertyNames")
def _property_names(ev: Any, name: str, a: dict[str, Any]) -> list[str]:
    obj = a["element"]
    if not isinstance(obj, Img | Feature | Coll):
        raise EvalError(f"{name}: Invalid type: expected Element, got {_type_name(obj)}.")
    return list(obj.props)


@alg("Element.toDictionary")
def _to_dictionary(ev: Any, name: str, a: dict[str, Any]) -> dict[str, Any]:
    obj = a["element"]
    props = obj.props if isinstance(obj, Img | Feature | Coll) else {}
    keys = a.get("properties")
    return {k: v for k, v in props.items() if keys is None or k in keys}


@alg("Element.set")
def _set(ev: Any, name: str, a: dict[str, Any]) -> Any:
    return _with_props(a["object"], {str(a["key"]): a.get("value")}, name)


@alg("Element.setMulti")
def _set_multi(ev: Any, name: str, a: dict[str, Any]) -> Any:
    return _with_props(a["object"], dict(a["properties"]), name)


def _with_props(obj: Any, new: dict[str, Any], name: str) -> Any:
    if isinstance(obj, Img):
        return obj.derive(props={**obj.props, **new})
    if isinstance(obj, Feature):
        return Feature(obj.geometry, {**obj.props, **new})
    if isinstance(obj, Coll):
        return Coll(obj.images, obj.cid, {**obj.props, **new})
    raise EvalError(f"{name}: Invalid type: expected Element, got {_type_name(obj)}.")


@alg("Feature")
def _feature(ev: Any, name: str, a: dict[str, Any]) -> Feature:
    geom = a.get("geometry")
    return Feature(
        as_geom(geom, name, "geometry") if geom is not None else None, dict(a.get("metadata") or {})
    )


# -- collections ---------------------------------------------------------------------------
@alg("Collection.filter")
def _filter(ev: Any, name: str, a: dict[str, Any]) -> Coll:
    coll = as_coll(a["collection"], name, "collection")
    flt = a["filter"]
    if not isinstance(flt, Filter):
        raise EvalError(
            f"{name}: Invalid type for 'filter': expected Filter, got {_type_name(flt)}."
        )
    return Coll([i for i in coll.images if flt.test(i)], coll.cid, coll.props)


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (2, 0)
    if isinstance(value, int | float):
        return (0, value)
    return (1, str(value))


@alg("Collection.limit")
def _limit(ev: Any, name: str, a: dict[str, Any]) -> Coll:
    coll = as_coll(a["collection"], name, "collection")
    images = list(coll.images)
    key = a.get("key")
    if key is not None:
        ascending = a.get("ascending")
        ascending = True if ascending is None else bool(ascending)
        present = [i for i in images if i.props.get(key) is not None]
        missing = [i for i in images if i.props.get(key) is None]
        present.sort(key=lambda i: _sort_key(i.props.get(key)), reverse=not ascending)
        images = present + missing
    limit = a.get("limit")
    if limit is not None:
        images = images[: max(int(limit), 0)]
    return Coll(images, coll.cid, coll.props)


@alg("Collection.first")
def _first(ev: Any, name: str, a: dict[str, Any]) -> Img | None:
    images = as_coll(a["collection"], name, "collection").images
    return images[0] if images else None


@alg("Collection.size")
def _size(ev: Any, name: str, a: dict[str, Any]) -> int:
    return len(as_coll(a["collection"], name, "collection").images)


@alg("Collection.toList")
def _to_list(ev: Any, name: str, a: dict[str, Any]) -> list[Img]:
    images = as_coll(a["collection"], name, "collection").images
    offset = int(a.get("offset") or 0)
    return images[offset : offset + int(a["count"])]


@alg("Collection.map")
def _map(ev: Any, name: str, a: dict[str, Any]) -> Coll:
    coll = as_coll(a["collection"], name, "collection")
    fn = a["baseAlgorithm"]
    if not isinstance(fn, Closure):
        raise EvalError(f"{name}: 'baseAlgorithm' must be a function.")
    out = [fn(i) for i in coll.images]
    if a.get("dropNulls"):
        out = [o for o in out if o is not None]
    return Coll([as_image(o, name, "result") for o in out], coll.cid, coll.props)


@alg("Collection.geometry")
def _coll_geometry(ev: Any, name: str, a: dict[str, Any]) -> Geom:
    images = as_coll(a["collection"], name, "collection").images
    shapes = [i.footprint for i in images if i.footprint is not None]
    return Geom(unary_union(shapes) if shapes else sg.GeometryCollection())


@alg("AggregateFeatureCollection.array")
def _aggregate_array(ev: Any, name: str, a: dict[str, Any]) -> list[Any]:
    coll = as_coll(a["collection"], name, "collection")
    prop = str(a["property"])
    return [i.props[prop] for i in coll.images if i.props.get(prop) is not None]


_AGGREGATES: dict[str, Callable[[list[Any]], Any]] = {
    "first": lambda v: v[0] if v else None,
    "count": len,
    "min": lambda v: min(v) if v else None,
    "max": lambda v: max(v) if v else None,
    "sum": lambda v: sum(v),
    "mean": lambda v: sum(v) / len(v) if v else None,
    "count_distinct": lambda v: len(set(map(json.dumps, v))),
}


def _aggregate(kind: str) -> Impl:
    def impl(ev: Any, name: str, a: dict[str, Any]) -> Any:
        coll = as_coll(a["collection"], name, "collection")
        prop = str(a["property"])
        values = [i.props[prop] for i in coll.images if i.props.get(prop) is not None]
        try:
            return _AGGREGATES[kind](values)
        except TypeError:
            raise EvalError(f"{name}: property '{prop}' is not a number.") from None

    return impl


for _kind in _AGGREGATES:
    ALGORITHMS[f"AggregateFeatureCollection.{_kind}"] = _aggregate(_kind)


@alg("Dictionary.get", "Dictionary.getNumber", "Dictionary.getString")
def _dict_get(ev: Any, name: str, a: dict[str, Any]) -> Any:
    d, key = a["dictionary"], a["key"]
    if not isinstance(d, dict):
        raise EvalError(f"{name}: Invalid type: expected Dictionary, got {_type_name(d)}.")
    if key not in d:
        if "defaultValue" in a:
            return a["defaultValue"]
        raise EvalError(f"{name}: Dictionary does not contain key: '{key}'.")
    return d[key]


def _number_op(fn: Callable[..., Any], unary: bool = False) -> Impl:
    def impl(ev: Any, name: str, a: dict[str, Any]) -> Any:
        values = [a["input"]] if unary else [a["left"], a["right"]]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise EvalError(f"{name}: Invalid type: expected Number, got {_type_name(v)}.")
        try:
            result = fn(*values)
        except ZeroDivisionError:
            return 0
        return int(result) if isinstance(result, bool) else result

    return impl


for _n, _f in (
    ("add", lambda x, y: x + y),
    ("subtract", lambda x, y: x - y),
    ("multiply", lambda x, y: x * y),
    ("divide", lambda x, y: x / y),
    ("eq", lambda x, y: x == y),
    ("neq", lambda x, y: x != y),
    ("lt", lambda x, y: x < y),
    ("lte", lambda x, y: x <= y),
    ("gt", lambda x, y: x > y),
    ("gte", lambda x, y: x >= y),
    ("and", lambda x, y: bool(x) and bool(y)),
    ("or", lambda x, y: bool(x) or bool(y)),
    ("min", min),
    ("max", max),
):
    ALGORITHMS[f"Number.{_n}"] = _number_op(_f)
_unary: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("not", lambda x: not x),
    ("floor", lambda x: int(np.floor(x))),
    ("round", lambda x: int(np.floor(x + 0.5))),
    ("int", int),
    ("toInt", int),
    ("long", int),
    ("toLong", int),
    ("float", float),
    ("toFloat", float),
    ("double", float),
    ("toDouble", float),
)
for _n, _u in _unary:
    ALGORITHMS[f"Number.{_n}"] = _number_op(_u, unary=True)


@alg("List.get")
def _list_get(ev: Any, name: str, a: dict[str, Any]) -> Any:
    items, index = a["list"], int(a["index"])
    if not isinstance(items, list):
        raise EvalError(f"List.get: Invalid type: expected List, got {_type_name(items)}.")
    if not -len(items) <= index < len(items):
        raise EvalError(f"List.get: List index must be between {-len(items)} and {len(items) - 1}.")
    return items[index]


@alg("List.size", "List.length")
def _list_size(ev: Any, name: str, a: dict[str, Any]) -> int:
    return len(a["list"])


# -- filters --------------------------------------------------------------------------------
def _operands(a: dict[str, Any]) -> Callable[[Any], tuple[Any, Any]]:
    left_field, right_field = a.get("leftField"), a.get("rightField")
    left_value, right_value = a.get("leftValue"), a.get("rightValue")

    def get(element: Any) -> tuple[Any, Any]:
        left = _prop(element, left_field) if left_field is not None else left_value
        right = _prop(element, right_field) if right_field is not None else right_value
        return left, right

    return get


def _compare(test: Callable[[Any, Any], bool]) -> Impl:
    def impl(ev: Any, name: str, a: dict[str, Any]) -> Filter:
        get = _operands(a)

        def run(element: Any) -> bool:
            left, right = get(element)
            if left is None or right is None:
                return False
            if isinstance(left, EEDate):
                left = left.millis
            if isinstance(right, EEDate):
                right = right.millis
            try:
                return bool(test(left, right))
            except TypeError:
                return False

        return Filter(run)

    return impl


for _names, _test in (
    (("Filter.equals", "Filter.eq"), lambda x, y: x == y),
    (("Filter.notEquals", "Filter.neq"), lambda x, y: x != y),
    (("Filter.lessThan", "Filter.lt"), lambda x, y: x < y),
    (("Filter.lessThanOrEquals", "Filter.lte"), lambda x, y: x <= y),
    (("Filter.greaterThan", "Filter.gt"), lambda x, y: x > y),
    (("Filter.greaterThanOrEquals", "Filter.gte"), lambda x, y: x >= y),
    (("Filter.inList",), lambda x, y: x in y),
    (("Filter.listContains",), lambda x, y: y in x),
    (("Filter.stringContains",), lambda x, y: str(y) in str(x)),
    (("Filter.stringStartsWith",), lambda x, y: str(x).startswith(str(y))),
    (("Filter.stringEndsWith",), lambda x, y: str(x).endswith(str(y))),
):
    for _n in _names:
        ALGORITHMS[_n] = _compare(_test)


@alg("Filter.intersects")
def _intersects(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    get = _operands(a)

    def run(element: Any) -> bool:
        left, right = get(element)
        if left is None or right is None:
            return False
        g1, g2 = as_geom(left, name, "left"), as_geom(right, name, "right")
        return bool(g1.shape.intersects(g2.shape))

    return Filter(run)


@alg("Filter.dateRangeContains")
def _date_range_contains(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    get = _operands(a)

    def run(element: Any) -> bool:
        rng, t = get(element)
        if rng is None or t is None:
            return False
        if not isinstance(rng, DateRange):
            raise EvalError(f"{name}: Invalid type: expected DateRange, got {_type_name(rng)}.")
        ms = as_millis(t, name)
        return rng.start <= ms < rng.end

    return Filter(run)


@alg("Filter.rangeContains")
def _range_contains(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    field, lo, hi = str(a["field"]), a["minValue"], a["maxValue"]

    def run(element: Any) -> bool:
        v = _prop(element, field)
        try:
            return v is not None and lo <= v <= hi
        except TypeError:
            return False

    return Filter(run)


@alg("Filter.calendarRange")
def _calendar_range(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    start = int(a["start"])
    end = int(a["end"]) if a.get("end") is not None else start
    field = str(a.get("field") or "day_of_year")

    def run(element: Any) -> bool:
        t = _prop(element, "system:time_start")
        if t is None:
            return False
        dt = datetime.fromtimestamp(int(t) / 1000, UTC)
        value = {
            "year": dt.year,
            "month": dt.month,
            "day_of_month": dt.day,
            "day_of_year": dt.timetuple().tm_yday,
            "hour": dt.hour,
            "minute": dt.minute,
        }.get(field)
        if value is None:
            raise EvalError(f"Filter.calendarRange: Unknown field '{field}'.")
        return start <= value <= end if start <= end else (value >= start or value <= end)

    return Filter(run)


@alg("Filter.and")
def _and(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    filters = list(a["filters"])
    return Filter(lambda e: all(f.test(e) for f in filters))


@alg("Filter.or")
def _or(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    filters = list(a["filters"])
    return Filter(lambda e: any(f.test(e) for f in filters))


@alg("Filter.not")
def _filter_not(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    inner = a["filter"]
    return Filter(lambda e: not inner.test(e))


@alg("Filter.always")
def _always(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    return Filter(lambda e: True)


@alg("Filter.notNull")
def _not_null(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    props = list(a["properties"])
    return Filter(lambda e: all(_prop(e, p) is not None for p in props))


# -- dates -----------------------------------------------------------------------------------
@alg("Date")
def _date(ev: Any, name: str, a: dict[str, Any]) -> EEDate:
    return EEDate(as_millis(a["value"], name))


@alg("Date.millis")
def _millis(ev: Any, name: str, a: dict[str, Any]) -> int:
    return as_millis(a["date"], name)


@alg("Date.fromYMD")
def _from_ymd(ev: Any, name: str, a: dict[str, Any]) -> EEDate:
    dt = datetime(int(a["year"]), int(a["month"]), int(a["day"]), tzinfo=UTC)
    return EEDate(int(dt.timestamp() * 1000))


@alg("Date.get")
def _date_get(ev: Any, name: str, a: dict[str, Any]) -> int:
    dt = datetime.fromtimestamp(as_millis(a["date"], name) / 1000, UTC)
    unit = str(a["unit"]).lower().rstrip("s")
    if unit not in ("year", "month", "day", "hour", "minute", "second"):
        raise EvalError(f"Date.get: Unknown unit '{a['unit']}'.")
    return int(getattr(dt, unit))


@alg("Date.advance")
def _advance(ev: Any, name: str, a: dict[str, Any]) -> EEDate:
    ms = as_millis(a["date"], name)
    delta, unit = float(a["delta"]), str(a["unit"]).lower().rstrip("s")
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    if unit in ("year", "month"):
        months = int(delta) * (12 if unit == "year" else 1)
        y, m = divmod(dt.month - 1 + months, 12)
        dt = dt.replace(year=dt.year + y, month=m + 1)
        return EEDate(int(dt.timestamp() * 1000))
    seconds = {"week": 604800, "day": 86400, "hour": 3600, "minute": 60, "second": 1}.get(unit)
    if seconds is None:
        raise EvalError(f"Date.advance: Unknown unit '{a['unit']}'.")
    return EEDate(ms + int(delta * seconds * 1000))


@alg("DateRange")
def _date_range(ev: Any, name: str, a: dict[str, Any]) -> DateRange:
    start = as_millis(a["start"], name)
    end = as_millis(a["end"], name) if a.get("end") is not None else start + 1
    return DateRange(start, end)


@alg("DateRange.start")
def _dr_start(ev: Any, name: str, a: dict[str, Any]) -> EEDate:
    return EEDate(a["dateRange"].start)


@alg("DateRange.end")
def _dr_end(ev: Any, name: str, a: dict[str, Any]) -> EEDate:
    return EEDate(a["dateRange"].end)


# -- geometry -------------------------------------------------------------------------------
@alg("Projection")
def _projection(ev: Any, name: str, a: dict[str, Any]) -> dict[str, Any]:
    crs = str(a["crs"])
    try:
        crs_of(crs)
    except Exception:  # noqa: BLE001 - CRS errors
        raise EvalError(f"Projection: Unknown projection '{crs}'.") from None
    return {"type": "Projection", "crs": crs, "transform": a.get("transform") or [1, 0, 0, 0, 1, 0]}


def _coords(a: dict[str, Any], name: str) -> Any:
    coords = a["coordinates"]
    if not isinstance(coords, list):
        raise EvalError(f"{name}: Invalid coordinates {coords!r}.")
    return coords


def _geometry_ctor(build: Callable[[Any], Any]) -> Impl:
    def impl(ev: Any, name: str, a: dict[str, Any]) -> Geom:
        try:
            shape = build(_coords(a, name))
        except (TypeError, ValueError, IndexError) as e:
            raise EvalError(f"{name}: Invalid geometry: {e}") from None
        return _in_wgs84(shape, a.get("crs"))

    return impl


def _rectangle(c: Any) -> Any:
    if len(c) == 2 and all(isinstance(p, list) for p in c):
        c = [*c[0], *c[1]]
    if len(c) != 4:
        raise ValueError("a rectangle needs [xmin, ymin, xmax, ymax]")
    x0, y0, x1, y1 = map(float, c)
    return sg.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _polygon(c: Any) -> Any:
    rings = c if c and isinstance(c[0][0], list) else [c]
    return sg.Polygon(rings[0], rings[1:])


ALGORITHMS["GeometryConstructors.Point"] = _geometry_ctor(lambda c: sg.Point(*map(float, c)))
ALGORITHMS["GeometryConstructors.MultiPoint"] = _geometry_ctor(sg.MultiPoint)
ALGORITHMS["GeometryConstructors.LineString"] = _geometry_ctor(sg.LineString)
ALGORITHMS["GeometryConstructors.LinearRing"] = _geometry_ctor(sg.LinearRing)
ALGORITHMS["GeometryConstructors.MultiLineString"] = _geometry_ctor(sg.MultiLineString)
ALGORITHMS["GeometryConstructors.Rectangle"] = _geometry_ctor(_rectangle)
ALGORITHMS["GeometryConstructors.Polygon"] = _geometry_ctor(_polygon)
ALGORITHMS["GeometryConstructors.MultiPolygon"] = _geometry_ctor(
    lambda c: sg.MultiPolygon([_polygon(p) for p in c])
)


@alg("GeometryConstructors.BBox")
def _bbox(ev: Any, name: str, a: dict[str, Any]) -> Geom:
    return Geom(sg.box(float(a["west"]), float(a["south"]), float(a["east"]), float(a["north"])))


@alg("Geometry.bounds")
def _bounds(ev: Any, name: str, a: dict[str, Any]) -> Geom:
    return Geom(sg.box(*as_geom(a["geometry"], name, "geometry").shape.bounds))
