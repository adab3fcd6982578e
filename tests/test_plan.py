"""The plan stage: source choice, framing, seeded shift, surroundings, sampling, CLI errors."""

from __future__ import annotations

import functools
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from conftest import load_fixture_script
from pyproj import Transformer

import image_sources
from skyscript_build.plan import MARKER, PlanConfig, run_plan

fx = load_fixture_script("plan")

TOLERANCE_M = 1e-6


def objects(tmp_path: Path, rows, name: str = "objects") -> Path:
    folder = tmp_path / name
    fx.write_objects(folder, rows)
    return folder


def read_requests(out: Path) -> list[dict]:
    rows = []
    for part in sorted(out.glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return rows


def geometries(rows) -> dict[str, shapely.Geometry]:
    return {f"{r[0]}{r[1]}": r[5] for r in rows}


@functools.lru_cache(maxsize=8)
def to_crs(crs: str) -> Transformer:
    return Transformer.from_crs(4326, crs, always_xy=True)


def assert_box_holds(req: dict, geom: shapely.Geometry) -> None:
    """The object, projected into the tile's CRS, lies inside the tile's box."""
    tr = to_crs(req["crs"])
    projected = shapely.transform(geom, lambda c: np.column_stack(tr.transform(c[:, 0], c[:, 1])))
    x0, y0, x1, y1 = projected.bounds
    t = TOLERANCE_M
    assert req["x_min"] - t <= x0 and x1 <= req["x_max"] + t, req["key"]
    assert req["y_min"] - t <= y0 and y1 <= req["y_max"] + t, req["key"]


def _objects(bounds: np.ndarray, max_gsd: np.ndarray):
    """Areas with these boxes (for the functions that read only boxes and GSDs)."""
    from skyscript_build.plan._objects import Objects

    n = len(bounds)
    return Objects(
        kind=np.full(n, 3, dtype=np.int8), element=np.full(n, 2, dtype=np.int8),
        osm_id=np.arange(n), bounds=bounds, max_gsd=max_gsd, tag_offsets=np.arange(n + 1),
        tag_keys=None, tag_values=None, dropped={},
    )  # fmt: skip


def projected_box(geom: shapely.Geometry, crs: str) -> tuple[float, float, float, float]:
    """The bounds of an object's lon/lat box in ``crs``, as the plan takes them: the box's
    corners and the middles of its edges, projected."""
    w, s, e, n = geom.bounds
    fx_, fy_ = [0, 0.5, 1, 1, 1, 0.5, 0, 0], [0, 0, 0, 0.5, 1, 1, 1, 0.5]
    xs, ys = to_crs(crs).transform([w + (e - w) * f for f in fx_], [s + (n - s) * f for f in fy_])
    return min(xs), min(ys), max(xs), max(ys)


def test_boxes_hold_objects_pixels_in_range_and_keys(tmp_path):
    swiss = [(t, i + 100_000, e, tags, g, geom) for t, i, e, tags, g, geom in fx.switzerland()]
    rows = fx.city(300, seed=1) + swiss
    out = tmp_path / "requests"
    result = run_plan(PlanConfig(objects=objects(tmp_path, rows), out=out, seed=3))
    reqs = read_requests(out)
    assert result.requests == len(reqs) == len(rows)
    geoms = geometries(rows)
    for r in reqs:
        assert_box_holds(r, geoms[f"{r['osm_type']}{r['osm_id']}"])
        assert 256 <= r["width"] == r["height"] <= 1024
        assert r["x_max"] - r["x_min"] == pytest.approx(r["width"] * r["gsd"])
        assert r["y_max"] - r["y_min"] == pytest.approx(r["height"] * r["gsd"])
        assert r["key"] == f"{r['osm_type']}{r['osm_id']}_{r['alias']}_{r['years'][0] % 100:02d}"
        assert r["west"] < r["east"] and r["south"] < r["north"]
        assert r["collection"] == image_sources.get_source(r["alias"]).collection
        for corner in ("x_min", "y_min", "x_max", "y_max"):  # on the lattice of whole pixels
            pixels = r[corner] / r["gsd"]
            assert pixels == pytest.approx(round(pixels), abs=1e-6), (r["key"], corner)
    by_alias = Counter(r["alias"] for r in reqs)
    assert by_alias["FI"] == 300, "Helsinki objects go to the 0.5 m Finnish orthophoto"
    fi = [r for r in reqs if r["alias"] == "FI"]
    assert {r["crs"] for r in fi} == {"EPSG:3067"} and fi[0]["years"][0] == 2022
    points = [r for r in fi if r["osm_type"] == "n"]
    assert {r["width"] for r in points} == {512}, "points get the fixed pixel size"
    assert len({r["key"] for r in reqs}) == len(reqs)


def test_point_in_switzerland_gets_ch_and_a_3km_farmland_a_coarser_source(tmp_path):
    out = tmp_path / "requests"
    run_plan(PlanConfig(objects=objects(tmp_path, fx.switzerland()), out=out))
    by_id = {r["osm_id"]: r for r in read_requests(out)}
    tree, farmland = by_id[1], by_id[2]
    assert (tree["alias"], tree["gsd"], tree["width"]) == ("CH", 0.1, 512)
    assert tree["crs"] == "EPSG:2056"
    assert farmland["gsd"] > 0.1 and farmland["alias"] == "S2"
    assert 256 <= farmland["width"] <= 1024
    assert farmland["crs"] == "EPSG:32632", "global sources use the local UTM zone"
    # With only CH allowed the farmland does not fit: skipped as too large, and counted.
    result = run_plan(
        PlanConfig(objects=tmp_path / "objects", out=tmp_path / "ch", sources=("CH",))
    )
    assert result.skipped == {"too-large": 1} and result.requests == 4


def test_outside_every_coverage_is_skipped_and_counted(tmp_path, cli):
    rows = fx.switzerland() + [
        ("n", 99, "node", {"natural": "tree"}, 0.6, shapely.Point(fx.ATLANTIC))
    ]
    folder = objects(tmp_path, rows)
    out = tmp_path / "requests"
    proc = cli("plan", "--objects", folder, "--out", out, "--sources", "CH,FI")
    assert proc.returncode == 0, proc.stderr
    assert "outside-coverage 1" in proc.stdout and "too-large 1" in proc.stdout
    stats = json.loads((out / MARKER).read_text())
    assert stats["skipped"] == {"outside-coverage": 1, "too-large": 1}
    assert {r["osm_id"] for r in read_requests(out)} == {1, 3, 4, 5}
    # A building in the sea is covered only by 10-30 m sources: none is fine enough.
    result = run_plan(
        PlanConfig(objects=objects(tmp_path, fx.outside(), "sea"), out=tmp_path / "sea-req")
    )
    assert result.requests == 0 and result.skipped == {"no-source-fine-enough": 1}


def test_coverage_grid_agrees_with_geos_near_a_concave_border():
    """The grid of cells wholly inside a coverage (no GEOS call for most objects) decides
    exactly as shapely.contains, for objects on, near and across a concave border."""
    from skyscript_build.plan._choose import _covered

    # A U-shaped coverage: the notch puts a concave border through the middle.
    u_shape = shapely.Polygon([(0, 0), (3, 0), (3, 3), (2, 3), (2, 1), (1, 1), (1, 3), (0, 3)])
    source = image_sources.source_from_dict(
        {"alias": "UU", "gsd": 1.0, "years": [2020], "coverage": u_shape.wkt}
    )
    rng = np.random.default_rng(4)
    x, y = rng.uniform(-0.2, 3.2, 3000), rng.uniform(-0.2, 3.2, 3000)
    size = rng.choice([0.0, 1e-4, 0.01, 0.3], 3000)
    geoms = np.concatenate(
        [
            shapely.points(x[:1000], y[:1000]),
            shapely.box(x[1000:], y[1000:], x[1000:] + size[1000:], y[1000:] + size[1000:]),
        ]
    )
    objs = _objects(shapely.bounds(geoms), np.full(len(geoms), 1.0))
    got = _covered(source, objs, np.arange(len(geoms)), threads=2)
    assert np.array_equal(got, shapely.contains(u_shape, geoms))
    assert 0.2 * len(got) < got.sum() < 0.9 * len(got)  # both answers are well represented


def test_shift_is_seeded_and_output_byte_identical(tmp_path):
    rows = fx.city(200, seed=2)
    folder = objects(tmp_path, rows)
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_plan(PlanConfig(objects=folder, out=tmp_path / name, seed=seed))
        runs[name] = [p.read_bytes() for p in sorted((tmp_path / name).glob("part-*.parquet"))]
    assert runs["a"] == runs["b"], "same objects + seed -> byte-identical parquet"
    assert runs["a"] != runs["c"]
    a, c = read_requests(tmp_path / "a"), read_requests(tmp_path / "c")
    moved = sum(ra["x_min"] != rc["x_min"] for ra, rc in zip(a, c, strict=True))
    assert moved > 0.9 * len(a), "a different seed shifts (nearly) every tile differently"
    geoms = geometries(rows)
    for r in c:
        assert_box_holds(r, geoms[f"{r['osm_type']}{r['osm_id']}"])
    # Off-centre: the point is not at the tile's centre, and not always on the same side.
    pts = [r for r in a if r["osm_type"] == "n"]
    tr = Transformer.from_crs(4326, "EPSG:3067", always_xy=True)
    rel = []
    for r in pts:
        x, _ = tr.transform(*geoms[f"n{r['osm_id']}"].coords[0])
        rel.append((x - r["x_min"]) / (r["x_max"] - r["x_min"]))
    rel_a = np.array(rel)
    assert rel_a.min() < 0.35 and rel_a.max() > 0.65 and rel_a.min() >= 0.1


def test_surroundings_inside_and_groundable_at_the_tiles_gsd(tmp_path):
    origin = fx.BERN
    rows = [
        ("n", 1, "node", {"natural": "tree"}, 0.6, fx.point(origin)),  # focus
        ("a", 2, "way", {"building": "yes"}, 1.0, fx.square(origin, 20, 20, 10)),  # inside
        ("n", 3, "node", {"natural": "tree"}, 0.6, fx.point(origin, -30, 15)),  # inside, 0.6
        ("a", 4, "way", {"building": "yes"}, 1.0, fx.square(origin, 2000, 0, 10)),  # far
        ("w", 5, "way", {"highway": "primary"}, 1.0, fx.line(origin, -500, 0, 1000)),  # crosses
        (
            "a",
            6,
            "way",
            {"building": "yes", "natural": "tree"},
            1.0,
            fx.square(origin, -40, -40, 10),
        ),  # fmt: skip
    ]
    folder = objects(tmp_path, rows)
    # A custom 0.8 m source over Bern: trees (0.6 m) are not visible at it, buildings are.
    coarse = image_sources.source_from_dict(
        {
            "alias": "TESTC",
            "gsd": 0.8,
            "years": [2020],
            "coverage": [7.0, 46.5, 8.0, 47.5],
            "backend": "xyz",
            "location": "http://127.0.0.1:1/{z}/{x}/{y}.png",
        }  # fmt: skip
    )
    image_sources.add_source(coarse, replace=True)
    try:
        out = tmp_path / "fine"
        run_plan(PlanConfig(objects=folder, out=out, sources=("CH",), point_px=1024, shift=0))
        tile = {r["osm_id"]: r for r in read_requests(out)}[1]
        assert sorted(map(dict, [dict(s) for s in tile["surrounding_tags"]]), key=str) == sorted(
            [{"building": "yes"}, {"natural": "tree"}, {"building": "yes", "natural": "tree"}],
            key=str,
        )
        out = tmp_path / "coarse"
        run_plan(PlanConfig(objects=folder, out=out, sources=("TESTC",), point_px=256, shift=0))
        reqs = {r["osm_id"]: r for r in read_requests(out)}
        assert 1 not in reqs and 3 not in reqs, "trees are not recognisable at 0.8 m"
        building = reqs[2]
        around = [dict(s) for s in building["surrounding_tags"]]
        assert {"natural": "tree"} not in around
        assert {"building": "yes"} in around, "object 6 shows only its building tag at 0.8 m"
        assert dict(reqs[6]["center_tags"]) == {"building": "yes"}
        for req in reqs.values():
            assert {"highway": "primary"} not in [dict(s) for s in req["surrounding_tags"]]
        # The cap.
        out = tmp_path / "capped"
        run_plan(PlanConfig(objects=folder, out=out, sources=("CH",), max_surrounding=1))
        assert all(len(r["surrounding_tags"]) <= 1 for r in read_requests(out))
    finally:
        image_sources.remove_source("TESTC")


def test_sampling_caps_common_tags_and_keeps_rare_ones(tmp_path):
    """Per-tag quotas: a rare tag keeps every object, a common one about ``cap`` (each of its
    objects is kept with probability cap / count, from the seeded hash)."""
    rows = fx.city(1500, seed=4)
    folder = objects(tmp_path, rows)
    tags_of = {f"{r[0]}{r[1]}": next(iter(r[3].items())) for r in rows}
    totals = Counter(tags_of.values())
    cap = 60
    result = run_plan(PlanConfig(objects=folder, out=tmp_path / "a", per_tag_cap=cap, seed=1))
    kept = Counter(tags_of[f"{r['osm_type']}{r['osm_id']}"] for r in read_requests(tmp_path / "a"))
    for tag, total in totals.items():
        if total <= cap:
            assert kept[tag] == total, tag
        else:  # binomial(total, cap / total): within four standard deviations
            assert abs(kept[tag] - cap) <= 4 * np.sqrt(cap), (tag, total, kept[tag])
    assert any(t > 3 * cap for t in totals.values()) and any(t <= cap for t in totals.values())
    assert result.skipped["sampled-out"] == sum(totals.values()) - sum(kept.values())
    # Deterministic with the seed, different with another seed.
    run_plan(PlanConfig(objects=folder, out=tmp_path / "b", per_tag_cap=cap, seed=1))
    run_plan(PlanConfig(objects=folder, out=tmp_path / "c", per_tag_cap=cap, seed=2))
    ids = {k: {r["key"] for r in read_requests(tmp_path / k)} for k in "abc"}
    assert ids["a"] == ids["b"] != ids["c"]


def test_sampling_and_limit_do_not_depend_on_the_partitions(tmp_path):
    """The quotas and the max_requests cut are decided per object from global numbers: one
    partition, many small ones, and many read units (scan tasks) give the same requests."""
    rows = fx.city(1500, seed=8)
    folder = tmp_path / "objects"
    for part in range(3):  # three parts: several scan tasks
        fx.write_objects(folder, rows[part::3], part=part)
    keys = {}
    for name, deg, target in (("one", 360.0, 10**6), ("grid", 0.004, 120), ("split", 0.02, 40)):
        out = tmp_path / name
        result = run_plan(
            PlanConfig(objects=folder, out=out, per_tag_cap=80, max_requests=200, seed=5,
                       shard_deg=deg, partition_objects=target)
        )  # fmt: skip
        assert result.requests == 200
        keys[name] = sorted(r["key"] for r in read_requests(out))
        parts = len(list(out.glob("part-*.parquet")))
        assert parts == 1 if name == "one" else parts > 8, (name, parts)
    assert keys["one"] == keys["grid"] == keys["split"]


def test_rerun_reuses_and_changed_settings_replan(tmp_path):
    folder = objects(tmp_path, fx.city(100, seed=3))
    out = tmp_path / "requests"
    first = run_plan(PlanConfig(objects=folder, out=out))
    again = run_plan(PlanConfig(objects=folder, out=out))
    assert again.reused and again.requests == first.requests
    other = run_plan(PlanConfig(objects=folder, out=out, max_px=600, rows_per_part=30))
    assert not other.reused
    rows = [pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")]
    assert sum(rows) == other.requests and max(rows) == 30
    assert all(r["width"] <= 600 for r in read_requests(out))
    assert pq.read_table(out).num_rows == other.requests, "the folder reads as one dataset"


def test_a_crashed_plan_resumes_with_the_partitions_it_finished(tmp_path, monkeypatch):
    """A partition fails mid-run: the rerun with the same settings runs only the partitions
    not marked done and gives the same bytes as a clean run; other settings start over."""
    import skyscript_build.plan.stage as plan

    folder = objects(tmp_path, fx.city(400, seed=6, size_m=800.0))
    clean = tmp_path / "clean"
    run_plan(
        PlanConfig(
            objects=folder, out=clean, shard_deg=0.004, rows_per_part=40, partition_objects=60
        )
    )
    assert not (clean / plan.WORK_DIR).exists(), "the scan files are gone once finished"
    n_parts = len(list((clean / "_shards").glob("*.done.json")))
    assert n_parts >= 4

    out = tmp_path / "requests"
    config = PlanConfig(
        objects=folder, out=out, shard_deg=0.004, rows_per_part=40, workers=2, partition_objects=60
    )
    real_run_partition = plan.run_partition
    ran: list[int] = []

    def failing(task):
        if task.number == 2:
            raise OSError("disk full (simulated)")
        ran.append(task.number)
        return real_run_partition(task)

    monkeypatch.setattr(plan, "run_partition", failing)
    with pytest.raises(OSError, match="simulated"):
        run_plan(config)
    assert not (out / MARKER).exists(), "an unfinished plan never looks finished"
    assert len(ran) == n_parts - 1

    ran.clear()
    monkeypatch.setattr(
        plan, "run_partition", lambda task: ran.append(task.number) or real_run_partition(task)
    )
    result = run_plan(config)
    assert ran == [2], "only the partition that failed runs again"
    assert result.resumed_shards == n_parts - 1
    assert "resumed" in result.summary()
    assert not (out / plan.PENDING).exists()
    same = {p.name: p.read_bytes() for p in sorted(clean.glob("part-*.parquet"))}
    assert {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))} == same

    # Other settings: every partition runs again, no part of the earlier run is kept.
    (out / MARKER).unlink()
    (out / plan.PENDING).write_text(json.dumps({"settings_hash": "other"}))
    ran.clear()
    run_plan(
        PlanConfig(
            objects=folder, out=out, shard_deg=0.004, rows_per_part=40, seed=9,
            partition_objects=60,
        )
    )  # fmt: skip
    assert sorted(ran) == list(range(len(list((out / "_shards").glob("*.done.json")))))


def test_dry_run_prints_the_cost_and_writes_nothing(tmp_path, cli):
    swiss = [(t, i + 100_000, e, tags, g, geom) for t, i, e, tags, g, geom in fx.switzerland()]
    folder = objects(tmp_path, fx.city(50, seed=5) + swiss)
    out = tmp_path / "requests"
    proc = cli("plan", "--objects", folder, "--out", out, "--dry-run", "--years", "2019-2020")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["source", "requests", "megapixels", "disk", "time"]
    table = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(table) == {"CH", "FI", "S2", "total"} and table["FI"][1] == "50"
    assert table["total"][1] == "55"
    assert "would request 55 images" in lines[-1]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sources", "CH,XX"], "unknown image source 'XX'"),
        (["--min-px", "2000", "--max-px", "1024"], "min_px (2000) is larger than max_px"),
        (["--years", "20x9"], "--years '20x9'"),
        (["--sources", "ES", "--years", "2022"], "ES has no imagery in 2022"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, cli, args, message):
    folder = objects(tmp_path, fx.switzerland())
    out = tmp_path / "requests"
    proc = cli("plan", "--objects", folder, "--out", out, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and not out.exists()


def test_empty_or_missing_objects_folder(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    for folder, message in (
        (tmp_path / "empty", "no part-*.parquet files"),
        (tmp_path / "nowhere", "objects folder not found"),
    ):
        proc = cli("plan", "--objects", folder, "--out", tmp_path / "requests")
        assert proc.returncode == 2 and message in proc.stderr and str(folder) in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "part-00000.parquet").write_text("not parquet")
    proc = cli("plan", "--objects", bad, "--out", tmp_path / "requests")
    assert proc.returncode == 2 and "part-00000.parquet" in proc.stderr
    assert not (tmp_path / "requests").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("skyscript_build.commands.extract") is None,
    reason="the extract stage is not there yet",
)
def test_real_helsinki_objects(tmp_path, cli, helsinki_pbf):
    proc = cli("extract", helsinki_pbf, "--out", tmp_path / "objects")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "requests"
    proc = cli(
        "plan", "--objects", tmp_path / "objects", "--out", out, "--sources", "FI",
        "--years", "2019",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reqs = read_requests(out)
    assert len(reqs) > 100
    assert all(r["key"].endswith("_FI_19") and r["crs"] == "EPSG:3067" for r in reqs)
    assert sum(len(r["surrounding_tags"]) > 0 for r in reqs) > len(reqs) / 2


def test_output_does_not_depend_on_workers(tmp_path):
    """Shards on 1 thread, on 2 threads and as tasks on 2 Dask worker processes."""
    from distributed import LocalCluster

    folder = objects(tmp_path, fx.city(400, seed=6, size_m=800.0))
    files = {}
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        for name, workers, scheduler in (
            ("1", 1, None), ("2", 2, None), ("dask", 1, cluster.scheduler_address)
        ):  # fmt: skip
            out = tmp_path / name
            config = PlanConfig(
                objects=folder, out=out, workers=workers, scheduler=scheduler, rows_per_part=70
            )
            result = run_plan(config)
            files[name] = {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}
            # Parts are cut per spatial shard (grid cell), each shard into parts of <= 70 rows.
            assert len(files[name]) >= -(-result.requests // 70)
            assert sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) == 400
    assert files["1"] == files["2"] == files["dask"], "same parts, byte for byte"


def _visible_tags(tags: dict, max_gsd: float, gsd: float) -> dict:
    """The tags visible at ``gsd`` (a tag the filter does not know: the object's max_gsd)."""
    from tag_filters import load_tag_filter

    tf = load_tag_filter("default")
    return {k: v for k, v in tags.items() if (tf.tag_max_gsd(k, v) or max_gsd) >= gsd * (1 - 1e-9)}


@pytest.mark.parametrize("cap", [10_000, 5])
def test_surroundings_match_a_brute_force_check(tmp_path, cap):
    """Every tile's surroundings are exactly the objects inside it (their lon/lat box
    projected into the tile's CRS) with a tag visible at its GSD, checked object by object;
    with a cap, as many as fit."""
    rows = fx.city(300, seed=7, size_m=600.0)
    out = tmp_path / "requests"
    run_plan(PlanConfig(objects=objects(tmp_path, rows), out=out, max_surrounding=cap, seed=2))
    reqs = read_requests(out)
    checked = 0
    for req in reqs:
        expected = []
        for t, i, _, tags, max_gsd, geom in rows:
            if (t, i) == (req["osm_type"], req["osm_id"]):
                continue
            x0, y0, x1, y1 = projected_box(geom, req["crs"])
            inside = (
                x0 >= req["x_min"] and x1 <= req["x_max"]
                and y0 >= req["y_min"] and y1 <= req["y_max"]
            )  # fmt: skip
            visible = _visible_tags(tags, max_gsd, req["gsd"])
            if inside and visible:
                expected.append(tuple(sorted(visible.items())))
        got = [tuple(sorted(dict(m).items())) for m in req["surrounding_tags"]]
        assert len(got) == min(cap, len(expected)), req["key"]
        assert Counter(got) <= Counter(expected), req["key"]
        checked += len(expected) > 0
    assert checked > len(reqs) / 2


@pytest.mark.parametrize("cap", [10_000, 5])
def test_sharded_plan_equals_the_unsharded_one(tmp_path, cap):
    """Shards of a fine grid (objects and tiles straddle many cell borders) give the same
    rows as one shard holding everything: keys, boxes, centre and surrounding tags."""
    folder = objects(tmp_path, fx.city(300, seed=7, size_m=600.0))
    rows = {}
    for deg in (360.0, 0.0015):
        out = tmp_path / f"shard-{deg}"
        run_plan(
            PlanConfig(
                objects=folder, out=out, shard_deg=deg, max_surrounding=cap, seed=3,
                partition_objects=30,
            )
        )  # fmt: skip
        rows[deg] = sorted(read_requests(out), key=lambda r: r["key"])
        parts = len(list(out.glob("part-*.parquet")))
        assert parts == 1 if deg == 360.0 else parts > 4
    assert len(rows[360.0]) > 100
    assert sum(len(r["surrounding_tags"]) for r in rows[360.0]) > 0
    assert rows[0.0015] == rows[360.0]


@pytest.mark.parametrize("cap", [1, 7, 60, None])
def test_surroundings_kernel_keeps_the_lowest_priorities(cap):
    """The surroundings kernel against a brute force: the objects inside each tile (bounds
    within the box, its own object left out, visible at its GSD), and over the cap the ``cap``
    of lowest seeded priority, equal priorities broken by the lower object; in object order.
    Dense clusters put hundreds of objects in a tile (the sparse priority levels and their
    retries), sparse ones a few."""
    from skyscript_build.plan._geo import STREAM_SURROUND, ProjectedBounds, uniform
    from skyscript_build.plan._surround import surroundings

    rng = np.random.default_rng(11)
    n = 6000
    centre = np.where(rng.random(n) < 0.7, rng.normal(50, 3, n), rng.uniform(0, 100, n))
    x = np.where(rng.random(n) < 0.5, centre, rng.uniform(0, 100, n))
    y = rng.normal(50, 3, n) * (x == centre) + rng.uniform(0, 100, n) * (x != centre)
    size = rng.choice([0.0, 0.05, 0.5, 3.0], n)
    bounds = np.column_stack([x, y, x + size, y + size])
    h = rng.integers(0, 2**63, n).astype(np.uint64)
    h[1::7] = h[0]  # equal priorities: ties broken by the object
    visible_gsd = rng.choice([0.5, 10.0], n)
    objs = _objects(bounds, visible_gsd)
    focus = rng.choice(n, 900, replace=False)
    side = rng.choice([2.0, 8.0, 30.0], len(focus))
    shift = rng.uniform(0, 1, (len(focus), 2)) * np.maximum(side[:, None] - size[focus, None], 0)
    xy = np.column_stack([x[focus] - shift[:, 0], y[focus] - shift[:, 1]])
    xy = np.column_stack([xy, xy + side[:, None]])
    gsd = rng.choice([0.5, 10.0], len(focus))
    epsg = np.full(len(focus), 3067)
    proj = ProjectedBounds(bounds, 1, {3067: bounds})  # already "projected"

    pair_req, pair_obj = surroundings(
        objs, visible_gsd, focus, epsg, gsd, xy, xy, proj, h, cap, threads=2
    )
    priority = uniform(h, STREAM_SURROUND)
    over_cap = 0
    for r in range(len(focus)):
        b = xy[r]
        inside = np.flatnonzero(
            (bounds[:, 0] >= b[0]) & (bounds[:, 2] <= b[2])
            & (bounds[:, 1] >= b[1]) & (bounds[:, 3] <= b[3])
            & (visible_gsd >= gsd[r]) & (np.arange(n) != focus[r])
        )  # fmt: skip
        if cap is not None and len(inside) > cap:
            over_cap += 1
            inside = np.sort(inside[np.lexsort((inside, priority[inside]))[:cap]])
        assert np.array_equal(pair_obj[pair_req == r], inside), r
    assert np.all(np.diff(pair_req) >= 0)
    if cap is not None and cap < 60:
        assert over_cap > len(focus) / 4


def test_a_worker_killed_mid_plan_on_dask(tmp_path, dask_cluster):
    """On a real scheduler and two workers (1.5 GiB each), one worker is killed while the
    partitions run: the run (or, if it fails, its rerun) ends with the parts of a local run."""
    import subprocess
    import sys
    import time

    folder = objects(tmp_path, fx.city(4000, seed=9, size_m=3000.0))
    local = tmp_path / "local"
    run_plan(
        PlanConfig(objects=folder, out=local, shard_deg=0.004, workers=1, partition_objects=300)
    )
    out = tmp_path / "dask"
    args = [
        sys.executable, "-m", "skyscript_build.cli", "plan", "--objects", str(folder),
        "--out", str(out), "--shard-deg", "0.004", "--partition-objects", "300",
        "--scheduler", dask_cluster["address"],
    ]  # fmt: skip
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "_shards").glob("*.done.json")):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no partition finished"
            time.sleep(0.02)
        dask_cluster["workers"][0].kill()
        done_at_kill = len(list((out / "_shards").glob("*.done.json")))
        stdout, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    if run.returncode != 0:  # the scheduler gave up on a task: the rerun resumes
        again = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
    else:
        assert "plan: planned" in stdout, err[-3000:]
    parts = {p.name: p.read_bytes() for p in sorted(local.glob("part-*.parquet"))}
    assert len(parts) > 10
    assert done_at_kill < len(parts), "the worker was killed after the plan had finished"
    assert {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))} == parts
