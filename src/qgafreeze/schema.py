"""Every key of ``/etc/qgafreeze.yaml``, written once: its type, default, choices and meaning.

The validator's lists of allowed keys and the defaults of the settings come from here; the
README's settings table and qgafreeze.yaml(5) are generated from here (``schemadoc``), and tests
hold the example config, the validator and both documents to it.  After a change, run
``python3 -m qgafreeze.schemadoc write`` from the top of the source tree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import paths
from .model import (
    ALLOWED_GROUP_OPS,
    CONFIG_VERSION,
    LEGACY_APP,
    MODES,
    ON_FAILURE_CHOICES,
    SIGNALS,
    THAW_HOOK_GRACE,
    WHOM,
)
from .presets import PRESETS
from .protocol import OPS


@dataclass(frozen=True)
class Key:
    name: str
    type: str  # in words, for people
    description: str  # one line
    default: str | None = None  # YAML text, as an administrator would write it; None: no default
    choices: tuple[str, ...] = ()
    _value: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Read once: the parser asks for several defaults of every app it loads.
        value = None if self.default is None else yaml.safe_load(self.default)
        object.__setattr__(self, "_value", value)

    @property
    def value(self) -> Any:
        """The default as the validator receives it: read as YAML, like the administrator's (a
        list afresh each time, so that no caller can change the default for the next)."""
        return copy.copy(self._value)


@dataclass(frozen=True)
class Removed:
    """A key an older qgafreeze read.  Refused with ``instead`` rather than as unknown, so that a
    config written for an older release says what changed; but when it holds ``harmless`` (the
    value earlier installs wrote into every /etc/qgafreeze.yaml) it is ignored with a warning,
    so that an upgrade does not stop backups."""

    name: str
    instead: str
    harmless: Any = None


@dataclass(frozen=True)
class Section:
    title: str  # as the man page heads it
    intro: str  # where its keys go and what they are, for the man page
    keys: tuple[Key, ...]
    removed: tuple[Removed, ...] = ()  # keys that used to be here

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)

    def key(self, name: str) -> Key:
        for key in self.keys:
            if key.name == name:
                return key
        raise KeyError(name)


_DURATION = "duration"
_NAMES = "list of unit names"
_COMMAND = "list: program, arguments"
_ENV = "mapping of NAME: value"

TOP = Section(
    "TOP LEVEL",
    "The file is one YAML mapping with these keys, all of them optional.",
    (
        Key(
            "version",
            "integer",
            "The format of this file.",
            str(CONFIG_VERSION),
            (str(CONFIG_VERSION),),
        ),
        Key(
            "settings", "mapping, see SETTINGS", "How the daemon works; every setting is optional."
        ),
        Key("apps", "mapping of app names, see APPS", "The applications to quiesce."),
    ),
)

SETTINGS = Section(
    "SETTINGS",
    "Under settings; every setting is optional, and its default is what leaving it out means.",
    (
        Key(
            "freeze_timeout",
            _DURATION,
            "The whole freeze phase must finish in this, or it fails and rolls back; with"
            " thaw_timeout for the rollback it answers within the 60 s callers wait"
            " (docs/callers.md).",
            "20s",
        ),
        Key(
            "thaw_timeout",
            _DURATION,
            "The whole thaw phase (and a rollback) must finish in this; within the 20 s"
            " KubeVirt waits for a thaw (docs/callers.md).",
            "15s",
        ),
        Key(
            "max_frozen",
            _DURATION,
            "Watchdog: resume every app if no thaw arrives in this, longer than callers hold"
            " a freeze (docs/callers.md); 0 turns it off.",
            "15m",
        ),
        Key(
            "watchdog_thaws_filesystems",
            "boolean",
            "When the watchdog fires, also thaw every frozen filesystem (FITHAW), before resuming"
            " the apps: the host that froze them is gone, and qemu-ga has no timer of its own.",
            "true",
        ),
        Key(
            "hook_log",
            "absolute path, or null",
            "The log the stock hook writes, line for line; null: do not write it.",
            paths.HOOK_LOG,
        ),
        Key(
            "agent_state_file",
            "absolute file path, or null",
            "qemu-ga's frozen flag: if it vanishes and no thaw follows within"
            f" {THAW_HOOK_GRACE:g}s, every app is resumed; null: do not watch it.",
            paths.AGENT_STATE_FILE,
        ),
        Key(
            "legacy_hooks",
            "absolute directory, or null",
            f"An old fsfreeze-hook.d whose scripts run as one more app, {LEGACY_APP}.",
            "null",
        ),
        Key("legacy_hook_timeout", _DURATION, "How long each legacy script may take.", "30s"),
        Key(
            "allowed_group",
            "group name, or null",
            "Its members may use the socket too, for allowed_group_ops; null: root only.",
            "null",
        ),
        Key(
            "allowed_group_ops",
            f"list of: {', '.join(OPS)}",
            "What allowed_group may ask; a thaw or freeze at the wrong time spoils a backup.",
            f"[{', '.join(ALLOWED_GROUP_OPS)}]",
        ),
    ),
    removed=(
        Removed(
            "socket",
            "the socket path is qgafreeze.socket's ListenStream= (or"
            f" ${paths.SOCKET_ENV} for a daemon started by hand); delete this line",
            harmless=paths.SOCKET,
        ),
    ),
)

APP = Section(
    "APPS",
    "Each key under apps names an application (letters, digits, _ . and -, starting with a letter"
    " or a digit) and maps to these keys.  An app needs units, a session, steps or a preset."
    "  Apps are quiesced in parallel, except where depends_on orders them.",
    (
        Key(
            "preset",
            "preset name",
            "Well-tested defaults for a known database; any key you write overrides the preset's.",
            choices=tuple(PRESETS),
        ),
        Key(
            "units",
            _NAMES,
            "Units to quiesce; a bare name means .service; only service, socket, timer and path"
            " units.",
        ),
        Key(
            "mode",
            "word",
            "stop: stop the units; freeze: pause their processes with the cgroup freezer.",
            MODES[0],
            MODES,
        ),
        Key("session", "mapping, see SESSION", "A process held open from freeze to thaw."),
        Key(
            "options",
            "mapping, see PRESET OPTIONS",
            "Settings of the quiesce helper the preset runs (presets mariadb and mysql).",
        ),
        Key("freeze", "list of steps, see STEPS", "Steps run in order on freeze, before the rest."),
        Key(
            "thaw",
            "list of steps, see STEPS",
            "Steps run on thaw (and on rollback) when the freeze steps ran.",
        ),
        Key(
            "depends_on",
            "list of app names",
            "Apps this one uses: it is quiesced before them and resumed after them.",
            "[]",
        ),
        Key("timeout", _DURATION, "This app's part of a phase must finish in this.", "15s"),
        Key(
            "on_failure",
            "word",
            "abort: a failure rolls back every app and fails the freeze; continue: log it, go on.",
            ON_FAILURE_CHOICES[0],
            ON_FAILURE_CHOICES,
        ),
    ),
)


def _how_to_run(applies: str) -> tuple[Key, ...]:
    """The keys a session and a command step share; ``applies`` says to which steps."""
    return (
        Key("user", "user name", f"{applies}Run as this user instead of root."),
        Key("env", _ENV, f"{applies}Added to the clean environment (PATH, LANG, HOME, USER)."),
        Key("cwd", "absolute directory", f"{applies}Run in this directory."),
    )


SESSION = Section(
    "SESSION",
    "Under apps.NAME.session: one process started at freeze and kept running until the thaw,"
    " such as a database client whose lock lasts as long as its connection.",
    (
        Key("argv", _COMMAND, "The program and its arguments, run without a shell; required."),
        *_how_to_run(""),
        Key("open", "text", "Written to its standard input at freeze.", '""'),
        Key(
            "ready",
            "regular expression",
            "The freeze goes on once a line of its output matches this; required.",
        ),
        Key(
            "close",
            "text",
            "Written to its standard input at thaw; then it must exit.",
            '""',
        ),
    ),
)

STEP = Section(
    "STEPS",
    "Each item of apps.NAME.freeze and apps.NAME.thaw is a step: exactly one of exec, shell or"
    " signal, with the keys that apply to it.  A failed or timed-out step fails the app.",
    (
        Key("exec", _COMMAND, "Run this program with these arguments, without a shell."),
        Key("shell", "command line", "Run this with /bin/sh -c (only when you write shell)."),
        Key(
            "signal",
            "signal name or number",
            f"Send this signal ({', '.join(SIGNALS)} or 1-64) to units' processes via systemd.",
        ),
        *_how_to_run("exec, shell: "),
        Key(
            "timeout",
            _DURATION,
            "exec, shell: killed with its process group after this; default: what is left of the"
            " app's timeout.",
        ),
        Key("units", _NAMES, "signal: the units whose processes get it."),
        Key(
            "whom",
            "word",
            "signal: all of a unit's processes, its main process or its control process.",
            WHOM[0],
            WHOM,
        ),
    ),
)

# The helpers' own defaults are the same (quiesce/mariadb.py DEFAULTS; a unit test holds them).
PRESET_OPTIONS = Section(
    "PRESET OPTIONS",
    "Under apps.NAME.options: settings of the quiesce helper that the app's preset runs.  Each"
    " key says which presets take it; another preset refuses it.  MariaDB and MySQL: a statement"
    " that holds the lock up makes every write wait behind it, so the helper waits for long"
    " statements before it locks, and bounds the lock's own wait; writes then never wait longer"
    " than lock_wait_timeout plus the frozen window.",
    (
        Key(
            "long_query_threshold",
            _DURATION,
            "mariadb, mysql: a statement running this long (whole seconds) when the freeze arrives"
            " is a long one, waited for before any lock is taken, if it would hold the lock up.",
            "1s",
        ),
        Key(
            "long_query_wait",
            _DURATION,
            "mariadb, mysql: how long to wait for long statements to finish; then the app fails"
            " with nothing locked, naming them (id, verb, seconds, user; never their text).",
            "5s",
        ),
        Key(
            "kill_long_queries",
            "boolean",
            "mariadb, mysql: instead of failing, end the long statements still running after"
            " long_query_wait with KILL QUERY (their changes are rolled back).",
            "false",
        ),
        Key(
            "lock_wait_timeout",
            _DURATION,
            "mariadb, mysql: the server's lock_wait_timeout (whole seconds, at least 1) for taking"
            " the lock: the longest any write waits for it; not granted by then, the app fails.",
            "3s",
        ),
    ),
)

SECTIONS = (TOP, SETTINGS, APP, SESSION, PRESET_OPTIONS, STEP)
