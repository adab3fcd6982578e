"""The project's one exception tree.

A ``SkyScriptError`` is a user error: its message says what is wrong and what to do. The CLI
prints it as one line on stderr and exits with code 2, without a traceback. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "SkyScriptError",
    "InputError",
    "ConfigError",
    "MissingDependencyError",
    "BackendError",
]


class SkyScriptError(Exception):
    """Base class of every error a user can fix."""


class InputError(SkyScriptError):
    """An input file is missing, unreadable or malformed."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(SkyScriptError):
    """A flag, pipeline entry or setting has a bad value."""


class MissingDependencyError(SkyScriptError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(
            f"the '{module}' package is needed here: pip install 'skyscript-build[{extra}]'"
        )


class BackendError(SkyScriptError):
    """An imagery backend cannot be used as configured (credentials, project, URL)."""
