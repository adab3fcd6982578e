"""The filter stage with a real open_clip model: the tiny random config, nothing downloaded."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_fixture_script

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from skyscript_build.errors import (  # noqa: E402
    ConfigError,
    InputError,
    MissingDependencyError,
)
from skyscript_build.filter import (  # noqa: E402
    CLIP_CONFIG_DIR,
    FilterConfig,
    output_names,
    run_filter,
)
from skyscript_build.filter._scoring import Scorer, ScoreSettings, cut_shards  # noqa: E402
from skyscript_build.filter._selection import (  # noqa: E402
    size_label,
    top_count,
    top_label,
)
from skyscript_build.filter._store import read_store, stat_images  # noqa: E402
from skyscript_build.meta import load_meta  # noqa: E402

fixture = load_fixture_script("filter")


def read_scores(out: Path) -> pd.DataFrame:
    return read_store(out)[0]


N = 40


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "ds"
    return root, fixture.make(root, n=N)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-random checkpoint file with seeded random weights."""
    open_clip.add_model_config(CLIP_CONFIG_DIR)
    torch.manual_seed(123)
    model = open_clip.create_model("tiny-random", pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def config(root: Path, csv: Path, pretrained: str | Path, **kw) -> FilterConfig:
    kw.setdefault("val_size", 4)
    kw.setdefault("test_size", 6)
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 8)
    return FilterConfig(
        dataset=root,
        captions=csv,
        name="tiny",
        model="tiny-random",
        pretrained=str(pretrained),
        **kw,
    )


def read_outputs(cfg: FilterConfig) -> dict[str, pd.DataFrame]:
    return {
        label: pd.read_csv(cfg.out_dir / name, dtype={"filepath": str})
        for label, name in output_names(cfg).items()
    }


def test_scores_equal_an_independent_open_clip_computation(dataset, checkpoint):
    root, csv = dataset
    result = run_filter(config(root, csv, checkpoint))
    assert result.scored_new == N and result.reused == 0
    scores = pd.read_parquet(root / "scores.parquet")
    assert list(scores.columns)[:4] == ["filepath", "similarity", "model", "pretrained"]
    assert len(scores) == N and set(scores["model"]) == {"tiny-random"}

    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-random", pretrained=str(checkpoint)
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-random")
    captions = pd.read_csv(csv).head(5)
    from PIL import Image

    with torch.no_grad():
        images = torch.stack(
            [preprocess(Image.open(root / p).convert("RGB")) for p in captions["filepath"]]
        )
        img = model.encode_image(images)
        txt = model.encode_text(tokenizer(captions["title"].tolist()))
        expected = img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))
        expected = expected.sum(-1).numpy()
    got = scores.set_index("filepath").loc[captions["filepath"], "similarity"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    # the CSV column carries the same scores, 6 decimals
    train = read_outputs(config(root, csv, checkpoint))["top50pct"]
    merged = train.merge(scores, on="filepath")
    np.testing.assert_allclose(merged["similarity_tiny"], merged["similarity"], atol=1e-6)


def test_decode_workers_give_the_same_scores(dataset, checkpoint, tmp_path):
    root, csv = dataset
    inline = run_filter(config(root, csv, checkpoint, out=tmp_path / "a"))
    parallel = run_filter(config(root, csv, checkpoint, out=tmp_path / "b", workers=2))
    assert inline.scored_new == parallel.scored_new == N
    a = pd.read_parquet(tmp_path / "a" / "scores.parquet")
    b = pd.read_parquet(tmp_path / "b" / "scores.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_exact_counts_disjoint_splits_and_byte_identical_outputs(dataset, checkpoint, tmp_path):
    root, csv = dataset
    cfg_a = config(root, csv, checkpoint, top=(0.3, 0.5, 0.25), out=tmp_path / "a")
    cfg_b = config(root, csv, checkpoint, top=(0.3, 0.5, 0.25), out=tmp_path / "b")
    result = run_filter(cfg_a)
    run_filter(cfg_b)
    names = output_names(cfg_a)
    assert names["top30pct"] == "SkyScript_train_top30pct_filtered_by_tiny.csv"
    assert names["val"] == "SkyScript_val_4_filtered_by_tiny.csv"
    for name in names.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    out = read_outputs(cfg_a)
    assert list(out["val"].columns) == [
        "filepath",
        "title",
        "title_multi_objects",
        "similarity_tiny",
    ]
    pool = N - 4 - 6
    assert (result.val, result.test, result.pool) == (4, 6, pool)
    assert len(out["val"]) == 4 and len(out["test"]) == 6
    assert len(out["top30pct"]) == 9  # 0.3 * 30
    assert len(out["top50pct"]) == 15
    assert len(out["top25pct"]) == 8  # 7.5 rounds half up
    val, test = set(out["val"]["filepath"]), set(out["test"]["filepath"])
    train = set(out["top50pct"]["filepath"])
    assert not val & test and not val & train and not test & train
    assert set(out["top30pct"]["filepath"]) < train
    # the top fraction is the highest-scoring part of the pool (val and test excluded)
    all_rows = set(pd.read_csv(csv)["filepath"])
    pool_rows = all_rows - val - test
    scores = pd.read_parquet(tmp_path / "a" / "scores.parquet").set_index("filepath")["similarity"]
    top = out["top30pct"]["filepath"]
    rest = pool_rows - set(top)
    assert scores[list(top)].min() >= scores[list(rest)].max()
    assert list(top) == sorted(top)


def test_splits_depend_on_seed_and_stay_put_as_the_dataset_grows(dataset, checkpoint, tmp_path):
    root, csv = dataset
    full = config(root, csv, checkpoint, out=tmp_path / "full")
    run_filter(full)
    out = read_outputs(full)
    held = set(out["val"]["filepath"]) | set(out["test"]["filepath"])
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    smaller_csv = tmp_path / "smaller.csv"
    df[df["filepath"].isin(held) | (df.index % 2 == 0)].to_csv(smaller_csv, index=False)
    smaller = config(root, smaller_csv, checkpoint, out=tmp_path / "smaller")
    run_filter(smaller)
    for split in ("val", "test"):
        assert read_outputs(smaller)[split].equals(out[split])
    reseeded = config(root, csv, checkpoint, out=tmp_path / "reseeded", seed=1)
    run_filter(reseeded)
    assert set(read_outputs(reseeded)["val"]["filepath"]) != set(out["val"]["filepath"])


def test_rerun_scores_nothing_new_and_keeps_other_models(dataset, checkpoint):
    root, csv = dataset
    first = run_filter(config(root, csv, checkpoint))
    before = {p.name: p.read_bytes() for p in root.glob("SkyScript_*_by_tiny.csv")}
    again = run_filter(config(root, csv, checkpoint))
    assert (first.scored_new, again.scored_new, again.reused) == (N, 0, N)
    after = {p.name: p.read_bytes() for p in root.glob("SkyScript_*_by_tiny.csv")}
    assert before == after

    # another checkpoint (random weights): scored anew, the first model's rows are kept
    other = run_filter(config(root, csv, "none"))
    assert other.scored_new == N
    scores = read_scores(root)
    assert len(scores) == 2 * N
    assert set(scores["pretrained"]) == {first.identity, "none:seed0"}
    assert first.identity.startswith("file:tiny.pt:")

    # a changed caption is scored again, only that one
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[3, "title"] = "something else entirely"
    df.to_csv(csv, index=False)
    changed = run_filter(config(root, csv, checkpoint))
    assert (changed.scored_new, changed.reused) == (1, N - 1)


def test_missing_and_corrupt_images_are_reported_and_left_out(dataset, checkpoint):
    root, csv = dataset
    rows = pd.read_csv(csv)["filepath"].tolist()
    missing, corrupt, truncated = rows[1], rows[7], rows[12]
    (root / missing).unlink()
    (root / corrupt).write_bytes(b"not a jpeg at all")
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 3])
    cfg = config(root, csv, checkpoint)
    result = run_filter(cfg)
    assert result.failed == {"corrupt": 2, "missing": 1}
    assert result.failed_examples == sorted([missing, corrupt, truncated])
    assert result.kept == N - 3 and result.scored_new == N - 3
    assert "3 images left out" in result.summary()
    out = read_outputs(cfg)
    written = set().union(*(set(df["filepath"]) for df in out.values()))
    assert not written & {missing, corrupt, truncated}
    assert len(read_scores(root)) == N - 3
    stats = json.loads((root / "SkyScript_filter_stats_tiny.json").read_text())
    assert stats["failed"] == {"corrupt": 2, "missing": 1}


def test_a_stopped_run_resumes_per_shard(dataset, checkpoint):
    root, csv = dataset
    df = pd.read_csv(csv)
    paths, texts = df["filepath"].tolist(), df["title"].tolist()
    shards = cut_shards(paths, texts, stat_images(root, paths), root=root, out=root, shard_size=16)
    assert [len(s.filepaths) for s in shards] == [16, 16, 8]
    scorer = Scorer(ScoreSettings("tiny-random", str(checkpoint), batch_size=8), "cpu")
    seen: list[int] = []

    def stop(n: int) -> None:
        seen.append(n)
        if len(seen) == 3:  # after the second shard's first batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scorer.run(shards, workers=0, on_batch=stop)
    assert [p.name for p in (root / "scores.parts").iterdir()] == ["part-000000.parquet"]
    assert len(read_scores(root)) == 16  # the finished shard
    result = run_filter(config(root, csv, checkpoint, shard_size=16))
    assert (result.scored_new, result.reused, result.shards) == (N - 16, 16, 2)
    assert not (root / "scores.parts").exists()
    assert len(pd.read_parquet(root / "scores.parquet")) == N


def test_geo_split_keeps_grid_cells_whole(dataset, checkpoint):
    root, csv = dataset
    cfg = config(root, csv, checkpoint, split_by="geo", val_size=5, test_size=5)
    result = run_filter(cfg)
    out = read_outputs(cfg)
    # five cells of eight rows: one whole cell each for val and test
    assert (result.val, result.test, result.pool) == (8, 8, 24)

    def cell(fp: str) -> tuple[int, int]:
        folder, name = fp.split("/")
        box = load_meta(
            str(root / folder.replace("images", "meta") / name.replace(".jpg", ".pickle"))
        )["box"]
        return int(np.floor((box[0] + box[2]) / 2 / 0.1)), int(
            np.floor((box[1] + box[3]) / 2 / 0.1)
        )

    pool = (
        set(pd.read_csv(csv)["filepath"])
        - set(out["val"]["filepath"])
        - set(out["test"]["filepath"])
    )
    cells = {
        split: {cell(fp) for fp in rows}
        for split, rows in (
            ("val", out["val"]["filepath"]),
            ("test", out["test"]["filepath"]),
            ("pool", pool),
        )
    }
    assert not cells["val"] & cells["test"]
    assert not cells["val"] & cells["pool"] and not cells["test"] & cells["pool"]

    # rows without a readable meta file never go to val or test
    no_meta = sorted(out["val"]["filepath"])[:2]
    for fp in no_meta:
        folder, name = fp.split("/")
        (root / folder.replace("images", "meta") / name.replace(".jpg", ".pickle")).unlink()
    again = run_filter(cfg)
    assert again.scored_new == 0
    out = read_outputs(cfg)
    held = set(out["val"]["filepath"]) | set(out["test"]["filepath"])
    assert not held & set(no_meta)
    assert again.val >= 5 and again.test >= 5 and again.val + again.test + again.pool == N


def test_missing_open_clip_names_the_extra(dataset, monkeypatch):
    root, csv = dataset
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingDependencyError, match=r"skyscript-build\[clip\]"):
        run_filter(config(root, csv, "none"))


def test_labels_and_exact_counts():
    assert top_count(0.3, 10) == 3
    assert top_count(0.29, 100) == 29
    assert top_count(0.7, 10) == 7
    assert top_count(0.5, 7) == 4
    assert top_count(1.0, 7) == 7
    assert top_label(0.3) == "top30pct" and top_label(0.125) == "top12.5pct"
    assert top_label(1.0) == "top100pct"
    assert size_label(5000) == "5K" and size_label(30000) == "30K" and size_label(200) == "200"
    assert size_label(2_000_000) == "2M" and size_label(1500) == "1500"


def test_bad_settings_are_clear_errors(dataset, tmp_path):
    root, csv = dataset
    with pytest.raises(ConfigError, match="--top"):
        config(root, csv, "none", top=(0.3, 1.5))
    with pytest.raises(ConfigError, match="--name"):
        FilterConfig(dataset=root, captions=csv, name="a b", model="m", pretrained="none")
    with pytest.raises(ConfigError, match=r"leave no training rows out of 40.*--val-size 4"):
        run_filter(config(root, csv, "none", val_size=30, test_size=10))
    with pytest.raises(ConfigError, match="unknown CLIP model 'no-such-model'"):
        run_filter(
            FilterConfig(
                dataset=root,
                captions=csv,
                name="x",
                model="no-such-model",
                pretrained="none",
                val_size=1,
                test_size=1,
            )
        )
    with pytest.raises(ConfigError, match="neither an existing checkpoint file nor a known tag"):
        run_filter(config(root, csv, "no-such-tag"))
    bad = tmp_path / "bad.csv"
    bad.write_text("filepath,title\nimages2/x.jpg,building\n")
    with pytest.raises(InputError, match="lacks column"):
        run_filter(config(root, bad, "none"))
    assert not list(root.glob("SkyScript_*_filtered_by_*.csv"))


def test_cli_errors_exit_2_with_one_line(dataset, tmp_path, cli):
    root, csv = dataset
    args = ["filter", "--dataset", root, "--name", "tiny", "--model", "tiny-random",
            "--val-size", "4", "--test-size", "6", "--workers", "0"]  # fmt: skip
    proc = cli(*args, "--captions", tmp_path / "nope.csv", "--pretrained", "none")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"skyscript-build filter: error: {tmp_path / 'nope.csv'}: caption CSV not found "
        "(run `skyscript-build caption` first)"
    ]

    # a checkpoint of another architecture (wider embedding) does not fit tiny-random
    other_cfg = json.loads((CLIP_CONFIG_DIR / "tiny-random.json").read_text())
    other_cfg["embed_dim"] = 16
    (tmp_path / "tiny-other.json").write_text(json.dumps(other_cfg))
    open_clip.add_model_config(tmp_path / "tiny-other.json")
    ckpt = tmp_path / "other.pt"
    torch.save(open_clip.create_model("tiny-other").state_dict(), ckpt)
    proc = cli(*args, "--captions", csv, "--pretrained", ckpt)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(
        f"skyscript-build filter: error: {ckpt}: checkpoint does not fit model 'tiny-random'"
    )
    assert "Traceback" not in proc.stderr

    # not a checkpoint at all: one line too
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a torch file")
    with pytest.raises(InputError, match="not a readable checkpoint for model 'tiny-random'"):
        run_filter(config(root, csv, junk))
    assert not list(root.glob("SkyScript_*_filtered_by_*.csv"))

    # and the same checkpoint with its own config registered through --model-config works
    other = FilterConfig(
        dataset=root,
        captions=csv,
        name="tiny",
        model="tiny-other",
        pretrained=str(ckpt),
        model_config=tmp_path / "tiny-other.json",
        val_size=4,
        test_size=6,
        workers=0,
        out=tmp_path / "o",
    )
    result = run_filter(other)
    assert result.scored_new == N
    assert (tmp_path / "o" / "SkyScript_train_top30pct_filtered_by_tiny.csv").exists()


# --- decoding: the model's own preprocess, cut at uint8; the GPU path and its CPU stand-in --


def _jpeg(h: int, w: int, seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack(
        [np.sin(xx * rng.uniform(2, 9) + c) * np.cos(yy * rng.uniform(2, 9)) for c in range(3)],
        -1,
    )
    img = ((base + 1) * 100 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


SIZES = [(48, 48), (224, 224), (300, 500), (700, 1024)]


@pytest.fixture(scope="module")
def vit_pixels():
    """ViT-B-32's preprocess (224 px), cut at uint8."""
    from skyscript_build.filter._decode import split_preprocess

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    return split_preprocess(preprocess)


def test_uint8_pixels_normalised_later_equal_the_models_preprocess(vit_pixels):
    import io

    from PIL import Image

    from skyscript_build.filter._decode import Normalizer, read_pixels

    assert vit_pixels.part is not None and vit_pixels.tensor_ok
    normalize = Normalizer(vit_pixels, "cpu", torch.float32)
    for k, (h, w) in enumerate(SIZES):
        data = _jpeg(h, w, k)
        pixels, status = read_pixels(io.BytesIO(data), vit_pixels)
        assert status == "ok" and pixels.dtype == torch.uint8
        assert tuple(pixels.shape) == (3, 224, 224)
        expected = vit_pixels.full(Image.open(io.BytesIO(data)).convert("RGB"))
        torch.testing.assert_close(normalize(pixels[None])[0], expected, rtol=0, atol=0)


def test_direct_pil_resize_and_crop_equal_the_models_transforms(vit_pixels):
    import io

    from PIL import Image
    from torchvision import transforms

    from skyscript_build.filter._decode import PilResizeCrop, read_pixels, split_preprocess

    assert vit_pixels.pil is not None
    for k, (h, w) in enumerate([*SIZES, (225, 224), (224, 301), (999, 333), (20, 700)]):
        image = Image.open(io.BytesIO(_jpeg(h, w, 20 + k))).convert("RGB")
        expected = np.asarray(vit_pixels.part(image))
        assert np.array_equal(np.asarray(vit_pixels.pil(image)), expected), (h, w)
    # a crop larger than the resized image pads: the transforms run instead
    small = [transforms.Resize(16), transforms.CenterCrop(24)]
    assert PilResizeCrop.of(small)(Image.new("RGB", (40, 30))) is None  # type: ignore[misc]
    norm = transforms.Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    padding = split_preprocess(transforms.Compose([*small, transforms.ToTensor(), norm]))
    data = _jpeg(30, 40, 1)
    got, status = read_pixels(io.BytesIO(data), padding)
    expected = transforms.Compose(small)(Image.open(io.BytesIO(data)).convert("RGB"))
    assert status == "ok" and np.array_equal(got.permute(1, 2, 0).numpy(), np.asarray(expected))
    # anything but Resize(n) + CenterCrop keeps the transforms
    assert PilResizeCrop.of([transforms.Resize((20, 30)), transforms.CenterCrop(8)]) is None
    assert PilResizeCrop.of([transforms.CenterCrop(8), transforms.Resize(20)]) is None


def _levels(got, expected) -> tuple[int, float]:
    d = (got.cpu().int() - expected.int()).abs().float()
    return int(d.max()), float(d.mean())


def _tensor_path_levels(vit_pixels, device: str) -> list[tuple[int, float]]:
    import io

    from skyscript_build.filter._decode import read_pixels, tensor_pixels

    out = []
    for k, (h, w) in enumerate(SIZES):
        data = _jpeg(h, w, 10 + k)
        expected, _ = read_pixels(io.BytesIO(data), vit_pixels)
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        groups, failed = tensor_pixels([blob, blob], vit_pixels, device)
        assert failed == [] and len(groups) == 1 and groups[0][0] == [0, 1]
        images = groups[0][1]
        assert images.device.type == torch.device(device).type
        assert torch.equal(images[0], images[1])  # batched: the same twice
        out.append(_levels(images[0], expected))
    return out


def test_tensor_decode_path_on_cpu_is_within_the_stated_tolerance(vit_pixels):
    """The GPU path's code (torchvision decode + tensor resize) run on the CPU."""
    from skyscript_build.filter._decode import TENSOR_MAX_LEVELS, TENSOR_MEAN_LEVELS

    levels = _tensor_path_levels(vit_pixels, "cpu")
    assert max(m for m, _ in levels) <= TENSOR_MAX_LEVELS
    assert max(mean for _, mean in levels) <= TENSOR_MEAN_LEVELS
    assert levels[1] == (0, 0.0)  # a 224 px tile is not resampled: identical pixels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_is_within_the_stated_tolerance(vit_pixels):
    from skyscript_build.filter._decode import GPU_MAX_LEVELS, GPU_MEAN_LEVELS

    levels = _tensor_path_levels(vit_pixels, "cuda")
    print("GPU decode vs PIL preprocess (max, mean levels):", dict(zip(SIZES, levels, strict=True)))
    assert max(m for m, _ in levels) <= GPU_MAX_LEVELS
    assert max(mean for _, mean in levels) <= GPU_MEAN_LEVELS


def test_files_nvjpeg_cannot_take_go_to_pil(tmp_path):
    from PIL import Image

    from skyscript_build.filter._decode import read_jpeg

    good = tmp_path / "a.jpg"
    good.write_bytes(_jpeg(64, 64, 0))
    assert read_jpeg(str(good))[1] == "ok"
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:-200])
    assert read_jpeg(str(cut)) == (None, "other")
    progressive = tmp_path / "p.jpg"
    Image.open(good).save(progressive, progressive=True)
    assert read_jpeg(str(progressive)) == (None, "other")
    png = tmp_path / "x.jpg"
    Image.open(good).save(png, format="PNG")
    assert read_jpeg(str(png)) == (None, "other")
    assert read_jpeg(str(tmp_path / "gone.jpg")) == (None, "missing")


def test_gpu_batch_assembly_on_cpu_places_every_row(checkpoint):
    """The GPU path's batch assembly (``Scorer._assemble``: pixels from the workers, JPEGs
    decoded in the scoring process, PIL for what the decoder refuses) run on the CPU."""
    import io

    from skyscript_build.filter._decode import read_pixels
    from skyscript_build.filter._scoring import _CORRUPT, _JPEG, _MISSING, _OK

    scorer = Scorer(ScoreSettings("tiny-random", str(checkpoint), batch_size=8), "cpu")
    jpegs = [_jpeg(64, 64, 1), _jpeg(40, 80, 2), b"\xff\xd8 not a jpeg \xff\xd9"]
    ok = read_pixels(io.BytesIO(_jpeg(48, 48, 3)), scorer.pixels)[0]
    status = torch.tensor([_JPEG, _OK, _MISSING, _JPEG, _JPEG], dtype=torch.int8)
    offsets = torch.tensor(np.cumsum([0] + [len(j) for j in jpegs]))
    blob = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
    final, batch = scorer._assemble(status, ok[None], blob, offsets)
    assert final.tolist() == [_OK, _OK, _MISSING, _OK, _CORRUPT]
    assert status.tolist()[0] == _JPEG  # the workers' status is left as it was
    assert tuple(batch.shape) == (8, *ok.shape) and batch.dtype == torch.uint8
    assert torch.equal(batch[1], ok)
    for row, data in ((0, jpegs[0]), (3, jpegs[1])):
        expected = read_pixels(io.BytesIO(data), scorer.pixels)[0]
        assert _levels(batch[row], expected)[0] <= 3  # the tensor path's tolerance
    assert not batch[[2, 4, 5, 6, 7]].any()  # failed rows and padding are zeros


# --- precision, captions, several processes, Dask ------------------------------------------


def test_precision_auto_is_bf16_on_cuda_fp32_on_cpu_and_part_of_a_scores_identity(
    dataset, checkpoint
):
    from skyscript_build.filter._models import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ConfigError, match="--precision"):
        FilterConfig(dataset=Path("."), captions=Path("c.csv"), name="x", model="m",
                     pretrained="none", precision="fp8")  # fmt: skip
    root, csv = dataset
    fp32 = run_filter(config(root, csv, checkpoint))
    assert fp32.precision == "fp32"
    bf16 = run_filter(config(root, csv, checkpoint, precision="bf16"))
    assert (bf16.precision, bf16.scored_new, bf16.reused) == ("bf16", N, 0)  # not reused
    scores = read_scores(root).pivot(index="filepath", columns="precision", values="similarity")
    diff = (scores["bf16"] - scores["fp32"]).abs()
    assert 0 < diff.max() < 0.05  # bf16 rounding, not another model
    again = run_filter(config(root, csv, checkpoint, precision="bf16"))
    assert (again.scored_new, again.reused) == (0, N)


def test_each_distinct_caption_is_encoded_once(dataset, checkpoint):
    root, csv = dataset
    result = run_filter(config(root, csv, checkpoint, shard_size=16))
    assert result.shards == 3
    assert result.captions_encoded == pd.read_csv(csv)["title"].nunique() == 6


def test_two_scoring_processes_write_the_same_csvs_as_one(dataset, checkpoint, tmp_path):
    root, csv = dataset
    one = run_filter(config(root, csv, checkpoint, out=tmp_path / "one", shard_size=8))
    two = run_filter(
        config(root, csv, checkpoint, out=tmp_path / "two", shard_size=8, device="cpu,cpu")
    )
    assert two.devices == ["cpu", "cpu"] and two.shards == 5 and two.scored_new == N
    assert sum(two.shards_by_worker.values()) == 5
    for name in output_names(config(root, csv, checkpoint)).values():
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert one.scored_new == N


def test_dask_workers_score_the_same_as_one_process(dataset, checkpoint, tmp_path, dask_cluster):
    root, csv = dataset
    local = config(root, csv, checkpoint, out=tmp_path / "local", shard_size=8)
    run_filter(local)
    on_dask = config(
        root, csv, checkpoint, out=tmp_path / "dask", shard_size=8,
        scheduler=dask_cluster["address"],
    )  # fmt: skip
    result = run_filter(on_dask)
    assert result.scored_new == N and result.shards == 5
    assert set(result.shards_by_worker) == {"w0", "w1"}  # both workers scored
    for name in output_names(local).values():
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()
    a = pd.read_parquet(tmp_path / "local" / "scores.parquet")
    b = pd.read_parquet(tmp_path / "dask" / "scores.parquet")
    pd.testing.assert_frame_equal(a, b)
    # resuming per shard on the cluster: a lost shard's part is scored again, only that one
    (tmp_path / "dask" / "scores.parquet").unlink()
    for name in output_names(local).values():
        (tmp_path / "dask" / name).unlink()
    b.iloc[8:].to_parquet(tmp_path / "dask" / "scores.parquet", index=False)
    again = run_filter(on_dask)
    assert (again.scored_new, again.reused, again.shards) == (8, N - 8, 1)
    for name in output_names(local).values():
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()


# --- a rerun reuses only what is unchanged; bad inputs stop before any work -----------------


def test_a_score_is_reused_only_for_an_unchanged_image(dataset, checkpoint):
    root, csv = dataset
    cfg = config(root, csv, checkpoint)
    first = run_filter(cfg)
    assert first.scored_new == N
    rows = pd.read_csv(csv)["filepath"].tolist()
    changed, touched, gone = rows[2], rows[5], rows[9]
    other = (root / rows[3]).read_bytes()
    (root / changed).write_bytes(other)  # other pixels, other size
    st = (root / touched).stat()
    os.utime(root / touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer
    (root / gone).unlink()
    again = run_filter(cfg)
    assert (again.scored_new, again.reused) == (2, N - 3)
    assert again.failed == {"missing": 1}
    scores = read_scores(root).set_index("filepath")
    assert scores.loc[changed, "size"] == len(other)
    assert scores.loc[touched, "mtime_ns"] == st.st_mtime_ns + 10**9
    written = set().union(*(set(df["filepath"]) for df in read_outputs(cfg).values()))
    assert gone not in written and all((root / p).is_file() for p in written)
    assert (again.kept, again.pool) == (N - 1, N - 1 - 4 - 6)


def test_an_unreadable_scores_file_is_scored_again_with_one_line(dataset, checkpoint, caplog):
    root, csv = dataset
    cfg = config(root, csv, checkpoint)
    run_filter(cfg)
    before = (root / "SkyScript_train_top30pct_filtered_by_tiny.csv").read_bytes()
    data = (root / "scores.parquet").read_bytes()
    (root / "scores.parquet").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        again = run_filter(cfg)
    lines = [r.getMessage() for r in caplog.records if "scores.parquet" in r.getMessage()]
    assert len(lines) == 1 and "unreadable" in lines[0] and "scored again" in lines[0]
    assert (again.scored_new, again.reused) == (N, 0)
    assert (root / "SkyScript_train_top30pct_filtered_by_tiny.csv").read_bytes() == before
    assert len(pd.read_parquet(root / "scores.parquet")) == N


def _filter_cli(cli, root, csv, out, *extra, env=None):
    return cli(
        "filter", "--dataset", root, "--captions", csv, "--name", "t", "--out", out,
        "--val-size", "2", "--test-size", "2", "--workers", "0", *extra, env=env,
    )  # fmt: skip


def test_refused_runs_stop_in_one_line_and_create_nothing(dataset, tmp_path, cli):
    root, csv = dataset
    out = tmp_path / "out"
    tiny = ["--model", "tiny-random", "--pretrained", "none"]

    def refused(proc, *needles):
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        for needle in needles:
            assert needle in lines[0]
        assert not out.exists()  # no empty --out folder

    empty = tmp_path / "empty"
    empty.mkdir()
    refused(_filter_cli(cli, empty, csv, out, *tiny), str(empty), "none of the 40 images")
    bad = tmp_path / "bad.csv"
    bad.write_text("filepath,title\nimages2/x.jpg,building\n")
    refused(_filter_cli(cli, root, bad, out, *tiny), str(bad), "lacks column(s) title_multi")

    # weights that are not downloaded, without network: one probe, a few seconds at most
    import time

    hub = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "XDG_CACHE_HOME": str(tmp_path / "cache")}  # fmt: skip
    started = time.monotonic()
    proc = _filter_cli(cli, root, csv, out, "--model", "ViT-B-32", "--pretrained", "openai",
                       env=hub)  # fmt: skip
    assert time.monotonic() - started < 30  # was 57 s of retries; the probe gives up in 5
    refused(proc, "--pretrained openai", "cannot be reached", "pass a checkpoint file")
    proc = _filter_cli(cli, root, csv, out, "--model", "ViT-B-32", "--pretrained", "openai",
                       env={**hub, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    refused(proc, "HF_HUB_OFFLINE is set")
