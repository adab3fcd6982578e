"""CLIP similarity scores: batched scoring and the reusable ``scores.parquet`` store.

Images are decoded and preprocessed in DataLoader worker processes (the model's own
preprocess), captions tokenized there too; the main process runs the model under
``torch.inference_mode`` (and ``torch.autocast`` on a GPU). A score is the cosine similarity of
the L2-normalised image and text embeddings, computed in float32.

``scores.parquet`` keeps one row per (filepath, model, pretrained identity, caption hash); a
rerun scores only the rows it lacks. While scoring, every ``checkpoint_every`` batches go to
``scores.parts/part-*.parquet`` (atomically), so a crash keeps what was scored; the next run
folds the parts into ``scores.parquet``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import remove_temp_files, write_parquet_atomic
from ..progress import progress_bar
from .models import LoadedModel

__all__ = [
    "SCORES_FILE",
    "SCORE_COLUMNS",
    "ScoreRun",
    "caption_hash",
    "read_scores",
    "merge_parts",
    "score_rows",
    "image_status",
]

log = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"
PARTS_DIR = "scores.parts"
SCORE_COLUMNS = ("filepath", "similarity", "model", "pretrained", "caption_hash")
SCHEMA = pa.schema(
    [
        ("filepath", pa.string()),
        ("similarity", pa.float32()),
        ("model", pa.string()),
        ("pretrained", pa.string()),
        ("caption_hash", pa.string()),
    ]
)


def caption_hash(text: str) -> str:
    """A short hash of the caption a score was computed with (a new caption is re-scored)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _empty() -> pd.DataFrame:
    return SCHEMA.empty_table().to_pandas()


def read_scores(out: Path) -> pd.DataFrame:
    """All scores under ``out``: ``scores.parquet`` plus parts a crashed run left."""
    frames = []
    path = out / SCORES_FILE
    if path.exists():
        frames.append(pq.read_table(path, schema=SCHEMA).to_pandas())
    parts = out / PARTS_DIR
    if parts.is_dir():
        for part in sorted(parts.glob("part-*.parquet")):
            frames.append(pq.read_table(part, schema=SCHEMA).to_pandas())
    if not frames:
        return _empty()
    df = pd.concat(frames, ignore_index=True)
    keys = ["filepath", "model", "pretrained", "caption_hash"]
    return df.drop_duplicates(keys, keep="last").reset_index(drop=True)


def merge_parts(out: Path) -> int:
    """Fold ``scores.parts/`` into ``scores.parquet`` (sorted, atomic); return its row count."""
    parts = out / PARTS_DIR
    df = read_scores(out)
    if parts.is_dir() and any(parts.glob("part-*.parquet")):
        df = df.sort_values(["filepath", "model", "pretrained", "caption_hash"], kind="stable")
        table = pa.Table.from_pandas(df.reset_index(drop=True), schema=SCHEMA, preserve_index=False)
        write_parquet_atomic(table, out / SCORES_FILE)
        for part in parts.glob("part-*.parquet"):
            part.unlink()
        remove_temp_files(parts)
        parts.rmdir()
    return len(df)


def image_status(path: str) -> tuple[Any, str]:
    """Open and fully decode one image as RGB; return ``(image or None, status)``.

    Status is ``ok``, ``missing`` or ``corrupt`` (unreadable, truncated, not an image).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB"), "ok"
    except FileNotFoundError:
        return None, "missing"
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return None, "corrupt"


class _PairDataset:
    """Map-style dataset: (preprocessed image or zeros, tokens, status code) per row."""

    def __init__(
        self, paths: Sequence[str], texts: Sequence[str], preprocess: Any, tokenizer: Any
    ) -> None:
        self.paths = list(paths)
        self.texts = list(texts)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._blank: Any = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        import torch

        image, status = image_status(self.paths[i])
        tokens = self.tokenizer([self.texts[i]])[0]
        if image is None:
            if self._blank is None:
                from PIL import Image

                self._blank = self.preprocess(Image.new("RGB", (8, 8)))
            return torch.zeros_like(self._blank), tokens, _STATUS_CODES[status]
        return self.preprocess(image), tokens, 0


_STATUS_CODES = {"ok": 0, "missing": 1, "corrupt": 2}
_STATUS_NAMES = {v: k for k, v in _STATUS_CODES.items()}


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


@dataclass
class ScoreRun:
    """What one scoring pass did."""

    scored: int = 0
    failed: dict[str, list[str]] = field(default_factory=dict)  # status -> filepaths
    seconds: float = 0.0
    parts_written: int = 0

    @property
    def n_failed(self) -> int:
        return sum(len(v) for v in self.failed.values())


def score_rows(
    loaded: LoadedModel,
    filepaths: Sequence[str],
    texts: Sequence[str],
    *,
    root: Path,
    out: Path,
    batch_size: int = 64,
    workers: int = 0,
    checkpoint_every: int = 50,
    on_batch: Callable[[int], None] | None = None,
) -> ScoreRun:
    """Score ``filepaths`` (relative to ``root``) against ``texts``; append to ``out``'s parts.

    Rows whose image is missing or corrupt are reported in ``ScoreRun.failed``, not scored.
    """
    import torch
    from torch.utils.data import DataLoader

    run = ScoreRun()
    if not filepaths:
        return run
    started = time.perf_counter()
    dataset = _PairDataset(
        [str(root / p) for p in filepaths], texts, loaded.preprocess, loaded.tokenizer
    )
    loader: Any = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        pin_memory=loaded.device.startswith("cuda"),
        prefetch_factor=4 if workers > 0 else None,
    )
    parts = out / PARTS_DIR
    first_part = len(list(parts.glob("part-*.parquet"))) if parts.is_dir() else 0
    pending: list[pd.DataFrame] = []
    model = loaded.model
    device = loaded.device
    autocast = (
        torch.autocast(device_type="cuda")
        if device.startswith("cuda")
        else torch.autocast(device_type="cpu", enabled=False)
    )

    def flush() -> None:
        if not pending:
            return
        df = pd.concat(pending, ignore_index=True)
        pending.clear()
        name = parts / f"part-{first_part + run.parts_written:05d}.parquet"
        write_parquet_atomic(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), name)
        run.parts_written += 1

    offset = 0
    bar = progress_bar(total=len(filepaths), desc="filter: scoring", unit="img")
    with torch.inference_mode(), autocast:
        for n_batch, (images, tokens, status) in enumerate(loader, start=1):
            n = len(status)
            batch_paths = filepaths[offset : offset + n]
            batch_texts = texts[offset : offset + n]
            offset += n
            keep = status == 0
            for i in torch.nonzero(~keep).flatten().tolist():
                name = _STATUS_NAMES[int(status[i])]
                run.failed.setdefault(name, []).append(batch_paths[i])
            if bool(keep.any()):
                idx = torch.nonzero(keep).flatten()
                if len(idx) < n:
                    images, tokens = images[idx], tokens[idx]
                img = model.encode_image(images.to(device, non_blocking=True))
                txt = model.encode_text(tokens.to(device, non_blocking=True))
                img = torch.nn.functional.normalize(img.float(), dim=-1)
                txt = torch.nn.functional.normalize(txt.float(), dim=-1)
                sims = (img * txt).sum(dim=-1).cpu().numpy()
                rows = idx.tolist()
                pending.append(
                    pd.DataFrame(
                        {
                            "filepath": [batch_paths[i] for i in rows],
                            "similarity": sims.astype("float32"),
                            "model": loaded.model_name,
                            "pretrained": loaded.identity,
                            "caption_hash": [caption_hash(batch_texts[i]) for i in rows],
                        }
                    )
                )
                run.scored += len(rows)
            bar.update(n)
            if on_batch is not None:
                on_batch(n)
            if n_batch % checkpoint_every == 0:
                flush()
    flush()
    bar.close()
    run.seconds = time.perf_counter() - started
    return run
