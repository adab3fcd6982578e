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
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from image_sources import ImageSource

__all__ = [
    "PixelGrid",
    "TileRequest",
    "TileResult",
    "ImageChoice",
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
class PixelGrid:
    """A north-up pixel grid on the lattice of square ``gsd`` pixels in ``crs``.

    Pixel (col, row) of the lattice spans x in [col * gsd, (col + 1) * gsd] and y in
    [-(row + 1) * gsd, -row * gsd]; the grid is ``width`` x ``height`` pixels from (col, row).
    Grids on one lattice cut each other exactly: a tile's pixels are the same slice of any block
    that holds it, since every request describes its grid by the same integer arithmetic.
    """

    crs: str
    gsd: float
    col: int
    row: int
    width: int
    height: int

    @property
    def transform(self) -> tuple[float, float, float, float, float, float]:
        """The affine transform (a, b, c, d, e, f)."""
        return (self.gsd, 0.0, self.col * self.gsd, 0.0, -self.gsd, -self.row * self.gsd)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) in ``crs``."""
        g = self.gsd
        return (
            self.col * g,
            -(self.row + self.height) * g,
            (self.col + self.width) * g,
            -self.row * g,
        )

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def window(self, inner: PixelGrid) -> tuple[slice, slice]:
        """The (rows, cols) slices of ``inner`` (a grid inside this one) in this grid."""
        r, c = inner.row - self.row, inner.col - self.col
        return slice(r, r + inner.height), slice(c, c + inner.width)

    def union(self, other: PixelGrid) -> PixelGrid:
        """The smallest grid holding both (same lattice)."""
        col, row = min(self.col, other.col), min(self.row, other.row)
        right = max(self.col + self.width, other.col + other.width)
        bottom = max(self.row + self.height, other.row + other.height)
        return replace(self, col=col, row=row, width=right - col, height=bottom - row)

    def quarters(self) -> list[PixelGrid]:
        """This grid cut 2 x 2 (row-major), for a request Earth Engine finds too large."""
        xs = [self.col, self.col + self.width // 2, self.col + self.width]
        ys = [self.row, self.row + self.height // 2, self.row + self.height]
        return [
            replace(self, col=xs[i], row=ys[j], width=xs[i + 1] - xs[i], height=ys[j + 1] - ys[j])
            for j in range(2)
            for i in range(2)
        ]


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
    def grid(self) -> PixelGrid:
        """The tile's pixel grid: its top-left corner snapped to the lattice of ``gsd`` in ``crs``.

        Plan frames tiles on that lattice already; a corner off it (requests made otherwise)
        moves by less than half a pixel onto it, so that tiles of one source, CRS and GSD cut
        each other (and the blocks that hold them) exactly, and a source whose pixels lie on
        that lattice is read without resampling.
        """
        return PixelGrid(
            self.crs,
            self.gsd,
            round(self.x_min / self.gsd),
            round(-self.y_max / self.gsd),
            self.width,
            self.height,
        )

    @property
    def transform(self) -> tuple[float, float, float, float, float, float]:
        """The tile grid's affine transform (a, b, c, d, e, f), north up."""
        return self.grid.transform

    def key_for_year(self, year: int) -> str:
        """The key named after ``year`` (``a123_FI_19`` -> ``a123_FI_20`` for 2020)."""
        return re.sub(r"_\d{2}$", f"_{year % 100:02d}", self.key)


@dataclass
class TileResult:
    """What a backend made of one request.

    Attributes:
        status: ``ok``, ``skipped`` (permanent) or ``failed`` (retryable later).
        reason: why it is not ok (``no-image``, ``http-429``, ``nodata``, ...), else None.
        rgb: the tile as an (height, width, 3) uint8 array (when ok).
        valid: an optional (height, width) bool mask of pixels with data.
        image_id: the id of the image actually used.
        acquisition_time: when that image was taken (UTC).
        year: the year actually used (the key is named after it).
        attempts: requests spent on this tile (retries included).
    """

    status: str
    reason: str | None = None
    rgb: np.ndarray | None = None
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


@dataclass(frozen=True)
class ImageChoice:
    """The image a request's pixels come from, chosen before any pixel is fetched.

    Attributes:
        image_id: the image's full id (``collection/index``).
        acquisition_time: when it was taken (UTC).
        year: the candidate year it was found in (the key is named after it).
    """

    image_id: str
    acquisition_time: datetime
    year: int


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
    """An imagery backend: opened once per worker process, then used from many threads.

    A backend whose ``supports_blocks`` is true can also choose each request's image first
    (``choose_images``) and then fetch any grid of that image (``fetch_grid``), so that fetch
    can send one request for a block of tiles that chose the same image.
    """

    name = "backend"
    supports_blocks = False

    def open(self) -> None:  # noqa: B027 - optional hook
        """Initialise per process (credentials, indexes); raise ``BackendError`` if unusable."""

    def check(  # noqa: B027 - optional hook
        self, sources: Sequence[ImageSource], samples: Sequence[TileRequest]
    ) -> None:
        """Check the settings for ``sources`` before any work, with at most one probe request.

        ``samples`` holds one request per source (where a probe needs a place). Raises
        ``BackendError`` for a setting that cannot work (a missing folder, a bad URL, refused
        credentials, an unknown collection).
        """

    @abstractmethod
    def fetch(self, request: TileRequest) -> TileResult:
        """Fetch one tile; never raises for a failed tile (see ``TileResult``)."""

    def choose_images(self, requests: Sequence[TileRequest]) -> list[ImageChoice | TileResult]:
        """The image of each request, or its ``TileResult`` (``no-image``, a failed lookup)."""
        raise NotImplementedError(f"the {self.name} backend does not fetch blocks")

    def fetch_grid(
        self, request: TileRequest, image: ImageChoice, grid: PixelGrid, split: bool = True
    ) -> tuple[np.ndarray, int]:
        """The (h, w, 3) uint8 pixels of ``image`` (the source of ``request``) in ``grid``.

        Returns the pixels and the requests spent. Raises ``FetchError`` when every attempt
        failed; a grid Earth Engine finds too large is fetched in quarters when ``split``,
        else ``FetchError("too-large")`` is raised for the caller to split.
        """
        raise NotImplementedError(f"the {self.name} backend does not fetch blocks")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""
