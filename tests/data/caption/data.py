"""Make the caption tests' dataset: a few meta folders of SkyScript meta pickles.

Run ``python tests/data/caption/data.py OUT_DIR`` to look at it; the tests call
``make_dataset(path)``. Seeded: the same call writes the same files. The folders are
``meta2``, ``meta3`` and ``meta10`` (so that "images10/" must sort after "images1..." and
before "images2/"), holding the paper's five examples, odd tags (unicode, commas, quotes,
newlines, OSM value lists) and seeded random objects, each with its image in ``images{k}/`` (the
same small JPEG: caption only looks for it).
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

from PIL import Image

from skyscript_build.meta import dumps_meta, make_meta

#: (file stem, center_tags, surrounding_tags, title, title_multi_objects): the paper's table.
PAPER_EXAMPLES = [
    (
        "a198234555_CH_19",
        {"landuse": "quarry", "resource": "bauxite"},
        [],
        "landuse of quarry, resource of bauxite",
        "landuse of quarry with resource of bauxite",
    ),
    (
        "a2_US_20",
        {"landuse": "farmland", "crop": "cotton"},
        [],
        "landuse of farmland, crop of cotton",
        "landuse of farmland with crop of cotton",
    ),
    (
        "n3_ES_21",
        {"amenity": "fountain"},
        [{"natural": "tree"}, {"highway": "footway"}],
        "amenity of fountain",
        "amenity of fountain, surrounded by natural tree; road of footway",
    ),
    (
        "n4_FI_18",
        {"power": "pole"},
        [{"power": "line", "cables": "3", "voltage": "16000"}],
        "power pole",
        "power pole, surrounded by power line with cables of 3 and voltage of 16000",
    ),
    (
        "w5_DE_22",
        {"man_made": "pier"},
        [{"waterway": "river"}],
        "man made pier",
        "man made pier, surrounded by waterway of river",
    ),
]

#: Tags that stress the CSV: unicode, commas, quotes, newlines, value lists.
ODD_TAGS = [
    ("a10_CH_19", {"building": "yes", "roof:shape": "gable"}, [{"natural": "tree"}] * 3),
    ("a11_CH_19", {"amenity": 'café, "Zum Löwen"'}, [{"shop": "bäckerei; 面包"}]),
    ("a12_CH_19", {"leisure": "pitch", "sport": "soccer;tennis;;soccer"}, []),
    ("a13_CH_19", {"man_made": "tower", "height": "35 m", "tower:type": "communication"}, []),
    ("a14_CH_19", {"natural": "water\nlake", "note": "ignored"}, [{"name": "Only a name"}]),
    ("a15_CH_19", {"landuse": 'quote "inside"'}, [{"highway": "path", "width": "1.5"}]),
    ("a16_CH_19", {"name": "no visual tag"}, []),  # an empty caption
    ("n17_CH_19", {"emoji": "🌲🌲", "ratio": "1:1000"}, [{}]),
]

KEYS = ["building", "highway", "landuse", "natural", "amenity", "surface", "lanes", "crop"]
VALUES = ["yes", "residential", "grass", "tree", "parking", "asphalt", "2", "wheat", "yes"]


def _random_tags(rng: random.Random) -> dict[str, str]:
    return {rng.choice(KEYS): rng.choice(VALUES) for _ in range(rng.randrange(1, 4))}


def jpeg_bytes() -> bytes:
    """A small valid JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def make_dataset(root: str | Path, n_random: int = 60, seed: int = 0, images: bool = True) -> Path:
    """Write the dataset under ``root`` (without ``images{k}/`` when not ``images``)."""
    root = Path(root)
    rng = random.Random(seed)
    folders = ["meta2", "meta3", "meta10"]
    jpeg = jpeg_bytes()
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        if images:
            (root / ("images" + folder[4:])).mkdir(exist_ok=True)
    items = [(stem, center, around) for stem, center, around, _, _ in PAPER_EXAMPLES]
    items += ODD_TAGS
    for i in range(n_random):
        around = [_random_tags(rng) for _ in range(rng.randrange(0, 5))]
        items.append(
            (
                f"{rng.choice('nwa')}{rng.randrange(10**6)}_FI_{i % 7 + 17}",
                _random_tags(rng),
                around,
            )
        )
    for i, (stem, center, around) in enumerate(items):
        meta = make_meta((24.9, 60.1, 24.91, 60.11), (2019, 6, 1, 10, 30), center, around)
        folder = folders[i % len(folders)]
        (root / folder / f"{stem}.pickle").write_bytes(dumps_meta(meta))
        if images:
            (root / ("images" + folder[4:]) / f"{stem}.jpg").write_bytes(jpeg)
    return root


if __name__ == "__main__":
    print(make_dataset(sys.argv[1] if len(sys.argv) > 1 else "caption-dataset"))
