"""Reading meta folders and captioning one chunk of meta files into a chunk CSV.

The stage cuts each ``meta*/`` folder's sorted file list into chunks; a worker process reads
a chunk's pickles with the safe reader, captions them and writes its rows, in order, to its own
chunk CSV (atomically, so a chunk retried after a lost worker never leaves half a file). The
stage concatenates the chunk CSVs in chunk order, so the output does not depend on how many
workers ran, nor where: a pool process of this machine or a Dask worker (a task that carries
its rules, built once per worker).

A meta file whose image (``images{k}/<key>.jpg``) is missing gets no row: it is counted
(``missing_images``), one ``stat`` per file, unless the task says not to look (meta files
captioned without their images).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import os
import stat
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import atomic_path
from ..meta import MetaError, loads_meta, read_meta_bytes
from ._rules import CaptionFunc, CaptionRules, RuleCaptioner, make_captioner

__all__ = [
    "CSV_HEADER",
    "MetaFolder",
    "ChunkTask",
    "ChunkStats",
    "find_meta_folders",
    "list_meta_names",
    "init_worker",
    "caption_chunk",
]

log = logging.getLogger(__name__)

CSV_HEADER = ("filepath", "title", "title_multi_objects")
META_SUFFIX = ".pickle"
IMAGE_SUFFIX = ".jpg"
#: Refused files kept (with reason and detail) per chunk, for the stats file and the log.
EXAMPLES_PER_CHUNK = 100


@dataclass(frozen=True)
class MetaFolder:
    """A ``meta{k}/`` folder of a dataset and the ``images{k}/`` folder its rows point to."""

    meta_dir: str  # e.g. "meta2"
    image_dir: str  # e.g. "images2"


@dataclass(frozen=True)
class ChunkTask:
    """One worker task: caption ``names`` (sorted) of ``folder`` into ``out``.

    ``rules`` (with ``rules_key``, which names them) is given to a task that runs where
    ``init_worker`` was not called (a Dask worker); it is built there once per key.
    """

    index: int
    root: str
    folder: MetaFolder
    names: tuple[str, ...]
    out: str
    rules: CaptionRules | str | None = None
    rules_key: str = ""
    check_images: bool = True

    @property
    def name(self) -> str:
        """The chunk's name for the runner: its number and a digest of its files, so that a
        finished chunk of other files (the folder changed since) never counts as done."""
        digest = hashlib.blake2b("\n".join(self.names).encode(), digest_size=6).hexdigest()
        return f"chunk-{self.index:07d}-{digest}"


@dataclass
class ChunkStats:
    """What one chunk did: files read, rows written, empty captions, meta files without their
    image, refusals by reason, and where it ran (a Dask worker's address, or ``local``)."""

    index: int = 0
    files: int = 0
    written: int = 0
    empty: int = 0
    missing_images: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (file, reason, detail)
    worker: str = "local"


def _image_dir(meta_dir: str) -> str:
    return "images" + meta_dir[len("meta") :]


def _has_pickle(path: str) -> bool:
    with os.scandir(path) as it:
        return any(e.name.endswith(META_SUFFIX) and not e.name.startswith(".") for e in it)


def find_meta_folders(dataset: str | Path) -> list[MetaFolder]:
    """The dataset's ``meta*/`` folders that hold ``.pickle`` files, in output order.

    Folder names are found, not assumed (SkyScript releases ``meta2`` ... ``meta7``; a build
    with N parts has ``meta2`` ... ``meta{N+1}``). They are ordered as their rows sort: by
    ``images{k}/`` as a string.
    """
    folders = []
    with os.scandir(dataset) as it:
        for entry in it:
            if entry.name.startswith("meta") and entry.is_dir() and _has_pickle(entry.path):
                folders.append(MetaFolder(entry.name, _image_dir(entry.name)))
    return sorted(folders, key=lambda f: f.image_dir + "/")


def _sorted_image_names(path: str | Path) -> list[str]:
    """``<key>.jpg`` for each ``<key>.pickle`` of a folder, sorted (no separate sort keys)."""
    cut = len(META_SUFFIX)
    with os.scandir(path) as it:
        names = [
            e.name[:-cut] + IMAGE_SUFFIX
            for e in it
            if e.name.endswith(META_SUFFIX) and not e.name.startswith(".") and e.is_file()
        ]
    names.sort()
    return names


def list_meta_names(path: str | Path) -> list[str]:
    """The ``.pickle`` file names of one meta folder, sorted as their rows' filepaths sort."""
    cut = len(IMAGE_SUFFIX)
    return [n[:-cut] + META_SUFFIX for n in _sorted_image_names(path)]


def iter_chunks(
    root: str | Path,
    folders: list[MetaFolder],
    chunk_size: int,
    tmp_dir: str | Path,
    check_images: bool = True,
) -> Iterator[ChunkTask]:
    """The chunk tasks of all folders, in output order; lists one folder at a time."""
    index = 0
    for folder in folders:
        names = _sorted_image_names(os.path.join(root, folder.meta_dir))
        cut = len(IMAGE_SUFFIX)
        for start in range(0, len(names), chunk_size):
            yield ChunkTask(
                index=index,
                root=str(root),
                folder=folder,
                names=tuple(n[:-cut] + META_SUFFIX for n in names[start : start + chunk_size]),
                out=os.path.join(tmp_dir, f"chunk-{index:07d}.csv"),
                check_images=check_images,
            )
            index += 1
        del names


_captioner: CaptionFunc | None = None
_custom = False
_rules_key = ""


def init_worker(rules: CaptionRules | str, key: str = "") -> None:
    """Build this process's caption function (once per worker, not per chunk)."""
    global _captioner, _custom, _rules_key
    _captioner = make_captioner(rules)
    _custom = not isinstance(_captioner, RuleCaptioner)
    _rules_key = key


def _where() -> str:
    """The Dask worker running this task (its address), or ``local``."""
    if "distributed" not in sys.modules:  # a pool process or this one: never imported here
        return "local"
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:
        return "local"


def _check_text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a caption is a {type(value).__name__}, not a string")
    # csv quotes fields holding "\n" but not a lone "\r" when lines end in "\n": normalise.
    return value.replace("\r\n", "\n").replace("\r", "\n") if "\r" in value else value


def csv_row(filepath: str, title: str, multi: str) -> str:
    """One CSV line, exactly as ``csv.writer(lineterminator="\\n")`` writes it (QUOTE_MINIMAL).

    The common case (no quote, no line break) is formatted here, three times faster than the
    csv module; anything else goes through the csv module itself.
    """
    fields = (filepath, title, multi)
    for field_ in fields:
        if '"' in field_ or "\n" in field_ or "\r" in field_:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(fields)
            return buf.getvalue()
    return ",".join([f'"{v}"' if "," in v else v for v in fields]) + "\n"


def caption_chunk_record(task: ChunkTask) -> dict:
    """``caption_chunk`` with its stats as a plain dict (what the runner records)."""
    stats = caption_chunk(task)
    return {**asdict(stats), "refused": dict(stats.refused)}


def chunk_stats(record: dict) -> ChunkStats:
    """The stats ``caption_chunk_record`` recorded."""
    return ChunkStats(
        **{**record, "refused": Counter(record["refused"]),
           "examples": [tuple(e) for e in record["examples"]]}
    )  # fmt: skip


def caption_chunk(task: ChunkTask) -> ChunkStats:
    """Caption one chunk of meta files into ``task.out``; a refused file is counted, not raised.

    Its loop over the files is a measured hot loop (bench/bench_caption.py, files per second
    on 2 cores), kept in one piece: a call per file would cost a share of its budget."""
    if task.rules is not None and (_captioner is None or task.rules_key != _rules_key):
        init_worker(task.rules, task.rules_key)
    if _captioner is None:
        raise RuntimeError("caption_chunk called before init_worker")
    captioner, custom = _captioner, _custom
    stats = ChunkStats(index=task.index, files=len(task.names), worker=_where())
    refused, examples = stats.refused, stats.examples
    image_prefix = task.folder.image_dir + "/"
    meta_prefix = task.folder.meta_dir + "/"
    cut = len(META_SUFFIX)
    written = empty = missing = 0
    dir_fd = os.open(os.path.join(task.root, task.folder.meta_dir), os.O_RDONLY)
    look = task.check_images
    image_fd: int | None = None  # stays None when the images folder is missing
    if look:
        with contextlib.suppress(OSError):
            image_fd = os.open(os.path.join(task.root, task.folder.image_dir), os.O_RDONLY)
    lines: list[str] = []
    add = lines.append
    try:
        for name in task.names:
            image = name[:-cut] + IMAGE_SUFFIX
            if look:
                try:
                    found = image_fd is not None and stat.S_ISREG(
                        os.stat(image, dir_fd=image_fd).st_mode
                    )
                except OSError:
                    found = False
                if not found:
                    missing += 1
                    if len(examples) < EXAMPLES_PER_CHUNK:
                        examples.append(
                            (
                                meta_prefix + name,
                                "missing-image",
                                f"{image_prefix}{image} not found",
                            )
                        )
                    continue
            try:
                meta = loads_meta(read_meta_bytes(name, dir_fd=dir_fd))
                if custom:
                    try:
                        title, multi = captioner(meta["center_tags"], meta["surrounding_tags"])
                        title, multi = _check_text(title), _check_text(multi)
                    except MetaError:
                        raise
                    except Exception as e:  # a user's function can fail in any way
                        raise MetaError("rule-error", f"{type(e).__name__}: {e}") from None
                else:
                    title, multi = captioner(meta["center_tags"], meta["surrounding_tags"])
            except MetaError as e:
                refused[e.reason] += 1
                if len(examples) < EXAMPLES_PER_CHUNK:
                    examples.append((meta_prefix + name, e.reason, str(e)))
                continue
            if not title:
                empty += 1
                continue
            add(csv_row(image_prefix + image, title, multi))
            written += 1
    finally:
        os.close(dir_fd)
        if image_fd is not None:
            os.close(image_fd)
    _write_chunk_csv(task, "".join(lines))
    stats.written, stats.empty, stats.missing_images = written, empty, missing
    return stats


def _write_chunk_csv(task: ChunkTask, text: str) -> None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (pickles may hold them): not valid UTF-8
        log.warning("%s: a caption holds invalid unicode; written with '?'", task.folder.meta_dir)
        data = text.encode("utf-8", "replace")
    with atomic_path(task.out) as tmp, open(tmp, "wb") as f:
        f.write(data)
