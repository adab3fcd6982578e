"""The values an expression evaluates to, and their ``getInfo`` form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from .collections import ImageRecord

if TYPE_CHECKING:
    from .evaluate import Evaluator
    from .pixels import Grid

__all__ = [
    "EvalError",
    "Closure",
    "Geom",
    "EEDate",
    "DateRange",
    "Feature",
    "Filter",
    "Coll",
    "Img",
    "to_info",
]


class EvalError(Exception):
    """An expression Earth Engine would refuse: answered as HTTP ``code`` with the message."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Closure:
    """A ``functionDefinitionValue``: a user function (e.g. the body of ``map``)."""

    evaluator: Evaluator
    arg_names: list[str]
    body: str
    env: dict[str, Any] | None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        env = dict(self.env or {})
        env.update(zip(self.arg_names, args, strict=False))
        env.update(kwargs)
        return self.evaluator.ref(self.body, env)


@dataclass(frozen=True)
class Geom:
    """A geometry, in EPSG:4326."""

    shape: BaseGeometry

    def info(self) -> dict[str, Any]:
        """GeoJSON, as Earth Engine returns it."""
        return _plain(mapping(self.shape))


@dataclass(frozen=True)
class EEDate:
    """A date: milliseconds since the epoch, UTC."""

    millis: int


@dataclass(frozen=True)
class DateRange:
    """A half-open date range [start, end) in milliseconds."""

    start: int
    end: int


@dataclass
class Feature:
    """A feature: a geometry (or None) and properties."""

    geometry: Geom | None
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Filter:
    """A predicate over elements (images or features)."""

    test: Callable[[Any], bool]


@dataclass
class Coll:
    """An image collection: its images in order, its id and properties."""

    images: list[Img]
    cid: str | None = None
    props: dict[str, Any] = field(default_factory=dict)


RenderFn = Callable[["Grid", list[int]], tuple[np.ndarray, np.ndarray]]


@dataclass
class Img:
    """A lazily rendered image: band names, pixel type, properties and a render function.

    ``render(grid, bands)`` returns the data (k, h, w) of the chosen bands (0-based) and their
    mask, (k, h, w) or (h, w), True where valid.
    """

    bands: tuple[str, ...]
    dtype: np.dtype
    props: dict[str, Any]
    render: RenderFn
    footprint: BaseGeometry | None = None  # EPSG:4326; None means unbounded
    record: ImageRecord | None = None

    def native_grid(self) -> Grid | None:
        """The grid of the underlying raster, when there is exactly one."""
        from affine import Affine

        from .pixels import Grid

        if self.record is None:
            return None
        r = self.record
        return Grid(r.crs, Affine(*r.transform), r.width, r.height)

    def derive(self, **changes: Any) -> Img:
        """A copy with some fields changed."""
        import dataclasses

        return dataclasses.replace(self, **changes)

    def select(self, selectors: list[Any], new_names: list[Any] | None) -> Img:
        """Image.select: bands by name, regular expression or index."""
        import re

        chosen: list[int] = []
        for sel in selectors:
            if isinstance(sel, bool) or not isinstance(sel, int | str):
                raise EvalError(f"Image.select: invalid band selector {sel!r}.")
            if isinstance(sel, int):
                if not 0 <= sel < len(self.bands):
                    raise EvalError(
                        f"Image.select: Band index {sel} out of range [0, {len(self.bands)})."
                    )
                chosen.append(sel)
                continue
            try:
                pattern = re.compile(sel)
            except re.error:
                raise EvalError(f"Image.select: invalid band pattern '{sel}'.") from None
            hits = [i for i, b in enumerate(self.bands) if pattern.fullmatch(b)]
            if not hits:
                raise EvalError(f"Image.select: Pattern '{sel}' did not match any bands.")
            chosen.extend(hits)
        names = [self.bands[i] for i in chosen]
        if new_names:
            if len(new_names) != len(chosen):
                raise EvalError(
                    f"Image.select: Can't rename {len(chosen)} bands to {len(new_names)} names."
                )
            names = [str(n) for n in new_names]
        parent = self.render

        def render(grid: Grid, wanted: list[int]) -> tuple[np.ndarray, np.ndarray]:
            return parent(grid, [chosen[i] for i in wanted])

        return self.derive(bands=tuple(names), render=render)

    def info(self) -> dict[str, Any]:
        """The ``getInfo`` of an image."""
        dtype = np.dtype(self.dtype)
        if dtype.kind in "ui":
            limits = np.iinfo(dtype)
            data_type = {
                "type": "PixelType",
                "precision": "int",
                "min": int(limits.min),
                "max": int(limits.max),
            }
        else:
            data_type = {
                "type": "PixelType",
                "precision": "double" if dtype.itemsize > 4 else "float",
            }
        band = {"data_type": data_type, "crs": "EPSG:4326", "crs_transform": [1, 0, 0, 0, 1, 0]}
        if self.record is not None:
            r = self.record
            band.update(crs=r.crs, crs_transform=list(r.transform), dimensions=[r.width, r.height])
        out: dict[str, Any] = {
            "type": "Image",
            "bands": [{"id": b, **band} for b in self.bands],
        }
        if self.record is not None and self.props.get("system:index") == self.record.index:
            out["id"] = self.record.id
            out["version"] = self.record.time_start * 1000
        if self.props:
            out["properties"] = _plain(self.props)
        return out


def _plain(value: Any) -> Any:
    """JSON-able copy: tuples to lists, numpy scalars to Python."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def to_info(value: Any) -> Any:
    """The JSON a ``value:compute`` answers for ``value`` (what ``getInfo`` returns)."""
    if isinstance(value, Img):
        return value.info()
    if isinstance(value, Coll):
        out: dict[str, Any] = {
            "type": "ImageCollection",
            "bands": [],
            "features": [img.info() for img in value.images],
        }
        if value.cid:
            out["id"] = value.cid
        if value.props:
            out["properties"] = _plain(value.props)
        return out
    if isinstance(value, Geom):
        return value.info()
    if isinstance(value, EEDate):
        return {"type": "Date", "value": value.millis}
    if isinstance(value, DateRange):
        return {"type": "DateRange", "dates": [value.start, value.end]}
    if isinstance(value, Feature):
        return {
            "type": "Feature",
            "geometry": value.geometry.info() if value.geometry else None,
            "properties": _plain(value.props),
        }
    if isinstance(value, Filter | Closure):
        raise EvalError(f"Cannot compute the value of a {type(value).__name__}.")
    if isinstance(value, dict):
        return {str(k): to_info(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_info(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
