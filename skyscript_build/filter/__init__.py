"""The filter stage: CLIP scores, top-k% training sets, and val/test splits.

Reads a caption CSV (``filepath,title,title_multi_objects``) and the images it names, scores
each pair with an open_clip model (``scoring``), and writes, in ``out`` (default: the dataset
folder):

- ``scores.parquet``: ``filepath, similarity, model, pretrained, caption_hash``, reused by reruns;
- ``SkyScript_train_top30pct_filtered_by_<NAME>.csv`` (one per ``--top`` fraction),
  ``SkyScript_val_5K_filtered_by_<NAME>.csv``, ``SkyScript_test_30K_filtered_by_<NAME>.csv``
  with ``filepath,title,title_multi_objects,similarity_<NAME>`` (``selection`` has the rules);
- ``SkyScript_filter_stats_<NAME>.json``: counts, failures, timings (written last).

Entry point: ``run_filter(FilterConfig(...)) -> FilterResult``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..caption.worker import CSV_HEADER as CAPTION_COLUMNS  # the caption stage's CSV
from ..errors import ConfigError, InputError
from ..files import atomic_path, write_json_atomic
from .models import (
    CLIP_CONFIG_DIR,
    default_workers,
    get_clip_config,
    list_clip_configs,
    load_model,
    pretrained_identity,
)
from .scoring import SCORES_FILE, caption_hash, merge_parts, read_scores, score_rows
from .selection import (
    grid_cells,
    select_top,
    size_label,
    split_geo,
    split_random,
    top_count,
    top_label,
)

__all__ = [
    "FilterConfig",
    "FilterResult",
    "run_filter",
    "output_names",
    "list_clip_configs",
    "get_clip_config",
    "CLIP_CONFIG_DIR",
    "SCORES_FILE",
    "top_count",
]

log = logging.getLogger(__name__)

SPLIT_BY = ("random", "geo")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class FilterConfig:
    """Settings of the filter stage (the CLI flags, one to one).

    Attributes:
        dataset: folder holding ``images{k}/`` (caption filepaths are relative to it).
        captions: the caption CSV.
        name: short name of the filter, used in file names and the similarity column.
        model: open_clip architecture (``ViT-L-14``) or one of ``clip_configs/``.
        pretrained: an open_clip tag, a local checkpoint file, or ``none`` (random weights).
        model_config: an open_clip JSON config to register (its file stem is the model name).
        caption_column: the caption scored against the image.
        top: training fractions to keep (0 < f <= 1).
        val_size, test_size: rows drawn for val and test before the top fractions.
        split_by: ``random`` or ``geo`` (whole grid cells per split).
        cell_size: grid cell size in degrees for ``geo``.
        batch_size: images per model forward pass.
        workers: decode/preprocess worker processes; 0 decodes in this process; None: auto.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        seed: seeds the splits (and random weights with ``pretrained=none``).
        out: output folder; None: the dataset folder.
        checkpoint_every: batches between checkpoints of the scores.
    """

    dataset: Path
    captions: Path
    name: str
    model: str
    pretrained: str
    model_config: Path | None = None
    caption_column: str = "title"
    top: tuple[float, ...] = (0.3, 0.5)
    val_size: int = 5000
    test_size: int = 30000
    split_by: str = "random"
    cell_size: float = 0.1
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    seed: int = 0
    out: Path | None = None
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        for attr in ("dataset", "captions", "model_config", "out"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, attr, Path(value))
        object.__setattr__(self, "top", tuple(float(f) for f in self.top))
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"--name {self.name!r}: use letters, digits, '.', '_' or '-' (it goes in file names)"
            )
        if not self.top or any(not 0 < f <= 1 for f in self.top):
            raise ConfigError(f"--top {self.top}: each fraction must be in (0, 1], e.g. 0.3 0.5")
        if len({top_label(f) for f in self.top}) != len(self.top):
            raise ConfigError(f"--top {self.top}: fractions repeat")
        if self.val_size < 0 or self.test_size < 0:
            raise ConfigError("--val-size and --test-size must be >= 0")
        if self.split_by not in SPLIT_BY:
            raise ConfigError(f"--split-by {self.split_by}: choose one of {', '.join(SPLIT_BY)}")
        if not self.cell_size > 0:
            raise ConfigError(f"--cell-size {self.cell_size}: must be > 0 degrees")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers {self.workers}: must be >= 0")
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"--device {self.device}: choose auto, cpu or cuda[:N]")
        if self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every must be >= 1")
        if not self.model:
            raise ConfigError("--model is required")

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.dataset


def output_names(config: FilterConfig) -> dict[str, str]:
    """Split label -> CSV file name, e.g. ``top30pct`` -> ``SkyScript_train_top30pct_...csv``."""
    names = {
        top_label(f): f"SkyScript_train_{top_label(f)}_filtered_by_{config.name}.csv"
        for f in config.top
    }
    if config.val_size:
        names["val"] = f"SkyScript_val_{size_label(config.val_size)}_filtered_by_{config.name}.csv"
    if config.test_size:
        names["test"] = (
            f"SkyScript_test_{size_label(config.test_size)}_filtered_by_{config.name}.csv"
        )
    return names


@dataclass
class FilterResult:
    """What a filter run did (counts; ``summary()`` is the one-line report)."""

    rows: int = 0
    scored_new: int = 0
    reused: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    failed_examples: list[str] = field(default_factory=list)
    kept: int = 0
    val: int = 0
    test: int = 0
    pool: int = 0
    train: dict[str, int] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    score_seconds: float = 0.0
    identity: str = ""

    @property
    def images_per_s(self) -> float:
        return self.scored_new / self.score_seconds if self.score_seconds > 0 else 0.0

    def summary(self) -> str:
        failed = sum(self.failed.values())
        train = ", ".join(f"{k} {v}" for k, v in self.train.items())
        speed = f" ({self.images_per_s:.1f} images/s)" if self.scored_new else ""
        bad = ""
        if failed:
            bad = f", {failed} images left out ({', '.join(self.failed_examples)}"
            bad += ", ...)" if failed > len(self.failed_examples) else ")"
        return (
            f"filter: {self.rows} rows, {self.scored_new} scored{speed}, {self.reused} reused"
            f"{bad}; val {self.val}, test {self.test}, train pool {self.pool}: {train}"
        )


def _read_captions(config: FilterConfig) -> pd.DataFrame:
    path = config.captions
    if not path.is_file():
        raise InputError(path, "caption CSV not found (run `skyscript-build caption` first)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(path, f"not a readable CSV ({' '.join(str(e).split())})") from None
    needed = list(dict.fromkeys([*CAPTION_COLUMNS, config.caption_column]))
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InputError(path, f"lacks column(s) {', '.join(missing)}")
    if df.empty:
        raise InputError(path, "has no rows")
    dup = df["filepath"].duplicated()
    if dup.any():
        raise InputError(path, f"filepath {df['filepath'][dup].iloc[0]!r} appears twice")
    return df[needed].sort_values("filepath", kind="stable").reset_index(drop=True)


def _check_sizes(config: FilterConfig, n: int, what: str) -> None:
    if config.val_size + config.test_size >= n:
        tenth = max(1, n // 10)
        raise ConfigError(
            f"--val-size {config.val_size} + --test-size {config.test_size} leave no training "
            f"rows out of {n} {what}: pass smaller sizes (e.g. --val-size {tenth} "
            f"--test-size {tenth})"
        )


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n", float_format="%.6f", encoding="utf-8")


def run_filter(config: FilterConfig) -> FilterResult:
    """Score the caption CSV's pairs, then write the train/val/test CSVs (see module doc)."""
    if not config.dataset.is_dir():
        raise InputError(config.dataset, "dataset folder not found")
    captions = _read_captions(config)
    _check_sizes(config, len(captions), "caption rows")
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    result = FilterResult(rows=len(captions))
    texts = captions[config.caption_column].tolist()
    captions["caption_hash"] = [caption_hash(t) for t in texts]

    identity = pretrained_identity(config.pretrained, config.seed)
    result.identity = identity
    scores = read_scores(out)
    mine = scores[(scores["model"] == config.model) & (scores["pretrained"] == identity)]
    done = captions.merge(mine[["filepath", "caption_hash"]], on=["filepath", "caption_hash"])
    todo = captions[~captions["filepath"].isin(done["filepath"])]
    result.reused = len(done)
    if len(todo):
        loaded = load_model(
            config.model,
            config.pretrained,
            model_config=config.model_config,
            device=config.device,
            seed=config.seed,
        )
        workers = config.workers if config.workers is not None else default_workers()
        log.info("scoring %d of %d rows (%d workers)", len(todo), len(captions), workers)
        run = score_rows(
            loaded,
            todo["filepath"].tolist(),
            todo[config.caption_column].tolist(),
            root=config.dataset,
            out=out,
            batch_size=config.batch_size,
            workers=workers,
            checkpoint_every=config.checkpoint_every,
        )
        result.scored_new = run.scored
        result.score_seconds = run.seconds
        result.failed = {k: len(v) for k, v in sorted(run.failed.items())}
        result.failed_examples = sorted(p for v in run.failed.values() for p in v)[:5]
        if run.n_failed:
            log.warning(
                "%d images missing or corrupt, left out (%s): %s%s",
                run.n_failed,
                ", ".join(f"{k} {v}" for k, v in result.failed.items()),
                ", ".join(result.failed_examples),
                ", ..." if run.n_failed > len(result.failed_examples) else "",
            )
    merge_parts(out)

    scores = read_scores(out)
    mine = scores[(scores["model"] == config.model) & (scores["pretrained"] == identity)]
    rows = captions.merge(
        mine[["filepath", "caption_hash", "similarity"]], on=["filepath", "caption_hash"]
    )
    rows = rows.sort_values("filepath", kind="stable").reset_index(drop=True)
    result.kept = len(rows)
    _check_sizes(config, len(rows), "scored rows")

    if config.split_by == "geo":
        cells = grid_cells(config.dataset, rows["filepath"].tolist(), config.cell_size)
        val_i, test_i, pool_i = split_geo(cells, config.val_size, config.test_size, config.seed)
    else:
        val_i, test_i, pool_i = split_random(
            rows["filepath"].tolist(), config.val_size, config.test_size, config.seed
        )
    sim_col = f"similarity_{config.name}"
    table = rows[[*CAPTION_COLUMNS, "similarity"]]
    names = output_names(config)
    frames: dict[str, pd.DataFrame] = {}
    pool = table.iloc[pool_i]
    for f in config.top:
        frames[top_label(f)] = select_top(pool, f)
    if config.val_size:
        frames["val"] = table.iloc[val_i]
    if config.test_size:
        frames["test"] = table.iloc[test_i]
    result.val, result.test, result.pool = len(val_i), len(test_i), len(pool_i)
    for label, frame in frames.items():
        frame = frame.rename(columns={"similarity": sim_col})
        frame[sim_col] = frame[sim_col].astype(np.float64)
        _write_csv(frame, out / names[label])
        result.outputs.append(names[label])
        if label.startswith("top"):
            result.train[label] = len(frame)
    write_json_atomic(
        out / f"SkyScript_filter_stats_{config.name}.json",
        {
            "model": config.model,
            "pretrained": identity,
            "caption_column": config.caption_column,
            "split_by": config.split_by,
            "seed": config.seed,
            "rows": result.rows,
            "scored_new": result.scored_new,
            "reused": result.reused,
            "failed": result.failed,
            "failed_examples": result.failed_examples,
            "val": result.val,
            "test": result.test,
            "pool": result.pool,
            "train": result.train,
            "outputs": result.outputs,
            "score_seconds": round(result.score_seconds, 3),
        },
    )
    return result
