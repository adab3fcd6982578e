"""Benchmark the filter stage's scoring: images/s, where the time goes, and the forward bound.

For each model (the tiny random config and ViT-B-32 with random weights; nothing downloaded)
it times, on synthetic JPEG tiles:

- decode (PIL open + RGB), preprocess (the model's own transform), tokenize, image forward,
  text forward, each alone, per image;
- the bound: model-forward-only throughput (image + text forward, preprocessed tensors ready);
- our pipeline, ``skyscript_build.filter.scoring.score_rows`` end to end (DataLoader decode
  workers, tokenizing, forward, scores written), by batch size and worker count;

and records the ratio pipeline / bound in bench/RESULTS.md. Run: ``make bench-filter``.
Options: ``--tiny-images N --vit-images N --size PX``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SKYSCRIPT_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _results import record  # noqa: E402
from PIL import Image  # noqa: E402

from skyscript_build.filter.models import load_model  # noqa: E402
from skyscript_build.filter.scoring import score_rows  # noqa: E402

CAPTIONS = [
    "building",
    "landuse of grass",
    "road of footway, surrounded by natural tree",
    "amenity of parking with surface of asphalt",
    "leisure of park, surrounded by road of residential; natural tree",
]


def make_images(
    root: Path, n: int, size: int, seed: int = 0, distinct: int = 64
) -> tuple[list[str], list[str]]:
    """Write ``n`` synthetic JPEG tiles (smooth fields plus noise, like aerial tiles).

    ``distinct`` tiles are rendered and the rest are byte copies of them (decoding costs the
    same), which keeps the set-up short on a small machine.
    """
    rng = np.random.default_rng(seed)
    (root / "images2").mkdir(parents=True, exist_ok=True)
    paths, texts = [], []
    yy, xx = np.mgrid[0:size, 0:size] / size
    blobs = []
    for i in range(n):
        name = f"images2/w{i}_FI_19.jpg"
        if i < distinct:
            base = np.stack(
                [
                    np.sin(xx * rng.uniform(2, 9) + c) * np.cos(yy * rng.uniform(2, 9))
                    for c in range(3)
                ],
                axis=-1,
            )
            img = ((base + 1) * 100 + rng.normal(0, 12, base.shape)).clip(0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / name, quality=90)
            blobs.append((root / name).read_bytes())
        else:
            (root / name).write_bytes(blobs[i % distinct])
        paths.append(name)
        texts.append(CAPTIONS[i % len(CAPTIONS)])
    return paths, texts


def best_per_item(fn, items, rounds: int = 3) -> float:
    """Best-of-``rounds`` seconds per item of ``fn`` over ``items`` (after a warm-up call).

    Cheap calls (under 0.1 s a round) get 10 rounds: on a shared machine one round is noise.
    """
    t = time.perf_counter()
    fn(items[0])
    if (time.perf_counter() - t) * len(items) < 0.1:
        rounds = max(rounds, 10)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, (time.perf_counter() - t) / len(items))
    return best


def bench_model(model: str, root: Path, paths, texts, batches, workers_list) -> list[str]:
    import torch

    cores = os.cpu_count() or 1
    loaded = load_model(model, "none", device="cpu")
    m, pre, tok = loaded.model, loaded.preprocess, loaded.tokenizer
    files = [str(root / p) for p in paths]
    decoded = [Image.open(f).convert("RGB") for f in files[:32]]
    t_decode = best_per_item(lambda f: Image.open(f).convert("RGB"), files[:32])
    t_pre = best_per_item(pre, decoded)
    t_tok = best_per_item(lambda s: tok([s]), texts[:32])
    t_cpu = t_decode + t_pre + t_tok
    lines = [
        f"### {model} (random weights, {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M "
        f"parameters, input {pre.transforms[0].size} px), {len(paths)} images",
        "",
        f"Where the time goes, per image in one process (best of 3): decode {t_decode * 1e3:.2f} "
        f"ms, preprocess {t_pre * 1e3:.2f} ms, tokenize {t_tok * 1e3:.3f} ms; the forward passes "
        "are in the table.",
        "",
        "| batch | image fwd ms/img | text fwd ms/img | fwd bound img/s | all-work bound img/s "
        "| workers | pipeline img/s | ratio to fwd bound | ratio to all-work bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    x_all = torch.stack([pre(im) for im in decoded])
    t_all = tok(texts[:32])
    for batch in batches:
        x = x_all.repeat((batch // len(x_all)) + 1, 1, 1, 1)[:batch]
        t = t_all.repeat((batch // len(t_all)) + 1, 1)[:batch]
        with torch.inference_mode():
            t_img = best_per_item(m.encode_image, [x]) / batch
            t_txt = best_per_item(m.encode_text, [t]) / batch
        fwd_bound = 1 / (t_img + t_txt)
        # the forward uses every core; decode work spread over the same cores
        all_bound = 1 / (t_img + t_txt + t_cpu / cores)
        for workers in workers_list:
            out = Path(tempfile.mkdtemp(prefix="bench_filter_"))
            run = score_rows(
                loaded, paths, texts, root=root, out=out, batch_size=batch, workers=workers
            )
            shutil.rmtree(out)
            assert run.scored == len(paths), run.failed
            speed = run.scored / run.seconds
            lines.append(
                f"| {batch} | {t_img * 1e3:.2f} | {t_txt * 1e3:.2f} | {fwd_bound:.0f} "
                f"| {all_bound:.0f} | {workers} | {speed:.0f} | {speed / fwd_bound:.2f} "
                f"| {speed / all_bound:.2f} |"
            )
            print(lines[-1], flush=True)
    return lines


RSS_SNIPPET = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from data import make
from skyscript_build.filter import FilterConfig, run_filter
root = Path(sys.argv[1])
csv = make(root, n=int(sys.argv[2]), size=64)
r = run_filter(FilterConfig(dataset=root, captions=csv, name="rss", model="tiny-random",
    pretrained="none", val_size=10, test_size=10, workers=2, batch_size=128))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"scored": r.scored_new, "self": int(hwm) / 1024,
    "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def rss_scaling(sizes: tuple[int, ...] = (500, 5000)) -> list[str]:
    """Peak RSS of a whole ``run_filter`` (tiny model, 2 workers) at 1x and 10x rows.

    Each run is a fresh process; its own peak is read from /proc (VmHWM), because
    ``ru_maxrss`` carries the parent's peak across exec.
    """
    import json
    import subprocess

    fixture = Path(__file__).resolve().parent.parent / "tests" / "data" / "filter"
    lines = ["| rows | main peak RSS MiB | largest worker MiB |", "|---:|---:|---:|"]
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="bench_filter_rss_"))
        try:
            proc = subprocess.run(
                [sys.executable, "-c", RSS_SNIPPET, str(root), str(n), str(fixture)],
                capture_output=True,
                text=True,
                check=True,
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["scored"] == n
        lines.append(f"| {n} | {got['self']:.0f} | {got['children']:.0f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-images", type=int, default=512)
    parser.add_argument("--vit-images", type=int, default=64)
    parser.add_argument("--size", type=int, default=384, help="tile size in pixels (384)")
    args = parser.parse_args()
    import torch

    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="bench_filter_data_"))
    try:
        n = max(args.tiny_images, args.vit_images)
        t0 = time.perf_counter()
        paths, texts = make_images(root, n, args.size)
        print(f"{n} synthetic {args.size}px JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
        body = [
            f"Synthetic {args.size}px JPEG tiles, CPU only (torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads). Bound = model-forward-only throughput "
            "(image + text forward on ready tensors, same batch, best of 3); all-work bound adds "
            "decode + preprocess + tokenize spread perfectly over all cores; ratio = pipeline / "
            "bound. "
            "The pipeline is `score_rows` end to end: DataLoader decode+preprocess+tokenize "
            "workers (0 = in the main process), forward, scores written to parquet. On a CPU "
            "the decode workers and the model share the same cores, so a ratio near 1 for the "
            "big model means decoding is hidden; the tiny model is decode-bound by design.",
            "",
        ]
        body += bench_model(
            "tiny-random", root, paths[: args.tiny_images], texts, (32, 256), (0, cores)
        )
        body.append("")
        body += bench_model("ViT-B-32", root, paths[: args.vit_images], texts, (16, 32), (cores,))
        self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        body += [
            "",
            f"Peak RSS of this benchmark (ViT-B-32 loaded): main process {self_rss:.0f} MiB, "
            f"largest decode worker {child_rss:.0f} MiB (forked: mostly pages shared with the "
            "main process).",
        ]
        body += ["", "Memory as the input grows (whole `run_filter`, tiny model, 64 px tiles):", ""]
        body += rss_scaling()
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        body += [
            "",
            f"Load average at the end (1, 5, 15 min): {load} on {cores} cores: the machine is "
            "shared, so absolute numbers are noisy; the ratios are measured in the same run.",
            "",
            "GPU: `bench/gpu_filter_vitl14.sh` (ViT-L-14, batch 256, --device cuda; goal >= 312 "
            "images/s per A100, clip-retrieval's published figure) has not been run on a GPU yet.",
        ]
        record(
            "filter", "filter: CLIP scoring images/s vs the model-forward bound", "\n".join(body)
        )
        print("\n".join(body))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
