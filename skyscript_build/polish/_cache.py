"""The polish cache: one SQLite file of finished answers, keyed by what produced them.

A key is the SHA-256 of (model, full prompt text, the caption and its tags), so a changed
model, prompt or input is a cache miss and nothing else is. Answers are committed as they
arrive, so a killed run loses at most the requests in flight and a rerun pays only for what is
missing. Only outcomes are stored (the text and whether it was a rewrite or a fallback), never
request headers or keys.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import InputError

__all__ = ["CACHE_VERSION", "PolishCache", "cache_key", "key_maker"]

CACHE_VERSION = 1
_CHUNK = 500


def key_maker(model: str, prompt: str) -> Callable[[str], str]:
    """A function mapping an item's input to its key for this (model, prompt): hex SHA-256."""
    head = json.dumps([CACHE_VERSION, model, prompt], ensure_ascii=False).encode("utf-8")
    base = hashlib.sha256(head + b"\0")

    def make(item_input: str) -> str:
        digest = base.copy()
        digest.update(item_input.encode("utf-8"))
        return digest.hexdigest()

    return make


def cache_key(model: str, prompt: str, item_input: str) -> str:
    """The hex SHA-256 naming one (model, prompt, input) answer."""
    return key_maker(model, prompt)(item_input)


class PolishCache:
    """Answers by key: ``get_many`` and ``put_many`` (committed at once). One writer thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers ("
                "key TEXT PRIMARY KEY, title TEXT NOT NULL, status TEXT NOT NULL, "
                "model TEXT NOT NULL, created REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as e:
            raise InputError(
                self.path, f"not a polish cache ({e}); delete it or pass another --cache"
            ) from None

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``key -> (title, status)`` for the keys the cache holds."""
        found: dict[str, tuple[str, str]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, title, status FROM answers WHERE key IN ({marks})", chunk
            )
            for key, title, status in rows:
                found[key] = (title, status)
        return found

    def put_many(self, rows: Iterable[tuple[str, str, str, str]]) -> None:
        """Store ``(key, title, status, model)`` rows and commit."""
        now = time.time()
        values = [(k, t, s, m, now) for k, t, s, m in rows]
        if not values:
            return
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO answers (key, title, status, model, created) "
                "VALUES (?, ?, ?, ?, ?)",
                values,
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        """Close the database (again is fine)."""
        self._db.close()
