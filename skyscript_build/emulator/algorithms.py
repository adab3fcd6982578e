"""The Earth Engine algorithms the emulator implements (the subset imagery backends send).

Each implementation takes ``(evaluator, name, args)`` with the evaluated arguments by name.
Required arguments are checked first against ``ee``'s own algorithm list, so a null where an
image is required gets Earth Engine's ``"<Algorithm>: Parameter '<name>' is required."``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import shapely
from pyproj import Transformer
from shapely import geometry as sg

from .collections import parse_time_ms
from .pixels import crs_of
from .values import Coll, EEDate, EvalError, Feature, Geom, Img

__all__ = ["ALGORITHMS", "alg", "check_required", "required_arguments"]

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
def type_name(value: Any) -> str:
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
        from .alg_images import constant_image

        return constant_image(value)
    raise EvalError(f"{name}: Invalid type for '{arg}': expected Image, got {type_name(value)}.")


def as_coll(value: Any, name: str, arg: str) -> Coll:
    """A collection argument."""
    if isinstance(value, Coll):
        return value
    raise EvalError(
        f"{name}: Invalid type for '{arg}': expected Collection, got {type_name(value)}."
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
    raise EvalError(f"{name}: Invalid type for '{arg}': expected Geometry, got {type_name(value)}.")


def as_millis(value: Any, name: str) -> int:
    """A date argument (Date, number of ms, or ISO 8601 string) in ms."""
    if isinstance(value, EEDate):
        return value.millis
    try:
        return parse_time_ms(value)
    except (ValueError, TypeError):
        raise EvalError(f"{name}: Unable to parse date '{value}'.") from None


def reproject_shape(shape: Any, transformer: Transformer) -> Any:
    def fn(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(shape, fn)


@lru_cache(maxsize=64)
def to_wgs84(crs: str) -> Transformer:
    return Transformer.from_crs(crs_of(crs), "EPSG:4326", always_xy=True)


@lru_cache(maxsize=64)
def from_wgs84(crs: str) -> Transformer:
    return Transformer.from_crs("EPSG:4326", crs_of(crs), always_xy=True)


def _crs_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "crs" in value:
        return str(value["crs"])
    raise EvalError(f"Invalid projection {value!r}.")


def geom_in_wgs84(shape: Any, crs: Any) -> Geom:
    text = _crs_text(crs)
    if text and text.upper() not in ("EPSG:4326", "WGS84"):
        try:
            shape = reproject_shape(shape, to_wgs84(text))
        except Exception:  # noqa: BLE001 - pyproj/rasterio CRS errors
            raise EvalError(f"Projection: Unknown projection '{text}'.") from None
    return Geom(shape)


def element_property(element: Any, field: str) -> Any:
    if field in (".all", ".geo"):
        if isinstance(element, Img):
            return Geom(element.footprint) if element.footprint is not None else None
        if isinstance(element, Feature):
            return element.geometry
        return None
    props = element.props if isinstance(element, Img | Feature | Coll) else {}
    return props.get(field)


# The implementations register themselves on import.
from . import alg_collections, alg_images, alg_values  # noqa: E402, F401
