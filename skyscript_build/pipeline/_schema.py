"""A small validator for pipeline YAML files: typed fields, defaults, "did you mean" errors.

Every problem raises ``ConfigError("FILE:LINE: key.path: problem")``: the file, where in it,
and what is wrong, in one line. Used by ``skyscript_build.pipeline``.
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

__all__ = [
    "Doc",
    "Field",
    "load_yaml",
    "parse_section",
    "as_bool",
    "as_int",
    "as_float",
    "as_str",
    "as_choice",
    "as_list",
    "as_str_map",
]

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
        raise doc.error(where, f"expected a mapping of keys, got {_kind(value)}")
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


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the text '{value}'"
    return f"{value!r}"


def as_bool() -> Parser:
    def parse(doc: Doc, where: tuple[str, ...], value: Any) -> bool:
        if not isinstance(value, bool):
            raise doc.error(where, f"expected true or false, got {_kind(value)}")
        return value

    return parse


def as_int(min_value: int | None = None, max_value: int | None = None) -> Parser:
    def parse(doc: Doc, where: tuple[str, ...], value: Any) -> int:
        if isinstance(value, str):
            value = doc.expand(where, value)
            try:
                value = int(value)
            except ValueError:
                raise doc.error(where, f"expected a whole number, got '{value}'") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.error(where, f"expected a whole number, got {_kind(value)}")
        if min_value is not None and value < min_value:
            raise doc.error(where, f"must be at least {min_value}, got {value}")
        if max_value is not None and value > max_value:
            raise doc.error(where, f"must be at most {max_value}, got {value}")
        return value

    return parse


def as_float(
    min_value: float | None = None,
    max_value: float | None = None,
    *,
    exclusive_min: bool = False,
) -> Parser:
    def parse(doc: Doc, where: tuple[str, ...], value: Any) -> float:
        if isinstance(value, str):
            value = doc.expand(where, value)
            try:
                value = float(value)
            except ValueError:
                raise doc.error(where, f"expected a number, got '{value}'") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise doc.error(where, f"expected a number, got {_kind(value)}")
        value = float(value)
        if min_value is not None and (value <= min_value if exclusive_min else value < min_value):
            bound = "greater than" if exclusive_min else "at least"
            raise doc.error(where, f"must be {bound} {min_value:g}, got {value:g}")
        if max_value is not None and value > max_value:
            raise doc.error(where, f"must be at most {max_value:g}, got {value:g}")
        return value

    return parse


def as_str(pattern: str | None = None, what: str = "") -> Parser:
    def parse(doc: Doc, where: tuple[str, ...], value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise doc.error(where, f"expected text, got {_kind(value)}")
        text = doc.expand(where, str(value))
        if not text.strip():
            raise doc.error(where, "must not be empty")
        if pattern is not None and not re.fullmatch(pattern, text):
            raise doc.error(where, f"'{text}' is not {what or 'valid'}")
        return text

    return parse


def as_choice(*choices: str) -> Parser:
    def parse(doc: Doc, where: tuple[str, ...], value: Any) -> str:
        text = as_str()(doc, where, value)
        if text not in choices:
            close = difflib.get_close_matches(text, choices, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise doc.error(where, f"'{text}' is not one of {', '.join(choices)}{hint}")
        return text

    return parse


def as_list(item: Parser, *, min_len: int = 0, unique: bool = False) -> Parser:
    def parse(doc: Doc, where: tuple[str, ...], value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            value = [value]
        items = tuple(item(doc, (*where, str(i)), v) for i, v in enumerate(value))
        if len(items) < min_len:
            raise doc.error(where, f"needs at least {min_len} item(s)")
        if unique:
            dupes = sorted({str(x) for x in items if items.count(x) > 1})
            if dupes:
                raise doc.error(where, f"lists {', '.join(dupes)} more than once")
        return items

    return parse


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
            raise doc.error(where, f"expected a mapping, got {_kind(value)}")
        return {str(k): expand(doc, (*where, str(k)), v) for k, v in value.items()}

    return parse
