"""Drawing the orthophoto: land cover, roads, rail, water, trees and buildings, with texture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from PIL import Image as PILImage

from ..errors import InputError

__all__ = ["render"]

# Land-cover classes, in drawing order (a later class covers an earlier one).
GROUND, URBAN, INDUSTRIAL, GRASS, PARK, SCRUB, FOREST, WATER, PLAZA, PARKING = range(10)
PLATFORM, RAIL_BED, FOOTWAY, MINOR_ROAD, ROAD, MAJOR_ROAD, TRAM = range(10, 17)
N_CLASSES = 17

# Base colour (R, G, B) and texture amplitudes (fine, medium, coarse) per class.
_STYLE = {
    GROUND: ((142, 138, 124), (7, 8, 10)),
    URBAN: ((150, 146, 138), (6, 7, 8)),
    INDUSTRIAL: ((158, 156, 150), (6, 6, 8)),
    GRASS: ((104, 136, 72), (9, 12, 12)),
    PARK: ((92, 128, 66), (10, 14, 12)),
    SCRUB: ((86, 108, 60), (14, 20, 10)),
    FOREST: ((52, 78, 42), (12, 26, 10)),
    WATER: ((38, 62, 84), (2, 4, 6)),
    PLAZA: ((178, 170, 158), (9, 5, 6)),
    PARKING: ((112, 112, 114), (6, 4, 5)),
    PLATFORM: ((186, 184, 178), (5, 3, 4)),
    RAIL_BED: ((116, 104, 92), (16, 6, 4)),
    FOOTWAY: ((170, 164, 152), (7, 4, 4)),
    MINOR_ROAD: ((104, 104, 106), (6, 4, 5)),
    ROAD: ((88, 88, 92), (5, 4, 5)),
    MAJOR_ROAD: ((78, 78, 82), (5, 4, 4)),
    TRAM: ((58, 56, 54), (6, 2, 2)),
}
# Road widths in metres by highway class, and the class they are drawn as.
_HIGHWAYS = {
    "motorway": (16.0, MAJOR_ROAD),
    "trunk": (14.0, MAJOR_ROAD),
    "primary": (12.0, MAJOR_ROAD),
    "secondary": (10.0, ROAD),
    "tertiary": (8.0, ROAD),
    "unclassified": (6.5, MINOR_ROAD),
    "residential": (6.5, MINOR_ROAD),
    "living_street": (5.0, MINOR_ROAD),
    "service": (4.0, MINOR_ROAD),
    "track": (3.0, MINOR_ROAD),
    "pedestrian": (5.0, FOOTWAY),
    "footway": (2.2, FOOTWAY),
    "path": (1.8, FOOTWAY),
    "cycleway": (2.4, FOOTWAY),
    "steps": (2.5, FOOTWAY),
    "trail": (1.6, FOOTWAY),
    "bridleway": (2.0, FOOTWAY),
    "platform": (3.0, PLATFORM),
}
_ROOFS = (
    (148, 72, 58),  # red tile
    (124, 64, 52),  # dark tile
    (96, 98, 104),  # grey metal
    (70, 72, 76),  # bitumen
    (168, 166, 160),  # light concrete
    (92, 134, 118),  # copper green
    (132, 118, 100),  # brown
    (182, 178, 170),  # white membrane
)


def _sea(coast_runs: list[np.ndarray], frame: Any) -> list[Any]:
    """Sea polygons inside ``frame`` from coastline runs (land on the left, sea on the right).

    Each run is extended from both ends to the frame's edge, the frame is cut along the runs,
    and each piece is sea when most points just right of the coastline fall inside it.
    """
    from shapely import geometry as sg
    from shapely.ops import polygonize, unary_union

    boundary = frame.boundary
    lines = []
    right_pts, left_pts = [], []
    for run in coast_runs:
        if len(run) < 2:
            continue
        ends = []
        for p in (run[0], run[-1]):
            q = boundary.interpolate(boundary.project(sg.Point(p)))
            ends.append((q.x, q.y))
        lines.append(sg.LineString([ends[0], *map(tuple, run), ends[1]]))
        d = np.diff(run, axis=0)
        norm = np.hypot(d[:, 0], d[:, 1])[:, None] + 1e-9
        right = np.column_stack([d[:, 1], -d[:, 0]]) / norm
        mid = (run[1:] + run[:-1]) / 2
        right_pts.append(mid + right)
        left_pts.append(mid - right)
    if not lines:
        return []
    faces = list(polygonize(unary_union([boundary, *[ln.intersection(frame) for ln in lines]])))
    rp, lp = np.concatenate(right_pts), np.concatenate(left_pts)
    sea = []
    for face in faces:
        votes = shapely.contains_xy(face, rp[:, 0], rp[:, 1]).sum()
        votes -= shapely.contains_xy(face, lp[:, 0], lp[:, 1]).sum()
        if votes > 0:
            sea.append(face)
    return sea


def _area_class(tags: dict[str, str]) -> int | None:
    natural, landuse, leisure = tags.get("natural"), tags.get("landuse"), tags.get("leisure")
    if (
        natural == "water"
        or tags.get("waterway") in ("riverbank", "dock")
        or landuse
        in (
            "basin",
            "reservoir",
        )
    ):
        return WATER
    if leisure == "swimming_pool":
        return WATER
    if landuse == "forest" or natural == "wood":
        return FOREST
    if natural in ("scrub", "heath"):
        return SCRUB
    if leisure in ("park", "garden"):
        return PARK
    if landuse in ("grass", "meadow", "village_green", "recreation_ground", "cemetery") or (
        natural == "grassland" or leisure in ("pitch", "playground")
    ):
        return GRASS
    if tags.get("amenity") == "parking":
        return PARKING
    if tags.get("railway") == "platform" or tags.get("highway") == "platform":
        return PLATFORM
    if (
        tags.get("highway") in ("pedestrian", "footway", "service")
        or "area:highway" in tags
        or tags.get("place") == "square"
        or tags.get("man_made") == "pier"
    ):
        return PLAZA
    if landuse in ("industrial", "railway", "construction", "brownfield"):
        return INDUSTRIAL
    if landuse in ("residential", "commercial", "retail", "civil", "education"):
        return URBAN
    return None


def _noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: random values every ``cell`` pixels, bilinearly upsampled."""
    if cell <= 1:
        return rng.uniform(-1, 1, (h, w)).astype(np.float32)
    small = rng.uniform(-1, 1, (h // cell + 2, w // cell + 2)).astype(np.float32)
    img = PILImage.fromarray(small, mode="F").resize(
        ((w // cell + 2) * cell, (h // cell + 2) * cell), PILImage.Resampling.BILINEAR
    )
    return np.asarray(img)[:h, :w]


def _project(wkbs: list[str], crs: str) -> np.ndarray:
    from pyproj import Transformer

    geoms = shapely.from_wkb(wkbs) if wkbs else np.array([], dtype=object)
    t = Transformer.from_crs("EPSG:4326", crs, always_xy=True)

    def fn(coords: np.ndarray) -> np.ndarray:
        x, y = t.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    geoms = shapely.transform(geoms, fn)
    return shapely.make_valid(geoms)


def _project_points(points: list[tuple[float, float]], crs: str) -> np.ndarray:
    from pyproj import Transformer

    lon, lat = np.asarray(points, dtype=np.float64).T
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    return np.column_stack([x, y])


def _rasterize(
    shapes: list[tuple[Any, int]], h: int, w: int, transform: Any, dtype: Any
) -> np.ndarray:
    from rasterio.features import rasterize

    if not shapes:
        return np.zeros((h, w), dtype=dtype)
    return rasterize(shapes, out_shape=(h, w), transform=transform, fill=0, dtype=dtype)


def _pixel_xy(transform: Any, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    cols = transform.c + (np.arange(w, dtype=np.float64) + 0.5) * transform.a
    rows = transform.f + (np.arange(h, dtype=np.float64) + 0.5) * transform.e
    return cols[None, :], rows[:, None]


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


@dataclass(frozen=True)
class _Frame:
    """The orthophoto's grid: ``h`` x ``w`` pixels of the config's GSD in its CRS, covering the
    extract's header box (snapped outwards to 10 m)."""

    transform: Any
    h: int
    w: int
    box: Any  # shapely box of the frame, in the CRS


def _frame(config: Any) -> _Frame:
    import osmium
    from affine import Affine
    from pyproj import Transformer

    box = osmium.io.Reader(str(config.pbf), osmium.osm.osm_entity_bits.NOTHING).header().box()
    t = Transformer.from_crs("EPSG:4326", config.crs, always_xy=True)
    lons = [box.bottom_left.lon, box.top_right.lon, box.bottom_left.lon, box.top_right.lon]
    lats = [box.bottom_left.lat, box.top_right.lat, box.top_right.lat, box.bottom_left.lat]
    if not box.valid():
        raise InputError(config.pbf, "the file has no bounding box in its header")
    xs, ys = t.transform(lons, lats)
    step = 10.0
    x0, x1 = np.floor(min(xs) / step) * step, np.ceil(max(xs) / step) * step
    y0, y1 = np.floor(min(ys) / step) * step, np.ceil(max(ys) / step) * step
    gsd = config.gsd
    w, h = int(round((x1 - x0) / gsd)), int(round((y1 - y0) / gsd))
    return _Frame(Affine(gsd, 0, x0, 0, -gsd, y1), h, w, shapely.box(x0, y0, x1, y1))


def _line_covers(tags: dict[str, str], geom: Any) -> list[tuple[int, Any]]:
    """The land cover a line paints: roads, rails and tram tracks, waterways (buffered)."""
    hw, rail, ww = tags.get("highway"), tags.get("railway"), tags.get("waterway")
    if hw in _HIGHWAYS:
        width, cls = _HIGHWAYS[hw]
        return [(cls, shapely.buffer(geom, width / 2, quad_segs=3))]
    if rail in ("rail", "light_rail", "subway", "narrow_gauge"):
        if tags.get("tunnel") in ("yes", "building_passage") or rail == "subway":
            return []
        return [
            (RAIL_BED, shapely.buffer(geom, 2.2, quad_segs=2)),
            (TRAM, shapely.buffer(geom, 0.8, cap_style="flat")),
        ]
    if rail == "tram":
        return [(TRAM, shapely.buffer(geom, 0.9, cap_style="flat"))]
    if ww in ("river", "canal", "stream", "ditch"):
        width = {"river": 12.0, "canal": 8.0}.get(ww, 2.0)
        return [(WATER, shapely.buffer(geom, width / 2))]
    return []


def _land_cover(
    osm: dict[str, list[Any]], crs: str, frame: _Frame
) -> tuple[list[tuple[int, Any]], list[tuple[Any, int]]]:
    """(class, geometry) of the land cover, in painting order (areas then lines, by class; a
    later shape overwrites an earlier one), and (geometry, OSM id) of the buildings."""
    covers: list[tuple[int, Any]] = []
    buildings: list[tuple[Any, int]] = []
    area_geoms = _project([a[0] for a in osm["areas"]], crs)
    for geom, (_, tags, osm_id) in zip(area_geoms, osm["areas"], strict=True):
        if geom is None or geom.is_empty:
            continue
        if tags.get("building", "no") != "no":
            buildings.append((geom, osm_id))
            continue
        cls = _area_class(tags)
        if cls is not None:
            covers.append((cls, geom))
    line_geoms = _project([ln[0] for ln in osm["lines"]], crs)
    for geom, (_, tags) in zip(line_geoms, osm["lines"], strict=True):
        if geom is not None and not geom.is_empty:
            covers += _line_covers(tags, geom)
    # Water bodies and sea cut by the extract's boundary.
    for runs in osm["partial_water"]:
        pts = np.concatenate([_project_points(r, crs) for r in runs])
        if len(pts) >= 3:
            poly = shapely.make_valid(shapely.Polygon(pts))
            covers.append((WATER, poly.intersection(frame.box)))
    coast = [_project_points(r, crs) for runs in osm["coastline"] for r in runs]
    covers.extend((WATER, sea) for sea in _sea(coast, frame.box))
    covers.sort(key=lambda c: c[0])  # stable: file order within a class
    return covers, buildings


def _paint_trees(
    img: np.ndarray, frame: _Frame, crowns: Any, centers: np.ndarray, radii: np.ndarray,
    noise: tuple[np.ndarray, np.ndarray],
) -> None:  # fmt: skip
    """Tree crowns, darker green, shaded as lit from the south-west (sun at 10:30 in June),
    with their shadows."""
    t_raster = _rasterize(
        [(g, i + 1) for i, g in enumerate(crowns)], frame.h, frame.w, frame.transform, np.int32
    )
    trees = t_raster > 0
    if not trees.any():
        return
    fine, med = noise
    px, py = _pixel_xy(frame.transform, frame.h, frame.w)
    idx = t_raster[trees] - 1
    xx = np.broadcast_to(px, (frame.h, frame.w))[trees] - centers[idx, 0]
    yy = np.broadcast_to(py, (frame.h, frame.w))[trees] - centers[idx, 1]
    lit = np.clip((-xx * 0.5 - yy * 0.5 + 0.0) / (radii[idx] + 1e-6), -1, 1)
    green = np.array([58, 88, 44], dtype=np.float32)
    tone = green[None, :] * (1 + 0.25 * lit[:, None]) + 18 * med[trees][:, None]
    img[trees] = tone + 8 * fine[trees][:, None]
    shadow = _shift(trees, 4, 5) & ~trees
    img[shadow] *= 0.7


def _gables(buildings: list[tuple[Any, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each building's centre, and the normal of its roof's long axis (its minimum rotated
    rectangle's) pointing to the shaded half."""
    centers = np.zeros((len(buildings), 2))
    normals = np.zeros((len(buildings), 2))
    for i, (g, _) in enumerate(buildings):
        rect = shapely.minimum_rotated_rectangle(g)
        c = np.asarray(rect.exterior.coords)[:4]
        e1, e2 = c[1] - c[0], c[2] - c[1]
        axis = e1 if np.hypot(*e1) >= np.hypot(*e2) else e2
        n = np.array([-axis[1], axis[0]]) / (np.hypot(*axis) + 1e-9)
        centers[i] = g.centroid.x, g.centroid.y
        normals[i] = n if (n[0] + n[1]) <= 0 else -n  # lit side faces the sun
    return centers, normals


def _paint_buildings(
    img: np.ndarray, frame: _Frame, buildings: list[tuple[Any, int]],
    noise: tuple[np.ndarray, np.ndarray],
) -> None:  # fmt: skip
    """Buildings: cast shadows first, then roofs (a colour per OSM id) with gable shading and
    darker eaves."""
    h, w = frame.h, frame.w
    b_raster = _rasterize(
        [(g, i + 1) for i, (g, _) in enumerate(buildings)], h, w, frame.transform, np.int32
    )
    bmask = b_raster > 0
    if not bmask.any():
        return
    fine, med = noise
    shadow = np.zeros_like(bmask)
    for k in range(2, 14, 2):  # taller buildings: a longer shadow band
        shadow |= _shift(bmask, k, int(k * 0.6))
    shadow &= ~bmask
    img[shadow] *= 0.55
    roofs = np.array(
        [_ROOFS[(osm_id * 2654435761 >> 7) % len(_ROOFS)] for _, osm_id in buildings],
        dtype=np.float32,
    )
    centers, normals = _gables(buildings)
    px, py = _pixel_xy(frame.transform, h, w)
    idx = b_raster[bmask] - 1
    xx = np.broadcast_to(px, (h, w))[bmask] - centers[idx, 0]
    yy = np.broadcast_to(py, (h, w))[bmask] - centers[idx, 1]
    side = xx * normals[idx, 0] + yy * normals[idx, 1]
    factor = np.where(side > 0, 1.12, 0.86).astype(np.float32)
    roof = roofs[idx] * factor[:, None] + 5 * fine[bmask][:, None] + 4 * med[bmask][:, None]
    img[bmask] = roof
    eaves = bmask & ~(
        _shift(bmask, 1, 0) & _shift(bmask, -1, 0) & _shift(bmask, 0, 1) & _shift(bmask, 0, -1)
    )
    img[eaves] *= 0.8


def render(config: Any, osm: dict[str, list[Any]]) -> tuple[np.ndarray, Any, int]:
    """The orthophoto of ``osm`` (the extract's shapes) as (3, h, w) uint8, its transform and
    the number of features painted."""
    frame = _frame(config)
    h, w = frame.h, frame.w
    rng = np.random.default_rng(config.seed)
    covers, buildings = _land_cover(osm, config.crs, frame)
    cls_raster = _rasterize([(g, c) for c, g in covers], h, w, frame.transform, np.uint8)
    # Trees: crowns of 2.5 to 4.5 m radius.
    tree_pts = _project([tr[0] for tr in osm["trees"]], config.crs)
    radii = np.array([2.5 + (tid * 2654435761 % 1000) / 500.0 for _, tid in osm["trees"]])
    crowns = shapely.buffer(tree_pts, radii, quad_segs=4) if len(tree_pts) else []
    # Colour and texture of the land cover; water with gentle ripples.
    base = np.array([_STYLE[c][0] for c in range(N_CLASSES)], dtype=np.float32)
    amps = np.array([_STYLE[c][1] for c in range(N_CLASSES)], dtype=np.float32)
    fine, med, coarse = _noise(rng, h, w, 1), _noise(rng, h, w, 6), _noise(rng, h, w, 48)
    a = amps[cls_raster]
    shade = a[..., 0] * fine + a[..., 1] * med + a[..., 2] * coarse
    img = base[cls_raster] + shade[..., None]
    water = cls_raster == WATER
    img[water, 2] += 6 * med[water]
    centers = np.array([[p.x, p.y] for p in tree_pts], dtype=np.float64).reshape(-1, 2)
    _paint_trees(img, frame, crowns, centers, radii, (fine, med))
    _paint_buildings(img, frame, buildings, (fine, med))
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    features = len(covers) + len(buildings) + len(crowns)
    return out, frame.transform, features
