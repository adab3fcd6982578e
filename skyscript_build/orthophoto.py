"""The synthetic orthophoto of the demo: an OSM extract rendered at 0.5 m into a GeoTIFF.

No real imagery ships with the project, so the demo's Earth Engine emulator serves this
picture as collection ``Finland/SMK/V/50cm``: ground, land use, grass, parks, forest and scrub,
water, plazas, roads by class, rail and tram lines, trees, and buildings with roof tones, gable
shading and cast shadows, plus seeded texture so that tiles are not flat colour. It is
synthetic, and says so: in its GeoTIFF tags, in the collection's ``SYNTHETIC`` property and in
every description. Map data (c) OpenStreetMap contributors, ODbL.

The same PBF, settings and seed give a byte-identical file; a rerun whose outputs match the
inputs does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from PIL import Image as PILImage

from .errors import ConfigError, InputError
from .files import atomic_path, atomic_write_text

__all__ = [
    "OrthophotoConfig",
    "OrthophotoResult",
    "render_orthophoto",
    "run_orthophoto",
    "ATTRIBUTION",
]

log = logging.getLogger(__name__)

ATTRIBUTION = "synthetic, rendered from OpenStreetMap data (c) OpenStreetMap contributors, ODbL"
RENDERER_VERSION = "2"

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


@dataclass(frozen=True)
class OrthophotoConfig:
    """Settings of one rendering.

    Args:
        pbf: the OSM extract (.osm.pbf).
        out: output folder (the GeoTIFF and ``collections.yaml``).
        gsd: metres per pixel.
        crs: the projected CRS of the GeoTIFF.
        seed: seed of the texture.
        collection: the collection id registered in ``collections.yaml``.
        time_start: the acquisition time registered for the image (ISO 8601).
        force: render even if matching outputs exist.
    """

    pbf: Path
    out: Path
    gsd: float = 0.5
    crs: str = "EPSG:3067"
    seed: int = 0
    collection: str = "Finland/SMK/V/50cm"
    time_start: str = "2019-06-15T10:30:00Z"
    force: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "pbf", Path(self.pbf))
        object.__setattr__(self, "out", Path(self.out))
        if not self.pbf.is_file():
            raise InputError(self.pbf, "OSM extract not found")
        if not 0.05 <= self.gsd <= 100:
            raise ConfigError(f"--gsd must be between 0.05 and 100 metres, got {self.gsd}")
        from pyproj import CRS

        try:
            crs = CRS.from_user_input(self.crs)
        except Exception:  # noqa: BLE001 - pyproj's CRSError
            raise ConfigError(f"unknown CRS {self.crs!r}") from None
        if not crs.is_projected:
            raise ConfigError(f"the CRS must be projected (metres), got {self.crs}")
        from .emulator.collections import parse_time_ms

        try:
            parse_time_ms(self.time_start)
        except ValueError:
            raise ConfigError(f"time_start {self.time_start!r} is not ISO 8601") from None

    @property
    def tif_path(self) -> Path:
        """The GeoTIFF written."""
        return self.out / "helsinki_orthophoto_synthetic.tif"

    @property
    def collections_path(self) -> Path:
        """The emulator's collections file written."""
        return self.out / "collections.yaml"


@dataclass(frozen=True)
class OrthophotoResult:
    """What a rendering produced."""

    tif: Path
    collections: Path
    width: int
    height: int
    features: int
    skipped: bool
    seconds: float

    def summary(self) -> str:
        """One line for the CLI."""
        if self.skipped:
            return f"orthophoto: up to date, {self.tif} ({self.width}x{self.height} px)"
        return (
            f"orthophoto: {self.tif} ({self.width}x{self.height} px, {self.features} features, "
            f"{ATTRIBUTION}) and {self.collections} in {self.seconds:.1f} s"
        )


def _settings_key(config: OrthophotoConfig) -> str:
    h = hashlib.sha256()
    with open(config.pbf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(
        repr(
            (
                RENDERER_VERSION,
                config.gsd,
                config.crs,
                config.seed,
                config.collection,
                config.time_start,
            )
        ).encode()
    )
    return h.hexdigest()[:16]


def _collections_yaml(config: OrthophotoConfig, key: str) -> str:
    import yaml

    entry = {
        "path": config.tif_path.name,
        "time_start": config.time_start,
        "id": f"helsinki_{config.time_start[:4]}_synthetic",
        "bands": ["R", "G", "B"],
        "properties": {
            "SYNTHETIC": 1,
            "description": ATTRIBUTION,
            "source": config.pbf.name,
            "render_key": key,
        },
    }
    header = (
        "# Written by `skyscript-build orthophoto`: the demo's synthetic orthophoto as an\n"
        f"# Earth Engine collection for the emulator. {ATTRIBUTION}.\n"
    )
    return header + yaml.safe_dump({config.collection: [entry]}, sort_keys=False)


def _up_to_date(config: OrthophotoConfig, key: str) -> tuple[int, int] | None:
    import rasterio

    if not (config.tif_path.is_file() and config.collections_path.is_file()):
        return None
    try:
        with rasterio.open(config.tif_path) as ds:
            if ds.tags().get("RENDER_KEY") != key:
                return None
            size = (ds.width, ds.height)
    except rasterio.errors.RasterioIOError:
        return None
    if config.collections_path.read_text() != _collections_yaml(config, key):
        return None
    return size


# -- reading OSM ------------------------------------------------------------------------------
def _read_osm(pbf: Path) -> dict[str, list[Any]]:
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


# -- rendering ---------------------------------------------------------------------------------
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


def _render(config: OrthophotoConfig, osm: dict[str, list[Any]]) -> tuple[np.ndarray, Any, int]:
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
    transform = Affine(gsd, 0, x0, 0, -gsd, y1)
    rng = np.random.default_rng(config.seed)

    # Land cover: areas then lines, in class order (later shapes overwrite earlier ones).
    area_geoms = _project([a[0] for a in osm["areas"]], config.crs)
    covers: list[tuple[int, Any]] = []
    buildings: list[tuple[Any, int]] = []
    for geom, (_, tags, osm_id) in zip(area_geoms, osm["areas"], strict=True):
        if geom is None or geom.is_empty:
            continue
        if tags.get("building", "no") != "no":
            buildings.append((geom, osm_id))
            continue
        cls = _area_class(tags)
        if cls is not None:
            covers.append((cls, geom))
    line_geoms = _project([ln[0] for ln in osm["lines"]], config.crs)
    for geom, (_, tags) in zip(line_geoms, osm["lines"], strict=True):
        if geom is None or geom.is_empty:
            continue
        hw, rail, ww = tags.get("highway"), tags.get("railway"), tags.get("waterway")
        if hw in _HIGHWAYS:
            width, cls = _HIGHWAYS[hw]
            covers.append((cls, shapely.buffer(geom, width / 2, quad_segs=3)))
        elif rail in ("rail", "light_rail", "subway", "narrow_gauge"):
            if tags.get("tunnel") in ("yes", "building_passage") or rail == "subway":
                continue
            covers.append((RAIL_BED, shapely.buffer(geom, 2.2, quad_segs=2)))
            covers.append((TRAM, shapely.buffer(geom, 0.8, cap_style="flat")))
        elif rail == "tram":
            covers.append((TRAM, shapely.buffer(geom, 0.9, cap_style="flat")))
        elif ww in ("river", "canal", "stream", "ditch"):
            width = {"river": 12.0, "canal": 8.0}.get(ww, 2.0)
            covers.append((WATER, shapely.buffer(geom, width / 2)))
    # Water bodies and sea cut by the extract's boundary.
    frame = shapely.box(x0, y0, x1, y1)
    for runs in osm["partial_water"]:
        pts = np.concatenate([_project_points(r, config.crs) for r in runs])
        if len(pts) >= 3:
            poly = shapely.make_valid(shapely.Polygon(pts))
            covers.append((WATER, poly.intersection(frame)))
    coast = [_project_points(r, config.crs) for runs in osm["coastline"] for r in runs]
    covers.extend((WATER, sea) for sea in _sea(coast, frame))
    covers.sort(key=lambda c: c[0])  # stable: file order within a class
    cls_raster = _rasterize([(g, c) for c, g in covers], h, w, transform, np.uint8)

    # Buildings: id raster (index + 1), roofs chosen per OSM id.
    b_raster = _rasterize(
        [(g, i + 1) for i, (g, _) in enumerate(buildings)], h, w, transform, np.int32
    )
    # Trees: crowns of 2.5 to 4.5 m radius.
    tree_pts = _project([tr[0] for tr in osm["trees"]], config.crs)
    radii = np.array([2.5 + (tid * 2654435761 % 1000) / 500.0 for _, tid in osm["trees"]])
    crowns = shapely.buffer(tree_pts, radii, quad_segs=4) if len(tree_pts) else []
    t_raster = _rasterize([(g, i + 1) for i, g in enumerate(crowns)], h, w, transform, np.int32)

    # Colour and texture of the land cover.
    base = np.array([_STYLE[c][0] for c in range(N_CLASSES)], dtype=np.float32)
    amps = np.array([_STYLE[c][1] for c in range(N_CLASSES)], dtype=np.float32)
    fine, med, coarse = _noise(rng, h, w, 1), _noise(rng, h, w, 6), _noise(rng, h, w, 48)
    a = amps[cls_raster]
    shade = a[..., 0] * fine + a[..., 1] * med + a[..., 2] * coarse
    img = base[cls_raster] + shade[..., None]
    # Water: gentle ripples, a bit of blue-green tint variation.
    water = cls_raster == WATER
    img[water, 2] += 6 * med[water]

    # Trees: darker green, crown shading lit from the south-west (sun at 10:30 in June).
    px, py = _pixel_xy(transform, h, w)
    trees = t_raster > 0
    if trees.any():
        centers = np.array([[p.x, p.y] for p in tree_pts], dtype=np.float64)
        idx = t_raster[trees] - 1
        xx = np.broadcast_to(px, (h, w))[trees] - centers[idx, 0]
        yy = np.broadcast_to(py, (h, w))[trees] - centers[idx, 1]
        lit = np.clip((-xx * 0.5 - yy * 0.5 + 0.0) / (radii[idx] + 1e-6), -1, 1)
        green = np.array([58, 88, 44], dtype=np.float32)
        tone = green[None, :] * (1 + 0.25 * lit[:, None]) + 18 * med[trees][:, None]
        img[trees] = tone + 8 * fine[trees][:, None]
        shadow = _shift(trees, 4, 5) & ~trees
        img[shadow] *= 0.7

    # Buildings: cast shadows first, then roofs with gable shading and darker eaves.
    bmask = b_raster > 0
    if bmask.any():
        shadow = np.zeros_like(bmask)
        for k in range(2, 14, 2):  # taller buildings: a longer shadow band
            shadow |= _shift(bmask, k, int(k * 0.6))
        shadow &= ~bmask
        img[shadow] *= 0.55
        roofs = np.array(
            [_ROOFS[(osm_id * 2654435761 >> 7) % len(_ROOFS)] for _, osm_id in buildings],
            dtype=np.float32,
        )
        # Gable: the roof's long axis (minimum rotated rectangle) splits it into a lit half
        # and a shaded half.
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
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    features = len(covers) + len(buildings) + len(crowns)
    return out, transform, features


def render_orthophoto(config: OrthophotoConfig) -> OrthophotoResult:
    """Render ``config.pbf`` into ``config.tif_path`` and write ``config.collections_path``."""
    import rasterio

    start = time.perf_counter()
    key = _settings_key(config)
    if not config.force:
        size = _up_to_date(config, key)
        if size is not None:
            log.debug("orthophoto: %s is up to date", config.tif_path)
            return OrthophotoResult(
                config.tif_path, config.collections_path, size[0], size[1], 0, True, 0.0
            )
    osm = _read_osm(config.pbf)
    pixels, transform, features = _render(config, osm)
    _, h, w = pixels.shape
    config.out.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 3,
        "dtype": "uint8",
        "crs": config.crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
        "photometric": "RGB",
        "interleave": "pixel",
    }
    with atomic_path(config.tif_path) as tmp, rasterio.open(tmp, "w", **profile) as ds:
        ds.write(pixels)
        ds.update_tags(
            TIFFTAG_IMAGEDESCRIPTION=ATTRIBUTION,
            TIFFTAG_COPYRIGHT="Map data (c) OpenStreetMap contributors, ODbL",
            TIFFTAG_SOFTWARE="skyscript-build orthophoto",
            SYNTHETIC="1",
            ATTRIBUTION=ATTRIBUTION,
            RENDER_KEY=key,
        )
        ds.descriptions = ("R", "G", "B")
    atomic_write_text(config.collections_path, _collections_yaml(config, key))
    seconds = time.perf_counter() - start
    return OrthophotoResult(
        config.tif_path, config.collections_path, w, h, features, False, seconds
    )


run_orthophoto = render_orthophoto
