"""Every key of ``/etc/qgafreeze.yaml``, written once: its type, default, choices and meaning.

The validator's lists of allowed keys and the defaults of the settings come from here; the
README's settings table and qgafreeze.yaml(5) are generated from here, and tests hold the example
config, the validator and both documents to it.  Regenerate the documents after a change, from
the top of the source tree::

    python3 -m qgafreeze.schema write

(``markdown`` and ``man`` print them instead; ``check`` says whether the files are current.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from . import paths
from .agentwatch import THAW_HOOK_GRACE
from .model import CONFIG_VERSION, LEGACY_APP, MODES, ON_FAILURE_CHOICES, SIGNALS, WHOM
from .presets import PRESETS


@dataclass(frozen=True)
class Key:
    name: str
    type: str  # in words, for people
    description: str  # one line
    default: str | None = None  # YAML text, as an administrator would write it; None: no default
    choices: tuple[str, ...] = ()

    @property
    def value(self) -> Any:
        """The default as the validator receives it: read as YAML, like the administrator's."""
        return None if self.default is None else yaml.safe_load(self.default)


@dataclass(frozen=True)
class Section:
    title: str  # as the man page heads it
    place: str  # where its keys sit, as messages name them
    intro: str
    keys: tuple[Key, ...]

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
    "",
    "The file is one YAML mapping with these keys; all of them are optional.",
    (
        Key(
            "version",
            "integer",
            "The format of this file.",
            str(CONFIG_VERSION),
            (str(CONFIG_VERSION),),
        ),
        Key("settings", "mapping (SETTINGS)", "How the daemon works; every setting is optional."),
        Key("apps", "mapping of app name to app (APPS)", "The applications to quiesce."),
    ),
)

SETTINGS = Section(
    "SETTINGS",
    "settings",
    "Every setting is optional; the default is what an absent setting means.",
    (
        Key(
            "freeze_timeout",
            _DURATION,
            "The whole freeze phase must finish in this, or it fails and rolls back.",
            "60s",
        ),
        Key(
            "thaw_timeout",
            _DURATION,
            "The whole thaw phase (and a rollback) must finish in this.",
            "2m",
        ),
        Key(
            "max_frozen",
            _DURATION,
            "Watchdog: resume every app if no thaw arrives in this; 0 turns it off.",
            "15m",
        ),
        Key(
            "hook_log",
            "absolute path, or null",
            "The log the stock hook writes, line for line; null: do not write it.",
            paths.HOOK_LOG,
        ),
        Key(
            "socket",
            "absolute path",
            "Where the daemon listens when it is not socket-activated.",
            paths.SOCKET,
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
            "Its members may use the socket too (status, freeze, thaw); null: root only.",
            "null",
        ),
    ),
)

APP = Section(
    "APPS",
    "apps.NAME",
    "Each key under apps names an application (letters, digits, _ . -); its value says what to"
    " do with it.  An app needs units, a session, steps or a preset.",
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
        Key("session", "mapping (SESSION)", "A process held open from freeze to thaw."),
        Key("freeze", "list of steps (STEPS)", "Steps run in order on freeze, before the rest."),
        Key(
            "thaw",
            "list of steps (STEPS)",
            "Steps run on thaw (and on rollback) when the freeze steps ran.",
        ),
        Key(
            "depends_on",
            "list of app names",
            "Apps this one uses: it is quiesced before them and resumed after them.",
            "[]",
        ),
        Key("timeout", _DURATION, "This app's part of a phase must finish in this.", "30s"),
        Key(
            "on_failure",
            "word",
            "abort: a failure rolls back every app and fails the freeze; continue: log it, go on.",
            ON_FAILURE_CHOICES[0],
            ON_FAILURE_CHOICES,
        ),
    ),
)

SESSION = Section(
    "SESSION",
    "apps.NAME.session",
    "A session is one process started at freeze and kept running until the thaw, such as a"
    " database client whose lock lasts as long as its connection.",
    (
        Key("argv", _COMMAND, "The program and its arguments, run without a shell; required."),
        Key("user", "user name", "Run it as this user instead of root."),
        Key("env", _ENV, "Added to the clean environment (PATH, LANG, HOME, USER)."),
        Key("cwd", "absolute directory", "Run it in this directory."),
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
    "apps.NAME.freeze[N]",
    "A step is one of exec, shell or signal, in the freeze or thaw list of an app.  A failed or"
    " timed-out step fails the app.",
    (
        Key("exec", _COMMAND, "Run this program with these arguments, without a shell."),
        Key("shell", "command line", "Run this with /bin/sh -c (only when you write shell)."),
        Key(
            "signal",
            "signal name or number",
            f"Send this signal ({', '.join(SIGNALS)} or 1-64) to units' processes via systemd.",
        ),
        Key("user", "user name", "exec, shell: run as this user instead of root."),
        Key("env", _ENV, "exec, shell: added to the clean environment."),
        Key("cwd", "absolute directory", "exec, shell: run in this directory."),
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

SECTIONS = (TOP, SETTINGS, APP, SESSION, STEP)
