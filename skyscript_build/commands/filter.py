"""``skyscript-build filter``: CLIP scores, top-k% training CSVs, val/test splits."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "score image-caption pairs with CLIP; write top-k%% train, val and test CSVs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags, one per field of ``FilterConfig``."""
    parser.add_argument("--dataset", type=Path, required=True, help="folder with images{k}/")
    parser.add_argument("--captions", type=Path, required=True, help="the caption CSV")
    parser.add_argument(
        "--name", required=True, help="filter name for file names and similarity_<NAME>"
    )
    parser.add_argument(
        "--model", required=True, help="open_clip architecture, e.g. ViT-L-14 or tiny-random"
    )
    parser.add_argument(
        "--pretrained",
        required=True,
        help="open_clip tag, local checkpoint file, or 'none' (random weights: ranking "
        "is meaningless)",
    )
    parser.add_argument(
        "--model-config", type=Path, help="register an open_clip JSON config (name = file stem)"
    )
    parser.add_argument("--caption-column", default="title", help="caption to score (title)")
    parser.add_argument(
        "--top",
        type=float,
        nargs="+",
        default=[0.3, 0.5],
        help="train fractions; k = round half up of f x rows, ties by filepath (0.3 0.5)",
    )
    parser.add_argument("--val-size", type=int, default=5000, help="val rows (5000)")
    parser.add_argument("--test-size", type=int, default=30000, help="test rows (30000)")
    parser.add_argument(
        "--split-by",
        choices=("random", "geo"),
        default="random",
        help="geo keeps whole grid cells (meta box centre) in one split",
    )
    parser.add_argument("--cell-size", type=float, default=0.1, help="geo cell, degrees (0.1)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per forward; 256 suits a GPU (64)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decode processes per scoring device; 0 = in the scoring process "
        "(the machine's cores, at most 16)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (every visible GPU, else cpu), cpu, cuda (every GPU), cuda:N, or a list "
        "such as cuda:0,cuda:1: one scoring process and model per device (auto)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="weights and inputs; auto = bf16 on CUDA, fp32 on a CPU. Stored with each "
        "score: another precision scores again (auto)",
    )
    parser.add_argument(
        "--decode",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="JPEG decode + resize: gpu (nvJPEG) when scoring on a GPU, else cpu (auto)",
    )
    parser.add_argument(
        "--scheduler",
        help="Dask scheduler address: shards run on its workers, one model per worker",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="rows per shard, the unit of resuming and of spreading work (64 batches)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (0)")
    parser.add_argument("--out", type=Path, help="output folder (the dataset folder)")


def main(args: argparse.Namespace) -> int:
    """Build the config from the flags, run the stage, print the summary."""
    from ..filter import FilterConfig, run_filter

    config = FilterConfig(
        dataset=args.dataset,
        captions=args.captions,
        name=args.name,
        model=args.model,
        pretrained=args.pretrained,
        model_config=args.model_config,
        caption_column=args.caption_column,
        top=tuple(args.top),
        val_size=args.val_size,
        test_size=args.test_size,
        split_by=args.split_by,
        cell_size=args.cell_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        decode=args.decode,
        scheduler=args.scheduler,
        shard_size=args.shard_size,
        seed=args.seed,
        out=args.out,
    )
    result = run_filter(config)
    print(result.summary())
    return 0
