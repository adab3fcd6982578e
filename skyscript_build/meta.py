"""SkyScript's meta files: one pickle per image, a dict of exactly four keys.

``box``: (west, south, east, north) in degrees; ``time``: (year, month, day, hour, minute) of
the acquisition; ``center_tags``: the focus object's tags (dict); ``surrounding_tags``: a list
of dicts, one per surrounding object. fetch writes them; caption reads ours and the released
ones through ``load_meta``, which never executes anything a pickle asks for.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "META_KEYS",
    "MetaError",
    "make_meta",
    "dumps_meta",
    "loads_meta",
    "load_meta",
    "read_meta_bytes",
    "MAX_META_BYTES",
]

META_KEYS = ("box", "time", "center_tags", "surrounding_tags")
# Protocol 4 reads on every Python 3 that SkyScript's users have.
PICKLE_PROTOCOL = 4
#: A meta file is a few hundred bytes to a few KiB; anything past this is refused unread.
MAX_META_BYTES = 16 * 2**20
_READ_SIZE = 1 << 16


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


# numpy scalars (numpy.float64 in a box, numpy.int64 in a time tuple) are numbers too. They are
# decoded here by our own code: numpy is never imported or called, and only these globals are
# answered, each with a stand-in that accepts nothing but a scalar's plain bytes.
_NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_NUMPY_FORMATS = {
    "f8": "d", "f4": "f", "f2": "e",
    "i8": "q", "i4": "i", "i2": "h", "i1": "b",
    "u8": "Q", "u4": "I", "u2": "H", "u1": "B",
    "b1": "?",
}  # fmt: skip
_BYTE_ORDERS = {"<": "<", ">": ">", "|": "<", "=": "="}


class _ScalarType:
    """Stands in for ``numpy.dtype(code, align, copy)`` of a number type; refuses any other."""

    __slots__ = ("format", "order")

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True) -> None:
        fmt = _NUMPY_FORMATS.get(code) if isinstance(code, str) else None
        if fmt is None:
            raise MetaError(
                "unsafe", f"pickle asks for numpy.dtype({code!r}); only numbers are read"
            )
        self.format = fmt
        self.order = "<"

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in _BYTE_ORDERS:
            raise MetaError("unsafe", "pickle gives a numpy.dtype state that is not a number's")
        self.order = _BYTE_ORDERS[order]


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool:
    """Stands in for ``numpy.core.multiarray.scalar(dtype, bytes)``: the Python number."""
    if not isinstance(dtype, _ScalarType) or not isinstance(data, bytes):
        raise MetaError("unsafe", "pickle calls numpy's scalar() with something but a number")
    try:
        (value,) = struct.unpack(dtype.order + dtype.format, data)
    except struct.error as e:
        raise MetaError("corrupt", f"a numpy scalar's bytes do not fit its type ({e})") from None
    return value  # type: ignore[no-any-return]


def _latin1_bytes(text: Any, encoding: Any = None) -> bytes:
    """Stands in for ``_codecs.encode(text, 'latin1')``: how protocol 2 writes bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise MetaError("unsafe", "pickle calls _codecs.encode with something but latin1 text")
    return text.encode("latin1")


class _PlainDataUnpickler(pickle.Unpickler):
    """Accepts dicts, lists, tuples, str, bytes, numbers, bools and None; refuses any global.

    Every class, function or callable a pickle names goes through ``find_class`` (the opcodes
    GLOBAL, STACK_GLOBAL, INST, and EXT via the copyreg registry); REDUCE, OBJ, NEWOBJ and BUILD
    can only call what such a look-up returned. Refusing every look-up (but the three stand-ins
    above, our own code, for numpy scalars and protocol-2 bytes), and every persistent id, means
    no code a pickle asks for can run. ``pickle.Unpickler`` is the C unpickler, and a subclass
    that only overrides these hooks still loads plain data at C speed.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_SCALAR:
            return _numpy_scalar
        if (module, name) == ("numpy", "dtype"):
            return _ScalarType
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise MetaError("unsafe", f"pickle asks for {module}.{name}; only plain data is read")

    def persistent_load(self, pid: Any) -> Any:
        raise MetaError("unsafe", "pickle asks for a persistent object; only plain data is read")


def loads_meta(data: bytes) -> dict[str, Any]:
    """Read a meta dict from pickle bytes safely; raise ``MetaError`` when refused.

    Reasons: ``unsafe`` (the pickle names a class, function or other global: never called),
    ``corrupt`` (truncated or not a pickle), ``not-a-dict``, ``missing-key`` (one of
    ``META_KEYS``), ``bad-tags`` (``center_tags`` not a dict or ``surrounding_tags`` not a list
    of dicts).
    """
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data)).load()
    except MetaError:
        raise
    except Exception as e:  # a hostile or broken stream can raise almost anything
        raise MetaError("corrupt", f"not a readable pickle ({type(e).__name__}: {e})") from None
    if type(obj) is not dict:
        raise MetaError("not-a-dict", f"holds a {type(obj).__name__}, not a dict")
    if len(obj) < 4 or not all(k in obj for k in META_KEYS):
        missing = [k for k in META_KEYS if k not in obj]
        raise MetaError("missing-key", f"meta dict lacks {', '.join(missing)}")
    if type(obj["center_tags"]) is not dict:
        raise MetaError(
            "bad-tags", f"center_tags is a {type(obj['center_tags']).__name__}, not a dict"
        )
    surrounding = obj["surrounding_tags"]
    if type(surrounding) not in (list, tuple) or not all(type(t) is dict for t in surrounding):
        raise MetaError("bad-tags", "surrounding_tags is not a list of dicts")
    return obj


def read_meta_bytes(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> bytes:
    """The bytes of one meta file (``path`` relative to ``dir_fd`` when given).

    Raises ``MetaError``: ``unreadable`` (missing, permissions, I/O error) or ``too-large``
    (over ``MAX_META_BYTES``; not read further).
    """
    try:
        fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    except OSError as e:
        raise MetaError("unreadable", f"cannot open ({e.strerror})") from None
    try:
        data = os.read(fd, _READ_SIZE)
        if len(data) < _READ_SIZE:
            return data
        chunks = [data]
        size = len(data)
        while True:
            more = os.read(fd, _READ_SIZE * 16)
            if not more:
                return b"".join(chunks)
            size += len(more)
            if size > MAX_META_BYTES:
                raise MetaError("too-large", f"over {MAX_META_BYTES} bytes; not a meta file")
            chunks.append(more)
    except OSError as e:
        raise MetaError("unreadable", f"cannot read ({e.strerror})") from None
    finally:
        os.close(fd)


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one meta file safely (see ``read_meta_bytes`` and ``loads_meta``)."""
    return loads_meta(read_meta_bytes(path))
