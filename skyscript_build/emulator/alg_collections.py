"""Collection, element and filter algorithms."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from shapely import geometry as sg
from shapely.ops import unary_union

from .algorithms import (
    ALGORITHMS,
    Impl,
    alg,
    as_coll,
    as_geom,
    as_image,
    as_millis,
    element_property,
    type_name,
)
from .values import Closure, Coll, DateRange, EEDate, EvalError, Feature, Filter, Geom, Img

__all__: list[str] = []


# -- elements and properties ---------------------------------------------------------------
@alg("Element.get")
def _get(ev: Any, name: str, a: dict[str, Any]) -> Any:
    obj = a["object"]
    if isinstance(obj, dict):
        return obj.get(a["property"])
    if not isinstance(obj, Img | Feature | Coll):
        raise EvalError(f"Element.get: Invalid type: expected Element, got {type_name(obj)}.")
    return obj.props.get(str(a["property"]))


@alg("Element.propertyNames")
def _property_names(ev: Any, name: str, a: dict[str, Any]) -> list[str]:
    obj = a["element"]
    if not isinstance(obj, Img | Feature | Coll):
        raise EvalError(f"{name}: Invalid type: expected Element, got {type_name(obj)}.")
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
    raise EvalError(f"{name}: Invalid type: expected Element, got {type_name(obj)}.")


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
            f"{name}: Invalid type for 'filter': expected Filter, got {type_name(flt)}."
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


@alg("List.get")
def _list_get(ev: Any, name: str, a: dict[str, Any]) -> Any:
    items, index = a["list"], int(a["index"])
    if not isinstance(items, list):
        raise EvalError(f"List.get: Invalid type: expected List, got {type_name(items)}.")
    if not -len(items) <= index < len(items):
        raise EvalError(f"List.get: List index must be between {-len(items)} and {len(items) - 1}.")
    return items[index]


@alg("List.map")
def _list_map(ev: Any, name: str, a: dict[str, Any]) -> list[Any]:
    items, fn = a["list"], a["baseAlgorithm"]
    if not isinstance(items, list):
        raise EvalError(f"List.map: Invalid type: expected List, got {type_name(items)}.")
    if not isinstance(fn, Closure):
        raise EvalError(f"{name}: 'baseAlgorithm' must be a function.")
    out = [fn(i) for i in items]
    return [o for o in out if o is not None] if a.get("dropNulls") else out


@alg("List.size", "List.length")
def _list_size(ev: Any, name: str, a: dict[str, Any]) -> int:
    return len(a["list"])


# -- filters --------------------------------------------------------------------------------
def _operands(a: dict[str, Any]) -> Callable[[Any], tuple[Any, Any]]:
    left_field, right_field = a.get("leftField"), a.get("rightField")
    left_value, right_value = a.get("leftValue"), a.get("rightValue")

    def get(element: Any) -> tuple[Any, Any]:
        left = element_property(element, left_field) if left_field is not None else left_value
        right = element_property(element, right_field) if right_field is not None else right_value
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
            raise EvalError(f"{name}: Invalid type: expected DateRange, got {type_name(rng)}.")
        ms = as_millis(t, name)
        return rng.start <= ms < rng.end

    return Filter(run)


@alg("Filter.rangeContains")
def _range_contains(ev: Any, name: str, a: dict[str, Any]) -> Filter:
    field, lo, hi = str(a["field"]), a["minValue"], a["maxValue"]

    def run(element: Any) -> bool:
        v = element_property(element, field)
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
        t = element_property(element, "system:time_start")
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
    return Filter(lambda e: all(element_property(e, p) is not None for p in props))
