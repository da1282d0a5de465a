"""Apps an earlier cycle could not resume (leftovers), resumed again until they are back.

A rollback or a thaw can fail for a reason that passes by itself: systemd queues the rollback's
start behind a stop that hangs past the app's timeout, and runs it once that stop ends, a minute
later.  Nobody would ever resume them again: qemu-ga and libvirt send no thaw after a failed
freeze, the watchdog is armed only by a successful one, and while anything is left paused every
freeze is refused, so every backup would fail until someone thawed by hand.  So the engine
resumes what is left on a timer, with backoff, while anything is (``Retrier``), and once more
before each freeze; resuming a unit that systemd has started meanwhile finds it running and drops
it from the paused table.  A freeze is refused only when that re-check still finds a leftover.

A retry holds the engine's cycle lock like a cycle; a request that finds it held by a retry
waits for it, bounded (``CycleLock``), instead of being answered ``busy``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Callable

# Seconds between retries; the last one repeats for as long as anything is left.
RETRY_DELAYS = (2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
RETRY = "retry"  # the reason of a retry's thaw, in journald and status


class CycleLock:
    """One cycle (or retry) at a time.  A request that finds a cycle running is answered busy at
    once; one that finds a retry running waits for it, up to ``retry_wait()`` seconds: the retry
    is the daemon's own doing, and often what lets the request through."""

    def __init__(self, retry_wait: Callable[[], float]) -> None:
        self._lock = threading.Lock()
        self._retry_wait = retry_wait
        self._retrying = False  # advisory: tells a request whether waiting is worth it
        self._retries = 0  # retries finished, to tell a request whether one ended as it waited

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def take(self, wait: float = 0.0) -> bool | None:
        """Acquire for a request, waiting ``wait`` seconds for a cycle (0: not at all).  None:
        not acquired; else whether a retry finished meanwhile (it was the re-check)."""
        before = self._retries
        got = self._lock.acquire(timeout=wait) if wait > 0 else self._lock.acquire(False)
        if not got and self._retrying:
            got = self._lock.acquire(timeout=max(wait, self._retry_wait()))
        return self._retries != before if got else None

    @contextlib.contextmanager
    def retry(self) -> Iterator[bool]:
        """Held for one retry if free (yields True); never waits for a cycle (yields False)."""
        self._retrying = True  # before the lock is taken: a request never misses a running retry
        if not self._lock.acquire(False):
            self._retrying = False
            yield False
            return
        try:
            yield True
        finally:
            self._retries += 1
            self._retrying = False
            self._lock.release()


class Retrier:
    """Calls ``attempt`` after each of ``delays`` (the last repeating) while it returns True.

    ``kick`` starts the schedule over, from its first delay; one schedule runs at a time, in a
    thread of its own that waits on an event (no polling), so ``stop`` ends it at once."""

    def __init__(
        self,
        attempt: Callable[[], bool],
        delays: Sequence[float] = RETRY_DELAYS,
        problem: Callable[[str], None] | None = None,
    ) -> None:
        self._attempt = attempt
        self._delays = tuple(delays) or RETRY_DELAYS
        self._problem = problem
        self._lock = threading.Lock()
        self._cancel: threading.Event | None = None
        self._due: float | None = None  # wall clock of the next attempt
        self.attempts = 0

    def kick(self) -> None:
        cancel = threading.Event()
        with self._lock:
            if self._cancel is not None:
                self._cancel.set()
            self._cancel = cancel
            self._due = time.time() + self._delays[0]  # status shows it from now on
        threading.Thread(target=self._run, args=(cancel,), name="leftovers", daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            if self._cancel is not None:
                self._cancel.set()
            self._cancel = self._due = None

    def due_in(self) -> float | None:
        """Seconds until the next attempt; None when none is scheduled."""
        due = self._due
        return None if due is None else max(0.0, round(due - time.time(), 1))

    def _run(self, cancel: threading.Event) -> None:
        step = 0
        while True:
            delay = self._delays[min(step, len(self._delays) - 1)]
            step += 1
            with self._lock:
                if cancel.is_set():
                    return
                self._due = time.time() + delay
            if cancel.wait(delay):
                return
            self.attempts += 1
            try:
                left = self._attempt()
            except Exception as exc:  # a bug must not end the retries: leftovers stay retried
                left = True
                if self._problem is not None:
                    self._problem(f"retrying what an earlier cycle left failed: {exc!r}")
            if not left:
                break
        with self._lock:
            if self._cancel is cancel:
                self._cancel = self._due = None


def refusal(apps: Sequence[str], why: str) -> str:
    """Why a freeze is refused while leftovers remain after the re-check."""
    return (
        f"apps still paused by an earlier cycle: {', '.join(apps)}; resuming them again before"
        f" this freeze failed ({why}); the daemon keeps retrying, and a thaw retries at once"
    )
