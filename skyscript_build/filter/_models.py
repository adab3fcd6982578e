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
    "check_model",
    "resolve_devices",
    "resolve_precision",
    "PRECISIONS",
]

log = logging.getLogger(__name__)

CLIP_CONFIG_DIR = Path(__file__).resolve().parent.parent / "clip_configs"
NO_WEIGHTS = "none"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Seconds the one probe request waits before weights that are not cached count as unreachable.
PROBE_TIMEOUT_S = 5.0


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


def resolve_devices(device: str) -> list[str]:
    """The scoring devices of ``--device``: one process each when there are several.

    ``auto``: every visible GPU, else ``cpu``; ``cuda``: every visible GPU; ``cuda:N`` or a
    comma-separated list (``cuda:0,cuda:1``; ``cpu,cpu`` runs two CPU processes).
    """
    torch, _ = import_clip()
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return [f"cuda:{i}" for i in range(n_gpus)] or ["cpu"]
    if device == "cuda":
        if not n_gpus:
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
        return [f"cuda:{i}" for i in range(n_gpus)]
    devices = [d.strip() for d in device.split(",")]
    for d in devices:
        if d.startswith("cuda"):
            index = int(d.split(":")[1]) if ":" in d else 0
            if index >= n_gpus:
                raise ConfigError(
                    f"--device {device}: torch sees {n_gpus} CUDA GPU(s), so no {d} "
                    "(use --device auto or cpu)"
                )
    return devices


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` on a CPU; other values as given."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


@dataclass
class LoadedModel:
    """A CLIP model ready to score, with its own preprocessing and tokenizer."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    model_name: str
    identity: str
    precision: str = "fp32"
    dtype: Any = None


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
        root.setLevel(max(old, logging.ERROR))
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
    device: str = "cpu",
    seed: int = 0,
    precision: str = "fp32",
    warn_random: bool = True,
) -> LoadedModel:
    """Build ``model`` with ``pretrained`` weights (a tag, a checkpoint file or ``none``).

    ``precision``: ``fp32``, ``bf16`` or ``fp16`` weights (``auto``: see
    ``resolve_precision``).

    Raises:
        ConfigError: unknown model or tag, weights neither cached nor reachable.
        InputError: a checkpoint file that is unreadable or does not fit the architecture.
    """
    torch, open_clip = import_clip()
    cached = check_model(model, pretrained, model_config)
    if device == "auto":
        device = resolve_devices("auto")[0]
    precision = resolve_precision(precision, device)
    identity = pretrained_identity(pretrained, seed)
    is_file = Path(pretrained).is_file()
    weights: str | None = pretrained
    if pretrained.lower() == NO_WEIGHTS:
        if warn_random:
            log.warning(
                "--pretrained none: model %s has RANDOM weights; its ranking is meaningless "
                "(fine for a demo or a benchmark, never for a dataset)",
                model,
            )
        weights = None
        torch.manual_seed(seed)
    try:
        with _quiet_open_clip(), _hub_offline(cached):
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
    dtype = getattr(torch, _DTYPES[precision])
    clip = clip.to(device=device, dtype=dtype).eval()
    with _quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(model)
    log.info("CLIP %s, weights %s, %s on %s", model, identity, precision, device)
    return LoadedModel(clip, preprocess, tokenizer, device, model, identity, precision, dtype)


def check_model(model: str, pretrained: str, model_config: Path | None = None) -> bool:
    """Check the model name and its weights before any work; nothing is built.

    A pretrained tag whose weights are not cached is probed with one request
    (``PROBE_TIMEOUT_S``), so a machine without network fails in seconds, not after a
    minute of retries. Returns whether the tag's weights are in the local cache (then they
    are loaded without asking the network).
    """
    _, open_clip = import_clip()
    _register_configs(open_clip, model_config, model)
    if pretrained.lower() == NO_WEIGHTS or Path(pretrained).is_file():
        return False
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ConfigError(
            f"--pretrained {pretrained}: neither an existing checkpoint file nor a known "
            f"tag for {model} (tags: {', '.join(tags) or 'none'}; or pass 'none')"
        )
    where, url, cached = _weights_location(open_clip, model, pretrained)
    if cached:
        return True
    advice = (
        f"download them where there is network (open_clip.create_model('{model}', "
        f"pretrained='{pretrained}')) or pass a checkpoint file as --pretrained"
    )
    if _hub_offline_set():
        raise ConfigError(
            f"--pretrained {pretrained}: the {model} weights are not in {where} and "
            f"HF_HUB_OFFLINE is set: {advice}"
        )
    import requests

    try:
        answer = requests.head(url, timeout=PROBE_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as e:
        raise ConfigError(
            f"--pretrained {pretrained}: the {model} weights are not in {where} and {url} "
            f"cannot be reached ({_one_line(e, 120)}): {advice}"
        ) from None
    if answer.status_code >= 400 and answer.status_code not in (401, 403):
        raise ConfigError(
            f"--pretrained {pretrained}: {url} answers HTTP {answer.status_code}: {advice}"
        )
    return False


def _weights_location(open_clip: Any, model: str, tag: str) -> tuple[str, str, bool]:
    """Where a tag's weights are cached, the URL they come from, and whether they are cached."""
    from open_clip import pretrained as oc_pretrained

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if "file" in cfg:
        return str(cfg["file"]), "", True
    hub = cfg.get("hf_hub", "") if oc_pretrained.has_hf_hub() else ""
    if hub:
        from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or oc_pretrained.HF_WEIGHTS_NAME
        names = [*oc_pretrained._get_safe_alternatives(filename), filename]
        cached = any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
        return (
            f"the Hugging Face cache ({constants.HF_HUB_CACHE})",
            hf_hub_url(repo, filename),
            cached,
        )
    url = cfg.get("url", "")
    target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return str(target.parent), url, target.is_file()


def _hub_offline_set() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@contextlib.contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """Cached weights load without asking the Hub for a newer revision (no network wait)."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old
