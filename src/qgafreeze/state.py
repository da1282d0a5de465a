"""The cycle's state kept under /run, so a daemon that crashed mid-cycle resumes what it paused.

/run is tmpfs: never frozen, gone at reboot (when there is nothing left to resume anyway).  The
file is written before each app is paused and after every change, atomically (a temporary file
renamed over it), so a daemon killed at any instant finds either the old or the new state.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from . import paths

STATE_VERSION = 1


class StateFile:
    def __init__(self, path: str = paths.STATE_FILE) -> None:
        self.path = path
        self.error = ""  # the last write failure; the daemon reports it
        self._lock = threading.Lock()

    def save(self, data: dict[str, Any]) -> None:
        text = json.dumps({"version": STATE_VERSION, **data}, sort_keys=True)
        temporary = f"{self.path}.{threading.get_ident()}.tmp"
        with self._lock:
            try:
                os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
                with open(temporary, "w", encoding="utf-8") as handle:
                    handle.write(text)
                os.replace(temporary, self.path)
                self.error = ""
            except OSError as exc:
                self.error = f"cannot keep the cycle state in {self.path}: {exc.strerror or exc}"

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none or it cannot be used (``error`` says)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.error = f"ignoring unreadable cycle state {self.path}: {exc}"
            return None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            self.error = f"ignoring cycle state {self.path} of an unknown version"
            return None
        return data
