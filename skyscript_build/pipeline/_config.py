"""Pipeline files: the YAML schema, its validation, and the frozen ``PipelineConfig``.

``load_pipeline(path)`` reads and validates the YAML before any work starts (unknown keys, bad
values and unset ``${VARIABLES}`` are a ``ConfigError`` naming the file, the line and the key).
``skyscript_build.pipeline.run_pipeline`` runs it; ``skyscript_build.pipeline._stages`` turns it into
each stage's own config.

Paths in a pipeline file are relative to the current directory (where ``skyscript-build run``
or ``make`` runs), as on the command line; write ``${PIPELINE_DIR}/x`` for a path relative to
the pipeline file itself. ``${NAME}`` is replaced by the environment variable ``NAME`` (an
error when it is unset) and ``${NAME:-default}`` by its value or ``default``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from image_sources import Catalog, default_catalog, source_from_dict

from ..cluster import ClusterConfig
from ..fetch._blocks import BLOCK_MODES
from ..fetch._quality import JPEG_ENCODERS
from ._schema import (
    Doc,
    Field,
    as_bool,
    as_choice,
    as_float,
    as_int,
    as_list,
    as_str,
    as_str_map,
    load_yaml,
    parse_section,
)

__all__ = [
    "STAGES",
    "BACKEND_TYPES",
    "PlanSettings",
    "BackendSettings",
    "FetchSettings",
    "OutputSettings",
    "CaptionSettings",
    "FilterSettings",
    "PipelineConfig",
    "load_pipeline",
]

#: The stages ``run`` knows, in the order they run.
STAGES = ("extract", "plan", "fetch", "caption", "filter", "report")
BACKEND_TYPES = ("earthengine", "emulator", "raster", "xyz")
#: Where ``make demo-data`` writes the demo's collections file (relative to the cwd).
DEMO_COLLECTIONS = Path("build/demo-data/collections.yaml")
_ALIAS = r"[A-Z][A-Z0-9_]{0,15}"


class _Settings:
    """A section of the pipeline file; a field left at None takes the stage's own default."""

    def given(self) -> dict[str, Any]:
        """The settings the pipeline file gave (not None)."""
        return {k: v for k, v in asdict(self).items() if v is not None}  # type: ignore[call-overload]


@dataclass(frozen=True)
class PlanSettings(_Settings):
    """The ``plan:`` section (see ``skyscript-build plan --help`` for each parameter)."""

    years: tuple[int, ...] | None = None
    min_px: int | None = None
    max_px: int | None = None
    point_px: int | None = None
    margin: float | None = None
    shift: float | None = None
    per_tag_cap: int | None = None
    max_surrounding: int | None = None
    max_requests: int | None = None


@dataclass(frozen=True)
class BackendSettings(_Settings):
    """The ``backend:`` section: where pixels come from, and how fast to ask."""

    type: str = "earthengine"
    project: str | None = None  # earthengine
    key_file: Path | None = None  # earthengine (None: EE_SERVICE_ACCOUNT_KEY or default)
    url: str | None = None  # earthengine endpoint, or the xyz URL template
    collections: Path | None = None  # emulator
    latency_ms: float | None = None  # emulator
    latency_ms_per_mpx: float | None = None  # emulator
    folder: Path | None = None  # raster
    concurrency: int | None = None
    rate: float | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class FetchSettings(_Settings):
    """The ``fetch:`` section."""

    shard_size: int | None = None
    max_attempts: int | None = None
    allow_next_year: bool | None = None
    blocks: str | None = None
    block_overhead_ms: float | None = None
    block_ms_per_mpx: float | None = None
    block_max_px: int | None = None
    block_memory_mb: int | None = None
    jpeg_quality: int | None = None
    jpeg_encoder: str | None = None
    verify: bool | None = None


@dataclass(frozen=True)
class OutputSettings(_Settings):
    """The ``output:`` section: the dataset's layout."""

    parts: int | None = None
    format: str | None = None


@dataclass(frozen=True)
class CaptionSettings(_Settings):
    """The ``caption:`` section: caption rules (a rules file) or a Python function."""

    rules: str | None = None
    function: str | None = None
    csv: str | None = None


@dataclass(frozen=True)
class FilterSettings(_Settings):
    """The ``filter:`` section: the CLIP model, the kept fractions and the splits."""

    model: str = ""
    pretrained: str = ""
    model_config: Path | None = None
    name: str | None = None
    caption_column: str | None = None
    top: tuple[float, ...] | None = None
    val_size: int | None = None
    test_size: int | None = None
    split_by: str | None = None
    cell_size: float | None = None
    batch_size: int | None = None
    device: str | None = None
    precision: str | None = None
    decode: str | None = None
    workers: int | None = None
    shard_size: int | None = None

    @property
    def random_weights(self) -> bool:
        """True when the model has no pretrained weights: its ranking means nothing."""
        return self.pretrained.lower() == "none"


@dataclass(frozen=True)
class PipelineConfig:
    """A validated pipeline file. ``path`` is the file as given; the other paths are absolute.

    ``catalog``: the image sources of this pipeline (the default catalog plus its
    ``source_definitions``), handed to the plan and fetch stages.
    """

    path: Path
    name: str
    build_dir: Path
    seed: int
    input: tuple[Path, ...]  # files, folders or glob patterns (extract.resolve_inputs)
    tag_filter: str
    sources: tuple[str, ...]
    source_definitions: Mapping[str, Mapping[str, Any]]
    plan: PlanSettings
    backend: BackendSettings
    fetch: FetchSettings
    output: OutputSettings
    caption: CaptionSettings
    filter: FilterSettings | None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    catalog: Catalog = field(default_factory=default_catalog)

    @property
    def objects_dir(self) -> Path:
        return self.build_dir / "objects"

    @property
    def requests_dir(self) -> Path:
        return self.build_dir / "requests"

    @property
    def dataset_dir(self) -> Path:
        return self.build_dir / "dataset"

    @property
    def report_dir(self) -> Path:
        return self.build_dir / "report"

    @property
    def captions_csv(self) -> Path:
        return self.dataset_dir / (self.caption.csv or "SkyScript_captions.csv")

    @property
    def synthetic_imagery(self) -> bool:
        """True when the pixels come from the emulator (the demo's synthetic orthophoto)."""
        return self.backend.type == "emulator"

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (written to ``pipeline.json``)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            if hasattr(value, "__dataclass_fields__"):
                return plain(asdict(value))
            return value

        # the catalog is there as source_definitions
        fields = [k for k in self.__dataclass_fields__ if k != "catalog"]
        return plain({k: getattr(self, k) for k in fields})


# --- parsing -----------------------------------------------------------------------------


def _path(doc: Doc, where: tuple[str, ...], value: Any) -> Path:
    """A path, relative to the current directory; returned absolute."""
    text = as_str()(doc, where, value)
    return (Path.cwd() / Path(text).expanduser()).absolute()


def _optional_path(doc: Doc, where: tuple[str, ...], value: Any) -> Path | None:
    """A path that may come out empty (``${VAR:-}``): empty means "not set"."""
    if isinstance(value, str) and not doc.expand(where, value).strip():
        return None
    return _path(doc, where, value)


def _fraction(doc: Doc, where: tuple[str, ...], value: Any) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise doc.error(where, f"'{value}' is not a percentage") from None
    return as_float(0.0, 1.0, exclusive_min=True)(doc, where, value)


def _years(doc: Doc, where: tuple[str, ...], value: Any) -> tuple[int, ...]:
    """``2019``, ``[2015, 2022]`` (first, last) or ``"2015-2022"``."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d{4}\s*-\s*\d{4}\s*", value):
        value = [int(v) for v in value.split("-")]
    years = as_list(as_int(1900, 2100))(doc, where, value)
    if not 1 <= len(years) <= 2:
        raise doc.error(where, "give one year or a range [first, last]")
    if len(years) == 2 and years[0] > years[1]:
        raise doc.error(where, f"{years[0]}-{years[1]} runs backwards")
    return years


def _blocks(doc: Doc, where: tuple[str, ...], value: Any) -> str:
    """``auto`` or ``off``; YAML reads a bare ``off`` (``on``) as false (true): taken as meant."""
    if isinstance(value, bool):
        return "auto" if value else "off"
    return as_choice(*BLOCK_MODES)(doc, where, value)


_NAME = (r"[A-Za-z0-9_.-]+", "a name of letters, digits, '_', '.' or '-'")
_PLAN = {
    "years": Field(_years),
    "min_px": Field(as_int(1, 100_000)),
    "max_px": Field(as_int(1, 100_000)),
    "point_px": Field(as_int(1, 100_000)),
    "margin": Field(as_float(0.0, 10.0)),
    "shift": Field(as_float(0.0, 1.0)),
    "per_tag_cap": Field(as_int(1)),
    "max_surrounding": Field(as_int(0)),
    "max_requests": Field(as_int(1)),
}
_BACKEND_COMMON = {
    "type": Field(as_choice(*BACKEND_TYPES), required=True, help=" | ".join(BACKEND_TYPES)),
    "concurrency": Field(as_int(1, 10_000)),
    "rate": Field(as_float(0.0, exclusive_min=True)),
    "timeout_s": Field(as_float(0.0, exclusive_min=True)),
}
_BACKEND_BY_TYPE = {
    "earthengine": {
        "project": Field(
            as_str(), required=True, help="your Google Cloud project registered for Earth Engine"
        ),
        "key_file": Field(_optional_path),
        "url": Field(as_str(r"https?://\S+", "an http(s) URL")),
    },
    "emulator": {
        "collections": Field(_path, required=True, help="the emulator's collections YAML"),
        "latency_ms": Field(as_float(0.0)),
        "latency_ms_per_mpx": Field(as_float(0.0)),
    },
    "raster": {
        "folder": Field(_path, required=True, help="a folder of GeoTIFFs / COGs"),
    },
    "xyz": {
        "url": Field(
            as_str(r"https?://\S*\{z\}\S*", "a tile URL template with {z}, {x} and {y}"),
            required=True,
            help="a tile URL template such as https://host/{z}/{x}/{y}.png",
        ),
    },
}
_FETCH = {
    "shard_size": Field(as_int(1, 1_000_000)),
    "max_attempts": Field(as_int(1, 100)),
    "allow_next_year": Field(as_bool()),
    "blocks": Field(_blocks),
    "block_overhead_ms": Field(as_float(0.0)),
    "block_ms_per_mpx": Field(as_float(0.0)),
    "block_max_px": Field(as_int(1, 32768)),
    "block_memory_mb": Field(as_int(1)),
    "jpeg_quality": Field(as_int(1, 100)),
    "jpeg_encoder": Field(as_choice(*JPEG_ENCODERS)),
    "verify": Field(as_bool()),
}
_OUTPUT = {
    "parts": Field(as_int(1, 1000)),
    "format": Field(as_choice("files", "webdataset")),
}
_CAPTION = {
    "rules": Field(as_str()),
    "function": Field(as_str(r"[\w./-]+:[A-Za-z_]\w*", "'module:function' or 'file.py:function'")),
    "csv": Field(as_str(r"[^/\\]+\.csv", "a file name ending in .csv")),
}
_FILTER = {
    "model": Field(as_str(), required=True, help="an open_clip architecture, e.g. ViT-B-32"),
    "pretrained": Field(
        as_str(),
        required=True,
        help="an open_clip tag, a checkpoint file, or none for random weights",
    ),
    "model_config": Field(_path),
    "name": Field(as_str(*_NAME)),
    "caption_column": Field(as_choice("title", "title_multi_objects")),
    "top": Field(as_list(_fraction, min_len=1, unique=True)),
    "val_size": Field(as_int(0)),
    "test_size": Field(as_int(0)),
    "split_by": Field(as_choice("random", "geo")),
    "cell_size": Field(as_float(0.0, exclusive_min=True)),
    "batch_size": Field(as_int(1, 1_000_000)),
    "device": Field(
        as_str(r"auto|cuda|(cpu|cuda:\d+)(,(cpu|cuda:\d+))*", "auto, cpu, cuda, cuda:N or a list")
    ),
    "precision": Field(as_choice("auto", "fp32", "bf16", "fp16")),
    "decode": Field(as_choice("auto", "cpu", "gpu")),
    "workers": Field(as_int(0, 1024)),
    "shard_size": Field(as_int(1)),
}
_CLUSTER = {
    "workers": Field(as_int(0, 10_000), 0),
    "scheduler": Field(as_str(r"(tcp|tls|inproc|ucx)://\S+|\S+:\d+", "a scheduler address")),
    "retries": Field(as_int(0, 100), 2),
}
_SECTION = Field(lambda doc, where, value: value)
_TOP = {
    "name": Field(as_str(*_NAME)),
    "build_dir": Field(_path),
    "seed": Field(as_int(0), 0),
    "input": Field(
        as_list(_path, min_len=1, unique=True),
        required=True,
        help="the OpenStreetMap .osm.pbf file(s): a path, a list of paths, a folder or a glob",
    ),
    "tag_filter": Field(as_str(), "default"),
    "sources": Field(
        as_list(
            as_str(_ALIAS, "an image source alias (upper case, e.g. CH)"), min_len=1, unique=True
        ),
        required=True,
        help="image source aliases, e.g. [CH, S2]",
    ),
    "source_definitions": Field(as_str_map(), {}),
    "plan": _SECTION,
    "backend": Field(lambda doc, where, value: value, required=True, help="where pixels come from"),
    "fetch": _SECTION,
    "output": _SECTION,
    "caption": _SECTION,
    "filter": _SECTION,
    "cluster": _SECTION,
}


def _parse_backend(doc: Doc, value: Any) -> BackendSettings:
    where = ("backend",)
    if not isinstance(value, dict):
        raise doc.error(where, "expected a mapping with at least 'type'")
    if value.get("type") is None:
        raise doc.error((*where, "type"), f"is required ({' | '.join(BACKEND_TYPES)})")
    kind = _BACKEND_COMMON["type"].parse(doc, (*where, "type"), value["type"])
    fields = {**_BACKEND_COMMON, **_BACKEND_BY_TYPE[kind]}
    for key in value:
        owners = [t for t, f in _BACKEND_BY_TYPE.items() if key in f]
        if key not in fields and owners:
            raise doc.error(
                (*where, str(key)),
                f"is a setting of backend type {' / '.join(owners)}, not of '{kind}'",
            )
    return BackendSettings(**parse_section(doc, where, value, fields))


def _catalog(doc: Doc, definitions: dict[str, Any], sources: tuple[str, ...]) -> Catalog:
    """The default catalog plus the pipeline's own source definitions (a new catalog: no other
    pipeline sees them); every alias of ``sources`` must be in it."""
    from ..errors import SkyScriptError

    base = default_catalog()
    defined = []
    for alias, entry in definitions.items():
        where = ("source_definitions", alias)
        if not re.fullmatch(_ALIAS, alias):
            raise doc.error(where, "is not an image source alias (upper case, e.g. CH)")
        if not isinstance(entry, dict):
            raise doc.error(where, "expected a mapping of source fields")
        try:
            defined.append(source_from_dict({**entry, "alias": alias}, base))
        except (SkyScriptError, ValueError, TypeError) as e:
            raise doc.error(where, str(e)) from None
    catalog = base.with_sources(*defined, replace=True)
    known = catalog.aliases()
    for i, alias in enumerate(sources):
        if alias not in known:
            close = difflib.get_close_matches(alias, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise doc.error(
                ("sources", str(i)),
                f"unknown image source '{alias}'{hint} (known: {', '.join(known)}; "
                "define your own under source_definitions)",
            )
    return catalog


def load_pipeline(
    path: str | Path, *, variables: Mapping[str, str] | None = None
) -> PipelineConfig:
    """Read and validate a pipeline YAML file.

    Args:
        path: the pipeline file.
        variables: values for ``${NAME}`` placeholders, looked up before the environment.

    Raises:
        ConfigError: the file is missing or not valid YAML, has an unknown key, a bad value or
            an unset variable; the message names the file, line and key.
    """
    path = Path(path)  # as the user gave it: messages name it so
    variables = {"PIPELINE_DIR": str(path.absolute().parent), **(variables or {})}
    doc = load_yaml(path, variables)
    if not isinstance(doc.data, dict):
        raise doc.error((), "expected a mapping of pipeline settings (name, input, sources, ...)")
    top = parse_section(doc, (), doc.data, _TOP)
    name = top["name"] or path.stem
    build_dir = top["build_dir"] or (Path.cwd() / "build" / name).absolute()
    plan = PlanSettings(**parse_section(doc, ("plan",), top["plan"], _PLAN))
    if plan.min_px and plan.max_px and plan.min_px > plan.max_px:
        raise doc.error(
            ("plan", "min_px"), f"{plan.min_px} is larger than plan.max_px ({plan.max_px})"
        )
    caption = CaptionSettings(**parse_section(doc, ("caption",), top["caption"], _CAPTION))
    if caption.rules and caption.function:
        raise doc.error(("caption", "function"), "give either caption.rules or caption.function")
    filt = None
    if top["filter"] is not None:
        filt = FilterSettings(**parse_section(doc, ("filter",), top["filter"], _FILTER))
    cluster = ClusterConfig(**parse_section(doc, ("cluster",), top["cluster"], _CLUSTER))
    catalog = _catalog(doc, top["source_definitions"], top["sources"])
    return PipelineConfig(
        path=path,
        name=name,
        build_dir=build_dir,
        seed=top["seed"],
        input=top["input"],
        tag_filter=top["tag_filter"],
        sources=top["sources"],
        source_definitions=top["source_definitions"],
        plan=plan,
        backend=_parse_backend(doc, top["backend"]),
        fetch=FetchSettings(**parse_section(doc, ("fetch",), top["fetch"], _FETCH)),
        output=OutputSettings(**parse_section(doc, ("output",), top["output"], _OUTPUT)),
        caption=caption,
        filter=filt,
        cluster=cluster,
        catalog=catalog,
    )
