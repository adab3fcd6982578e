"""Reading an OSM extract for the orthophoto: areas, lines, trees and cut water/coastline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["read_osm"]


def read_osm(pbf: Path) -> dict[str, list[Any]]:
    """Geometries (EPSG:4326 hex WKB) by role: areas with tags, lines with tags, tree points."""
    import osmium
    from osmium.osm import Area, Node, Way

    wkb = osmium.geom.WKBFactory()
    areas: list[tuple[str, dict[str, str], int]] = []
    lines: list[tuple[str, dict[str, str]]] = []
    trees: list[tuple[str, int]] = []
    # Ways cut by the extract's boundary (nodes outside have no location): water bodies and
    # coastline, as runs of known (lon, lat) points.
    partial_water: list[list[list[tuple[float, float]]]] = []
    coastline: list[list[list[tuple[float, float]]]] = []
    area_keys = {"building", "landuse", "natural", "leisure", "amenity", "place", "water"}
    area_keys |= {"waterway", "highway", "area:highway", "railway", "man_made"}
    try:
        processor = osmium.FileProcessor(str(pbf)).with_locations().with_areas()
        for obj in processor:
            tags = obj.tags
            if isinstance(obj, Area):
                if not any(k in tags for k in area_keys):
                    continue
                try:
                    geom = wkb.create_multipolygon(obj)
                except (RuntimeError, osmium.InvalidLocationError):
                    continue
                areas.append((geom, dict(tags), obj.orig_id()))
            elif isinstance(obj, Way):
                natural = tags.get("natural")
                if natural == "coastline" or (
                    natural == "water" and obj.is_closed() and not _all_located(obj)
                ):
                    runs = _located_runs(obj)
                    (coastline if natural == "coastline" else partial_water).append(runs)
                if "highway" in tags or "railway" in tags or "waterway" in tags:
                    if tags.get("area") == "yes":
                        continue
                    try:
                        lines.append((wkb.create_linestring(obj), dict(tags)))
                    except (RuntimeError, osmium.InvalidLocationError):
                        continue
            elif isinstance(obj, Node) and tags.get("natural") == "tree" and obj.location.valid():
                trees.append((wkb.create_point(obj), obj.id))
    except RuntimeError as e:
        raise InputError(pbf, f"not a readable OSM file: {e}") from None
    return {
        "areas": areas,
        "lines": lines,
        "trees": trees,
        "partial_water": partial_water,
        "coastline": coastline,
    }


def _all_located(way: Any) -> bool:
    return all(n.location.valid() for n in way.nodes)


def _located_runs(way: Any) -> list[list[tuple[float, float]]]:
    """The way's nodes with a known location, split where nodes are missing."""
    runs: list[list[tuple[float, float]]] = [[]]
    for n in way.nodes:
        if n.location.valid():
            runs[-1].append((n.location.lon, n.location.lat))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if len(r) >= 2]
