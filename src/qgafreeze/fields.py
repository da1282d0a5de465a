"""One value of the config, checked: durations, names, paths, commands, and where it is.

Every checker takes the place of the value (``apps.db.units[0]``), adds what is wrong with it to a
Problems collector, and returns what it could make of the value, so that validation goes on and
an administrator sees every problem at once.
"""

from __future__ import annotations

import re
from typing import Any

from .model import ALLOWED_UNIT_SUFFIXES, PROTECTED_UNITS, join_path, normalize_unit
from .schema import Section

_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+$")
# User and group names as useradd and groupadd accept them.
ACCOUNT_NAME = re.compile(r"^[a-z_][a-z0-9_.-]*[$]?$", re.I)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``500ms``, ``30s``, ``2m``, ``1h`` or plain seconds → seconds.  Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"expected a duration such as 500ms, 30s, 2m or 1h, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_FACTORS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 30s, got {type(value).__name__}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"expected a non-negative finite duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m" if seconds % 3600 else f"{int(seconds // 3600)}h"
    return f"{seconds:g}s"


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.warnings: list[str] = []  # the file is valid, but the administrator should know

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}" if path else message)


def check_keys(problems: Problems, path: str, data: dict[Any, Any], section: Section) -> None:
    """Every key of ``data`` that the schema's ``section`` does not declare is an error."""
    removed = {old.name: old for old in section.removed}
    for key, value in data.items():
        old = removed.get(key) if isinstance(key, str) else None
        if old is not None and old.harmless is not None and value == old.harmless:
            problems.warn(join_path(path, key), f"ignored, this key was removed: {old.instead}")
        elif old is not None:
            problems.add(join_path(path, key), f"this key was removed: {old.instead}")
        elif key not in section.names:
            where = join_path(path, key)
            problems.add(where, f"unknown key (allowed: {', '.join(section.names)})")


def duration(
    problems: Problems, path: str, value: Any, default: float, *, zero_ok: bool = False
) -> float:
    if value is None:
        return default
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        problems.add(path, str(exc))
        return default
    if seconds == 0 and not zero_ok:
        problems.add(path, "must be greater than zero")
        return default
    return seconds


def string_list(problems: Problems, path: str, value: Any) -> list[tuple[str, str]]:
    """A list of non-empty strings → (path of item, item); a lone string is not accepted."""
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(path, f"expected a list, got {kind(value)}")
        return []
    items = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            problems.add(f"{path}[{index}]", f"expected a non-empty string, got {kind(item)}")
            continue
        items.append((f"{path}[{index}]", item.strip()))
    return items


def no_nul(problems: Problems, path: str, text: str) -> bool:
    """Whether ``text`` is free of NUL bytes, which no path, argument or environment can hold
    (os.stat and exec raise on them); if not, says so at ``path``."""
    if "\0" in text:
        problems.add(path, "contains a NUL byte, which no path, argument or environment can hold")
    return "\0" not in text


def kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def env(problems: Problems, path: str, value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping of NAME: value, got {kind(value)}")
        return ()
    pairs = []
    for key, item in value.items():
        if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            problems.add(join_path(path, key), "not a valid environment variable name")
        elif isinstance(item, bool) or not isinstance(item, (str, int, float)):
            problems.add(join_path(path, key), f"expected a string, got {kind(item)}")
        elif no_nul(problems, join_path(path, key), str(item)):
            pairs.append((key, str(item)))
    return tuple(pairs)


def user(problems: Problems, path: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and ACCOUNT_NAME.match(value):
        return value
    problems.add(path, f"expected a user name, got {kind(value)}")
    return None


def cwd(problems: Problems, path: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("/"):
        return value if no_nul(problems, path, value) else None
    problems.add(path, f"expected an absolute directory, got {kind(value)}")
    return None


def argv(problems: Problems, path: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        problems.add(path, f"expected a non-empty list: [program, arg, ...], got {kind(value)}")
        return ()
    items = []
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            problems.add(f"{path}[{index}]", f"expected a string, got {kind(item)}")
        elif no_nul(problems, f"{path}[{index}]", str(item)):
            items.append(str(item))
    return tuple(items)


def units(problems: Problems, path: str, value: Any) -> tuple[str, ...]:
    units: list[str] = []
    for item_path, unit in string_list(problems, path, value):
        unit = normalize_unit(unit)
        if not _UNIT_NAME.match(unit):
            problems.add(item_path, f"{unit!r} is not a valid unit name")
        elif not unit.endswith(ALLOWED_UNIT_SUFFIXES):
            problems.add(
                item_path,
                f"{unit!r}: only {', '.join(ALLOWED_UNIT_SUFFIXES)} units can be quiesced",
            )
        elif unit in PROTECTED_UNITS:
            problems.add(
                item_path, f"{unit!r} is needed by the freeze itself and cannot be stopped"
            )
        elif unit in units:
            problems.add(item_path, f"{unit!r} is listed twice")
        else:
            units.append(unit)
    return tuple(units)
