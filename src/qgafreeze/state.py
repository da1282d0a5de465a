"""The cycle's state kept under /run, so a daemon that crashed mid-cycle resumes what it paused.

/run is tmpfs: never frozen, gone at reboot (when there is nothing left to resume anyway).  The
file is written before each app is paused and after every change, atomically (a temporary file
renamed over it), so a daemon killed at any instant finds either the old or the new state.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from . import paths

STATE_VERSION = 1


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file beside it and a rename, so that a
    reader (or a daemon killed at any instant) finds the old or the new content, never half.
    Raises OSError."""
    temporary = f"{path}.{threading.get_ident()}.tmp"
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


class StateFile:
    def __init__(self, path: str = paths.STATE_FILE) -> None:
        self.path = path
        self.error = ""  # the last write failure; the daemon reports it
        self._lock = threading.Lock()

    def save(self, data: dict[str, Any]) -> None:
        text = json.dumps({"version": STATE_VERSION, **data}, sort_keys=True)
        with self._lock:
            try:
                write_atomically(self.path, text)
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


class BatchedStateWriter:
    """Saves what ``snapshot`` returns to a StateFile, sharing writes among concurrent callers.

    Group commit: with hundreds of apps pausing at once, each caller needs *a* write that started
    after its change, not a write of its own.  One caller writes while the others wait; the next
    write, from a snapshot taken after all of them arrived, covers them all.
    """

    def __init__(
        self,
        file: StateFile,
        snapshot: Callable[[], dict[str, Any]],
        condition: threading.Condition | None = None,
    ) -> None:
        self._file = file
        # Taken without our lock held, so it may take locks of its own (the engine's).
        self._snapshot = snapshot
        self._condition = condition or threading.Condition()
        self._requested = 0  # tickets: each save() call takes the next one
        self._done = 0  # every ticket up to this one is on disk
        self._saving = False

    def save(self) -> None:
        """Returns once a write that started after this call has completed.  A write that raised
        does not count: its caller gets the exception, and a caller it would have covered writes
        again."""
        with self._condition:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket:
                if self._saving:
                    self._condition.wait()
                    continue
                self._saving = True
                covered = self._requested  # every caller up to here changed what it saves
                self._condition.release()
                written = False
                try:
                    self._file.save(self._snapshot())
                    written = True
                finally:
                    self._condition.acquire()
                    self._saving = False
                    if written:
                        self._done = covered
                    self._condition.notify_all()


Record = dict[str, list[Any]]  # what one app must undo, per action: plain data, saved as JSON


class PausedApps:
    """The apps that have something to undo, and what: the heart of the state file.

    App threads add and drop entries while a save copies the table, and each action changes its
    own record; the table is locked for the first, and copied in a way that the second cannot
    break (see ``copy``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}

    def __bool__(self) -> bool:
        return bool(self._records)

    def __contains__(self, app: object) -> bool:
        return app in self._records

    def add(self, app: str) -> Record:
        """A new, empty record for ``app``, entered before the app pauses anything."""
        record: Record = {}
        with self._lock:
            self._records[app] = record
        return record

    def record(self, app: str) -> Record:
        return self._records[app]

    def drop(self, app: str) -> None:
        with self._lock:
            self._records.pop(app, None)

    def names(self) -> set[str]:
        with self._lock:
            return set(self._records)

    def copy(self) -> dict[str, Record]:
        # Actions change their own record (a dict of lists) in their threads; dict.copy() and
        # list() copy in one step under the GIL, so the copy is never taken from a dict that is
        # half-way through a change.
        with self._lock:
            return {
                app: {k: list(v) for k, v in r.copy().items()} for app, r in self._records.items()
            }

    def replace(self, records: Mapping[str, Mapping[str, Sequence[Any]]]) -> None:
        with self._lock:
            self._records = {app: {k: list(v) for k, v in r.items()} for app, r in records.items()}
