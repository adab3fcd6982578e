"""SkyScript's meta files: one pickle per image, a dict of exactly four keys.

``box``: (west, south, east, north) in degrees; ``time``: (year, month, day, hour, minute) of
the acquisition; ``center_tags``: the focus object's tags (dict); ``surrounding_tags``: a list
of dicts, one per surrounding object. fetch writes them; caption reads ours and the released
ones through ``load_meta``, which never executes anything a pickle asks for.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "META_KEYS",
    "MetaError",
    "make_meta",
    "dumps_meta",
    "loads_meta",
    "load_meta",
]

META_KEYS = ("box", "time", "center_tags", "surrounding_tags")
# Protocol 4 reads on every Python 3 that SkyScript's users have.
PICKLE_PROTOCOL = 4


class MetaError(ValueError):
    """A meta file is refused: unsafe, corrupt, or not SkyScript's four-key dict."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason  # short, countable: "unsafe", "corrupt", "missing-key", ...
        super().__init__(detail)


def make_meta(
    box: Sequence[float],
    time: Sequence[int],
    center_tags: Mapping[str, str],
    surrounding_tags: Sequence[Mapping[str, str]],
) -> dict[str, Any]:
    """Build the meta dict with plain Python types only."""
    west, south, east, north = (float(v) for v in box)
    year, month, day, hour, minute = (int(v) for v in time)
    return {
        "box": (west, south, east, north),
        "time": (year, month, day, hour, minute),
        "center_tags": {str(k): str(v) for k, v in center_tags.items()},
        "surrounding_tags": [{str(k): str(v) for k, v in t.items()} for t in surrounding_tags],
    }


def dumps_meta(meta: Mapping[str, Any]) -> bytes:
    """Serialise a meta dict as SkyScript does (a plain pickle)."""
    return pickle.dumps(dict(meta), protocol=PICKLE_PROTOCOL)


class _PlainDataUnpickler(pickle.Unpickler):
    """Accepts dicts, lists, tuples, str, bytes, numbers, bools and None; refuses any global.

    Every class, function or callable a pickle names goes through ``find_class``; refusing them
    all means no code a pickle asks for can run.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise MetaError("unsafe", f"pickle asks for {module}.{name}; only plain data is read")


def loads_meta(data: bytes) -> dict[str, Any]:
    """Read a meta dict from pickle bytes safely; raise ``MetaError`` when refused."""
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data)).load()
    except MetaError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise MetaError("corrupt", f"not a readable pickle ({type(e).__name__}: {e})") from None
    except Exception as e:  # a hostile or broken stream can raise almost anything
        raise MetaError("corrupt", f"not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise MetaError("not-a-dict", f"holds a {type(obj).__name__}, not a dict")
    missing = [k for k in META_KEYS if k not in obj]
    if missing:
        raise MetaError("missing-key", f"meta dict lacks {', '.join(missing)}")
    return obj


def load_meta(path: str) -> dict[str, Any]:
    """Read one meta file safely (see ``loads_meta``)."""
    with open(path, "rb") as f:
        return loads_meta(f.read())
