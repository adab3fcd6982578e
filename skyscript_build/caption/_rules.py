"""Caption rules: OSM tags -> SkyScript's rule-based captions.

A caption is made of *tag phrases*. One tag reads, by default:

- ``key of value`` (``landuse of quarry``, ``road of footway``: ``highway`` reads "road");
- ``key value`` for a category key (``power pole``, ``natural tree``, ``man made pier``);
- ``key`` alone for a yes value (``building=yes`` reads ``building``);
- nothing for a no value (``bridge=no``) or a key that is never seen (``name``, ``addr:*``...).

``_`` and ``:`` read as spaces (``man_made`` -> ``man made``, ``roof:shape`` -> ``roof shape``;
a ``:`` between digits, as in ``1:1000``, is kept), runs of white space (newlines too) become
one space, numbers and units are kept as written, and an OSM value list reads as a list
(``pizza;burger`` -> ``pizza and burger``, ``a;b;c`` -> ``a, b and c``).

An object's tags are ordered as in the paper: primary keys first, in the rules' order
(``landuse`` before ``crop``, ``power`` before ``voltage``), then the others in the meta's own
order (OSM's: ``power=plant, plant:source=solar, plant:method=thermal`` reads ``power plant,
plant source of solar, plant method of thermal``). The two captions:

- ``title``: the focus object's tag phrases joined by ", "
  (``landuse of farmland, crop of cotton``);
- ``title_multi_objects``: the focus object as ``A with B and C``, then, if it has any,
  ``, surrounded by`` its surrounding objects (each ``A with B and C``) separated by ``; ``
  (``power pole, surrounded by power line with cables of 3 and voltage of 16000``).
  Surrounding objects that read the same are named once, in the order of first appearance
  (``dedupe_surroundings``); objects left with no phrase are skipped.

A caption with an empty ``title`` (no tag of the focus object reads as anything) is *empty*:
counted, and not written to the CSV.

Rules are data: a YAML file (``default_rules.yaml`` beside this module shows every setting)
merged over the default rules, given by path or, for a file bundled here, by name
(``list_rules()``). Or a Python function, named ``module:function`` or
``path/to/file.py:function``, with the signature::

    def caption(center_tags: dict[str, str], surrounding_tags: list[dict[str, str]])
        -> tuple[str, str]:  # (title, title_multi_objects)

It runs in the worker processes, so it must be importable there (a module on the path or a
file). An exception or a result that is not two strings counts the file as ``rule-error``.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..meta import MetaError

__all__ = [
    "CaptionRules",
    "CaptionFunc",
    "RuleCaptioner",
    "list_rules",
    "get_rules_path",
    "load_rules",
    "resolve_rules",
    "make_captioner",
]

CaptionFunc = Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], tuple[str, str]]

_HERE = Path(__file__).resolve().parent
_BUNDLED_SUFFIX = "_rules.yaml"
_MAPPINGS = ("key_aliases", "templates", "joiners")
_TEMPLATES = ("key_value", "category", "yes")
_JOINERS = (
    "title",
    "with",
    "and",
    "surrounded_by",
    "surroundings",
    "value_list",
    "value_list_last",
)
_SPACES = re.compile(r"_|(?<!\d):|:(?!\d)")
_WHITESPACE = re.compile(r"\s+")
# Cache sizes (entries; a full cache is emptied): bounded memory, whatever the corpus.
_TAG_CACHE_MAX = 1 << 18
_OBJECT_CACHE_MAX = 1 << 16


@dataclass(frozen=True, eq=False)
class CaptionRules:
    """Loaded caption rules (see the module docstring and ``default_rules.yaml``)."""

    name: str
    key_aliases: Mapping[str, str]
    category_keys: frozenset[str]
    primary_keys: tuple[str, ...]
    yes_values: frozenset[str]
    drop_values: frozenset[str]
    ignore_keys: tuple[str, ...]
    value_separator: str
    templates: Mapping[str, str]
    joiners: Mapping[str, str]
    dedupe_surroundings: bool = True
    max_surroundings: int | None = None
    source: str = field(default="", compare=False)


def list_rules() -> list[str]:
    """Names of the rules files bundled with the package (``default``, ...)."""
    return sorted(p.name[: -len(_BUNDLED_SUFFIX)] for p in _HERE.glob(f"*{_BUNDLED_SUFFIX}"))


def get_rules_path(name: str) -> Path:
    """The path of the bundled rules file ``name``."""
    path = _HERE / f"{name}{_BUNDLED_SUFFIX}"
    if not path.is_file():
        raise ConfigError(
            f"no bundled caption rules named {name!r} (bundled: {', '.join(list_rules())}); "
            "give a rules .yaml file or a module:function"
        )
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the caption rules ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: caption rules must be a mapping of settings")
    return data


def _str_list(path: Path, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise ConfigError(f"{path}: '{key}' must be a list of strings")
    return [str(v) for v in value]


def _str_map(path: Path, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{path}: '{key}' must be a mapping of strings to strings")
    return dict(value)


def _build(settings: dict[str, Any], path: Path, name: str) -> CaptionRules:
    known = {f for f in CaptionRules.__dataclass_fields__ if f not in ("name", "source")}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown caption rules setting {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    templates = _str_map(path, "templates", settings["templates"])
    joiners = _str_map(path, "joiners", settings["joiners"])
    for group, names, mapping in (
        ("templates", _TEMPLATES, templates),
        ("joiners", _JOINERS, joiners),
    ):
        extra = sorted(set(mapping) - set(names))
        if extra:
            raise ConfigError(
                f"{path}: unknown {group} entry {extra[0]!r} (known: {', '.join(names)})"
            )
    for tname, template in templates.items():
        try:
            template.format(key="k", value="v")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"{path}: template {tname!r} = {template!r} is not valid: use only "
                f"{{key}} and {{value}} ({type(e).__name__}: {e})"
            ) from None
    max_s = settings["max_surroundings"]
    if max_s is not None and (isinstance(max_s, bool) or not isinstance(max_s, int) or max_s < 0):
        raise ConfigError(f"{path}: 'max_surroundings' must be a whole number >= 0 or null")
    if not isinstance(settings["dedupe_surroundings"], bool):
        raise ConfigError(f"{path}: 'dedupe_surroundings' must be true or false")
    sep = settings["value_separator"]
    if not isinstance(sep, str):
        raise ConfigError(f"{path}: 'value_separator' must be a string ('' for none)")
    return CaptionRules(
        name=name,
        key_aliases=_str_map(path, "key_aliases", settings["key_aliases"]),
        category_keys=frozenset(_str_list(path, "category_keys", settings["category_keys"])),
        primary_keys=tuple(_str_list(path, "primary_keys", settings["primary_keys"])),
        yes_values=frozenset(
            v.lower() for v in _str_list(path, "yes_values", settings["yes_values"])
        ),
        drop_values=frozenset(
            v.lower() for v in _str_list(path, "drop_values", settings["drop_values"])
        ),
        ignore_keys=tuple(_str_list(path, "ignore_keys", settings["ignore_keys"])),
        value_separator=sep,
        templates=templates,
        joiners=joiners,
        dedupe_surroundings=settings["dedupe_surroundings"],
        max_surroundings=max_s,
        source=str(path),
    )


def load_rules(name_or_path: str | Path = "default") -> CaptionRules:
    """Load a rules YAML file (a path, or the name of a bundled one) merged over the defaults.

    Mappings (``key_aliases``, ``templates``, ``joiners``) are merged entry by entry; every
    other setting given replaces the default. Raises ``ConfigError`` naming the file and the
    setting when something is wrong.
    """
    default_path = get_rules_path("default")
    settings = _read_yaml(default_path)
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = get_rules_path(text)
    elif not path.is_file():
        raise ConfigError(f"{path}: caption rules file not found")
    if path.resolve() != default_path:
        for key, value in _read_yaml(path).items():
            if key in _MAPPINGS and isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
    name = path.stem[: -len("_rules")] if path.parent == _HERE else str(path)
    return _build(settings, path, name)


def _import_module(name: str) -> Any:
    """Import ``name``; as ``python -m`` would, also from the current folder."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)


@functools.lru_cache(maxsize=16)
def _import_function(spec: str) -> CaptionFunc:
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name.isidentifier():
        raise ConfigError(f"caption rules {spec!r}: expected module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ConfigError(f"{file}: caption rules file not found")
            mod_spec = importlib.util.spec_from_file_location(
                f"_skyscript_caption_rules_{abs(hash(str(file.resolve())))}", file
            )
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = _import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # a user's module can fail to import in any way
        raise ConfigError(
            f"caption rules {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"caption rules {spec!r}: {module_name} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def resolve_rules(spec: str | Path | None) -> CaptionRules | str:
    """Validate a ``--rules`` value in the parent process; return what workers receive.

    ``None`` -> the default rules; a ``.yaml``/``.yml`` path or a bundled name -> loaded
    ``CaptionRules``; ``module:function`` or ``file.py:function`` -> the spec (``.py`` paths made
    absolute), after checking that it imports.
    """
    if spec is None:
        return load_rules("default")
    text = str(spec)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file() or ":" not in text:
        return load_rules(text)
    module_name, _, func_name = text.rpartition(":")
    if module_name.endswith(".py"):
        text = f"{Path(module_name).resolve()}:{func_name}"
    _import_function(text)
    return text


def make_captioner(rules: CaptionRules | str) -> CaptionFunc:
    """The caption function for loaded rules or a ``module:function`` spec."""
    if isinstance(rules, CaptionRules):
        return RuleCaptioner(rules)
    return _import_function(rules)


def _words(text: str) -> str:
    """``_`` and ``:`` as spaces (not a ``:`` between digits), white space collapsed."""
    return _WHITESPACE.sub(" ", _SPACES.sub(" ", text)).strip()


def _plain(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise MetaError("bad-tags", f"a tag {what} is a {type(value).__name__}, not a string")


class RuleCaptioner:
    """The caption function of a ``CaptionRules``: ``captioner(center, surroundings)``.

    Tag phrases and whole objects are cached, so a corpus with a few thousand distinct tags
    is captioned mostly by dictionary look-ups.
    """

    def __init__(self, rules: CaptionRules) -> None:
        self.rules = rules
        self._rank = {key: i for i, key in enumerate(rules.primary_keys)}
        self._last = len(rules.primary_keys)
        patterns = [fnmatch.translate(p) for p in rules.ignore_keys]
        self._ignore = re.compile("|".join(patterns)) if patterns else None
        j = rules.joiners
        self._j_title, self._j_with, self._j_and = j["title"], j["with"], j["and"]
        self._j_around, self._j_objects = j["surrounded_by"], j["surroundings"]
        self._tags: dict[tuple[str, str], str | None] = {}
        self._objects: dict[tuple[Any, ...], tuple[str, str]] = {}

    def tag_phrase(self, key: str, value: str) -> str | None:
        """How one tag reads, or ``None`` when it is left out."""
        cached = self._tags.get((key, value), self)
        if cached is not self:
            return cached  # type: ignore[return-value]
        phrase = self._tag_phrase(key, value)
        if len(self._tags) >= _TAG_CACHE_MAX:
            self._tags.clear()
        self._tags[(key, value)] = phrase
        return phrase

    def _tag_phrase(self, key: str, value: str) -> str | None:
        r = self.rules
        if self._ignore is not None and self._ignore.fullmatch(key):
            return None
        key_words = r.key_aliases.get(key) or _words(key)
        plain = value.strip().lower()
        if not key_words or plain in r.drop_values:
            return None
        if plain in r.yes_values:
            return r.templates["yes"].format(key=key_words, value=_words(value))
        parts = value.split(r.value_separator) if r.value_separator else [value]
        values: list[str] = []
        for part in parts:
            words = _words(part)
            if words and words not in values:
                values.append(words)
        if not values:
            return None
        if len(values) == 1:
            value_words = values[0]
        else:
            value_words = (
                r.joiners["value_list"].join(values[:-1])
                + r.joiners["value_list_last"]
                + values[-1]
            )
        template = r.templates["category" if key in r.category_keys else "key_value"]
        return template.format(key=key_words, value=value_words)

    def object_phrases(self, tags: Mapping[Any, Any]) -> tuple[str, str]:
        """One object's ``(title, multi)`` readings: ``A, B, C`` and ``A with B and C``."""
        if type(tags) is not dict and not isinstance(tags, Mapping):
            raise MetaError("bad-tags", f"an object's tags are a {type(tags).__name__}, not a dict")
        try:
            cache_key = tuple(tags.items())
            cached = self._objects.get(cache_key)
        except TypeError:  # an unhashable value: let _object_phrases say what is wrong
            cache_key, cached = (), None
        if cached is not None:
            return cached
        result = self._object_phrases(tags)
        if cache_key:
            if len(self._objects) >= _OBJECT_CACHE_MAX:
                self._objects.clear()
            self._objects[cache_key] = result
        return result

    def _object_phrases(self, tags: Mapping[Any, Any]) -> tuple[str, str]:
        items = [(_plain(k, "key"), _plain(v, "value")) for k, v in tags.items()]
        rank, last = self._rank, self._last
        items.sort(key=lambda kv: rank.get(kv[0], last))  # stable: the others keep their order
        phrases = [p for p in (self.tag_phrase(k, v) for k, v in items) if p]
        if not phrases:
            return "", ""
        title = self._j_title.join(phrases)
        if len(phrases) == 1:
            return title, title
        return title, phrases[0] + self._j_with + self._j_and.join(phrases[1:])

    def __call__(
        self, center_tags: Mapping[str, Any], surrounding_tags: Sequence[Mapping[str, Any]]
    ) -> tuple[str, str]:
        """``(title, title_multi_objects)`` for one image; ``("", "")`` when empty."""
        title, multi = self.object_phrases(center_tags)
        if not title:
            return "", ""
        if not isinstance(surrounding_tags, list | tuple):
            raise MetaError(
                "bad-tags",
                f"surrounding_tags is a {type(surrounding_tags).__name__}, not a list",
            )
        if not surrounding_tags:
            return title, multi
        around: list[str] = []
        seen: set[str] = set()
        limit = self.rules.max_surroundings
        dedupe = self.rules.dedupe_surroundings
        for tags in surrounding_tags:
            if limit is not None and len(around) >= limit:
                break
            phrase = self.object_phrases(tags)[1]
            if phrase and not (dedupe and phrase in seen):
                around.append(phrase)
                seen.add(phrase)
        if not around:
            return title, multi
        return title, multi + self._j_around + self._j_objects.join(around)
