"""Pipeline files: their keys, their validation, the frozen ``PipelineConfig``, the JSON Schema.

A pipeline file's keys are the settings the stages' configs declare with a pipeline key
(``skyscript_build.settings``; ``pipeline_keys`` collects them), checked by the same code as
on the command line, so a key takes exactly the values of its flag. ``load_pipeline(path)`` reads and validates the YAML before any work starts (unknown keys, bad
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
import functools
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from image_sources import BACKENDS, Catalog, default_catalog, source_from_dict

from ..caption import CaptionConfig
from ..cluster import ClusterConfig
from ..emulator import EmulatorConfig
from ..extract import ExtractConfig
from ..fetch import FetchConfig
from ..filter import FilterConfig
from ..plan import PlanConfig
from ..settings import NAME, Refused, Setting, relation_problem, setting, settings_of
from ._schema import Doc, Field, as_str_map, load_yaml, parse_section

__all__ = [
    "STAGES",
    "BACKEND_TYPES",
    "CONFIGS",
    "SECTIONS",
    "Section",
    "FilterSection",
    "PipelineConfig",
    "pipeline_keys",
    "json_schema",
    "load_pipeline",
]

log = logging.getLogger(__name__)

#: The stages ``run`` knows, in the order they run.
STAGES = ("extract", "plan", "fetch", "caption", "filter", "report")
#: A pipeline's backend types: the imagery backends, and the Earth Engine emulator.
BACKEND_TYPES = tuple(sorted((*BACKENDS, "emulator")))
#: Where ``make demo-data`` writes the demo's collections file (relative to the cwd).
DEMO_COLLECTIONS = Path("build/demo-data/collections.yaml")
_ALIAS = r"[A-Z][A-Z0-9_]{0,15}"
#: The sections of a pipeline file, in order; the other keys are at the top level.
SECTIONS = ("plan", "backend", "fetch", "output", "caption", "filter", "cluster")
#: What a pipeline must give for its backend type, beyond what that backend's config requires:
#: a pipeline names its backend, so it says where that backend reads from.
_REQUIRED_BY_TYPE = {"earthengine": "project", "raster": "location", "xyz": "location"}
#: Older keys of a backend type, still read (with a warning): the key they now are.
_RENAMED_BY_TYPE = {"xyz": {"url": "location"}}


@dataclass(frozen=True)
class PipelineKeys:
    """The declarations of the pipeline file's own keys (never built: every other key is a
    setting of a stage's config, ``CONFIGS``)."""

    backend_type: str = setting(
        help="where pixels come from: earthengine, emulator (the local Earth Engine emulator), "
        "raster (a folder of GeoTIFFs) or xyz (a tile server)",
        cli=None,
        pipeline="backend.type",
        choices=BACKEND_TYPES,
    )
    name: str | None = setting(
        None,
        help="the build's name (default: the file's name)",
        cli=None,
        pipeline="name",
        pattern=NAME,
    )
    build_dir: Path | None = setting(
        None, help="the build folder (default: build/<name>)", cli=None, pipeline="build_dir"
    )
    caption_function: str | None = setting(
        None,
        help="a Python caption function instead of rules: module:function or file.py:function",
        cli=None,
        pipeline="caption.function",
        pattern=(r"[\w./-]+:[A-Za-z_]\w*", "'module:function' or 'file.py:function'"),
    )
    caption_csv: str | None = setting(
        None,
        help="the caption CSV's file name in the dataset folder (default: SkyScript_captions.csv)",
        cli=None,
        pipeline="caption.csv",
        pattern=(r"[^/\\]+\.csv", "a file name ending in .csv"),
    )


#: The configs whose declared settings make the keys of a pipeline file.
CONFIGS: tuple[type, ...] = (
    PipelineKeys,
    ExtractConfig,
    PlanConfig,
    EmulatorConfig,
    FetchConfig,
    CaptionConfig,
    FilterConfig,
    ClusterConfig,
)


@functools.cache
def pipeline_keys() -> dict[str, dict[str, Setting]]:
    """Every key of a pipeline file, from the declarations of ``CONFIGS``: section (``""``
    for the top level) -> key -> its setting. Configs sharing a key (``seed``) declare it with
    the same rules."""
    keys: dict[str, dict[str, Setting]] = {"": {}, **{s: {} for s in SECTIONS}}
    for config in CONFIGS:
        for spec in settings_of(config).values():
            if spec.pipeline is None:
                continue
            section, _, key = spec.pipeline.rpartition(".")
            same = keys[section].setdefault(key, spec)
            if same.rules() != spec.rules():
                raise TypeError(f"pipeline key {spec.pipeline} declared with different rules")
    return keys


class Section(Mapping[str, Any]):
    """A section of a pipeline file (``plan:``, ``backend:``, ...): every key it may hold, read
    as attributes; None where the file leaves it out (the stage's own default applies)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"a pipeline section has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("a pipeline section is read-only")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.given()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._values,))

    def given(self) -> dict[str, Any]:
        """The settings the pipeline file gave (not None)."""
        return {k: v for k, v in self._values.items() if v is not None}


class FilterSection(Section):
    """The ``filter:`` section."""

    @property
    def random_weights(self) -> bool:
        """True when the model has no pretrained weights: its ranking means nothing."""
        return str(self.pretrained).lower() == "none"


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
    plan: Section
    backend: Section
    fetch: Section
    output: Section
    caption: Section
    filter: FilterSection | None
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
        return bool(self.backend.type == "emulator")

    def settings_for(self, config: type) -> dict[str, Any]:
        """What the file gives for the settings of ``config`` (a stage's config class), by
        field name; the settings it leaves out are not in it."""
        out = {}
        for spec in settings_of(config).values():
            if spec.pipeline is None:
                continue
            section, _, key = spec.pipeline.rpartition(".")
            holder = getattr(self, section) if section else self
            value = None if holder is None else getattr(holder, key)
            if value is not None:
                out[spec.name] = value
        return out

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


def _absolute(path: Path) -> Path:
    """A path relative to the current directory, made absolute."""
    return (Path.cwd() / path.expanduser()).absolute()


def _expanded(doc: Doc, where: tuple[str, ...], value: Any) -> Any:
    if isinstance(value, str):
        return doc.expand(where, value)
    if isinstance(value, list):
        return [_expanded(doc, (*where, str(i)), v) for i, v in enumerate(value)]
    return value


def _field(spec: Setting, default: Any = None) -> Field:
    """The YAML side of a declared setting: ``${VARIABLES}`` expanded, then ``spec.value``;
    paths made absolute."""

    def parse(doc: Doc, where: tuple[str, ...], value: Any) -> Any:
        try:
            out = spec.value(_expanded(doc, where, value))
        except Refused as e:
            at = where if e.item is None else (*where, str(e.item))
            raise doc.error(at, e.message()) from None
        if spec.kind is Path and out is not None:
            out = tuple(map(_absolute, out)) if spec.many else _absolute(out)
        return out

    return Field(parse, default, spec.required, help=_short(spec.help))


def _short(help: str) -> str:
    return help.split("; ")[0].split(" (")[0]


def _renamed(
    doc: Doc, where: tuple[str, ...], value: dict[str, Any], renames: Mapping[str, str]
) -> dict[str, Any]:
    """``value`` with the deprecated keys of ``renames`` (old -> new) renamed, with a warning."""
    out = dict(value)
    for old, new in renames.items():
        if old not in out:
            continue
        line = doc.lines.get((*where, old))
        if new in out:
            raise doc.error(
                (*where, old), f"is the old name of {'.'.join((*where, new))}: give one"
            )
        log.warning(
            "%s:%s: %s is deprecated; write %s",
            doc.path,
            line,
            ".".join((*where, old)),
            ".".join((*where, new)),
        )
        out[new] = out.pop(old)
        if line is not None:
            doc.lines[(*where, new)] = line
    return out


def _deprecated(keys: Mapping[str, Setting]) -> dict[str, str]:
    """Old key -> the key a setting of ``keys`` now has."""
    return {old.rpartition(".")[2]: k for k, s in keys.items() for old in s.deprecated}


def _section(
    doc: Doc, name: str, value: Any, keys: Mapping[str, Setting] | None = None
) -> dict[str, Any]:
    """A section checked against its declared keys; the keys it leaves out are None."""
    keys = pipeline_keys()[name] if keys is None else keys
    where = (name,)
    if isinstance(value, dict):
        value = _renamed(doc, where, value, _deprecated(keys))
    parsed = parse_section(doc, where, value, {k: _field(s) for k, s in keys.items()})
    by_name = {s.name: k for k, s in keys.items()}
    for key, spec in keys.items():
        other = by_name.get(spec.at_most or "")
        if other is None or (parsed[key] is None and parsed[other] is None):
            continue
        value_of = {
            k: parsed[k] if parsed[k] is not None else keys[k].default for k in (key, other)
        }
        problem = relation_problem(value_of[key], value_of[other], f"{name}.{other}")
        if problem:
            raise doc.error((name, key), f"{value_of[key]} {problem}")
    return parsed


def _parse_backend(doc: Doc, value: Any) -> Section:
    where = ("backend",)
    keys = pipeline_keys()["backend"]
    if not isinstance(value, dict):
        raise doc.error(where, "expected a mapping with at least 'type'")
    if value.get("type") is None:
        raise doc.error((*where, "type"), f"is required ({' | '.join(BACKEND_TYPES)})")
    kind = _field(keys["type"]).parse(doc, (*where, "type"), value["type"])
    value = _renamed(doc, where, value, {**_deprecated(keys), **_RENAMED_BY_TYPE.get(kind, {})})
    own = {k: s for k, s in keys.items() if not s.backends or kind in s.backends}
    for key in value:
        owners = [t for t in BACKEND_TYPES if key in keys and t in keys[key].backends]
        if key not in own and owners:
            raise doc.error(
                (*where, str(key)),
                f"is a setting of backend type {' / '.join(owners)}, not of '{kind}'",
            )
    required = _REQUIRED_BY_TYPE.get(kind)
    if required is not None and value.get(required) is None:
        raise doc.error((*where, required), f"is required ({_short(keys[required].help)})")
    parsed = _section(doc, "backend", value, own)
    if kind == "raster" and parsed["location"] is not None:
        parsed["location"] = str(_absolute(Path(parsed["location"])))
    return Section({k: parsed.get(k) for k in keys})


def _top_fields() -> dict[str, Field]:
    """The top level: the declared keys (with their defaults), the pipeline's own sources and
    the sections (each checked by itself)."""
    fields = {k: _field(s, s.default) for k, s in pipeline_keys()[""].items()}
    fields["source_definitions"] = Field(as_str_map(), {})
    section = Field(lambda doc, where, value: value)
    for name in SECTIONS:
        fields[name] = section
    fields["backend"] = Field(section.parse, required=True, help="where pixels come from")
    return fields


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a pipeline file, derived from the declarations, for
    editors to complete and check the YAML (``skyscript-build schema``)."""
    keys = pipeline_keys()

    def section(name: str, required: list[str]) -> dict[str, Any]:
        props = {k: s.json_schema() for k, s in keys[name].items()}
        for old, new in _deprecated(keys[name]).items():
            props[old] = {**props[new], "deprecated": True}
        out: dict[str, Any] = {"type": ["object", "null"], "properties": props}
        return {**out, "additionalProperties": False, "required": required}

    top: dict[str, Any] = {k: s.json_schema() for k, s in keys[""].items()}
    top["source_definitions"] = {
        "description": "your own image sources or overrides: ALIAS: {gsd, years, collection, "
        "bands, stretch, coverage, backend, location, ...} (image_sources.source_from_dict)",
        "type": "object",
        "additionalProperties": {"type": "object"},
    }
    for name in SECTIONS:
        required = [k for k, s in keys[name].items() if s.required and not s.backends]
        top[name] = section(name, required)
    backend = top["backend"]
    backend["type"] = "object"
    backend["allOf"] = []
    for kind in BACKEND_TYPES:
        renamed = {**_deprecated(keys["backend"]), **_RENAMED_BY_TYPE.get(kind, {})}
        others = [k for k, s in keys["backend"].items() if s.backends and kind not in s.backends]
        needed = [k for k, s in keys["backend"].items() if s.required and kind in s.backends]
        needed += [k for k in [_REQUIRED_BY_TYPE.get(kind)] if k]
        then: dict[str, Any] = {"properties": {k: False for k in others if k not in renamed}}
        then["allOf"] = [
            {
                "anyOf": [
                    {"required": [k]} for k in [need, *(o for o, n in renamed.items() if n == need)]
                ]
            }
            for need in needed
        ]
        condition = {"properties": {"type": {"const": kind}}, "required": ["type"]}
        backend["allOf"].append({"if": condition, "then": then})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "skyscript-build pipeline file",
        "type": "object",
        "properties": top,
        "required": [k for k, s in keys[""].items() if s.required] + ["backend"],
        "additionalProperties": False,
    }


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
    top = parse_section(
        doc, (), _renamed(doc, (), doc.data, _deprecated(pipeline_keys()[""])), _top_fields()
    )
    name = top["name"] or path.stem
    build_dir = top["build_dir"] or (Path.cwd() / "build" / name).absolute()
    caption = _section(doc, "caption", top["caption"])
    if caption["rules"] and caption["function"]:
        raise doc.error(("caption", "function"), "give either caption.rules or caption.function")
    filt = None
    if top["filter"] is not None:
        filt = FilterSection(_section(doc, "filter", top["filter"]))
    cluster = ClusterConfig(**Section(_section(doc, "cluster", top["cluster"])).given())
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
        plan=Section(_section(doc, "plan", top["plan"])),
        backend=_parse_backend(doc, top["backend"]),
        fetch=Section(_section(doc, "fetch", top["fetch"])),
        output=Section(_section(doc, "output", top["output"])),
        caption=Section(caption),
        filter=filt,
        cluster=cluster,
        catalog=catalog,
    )
