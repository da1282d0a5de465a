"""The watchdog (``max_frozen``): when no thaw arrives in time, the engine thaws by itself, the
disks first (``settings.watchdog_thaws_filesystems``): the host that froze them
is gone, and qemu-ga never thaws by itself.

Imported with the engine at start-up, like ``fsthaw``: nothing here imports while frozen.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .errors import QgafreezeError
from .fsthaw import ThawResult, thaw_and_say
from .model import Settings

if TYPE_CHECKING:
    from .engine import CycleReport

Problem = Callable[[str, str], None]  # a warning in journald and the hook log: message, cycle


class Watchdog:
    def __init__(
        self,
        settings: Callable[[], Settings],
        thaw: Callable[..., Any],  # the engine's thaw(reason=, wait=)
        problem: Problem,
        fs_thawer: Callable[[], ThawResult] | None,  # fsthaw.thaw_all in the daemon; None: never
    ) -> None:
        self._settings = settings
        self._thaw = thaw
        self._problem = problem
        self._fs_thawer = fs_thawer
        self._alarm = _Alarm()

    @property
    def at(self) -> float | None:
        """When it fires (wall clock, kept across daemon restarts); None: not armed."""
        return self._alarm.at

    def arm(self, cycle: str, after: float | None = None) -> None:
        """For ``max_frozen`` (0: off), or ``after`` seconds (what a restarted daemon has left)."""
        limit = self._settings().max_frozen
        if limit > 0:
            self._alarm.arm(limit if after is None else after, lambda: self._fired(cycle))

    def disarm(self) -> None:
        self._alarm.disarm()

    def _fired(self, cycle: str) -> None:
        settings = self._settings()
        self._problem(
            f"no thaw within max_frozen ({settings.max_frozen:g}s): resuming every paused app"
            + (" once the disks are thawed" if self._thaws_disks(settings) else ""),
            cycle,
        )
        try:
            self._thaw(reason="watchdog", wait=settings.thaw_timeout)
        except QgafreezeError as exc:
            self._problem(f"watchdog thaw failed: {exc.message}", cycle)

    def thaw_disks(self, report: CycleReport) -> None:
        """The engine calls this in the watchdog's thaw, before it resumes the apps (whose start
        may write to disk), under the cycle lock, so that a thaw from the host cannot run at the
        same time."""
        thawer = self._fs_thawer
        if thawer is None or not self._settings().watchdog_thaws_filesystems:
            return
        report.filesystems_at = time.time()
        report.filesystems = thaw_and_say(thawer, self._problem, report.cycle)


    def _thaws_disks(self, settings: Settings) -> bool:
        return self._fs_thawer is not None and settings.watchdog_thaws_filesystems


class _Alarm:
    """Calls ``call`` from a thread ``seconds`` after ``arm``, unless disarmed first."""

    def __init__(self) -> None:
        self.at: float | None = None  # wall clock: survives a daemon restart
        self._cancel: threading.Event | None = None

    def arm(self, seconds: float, call: Callable[[], None]) -> None:
        self.at = time.time() + seconds
        cancel = self._cancel = threading.Event()

        def wait_then_call() -> None:
            if not cancel.wait(seconds):  # one timed wait, no polling
                call()

        threading.Thread(target=wait_then_call, name="watchdog", daemon=True).start()

    def disarm(self) -> None:
        self.at = None
        if self._cancel is not None:
            self._cancel.set()
            self._cancel = None
