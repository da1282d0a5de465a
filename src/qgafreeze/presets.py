"""Presets: defaults for well-known databases, written as an administrator would write an app.

An app's own keys override its preset's one by one (and, inside ``session``, one sub-key at a
time); the result is validated like any other app.  The README says what consistency each gives.
"""

from __future__ import annotations

from typing import Any

from . import paths

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
        # SAVE returns once the RDB file is complete on disk.
        "freeze": [{"exec": ["redis-cli", "SAVE"]}],
    },
}


# What each preset's quiescing guarantees the snapshot, as the cycle report says it (the README's
# preset table says it at length).
GUARANTEES: dict[str, str] = {
    "mariadb": "writes blocked, tables flushed",
    "mysql": "writes blocked, tables flushed",
    "postgresql": "checkpoint done, backup held until the thaw; its backup_label is in this"
    " report's details once thawed",
    "mongodb": "data flushed, writes blocked",
    "redis": "RDB file complete on disk",
}


def apply_preset(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The app as written (``raw``) over the preset ``name``, which must be one of PRESETS."""
    merged: dict[str, Any] = dict(PRESETS[name])
    for key, value in raw.items():
        if key == "session" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
