"""Strict reading of TOML tables into typed values, with errors that name the file, the key and what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgePruneError

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file, turning every failure into an `EdgePruneError` that names the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise EdgePruneError(f"{what} file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgePruneError(f"{what} file {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgePruneError(f"cannot read {what} file {path}: {e}") from None


def check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Reject unknown keys: a misspelt key silently ignored is a setting silently lost."""
    for key in table:
        if key not in allowed:
            raise EdgePruneError(f"{where}: unknown key '{key}'; allowed keys are: {', '.join(allowed)}")


def take(table: dict[str, Any], key: str, kind: type, where: str, default: Any = ..., choices: tuple | None = None) -> Any:
    """`table[key]` checked against `kind` (and `choices`); `default` if absent, required when no default is given."""
    if key not in table:
        if default is ...:
            raise EdgePruneError(f"{where}: missing required key '{key}'")
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise EdgePruneError(
            f"{where}: key '{key}' must be {_TYPE_NAMES.get(kind, kind.__name__)}, found {type(value).__name__} {value!r}"
        )
    if choices is not None and value not in choices:
        raise EdgePruneError(f"{where}: key '{key}' is {value!r}; allowed values are: {', '.join(map(str, choices))}")
    return value


def check_folder_name(value: str, what: str, example: str) -> str:
    """`value` (a user's string that becomes one folder of an output, such as a target's name under a release)
    checked to stay one folder: not empty, no '/' or '\\', no leading '.' ('.', '..', hidden names), no control
    characters, no surrounding spaces. `what` names it in the error, `example` shows a good one."""
    bad = (not value or value.startswith(".") or "/" in value or "\\" in value or value != value.strip()
           or any(ord(c) < 32 or ord(c) == 127 for c in value))
    if bad:
        raise EdgePruneError(f"{what} {value!r} names a folder of the output and must be one plain folder name: not "
                             f"empty, without '/' or '\\', a leading '.', control characters or surrounding spaces "
                             f"(e.g. {example})")
    return value
