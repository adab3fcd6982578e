"""Which closed ways are areas (polygons) and which are lines.

A closed way is an area when it says so (``area=yes``) or when one of its tags names a feature
that covers ground (building, landuse, ...); ``area=no`` and line-like features (a fence, a
footway around a block, a coastline, a runway centre line) keep it a line. The rule follows the
area keys of iD and osm2pgsql.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["is_area", "RULE_KEYS", "area_vote"]

# key -> values that are NOT areas (an empty set: every value is an area).
_AREA_KEYS: dict[str, frozenset[str]] = {
    "building": frozenset({"no"}),
    "building:part": frozenset({"no"}),
    "landuse": frozenset(),
    "natural": frozenset(
        {"coastline", "cliff", "ridge", "arete", "tree_row", "valley", "earth_bank", "gully"}
    ),
    "leisure": frozenset({"track", "slipway"}),
    "amenity": frozenset(),
    "water": frozenset(),
    "wetland": frozenset(),
    "man_made": frozenset(
        {
            "pipeline",
            "embankment",
            "cutline",
            "breakwater",
            "groyne",
            "dyke",
            "goods_conveyor",
            "wire",
            "beam",
        }
    ),
    "aeroway": frozenset({"runway", "taxiway"}),
    "place": frozenset(),
    "historic": frozenset({"citywalls"}),
    "tourism": frozenset(),
    "military": frozenset({"trench"}),
    "power": frozenset({"line", "minor_line", "cable"}),
    "shop": frozenset(),
    "office": frozenset(),
    "craft": frozenset(),
    "golf": frozenset({"hole", "path", "cartpath"}),
    "area:highway": frozenset(),
    "emergency": frozenset(),
    "healthcare": frozenset(),
    "cemetery": frozenset(),
    "playground": frozenset(),
    "sport": frozenset(),
    "harbour": frozenset(),
    "ruins": frozenset(),
}
# key -> the values that ARE areas (all others are lines).
_AREA_VALUES: dict[str, frozenset[str]] = {
    "highway": frozenset({"rest_area", "services", "platform"}),
    "railway": frozenset({"platform", "station", "turntable", "roundhouse", "yard"}),
    "public_transport": frozenset({"platform", "station"}),
    "waterway": frozenset({"riverbank", "dock", "boatyard", "dam"}),
    "barrier": frozenset({"toll_booth", "border_control"}),
}


def is_area(tags: Mapping[str, str] | Any) -> bool:
    """True when a closed way with ``tags`` is a polygon rather than a ring-shaped line.

    ``tags`` is a mapping or an osmium ``TagList``.
    """
    flag = tags.get("area")
    if flag == "yes":
        return True
    if flag == "no":
        return False
    pairs = tags.items() if isinstance(tags, Mapping) else ((t.k, t.v) for t in tags)
    for k, v in pairs:
        not_area = _AREA_KEYS.get(k)
        if not_area is not None and v not in not_area:
            return True
        area_values = _AREA_VALUES.get(k)
        if area_values is not None and v in area_values:
            return True
    return False


#: The keys ``is_area`` looks at.
RULE_KEYS = frozenset(_AREA_KEYS) | frozenset(_AREA_VALUES) | {"area"}


def area_vote(key: str, value: str) -> int:
    """What one tag says of a closed way: 2 area (``area=yes``), -1 not (``area=no``), 1 a
    feature that covers ground, 0 nothing. ``is_area`` is: any 2, else no -1 and any 1."""
    if key == "area":
        return 2 if value == "yes" else -1 if value == "no" else 0
    return int(is_area({key: value}))
