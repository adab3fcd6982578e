"""polish's files: reading the caption CSV and the meta files beside it, writing the output."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..files import atomic_path
from ..meta import MetaError, load_meta
from ._prompt import PolishItem

__all__ = ["OUT_COLUMNS", "read_rows", "load_items", "write_output"]

log = logging.getLogger(__name__)

OUT_COLUMNS = ("filepath", "title_raw", "title")


def read_rows(path: Path, column: str, limit: int | None = None) -> list[tuple[str, str]]:
    """``(filepath, caption)`` per row of the caption CSV, in order, up to ``limit``."""
    rows: list[tuple[str, str]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for needed in ("filepath", column):
                if needed not in header:
                    raise InputError(
                        path, f"has no column {needed!r} (columns: {', '.join(header) or 'none'})"
                    )
            any_row = False
            for line, row in enumerate(reader, start=2):
                any_row = True
                if limit is not None and len(rows) >= limit:
                    break
                filepath = row.get("filepath")
                caption = row.get(column)
                if not filepath or caption is None:
                    raise InputError(path, f"line {line}: empty filepath or missing fields")
                rows.append((filepath, caption))
            if not any_row:
                raise InputError(path, "has no rows (run `skyscript-build caption` first?)")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise InputError(path, f"not a readable CSV ({e})") from None
    return rows


class _MetaFinder:
    """``images2/x.jpg`` -> ``<dataset>/meta2/x.pickle`` when it exists (each folder listed once)."""

    def __init__(self, dataset: Path) -> None:
        self.dataset = str(dataset)
        self._listed: dict[str, frozenset[str]] = {}

    def find(self, filepath: str) -> str | None:
        folder, _, name = filepath.replace("\\", "/").rpartition("/")
        parent, _, images = folder.rpartition("/")
        if not images.startswith("images"):
            return None
        meta_folder = os.path.join(self.dataset, parent, "meta" + images[len("images") :])
        names = self._listed.get(meta_folder)
        if names is None:
            try:
                names = frozenset(os.listdir(meta_folder))
            except OSError:
                names = frozenset()
            self._listed[meta_folder] = names
        pickle_name = name.rsplit(".", 1)[0] + ".pickle"
        return os.path.join(meta_folder, pickle_name) if pickle_name in names else None


def load_items(dataset: Path, rows: Sequence[tuple[str, str]], column: str) -> list[PolishItem]:
    """One item per row, with tags from the meta file when there is a readable one."""
    finder = _MetaFinder(dataset)
    items: list[PolishItem] = []
    unreadable = 0
    for index, (filepath, caption) in enumerate(rows):
        center: dict[str, str] | None = None
        surrounding: tuple[dict[str, str], ...] = ()
        meta_path = finder.find(filepath)
        if meta_path is not None:
            try:
                meta = load_meta(meta_path)
            except (MetaError, OSError) as e:
                unreadable += 1
                log.debug("%s: meta not used (%s)", meta_path, e)
            else:
                tags = meta.get("center_tags")
                if isinstance(tags, dict):
                    center = {str(k): str(v) for k, v in tags.items()}
                around = meta.get("surrounding_tags")
                if column == "title_multi_objects" and isinstance(around, list | tuple):
                    surrounding = tuple(
                        {str(k): str(v) for k, v in t.items()}
                        for t in around
                        if isinstance(t, dict)
                    )
        items.append(PolishItem(index, caption, center, surrounding))
    if unreadable:
        log.warning("%d meta files could not be read; their captions go without tags", unreadable)
    return items


def write_output(path: Path, rows: Sequence[tuple[str, str]], titles: Sequence[str]) -> None:
    """Write ``filepath,title_raw,title`` atomically, one row per input row, in order."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(OUT_COLUMNS)
        for (filepath, raw), title in zip(rows, titles, strict=True):
            writer.writerow((filepath, raw, title))
