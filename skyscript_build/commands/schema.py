"""``skyscript-build schema``: the pipeline file's JSON Schema, or the tables of every setting.

Both come from the settings declared on the stages' configs (``skyscript_build.settings``).
``--markdown`` prints ``docs/settings.md`` (``make docs`` writes it; a test keeps the checked-in
file up to date).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from ..settings import Setting, nested_of, settings_of

HELP = "print the JSON Schema of a pipeline file (for editors), or with --markdown every setting"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the tables of every command's flags and every pipeline key "
        "(docs/settings.md) instead",
    )


def main(args: argparse.Namespace) -> int:
    from ..pipeline import json_schema

    text = settings_markdown() if args.markdown else json.dumps(json_schema(), indent=2) + "\n"
    sys.stdout.write(text)
    return 0


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(spec: Setting) -> str:
    if spec.required:
        return "**required**"
    value = spec.default
    if value is None or value == () or value is False:
        return ""
    if isinstance(value, tuple):
        return " ".join(f"`{v}`" for v in value)
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def _pipeline_tables() -> list[str]:
    from ..pipeline._config import SECTIONS, pipeline_keys

    keys = pipeline_keys()
    lines = ["## Pipeline files", ""]
    lines += [
        "A key left out takes the stage's own default. Paths are relative to the current "
        "directory (`${PIPELINE_DIR}/x`: relative to the pipeline file); `${NAME}` is the "
        "environment variable `NAME`, `${NAME:-default}` its value or `default`. See "
        "`pipelines/README.md`.",
        "",
    ]
    for section in ("", *SECTIONS):
        title = "The top level" if not section else f"`{section}:`"
        lines += [f"### {title}", ""]
        if section == "backend":
            lines += [
                "`type` chooses the backend; the other keys belong to the backend types "
                "listed (none: every type).",
                "",
            ]
        lines += ["| key | values | default | meaning |", "|---|---|---|---|"]
        for key, spec in keys[section].items():
            name = f"`{key}`" + (f" ({', '.join(spec.backends)})" if spec.backends else "")
            row = (name, spec.describe(), _default(spec), spec.help)
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
            for old in spec.deprecated:
                old_key = old.rpartition(".")[2]
                lines.append(f"| `{old_key}` | | | the old name of `{key}`, still read |")
        if section == "":
            lines.append(
                "| `source_definitions` | mapping | | your own image sources or overrides: "
                "`ALIAS: {gsd, years, collection, bands, stretch, coverage, backend, location, "
                "...}` (`image_sources.source_from_dict`) |"
            )
        if section == "backend":
            lines.append("| `url` (xyz) | | | the old name of `location`, still read |")
        lines.append("")
    return lines


def _command_tables() -> list[str]:
    from ..cli import COMMANDS, _module_name

    lines = ["## Commands", ""]
    lines += [
        "`skyscript-build COMMAND --help` shows the same. The pipeline key is where a pipeline "
        "file gives the setting (`run` passes the folders between the stages itself).",
        "",
    ]
    for command in COMMANDS:
        module = importlib.import_module(_module_name(command))
        config = getattr(module, "CONFIG", None)
        if config is None:
            continue
        lines += [f"### `skyscript-build {command}`", "", module.HELP.replace("%%", "%"), ""]
        lines += ["| flag | pipeline key | values | default | meaning |", "|---|---|---|---|---|"]
        specs = list(settings_of(config).values())
        for nested_config, _ in nested_of(config).values():
            specs += settings_of(nested_config).values()
        for spec in specs:
            if not spec.cli:
                continue
            pipeline = f"`{spec.pipeline}`" if spec.pipeline else ""
            row = (f"`{spec.cli}`", pipeline, spec.describe(), _default(spec), spec.help)
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        lines.append("")
    return lines


def settings_markdown() -> str:
    """``docs/settings.md``: every pipeline key and every command's flags, from the
    declarations."""
    lines = [
        "# Settings",
        "",
        "<!-- Made by `make docs` (`skyscript-build schema --markdown`) from the settings "
        "declared on each stage's config: edit those, not this file. -->",
        "",
        "Every setting is declared once, on its stage's frozen config "
        "(`skyscript_build/settings.py`): its help, the values it accepts, its flag and its "
        "pipeline key. The flags, the pipeline file's checks, `skyscript-build schema` (the "
        "pipeline file's JSON Schema, for editors) and these tables all come from that "
        "declaration, so the command line and a pipeline file accept and refuse the same values.",
        "",
    ]
    return "\n".join(lines + _pipeline_tables() + _command_tables()).rstrip() + "\n"
