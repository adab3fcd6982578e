"""Each setting declared once, on its stage's frozen config, with ``setting(...)``.

A config field declared with ``setting`` carries, as field metadata, its help text, its rules
(bounds, choices, a pattern, ...) and its spellings: the command-line flag and the key
in a pipeline file. Everything else is derived from that one declaration:

- ``check_settings(config)``, the first thing each config's ``__post_init__`` does, converts
  and checks every declared value, whether it came from the command line (text), from a
  pipeline file (YAML values) or from Python. So the command line and a pipeline accept and
  refuse exactly the same values.
- ``add_arguments(parser, Config)`` adds a command's flags and ``config_from_args(Config,
  args)`` builds the config from them (``skyscript_build.cli``).
- ``skyscript_build.pipeline`` builds the pipeline file's schema and checks a file with the same
  ``Setting.value``; ``skyscript-build schema`` prints it as a JSON Schema, and with
  ``--markdown`` the tables of ``docs/settings.md``.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

from .errors import ConfigError

__all__ = [
    "Form",
    "Refused",
    "Setting",
    "setting",
    "nested",
    "settings_of",
    "nested_of",
    "check_settings",
    "add_arguments",
    "config_from_args",
    "what_it_is",
    "seed_setting",
    "tag_filter_setting",
    "scheduler_setting",
    "NAME",
    "PERCENT",
]

_KEY = "skyscript_build.setting"
_NESTED = "skyscript_build.nested"
#: A name that goes into file names (a build's, a filter's).
NAME = (r"[A-Za-z0-9][A-Za-z0-9._-]*", "a name of letters, digits, '.', '_' or '-'")
#: ``${NAME}`` or ``${NAME:-default}`` in a pipeline file (its JSON Schema allows them anywhere).
VARIABLE = r".*\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}.*"


class Refused(ValueError):
    """A value a setting refuses: ``problem`` says why, ``got`` shows the value when the problem
    does not (``'ten'``, ``0``), ``item`` is the list item at fault."""

    def __init__(self, problem: str, got: str | None = None, item: int | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.got = got
        self.item = item

    def message(self, label: str = "") -> str:
        """The problem, with the value as written: after ``label`` (a flag) when given."""
        if self.got is None:
            return self.problem
        return f"{self.problem}, got {label + ' ' if label else ''}{self.got}"


@dataclass(frozen=True)
class Form:
    """Another way to write a value (``"30%"`` for 0.3): ``convert`` turns it into the declared
    kind before the checks and returns anything else unchanged; ``schema`` is its JSON Schema."""

    convert: Callable[[Any], Any]
    schema: Mapping[str, Any]
    text: str


def _percent(value: Any) -> Any:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            raise Refused(f"'{value}' is not a percentage") from None
    return value


#: A fraction written as a percentage: ``30%`` is 0.3.
PERCENT = Form(_percent, {"type": "string", "pattern": r"^\s*[0-9.]+\s*%\s*$"}, "or N%")


@dataclass(frozen=True)
class Setting:
    """One setting: its help, its rules and its spellings (see ``setting`` for each).

    ``name``, ``kind`` (``bool``, ``int``, ``float``, ``str`` or ``Path``), ``many`` (a tuple
    of such items), ``optional`` (None allowed), ``required`` (no default) and ``default`` come
    from the dataclass field.
    """

    help: str
    cli: str | None = None
    pipeline: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    what: str = ""
    form: Form | None = None
    split: str | None = None
    unique: bool = False
    check: Callable[[Any], str | None] | None = None
    at_most: str | None = None
    backends: tuple[str, ...] = ()
    deprecated: tuple[str, ...] = ()
    metavar: str | None = None
    group: str | None = None
    name: str = ""
    kind: type = str
    many: bool = False
    optional: bool = False
    required: bool = False
    default: Any = None

    @property
    def positional(self) -> bool:
        return self.cli is not None and not self.cli.startswith("-")

    @property
    def label(self) -> str:
        """How messages about a config's value name the setting: its flag, else its name."""
        return self.cli if self.cli else self.name

    def rules(self) -> tuple[Any, ...]:
        """What decides which values are accepted (two settings with equal rules accept the
        same values), leaving out the help and the spellings."""
        return (
            self.kind, self.many, self.optional, self.required, self.default, self.minimum, self.maximum,
            self.above, self.choices, self.pattern, self.form, self.split,
            self.unique, self.check, self.at_most,
        )  # fmt: skip

    # --- values ---------------------------------------------------------------------------

    def value(self, raw: Any) -> Any:
        """``raw`` (text from the command line, a YAML value or a Python value) converted and
        checked; raises ``Refused`` with the problem."""
        if raw is None or (self.optional and isinstance(raw, str) and not raw.strip()):
            if self.optional:
                return None
            raise Refused("is required")
        if not self.many:
            return self._item(raw)
        if isinstance(raw, str) and self.split:
            raw = [part.strip() for part in raw.split(self.split)]
        elif isinstance(raw, str | Path) or not isinstance(raw, Sequence):
            raw = [raw]
        items = []
        for i, item in enumerate(raw):
            try:
                items.append(self._item(item))
            except Refused as e:
                raise Refused(e.problem, e.got, i) from None
        if self.unique:
            repeated = sorted({str(x) for x in items if items.count(x) > 1})
            if repeated:
                raise Refused(f"lists {', '.join(repeated)} more than once")
        value = tuple(items)
        problem = self.check(value) if self.check is not None else None
        if problem:
            raise Refused(problem)
        return value

    def _item(self, raw: Any) -> Any:
        if self.form is not None:
            raw = self.form.convert(raw)
        value = _convert(self.kind, raw)
        if self.choices and value not in self.choices:
            close = difflib.get_close_matches(value, self.choices, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise Refused(f"'{value}' is not one of {', '.join(self.choices)}{hint}")
        if self.pattern is not None and not re.fullmatch(self.pattern, str(value)):
            raise Refused(f"'{value}' is not {self.what or 'valid'}")
        if self.minimum is not None and value < self.minimum:
            raise Refused(f"must be at least {_num(self.minimum)}", _num(value))
        if self.above is not None and not value > self.above:
            raise Refused(f"must be greater than {_num(self.above)}", _num(value))
        if self.maximum is not None and value > self.maximum:
            raise Refused(f"must be at most {_num(self.maximum)}", _num(value))
        if not self.many and self.check is not None:
            problem = self.check(value)
            if problem:
                raise Refused(problem)
        return value

    # --- descriptions ---------------------------------------------------------------------

    def describe(self) -> str:
        """The values it accepts, in words: ``whole number 1..1000``, ``one of auto, off``."""
        words = {bool: "true or false", int: "whole number", float: "number", Path: "path"}
        text = words.get(self.kind, "text")
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        elif self.pattern is not None and self.what:
            text = self.what
        if self.above is not None:
            text += f" > {_num(self.above)}"
            text += f", <= {_num(self.maximum)}" if self.maximum is not None else ""
        elif self.minimum is not None and self.maximum is not None:
            text += f" {_num(self.minimum)}..{_num(self.maximum)}"
        elif self.minimum is not None:
            text += f" >= {_num(self.minimum)}"
        elif self.maximum is not None:
            text += f" <= {_num(self.maximum)}"
        if self.form is not None:
            text += f" ({self.form.text})"
        if self.many:
            text = f"list of {text}"
            text += f", or '{self.split}'-separated text" if self.split else ""
        return text

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of a value in a pipeline file (``${VARIABLES}`` allowed)."""
        item = _item_schema(self)
        if self.many:
            array: dict[str, Any] = {"type": "array", "items": item}
            if self.unique:
                array["uniqueItems"] = True
            options = [item, array] + ([{"type": "string"}] if self.split else [])
            schema: dict[str, Any] = {"anyOf": options}
        else:
            schema = item
        if self.optional:
            schema = {"anyOf": [schema, {"type": "null"}]}
        out: dict[str, Any] = {"description": self.help, **schema}
        if not self.required and self.default is not None:
            out["default"] = list(self.default) if self.many else _plain(self.default)
        return out


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def what_it_is(value: Any) -> str:
    """A YAML or Python value in words, for messages: ``the boolean true``, ``a list``."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return f"the text '{value}'"
    return repr(value)


def _convert(kind: type, raw: Any) -> Any:
    """``raw`` as a ``kind``: text is read (``"12"`` is 12); other types are refused."""
    if kind is bool:
        if not isinstance(raw, bool):
            raise Refused("expected true or false", what_it_is(raw))
        return raw
    if kind is int:
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                raise Refused("expected a whole number", f"'{raw}'") from None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise Refused("expected a whole number", what_it_is(raw))
        return raw
    if kind is float:
        if isinstance(raw, str):
            try:
                raw = float(raw)
            except ValueError:
                raise Refused("expected a number", f"'{raw}'") from None
        if isinstance(raw, bool) or not isinstance(raw, int | float) or math.isnan(raw):
            raise Refused("expected a number", what_it_is(raw))
        return float(raw)
    if kind is Path:
        if not isinstance(raw, str | Path):
            raise Refused("expected a path", what_it_is(raw))
        if not str(raw).strip():
            raise Refused("must not be empty")
        return Path(raw)
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise Refused("expected text", what_it_is(raw))
    text = str(raw)
    if not text.strip():
        raise Refused("must not be empty")
    return text


def _item_schema(spec: Setting) -> dict[str, Any]:
    types = {bool: "boolean", int: "integer", float: "number"}
    item: dict[str, Any] = {"type": types.get(spec.kind, "string")}
    if spec.choices:
        item["enum"] = list(spec.choices)
    if spec.pattern is not None:
        item["pattern"] = f"^(?:{spec.pattern})$"
    if item["type"] == "string" and not spec.choices:
        item["minLength"] = 1
    if spec.minimum is not None:
        item["minimum"] = spec.minimum
    if spec.above is not None:
        item["exclusiveMinimum"] = spec.above
    if spec.maximum is not None:
        item["maximum"] = spec.maximum
    options = [item]
    if spec.form is not None:
        options.append(dict(spec.form.schema))
    if spec.kind in (int, float):  # a quoted number is read too
        digits = r"[0-9]+" if spec.kind is int else r"[0-9.]+([eE][-+]?[0-9]+)?"
        options.append({"type": "string", "pattern": rf"^\s*[-+]?{digits}\s*$"})
    if spec.kind is not bool and (len(item) > 1 or spec.kind is not str):
        options.append({"type": "string", "pattern": f"^{VARIABLE}$"})
    return options[0] if len(options) == 1 else {"anyOf": options}


# --- declaring ---------------------------------------------------------------------------


def setting(
    default: Any = MISSING,
    *,
    help: str,
    cli: str | bool | None = True,
    pipeline: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    choices: Sequence[str] = (),
    pattern: tuple[str, str] | None = None,
    form: Form | None = None,
    split: str | None = None,
    unique: bool = False,
    check: Callable[[Any], str | None] | None = None,
    at_most: str | None = None,
    backends: Sequence[str] = (),
    deprecated: Sequence[str] = (),
    metavar: str | None = None,
    group: str | None = None,
) -> Any:
    """A config field declared as a setting (use it as ``dataclasses.field``).

    Args:
        default: the default value; none makes the setting required (everywhere).
        help: what the setting does, as ``--help`` and the docs show it.
        cli: the flag (``--min-px``), a positional argument's metavar (``INPUT``), True for
            ``--`` + the field name with dashes, or None for no flag.
        pipeline: the key in a pipeline file (``plan.min_px``, ``seed``), or None for none.
            Several configs may share a key (``seed``) when their rules are equal.
        minimum, maximum, above: bounds (``above`` excludes its bound).
        choices: the only values allowed.
        pattern: ``(regular expression, what it means in words)`` a text must match.
        form: another way to write a value (``PERCENT``).
        split: a list setting given as one text splits it at this separator (``CH,S2``).
        unique: a list setting may not repeat an item.
        check: a last check of the whole value, returning the problem or None.
        at_most: the name of another setting of the config this one must not exceed.
        backends: the imagery backends that read it (a pipeline's ``backend:`` section).
        deprecated: older pipeline keys still read (with a warning).
        metavar, group: how ``--help`` shows it.
    """
    spec = Setting(
        help=help,
        cli=cli if isinstance(cli, str) else None,
        pipeline=pipeline,
        minimum=minimum,
        maximum=maximum,
        above=above,
        choices=tuple(choices),
        pattern=pattern[0] if pattern else None,
        what=pattern[1] if pattern else "",
        form=form,
        split=split,
        unique=unique,
        check=check,
        at_most=at_most,
        backends=tuple(backends),
        deprecated=tuple(deprecated),
        metavar=metavar,
        group=group,
    )
    metadata = {_KEY: (spec, cli is True)}
    return field(default=default, metadata=metadata)


def nested(config: type, *, help: str) -> Any:
    """A config field holding another config, whose settings become this config's flags."""
    return field(default_factory=config, metadata={_NESTED: help})


def _hint_kind(hint: Any) -> tuple[type, bool, bool]:
    """(item kind, many, optional) of a field's type annotation."""
    members = typing.get_args(hint) if isinstance(hint, UnionType) else (hint,)
    optional = NoneType in members
    members = tuple(m for m in members if m is not NoneType)
    many = False
    for m in members:
        if typing.get_origin(m) in (tuple, list, Sequence):
            many = True
            members = tuple(a for a in typing.get_args(m) if a is not Ellipsis)
            members = tuple(
                x
                for a in members
                for x in (typing.get_args(a) if isinstance(a, UnionType) else (a,))
            )
            break
    for kind in (Path, bool, int, float, str):
        if kind in members:
            return kind, many, optional
    raise TypeError(f"no setting kind for {hint!r}")


@functools.cache
def settings_of(config: type) -> dict[str, Setting]:
    """The settings declared on a config class, by field name, in declaration order."""
    hints = typing.get_type_hints(config)
    out = {}
    for f in fields(config):
        declared = f.metadata.get(_KEY)
        if declared is None:
            continue
        spec, auto_cli = declared
        kind, many, optional = _hint_kind(hints[f.name])
        cli = "--" + f.name.replace("_", "-") if auto_cli else spec.cli
        required = f.default is MISSING
        out[f.name] = replace(
            spec,
            name=f.name,
            cli=cli,
            kind=kind,
            many=many,
            optional=optional,
            required=required,
            default=None if required else f.default,
        )
    return out


@functools.cache
def nested_of(config: type) -> dict[str, tuple[type, str]]:
    """The fields of ``config`` that hold another config: name -> (its class, help)."""
    hints = typing.get_type_hints(config)
    return {
        f.name: (hints[f.name], f.metadata[_NESTED])
        for f in fields(config)
        if _NESTED in f.metadata
    }


def check_settings(config: Any) -> None:
    """Convert and check every declared setting of a frozen config, in place.

    Raises:
        ConfigError: ``"<flag or name> <problem>"`` for the first value refused.
    """
    cls: type = type(config)
    specs = settings_of(cls)
    for name, spec in specs.items():
        try:
            value = spec.value(getattr(config, name))
        except Refused as e:
            raise ConfigError(f"{spec.label} {e.message(spec.label)}") from None
        object.__setattr__(config, name, value)
    for spec in specs.values():
        if spec.at_most is not None:
            other = specs[spec.at_most]
            value = getattr(config, spec.name)
            problem = relation_problem(value, getattr(config, other.name), other.name)
            if problem:
                raise ConfigError(f"{spec.name} ({_num(value)}) {problem}")


def relation_problem(value: Any, other: Any, other_label: str) -> str | None:
    """The problem when ``value`` is larger than ``other``, the value of the setting it must
    not exceed (``Setting.at_most``)."""
    if value is None or other is None or value <= other:
        return None
    return f"is larger than {other_label} ({_num(other)})"


# --- the command line ----------------------------------------------------------------------


def _help(spec: Setting) -> str:
    """The help text, with the accepted values (unless the flag's metavar lists them or the
    kind says it all) and the default."""
    if spec.kind is bool:
        return spec.help
    notes = []
    rule = spec.describe()
    if not spec.choices and rule not in ("text", "path", "whole number", "number"):
        notes.append(rule)
    default = spec.default
    if not (spec.required or default is None or default == ()):
        shown = " ".join(map(_num, default)) if spec.many else _num(default)
        notes.append(f"default {shown}")
    return f"{spec.help} [{'; '.join(notes)}]" if notes else spec.help


def add_arguments(
    parser: argparse.ArgumentParser, config: type, groups: Mapping[str, str] | None = None
) -> None:
    """Add a flag (or positional argument) for every setting of ``config`` that has one.

    The flags take text and leave the checks to the config; a flag not given is left out of
    the namespace, so the config's own default applies. ``groups``: descriptions of the
    ``group`` names the settings use.
    """
    made: dict[str, argparse._ArgumentGroup] = {}
    for spec in _cli_settings(config):
        target: Any = parser
        if spec.group is not None:
            if spec.group not in made:
                made[spec.group] = parser.add_argument_group(
                    spec.group, (groups or {}).get(spec.group)
                )
            target = made[spec.group]
        flag = str(spec.cli)
        kw: dict[str, Any] = {"help": _help(spec).replace("%", "%%")}
        if spec.positional:
            target.add_argument(spec.name, metavar=flag, nargs="+" if spec.many else None, **kw)
            continue
        kw.update(dest=spec.name, default=argparse.SUPPRESS, required=spec.required)
        if spec.kind is bool:
            kw["action"] = "store_true"
        else:
            choices = "{" + ",".join(spec.choices) + "}" if spec.choices else None
            kw["metavar"] = spec.metavar or choices or flag.lstrip("-").replace("-", "_").upper()
            kw["nargs"] = "+" if spec.many and not spec.split else None
        target.add_argument(flag, **kw)


def _cli_settings(config: type) -> list[Setting]:
    specs = [s for s in settings_of(config).values() if s.cli]
    for nested_config, _ in nested_of(config).values():
        specs += [s for s in settings_of(nested_config).values() if s.cli]
    return specs


def config_from_args(config: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``config`` from the flags ``add_arguments`` added (plus ``extra`` fields)."""
    values = {
        s.name: getattr(args, s.name)
        for s in settings_of(config).values()
        if s.cli and hasattr(args, s.name)
    }
    for name, (nested_config, _) in nested_of(config).items():
        given = {
            s.name: getattr(args, s.name)
            for s in settings_of(nested_config).values()
            if s.cli and hasattr(args, s.name)
        }
        if given:
            values[name] = nested_config(**given)
    return config(**values, **extra)


# --- settings several stages share (one declaration each, one pipeline key) ----------------

#: The address of a Dask scheduler.
SCHEDULER = (r"(tcp|tls|inproc|ucx)://\S+|\S+:\d+", "a scheduler address (tcp://host:8786)")


def seed_setting() -> Any:
    """The pipeline's ``seed``: plan's shifts and sampling, filter's splits and weights."""
    return setting(
        0,
        help="seed of the random choices: the plan's shifts and sampling, the filter's val/test "
        "draws and random CLIP weights",
        pipeline="seed",
        minimum=0,
    )


def tag_filter_setting() -> Any:
    """The pipeline's ``tag_filter``: which tags extract keeps and plan sees at a GSD."""
    return setting(
        "default",
        help="groundability table: a shipped name or a CSV file (see tag_filters/)",
        pipeline="tag_filter",
        metavar="NAME_OR_PATH",
    )


def scheduler_setting(help: str) -> Any:
    """A stage's ``--scheduler``: an existing Dask scheduler to run its tasks on."""
    return setting(None, help=help, pattern=SCHEDULER, metavar="ADDRESS")
