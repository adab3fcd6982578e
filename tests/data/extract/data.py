"""OSM fixtures for the extract tests, written as OPL text (one line per object, as in
pyosmium's tests) and turned into .osm.pbf files with pyosmium.

Run ``python tests/data/extract/data.py OUT_DIR`` to write ``problems.osm.pbf`` for a look;
the tests call ``opl_to_pbf`` themselves. ``rechunk`` rewrites a file with small blobs, so
that a small file splits into many extract tasks.

OPL escapes: ``%20%`` space, ``%2c%`` comma, ``%3d%`` equals sign, ``%a%`` newline,
``%22%`` double quote, ``%40%`` at sign.
"""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

import osmium

#: Objects that exercise the per-object problems and the odd tags.
PROBLEMS_OPL = """\
n1 v1 x24.9400000 y60.1700000
n2 v1 x24.9410000 y60.1700000
n3 v1 x24.9410000 y60.1710000
n4 v1 x24.9400000 y60.1710000
n5 v1 x24.9420000 y60.1700000 Tamenity=bench,name=Penkki%2c%%20%%22%Kallio%22%
n6 v1 x24.9430000 y60.1700000 Tamenity=bench,note=line%a%break
n7 v1 x24.9440000 y60.1700000 Tname=only%20%a%20%name
n8 v1 x24.9450000 y60.1700000 Tnatural=tree,leaf_type=broadleaved,species=Tilia%20%×%20%europaea
n9 v1 x24.9450000 y60.1710000 Ttourism=artwork,artwork_type=statue%2c%%20%bronze%3d%1
n10 v1 x24.9500000 y60.1700000
n14 v1 x24.9460000 y60.1710000 Tlanduse=piha%2c%%20%%22%sisä%22%%a%rivi,sport=boules;pétanque
n11 v1 x24.9510000 y60.1710000
n12 v1 x24.9500000 y60.1710000
n13 v1 x24.9510000 y60.1700000
n20 v1 x24.9600000 y60.1700000
n21 v1 x24.9610000 y60.1700000
n22 v1 x24.9610000 y60.1710000
w100 v1 Nn1,n2,n3,n4,n1 Tbuilding=yes,roof:shape=gabled,name=Talo%20%ö
w101 v1 Nn1,n2,n3,n4,n1 Thighway=footway
w102 v1 Nn1,n2,n3,n4,n1 Tbarrier=fence
w103 v1 Nn1,n2,n3,n4,n1 Thighway=pedestrian,area=yes
w104 v1 Nn1,n2,n999 Thighway=residential
w105 v1 Nn10,n11,n12,n13,n10 Tbuilding=yes
w106 v1 Nn1,n2 Thighway=service,surface=asphalt
w107 v1 Nn1,n2,n3 Tname=Nimetön%20%polku
w108 v1 Nn20,n21 Tbuilding=yes
w109 v1 Nn20,n21,n22 Tleisure=park
r200 v1 Mw108@outer,w109@outer Ttype=multipolygon,landuse=grass
r201 v1 Mw100@outer Ttype=multipolygon,natural=water,water=pond
r202 v1 Mw100@outer Ttype=route,route=bus
"""


def opl_to_pbf(opl: str, path: str | Path) -> Path:
    """Write OPL text as an .osm.pbf file (objects sorted by type and id, as osmium expects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opl_path = path.with_name(path.name.split(".")[0] + ".opl")
    opl_path.write_text(opl, encoding="utf-8")
    writer = osmium.SimpleWriter(str(path), overwrite=True)
    try:
        for obj in osmium.FileProcessor(str(opl_path)):
            writer.add(obj)
    finally:
        writer.close()
    opl_path.unlink()
    return path


def _framed_blobs(path: Path) -> list[bytes]:
    """Every blob of a PBF file as its bytes in the file (length, BlobHeader, Blob)."""
    data = path.read_bytes()
    blobs, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        header = data[pos + 4 : pos + 4 + length]
        size, i = 0, 0
        while i < len(header):  # BlobHeader: field 3 (datasize) is the only varint field
            key = header[i]
            i += 1
            if key & 7 == 2:
                n = header[i]
                i += 1 + n
            else:
                shift = 0
                value = 0
                while True:
                    b = header[i]
                    i += 1
                    value |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                size = value
        end = pos + 4 + length + size
        blobs.append(data[pos:end])
        pos = end
    return blobs


def rechunk(src: str | Path, dst: str | Path, per_blob: int = 400) -> Path:
    """Write ``src`` again with at most ``per_blob`` objects in a blob: the same objects in the
    same order, in many small blobs (each chunk written by pyosmium, their blobs joined)."""
    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        chunks: list[Path] = []
        writer = None
        count = 0
        for obj in osmium.FileProcessor(str(src)):
            if writer is None:
                chunks.append(Path(tmp) / f"{len(chunks):05d}.osm.pbf")
                writer = osmium.SimpleWriter(str(chunks[-1]))
            writer.add(obj)
            count += 1
            if count == per_blob:
                writer.close()
                writer, count = None, 0
        if writer is not None:
            writer.close()
        blobs = [b for i, c in enumerate(chunks) for b in _framed_blobs(c)[(0 if i == 0 else 1) :]]
    dst.write_bytes(b"".join(blobs))
    return dst


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(opl_to_pbf(PROBLEMS_OPL, out / "problems.osm.pbf"))
