"""Block requests: neighbouring tiles of one image fetched with one request, cut locally.

Earth Engine bills a project by requests in flight (40) and per second (100), and a request's
time is a fixed overhead plus a cost that grows with its pixels. Where tiles crowd together,
one ``computePixels`` request for their bounding block moves each pixel once instead of once
per tile that holds it. The planner groups the tiles of one image, CRS and GSD (their grids
share a lattice, ``PixelGrid``) into blocks wherever the cost model says that is cheaper:

    cost(request) = overhead_ms + ms_per_mpx * megapixels

A block replaces its tiles' requests when its cost is at most theirs (sum of each tile's own,
or of a cheaper plan for parts of it). The defaults: 500 ms of overhead (a small tile's
``computePixels`` takes about that on the high-volume endpoint: the graph is parsed, the image
found, the answer encoded and sent, whatever its size) and 100 ms per megapixel (reading,
resampling and sending a megapixel, about 3 MB of RGB; twice the 50 ms the issue's benchmark
assumes, so blocks are planned only where they clearly pay). With these, a 256 x 256 tile costs
507 ms and a 2048 x 2048 block 919 ms: two tiles that share most of their pixels already pay
for a block, tiles far apart never do. Set both to what your project measures
(``make bench-fetch`` prints the break-even).

Limits: a block is at most ``max_px`` pixels on a side (default 2048: 12 MiB of RGB, so the
blocks in flight fit the memory budget) and at most 48 MiB of pixels (Earth Engine's limit on
one answer; 32,768 px a side is its other one). A block Earth Engine still finds too large is
split along its tiles by the caller (``split``).

Blocks never change which image a tile shows: each tile's image is chosen first, per tile
(for Sentinel-2 and Landsat by the cloud rule over the tile's own box), and only tiles that
chose the same image share a block; so a cloud-ruled source gets blocks where neighbouring
tiles agree on their scene, and per-tile requests where they do not.

The planner merges greedily: every tile starts as its own request; while some merge of two
requests into their bounding block saves time and fits the limits, the merge that saves the
most is made. Sparse tiles thus stay single; crowded ones end in few, full blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .backends.base import PixelGrid

__all__ = [
    "BLOCK_MODES",
    "MAX_SIDE",
    "MAX_BYTES",
    "BlockSettings",
    "plan_blocks",
    "block_grid",
    "block_id",
    "split",
]

BLOCK_MODES = ("auto", "off")
MAX_SIDE = 32768  # Earth Engine: pixels on a side of one computePixels answer
MAX_BYTES = 48 * 2**20  # Earth Engine: uncompressed bytes of one answer
RGB_BYTES = 3  # bytes per pixel of a visualised (8-bit RGB) answer
# Tiles planned together at most (consecutive in fetch order, so neighbours): the planner
# holds a window x window matrix of savings.
_WINDOW = 1024


@dataclass(frozen=True)
class BlockSettings:
    """How fetch groups tiles into block requests.

    Attributes:
        mode: ``auto`` (blocks where the cost model says they pay) or ``off`` (a request per
            tile).
        overhead_ms: the cost model's fixed cost of one request.
        ms_per_mpx: the cost model's cost per megapixel of a request.
        max_px: most pixels on a side of a block (at most 32,768).
        max_bytes: most bytes of RGB pixels in a block (at most 48 MiB).
    """

    mode: str = "auto"
    overhead_ms: float = 500.0
    ms_per_mpx: float = 100.0
    max_px: int = 2048
    max_bytes: int = MAX_BYTES

    def __post_init__(self) -> None:
        if self.mode not in BLOCK_MODES:
            raise ConfigError(
                f"--blocks must be one of {', '.join(BLOCK_MODES)}, got {self.mode!r}"
            )
        if self.overhead_ms < 0 or self.ms_per_mpx < 0:
            raise ConfigError("the block cost model's costs must not be negative")
        if self.overhead_ms == 0 and self.ms_per_mpx == 0:
            raise ConfigError("the block cost model needs a request overhead or a per-Mpx cost")
        if not 1 <= self.max_px <= MAX_SIDE:
            raise ConfigError(f"--block-max-px must be 1..{MAX_SIDE}, got {self.max_px}")
        if not RGB_BYTES <= self.max_bytes <= MAX_BYTES:
            raise ConfigError(f"block bytes must be {RGB_BYTES}..{MAX_BYTES}, got {self.max_bytes}")

    def cost(self, pixels: Any) -> Any:
        """The cost model: milliseconds of one request of ``pixels`` pixels (a number or an
        array of them)."""
        return self.overhead_ms + self.ms_per_mpx * pixels / 1e6

    def fits(self, width: int, height: int) -> bool:
        """Whether a width x height block is within the limits."""
        return (
            width <= self.max_px
            and height <= self.max_px
            and width * height * RGB_BYTES <= self.max_bytes
        )


def _boxes(grids: Sequence[PixelGrid]) -> np.ndarray:
    return np.array(
        [(g.col, g.row, g.col + g.width, g.row + g.height) for g in grids], dtype=np.int64
    ).reshape(-1, 4)


def _merge_savings(
    boxes: np.ndarray, cost: np.ndarray, i: np.ndarray, settings: BlockSettings
) -> np.ndarray:
    """Milliseconds saved by merging block(s) ``i`` with every block (-inf where it may not)."""
    c0 = np.minimum(boxes[i, 0, None], boxes[None, :, 0])
    r0 = np.minimum(boxes[i, 1, None], boxes[None, :, 1])
    w = np.maximum(boxes[i, 2, None], boxes[None, :, 2]) - c0
    h = np.maximum(boxes[i, 3, None], boxes[None, :, 3]) - r0
    pixels = w * h
    saving = cost[i, None] + cost[None, :] - settings.cost(pixels)
    fits = (w <= settings.max_px) & (h <= settings.max_px)
    fits &= pixels * RGB_BYTES <= settings.max_bytes
    return np.where(fits, saving, -np.inf)


def _agglomerate(boxes: np.ndarray, settings: BlockSettings) -> list[list[int]]:
    """Merge, while any merge saves time, the two requests whose merge saves the most."""
    m = len(boxes)
    boxes = boxes.copy()
    cost = settings.cost((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    members = [[k] for k in range(m)]
    savings = _merge_savings(boxes, cost, np.arange(m), settings)
    np.fill_diagonal(savings, -np.inf)
    while True:
        flat = int(np.argmax(savings))
        i, j = divmod(flat, m)
        if not savings[i, j] > 0:
            break
        i, j = min(i, j), max(i, j)
        boxes[i, :2] = np.minimum(boxes[i, :2], boxes[j, :2])
        boxes[i, 2:] = np.maximum(boxes[i, 2:], boxes[j, 2:])
        cost[i] = settings.cost((boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]))
        members[i] += members[j]
        members[j] = []
        savings[j, :] = savings[:, j] = -np.inf
        row = _merge_savings(boxes, cost, np.array([i]), settings)[0]
        row[i] = -np.inf
        row[[k for k in range(m) if not members[k]]] = -np.inf
        savings[i, :] = savings[:, i] = row
    return [sorted(group) for group in members if group]


def plan_blocks(grids: Sequence[PixelGrid], settings: BlockSettings) -> list[list[int]]:
    """Group tiles (grids on one lattice, in fetch order) into requests; returns lists of
    indices into ``grids``, each one request: one tile alone, or a block of several."""
    n = len(grids)
    if settings.mode == "off" or n < 2:
        return [[i] for i in range(n)]
    boxes = _boxes(grids)
    plan: list[list[int]] = []
    for start in range(0, n, _WINDOW):
        window = _agglomerate(boxes[start : start + _WINDOW], settings)
        plan += [[start + k for k in group] for group in window]
    return sorted(plan)


def block_grid(grids: Sequence[PixelGrid]) -> PixelGrid:
    """The bounding grid of tiles on one lattice."""
    out = grids[0]
    for g in grids[1:]:
        out = out.union(g)
    return out


def split(grids: Sequence[PixelGrid]) -> tuple[list[int], list[int]]:
    """Cut a block's tiles (at least two) in two halves across the block's longer side, for a
    block Earth Engine refused as too large."""
    boxes = _boxes(grids)
    c0, r0 = boxes[:, 0].min(), boxes[:, 1].min()
    axis = 0 if boxes[:, 2].max() - c0 >= boxes[:, 3].max() - r0 else 1
    order = np.argsort(boxes[:, axis] + boxes[:, axis + 2], kind="stable")
    half = len(order) // 2
    return sorted(int(k) for k in order[:half]), sorted(int(k) for k in order[half:])


def block_id(grid: PixelGrid) -> str:
    """A block's name in the manifest: its grid, ``CRS/GSDm/col_row_WxH`` on the lattice."""
    return f"{grid.crs}/{grid.gsd:g}m/{grid.col}_{grid.row}_{grid.width}x{grid.height}"
