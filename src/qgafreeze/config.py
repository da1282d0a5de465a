"""`/etc/qgafreeze.yaml` → validated, frozen dataclasses.

This is the only module that sees raw YAML.  Validation collects every problem with its place
(``apps.shop.depends_on[0]: unknown app 'mariadbx'``) and raises one ConfigError, so an
administrator fixes a file in one pass.  Unknown keys are errors: a typo such as ``timout`` must
not silently fall back to a default during a production backup.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
from dataclasses import dataclass
from typing import Any

import yaml

from . import paths
from .errors import ConfigError

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
    hook_log: str | None = paths.HOOK_LOG  # None: no compatible hook log
    socket: str = paths.SOCKET
    agent_state_file: str | None = paths.AGENT_STATE_FILE  # None: do not watch qemu-ga
    legacy_hooks: str | None = None  # an old fsfreeze-hook.d to run as one more app
    legacy_hook_timeout: float = 30.0  # per script
    allowed_group: str | None = None  # its members may use the socket too; None: root only

    @property
    def allowed_gid(self) -> int | None:
        if self.allowed_group is None:
            return None
        try:
            return grp.getgrnam(self.allowed_group).gr_gid
        except KeyError:
            return None


@dataclass(frozen=True)
class Step:
    """One command (``exec``, or ``shell`` when asked for) or one signal, in freeze or thaw."""

    kind: str  # exec, shell, signal
    argv: tuple[str, ...] = ()  # exec; for shell: ("/bin/sh", "-c", text)
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    timeout: float | None = None  # None: whatever is left of the app's deadline
    signal: int = 0  # signal
    signal_name: str = ""
    units: tuple[str, ...] = ()  # signal: units whose processes get it
    whom: str = "all"  # signal: all, main or control (systemd's KillUnit)

    def describe(self) -> str:
        if self.kind == "signal":
            return f"send {self.signal_name} to {', '.join(self.units)} ({self.whom})"
        command = self.argv[2] if self.kind == "shell" else " ".join(self.argv)
        who = f" as {self.user}" if self.user else ""
        return f"run {'sh -c ' if self.kind == 'shell' else ''}{command!r}{who}"


@dataclass(frozen=True)
class Session:
    """A process held open from freeze to thaw (a database client holding a lock)."""

    argv: tuple[str, ...]
    open: str
    ready: str  # a regular expression matched against each output line
    close: str
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None


@dataclass(frozen=True)
class App:
    name: str
    units: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    timeout: float = 30.0
    on_failure: str = "abort"
    mode: str = "stop"  # what happens to units: stop, or freeze (cgroup freezer)
    session: Session | None = None
    freeze: tuple[Step, ...] = ()
    thaw: tuple[Step, ...] = ()
    preset: str | None = None
    legacy_hooks: str | None = None  # the directory, for the app made from settings.legacy_hooks

    @property
    def action_kinds(self) -> tuple[str, ...]:
        """What the app does, in freeze order, as journald's QGAFREEZE_ACTION names it."""
        kinds = []
        if self.legacy_hooks:
            kinds.append("legacy")
        if self.freeze or self.thaw:
            kinds.append("steps")
        if self.session is not None:
            kinds.append("session")
        if self.units:
            kinds.append("freeze-units" if self.mode == "freeze" else "units")
        return tuple(kinds)


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


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def join_path(path: str, key: Any) -> str:
    """``apps.db``, or ``apps['a b']`` for a key that would not read as one."""
    if isinstance(key, str) and _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _check_keys(
    problems: _Problems, path: str, data: dict[Any, Any], allowed: tuple[str, ...]
) -> None:
    for key in data:
        if key not in allowed:
            where = join_path(path, key)
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
        (
            "freeze_timeout",
            "thaw_timeout",
            "max_frozen",
            "hook_log",
            "socket",
            "agent_state_file",
            "legacy_hooks",
            "legacy_hook_timeout",
            "allowed_group",
        ),
    )
    allowed_group = None
    if raw.get("allowed_group") is not None:
        value = raw["allowed_group"]
        if not isinstance(value, str) or not value:
            problems.add("settings.allowed_group", f"expected a group name, got {_kind(value)}")
        else:
            try:
                grp.getgrnam(value)
            except KeyError:
                problems.add("settings.allowed_group", f"no such group {value!r}")
            else:
                allowed_group = value
    legacy_hooks = None
    if raw.get("legacy_hooks") is not None:
        value = raw["legacy_hooks"]
        if isinstance(value, str) and value.startswith("/"):
            legacy_hooks = value.rstrip("/") or "/"
        else:
            problems.add(
                "settings.legacy_hooks", f"expected an absolute directory, got {_kind(value)}"
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
        legacy_hooks=legacy_hooks,
        allowed_group=allowed_group,
        legacy_hook_timeout=_duration(
            problems,
            "settings.legacy_hook_timeout",
            raw.get("legacy_hook_timeout"),
            defaults.legacy_hook_timeout,
        ),
    )


_APP_KEYS = (
    "preset",
    "units",
    "mode",
    "session",
    "freeze",
    "thaw",
    "depends_on",
    "timeout",
    "on_failure",
)
_SESSION_KEYS = ("argv", "user", "env", "cwd", "open", "ready", "close")
_STEP_KEYS = ("exec", "shell", "signal", "user", "env", "cwd", "timeout", "units", "whom")
MODES = ("stop", "freeze")
WHOM = ("all", "main", "control")
LEGACY_APP = "legacy-hooks"

# Presets: defaults for well-known databases that the app's own keys override one by one (and,
# inside ``session``, one sub-key at a time).  The README says what consistency each gives.
PRESETS: dict[str, dict[str, Any]] = {
    "mariadb": {
        # FLUSH TABLES WITH READ LOCK is released when its session ends: hold the session.
        "session": {
            "argv": ["mariadb", "--batch", "--skip-column-names", "--unbuffered"],
            "open": "FLUSH TABLES WITH READ LOCK;\nSELECT 'qgafreeze-ready';\n",
            "ready": "^qgafreeze-ready$",
            "close": "UNLOCK TABLES;\n",
        },
    },
    "mysql": {
        "session": {
            "argv": ["mysql", "--batch", "--skip-column-names", "--unbuffered"],
            "open": "FLUSH TABLES WITH READ LOCK;\nSELECT 'qgafreeze-ready';\n",
            "ready": "^qgafreeze-ready$",
            "close": "UNLOCK TABLES;\n",
        },
    },
    "postgresql": {
        # A checkpoint first, so that the backup starts (and a restore recovers) quickly; then
        # pg_backup_start held in one session until pg_backup_stop (PostgreSQL 15 and later),
        # whose backup label is saved for the restore.
        "freeze": [{"exec": ["psql", "-X", "-q", "-c", "CHECKPOINT"], "user": "postgres"}],
        "session": {
            "argv": ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"],
            "user": "postgres",
            "open": "SELECT pg_backup_start('qgafreeze', true);\n\\echo qgafreeze-ready\n",
            "ready": "^qgafreeze-ready$",
            "close": "\\o /var/lib/postgresql/qgafreeze-backup_label\n"
            "SELECT labelfile FROM pg_backup_stop(true);\n\\o\n",
        },
    },
    "mongodb": {
        "freeze": [{"exec": ["mongosh", "--quiet", "--eval", "db.fsyncLock()"]}],
        "thaw": [{"exec": ["mongosh", "--quiet", "--eval", "db.fsyncUnlock()"]}],
    },
    "redis": {
        # SAVE returns once the RDB file is complete on disk.
        "freeze": [{"exec": ["redis-cli", "SAVE"]}],
    },
}

_SIGNALS = {
    name: number
    for name, number in (
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("USR1", 10),
        ("USR2", 12),
        ("TERM", 15),
        ("CONT", 18),
        ("WINCH", 28),
    )
}


def _apply_preset(problems: _Problems, path: str, raw: dict[str, Any]) -> dict[str, Any]:
    name = raw.get("preset")
    if name is None:
        return raw
    if name not in PRESETS:
        problems.add(
            f"{path}.preset", f"unknown preset {_kind(name)} (known: {', '.join(PRESETS)})"
        )
        return raw
    merged: dict[str, Any] = {k: v for k, v in PRESETS[name].items()}
    for key, value in raw.items():
        if key == "session" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _env(problems: _Problems, path: str, value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping of NAME: value, got {_kind(value)}")
        return ()
    pairs = []
    for key, item in value.items():
        if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            problems.add(join_path(path, key), "not a valid environment variable name")
        elif isinstance(item, bool) or not isinstance(item, (str, int, float)):
            problems.add(join_path(path, key), f"expected a string, got {_kind(item)}")
        else:
            pairs.append((key, str(item)))
    return tuple(pairs)


def _user(problems: _Problems, path: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and re.match(r"^[a-z_][a-z0-9_.-]*[$]?$", value, re.I):
        return value
    problems.add(path, f"expected a user name, got {_kind(value)}")
    return None


def _cwd(problems: _Problems, path: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("/"):
        return value
    problems.add(path, f"expected an absolute directory, got {_kind(value)}")
    return None


def _argv(problems: _Problems, path: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        problems.add(path, f"expected a non-empty list: [program, arg, ...], got {_kind(value)}")
        return ()
    items = []
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            problems.add(f"{path}[{index}]", f"expected a string, got {_kind(item)}")
        else:
            items.append(str(item))
    return tuple(items)


def _units(problems: _Problems, path: str, value: Any) -> tuple[str, ...]:
    units: list[str] = []
    for item_path, unit in _string_list(problems, path, value):
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


def _session(problems: _Problems, path: str, raw: Any) -> Session | None:
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {_kind(raw)}")
        return None
    _check_keys(problems, path, raw, _SESSION_KEYS)
    texts = {}
    for key in ("open", "close"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            problems.add(f"{path}.{key}", f"expected text, got {_kind(value)}")
            value = ""
        texts[key] = value if not value or value.endswith("\n") else value + "\n"
    ready = raw.get("ready")
    if not isinstance(ready, str) or not ready:
        problems.add(f"{path}.ready", "expected a regular expression the output shows when ready")
        ready = ""
    else:
        try:
            re.compile(ready)
        except re.error as exc:
            problems.add(f"{path}.ready", f"not a valid regular expression: {exc}")
    return Session(
        argv=_argv(problems, f"{path}.argv", raw.get("argv")),
        open=texts["open"],
        ready=ready,
        close=texts["close"],
        user=_user(problems, f"{path}.user", raw.get("user")),
        env=_env(problems, f"{path}.env", raw.get("env")),
        cwd=_cwd(problems, f"{path}.cwd", raw.get("cwd")),
    )


def _step(problems: _Problems, path: str, raw: Any) -> Step | None:
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping such as {{exec: [program, arg]}}, got {_kind(raw)}")
        return None
    _check_keys(problems, path, raw, _STEP_KEYS)
    kinds = [k for k in ("exec", "shell", "signal") if k in raw]
    if len(kinds) != 1:
        problems.add(path, "needs exactly one of exec (argv list), shell (command text), signal")
        return None
    kind = kinds[0]
    timeout = None
    if raw.get("timeout") is not None:
        timeout = _duration(problems, f"{path}.timeout", raw.get("timeout"), 0.0)
    if kind == "signal":
        name = raw["signal"]
        number = 0
        if isinstance(name, str) and name.upper().removeprefix("SIG") in _SIGNALS:
            name = name.upper().removeprefix("SIG")
            number = _SIGNALS[name]
        elif isinstance(name, int) and not isinstance(name, bool) and 0 < name < 65:
            number, name = name, str(name)
        else:
            problems.add(f"{path}.signal", f"expected a signal such as USR1, got {_kind(name)}")
            name = ""
        whom = raw.get("whom", "all")
        if whom not in WHOM:
            problems.add(f"{path}.whom", f"expected one of {', '.join(WHOM)}, got {_kind(whom)}")
        units = _units(problems, f"{path}.units", raw.get("units"))
        if not units:
            problems.add(f"{path}.units", "a signal needs the units whose processes get it")
        for key in ("user", "env", "cwd"):
            if key in raw:
                problems.add(f"{path}.{key}", "applies to exec and shell steps, not to signals")
        return Step(
            kind="signal", signal=number, signal_name=f"SIG{name}", units=units, whom=str(whom)
        )
    if "units" in raw or "whom" in raw:
        problems.add(path, "units and whom apply to signal steps only")
    if kind == "shell":
        text = raw["shell"]
        if not isinstance(text, str) or not text.strip():
            problems.add(f"{path}.shell", f"expected a command line, got {_kind(text)}")
            text = ""
        argv: tuple[str, ...] = ("/bin/sh", "-c", text)
    else:
        argv = _argv(problems, f"{path}.exec", raw["exec"])
    return Step(
        kind=kind,
        argv=argv,
        user=_user(problems, f"{path}.user", raw.get("user")),
        env=_env(problems, f"{path}.env", raw.get("env")),
        cwd=_cwd(problems, f"{path}.cwd", raw.get("cwd")),
        timeout=timeout,
    )


def _steps(problems: _Problems, path: str, raw: Any) -> tuple[Step, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add(path, f"expected a list of steps, got {_kind(raw)}")
        return ()
    steps = [_step(problems, f"{path}[{i}]", item) for i, item in enumerate(raw)]
    return tuple(s for s in steps if s is not None)


def _parse_app(problems: _Problems, name: Any, raw: Any) -> App | None:
    path = join_path("apps", name)
    if not isinstance(name, str) or not _APP_NAME.match(name):
        problems.add(
            path,
            "an app name is letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
        return None
    if name == LEGACY_APP:
        problems.add(path, f"'{LEGACY_APP}' is the app made from settings.legacy_hooks")
        return None
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {_kind(raw)}")
        return None
    _check_keys(problems, path, raw, _APP_KEYS)
    raw = _apply_preset(problems, path, raw)

    units = _units(problems, f"{path}.units", raw.get("units"))
    if raw.get("units") == []:
        problems.add(f"{path}.units", "is empty")
    session = _session(problems, f"{path}.session", raw["session"]) if "session" in raw else None
    freeze = _steps(problems, f"{path}.freeze", raw.get("freeze"))
    thaw = _steps(problems, f"{path}.thaw", raw.get("thaw"))
    if not any(key in raw for key in ("units", "session", "freeze", "thaw", "preset")):
        problems.add(path, "no action: add units, session, freeze or thaw steps, or a preset")

    mode = raw.get("mode", "stop")
    if mode not in MODES:
        problems.add(f"{path}.mode", f"expected one of {', '.join(MODES)}, got {_kind(mode)}")
        mode = "stop"
    elif "mode" in raw and not units:
        problems.add(f"{path}.mode", "applies to units; this app lists none")

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
        units=units,
        depends_on=tuple(depends_on),
        timeout=_duration(problems, f"{path}.timeout", raw.get("timeout"), App.timeout),
        on_failure=on_failure,
        mode=mode,
        session=session,
        freeze=freeze,
        thaw=thaw,
        preset=raw.get("preset") if isinstance(raw.get("preset"), str) else None,
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
    if settings.legacy_hooks:
        # The old hook directory is one more app: other apps may depend on it by this name.
        apps.append(
            App(
                name=LEGACY_APP,
                legacy_hooks=settings.legacy_hooks,
                timeout=settings.freeze_timeout,
            )
        )

    names = {app.name for app in apps}
    for app in apps:
        if app.name not in raw_apps:
            continue
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
    config = parse_text(text, path)
    insecure = insecure_programs(config)
    if insecure:
        raise ConfigError(path, insecure)
    return config



def _writable_by_others(path: str) -> str | None:
    """Why ``path`` (after symlinks) or a directory above it could be changed by non-root."""
    real = os.path.realpath(path)
    candidate = real
    while True:
        try:
            st = os.stat(candidate)
        except OSError:
            return None  # missing: running it fails with a clear message instead
        reason = check_file_permissions(candidate, st)
        if reason and not (candidate != real and st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            return f"{candidate} is {reason}"
        parent = os.path.dirname(candidate)
        if parent == candidate:
            return None
        candidate = parent


def insecure_programs(config: Config) -> list[str]:
    """Programs and hook scripts the daemon would run as root that someone else could change.

    As sshd and sudo do with their files: the config is root's only if what it runs is too.
    """
    checks: list[tuple[str, str]] = []
    for app in config.apps:
        base = join_path("apps", app.name)
        if app.session is not None and app.session.argv:
            checks.append((f"{base}.session.argv[0]", app.session.argv[0]))
        for phase, steps in (("freeze", app.freeze), ("thaw", app.thaw)):
            for index, step in enumerate(steps):
                if step.kind == "exec" and step.argv:
                    checks.append((f"{base}.{phase}[{index}].exec[0]", step.argv[0]))
    legacy = config.settings.legacy_hooks
    if legacy:
        checks.append(("settings.legacy_hooks", legacy))
        try:
            names = sorted(os.listdir(legacy))
        except OSError:
            names = []
        checks.extend(("settings.legacy_hooks", os.path.join(legacy, n)) for n in names)
    problems = []
    for where, program in checks:
        resolved = program if "/" in program else shutil.which(program, path=paths.SAFE_PATH)
        if resolved:
            reason = _writable_by_others(resolved)
            if reason:
                problems.append(f"{where}: refused: {reason}")
    return problems
