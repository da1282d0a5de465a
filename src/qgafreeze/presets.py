"""Presets: defaults for well-known databases, written as an administrator would write an app.

An app's own keys override its preset's one by one (and, inside ``session``, one sub-key at a
time); the result is validated like any other app.  The README says what consistency each gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import paths

PRESETS: dict[str, dict[str, Any]] = {
    # Our helper (quiesce/mariadb.py) through the server's own client: it waits (bounded) for
    # long statements, then takes BACKUP STAGE ... BLOCK_COMMIT on MariaDB 10.4+, FLUSH TABLES
    # WITH READ LOCK elsewhere, under a bounded lock_wait_timeout, and holds it in its connection
    # until the thaw ends its stdin.  Its options (PRESET OPTIONS) are added to the argv.
    "mariadb": {
        "session": {
            "argv": [paths.QUIESCE, "mariadb", "--client", "mariadb"],
            "open": "",
            "ready": "^qgafreeze-ready$",
            "close": "",
        },
    },
    "mysql": {
        "session": {
            "argv": [paths.QUIESCE, "mariadb", "--client", "mysql"],
            "open": "",
            "ready": "^qgafreeze-ready$",
            "close": "",
        },
    },
    "postgresql": {
        # Our helper (quiesce/postgresql.py) through psql: a checkpoint, then a non-exclusive
        # backup held in its one connection until the thaw, by the functions of the server's
        # version (13 and later); the backup label goes into the cycle report, not a file.
        "session": {
            "argv": [paths.QUIESCE, "postgresql"],
            "user": "postgres",
            "open": "",
            "ready": "^qgafreeze-ready$",
            "close": "thaw\n",
        },
    },
    "mongodb": {
        "freeze": [{"exec": ["mongosh", "--quiet", "--eval", "db.fsyncLock()"]}],
        "thaw": [{"exec": ["mongosh", "--quiet", "--eval", "db.fsyncUnlock()"]}],
    },
    "redis": {
        # Our helper (quiesce/redis.py) through redis-cli: BGSAVE, which keeps clients answered
        # (SAVE blocks them all until the file is written), awaited until it has succeeded.
        # Nothing is held: the RDB file is complete before the filesystems freeze.
        "freeze": [{"exec": [paths.QUIESCE, "redis"]}],
    },
}


# What each preset's quiescing guarantees the snapshot, as the cycle report says it (the README's
# preset table says it at length).
GUARANTEES: dict[str, str] = {
    "mariadb": "commits and DDL blocked (BACKUP STAGE BLOCK_COMMIT on MariaDB 10.4+, else"
    " FLUSH TABLES WITH READ LOCK: writes blocked, tables flushed); details name the lock",
    "mysql": "writes blocked, tables flushed (FLUSH TABLES WITH READ LOCK; BACKUP STAGE"
    " BLOCK_COMMIT on MariaDB 10.4+); details name the lock",
    "postgresql": "checkpoint done, backup held until the thaw; its backup_label is in this"
    " report's details once thawed",
    "mongodb": "data flushed, writes blocked",
    "redis": "RDB file saved in the background after the freeze request, complete on disk",
}


# The options (schema.PRESET_OPTIONS) each preset's quiesce helper takes.
_MARIADB_OPTIONS = (
    "long_query_threshold",
    "long_query_wait",
    "kill_long_queries",
    "lock_wait_timeout",
)
OPTIONS: dict[str, tuple[str, ...]] = {"mariadb": _MARIADB_OPTIONS, "mysql": _MARIADB_OPTIONS}


def apply_preset(name: str, raw: dict[str, Any], helper_args: Sequence[str] = ()) -> dict[str, Any]:
    """The app as written (``raw``) over the preset ``name``, which must be one of PRESETS;
    ``helper_args`` (its options, as arguments) go to the preset's quiesce helper."""
    merged: dict[str, Any] = dict(PRESETS[name])
    if helper_args:
        merged = _with_helper_args(merged, list(helper_args))
    for key, value in raw.items():
        if key == "session" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _with_helper_args(preset: dict[str, Any], args: list[str]) -> dict[str, Any]:
    """The preset with ``args`` added wherever it runs the quiesce helper (session or steps)."""

    def extend(command: dict[str, Any], key: str) -> dict[str, Any]:
        argv = command.get(key)
        if isinstance(argv, list) and argv[:1] == [paths.QUIESCE]:
            return {**command, key: [*argv, *args]}
        return command

    result = dict(preset)
    if isinstance(result.get("session"), dict):
        result["session"] = extend(result["session"], "argv")
    for phase in ("freeze", "thaw"):
        if isinstance(result.get(phase), list):
            result[phase] = [extend(step, "exec") for step in result[phase]]
    return result
