"""Reading pipeline YAML files: the line of every key, ``${VARIABLES}``, sections of known
keys with "did you mean" errors.

Every problem raises ``ConfigError("FILE:LINE: key.path: problem")``: the file, where in it,
and what is wrong, in one line. The keys and their checks are the settings declared on the
stages' configs (``skyscript_build.pipeline._config``).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..settings import what_it_is

__all__ = ["Doc", "Field", "load_yaml", "parse_section", "as_str_map"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class Doc:
    """A loaded YAML file: its data, its path, the line of every key path, its variables."""

    path: Path
    data: Any
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)
    variables: Mapping[str, str] = field(default_factory=dict)

    def error(self, where: tuple[str, ...], problem: str) -> ConfigError:
        """A ConfigError naming the file, the line (when known) and the key path."""
        line = None
        for cut in range(len(where), -1, -1):
            line = self.lines.get(where[:cut])
            if line is not None:
                break
        loc = f"{self.path}:{line}" if line is not None else str(self.path)
        key = ".".join(where)
        return ConfigError(f"{loc}: {key}: {problem}" if key else f"{loc}: {problem}")

    def expand(self, where: tuple[str, ...], value: str) -> str:
        """Replace ``${VAR}`` and ``${VAR:-default}`` in a string value."""

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = self.variables.get(name, os.environ.get(name))
            if value is None or value == "":
                if default is not None:
                    return default
                raise self.error(
                    where, f"environment variable {name} is not set (export {name}=...)"
                )
            return value

        return _VAR.sub(sub, value)


def _record_lines(node: yaml.Node, path: tuple[str, ...], lines: dict, doc_path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise ConfigError(
                    f"{doc_path}:{key_node.start_mark.line + 1}: "
                    f"{'.'.join((*path, key))}: key given twice"
                )
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _record_lines(value_node, (*path, key), lines, doc_path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, str(i))] = item.start_mark.line + 1
            _record_lines(item, (*path, str(i)), lines, doc_path)


def load_yaml(path: str | Path, variables: Mapping[str, str] | None = None) -> Doc:
    """Read a YAML file into a ``Doc``; a missing or malformed file is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the pipeline file ({e})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{loc}: not valid YAML ({problem})") from None
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _record_lines(node, (), lines, path)
    return Doc(path=path, data=data, lines=lines, variables=dict(variables or {}))


# --- field parsers: (doc, where, value) -> parsed value -----------------------------------

Parser = Callable[[Doc, tuple[str, ...], Any], Any]


@dataclass(frozen=True)
class Field:
    """One key of a section: its parser and its default (``required`` when there is none)."""

    parse: Parser
    default: Any = None
    required: bool = False
    help: str = ""


def parse_section(
    doc: Doc, where: tuple[str, ...], value: Any, fields: Mapping[str, Field]
) -> dict[str, Any]:
    """Check a mapping against ``fields``: unknown keys, missing keys, each value's parser."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise doc.error(where, f"expected a mapping of keys, got {what_it_is(value)}")
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(fields)
            raise doc.error((*where, str(key)), f"unknown key{hint} (known keys: {known})")
    out: dict[str, Any] = {}
    for key, spec in fields.items():
        if key in value and value[key] is not None:
            out[key] = spec.parse(doc, (*where, key), value[key])
        elif spec.required:
            raise doc.error((*where, key), "is required" + (f" ({spec.help})" if spec.help else ""))
        else:
            out[key] = spec.default
    return out


def as_str_map() -> Parser:
    """A mapping of text keys to plain values (passed through, ``${VAR}`` expanded)."""

    def expand(doc: Doc, where: tuple[str, ...], value: Any) -> Any:
        if isinstance(value, str):
            return doc.expand(where, value)
        if isinstance(value, list):
            return [expand(doc, (*where, str(i)), v) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {str(k): expand(doc, (*where, str(k)), v) for k, v in value.items()}
        return value

    def parse(doc: Doc, where: tuple[str, ...], value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise doc.error(where, f"expected a mapping, got {what_it_is(value)}")
        return {str(k): expand(doc, (*where, str(k)), v) for k, v in value.items()}

    return parse
