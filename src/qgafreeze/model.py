"""What a valid config is, once parsed: frozen dataclasses and the constants that bound them.

Nothing here reads a file or asks the host anything: ``config`` builds these from YAML, ``trust``
judges what they would run, and the daemon acts on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CONFIG_VERSION = 1

ON_FAILURE_CHOICES = ("abort", "continue")
MODES = ("stop", "freeze")  # what happens to an app's units: stopped, or cgroup-frozen
# What each mode guarantees the snapshot, as the cycle report says it.
MODE_GUARANTEES = {"stop": "stopped", "freeze": "processes frozen"}
WHOM = ("all", "main", "control")  # systemd's KillUnit: which of a unit's processes

# What members of settings.allowed_group may ask (protocol.OPS) unless
# settings.allowed_group_ops grants more: nothing that changes the state of the apps.
ALLOWED_GROUP_OPS = ("ping", "status")

# Seconds between qemu-ga removing its frozen flag (settings.agent_state_file) and its thaw hook
# arriving: the daemon (agentwatch) waits this long before it resumes every app itself.
THAW_HOOK_GRACE = 10.0

# The app made from settings.legacy_hooks; no declared app may take its name.
LEGACY_APP = "legacy-hooks"

# Signals a step may send, by name; a number 1-64 is accepted as well.
SIGNALS = {
    "HUP": 1,
    "INT": 2,
    "QUIT": 3,
    "USR1": 10,
    "USR2": 12,
    "TERM": 15,
    "CONT": 18,
    "WINCH": 28,
}

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


def normalize_unit(name: str) -> str:
    """A bare name means a service, as with systemctl."""
    if "." in name.rsplit("@", 1)[-1] and not name.endswith("@"):
        return name  # has a type suffix; unsupported types are refused by the caller
    return name + ".service"


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def join_path(path: str, key: Any) -> str:
    """``apps.db``, or ``apps['a b']`` for a key that would not read as one: how every message
    names a place in the config."""
    if isinstance(key, str) and _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


@dataclass(frozen=True)
class Settings:
    """The ``settings:`` section.  No defaults here: ``schema.SETTINGS`` holds them, written as an
    administrator would write them, and the parser reads an absent setting as its default."""

    freeze_timeout: float
    thaw_timeout: float
    max_frozen: float  # watchdog; 0 disables it
    watchdog_thaws_filesystems: bool  # the watchdog also thaws the disks (fsthaw)
    hook_log: str | None  # None: no compatible hook log
    agent_state_file: str | None  # None: do not watch qemu-ga
    legacy_hooks: str | None  # an old fsfreeze-hook.d to run as one more app
    legacy_hook_timeout: float  # per script
    # Its members may use the socket too; None: root only.  A name, resolved where it is used
    # (trust.resolve_group), so that parsing a config never depends on the host's groups.
    allowed_group: str | None
    # What they may ask (protocol.OPS).
    allowed_group_ops: tuple[str, ...]


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
    # Their defaults are schema.APP's, applied by the parser.
    timeout: float
    on_failure: str
    mode: str  # what happens to units: stop, or freeze (cgroup freezer)
    units: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
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
    warnings: tuple[str, ...] = ()  # valid, but worth saying: check prints, the daemon logs

    def app(self, name: str) -> App:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    @property
    def app_names(self) -> tuple[str, ...]:
        return tuple(app.name for app in self.apps)
