"""Notice when qemu-ga leaves its frozen state without running the thaw hook.

qemu-ga runs the freeze hook, marks itself frozen by creating ``qga.state.isfrozen`` in its state
directory, freezes the filesystems, and removes the file when it thaws.  When the freeze touched
zero filesystems (a mount list that matches nothing), it removes the file at once and never runs
the thaw hook: whatever the hook paused would stay paused until the watchdog.  Watching that file
with inotify while we are frozen catches the removal; if no thaw request follows within a grace
period (a real thaw runs the hook right after removing the file), the daemon resumes everything.

inotify through ctypes keeps this in the standard library; the reader thread blocks in read(2),
so it costs nothing while idle.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from typing import Callable

from .model import THAW_HOOK_GRACE

_IN_MOVED_FROM = 0x00000040
_IN_DELETE = 0x00000200
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # struct inotify_event without its name


class AgentFlagWatch:
    """Calls ``on_lost(cycle)`` when qemu-ga's frozen flag disappears and no thaw follows."""

    def __init__(
        self, path: str, on_lost: Callable[[str], None], grace: float = THAW_HOOK_GRACE
    ) -> None:
        self._directory, self._name = os.path.split(path)
        self._on_lost = on_lost
        self._grace = grace
        self._lock = threading.Lock()
        self._cycle = ""  # armed for this cycle; "" when disarmed
        self._cancel = threading.Event()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(_IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._wd = -1
        threading.Thread(target=self._read_events, name="agent-watch", daemon=True).start()

    def retarget(self, path: str) -> None:
        """Watch ``path`` from the next ``arm`` on (a reload changed agent_state_file).  Only
        while disarmed, when no directory is watched."""
        with self._lock:
            self._directory, self._name = os.path.split(path)

    def arm(self, cycle: str) -> None:
        """Start watching; call before the freeze reply reaches qemu-ga."""
        with self._lock:
            if self._wd < 0:
                wd = self._libc.inotify_add_watch(
                    self._fd, os.fsencode(self._directory), _IN_DELETE | _IN_MOVED_FROM
                )
                if wd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"cannot watch {self._directory}: {os.strerror(err)}")
                self._wd = wd
            self._cancel.set()  # a grace timer of an earlier cycle must not fire now
            self._cancel = threading.Event()
            self._cycle = cycle

    def disarm(self) -> None:
        with self._lock:
            self._cycle = ""
            self._cancel.set()
            if self._wd >= 0:
                self._libc.inotify_rm_watch(self._fd, self._wd)
                self._wd = -1

    def _read_events(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 4096)
            except OSError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                if raw.rstrip(b"\0") == os.fsencode(self._name):
                    self._flag_removed()

    def _flag_removed(self) -> None:
        with self._lock:
            cycle, cancel = self._cycle, self._cancel
        if not cycle:
            return

        def wait_for_thaw() -> None:
            if not cancel.wait(self._grace):
                self._on_lost(cycle)

        threading.Thread(target=wait_for_thaw, name="agent-grace", daemon=True).start()
