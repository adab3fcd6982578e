"""Each setting declared once: the command line and a pipeline file accept and refuse the same
values, the JSON Schema checks the shipped pipelines, docs/settings.md is up to date."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import image_sources
from skyscript_build.cli import COMMANDS, _module_name, build_parser
from skyscript_build.commands.schema import settings_markdown
from skyscript_build.emulator import EmulatorConfig
from skyscript_build.errors import ConfigError
from skyscript_build.fetch.backends import BACKENDS
from skyscript_build.fetch.stage import REQUIRED_COLUMNS
from skyscript_build.filter import FilterConfig
from skyscript_build.pipeline import BACKEND_TYPES, json_schema, load_pipeline
from skyscript_build.pipeline._stages import STAGE_SPECS, RunContext, stage_module
from skyscript_build.settings import Setting, config_from_args, nested_of, settings_of

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "pipelines").glob("*.yaml"))
ENV = {"EE_PROJECT": "my-project", "DASK_SCHEDULER": "tcp://127.0.0.1:8786"}

# Good values a setting's declaration does not spell out (its default is the first).
EXAMPLES: dict[str, list[Any]] = {
    "sources": ["FI", "FI,S2", "FI,FI", "XX"],
    "caption.rules": ["default", "no_such_rules"],
    "filter.name": ["tiny", "a.b_c-1", "-x"],
    "filter.device": ["cpu", "cuda:0,cuda:1", "gpu"],
    "backend.url": ["http://127.0.0.1:1", "127.0.0.1:1"],
    "input": ["a.osm.pbf", ["a.osm.pbf", "b.osm.pbf"]],
    "plan.years": ["2019", "2015-2022", "2022-2015", "2019-2020-2021", "1800"],
    "filter.top": [["0.3", "50%"], ["0.3", "30%"], "150%", "x%"],
}
# Command of each config (its parser makes the flags), and how a run builds it from a pipeline.
COMMAND_OF = {
    "ExtractConfig": "extract",
    "PlanConfig": "plan",
    "FetchConfig": "fetch",
    "CaptionConfig": "caption",
    "FilterConfig": "filter",
    "EmulatorConfig": "emulator",
}


def _numbers(spec: Setting) -> list[str]:
    kind = spec.kind
    step = 1 if kind is int else 0.5
    out = ["x", "1.5" if kind is int else "1e400x", ""]
    for bound in (spec.minimum, spec.maximum, spec.above):
        if bound is not None:
            out += [str(kind(bound)), str(kind(bound - step)), str(kind(bound + step))]
    if spec.above is None and spec.minimum is None:
        out.append("-1")
    return out


def candidates(spec: Setting) -> list[Any]:
    """Values to try: boundaries, wrong types, bad choices, repeats; a list is several tokens."""
    assert spec.pipeline is not None
    out: list[Any] = list(EXAMPLES.get(spec.pipeline, []))
    if spec.default not in (None, ()):
        out.append(spec.split.join(map(str, spec.default)) if spec.split else spec.default)
    if spec.choices:
        out += [*spec.choices, "bogus", spec.choices[0].upper()]
    elif spec.kind in (int, float):
        out += _numbers(spec)
    elif spec.pattern is None and spec.pipeline not in EXAMPLES:
        out.append("x")
    out.append("")
    if spec.pattern is not None:
        out.append("a b")
    if spec.form is not None:
        out += ["30%", "100%", "0%"]
    if spec.many and spec.unique:
        first = str(out[0])
        out.append(f"{first}{spec.split}{first}" if spec.split else [first, first])
    return [[str(v) for v in c] if isinstance(c, list) else str(c) for c in out]


def _yaml(value: Any, bare: bool) -> str:
    """A token as YAML: quoted (a string, as on the command line) or bare (read as a number)."""
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v, bare) for v in value) + "]"
    text = yaml.safe_dump(value, default_style=None).strip().removesuffix("\n...").strip()
    if bare and isinstance(yaml.safe_load(value or "''"), int | float):
        return value
    return text if text.startswith(("'", '"')) else json.dumps(value)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("settings")
    requests = root / "build" / "requests"
    requests.mkdir(parents=True)
    empty = pa.table({c: pa.array([], pa.string()) for c in REQUIRED_COLUMNS})
    pq.write_table(empty, requests / "part-00000.parquet")
    (root / "build" / "dataset").mkdir()
    (root / "rasters").mkdir()
    return root


def _cli_args(command: str, spec: Setting, value: Any, root: Path) -> list[str]:
    base = {
        "extract": ["--out", str(root / "objects")],
        "plan": ["--objects", str(root / "objects"), "--out", str(root / "req")],
        "fetch": ["--requests", str(root / "build" / "requests"), "--out", str(root / "ds")],
        "caption": ["--dataset", str(root / "build" / "dataset")],
        "filter": ["--dataset", "d", "--captions", "c.csv", "--model", "m", "--pretrained", "none"],
        "emulator": ["--collections", "c.yaml"],
    }[command]
    tokens = value if isinstance(value, list) else [value]
    if spec.positional:
        return [command, *base, "--", *tokens]
    if spec.cli in base:
        at = base.index(spec.cli)
        base = base[:at] + base[at + 2 :]
    if command == "extract":
        base.append("a.osm.pbf")  # INPUT
    if isinstance(value, str):  # --flag=VALUE: a value may start with '-'
        return [command, f"{spec.cli}={value}", *base]
    return (
        [command, str(spec.cli), *tokens, "--", *base]
        if command == "extract"
        else [command, *base, str(spec.cli), *tokens]
    )


def cli_accepts(config: type, spec: Setting, value: Any, root: Path) -> bool:
    """Whether ``skyscript-build COMMAND --flag VALUE`` builds its config."""
    command = COMMAND_OF[config.__name__]
    args = build_parser(command).parse_args(_cli_args(command, spec, value, root))
    try:
        config_from_args(config, args)
    except ConfigError:
        return False
    return True


def _pipeline_text(spec: Setting, rendered: str, root: Path) -> str:
    section, _, key = str(spec.pipeline).rpartition(".")
    kind = spec.backends[0] if spec.backends else "emulator"
    backend = {
        "type": kind,
        "earthengine": {"project": "p"},
        "emulator": {"collections": "c.yaml"},
        "raster": {"location": str(root / "rasters")},
        "xyz": {"location": "http://127.0.0.1:1/{z}/{x}/{y}.png"},
    }
    sections: dict[str, dict[str, str]] = {
        "backend": {"type": kind, **{k: json.dumps(v) for k, v in backend[kind].items()}}  # type: ignore[dict-item]
    }
    sections["filter"] = {"model": "m", "pretrained": "none"}
    top = {"name": "eq", "build_dir": json.dumps(str(root / "build")), "input": "a.osm.pbf"}
    target = top if not section else sections.setdefault(section, {})
    target[key] = rendered
    lines = [f"{k}: {v}" for k, v in top.items()]
    for name, values in sections.items():
        lines += [f"{name}:"] + [f"  {k}: {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def yaml_accepts(config: type, spec: Setting, rendered: str, root: Path) -> bool:
    """Whether a pipeline file giving ``spec``'s key loads and builds the stage's config, as
    ``run`` does before any work."""
    path = root / "p.yaml"
    path.write_text(_pipeline_text(spec, rendered, root))
    try:
        pipeline = load_pipeline(path)
    except ConfigError as e:
        key = str(spec.pipeline)
        assert key in str(e) or key.rpartition(".")[2] in str(e), str(e)
        return False
    try:
        if config is EmulatorConfig:
            EmulatorConfig(**pipeline.settings_for(EmulatorConfig))
        else:
            stage = COMMAND_OF[config.__name__]
            build = STAGE_SPECS[stage].build
            build(
                pipeline,
                RunContext(emulator_url="http://127.0.0.1:1"),
                stage_module(stage, STAGE_SPECS[stage].module),
            )
    except ConfigError:
        return False
    return True


def _compared() -> list[tuple[type, Setting]]:
    from skyscript_build.pipeline._config import CONFIGS

    return [
        (config, spec)
        for config in CONFIGS
        if config.__name__ in COMMAND_OF
        for spec in settings_of(config).values()
        if spec.cli and spec.pipeline and spec.kind is not bool
    ]


@pytest.mark.parametrize(
    ("config", "spec"), _compared(), ids=[f"{c.__name__}.{s.name}" for c, s in _compared()]
)
def test_command_line_and_pipeline_accept_the_same_values(
    config: type, spec: Setting, workspace: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(workspace)
    verdicts = {}
    for value in candidates(spec):
        on_cli = cli_accepts(config, spec, value, workspace)
        forms = {_yaml(value, bare=False), _yaml(value, bare=True)}
        for rendered in forms:
            assert yaml_accepts(config, spec, rendered, workspace) == on_cli, (
                f"{spec.cli} {value!r}: command line {'accepts' if on_cli else 'refuses'}, "
                f"pipeline {spec.pipeline}: {rendered} does not"
            )
        verdicts[str(value)] = on_cli
    assert any(verdicts.values()), verdicts
    free = spec.kind in (str, Path) and not (spec.choices or spec.pattern or spec.check)
    assert free or not all(verdicts.values()), verdicts  # the test can fail


def test_boolean_settings_are_flags_and_yaml_booleans(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(workspace)
    booleans = [
        (c, s)
        for c in {c for c, _ in _compared()}
        for s in settings_of(c).values()
        if s.kind is bool and s.cli and s.pipeline
    ]
    assert booleans
    for config, spec in booleans:
        command = COMMAND_OF[config.__name__]
        args = build_parser(command).parse_args(_cli_args(command, spec, [], workspace))
        assert getattr(config_from_args(config, args), spec.name) is True
        assert yaml_accepts(config, spec, "true", workspace)
        assert not yaml_accepts(config, spec, "yes-please", workspace)


def test_the_drifts_of_issue_15_are_gone(workspace: Path, monkeypatch: pytest.MonkeyPatch, cli):
    # fetch --parts 2000 is refused as output.parts 2000 is, with one line and exit 2
    result = cli("fetch", "--requests", workspace / "build" / "requests", "--out", workspace / "ds",
                 "--parts", "2000")  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "skyscript-build fetch: error: --parts must be at most 1000, got --parts 2000"
    )
    # --top 30% as top: ["30%"]; --name optional as in a pipeline (the model's name)
    args = build_parser("filter").parse_args(
        [
            "filter",
            "--dataset",
            "d",
            "--captions",
            "c.csv",
            "--model",
            "ViT-B/32",
            "--pretrained",
            "none",
            "--top",
            "30%",
            "0.5",
        ]  # fmt: skip
    )
    config = config_from_args(FilterConfig, args)
    assert config.top == (0.3, 0.5) and config.name == "ViT-B-32"
    # one list of backends
    assert BACKENDS is image_sources.BACKENDS
    assert set(BACKEND_TYPES) == {*BACKENDS, "emulator"}


def test_raster_folder_is_location_and_the_old_key_still_works(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.chdir(workspace)
    text = "input: a.osm.pbf\nbackend:\n  type: raster\n  {key}: rasters\n"
    path = workspace / "r.yaml"
    path.write_text(text.format(key="location"))
    assert load_pipeline(path).backend.location == str(workspace / "rasters")
    path.write_text(text.format(key="folder"))
    with caplog.at_level(logging.WARNING):
        assert load_pipeline(path).backend.location == str(workspace / "rasters")
    assert f"{path}:4: backend.folder is deprecated; write backend.location" in caplog.text
    path.write_text(text.format(key="folder") + "  location: rasters\n")
    with pytest.raises(ConfigError, match="backend.folder: is the old name of backend.location"):
        load_pipeline(path)
    path.write_text("input: a.osm.pbf\nbackend:\n  type: xyz\n  url: http://h/{z}/{x}/{y}.png\n")
    assert load_pipeline(path).backend.location == "http://h/{z}/{x}/{y}.png"


def test_every_flag_is_explained_by_help():
    for command in COMMANDS:
        config = getattr(importlib.import_module(_module_name(command)), "CONFIG", None)
        if config is None:
            continue
        parser = build_parser(command)
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        text = " ".join(action.choices[command].format_help().split())
        specs = [*settings_of(config).values()]
        for nested_config, _ in nested_of(config).values():
            specs += settings_of(nested_config).values()
        for spec in specs:
            if spec.cli:
                assert spec.cli in text and " ".join(spec.help.split()[:3]) in text, spec.name


# --- the JSON Schema and the docs ---------------------------------------------------------


def test_schema_validates_every_shipped_pipeline():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in SHIPPED:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path.name, errors)


@pytest.mark.parametrize(
    "extra",
    [
        "output:\n  parts: 2000\n",
        "plan:\n  min_pixels: 256\n",
        "filter:\n  model: m\n",
        "fetch:\n  blocks: sometimes\n",
        "backend2: {}\n",
    ],
)
def test_schema_refuses_what_load_pipeline_refuses(extra: str, tmp_path: Path):
    text = "input: a.osm.pbf\nbackend:\n  type: emulator\n  collections: c.yaml\n" + extra
    validator = jsonschema.Draft202012Validator(json_schema())
    assert list(validator.iter_errors(yaml.safe_load(text)))
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_pipeline(path)


def test_schema_knows_the_backend_types():
    validator = jsonschema.Draft202012Validator(json_schema())
    ok = {"input": "a", "backend": {"type": "earthengine", "project": "${EE_PROJECT}"}}
    assert not list(validator.iter_errors(ok))
    wrong = {"input": "a", "backend": {"type": "emulator", "collections": "c", "project": "p"}}
    assert list(validator.iter_errors(wrong))
    missing = {"input": "a", "backend": {"type": "raster"}}
    assert list(validator.iter_errors(missing))
    old = {"input": "a", "backend": {"type": "raster", "folder": "r"}}
    assert not list(validator.iter_errors(old))


def test_schema_command_prints_the_schema(cli):
    result = cli("schema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(json_schema()))


def test_docs_settings_md_is_up_to_date():
    checked_in = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    assert checked_in == settings_markdown(), "docs/settings.md is stale: run `make docs`"
