"""The backend interface: one tile request in, RGB pixels + acquisition time + image id out.

A backend never raises for a failed *tile*: ``fetch`` returns a ``TileResult`` whose status is
``ok``, ``skipped`` (permanent, e.g. ``no-image``) or ``failed`` (retryable on a later run, e.g.
``http-429`` after every attempt was spent). Configuration problems (credentials, project, a
missing raster folder) raise ``BackendError`` when the backend is opened.
"""

from __future__ import annotations

import logging
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "TileRequest",
    "TileResult",
    "FetchError",
    "RetryPolicy",
    "Backend",
    "call_with_retries",
    "stretch_to_uint8",
    "RETRYABLE_REASONS",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Reasons a later run tries again; every other non-ok reason is permanent.
RETRYABLE_REASONS = frozenset(
    {"http-429", "http-5xx", "timeout", "connection", "corrupt", "error", "http-401", "http-403"}
)


def _as_dict(value: Any) -> dict[str, str]:
    """A parquet map (a dict, or a list of (key, value) pairs) as a plain dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    return {str(k): str(v) for k, v in value}


@dataclass(frozen=True)
class TileRequest:
    """One image to fetch: a row of ``requests/part-*.parquet`` (docs/architecture.md)."""

    key: str
    alias: str
    collection: str
    gsd: float
    years: tuple[int, ...]
    crs: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    width: int
    height: int
    west: float
    south: float
    east: float
    north: float
    center_tags: dict[str, str] = field(default_factory=dict)
    surrounding_tags: tuple[dict[str, str], ...] = ()

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TileRequest:
        """Build a request from a parquet row (as ``pyarrow.Table.to_pylist`` gives it)."""
        years = tuple(int(y) for y in (row.get("years") or ()))
        return cls(
            key=str(row["key"]),
            alias=str(row["alias"]),
            collection=str(row.get("collection") or ""),
            gsd=float(row["gsd"]),
            years=years,
            crs=str(row["crs"]),
            x_min=float(row["x_min"]),
            y_min=float(row["y_min"]),
            x_max=float(row["x_max"]),
            y_max=float(row["y_max"]),
            width=int(row["width"]),
            height=int(row["height"]),
            west=float(row["west"]),
            south=float(row["south"]),
            east=float(row["east"]),
            north=float(row["north"]),
            center_tags=_as_dict(row.get("center_tags")),
            surrounding_tags=tuple(_as_dict(t) for t in (row.get("surrounding_tags") or ())),
        )

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in degrees: the meta ``box``."""
        return (self.west, self.south, self.east, self.north)

    @property
    def transform(self) -> tuple[float, float, float, float, float, float]:
        """The tile grid's affine transform (a, b, c, d, e, f), north up."""
        xres = (self.x_max - self.x_min) / self.width
        yres = (self.y_max - self.y_min) / self.height
        return (xres, 0.0, self.x_min, 0.0, -yres, self.y_max)

    def key_for_year(self, year: int) -> str:
        """The key named after ``year`` (``a123_FI_19`` -> ``a123_FI_20`` for 2020)."""
        return re.sub(r"_\d{2}$", f"_{year % 100:02d}", self.key)

    def sub_request(self, col: int, row: int, cols: int, rows: int) -> TileRequest:
        """The piece (col, row) of this tile cut into cols x rows pieces (for splitting)."""
        xs = np.linspace(0, self.width, cols + 1).round().astype(int)
        ys = np.linspace(0, self.height, rows + 1).round().astype(int)
        a, _, c, _, e, f = self.transform
        return replace(
            self,
            key=f"{self.key}#{col}{row}",
            x_min=c + xs[col] * a,
            x_max=c + xs[col + 1] * a,
            y_max=f + ys[row] * e,
            y_min=f + ys[row + 1] * e,
            width=int(xs[col + 1] - xs[col]),
            height=int(ys[row + 1] - ys[row]),
        )


@dataclass
class TileResult:
    """What a backend made of one request.

    Attributes:
        status: ``ok``, ``skipped`` (permanent) or ``failed`` (retryable later).
        reason: why it is not ok (``no-image``, ``http-429``, ``nodata``, ...), else None.
        rgb: the tile as an (height, width, 3) uint8 array, when the backend decoded pixels.
        jpeg: the tile as JPEG bytes, when the backend received them ready-made.
        valid: an optional (height, width) bool mask of pixels with data.
        image_id: the id of the image actually used.
        acquisition_time: when that image was taken (UTC).
        year: the year actually used (the key is named after it).
        attempts: requests spent on this tile (retries included).
    """

    status: str
    reason: str | None = None
    rgb: np.ndarray | None = None
    jpeg: bytes | None = None
    valid: np.ndarray | None = None
    image_id: str | None = None
    acquisition_time: datetime | None = None
    year: int | None = None
    attempts: int = 0
    detail: str | None = None

    @classmethod
    def skipped(cls, reason: str, attempts: int = 0, detail: str | None = None) -> TileResult:
        return cls("skipped", reason, attempts=attempts, detail=detail)

    @classmethod
    def failed(cls, reason: str, attempts: int = 0, detail: str | None = None) -> TileResult:
        return cls("failed", reason, attempts=attempts, detail=detail)


class FetchError(Exception):
    """A request for one tile went wrong; ``reason`` is short and countable.

    Args:
        reason: ``http-429``, ``http-5xx``, ``timeout``, ``connection``, ``corrupt``,
            ``too-large``, ``no-image``, ``http-4xx``, ...
        retryable: whether trying again may help.
        retry_after: seconds the server asked us to wait (Retry-After), if any.
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, honouring Retry-After.

    Attributes:
        max_attempts: requests per call, the first one included.
        base_s: the first backoff; attempt n waits up to ``base_s * 2**(n-1)``.
        max_s: the longest single wait.
    """

    max_attempts: int = 6
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        cap = min(self.max_s, self.base_s * 2 ** (attempt - 1))
        wait = rng.uniform(cap / 2, cap)
        if retry_after is not None:
            wait = max(wait, min(float(retry_after), self.max_s))
        return wait


def call_with_retries(
    func: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> tuple[T, int]:
    """Call ``func`` until it succeeds or raises a non-retryable ``FetchError``.

    Returns:
        The value and the number of attempts. The last ``FetchError`` is re-raised with
        ``attempts`` set on it when every attempt failed.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return func(), attempt
        except FetchError as e:
            e.attempts = attempt  # type: ignore[attr-defined]
            if not e.retryable or attempt >= policy.max_attempts:
                raise
            rng = rng or random.Random()
            wait = policy.delay(attempt, e.retry_after, rng)
            log.debug("retrying after %s in %.2fs (attempt %d)", e.reason, wait, attempt)
            sleep(wait)


def stretch_to_uint8(
    data: np.ndarray,
    vmin: Sequence[float] | float,
    vmax: Sequence[float] | float,
    gamma: float = 1.0,
) -> np.ndarray:
    """Scale (bands, h, w) values linearly from [vmin, vmax] to 0..255, optional gamma.

    Returns an (h, w, bands) uint8 array, as Earth Engine's ``visualize`` does.
    """
    identity = np.all(np.asarray(vmin) == 0) and np.all(np.asarray(vmax) == 255)
    if data.dtype == np.uint8 and identity and gamma == 1.0:
        return np.ascontiguousarray(np.moveaxis(data, 0, -1))
    lo = np.asarray(vmin, dtype=np.float32).reshape(-1, 1, 1)
    hi = np.asarray(vmax, dtype=np.float32).reshape(-1, 1, 1)
    scaled = np.clip((data.astype(np.float32) - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    if gamma != 1.0:
        scaled = scaled ** (1.0 / gamma)
    return np.moveaxis((scaled * 255.0 + 0.5).astype(np.uint8), 0, -1).copy()


def ms_to_datetime(ms: float) -> datetime:
    """Milliseconds since the epoch -> an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC)


class Backend(ABC):
    """An imagery backend: opened once per worker process, then used from many threads."""

    name = "backend"

    def open(self) -> None:  # noqa: B027 - optional hook
        """Initialise per process (credentials, indexes); raise ``BackendError`` if unusable."""

    def prepare(self, requests: Sequence[TileRequest]) -> None:  # noqa: B027 - optional hook
        """Look up what a batch of requests needs in few round trips (optional)."""

    @abstractmethod
    def fetch(self, request: TileRequest) -> TileResult:
        """Fetch one tile; never raises for a failed tile (see ``TileResult``)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""
