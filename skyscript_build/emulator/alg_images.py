"""Image algorithms: loading, mosaics, band selection, visualisation, masks, pixel maths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from rasterio.features import geometry_mask
from shapely.ops import unary_union

from .algorithms import (
    ALGORITHMS,
    Impl,
    alg,
    as_coll,
    as_geom,
    as_image,
    from_wgs84,
    reproject_shape,
    type_name,
)
from .collections import ImageRecord
from .pixels import Grid, read_record
from .values import Coll, EEDate, EvalError, Feature, Geom, Img

__all__ = ["record_image", "constant_image", "visualize_image"]


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


def _visual_ranges(
    n: int, vmin: Any, vmax: Any, gain: Any, bias: Any
) -> tuple[list[float], list[float]]:
    """Per band, the values mapped to 0 and 255: ``min``/``max``, or from ``gain``/``bias``."""
    if gain is not None or bias is not None:
        g = _per_band(gain, n, 1.0, "gain")
        b = _per_band(bias, n, 0.0, "bias")
        lo = [-bb / gg for gg, bb in zip(g, b, strict=True)]
        hi = [(255 - bb) / gg for gg, bb in zip(g, b, strict=True)]
        return lo, hi
    return _per_band(vmin, n, 0.0, "min"), _per_band(vmax, n, 1.0, "max")


def _to_uint8(
    data: np.ndarray, lo: list[float], hi: list[float], gammas: list[float],
    pal: np.ndarray | None,
) -> np.ndarray:  # fmt: skip
    """Bands scaled from [lo, hi] to 0..255, with gamma; one band through ``pal`` to RGB."""
    n = data.shape[0]
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
            return out
        out[k] = np.rint(v * 255)
    return out


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
    lo, hi = _visual_ranges(n, vmin, vmax, gain, bias)
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
        out = data if identity else _to_uint8(data, lo, hi, gammas, pal)
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
        shape = reproject_shape(geom, from_wgs84(grid.crs))
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
    raise EvalError(f"{name}: Invalid type: expected Element, got {type_name(element)}.")
