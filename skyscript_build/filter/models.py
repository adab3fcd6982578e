"""CLIP models for the filter stage: the config registry, loading, and checkpoint identity.

open_clip architectures are JSON configs; ours live in ``skyscript_build/clip_configs/`` and are
registered before any model is built, so ``--model tiny-random`` works like a built-in name.
torch and open_clip are imported lazily: the rest of the package works without the ``clip``
extra.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError, MissingDependencyError

__all__ = [
    "CLIP_CONFIG_DIR",
    "LoadedModel",
    "list_clip_configs",
    "get_clip_config",
    "import_clip",
    "pretrained_identity",
    "load_model",
    "resolve_device",
]

log = logging.getLogger(__name__)

CLIP_CONFIG_DIR = Path(__file__).resolve().parent.parent / "clip_configs"
NO_WEIGHTS = "none"


def list_clip_configs() -> list[str]:
    """Names of the model configs shipped with the package (``clip_configs/*.json``)."""
    return sorted(p.stem for p in CLIP_CONFIG_DIR.glob("*.json"))


def get_clip_config(name: str) -> Path:
    """Path of the shipped config ``name``; ``ConfigError`` when there is none."""
    path = CLIP_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(
            f"no shipped CLIP config '{name}' (have: {', '.join(list_clip_configs())})"
        )
    return path


def import_clip() -> tuple[Any, Any]:
    """Import and return ``(torch, open_clip)``; ``MissingDependencyError`` if absent."""
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "clip") from None
    try:
        import open_clip
    except ImportError:
        raise MissingDependencyError("open_clip_torch", "clip") from None
    return torch, open_clip


def pretrained_identity(pretrained: str, seed: int) -> str:
    """The string that identifies a checkpoint in ``scores.parquet``.

    A tag is its name; a file is ``file:<name>:<sha256 of its content, 16 hex>`` (the same
    weights copied elsewhere keep their scores); random weights are ``none:seed<N>``.
    """
    if pretrained.lower() == NO_WEIGHTS:
        return f"{NO_WEIGHTS}:seed{seed}"
    path = Path(pretrained)
    if path.is_file():
        stat = path.stat()
        return _file_identity(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return pretrained


@functools.lru_cache(maxsize=16)
def _file_identity(path: str, size: int, mtime_ns: int) -> str:
    """Hash a checkpoint once per (path, size, mtime): a ViT-L-14 file is 1.7 GB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"file:{Path(path).name}:{digest.hexdigest()[:16]}"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; checks ``cuda`` is there."""
    torch, _ = import_clip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
    return device


@dataclass
class LoadedModel:
    """A CLIP model ready to score, with its own preprocessing and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    model_name: str
    identity: str


def _register_configs(open_clip: Any, model_config: Path | None, model: str) -> None:
    open_clip.add_model_config(CLIP_CONFIG_DIR)
    if model_config is not None:
        if not model_config.is_file():
            raise InputError(model_config, "model config file not found")
        import json

        try:
            cfg = json.loads(model_config.read_text())
        except (OSError, ValueError) as e:
            raise InputError(model_config, f"not a readable JSON model config ({e})") from None
        if not isinstance(cfg, dict) or not all(
            k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
        ):
            raise InputError(
                model_config, "not an open_clip config (needs embed_dim, vision_cfg, text_cfg)"
            )
        if model_config.stem != model:
            raise ConfigError(
                f"--model-config {model_config} registers the model '{model_config.stem}' "
                f"(the file's name), not '{model}': pass --model {model_config.stem}"
            )
        open_clip.add_model_config(model_config)
    if model not in open_clip.list_models():
        raise ConfigError(
            f"unknown CLIP model '{model}': pass an open_clip name (e.g. ViT-L-14, ViT-B-32), "
            f"one of ours ({', '.join(list_clip_configs())}) or --model-config FILE.json"
        )


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs its chatter on the root logger at INFO; hide it unless debugging."""
    root = logging.getLogger()
    old = root.level
    if not log.isEnabledFor(logging.DEBUG):
        root.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(old)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_model(
    model: str,
    pretrained: str,
    *,
    model_config: Path | None = None,
    device: str = "auto",
    seed: int = 0,
) -> LoadedModel:
    """Build ``model`` with ``pretrained`` weights (a tag, a checkpoint file or ``none``).

    Raises:
        ConfigError: unknown model or tag, or no GPU for ``--device cuda``.
        InputError: a checkpoint file that is unreadable or does not fit the architecture.
    """
    torch, open_clip = import_clip()
    _register_configs(open_clip, model_config, model)
    device = resolve_device(device)
    identity = pretrained_identity(pretrained, seed)
    is_file = Path(pretrained).is_file()
    if pretrained.lower() == NO_WEIGHTS:
        log.warning(
            "--pretrained none: model %s has RANDOM weights; its ranking is meaningless "
            "(fine for a demo or a benchmark, never for a dataset)",
            model,
        )
        weights: str | None = None
        torch.manual_seed(seed)
    elif is_file:
        weights = pretrained
    else:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise ConfigError(
                f"--pretrained {pretrained}: neither an existing checkpoint file nor a known "
                f"tag for {model} (tags: {', '.join(tags) or 'none'}; or pass 'none')"
            )
        weights = pretrained
    try:
        with _quiet_open_clip():
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=weights, device="cpu"
            )
    except Exception as e:  # open_clip raises RuntimeError/KeyError/UnpicklingError/...
        if is_file and "loading state_dict" in str(e):
            raise InputError(
                pretrained, f"checkpoint does not fit model '{model}': {_one_line(e)}"
            ) from None
        if is_file:
            raise InputError(
                pretrained, f"not a readable checkpoint for model '{model}': {_one_line(e)}"
            ) from None
        raise ConfigError(
            f"cannot load {model} weights '{pretrained}': {_one_line(e)} "
            "(no network? download the checkpoint and pass its file path)"
        ) from None
    clip = clip.to(device).eval()
    with _quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(model)
    log.info("CLIP %s, weights %s, on %s", model, identity, device)
    return LoadedModel(clip, preprocess, tokenizer, device, model, identity)


def default_workers() -> int:
    """Decode workers when not set: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
