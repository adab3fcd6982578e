"""CLIP similarity scores for shards of (image, caption) rows on one device.

A ``Scorer`` holds one model on one device. ``Scorer.run(shards)`` scores them and writes one
part per finished shard (``store.write_part``). How it keeps the device busy:

- decode worker processes (a DataLoader over whole batches) send uint8 pixels, or with GPU
  decoding only the JPEG bytes; one thread each for torch and numeric libraries;
- on a GPU, batches are pinned, copied to the device on a side stream one batch ahead,
  normalised there and cast to the model's precision;
- on a CPU, the decode workers run the image tower too (``ImageTower``) and send image
  embeddings: each core decodes and encodes its own batches, with no pixels crossing between
  processes and no scoring process competing with the workers for the cores;
- each distinct caption is encoded once (``TextEmbeddings``), not once per image;
- a batch's scores are read back while the next batch runs.

A score depends only on the image, the caption, the model, its precision and the batch size:
image batches are padded to ``batch_size`` and captions are encoded in fixed-size chunks, so
neither the shard cut, nor the worker, nor a resumed run changes a score's bits (each row's
result comes from the same kernels on the same shapes). That is what makes a run over several
GPUs or Dask workers write the same CSVs as a run on one.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._decode import (
    Normalizer,
    Pixels,
    pil_from_bytes,
    quiet_threads,
    read_jpeg,
    read_pixels,
    split_preprocess,
    tensor_pixels,
)
from ._models import LoadedModel, load_model, resolve_precision
from ._store import caption_hash, write_part

__all__ = [
    "ScoreSettings",
    "Shard",
    "ShardResult",
    "Scorer",
    "TextEmbeddings",
    "cut_shards",
    "score_shard_task",
    "score_shard_local",
    "init_device_process",
    "release_models",
    "default_workers",
]

log = logging.getLogger(__name__)

_OK, _MISSING, _CORRUPT, _JPEG = 0, 1, 2, 3
_STATUS_NAMES = {_MISSING: "missing", _CORRUPT: "corrupt"}


@dataclass(frozen=True)
class ScoreSettings:
    """What a scorer needs besides its device (picklable: it goes to every worker).

    ``precision`` and ``decode`` may be ``auto``: resolved for the device (``auto``: bf16 and
    GPU decoding on CUDA, fp32 and CPU decoding on a CPU). ``workers``: decode processes;
    None: this machine's cores (at most 16).
    """

    model: str
    pretrained: str
    model_config: Path | None = None
    precision: str = "auto"
    decode: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    seed: int = 0
    text_chunk: int = 64


@dataclass(frozen=True)
class Shard:
    """Rows to score (image paths relative to ``root``, their captions and file stats)."""

    index: int
    filepaths: list[str]
    texts: list[str]
    stats: list[tuple[int, int]]  # (size, mtime_ns) when the run started
    root: str
    out: str

    @property
    def name(self) -> str:
        """The shard's name for the runner."""
        return f"shard-{self.index:05d}"


@dataclass
class ShardResult:
    """What scoring one shard did."""

    index: int
    scored: int = 0
    failed: dict[str, list[str]] = field(default_factory=dict)  # status -> filepaths
    seconds: float = 0.0
    worker: str = "local"
    texts_encoded: int = 0

    @property
    def n_failed(self) -> int:
        return sum(len(v) for v in self.failed.values())


def cut_shards(
    filepaths: Sequence[str],
    texts: Sequence[str],
    stats: np.ndarray,
    *,
    root: Path,
    out: Path,
    shard_size: int,
) -> list[Shard]:
    """Cut rows (in their given order) into shards of ``shard_size``."""
    return [
        Shard(
            index=k,
            filepaths=list(filepaths[i : i + shard_size]),
            texts=list(texts[i : i + shard_size]),
            stats=[(int(a), int(b)) for a, b in stats[i : i + shard_size]],
            root=str(root),
            out=str(out),
        )
        for k, i in enumerate(range(0, len(filepaths), shard_size))
    ]


def to_device(tensor: Any, device: str) -> Any:
    """A host tensor on ``device`` without waiting for the device's queue (pinned, async).

    A plain ``.to("cuda")`` from pageable memory synchronises the stream: the host would
    wait for the batch in flight instead of preparing the next one.
    """
    if not device.startswith("cuda"):
        return tensor
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class TextEmbeddings:
    """Normalised caption embeddings, each distinct caption encoded once (a bounded cache).

    Captions are encoded in chunks of exactly ``chunk`` rows (padded with empty captions),
    so a caption's embedding does not depend on which other captions came with it.
    """

    def __init__(
        self, loaded: LoadedModel, dtype: Any, chunk: int = 64, capacity: int = 65536
    ) -> None:
        self.loaded = loaded
        self.dtype = dtype
        self.chunk = chunk
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.store: Any = None
        self.encoded = 0

    def lookup(self, texts: Sequence[str]) -> Any:
        """``(len(texts), dim)`` float32 embeddings on the device."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self.slots))
        if len(self.slots) + len(missing) > self.capacity:
            self.slots.clear()  # start over: cheaper than tracking use, and as exact
            missing = list(dict.fromkeys(texts))
        for i in range(0, len(missing), self.chunk):
            part = missing[i : i + self.chunk]
            tokens = self.loaded.tokenizer(part + [""] * (self.chunk - len(part)))
            emb = self.loaded.model.encode_text(to_device(tokens, self.loaded.device))
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)[: len(part)]
            if self.store is None:
                size = max(self.capacity, len(missing))
                self.store = torch.empty(
                    (size, emb.shape[-1]), dtype=torch.float32, device=self.loaded.device
                )
            first = len(self.slots)
            self.store[first : first + len(part)] = emb
            for j, text in enumerate(part):
                self.slots[text] = first + j
            self.encoded += len(part)
        index = torch.tensor([self.slots[t] for t in texts], dtype=torch.int64)
        return self.store[to_device(index, self.loaded.device)]


class _Batches:
    """Map-style dataset over whole batches (a list of row numbers -> one batch).

    Returns ``(rows, status, pixels, blob, offsets)``: ``pixels`` holds the rows with status
    OK in order (uint8, or float when the preprocess cannot be cut), ``blob``/``offsets`` the
    JPEG bytes of the rows with status JPEG (GPU decoding), in order.

    With a ``tower`` (a CPU device), ``pixels`` is instead the batch's image embeddings,
    ``(len(rows), dim)`` float32 (rows that failed hold an unused embedding).

    ``rows``, ``status`` and ``offsets`` are numpy arrays, pickled through the worker's pipe:
    a torch tensor crosses by shared memory, which costs a file descriptor, a socket and a
    handshake per tensor. Without a tower (a GPU), ``pixels`` and ``blob`` are tensors: large
    batches, pinned by the DataLoader.
    """

    def __init__(
        self,
        paths: Sequence[str],
        pixels: Pixels,
        *,
        jpeg_bytes: bool = False,
        tower: ImageTower | None = None,
    ) -> None:
        self.paths = list(paths)
        self.pixels = pixels
        self.jpeg_bytes = jpeg_bytes
        self.tower = tower

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: list[int]) -> tuple[Any, ...]:
        import torch

        status = np.zeros(len(rows), dtype=np.int8)
        images: list[Any] = []
        blobs: list[bytes] = []
        for j, i in enumerate(rows):
            if self.jpeg_bytes:
                data, what = read_jpeg(self.paths[i])
                if what == "ok":
                    status[j] = _JPEG
                    blobs.append(data)  # type: ignore[arg-type]
                    continue
                if what == "missing":
                    status[j] = _MISSING
                    continue
            image, what = read_pixels(self.paths[i], self.pixels)
            if image is None:
                status[j] = _MISSING if what == "missing" else _CORRUPT
            else:
                images.append(image)
        h, w = self.pixels.size
        if images:
            pixels = torch.stack(images)
        else:
            dtype = torch.uint8 if self.pixels.part is not None else torch.float32
            pixels = torch.empty((0, 3, h, w), dtype=dtype)
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in blobs])
        blob: Any = np.frombuffer(b"".join(blobs) or b"\0", dtype=np.uint8)
        out: Any = pixels
        if self.tower is not None:
            out = self.tower(padded(torch.from_numpy(status), pixels, self.tower.batch_size))
            out = out[: len(rows)].numpy()
        else:
            blob = torch.from_numpy(blob.copy())
        return np.asarray(rows, dtype=np.int64), status, out, blob, offsets


class ImageTower:
    """A padded uint8 batch -> its normalised float32 image embeddings (model precision inside).

    Picklable, so that decode workers can run it (on a CPU device); the padding to one batch
    size keeps every image's embedding on the same kernels and shapes wherever it runs.
    """

    def __init__(self, model: Any, normalize: Normalizer, batch_size: int, channels_last: bool):
        self.model = model
        self.normalize = normalize
        self.batch_size = batch_size
        self.channels_last = channels_last

    def __call__(self, batch: Any) -> Any:
        import torch

        with torch.inference_mode():
            images = self.normalize(batch)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            embeddings = self.model.encode_image(images)
            return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def padded(status: Any, pixels: Any, batch_size: int) -> Any:
    """The OK rows' ``pixels`` at their rows in a batch of ``batch_size`` (zeros elsewhere),
    on the pixels' device."""
    import torch

    if len(pixels) == len(status) == batch_size:
        return pixels
    batch = torch.zeros((batch_size, *pixels.shape[1:]), dtype=pixels.dtype, device=pixels.device)
    ok = (status == _OK).nonzero().flatten()
    if len(ok):
        batch[to_device(ok, str(pixels.device))] = pixels
    return batch


def _as_is(batch: Any) -> Any:
    return batch


def _resolve_decode(decode: str, device: str, pixels: Pixels) -> str:
    if decode == "auto":
        decode = "gpu" if device.startswith("cuda") and pixels.tensor_ok else "cpu"
    if decode == "gpu" and not device.startswith("cuda"):
        from ..errors import ConfigError

        raise ConfigError("--decode gpu needs a CUDA device (--device cuda)")
    if decode == "gpu" and not pixels.tensor_ok:
        log.warning("this model's preprocess cannot run on GPU tensors: decoding on the CPU")
        decode = "cpu"
    return decode


def default_workers() -> int:
    """Decode workers when not set: this machine's cores, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def _batch_plan(
    shards: Sequence[Shard], batch_size: int
) -> tuple[list[str], list[list[int]], dict[int, int], list[int]]:
    """The shards' image paths in order; batches of positions (a batch never spans two
    shards); the last batch of each shard -> its position; each shard's first position."""
    paths: list[str] = []
    batches: list[list[int]] = []
    ends: dict[int, int] = {}
    starts: list[int] = []
    for s, shard in enumerate(shards):
        first = len(paths)
        starts.append(first)
        # os.path.join, not Path: a tenth of the cost, paid before the workers start
        paths += [os.path.join(shard.root, p) for p in shard.filepaths]
        for i in range(first, len(paths), batch_size):
            batches.append(list(range(i, min(i + batch_size, len(paths)))))
        ends[len(batches) - 1] = s
    return paths, batches, ends, starts


class Scorer:
    """One CLIP model on one device, scoring shards."""

    def __init__(self, settings: ScoreSettings, device: str) -> None:
        import torch

        self.settings = settings
        self.precision = resolve_precision(settings.precision, device)
        self.loaded = load_model(
            settings.model,
            settings.pretrained,
            model_config=settings.model_config,
            device=device,
            seed=settings.seed,
            precision=self.precision,
        )
        self.device = self.loaded.device
        self.dtype = self.loaded.dtype
        self.pixels = split_preprocess(self.loaded.preprocess)
        self.decode = _resolve_decode(settings.decode, self.device, self.pixels)
        self.normalize = Normalizer(self.pixels, self.device, self.dtype)
        self.texts = TextEmbeddings(self.loaded, self.dtype, chunk=settings.text_chunk)
        self.cuda = self.device.startswith("cuda")
        if self.cuda and self.precision == "fp32":  # fp32 means fp32, not TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        # A ViT's patch embedding is a strided convolution: cuDNN runs it in NHWC without a
        # layout conversion. Not autotuned (cudnn.benchmark): the same kernels in every
        # process, so the same scores.
        conv = getattr(getattr(self.loaded.model, "visual", None), "conv1", None)
        self.channels_last = self.cuda and isinstance(conv, torch.nn.Conv2d)
        if self.channels_last:
            conv.to(memory_format=torch.channels_last)  # type: ignore[union-attr]
        self.tower = ImageTower(
            self.loaded.model, self.normalize, settings.batch_size, self.channels_last
        )

    def _loader(self, paths: Sequence[str], batches: list[list[int]], workers: int) -> Any:
        from torch.utils.data import DataLoader

        dataset = _Batches(
            paths,
            self.pixels,
            jpeg_bytes=self.decode == "gpu",
            tower=None if self.cuda else self.tower,
        )
        if workers > 0 and multiprocessing.current_process().daemon:
            log.info("decoding in the scoring process (a daemonic Dask worker cannot fork)")
            workers = 0
        return DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=None,
            sampler=batches,  # type: ignore[arg-type]
            num_workers=workers,
            collate_fn=_as_is,
            worker_init_fn=quiet_threads if workers > 0 else None,
            pin_memory=self.cuda,
            prefetch_factor=2 if workers > 0 else None,
        )

    def _on_device(self, loader: Any) -> Iterator[tuple[Any, Any, Any]]:
        """``(rows, status, data)``: on a GPU, the batch's uint8 pixels on the device, padded
        to ``batch_size``; on a CPU, the image embeddings the workers computed.

        On a GPU the next batch is copied (and its JPEGs decoded) on a side stream while the
        current one runs. The side stream is synchronised before each decode: nvJPEG may
        write its outputs before work queued on the calling stream has run, so that stream
        must have nothing queued (pytorch/vision#9606).
        """
        import torch

        stream = torch.cuda.Stream(device=self.device) if self.cuda else None

        def send(batch: tuple[Any, ...]) -> tuple[Any, Any, Any, Any]:
            rows, status, pixels, blob, offsets = map(torch.as_tensor, batch)
            if stream is None:
                return rows, status, pixels, None
            with torch.cuda.stream(stream):
                stream.synchronize()
                status, pixels = self._assemble(status, pixels, blob, offsets)
                ready = torch.cuda.Event()
                ready.record(stream)
            return rows, status, pixels, ready

        it = iter(loader)
        first = next(it, None)
        ahead = send(first) if first is not None else None
        while ahead is not None:
            rows, status, pixels, ready = ahead
            if ready is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(ready)
                pixels.record_stream(main)
            after = next(it, None)
            ahead = send(after) if after is not None else None
            yield rows, status, pixels

    def _assemble(self, status: Any, pixels: Any, blob: Any, offsets: Any) -> tuple[Any, Any]:
        """The final status per row and the batch's pixels on the GPU, padded to
        ``batch_size`` (zeros where an image failed; JPEGs decoded here with GPU decoding)."""
        import torch

        batch = padded(status, to_device(pixels, self.device), self.settings.batch_size)
        jpeg = (status == _JPEG).nonzero().flatten().tolist()
        if jpeg:
            status = status.clone()
            ends = offsets.tolist()
            blobs = [blob[ends[k] : ends[k + 1]] for k in range(len(jpeg))]
            groups, failed = tensor_pixels(blobs, self.pixels, self.device)
            for members, images in groups:
                rows = torch.tensor([jpeg[k] for k in members], dtype=torch.int64)
                batch[to_device(rows, self.device)] = images
                status[rows] = _OK
            for k in failed:  # nvJPEG refused it: PIL decides
                image, _ = pil_from_bytes(blobs[k].numpy().tobytes(), self.pixels)
                if image is None:
                    status[jpeg[k]] = _CORRUPT
                else:
                    batch[jpeg[k]] = to_device(image, self.device)
                    status[jpeg[k]] = _OK
        return status, batch

    def run(
        self,
        shards: Sequence[Shard],
        *,
        workers: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        worker_name: str = "local",
    ) -> list[ShardResult]:
        """Score ``shards`` in order; write each one's part as it finishes.

        The loop over batches is a measured hot loop (bench/gpu_filter.py: images/s against
        the model's own forward throughput), kept in one piece."""
        import torch

        started = time.perf_counter()
        paths, batches, ends, starts = _batch_plan(shards, self.settings.batch_size)
        texts = [t for shard in shards for t in shard.texts]
        results = [ShardResult(index=shard.index, worker=worker_name) for shard in shards]
        sims = np.full(len(paths), np.nan, dtype=np.float32)
        codes = np.zeros(len(paths), dtype=np.int8)
        n_workers = default_workers() if workers is None else workers
        loader = self._loader(paths, batches, n_workers)
        encoded = [self.texts.encoded]
        pending: deque[tuple[Any, Any, Any, int]] = deque()

        def settle(keep: int) -> None:
            """Read back finished batches' scores (all but the last ``keep``)."""
            while len(pending) > keep:
                rows, host, done, b = pending.popleft()
                if done is not None:
                    done.synchronize()
                sims[rows] = host.numpy()
                if b in ends:
                    s = ends[b]
                    results[s].texts_encoded = self.texts.encoded - encoded[0]
                    encoded[0] = self.texts.encoded
                    self._finish(shards[s], results[s], starts[s], sims, codes, started)

        # The decode workers take their cores: torch's threads here take the rest (OpenMP
        # threads that spin on cores the workers need slow both; 1.5-2x measured on 2 cores).
        threads = torch.get_num_threads()
        if n_workers > 0:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - n_workers))
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            stack.callback(torch.set_num_threads, threads)
            for b, (rows, status, data) in enumerate(self._on_device(loader)):
                n = len(rows)
                codes[rows.numpy()] = status.numpy()
                img = self.tower(data)[:n] if self.cuda else data
                txt = self.texts.lookup([texts[i] for i in rows.tolist()])
                score = (img * txt).sum(dim=-1)
                if self.cuda:
                    host = torch.empty(n, dtype=torch.float32, pin_memory=True)
                    host.copy_(score, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                else:
                    host, done = score, None
                pending.append((rows.numpy(), host, done, b))
                settle(keep=3 if self.cuda else 0)  # up to three batches queued on a GPU
                if on_batch is not None:
                    on_batch(n)
            settle(keep=0)
        return results

    def _finish(
        self,
        shard: Shard,
        result: ShardResult,
        first: int,
        sims: np.ndarray,
        codes: np.ndarray,
        started: float,
    ) -> None:
        """Write a finished shard's part (its rows start at ``first`` in this run)."""
        span = slice(first, first + len(shard.filepaths))
        status = codes[span]
        ok = np.flatnonzero(status == _OK)
        for j in np.flatnonzero(status != _OK):
            result.failed.setdefault(_STATUS_NAMES[int(status[j])], []).append(shard.filepaths[j])
        stats = np.asarray(shard.stats, dtype=np.int64).reshape(-1, 2)
        df = pd.DataFrame(
            {
                "filepath": [shard.filepaths[j] for j in ok],
                "similarity": sims[span][ok].astype(np.float32),
                "model": self.loaded.model_name,
                "pretrained": self.loaded.identity,
                "precision": self.precision,
                "caption_hash": [caption_hash(shard.texts[j]) for j in ok],
                "size": stats[ok, 0],
                "mtime_ns": stats[ok, 1],
            }
        )
        write_part(Path(shard.out), shard.index, df)
        result.scored = len(ok)
        result.seconds = time.perf_counter() - started


# --- one model per process: local device processes and Dask workers -----------------------

_SCORERS: dict[tuple[ScoreSettings, str], Scorer] = {}


def _scorer(settings: ScoreSettings, device: str) -> Scorer:
    key = (settings, device)
    if key not in _SCORERS:
        _SCORERS.clear()  # one model per process
        _SCORERS[key] = Scorer(settings, device)
    return _SCORERS[key]


def release_models() -> None:
    """Drop this process's cached model (the end of a run on a long-lived Dask worker)."""
    _SCORERS.clear()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"pid{os.getpid()}"


def score_shard_task(shard: Shard, settings: ScoreSettings, device: str) -> dict[str, Any]:
    """A Dask task through the runner: one shard on this worker's model (loaded by its first
    task); its ``ShardResult`` as a dict."""
    scorer = _scorer(settings, device)
    return asdict(scorer.run([shard], workers=settings.workers, worker_name=_worker_name())[0])


_DEVICE: list[str] = []  # this local scoring process's device


def init_device_process(devices: Any) -> None:
    """A local scoring process's start: take one device from the shared queue."""
    _DEVICE.append(devices.get())


def score_shard_local(shard: Shard, settings: ScoreSettings) -> ShardResult:
    """A local scoring process's task: one shard on this process's device and model."""
    device = _DEVICE[0]
    return _scorer(settings, device).run([shard], workers=settings.workers, worker_name=device)[0]
