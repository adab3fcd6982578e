"""Progress bars: shown on a terminal, silent in logs, CI and pipes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

__all__ = ["progress_bar", "progress_enabled"]


def progress_enabled() -> bool:
    """True when stderr is a terminal and SKYSCRIPT_NO_PROGRESS is not set."""
    return sys.stderr.isatty() and not os.environ.get("SKYSCRIPT_NO_PROGRESS")


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar that draws only when ``progress_enabled()``."""
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
