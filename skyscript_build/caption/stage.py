"""The caption stage: a dataset's ``meta*/`` pickles -> ``SkyScript_captions.csv``.

Works on our builds and on the released SkyScript meta files alike. Files are read with the
safe reader (``skyscript_build.meta``), captioned chunk by chunk, and the chunk CSVs are
concatenated in order into the output, which appears atomically. The chunks run in a pool of
this machine's processes (``workers``), or, given a Dask scheduler (``scheduler``; what
``skyscript-build run`` does on a cluster), as Dask tasks (``runner.run_shards``: retried on
a lost worker); the output is byte-identical either way.

On a Dask cluster the workers read the meta files and write the chunk CSVs themselves, in a
temporary folder beside the output CSV: the dataset folder and the output's folder must be
visible to every worker under the same path (a shared filesystem), and a ``file.py:function``
caption function must be importable there too.

A row points at an image: a meta file whose image (``images{k}/<key>.jpg``) is missing gets no
row and is counted (``missing_images``); ``meta_only`` captions meta files without their images
(SkyScript's released meta files on their own, say).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..cluster import ClusterConfig
from ..errors import InputError
from ..files import atomic_path, check_out_file, leave_no_empty_folders, write_json_atomic
from ..runner import RunnerConfig, marker_path, run_shards
from ..settings import check_settings, scheduler_setting, setting
from ._rules import CaptionRules, resolve_rules
from ._worker import (
    CSV_HEADER,
    ChunkTask,
    MetaFolder,
    caption_chunk_record,
    chunk_stats,
    find_meta_folders,
    iter_chunks,
)

__all__ = ["CaptionConfig", "CaptionResult", "run_caption", "DEFAULT_CSV_NAME", "stats_path"]

log = logging.getLogger(__name__)

DEFAULT_CSV_NAME = "SkyScript_captions.csv"
#: Refused files listed (path, reason, detail) in the stats file, and logged.
MAX_EXAMPLES = 1000
LOGGED_EXAMPLES = 10


@dataclass(frozen=True)
class CaptionConfig:
    """Settings of the caption stage, checked on creation (each field's help is its
    declaration). The output depends neither on ``chunk_size`` nor on ``workers``; with
    ``scheduler`` the dataset and output folders must be on a filesystem every worker sees
    under the same path."""

    dataset: Path = setting(help="dataset folder holding meta2/, meta3/, ...")
    out: Path | None = setting(None, help="caption CSV (default: DATASET/SkyScript_captions.csv)")
    rules: str | None = setting(
        None,
        help="caption rules: a .yaml file merged over the defaults, a bundled name (default), "
        "or a Python function module:function / file.py:function taking (center_tags, "
        "surrounding_tags) and returning (title, title_multi_objects)",
        pipeline="caption.rules",
    )
    workers: int = setting(
        0, help="worker processes, 0 = one per core, 1 = in this process", minimum=0
    )
    scheduler: str | None = scheduler_setting(
        "an existing Dask scheduler: the chunks run on its workers, which must see the dataset "
        "folder (and --out's folder) under the same path"
    )
    chunk_size: int = setting(4096, help="meta files per task", minimum=1)
    force: bool = setting(
        False,
        help="caption again even if the CSV is up to date (same meta and image folders, rules "
        "and code)",
    )
    meta_only: bool = setting(
        False,
        help="write a row for every meta file without looking for its image (e.g. SkyScript's "
        "released meta files without the images); by default a meta file whose image "
        "images{k}/<key>.jpg is missing gets no row, and is counted",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.dataset.exists():
            raise InputError(self.dataset, "dataset folder not found")
        if not self.dataset.is_dir():
            raise InputError(self.dataset, "not a folder; give the dataset folder holding meta*/")
        check_out_file(self.out_path, "--out")
        resolve_rules(self.rules)  # fails now, with the file and the problem, not in a worker

    @property
    def out_path(self) -> Path:
        """Where the CSV goes."""
        return self.out if self.out is not None else self.dataset / DEFAULT_CSV_NAME

    def n_workers(self) -> int:
        """Worker processes to use (on this machine, without a scheduler)."""
        return self.workers if self.workers > 0 else max(1, os.cpu_count() or 1)

    @property
    def cluster(self) -> ClusterConfig:
        """Where the chunks run, for ``runner.run_shards``."""
        return ClusterConfig(workers=self.workers, scheduler=self.scheduler)


@dataclass
class CaptionResult:
    """What the stage did."""

    out: Path
    folders: list[str]
    files: int = 0
    written: int = 0
    empty: int = 0
    missing_images: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    up_to_date: bool = False
    meta_only: bool = False
    #: chunks per place they ran: a Dask worker's address, or ``local``
    chunks_by_worker: dict[str, int] = field(default_factory=dict)

    @property
    def n_refused(self) -> int:
        """Files refused, all reasons together."""
        return sum(self.refused.values())

    def summary(self) -> str:
        """One line: captions written, empty, without an image, refused and why, speed."""
        if self.meta_only:
            images = "; images not looked for (meta only)"
        elif self.missing_images:
            images = f"; {self.missing_images} without their image (no row)"
        else:
            images = ""
        if self.up_to_date:
            return (
                f"caption: up to date, {self.out} ({self.written} captions from {self.files} "
                f"meta files{images}; --force to caption again)"
            )
        rate = self.files / self.seconds if self.seconds > 0 else 0.0
        why = ", ".join(f"{reason} {n}" for reason, n in sorted(self.refused.items()))
        return (
            f"caption: {self.written} captions written to {self.out} from {self.files} meta "
            f"files in {len(self.folders)} folder(s){images}; {self.empty} empty captions; "
            f"{self.n_refused} files refused{f' ({why})' if why else ''}; "
            f"{self.seconds:.1f} s ({rate:,.0f} files/s)"
        )


def stats_path(csv_path: str | Path) -> Path:
    """The stats file written beside a caption CSV (``X.csv`` -> ``X.stats.json``)."""
    p = Path(csv_path)
    return p.with_name(p.stem + ".stats.json")


_CODE_FILES = ("_rules.py", "_worker.py")


def fingerprint(
    root: Path, folders: list[MetaFolder], rules: CaptionRules | str, images: bool = True
) -> str:
    """What the CSV depends on: the meta folders and, with ``images``, the image folders
    (names and modification times: a file added, removed or atomically replaced changes its
    folder's), the rules and the caption code."""
    h = hashlib.sha256()
    for folder in folders:
        for name in (folder.meta_dir, folder.image_dir) if images else (folder.meta_dir,):
            try:
                st = os.stat(root / name)
            except FileNotFoundError:
                h.update(f"{name}:missing\n".encode())
                continue
            h.update(f"{name}:{st.st_mtime_ns}:{st.st_ino}\n".encode())
    h.update(b"images\n" if images else b"meta only\n")
    if isinstance(rules, CaptionRules):
        settings = {k: v for k, v in asdict(rules).items() if k not in ("name", "source")}
        h.update(json.dumps(settings, sort_keys=True, default=sorted).encode())
    else:
        h.update(rules.encode())
        module = rules.rpartition(":")[0]
        file = (
            module if module.endswith(".py") else getattr(sys.modules.get(module), "__file__", "")
        )
        if file and os.path.isfile(file):
            h.update(Path(file).read_bytes())
    here = Path(__file__).parent
    for file_ in (*(here / name for name in _CODE_FILES), here.parent / "meta.py"):
        h.update(file_.read_bytes())
    return h.hexdigest()


def _up_to_date(out: Path, print_: str) -> dict[str, Any] | None:
    try:
        stats = json.loads(stats_path(out).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict) or stats.get("fingerprint") != print_:
        return None
    try:
        st = out.stat()
    except OSError:
        return None
    if stats.get("csv") != [st.st_size, st.st_mtime_ns]:  # the CSV was changed since
        return None
    return stats


def run_caption(config: CaptionConfig) -> CaptionResult:
    """Caption every meta file of ``config.dataset`` into ``config.out_path``.

    Raises ``InputError`` when the dataset has no ``meta*/`` folder with pickles, or (unless
    ``meta_only``) no ``images*/`` folder beside them. A refused meta file (unsafe, corrupt,
    missing a key, ...) and one whose image is missing are counted and listed in the stats file
    (``stats_path(out)``), never raised.
    """
    start = time.perf_counter()
    folders: list[MetaFolder] = find_meta_folders(config.dataset)
    if not folders:
        raise InputError(
            config.dataset,
            "no meta*/ folder with .pickle files here; give a SkyScript dataset folder "
            "(holding meta2/, meta3/, ...)",
        )
    check_images = not config.meta_only
    if check_images:
        _check_image_folders(config.dataset, folders)
    rules = resolve_rules(config.rules)
    out = config.out_path
    workers = config.n_workers()
    result = CaptionResult(
        out=out, folders=[f.meta_dir for f in folders], meta_only=config.meta_only
    )
    print_ = fingerprint(config.dataset, folders, rules, images=check_images)
    done = None if config.force else _up_to_date(out, print_)
    if done is not None:
        result.files, result.written, result.empty = done["files"], done["written"], done["empty"]
        result.missing_images = done.get("missing_images", 0)
        result.refused = dict(done["refused"])
        result.up_to_date = True
        result.seconds = time.perf_counter() - start
        log.debug("caption: %s is up to date", out)
        return result
    log.info(
        "caption: %s meta folder(s) in %s, %s",
        ",".join(result.folders),
        config.dataset,
        f"on Dask ({config.scheduler})" if config.scheduler else f"{workers} worker(s)",
    )
    with leave_no_empty_folders(out.parent):
        _caption_into(config, folders, rules, print_, result)
    result.seconds = time.perf_counter() - start
    _warn_about_missing(result)
    _write_stats(config, result, print_)
    log.debug("%s", result.summary())
    return result


def _warn_about_missing(result: CaptionResult) -> None:
    """A warning when no meta file gave a caption, or some had no image."""
    if result.files and not result.written:
        log.warning(
            "caption: none of the %d meta files gave a caption (%d empty, %d without their "
            "image, %d refused); see %s",
            result.files,
            result.empty,
            result.missing_images,
            result.n_refused,
            stats_path(result.out),
        )
    elif result.missing_images:
        log.warning(
            "caption: %d meta files have no image (no row for them); see %s",
            result.missing_images,
            stats_path(result.out),
        )


def _write_stats(config: CaptionConfig, result: CaptionResult, print_: str) -> None:
    """``<csv>.stats.json``: counts, refusals with examples, and the inputs' fingerprint (a
    rerun with the same fingerprint and CSV is up to date)."""
    out = result.out
    write_json_atomic(
        stats_path(out),
        {
            "dataset": str(config.dataset),
            "out": str(out),
            "rules": config.rules or "default",
            "meta_only": config.meta_only,
            "folders": result.folders,
            "files": result.files,
            "written": result.written,
            "empty": result.empty,
            "missing_images": result.missing_images,
            "refused": result.refused,
            "refused_examples": [
                {"file": file, "reason": reason, "detail": detail}
                for file, reason, detail in result.examples
            ],
            "seconds": round(result.seconds, 3),
            "chunks_by_worker": result.chunks_by_worker,
            "fingerprint": print_,
            "csv": [out.stat().st_size, out.stat().st_mtime_ns],
        },
    )


def _check_image_folders(dataset: Path, folders: list[MetaFolder]) -> None:
    """Refuse a dataset without any ``images*/`` folder; warn about each one missing."""
    missing = [f for f in folders if not (dataset / f.image_dir).is_dir()]
    if len(missing) == len(folders):
        raise InputError(
            dataset,
            f"no images*/ folder beside {', '.join(f.meta_dir + '/' for f in folders)}: every "
            "row would point at a missing image; give the dataset folder with its images, or "
            "--meta-only to caption the meta files without them",
        )
    for folder in missing:
        log.warning(
            "caption: %s/ not found: the meta files of %s/ get no row",
            folder.image_dir,
            folder.meta_dir,
        )


def _caption_into(
    config: CaptionConfig,
    folders: list[MetaFolder],
    rules: CaptionRules | str,
    print_: str,
    result: CaptionResult,
) -> None:
    """Caption every chunk through the runner, one meta folder at a time (the client holds one
    folder's file names), and merge the chunk CSVs, in order, into the output CSV.

    The chunks write their CSVs into ``.<out>.chunks/`` beside the output and the runner marks
    each finished one there, so a killed run resumes with the chunks it had finished; the
    folder goes once the output is in place, or when the run fails (an error is no crash:
    nothing is left behind).
    """
    out = result.out
    refused: Counter[str] = Counter()
    where: Counter[str] = Counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.chunks"):  # an earlier version's, per run
        shutil.rmtree(stale, ignore_errors=True)
    work = out.parent / f".{out.name}.chunks"
    if config.force:
        shutil.rmtree(work, ignore_errors=True)
    key = hashlib.sha256(pickle.dumps(rules)).hexdigest()[:16]
    runner = RunnerConfig(
        cluster=config.cluster, local="processes", markers=work / "_shards", fingerprint=print_
    )
    tasks = iter_chunks(
        config.dataset, folders, config.chunk_size, work, check_images=not config.meta_only
    )
    try:
        _merge_chunks(tasks, out, rules, key, runner, result, refused, where)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.refused = dict(sorted(refused.items()))
    result.chunks_by_worker = dict(sorted(where.items()))


def _merge_chunks(
    tasks: Iterable[ChunkTask],
    out: Path,
    rules: CaptionRules | str,
    key: str,
    runner: RunnerConfig,
    result: CaptionResult,
    refused: Counter[str],
    where: Counter[str],
) -> None:
    with atomic_path(out) as tmp_out, open(tmp_out, "wb") as f:
        f.write((",".join(CSV_HEADER) + "\n").encode("utf-8"))
        for folder, group in itertools.groupby(tasks, key=lambda t: t.folder):
            chunks = [replace(task, rules=rules, rules_key=key) for task in group]
            for task in chunks:  # marked done, but its CSV was merged and removed: again
                if not os.path.exists(task.out):
                    marker_path(runner.markers, task.name).unlink(missing_ok=True)  # type: ignore[arg-type]
            desc = f"caption {folder.meta_dir}"
            records = run_shards(caption_chunk_record, chunks, replace(runner, desc=desc))
            for task, record in zip(chunks, records, strict=True):
                stats = chunk_stats({k: v for k, v in record.items() if k != "already_done"})
                with open(task.out, "rb") as part:
                    shutil.copyfileobj(part, f, 1 << 20)
                result.files += stats.files
                result.written += stats.written
                result.empty += stats.empty
                result.missing_images += stats.missing_images
                refused.update(stats.refused)
                where[stats.worker] += 1
                for example in stats.examples:
                    if len(result.examples) < MAX_EXAMPLES:
                        if len(result.examples) < LOGGED_EXAMPLES:
                            log.warning("%s: no row (%s): %s", *example)
                        result.examples.append(example)
