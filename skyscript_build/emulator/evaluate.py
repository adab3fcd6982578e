"""Evaluate the expression graphs the ``ee`` client sends, over the emulator's catalog.

An expression is ``{"result": KEY, "values": {KEY: VALUE, ...}}`` where a VALUE is one of
``constantValue``, ``integerValue``, ``arrayValue``, ``dictionaryValue``, ``valueReference``,
``functionInvocationValue`` (``functionName`` + named ``arguments``),
``functionDefinitionValue`` and ``argumentReference`` (``ee/serializer.py``). Algorithms are
implemented in ``algorithms.py``; anything else is answered with Earth Engine's 400 error.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
from affine import Affine

from .collections import Catalog
from .values import Closure, EvalError, Img, to_info

__all__ = ["EvalError", "Evaluator", "compute_value", "compute_pixels"]


class Evaluator:
    """Evaluates one expression graph; caches every value it computes."""

    def __init__(self, catalog: Catalog, expression: dict[str, Any]) -> None:
        if not isinstance(expression, dict) or "values" not in expression:
            raise EvalError("Invalid expression: missing 'values'.")
        self.catalog = catalog
        self.values: dict[str, Any] = expression["values"]
        self.result_key = str(expression.get("result", "0"))
        self._cache: dict[str, Any] = {}
        self._active: set[tuple[str, int]] = set()

    def result(self) -> Any:
        """The value of the whole expression."""
        return self.ref(self.result_key, None)

    def ref(self, key: str, env: dict[str, Any] | None) -> Any:
        """The value of ``values[key]`` (cached when it does not depend on arguments)."""
        if env is None and key in self._cache:
            return self._cache[key]
        if key not in self.values:
            raise EvalError(f"Invalid expression: reference to missing value '{key}'.")
        if (key, id(env)) in self._active:
            raise EvalError(f"Invalid expression: value '{key}' refers to itself.")
        self._active.add((key, id(env)))
        try:
            value = self.node(self.values[key], env)
        finally:
            self._active.discard((key, id(env)))
        if env is None:
            self._cache[key] = value
        return value

    def node(self, node: Any, env: dict[str, Any] | None) -> Any:
        """The value of one node of the graph."""
        if not isinstance(node, dict) or len(node) != 1:
            raise EvalError(f"Invalid expression node: {str(node)[:80]}")
        kind, body = next(iter(node.items()))
        if kind == "constantValue":
            return body
        if kind == "integerValue":
            return int(body)
        if kind == "bytesValue":
            return base64.b64decode(body)
        if kind == "valueReference":
            return self.ref(str(body), env)
        if kind == "arrayValue":
            return [self.node(v, env) for v in body.get("values", [])]
        if kind == "dictionaryValue":
            return {k: self.node(v, env) for k, v in body.get("values", {}).items()}
        if kind == "argumentReference":
            if env is None or body not in env:
                raise EvalError(f"Invalid expression: unbound argument '{body}'.")
            return env[body]
        if kind == "functionDefinitionValue":
            return Closure(self, list(body.get("argumentNames", [])), str(body["body"]), env)
        if kind == "functionInvocationValue":
            return self.invoke(body, env)
        raise EvalError(f"Invalid expression: unknown value kind '{kind}'.")

    def invoke(self, body: dict[str, Any], env: dict[str, Any] | None) -> Any:
        """Call an algorithm (or a user function) with its evaluated arguments."""
        from .algorithms import ALGORITHMS, check_required

        raw_args = body.get("arguments", {})
        if body.get("functionName") == "If":  # lazy: only the chosen branch is evaluated
            cond = self.node(raw_args["condition"], env) if "condition" in raw_args else None
            branch = raw_args.get("trueCase" if _truthy(cond) else "falseCase")
            return None if branch is None else self.node(branch, env)
        args = {k: self.node(v, env) for k, v in raw_args.items()}
        if "functionReference" in body:
            fn = self.ref(str(body["functionReference"]), env)
            if not isinstance(fn, Closure):
                raise EvalError("Invalid expression: functionReference is not a function.")
            return fn(**args)
        name = str(body.get("functionName", ""))
        impl = ALGORITHMS.get(name)
        if impl is None:
            raise EvalError(f"{name}: this algorithm is not supported by the emulator.")
        check_required(name, args)
        return impl(self, name, args)


def _truthy(value: Any) -> bool:
    """Earth Engine's truth: null, 0, false, empty string/list/dict are false."""
    if value is None or value is False:
        return False
    if isinstance(value, int | float | str | list | dict):
        return bool(value)
    return True


def compute_value(catalog: Catalog, body: dict[str, Any]) -> Any:
    """The ``result`` of a ``value:compute`` request (getInfo), as JSON-able data."""
    return to_info(Evaluator(catalog, body.get("expression") or {}).result())


def _grid(body: dict[str, Any], image: Img) -> Any:
    from .pixels import MAX_SIDE, Grid

    grid = body.get("grid")
    if not grid:
        native = image.native_grid()
        if native is None:
            raise EvalError(
                "Image.computePixels: the image has no fixed projection; give a 'grid'."
            )
        return native
    try:
        dims = grid["dimensions"]
        width, height = int(dims["width"]), int(dims["height"])
        t = grid.get("affineTransform") or {}
        transform = Affine(
            float(t.get("scaleX", 1)),
            float(t.get("shearX", 0)),
            float(t.get("translateX", 0)),
            float(t.get("shearY", 0)),
            float(t.get("scaleY", -1)),
            float(t.get("translateY", 0)),
        )
        crs = str(grid.get("crsCode") or "EPSG:4326")
    except (KeyError, TypeError, ValueError) as e:
        raise EvalError(f"Invalid value at 'grid': {e}") from None
    if not 0 < width <= MAX_SIDE or not 0 < height <= MAX_SIDE:
        raise EvalError(
            f"Grid dimensions {width}x{height} are invalid: each side must be in 1..{MAX_SIDE}."
        )
    if not all(math.isfinite(v) for v in transform[:6]) or transform.determinant == 0:
        raise EvalError("Invalid value at 'grid.affine_transform': not invertible.")
    from .pixels import crs_of

    try:
        crs_of(crs)
    except Exception:  # noqa: BLE001 - rasterio's CRSError and friends
        raise EvalError(f"Invalid value at 'grid.crs_code': unknown CRS '{crs}'.") from None
    return Grid(crs=crs, transform=transform, width=width, height=height)


def compute_pixels(
    catalog: Catalog, body: dict[str, Any], max_request_bytes: int | None = None
) -> tuple[bytes, str]:
    """The body and MIME type of an ``image:computePixels`` answer.

    ``max_request_bytes`` is Earth Engine's limit on the uncompressed answer (48 MiB); a
    larger request gets its "Total request size" error.
    """
    from .alg_images import visualize_image
    from .pixels import MAX_REQUEST_BYTES, encode

    image = Evaluator(catalog, body.get("expression") or {}).result()
    if not isinstance(image, Img):
        raise EvalError(
            "Image.computePixels: the expression must be an Image, got "
            f"{type(image).__name__ if image is not None else 'null'}."
        )
    band_ids = body.get("bandIds")
    if band_ids:
        image = image.select(list(band_ids), None)
    vis = body.get("visualizationOptions")
    if vis:
        ranges = vis.get("ranges") or []
        image = visualize_image(
            image,
            bands=None,
            vmin=[r.get("min", 0) for r in ranges] or None,
            vmax=[r.get("max", 1) for r in ranges] or None,
            gamma=(vis.get("gamma") or {}).get("gamma")
            if isinstance(vis.get("gamma"), dict)
            else vis.get("gamma"),
            palette=(vis.get("paletteColors") or None),
        )
    if not image.bands:
        raise EvalError("Image.computePixels: the image has no bands.")
    grid = _grid(body, image)
    itemsize = np.dtype(image.dtype).itemsize
    size = grid.width * grid.height * len(image.bands) * itemsize
    limit = MAX_REQUEST_BYTES if max_request_bytes is None else max_request_bytes
    if size > limit:
        raise EvalError(
            f"Total request size ({size} bytes) must be less than or equal to {limit} bytes."
        )
    data, mask = image.render(grid, list(range(len(image.bands))))
    return encode(data, mask, list(image.bands), str(body.get("fileFormat") or "PNG"), grid)
