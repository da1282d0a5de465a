"""`/etc/qgafreeze.yaml` → validated, frozen dataclasses.

This is the only module that sees raw YAML.  Validation collects every problem with its place
(``apps.shop.depends_on[0]: unknown app 'mariadbx'``) and raises one ConfigError, so an
administrator fixes a file in one pass.  Unknown keys are errors: a typo such as ``timout`` must
not silently fall back to a default during a production backup.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/qgafreeze.yaml"
DEFAULT_SOCKET = "/run/qgafreeze/qgafreeze.sock"
DEFAULT_HOOK_LOG = "/var/log/qga-fsfreeze-hook.log"
# qemu-ga creates this while it is frozen (its --statedir, /var/run by default).
DEFAULT_AGENT_STATE_FILE = "/run/qga.state.isfrozen"
CONFIG_VERSION = 1

ON_FAILURE_CHOICES = ("abort", "continue")

# Unit types that can be quiesced.  Mounts, swaps, slices, devices and targets are refused: stopping
# them during a freeze takes the storage or the whole system with it, not one application.
ALLOWED_UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path")

# Units the freeze itself needs.  Stopping any of them would stop the backup (qemu-ga), our own
# control path (qgafreeze, dbus, the systemd manager's helpers) or the logs that explain it.
PROTECTED_UNITS = frozenset(
    {
        "dbus.service",
        "dbus.socket",
        "dbus-broker.service",
        "systemd-journald.service",
        "systemd-journald.socket",
        "systemd-journald-dev-log.socket",
        "systemd-journald-audit.socket",
        "systemd-logind.service",
        "systemd-udevd.service",
        "systemd-udevd-control.socket",
        "systemd-udevd-kernel.socket",
        "qemu-guest-agent.service",
        "qemu-ga.service",
        "qgafreeze.service",
        "qgafreeze.socket",
        "polkit.service",
    }
)

_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class Settings:
    freeze_timeout: float = 60.0
    thaw_timeout: float = 120.0
    max_frozen: float = 900.0  # watchdog; 0 disables it
    hook_log: str | None = DEFAULT_HOOK_LOG  # None: no compatible hook log
    socket: str = DEFAULT_SOCKET
    agent_state_file: str | None = DEFAULT_AGENT_STATE_FILE  # None: do not watch qemu-ga


@dataclass(frozen=True)
class App:
    name: str
    units: tuple[str, ...]
    depends_on: tuple[str, ...] = ()
    timeout: float = 30.0
    on_failure: str = "abort"


@dataclass(frozen=True)
class Config:
    source: str
    settings: Settings
    apps: tuple[App, ...]  # in the order of the file

    def app(self, name: str) -> App:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    @property
    def app_names(self) -> tuple[str, ...]:
        return tuple(app.name for app in self.apps)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML keeps the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        except TypeError:  # unhashable key; the validator reports it
            pass
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))  # type: ignore[no-untyped-call]


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


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


def normalize_unit(name: str) -> str:
    """A bare name means a service, as with systemctl."""
    if "." in name.rsplit("@", 1)[-1] and not name.endswith("@"):
        return name  # has a type suffix; unsupported types are refused by the caller
    return name + ".service"


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)


def _check_keys(
    problems: _Problems, path: str, data: dict[Any, Any], allowed: tuple[str, ...]
) -> None:
    for key in data:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            problems.add(where, f"unknown key (allowed: {', '.join(allowed)})")


def _duration(
    problems: _Problems, path: str, value: Any, default: float, *, zero_ok: bool = False
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


def _string_list(problems: _Problems, path: str, value: Any) -> list[tuple[str, str]]:
    """A list of non-empty strings → (path of item, item); a lone string is not accepted."""
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(path, f"expected a list, got {_kind(value)}")
        return []
    items = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            problems.add(f"{path}[{index}]", f"expected a non-empty string, got {_kind(item)}")
            continue
        items.append((f"{path}[{index}]", item.strip()))
    return items


def _kind(value: Any) -> str:
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


def _parse_settings(problems: _Problems, raw: Any) -> Settings:
    defaults = Settings()
    if raw is None:
        return defaults
    if not isinstance(raw, dict):
        problems.add("settings", f"expected a mapping, got {_kind(raw)}")
        return defaults
    _check_keys(
        problems,
        "settings",
        raw,
        ("freeze_timeout", "thaw_timeout", "max_frozen", "hook_log", "socket", "agent_state_file"),
    )
    hook_log: str | None = defaults.hook_log
    if "hook_log" in raw:
        value = raw["hook_log"]
        if value is None or value is False:
            hook_log = None
        elif isinstance(value, str) and value.startswith("/"):
            hook_log = value
        else:
            problems.add(
                "settings.hook_log", f"expected an absolute path or null, got {_kind(value)}"
            )
    agent_state_file = defaults.agent_state_file
    if "agent_state_file" in raw:
        value = raw["agent_state_file"]
        if value is None or value is False:
            agent_state_file = None
        elif isinstance(value, str) and value.startswith("/") and not value.endswith("/"):
            agent_state_file = value
        else:
            problems.add(
                "settings.agent_state_file",
                f"expected an absolute file path or null, got {_kind(value)}",
            )
    socket = defaults.socket
    if "socket" in raw:
        value = raw["socket"]
        if not isinstance(value, str) or not value.startswith("/"):
            problems.add("settings.socket", f"expected an absolute path, got {_kind(value)}")
        elif len(value.encode()) >= 108:
            problems.add("settings.socket", "a unix socket path must be shorter than 108 bytes")
        else:
            socket = value
    return Settings(
        freeze_timeout=_duration(
            problems, "settings.freeze_timeout", raw.get("freeze_timeout"), defaults.freeze_timeout
        ),
        thaw_timeout=_duration(
            problems, "settings.thaw_timeout", raw.get("thaw_timeout"), defaults.thaw_timeout
        ),
        max_frozen=_duration(
            problems,
            "settings.max_frozen",
            raw.get("max_frozen"),
            defaults.max_frozen,
            zero_ok=True,
        ),
        hook_log=hook_log,
        socket=socket,
        agent_state_file=agent_state_file,
    )


_APP_KEYS = ("units", "depends_on", "timeout", "on_failure")


def _parse_app(problems: _Problems, name: Any, raw: Any) -> App | None:
    path = f"apps.{name}"
    if not isinstance(name, str) or not _APP_NAME.match(name):
        problems.add(
            path,
            "an app name is letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
        return None
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {_kind(raw)}")
        return None
    _check_keys(problems, path, raw, _APP_KEYS)

    units: list[str] = []
    for item_path, unit in _string_list(problems, f"{path}.units", raw.get("units")):
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
    if "units" not in raw:
        problems.add(path, "no action: add 'units: [name.service]'")
    elif raw.get("units") == []:
        problems.add(f"{path}.units", "is empty")

    on_failure = raw.get("on_failure", "abort")
    if on_failure not in ON_FAILURE_CHOICES:
        problems.add(
            f"{path}.on_failure",
            f"expected one of {', '.join(ON_FAILURE_CHOICES)}, got {_kind(on_failure)}",
        )
        on_failure = "abort"

    depends_on = []
    for item_path, dep in _string_list(problems, f"{path}.depends_on", raw.get("depends_on")):
        if dep in depends_on:
            problems.add(item_path, f"{dep!r} is listed twice")
        else:
            depends_on.append(dep)

    return App(
        name=name,
        units=tuple(units),
        depends_on=tuple(depends_on),
        timeout=_duration(problems, f"{path}.timeout", raw.get("timeout"), App.timeout),
        on_failure=on_failure,
    )


def find_cycle(graph: dict[str, tuple[str, ...]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, a]``, or None.  Deterministic: follows file order."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in colour:
                continue
            if colour[nxt] == grey:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for node in graph:
        if colour[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate a parsed YAML document.  Raises ConfigError listing every problem."""
    problems = _Problems()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {_kind(data)}"])
    _check_keys(problems, "", data, ("version", "settings", "apps"))
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION or isinstance(version, bool):
        problems.add("version", f"unsupported version {version!r} (this qgafreeze reads 1)")
    settings = _parse_settings(problems, data.get("settings"))

    raw_apps = data.get("apps")
    apps: list[App] = []
    if raw_apps is None:
        raw_apps = {}
    if not isinstance(raw_apps, dict):
        problems.add("apps", f"expected a mapping of app names, got {_kind(raw_apps)}")
        raw_apps = {}
    for name, raw in raw_apps.items():
        app = _parse_app(problems, name, raw)
        if app is not None:
            apps.append(app)

    names = {app.name for app in apps}
    for app in apps:
        # Index into the raw list so the path names the item as the administrator wrote it.
        raw_deps = raw_apps[app.name].get("depends_on")
        for index, dep in enumerate(raw_deps if isinstance(raw_deps, list) else []):
            if not isinstance(dep, str):
                continue
            where = f"apps.{app.name}.depends_on[{index}]"
            if dep.strip() == app.name:
                problems.add(where, "an app cannot depend on itself")
            elif dep.strip() not in names and dep.strip() not in raw_apps:
                problems.add(where, f"unknown app {dep.strip()!r}")

    owners: dict[str, str] = {}
    for app in apps:
        for unit in app.units:
            if unit in owners:
                problems.add(
                    f"apps.{app.name}.units",
                    f"{unit!r} is already quiesced by app {owners[unit]!r}",
                )
            else:
                owners[unit] = app.name

    graph = {
        app.name: tuple(d for d in app.depends_on if d in names and d != app.name) for app in apps
    }
    cycle = find_cycle(graph)
    if cycle:
        problems.add("apps", "dependency cycle: " + " -> ".join(cycle))

    if problems.items:
        raise ConfigError(source, problems.items)
    return Config(source=source, settings=settings, apps=tuple(apps))


def parse_text(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_problem(exc)]) from None
    return parse_config(data, source)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"not valid YAML: {problem}"


def check_file_permissions(path: str, st: os.stat_result) -> str | None:
    """Why the file must be refused, or None.

    The daemon runs what the file says as root, so anyone who can change it is root.  Like sshd
    and sudo, refuse a file that anyone but root (or the reader itself) can write.
    """
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root"
    if mode & stat.S_IWOTH:
        return f"writable by everyone (mode {mode:04o}); run: chmod o-w {path}"
    if mode & stat.S_IWGRP and st.st_gid != 0:
        return f"writable by group id {st.st_gid} (mode {mode:04o}); run: chmod g-w {path}"
    return None


def load_file(path: str) -> Config:
    """Read, permission-check and validate a config file.  Raises ConfigError."""
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(path, ["not a regular file"])
            refusal = check_file_permissions(path, st)
            if refusal:
                raise ConfigError(path, [f"refused: {refusal}"])
            raw = handle.read(1024 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(path, [f"cannot be read: {exc.strerror or exc}"]) from None
    if len(raw) > 1024 * 1024:
        raise ConfigError(path, ["larger than 1 MiB; this is not a qgafreeze config"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text (byte {exc.start})"]) from None
    return parse_text(text, path)
