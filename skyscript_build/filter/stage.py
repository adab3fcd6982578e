"""The filter stage: CLIP scores, top-k% training sets, and val/test splits.

Reads a caption CSV (``filepath,title,title_multi_objects``) and the images it names, scores
each pair with an open_clip model (``scoring``), and writes, in ``out`` (default: the dataset
folder):

- ``scores.parquet`` (``store``): one score per image, caption, model, weights and precision,
  with the image's size and mtime; a rerun reuses a score only while all of them still match;
- ``SkyScript_train_top30pct_filtered_by_<NAME>.csv`` (one per ``--top`` fraction),
  ``SkyScript_val_5K_filtered_by_<NAME>.csv``, ``SkyScript_test_30K_filtered_by_<NAME>.csv``
  with ``filepath,title,title_multi_objects,similarity_<NAME>`` (``selection`` has the rules),
  listing only images that exist and decode;
- ``SkyScript_filter_stats_<NAME>.json``: counts, failures, timings (written last).

Scoring runs in this process on one device, in one process per device when there are several
(every visible GPU by default), or as Dask tasks on an existing cluster (``scheduler``: one
model per worker). Work is cut into shards; each finished shard is saved, so a stopped run
resumes where it stopped. Every setting and input is checked before anything is written.

Entry point: ``run_filter(FilterConfig(...)) -> FilterResult``. docs/filter.md has the rest.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..caption._worker import CSV_HEADER as CAPTION_COLUMNS  # the caption stage's CSV
from ..cluster import ClusterConfig, dask_client
from ..errors import ConfigError, InputError
from ..files import atomic_path, check_out_dir, leave_no_empty_folders, write_json_atomic
from ..progress import progress_bar
from ..runner import RunnerConfig, run_shards
from ..settings import NAME, PERCENT, check_settings, scheduler_setting, seed_setting, setting
from ._decode import DECODERS
from ._models import (
    CLIP_CONFIG_DIR,
    PRECISIONS,
    check_model,
    get_clip_config,
    import_clip,
    list_clip_configs,
    pretrained_identity,
    resolve_devices,
    resolve_precision,
)
from ._scoring import (
    Scorer,
    ScoreSettings,
    Shard,
    ShardResult,
    cut_shards,
    default_workers,
    init_device_process,
    release_models,
    score_shard_local,
    score_shard_task,
)
from ._selection import (
    grid_cells,
    select_top,
    size_label,
    split_geo,
    split_random,
    top_count,
    top_label,
)
from ._store import SCORES_FILE, caption_hash, read_store, stat_images, write_store

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


def default_name(model: str) -> str:
    """The name of a filter when none is given: the model name, made file-safe."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-") or "clip"


def _distinct_fractions(top: tuple[float, ...]) -> str | None:
    if not top:
        return "needs at least one fraction, e.g. 0.3 0.5"
    labels = [top_label(f) for f in top]  # 0.3 and 30% name the same files
    return None if len(set(labels)) == len(labels) else "lists a fraction more than once"


@dataclass(frozen=True)
class FilterConfig:
    """Settings of the filter stage, checked on creation (each field's help is its declaration).

    ``precision`` is part of a score's identity: another precision scores again. Every batch is
    padded to ``batch_size``, so a score does not depend on its batch-mates.
    """

    dataset: Path = setting(help="folder with images{k}/ (caption filepaths are relative to it)")
    captions: Path = setting(help="the caption CSV")
    model: str = setting(
        help="open_clip architecture (e.g. ViT-L-14) or one of skyscript_build/clip_configs/ "
        "(tiny-random)",
        pipeline="filter.model",
    )
    pretrained: str = setting(
        help="open_clip tag, local checkpoint file, or none (random weights: the ranking is "
        "meaningless)",
        pipeline="filter.pretrained",
    )
    name: str | None = setting(
        None,
        help="filter name, in file names and the similarity_<NAME> column (default: the model "
        "name)",
        pipeline="filter.name",
        pattern=NAME,
    )
    model_config: Path | None = setting(
        None,
        help="an open_clip JSON config to register (its file stem is the model name)",
        pipeline="filter.model_config",
    )
    caption_column: str = setting(
        "title", help="the caption scored against the image", pipeline="filter.caption_column"
    )
    top: tuple[float, ...] = setting(
        (0.3, 0.5),
        help="train fractions to keep; k = round half up of f x rows, ties by filepath",
        pipeline="filter.top",
        above=0,
        maximum=1,
        form=PERCENT,
        check=_distinct_fractions,
    )
    val_size: int = setting(
        5000, help="val rows, drawn before the top fractions", pipeline="filter.val_size", minimum=0
    )
    test_size: int = setting(
        30000,
        help="test rows, drawn before the top fractions",
        pipeline="filter.test_size",
        minimum=0,
    )
    split_by: str = setting(
        "random",
        help="geo keeps whole grid cells (meta box centre) in one split",
        pipeline="filter.split_by",
        choices=SPLIT_BY,
    )
    cell_size: float = setting(
        0.1, help="geo grid cell, degrees", pipeline="filter.cell_size", above=0
    )
    batch_size: int = setting(
        64,
        help="images per forward pass; 256 suits a GPU",
        pipeline="filter.batch_size",
        minimum=1,
        maximum=1_000_000,
    )
    workers: int | None = setting(
        None,
        help="decode processes per scoring device, 0 = in the scoring process (default: the "
        "machine's cores, at most 16, shared among the devices)",
        pipeline="filter.workers",
        minimum=0,
        maximum=1024,
    )
    device: str = setting(
        "auto",
        help="auto (every visible GPU, else cpu), cpu, cuda (every GPU), cuda:N, or a list such "
        "as cuda:0,cuda:1: one scoring process and model per device",
        pipeline="filter.device",
        pattern=(
            r"auto|cuda|(cpu|cuda:\d+)(,(cpu|cuda:\d+))*",
            "auto, cpu, cuda, cuda:N or a list (cuda:0,cuda:1)",
        ),
    )
    precision: str = setting(
        "auto",
        help="weights and inputs; auto = bf16 on CUDA, fp32 on a CPU. Stored with each score: "
        "another precision scores again",
        pipeline="filter.precision",
        choices=PRECISIONS,
    )
    decode: str = setting(
        "auto",
        help="JPEG decode + resize: gpu (nvJPEG) when scoring on a GPU, else cpu",
        pipeline="filter.decode",
        choices=DECODERS,
    )
    scheduler: str | None = scheduler_setting(
        "an existing Dask scheduler: shards run on its workers, one model per worker (on its "
        "GPU when it has one)"
    )
    shard_size: int | None = setting(
        None,
        help="rows per shard, the unit of resuming and of spreading work (default: 64 batches)",
        pipeline="filter.shard_size",
        minimum=1,
    )
    seed: int = seed_setting()
    out: Path | None = setting(None, help="output folder (default: the dataset folder)")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.name is None:
            object.__setattr__(self, "name", default_name(self.model))

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.dataset

    @property
    def rows_per_shard(self) -> int:
        return self.shard_size if self.shard_size is not None else 64 * self.batch_size

    def settings(self, precision: str) -> ScoreSettings:
        """What every scoring process needs (picklable)."""
        return ScoreSettings(
            model=self.model,
            pretrained=self.pretrained,
            model_config=self.model_config,
            precision=precision,
            decode=self.decode,
            batch_size=self.batch_size,
            workers=self.workers,
            seed=self.seed,
        )


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
    precision: str = ""
    devices: list[str] = field(default_factory=list)
    shards: int = 0
    shards_by_worker: dict[str, int] = field(default_factory=dict)
    captions_encoded: int = 0

    @property
    def images_per_s(self) -> float:
        return self.scored_new / self.score_seconds if self.score_seconds > 0 else 0.0

    def summary(self) -> str:
        failed = sum(self.failed.values())
        train = ", ".join(f"{k} {v}" for k, v in self.train.items())
        speed = ""
        if self.scored_new:
            speed = f" ({self.images_per_s:.1f} images/s, {self.precision} on "
            speed += f"{', '.join(self.devices)})"
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


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cluster_precision(client: object, config: FilterConfig) -> str:
    """``--precision auto`` on Dask: the one every worker resolves to (they must agree)."""
    if config.precision != "auto":
        return config.precision
    if config.device != "auto":
        return resolve_precision("auto", config.device)
    cuda = set(client.run(_has_cuda).values())  # type: ignore[attr-defined]
    if len(cuda) > 1:
        raise ConfigError(
            "--precision auto: some Dask workers have a GPU and some do not, so they would "
            "score at different precisions: pass --precision (and --device)"
        )
    return "bf16" if cuda == {True} else "fp32"


def _score_processes(
    config: FilterConfig, shards: list[Shard], devices: list[str], precision: str
) -> list[ShardResult]:
    """One spawned process per device, each with its own model, taking shards as they come."""
    workers = config.workers if config.workers is not None else default_workers()
    per_device = workers // len(devices) if workers else 0
    settings = config.settings(precision)
    settings = ScoreSettings(**{**settings.__dict__, "workers": max(per_device, int(workers > 0))})
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    for d in devices:
        queue.put(d)
    results: list[ShardResult] = []
    with (
        ProcessPoolExecutor(
            len(devices), mp_context=ctx, initializer=init_device_process, initargs=(queue,)
        ) as pool,
        progress_bar(total=len(shards), desc="filter: shards", unit="shard") as bar,
    ):
        futures = [pool.submit(score_shard_local, shard, settings) for shard in shards]
        try:
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def _score_dask(
    config: FilterConfig, shards: list[Shard], client: object, precision: str
) -> list[ShardResult]:
    device = config.device if config.device != "auto" else "auto"
    task = functools.partial(score_shard_task, settings=config.settings(precision), device=device)
    # No markers: a scored shard's part file (scores.parts/) is its mark.
    runner = RunnerConfig(cluster=ClusterConfig(scheduler=config.scheduler), desc="filter: shards")
    try:
        return [ShardResult(**r) for r in run_shards(task, shards, runner, client=client)]
    finally:
        client.run(release_models)  # type: ignore[attr-defined]


def _check_inputs(config: FilterConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """Every input check that needs no model: the rows to score and their images' stats."""
    if not config.dataset.is_dir():
        raise InputError(config.dataset, "dataset folder not found")
    captions = _read_captions(config)
    _check_sizes(config, len(captions), "caption rows")
    check_out_dir(config.out_dir)
    check_model(config.model, config.pretrained, config.model_config)
    stats = stat_images(config.dataset, captions["filepath"].tolist())
    present = stats[:, 0] >= 0
    if not present.any():
        first = captions["filepath"].iloc[0]
        raise InputError(
            config.dataset,
            f"none of the {len(captions)} images that {config.captions} names is here "
            f"(e.g. {first}): is this the folder that holds images2/ ...?",
        )
    _check_sizes(config, int(present.sum()), "images present")
    return captions, stats


_SCORE_KEY = ["filepath", "caption_hash", "size", "mtime_ns"]


def _scored(stored: pd.DataFrame, rows: pd.DataFrame, config: FilterConfig, identity: str,
            precision: str) -> pd.DataFrame:  # fmt: skip
    """``rows`` with the similarity ``stored`` holds for them (this model, checkpoint and
    precision; the same caption, and the image of the same size and mtime)."""
    mine = stored[
        (stored["model"] == config.model)
        & (stored["pretrained"] == identity)
        & (stored["precision"] == precision)
    ]
    return rows.merge(mine[[*_SCORE_KEY, "similarity"]], on=_SCORE_KEY)


def _devices(config: FilterConfig, client: Any) -> tuple[list[str], str]:
    """Where the scores are computed, and at which precision."""
    if client is not None:
        return [f"dask {config.scheduler}"], _cluster_precision(client, config)
    devices = resolve_devices(config.device)
    precision = resolve_precision(config.precision, devices[0])
    if len({resolve_precision(config.precision, d) for d in devices}) > 1:
        raise ConfigError(
            f"--device {config.device}: a CPU and a GPU would score at different "
            "precisions: pass --precision"
        )
    return devices, precision


def run_filter(config: FilterConfig) -> FilterResult:
    """Score the caption CSV's pairs, then write the train/val/test CSVs (see module doc)."""
    import_clip()
    captions, stats = _check_inputs(config)
    result = FilterResult(rows=len(captions))
    texts = captions[config.caption_column].tolist()
    captions["caption_hash"] = [caption_hash(t) for t in texts]
    captions["size"], captions["mtime_ns"] = stats[:, 0], stats[:, 1]
    present = captions["size"].to_numpy() >= 0
    missing = captions["filepath"][~present].tolist()
    result.identity = identity = pretrained_identity(config.pretrained, config.seed)
    with contextlib.ExitStack() as stack:
        client = None
        if config.scheduler:
            client = stack.enter_context(dask_client(ClusterConfig(scheduler=config.scheduler)))
        devices, precision = _devices(config, client)
        result.precision, result.devices = precision, devices
        stored, stale = read_store(config.out_dir)
        reusable = _scored(stored, captions[present], config, identity, precision)
        todo = captions[present & ~captions["filepath"].isin(reusable["filepath"])]
        result.reused = len(reusable)
        scorer = None
        if len(todo) and client is None and len(devices) == 1:
            # built before anything is written: a checkpoint that does not fit creates nothing
            scorer = Scorer(config.settings(precision), devices[0])
        stack.enter_context(leave_no_empty_folders(config.out_dir, depth=1))
        config.out_dir.mkdir(parents=True, exist_ok=True)
        if stale:
            stored = write_store(config.out_dir, stored, add_parts=False)
        runs = _score(config, todo, result, client, scorer) if len(todo) else []
        del scorer
        stored = write_store(config.out_dir, stored)
    _tally_runs(result, runs, missing)
    rows = _scored(stored, captions[present], config, identity, result.precision)
    rows = rows.sort_values("filepath", kind="stable").reset_index(drop=True)
    result.kept = len(rows)
    _check_sizes(config, len(rows), "scored rows")
    _write_outputs(config, rows, result)
    return result


def _score(
    config: FilterConfig, todo: pd.DataFrame, result: FilterResult, client: Any,
    scorer: Scorer | None,
) -> list[ShardResult]:  # fmt: skip
    """Score the rows ``todo`` in shards: on ``scorer`` here, on the Dask ``client``, or in a
    process per device (``result.devices``); each shard's scores go to a part file."""
    shards = cut_shards(
        todo["filepath"].tolist(),
        todo[config.caption_column].tolist(),
        todo[["size", "mtime_ns"]].to_numpy(),
        root=config.dataset,
        out=config.out_dir,
        shard_size=config.rows_per_shard,
    )
    result.shards = len(shards)
    devices, precision = result.devices, result.precision
    log.info(
        "scoring %d of %d rows in %d shard(s), %s on %s",
        len(todo), result.rows, len(shards), precision, ", ".join(devices),
    )  # fmt: skip
    started = time.perf_counter()
    if scorer is not None:
        with progress_bar(total=len(todo), desc="filter: scoring", unit="img") as bar:
            runs = scorer.run(shards, workers=config.workers, on_batch=bar.update,
                              worker_name=devices[0])  # fmt: skip
    elif client is not None:
        runs = _score_dask(config, shards, client, precision)
    else:
        runs = _score_processes(config, shards, devices, precision)
    result.score_seconds = time.perf_counter() - started
    return runs


def _tally_runs(result: FilterResult, runs: list[ShardResult], missing: list[str]) -> None:
    """The shards' counts into ``result``; the images missing or corrupt, counted and logged."""
    failed: dict[str, list[str]] = {"missing": missing} if missing else {}
    for run in runs:
        result.scored_new += run.scored
        result.captions_encoded += run.texts_encoded
        result.shards_by_worker[run.worker] = result.shards_by_worker.get(run.worker, 0) + 1
        for status, paths in run.failed.items():
            failed.setdefault(status, []).extend(paths)
    result.shards_by_worker = dict(sorted(result.shards_by_worker.items()))
    result.failed = {k: len(v) for k, v in sorted(failed.items())}
    result.failed_examples = sorted(p for v in failed.values() for p in v)[:5]
    n_failed = sum(result.failed.values())
    if n_failed:
        log.warning(
            "%d images missing or corrupt, left out (%s): %s%s",
            n_failed,
            ", ".join(f"{k} {v}" for k, v in result.failed.items()),
            ", ".join(result.failed_examples),
            ", ..." if n_failed > len(result.failed_examples) else "",
        )


def _write_outputs(config: FilterConfig, rows: pd.DataFrame, result: FilterResult) -> None:
    """The split CSVs, then the stats file (last: its presence means the run finished)."""
    out = config.out_dir
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
            "pretrained": result.identity,
            "precision": result.precision,
            "devices": result.devices,
            "caption_column": config.caption_column,
            "split_by": config.split_by,
            "seed": config.seed,
            "rows": result.rows,
            "scored_new": result.scored_new,
            "reused": result.reused,
            "failed": result.failed,
            "failed_examples": result.failed_examples,
            "kept": result.kept,
            "val": result.val,
            "test": result.test,
            "pool": result.pool,
            "train": result.train,
            "outputs": result.outputs,
            "shards": result.shards,
            "shards_by_worker": result.shards_by_worker,
            "captions_encoded": result.captions_encoded,
            "score_seconds": round(result.score_seconds, 3),
        },
    )
