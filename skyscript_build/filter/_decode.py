"""Decoding for the filter stage: the model's own preprocess, cut where pixels are still uint8.

open_clip's eval preprocess is ``Resize -> CenterCrop -> convert to RGB -> ToTensor ->
Normalize``. ``split_preprocess`` cuts it before ``ToTensor``:

- the *pixel part* (resize, crop, mode) runs where the image is decoded and gives uint8 pixels;
- ``Normalizer`` does ``ToTensor``'s ``/ 255`` and ``Normalize`` on the scoring device.

So batches cross process boundaries as uint8 (a quarter of float32's bytes) and are normalised
on the GPU. Decoded with PIL, the result equals the model's own preprocess up to float32
rounding (the same PIL resize runs on the same pixels).

Two decoders:

- ``cpu``: PIL decode + the pixel part in the decode worker processes (``read_pixels``).
- ``gpu``: the workers only read the JPEG bytes (``read_jpeg``); torchvision's ``decode_jpeg``
  decodes the batch on the GPU (nvJPEG) and the pixel part runs on the decoded uint8 tensors
  there (``tensor_pixels``): torchvision's bicubic resize with antialiasing follows PIL's
  kernel. Files that are not complete baseline JPEGs, or that nvJPEG refuses, go through PIL.

The tensor path on the CPU (libjpeg-turbo, the same decoder PIL uses) is the tested stand-in
for the GPU path: it differs from the model's preprocess by at most ``TENSOR_MAX_LEVELS`` of
255 per pixel and on average by under ``TENSOR_MEAN_LEVELS`` (resampling rounding, largest
when a small tile is enlarged). docs/filter.md gives the GPU figures.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DECODERS",
    "TENSOR_MAX_LEVELS",
    "TENSOR_MEAN_LEVELS",
    "GPU_MAX_LEVELS",
    "GPU_MEAN_LEVELS",
    "Pixels",
    "PilResizeCrop",
    "split_preprocess",
    "open_rgb",
    "read_pixels",
    "read_jpeg",
    "tensor_pixels",
    "Normalizer",
    "quiet_threads",
]

DECODERS = ("auto", "cpu", "gpu")
#: The tensor path (torchvision decode + resize) against the model's PIL preprocess, in
#: 0-255 levels per pixel value: the largest difference and the mean one (tests check both).
TENSOR_MAX_LEVELS = 3
TENSOR_MEAN_LEVELS = 0.25
#: The same for nvJPEG on a GPU (its IDCT and chroma upsampling differ from libjpeg's; on an
#: H200: max 16 and mean 1.2 levels at 224 px, max 20 and mean 2.1 for a 48 px tile enlarged).
GPU_MAX_LEVELS = 24
GPU_MEAN_LEVELS = 2.5

# Transforms of the pixel part that work on uint8 tensors as they do on PIL images.
_TENSOR_SAFE = {"Resize", "CenterCrop", "MaybeConvertMode"}
_TO_TENSOR = {"ToTensor", "MaybeToTensor"}


@dataclass(frozen=True)
class Pixels:
    """The model's preprocess, cut at uint8.

    Attributes:
        full: the model's own preprocess (PIL image -> normalised float tensor).
        part: the pixel part (PIL image -> PIL image, or uint8 CHW tensor batch -> same), or
            None when the preprocess has another shape; then workers run ``full``.
        mean, std: ``Normalize``'s statistics.
        size: the output height and width.
        tensor_ok: ``part`` also runs on uint8 tensors (needed for GPU decoding).
        pil: ``part`` for an RGB PIL image in direct PIL calls (``PilResizeCrop``: the same
            pixels without torchvision's dispatch and copies), or None.
    """

    full: Any
    part: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]
    tensor_ok: bool
    pil: Any = None


class PilResizeCrop:
    """torchvision's ``Resize(n)`` (shorter side, no ``max_size``) then ``CenterCrop``, as
    the same two PIL calls without torchvision's layers; an RGB image needs no conversion.

    About 20 µs less per image than the transforms (a decode worker's image costs 0.4-2 ms).
    Returns None where ``CenterCrop`` would pad: the caller runs the transforms then.
    """

    def __init__(self, shorter: int, resample: int, crop: tuple[int, int]) -> None:
        self.shorter = shorter
        self.resample = resample
        self.crop = crop  # (height, width)

    @classmethod
    def of(cls, steps: list[Any]) -> PilResizeCrop | None:
        """The instance for these transforms, or None when they are anything else."""
        from torchvision.transforms.functional import pil_modes_mapping

        names = [type(t).__name__ for t in steps]
        if names not in (["Resize", "CenterCrop"], ["Resize", "CenterCrop", "MaybeConvertMode"]):
            return None
        resize, crop = steps[0], steps[1]
        size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        if len(size) != 1 or resize.max_size is not None:
            return None
        if resize.interpolation not in pil_modes_mapping:
            return None
        if len(names) == 3 and getattr(steps[2], "mode", None) != "RGB":
            return None
        height, width = crop.size
        return cls(int(size[0]), pil_modes_mapping[resize.interpolation], (height, width))

    def __call__(self, image: Any) -> Any:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.shorter, int(self.shorter * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self.resample)
        crop_h, crop_w = self.crop
        if crop_w > new_w or crop_h > new_h:
            return None
        if (crop_w, crop_h) != (new_w, new_h):
            top = int(round((new_h - crop_h) / 2.0))
            left = int(round((new_w - crop_w) / 2.0))
            image = image.crop((left, top, left + crop_w, top + crop_h))
        return image


def split_preprocess(preprocess: Any) -> Pixels:
    """Cut an open_clip preprocess (a torchvision ``Compose``) before ``ToTensor``."""
    from PIL import Image
    from torchvision import transforms

    steps = list(getattr(preprocess, "transforms", []))
    names = [type(t).__name__ for t in steps]
    probe = preprocess(Image.new("RGB", (8, 8)))
    size = (int(probe.shape[-2]), int(probe.shape[-1]))
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR), None)
    if cut is None or names[cut + 1 :] != ["Normalize"]:
        return Pixels(preprocess, None, (), (), size, False)
    norm = steps[cut + 1]
    return Pixels(
        full=preprocess,
        part=transforms.Compose(steps[:cut]),
        mean=tuple(float(m) for m in norm.mean),
        std=tuple(float(s) for s in norm.std),
        size=size,
        tensor_ok=all(n in _TENSOR_SAFE for n in names[:cut]),
        pil=PilResizeCrop.of(steps[:cut]),
    )


def open_rgb(source: Any) -> tuple[Any, str]:
    """Open and fully decode one image (a path or a file object) as RGB.

    Returns ``(image or None, status)``, status ``ok``, ``missing`` or ``corrupt``
    (unreadable, truncated, not an image).
    """
    from PIL import Image

    try:
        with Image.open(source) as im:
            if im.mode == "RGB":  # convert would return a copy of the same pixels
                im.load()
                return im, "ok"
            return im.convert("RGB"), "ok"
    except FileNotFoundError:
        return None, "missing"
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return None, "corrupt"


def read_pixels(source: Any, pixels: Pixels) -> tuple[Any, str]:
    """Decode ``source`` with PIL and run the pixel part: ``(uint8 CHW tensor or None, status)``.

    With no pixel part (an unusual preprocess) the full preprocess runs: a float tensor.
    """
    import numpy as np
    import torch

    image, status = open_rgb(source)
    if image is None:
        return None, status
    if pixels.part is None:
        return pixels.full(image), status
    part = pixels.pil(image) if pixels.pil is not None else None
    array = np.asarray(part if part is not None else pixels.part(image), dtype=np.uint8)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()), status


def read_jpeg(path: str) -> tuple[bytes | None, str]:
    """The bytes of a JPEG that nvJPEG can take whole; ``(None, "other")`` for anything else.

    A complete JPEG starts with SOI and ends with EOI (trailing padding aside): a truncated
    file fails this check and goes to PIL, which decides whether it decodes. Progressive
    JPEGs go to PIL too (nvJPEG's batched decoder does baseline).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "missing"
    except OSError:
        return None, "corrupt"
    tail = data.rstrip(b"\x00\r\n ")
    if not data.startswith(b"\xff\xd8") or not tail.endswith(b"\xff\xd9"):
        return None, "other"
    if _is_progressive(data):
        return None, "other"
    return data, "ok"


def _is_progressive(data: bytes) -> bool:
    """Whether the first frame header of a JPEG is progressive (SOF2) or otherwise not SOF0/1."""
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return True  # not a marker where one must be: let PIL judge the file
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xC0, 0xC1):
            return False
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return True
        if marker == 0xDA:
            return True  # scan before a frame header
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + length
    return True


def tensor_pixels(
    blobs: Sequence[Any], pixels: Pixels, device: Any
) -> tuple[list[tuple[list[int], Any]], list[int]]:
    """Decode JPEG byte tensors on ``device`` and run the pixel part there.

    Returns ``(groups, failed)``: same-sized images go through the pixel part together, so
    each group is ``(indices into blobs, uint8 NCHW tensor on device)``; ``failed`` lists the
    blobs the decoder refused (for the caller to decode with PIL).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return [], []
    try:
        decoded = decode_jpeg(list(blobs), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for b in blobs:  # one bad file fails a batch: find it
            try:
                decoded.append(decode_jpeg(b, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    failed = []
    for i, image in enumerate(decoded):
        if image is None:
            failed.append(i)
        else:
            by_shape.setdefault(tuple(image.shape), []).append(i)
    groups = [
        (members, pixels.part(torch.stack([decoded[i] for i in members])))
        for members in by_shape.values()
    ]
    return groups, failed


def pil_from_bytes(data: bytes, pixels: Pixels) -> tuple[Any, str]:
    """``read_pixels`` on bytes already in memory."""
    return read_pixels(io.BytesIO(data), pixels)


class Normalizer:
    """uint8 CHW batches -> the model's input: ``/ 255``, ``Normalize``, then ``dtype``."""

    def __init__(self, pixels: Pixels, device: Any, dtype: Any) -> None:
        import torch

        shape = (1, len(pixels.mean), 1, 1)
        self.mean = torch.tensor(pixels.mean, device=device).view(shape)
        self.std = torch.tensor(pixels.std, device=device).view(shape)
        self.dtype = dtype

    def __call__(self, batch: Any) -> Any:
        import torch

        if batch.dtype != torch.uint8:  # the full preprocess ran in the workers
            return batch.to(self.dtype)
        # the same operations as ToTensor then Normalize, so the same float32 values
        return batch.float().div_(255).sub_(self.mean).div_(self.std).to(self.dtype)


def quiet_threads(_: int = 0) -> None:
    """A decode worker's start: one thread for torch and the numeric libraries (no N x N)."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # a forked worker may have its pool already
        torch.set_num_interop_threads(1)
