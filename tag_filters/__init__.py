"""Groundability tables: which OSM tags can be seen from above, and down to which GSD.

A table is a CSV file with the columns ``key,value,groundable,max_gsd,note`` (see README.md in
this folder). ``value`` is an OSM value or ``*`` for any value; ``key`` may end in ``*`` to match
a key prefix (``name*``, ``addr:*``). Lookups try, in order: the exact ``key=value`` row, the
``key=*`` row, then the longest matching key prefix. A tag no row matches is not groundable, and
a negative value (``no``, ``none``, ``false``) is not groundable unless its exact row says so.
Values are looked up normalised (``normalise_value``).

    >>> from tag_filters import load_tag_filter
    >>> tf = load_tag_filter("default")
    >>> tf.is_groundable("building", "yes")
    True
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GSD_LEVELS",
    "TagRule",
    "TagFilter",
    "list_tag_filters",
    "get_tag_filter_path",
    "load_tag_filter",
    "normalise_value",
    "parse_length",
]

#: The GSD levels (metres) of SkyScript's stage-II classifier, finest first.
GSD_LEVELS = (0.1, 0.2, 0.6, 1.0, 10.0)
_HERE = Path(__file__).resolve().parent
_COLUMNS = ("key", "value", "groundable", "max_gsd", "note")


@dataclass(frozen=True)
class TagRule:
    """One row of a table."""

    key: str
    value: str
    groundable: bool
    max_gsd: float | None
    note: str = ""


#: Values that say a feature is absent; not groundable unless a row names them exactly.
NEGATIVE_VALUES = frozenset({"no", "none", "false", "0"})
_YES_VALUES = frozenset({"yes", "true", "1", "y"})
_LENGTH_UNITS = {
    "": 1.0,
    "m": 1.0,
    "meter": 1.0,
    "meters": 1.0,
    "metre": 1.0,
    "metres": 1.0,
    "cm": 0.01,
    "mm": 0.001,
    "km": 1000.0,
    "ft": 0.3048,
    "feet": 0.3048,
    "'": 0.3048,
    "in": 0.0254,
    '"': 0.0254,
    "mi": 1609.344,
    "nmi": 1852.0,
}
_LENGTH_RE = re.compile(r"^\s*(-?\d+(?:[.,]\d+)?)\s*([a-z'\"]*)\s*$")
_FEET_INCHES_RE = re.compile(r"^\s*(\d+)\s*'\s*(\d+(?:\.\d+)?)\s*\"\s*$")


def normalise_value(value: str) -> str:
    """The form a value is looked up in.

    Trimmed, lower case, the first entry of a ``;`` list, spaces as ``_``, and the spellings of
    yes (``true``, ``1``) folded to ``yes``.
    """
    v = value.split(";", 1)[0].strip().lower().replace(" ", "_")
    return "yes" if v in _YES_VALUES else v


def parse_length(value: str) -> float | None:
    """An OSM length (``width``, ``height``, ``diameter``...) in metres; None if unreadable.

    Reads plain numbers (metres), numbers with a unit (``20 cm``, ``3.5m``, ``12 ft``, ``2 km``)
    and feet-and-inches (``6'3"``). A decimal comma is accepted.
    """
    text = value.strip().lower()
    m = _FEET_INCHES_RE.match(text)
    if m:
        return float(m.group(1)) * 0.3048 + float(m.group(2)) * 0.0254
    m = _LENGTH_RE.match(text)
    if not m or m.group(2) not in _LENGTH_UNITS:
        return None
    return float(m.group(1).replace(",", ".")) * _LENGTH_UNITS[m.group(2)]


class TagFilter:
    """A loaded groundability table (see the module docstring for the lookup order)."""

    def __init__(self, rules: Iterable[TagRule], name: str = "custom") -> None:
        self.name = name
        self.exact: dict[tuple[str, str], TagRule] = {}
        self.any_value: dict[str, TagRule] = {}
        self.prefixes: list[tuple[str, TagRule]] = []
        for rule in rules:
            if rule.key.endswith("*"):
                self.prefixes.append((rule.key[:-1], rule))
            elif rule.value == "*":
                self.any_value[rule.key] = rule
            else:
                self.exact[(rule.key, rule.value)] = rule
        self.prefixes.sort(key=lambda p: -len(p[0]))
        self.rule = functools.lru_cache(maxsize=65536)(self._rule)

    def __len__(self) -> int:
        return len(self.exact) + len(self.any_value) + len(self.prefixes)

    def candidate_keys(self) -> frozenset[str] | None:
        """The keys that can make a tag groundable; None when a prefix row is groundable.

        Used to pre-filter objects in C++ (``osmium.filter.KeyFilter``) before any Python runs.
        """
        if any(rule.groundable for _, rule in self.prefixes):
            return None
        keys = {k for (k, _), rule in self.exact.items() if rule.groundable}
        keys |= {k for k, rule in self.any_value.items() if rule.groundable}
        return frozenset(keys)

    def _rule(self, key: str, value: str) -> TagRule | None:
        norm = normalise_value(value)
        rule = self.exact.get((key, norm))
        if rule is not None:
            return rule
        if norm in NEGATIVE_VALUES:
            return None
        rule = self.any_value.get(key)
        if rule is not None:
            return rule
        for prefix, prefix_rule in self.prefixes:
            if key.startswith(prefix):
                return prefix_rule
        return None

    def is_groundable(self, key: str, value: str) -> bool:
        """True when the tag ``key=value`` can be seen from above at some GSD."""
        rule = self.rule(key, value)
        return rule is not None and rule.groundable

    def tag_max_gsd(self, key: str, value: str) -> float | None:
        """The coarsest GSD (m) at which ``key=value`` is visible; None if never."""
        rule = self.rule(key, value)
        if rule is None or not rule.groundable:
            return None
        return rule.max_gsd

    def groundable_tags(self, tags: Mapping[str, str], gsd: float | None = None) -> dict[str, str]:
        """The tags that are groundable (and, given ``gsd``, visible at that GSD)."""
        out = {}
        for k, v in tags.items():
            g = self.tag_max_gsd(k, v)
            if g is not None and (gsd is None or g >= gsd):
                out[k] = v
        return out

    def max_gsd(self, tags: Mapping[str, str]) -> float | None:
        """The coarsest GSD at which an object with ``tags`` is still recognisable.

        An object is recognisable while any of its groundable tags is, so this is the largest
        ``max_gsd`` among its tags; None when no tag is groundable.
        """
        best: float | None = None
        for k, v in tags.items():
            g = self.tag_max_gsd(k, v)
            if g is not None and (best is None or g > best):
                best = g
        return best


def list_tag_filters() -> list[str]:
    """Names of the tables shipped with the package."""
    return sorted(p.stem for p in _HERE.glob("*.csv"))


def get_tag_filter_path(name_or_path: str | Path) -> Path:
    """Resolve a shipped table name (``default``) or a path to a CSV file."""
    p = Path(name_or_path)
    if p.suffix == ".csv" or p.exists():
        return p
    shipped = _HERE / f"{name_or_path}.csv"
    if shipped.exists():
        return shipped
    from skyscript_build.errors import ConfigError

    raise ConfigError(
        f"unknown tag filter '{name_or_path}': give a CSV path or one of {list_tag_filters()}"
    )


def _parse_gsd(text: str, path: Path, line: int) -> float | None:
    from skyscript_build.errors import InputError

    if text.strip() == "":
        return None
    try:
        gsd = float(text)
    except ValueError:
        raise InputError(path, f"line {line}: max_gsd '{text}' is not a number") from None
    if gsd not in GSD_LEVELS:
        raise InputError(path, f"line {line}: max_gsd {gsd} is not one of {GSD_LEVELS}")
    return gsd


def _rule_value(text: str | None) -> str:
    text = (text or "").strip()
    return "*" if text in ("", "*") else normalise_value(text)


@functools.lru_cache(maxsize=16)
def _load(path: Path) -> TagFilter:
    from skyscript_build.errors import InputError

    if not path.exists():
        raise InputError(path, "tag filter file not found")
    rules = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(row for row in f if not row.startswith("#"))
        if tuple(reader.fieldnames or ())[:4] != _COLUMNS[:4]:
            raise InputError(path, f"expected the columns {','.join(_COLUMNS)}")
        for i, row in enumerate(reader, start=2):
            flag = (row["groundable"] or "").strip().lower()
            if flag not in ("0", "1", "true", "false", "yes", "no"):
                raise InputError(path, f"line {i}: groundable must be 0 or 1, not '{flag}'")
            groundable = flag in ("1", "true", "yes")
            gsd = _parse_gsd(row["max_gsd"] or "", path, i)
            if groundable and gsd is None:
                raise InputError(path, f"line {i}: a groundable row needs a max_gsd")
            rules.append(
                TagRule(
                    key=row["key"].strip(),
                    value=_rule_value(row["value"]),
                    groundable=groundable,
                    max_gsd=gsd,
                    note=(row.get("note") or "").strip(),
                )
            )
    return TagFilter(rules, name=path.stem)


def load_tag_filter(name_or_path: str | Path = "default") -> TagFilter:
    """Load a shipped table by name or a CSV file by path (cached per path)."""
    return _load(get_tag_filter_path(name_or_path).resolve())
