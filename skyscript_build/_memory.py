"""Giving freed memory back to the system, for stages whose tasks run one after the other in a
long-lived worker process (a task's peak should not stay with the process)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["give_back_memory"]


def give_back_memory() -> None:
    """Return freed memory to the system: arrow's allocator and glibc's malloc both keep what
    was freed (after reading, a third of the peak; the geometries, a fifth) unless asked.
    Not for hot paths: after ``malloc_trim`` new allocations fault their pages in again (per
    shard it cost 20 % of the surroundings' time)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc, when this process uses it (``malloc_trim`` is glibc's), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None
