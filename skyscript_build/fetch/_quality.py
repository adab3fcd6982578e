"""Quality checks on a fetched tile before it is written, and its JPEG encoding.

A tile is refused (a permanent ``skipped`` with the reason) when too much of it has no data
(``nodata``), when it is blank or nearly uniform (``blank``), or, for sources with a cloud rule
(Sentinel-2, Landsat), when too much of it is cloud-white (``cloudy``).

Every JPEG this tool writes is encoded here from the tile's pixels, by one of ``JPEG_ENCODERS``
at a quality both set by fetch: equal pixels and settings give equal bytes, however the pixels
were fetched.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..settings import check_settings, setting

__all__ = [
    "JPEG_ENCODERS",
    "QualityConfig",
    "QualityError",
    "decode_jpeg",
    "encode_jpeg",
    "check_tile",
]

# Below this on every channel a pixel is taken as no data (JPEG blurs exact zeros).
NODATA_LEVEL = 8
#: JPEG encoders by name: Pillow (libjpeg) save options. ``pillow``: baseline, 4:2:0 chroma
#: subsampling (what most JPEGs are); ``pillow-optimize``: the same pixels with optimised
#: Huffman tables (a few % smaller, slower); ``pillow-444``: no chroma subsampling (sharper
#: colour edges, larger files).
JPEG_ENCODERS: dict[str, dict[str, object]] = {
    "pillow": {"optimize": False, "subsampling": "4:2:0"},
    "pillow-optimize": {"optimize": True, "subsampling": "4:2:0"},
    "pillow-444": {"optimize": False, "subsampling": "4:4:4"},
}


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality checks (each field's help is its declaration)."""

    max_nodata: float = setting(
        0.2, help="largest fraction of no-data pixels a kept tile may have", minimum=0, maximum=1
    )
    min_std: float = setting(
        2.0,
        help="smallest standard deviation of the grey levels (0..255) of a kept tile",
        cli=None,
        minimum=0,
    )
    max_cloud: float = setting(
        0.3,
        help="largest fraction of cloud-white pixels (sources with a cloud rule only)",
        minimum=0,
        maximum=1,
    )

    def __post_init__(self) -> None:
        check_settings(self)


class QualityError(ValueError):
    """Bytes that should be a JPEG are not one."""


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode JPEG bytes to an (h, w, 3) uint8 array; ``QualityError`` when they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise QualityError(f"not a JPEG ({im.format})")
            im.load()
            return np.asarray(im.convert("RGB"))
    except QualityError:
        raise
    except Exception as e:  # PIL raises many kinds for a broken stream
        raise QualityError(f"undecodable JPEG ({type(e).__name__}: {e})") from None


def encode_jpeg(rgb: np.ndarray, quality: int = 90, encoder: str = "pillow") -> bytes:
    """Encode an (h, w, 3) uint8 array as a JPEG (deterministic for equal input)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(
        buf, format="JPEG", quality=quality, **JPEG_ENCODERS[encoder]
    )
    return buf.getvalue()


def check_tile(
    rgb: np.ndarray, valid: np.ndarray | None, config: QualityConfig, cloud_rule: bool
) -> str | None:
    """The reason to refuse the tile, or None when it passes.

    The statistics are taken on every other pixel in each direction (a quarter of the pixels:
    the same answer for any real tile, at a quarter of the cost).
    """
    sub = rgb[::2, ::2]
    r, g, b = sub[..., 0], sub[..., 1], sub[..., 2]
    hi = np.maximum(np.maximum(r, g), b)
    ok = hi > NODATA_LEVEL if valid is None else valid[::2, ::2]
    n = ok.size
    n_valid = int(np.count_nonzero(ok))
    if n == 0 or 1.0 - n_valid / n > config.max_nodata:
        return "nodata"
    grey = r.astype(np.float32) + g + b
    values = grey if n_valid == n else grey[ok]
    if float(values.std()) / 3.0 < config.min_std:
        return "blank"
    if cloud_rule:
        lo = np.minimum(np.minimum(r, g), b)
        white = (lo > 200) & ((hi - lo) < 30) & ok
        if np.count_nonzero(white) / n > config.max_cloud:
            return "cloudy"
    return None
