"""Date, geometry, number and dictionary algorithms."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from shapely import geometry as sg

from .algorithms import (
    ALGORITHMS,
    Impl,
    alg,
    as_geom,
    as_millis,
    geom_in_wgs84,
    type_name,
)
from .pixels import crs_of
from .values import DateRange, EEDate, EvalError, Geom

__all__: list[str] = []


@alg("Dictionary.get", "Dictionary.getNumber", "Dictionary.getString")
def _dict_get(ev: Any, name: str, a: dict[str, Any]) -> Any:
    d, key = a["dictionary"], a["key"]
    if not isinstance(d, dict):
        raise EvalError(f"{name}: Invalid type: expected Dictionary, got {type_name(d)}.")
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
                raise EvalError(f"{name}: Invalid type: expected Number, got {type_name(v)}.")
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
        return geom_in_wgs84(shape, a.get("crs"))

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
