"""One object per key in this process, made on first use and shared by its threads.

Backends, rate limits, thread pools and parsed CRSs are each made once per worker process:
``@once_per_process`` on the function that makes one from its key.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

__all__ = ["OncePerProcess", "once_per_process"]


class OncePerProcess(Generic[K, V]):
    """``make(key)`` called once per key (under a lock, so threads never make two)."""

    def __init__(self, make: Callable[[K], V]) -> None:
        self._make = make
        self._made: dict[K, V] = {}
        self._lock = threading.Lock()
        functools.update_wrapper(self, make)

    def __call__(self, key: K) -> V:
        with self._lock:
            if key not in self._made:
                self._made[key] = self._make(key)
            return self._made[key]

    def forget(self, close: Callable[[V], object] | None = None) -> None:
        """Forget every object made (after ``close`` on each, when given)."""
        with self._lock:
            if close is not None:
                for value in self._made.values():
                    close(value)
            self._made.clear()


def once_per_process(make: Callable[[K], V]) -> OncePerProcess[K, V]:
    """Decorate ``make(key)`` so that it runs once per key in this process."""
    return OncePerProcess(make)
