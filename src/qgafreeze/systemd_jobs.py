"""Which systemd jobs are ours, and how they ended: the bookkeeping behind ``systemd_manager``'s
waits, pure logic, fed by its signal loop.

JobRemoved is believed only from the owner of org.freedesktop.systemd1 (its unique name, asked at
connect and followed through the bus's own NameOwnerChanged), for jobs our calls created.  Any
local client can send us a unicast signal, which a GLib without the fix for CVE-2024-34397 hands
to a subscription by well-known name: we compare senders ourselves, on every GLib.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from .errors import ActionTimeout

BUS_NAME = "org.freedesktop.systemd1"
# The bus itself: the only sender whose word on who owns a name counts.
DBUS_NAME = "org.freedesktop.DBus"
# systemd's JobRemoved for a job can arrive before the reply that names the job: while one of our
# job-creating calls is in flight, results for paths we do not know yet are kept for it (from
# systemd only), and forgotten once no such call is left.  Other clients' jobs ending meanwhile
# land there too; the bound keeps them to about 1.4 MB through the busiest freeze.
_REMEMBERED_JOBS = 4096


class JobBook:
    """The jobs our calls created and their results, from the current owner of systemd's name
    only (and, while a job-creating call is in flight, for paths its reply may yet name)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._systemd: str | None = None  # the owner's unique name; None: nobody, or unknown
        self._owner_announced = False  # the bus said who owns it: newer than GetNameOwner's reply
        self._ours: dict[str, str | None] = {}  # job path -> its result, None until it comes
        self._creating = 0  # job-creating calls in flight
        self._early: OrderedDict[str, str] = OrderedDict()
        # job path -> the event of the one caller waiting for it: a JobRemoved wakes that caller
        # only, not every caller (with 200 apps, waking all on each job cost 40,000 wake-ups).
        self._waiting: dict[str, threading.Event] = {}

    def owner_replied(self, owner: str | None) -> None:
        """GetNameOwner's answer, asked after subscribing to NameOwnerChanged."""
        with self._lock:
            if not self._owner_announced:
                self._systemd = owner

    def owner_changed(self, sender: str, name: str, _old: str, new_owner: str) -> None:
        if sender != DBUS_NAME or name != BUS_NAME:
            return  # anyone can send this signal; only the bus's own is true
        with self._lock:
            self._systemd = new_owner or None
            self._owner_announced = True

    def job_removed(self, sender: str, _id: int, job: str, _unit: str, result: str) -> None:
        waiter = None
        with self._lock:
            if self._systemd is None or sender != self._systemd:
                return
            if job in self._ours:
                self._ours[job] = result
                waiter = self._waiting.pop(job, None)
            elif self._creating:
                self._early[job] = result
                while len(self._early) > _REMEMBERED_JOBS:
                    self._early.popitem(last=False)
        if waiter is not None:
            waiter.set()

    def create(self, call: Callable[[], str]) -> str:
        """Run ``call``, which creates a job and returns its path: ours from then on, with a
        result systemd sent before the reply, if any."""
        with self._lock:
            self._creating += 1
        job: str | None = None
        try:
            job = call()
            return job
        finally:
            with self._lock:
                self._creating -= 1
                if job is not None:
                    self._ours[job] = self._early.pop(job, None)
                if not self._creating:
                    self._early.clear()

    def __len__(self) -> int:
        """How many jobs are ours now: created, and not yet waited for or forgotten."""
        with self._lock:
            return len(self._ours)

    def wait(self, jobs: dict[str, str], deadline: float, verb: str) -> dict[str, str]:
        """The results of ``jobs`` (job path -> unit), which ``create`` made."""
        results: dict[str, str] = {}
        wake = threading.Event()
        try:
            while True:
                with self._lock:
                    wake.clear()
                    for job in jobs:
                        if job in results:
                            continue
                        result = self._ours.get(job)
                        if result is not None:  # it may have ended before we asked
                            results[job] = result
                            self._waiting.pop(job, None)
                        else:
                            self._waiting[job] = wake
                if len(results) == len(jobs):
                    return results
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pending = ", ".join(u for j, u in jobs.items() if j not in results)
                    raise ActionTimeout(f"{pending}: {verb} did not finish in time")
                wake.wait(remaining)
        finally:
            self.forget(jobs, wake)

    def forget(self, jobs: Iterable[str], wake: threading.Event | None = None) -> None:
        """Jobs ``create`` made that nobody waits for any more (``wake``: the one who did): their
        results, or late ones, are nobody's now."""
        with self._lock:
            for job in jobs:
                self._ours.pop(job, None)
                if wake is not None and self._waiting.get(job) is wake:
                    del self._waiting[job]
