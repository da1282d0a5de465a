"""Runs one phase's apps as a dependency graph, each in its own thread, under deadlines.

Each app starts as soon as the apps it waits for are done, so independent chains overlap instead
of advancing level by level.  Each app has its own deadline (its timeout, capped by the phase's);
an app whose worker is still running past that deadline plus a grace is abandoned: reported as
timed out and told to stop through its cancel flag.  After an outcome the caller says halts the
phase, nothing new starts; apps never started are reported as skipped, with the reason.

The scheduler knows apps only by name: what to run, how long each may take and what halts the
phase are given to it, and so are its clock, its way of waiting and its way of starting a thread,
so that its timing can be tested in simulated time.
"""

from __future__ import annotations

import functools
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

from .outcome import FAILED, SKIPPED, TIMEOUT, AppOutcome, elapsed_ms

# How long past its deadline a stuck action thread is waited for before it is abandoned.  The
# D-Bus calls are bounded by the same deadline, so this only covers a wedged bus.
ABANDON_GRACE = 2.0

Clock = Callable[[], float]
# Waits on a condition (held by the caller) until notified or ``timeout`` seconds pass.
Wait = Callable[[threading.Condition, float], object]
# Runs ``target`` in a new thread named ``name``.
Start = Callable[[str, Callable[[], None]], None]
# app, its deadline on the scheduler's clock, its cancel flag -> what the app's part came to.
Work = Callable[[str, float, threading.Event], AppOutcome]
# app, result, duration_ms, message -> an outcome that the scheduler decides by itself.
MakeOutcome = Callable[[str, str, int, str], AppOutcome]


def _never(outcome: AppOutcome) -> bool:
    return False


def _ignore_outcome(outcome: AppOutcome) -> None:
    pass


def _ignore_problem(message: str, detail: str) -> None:
    pass


def _wait(condition: threading.Condition, timeout: float) -> bool:
    return condition.wait(timeout)


def _start_thread(name: str, target: Callable[[], None]) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()


@dataclass(frozen=True)
class Phase:
    """One phase as the scheduler sees it."""

    label: str  # freeze, thaw or rollback: names the threads, the messages and the outcomes
    order: Sequence[str]  # every app, in a topological order; outcomes come back in it
    waits_for: Mapping[str, Sequence[str]]  # app -> the apps that must be done before it starts
    deadline: float  # for the whole phase, on the scheduler's clock
    timeout: Callable[[str], float]  # app -> how long it may take
    work: Work
    make_outcome: MakeOutcome
    halts: Callable[[AppOutcome], bool] = _never
    not_started: Callable[[AppOutcome], None] = _ignore_outcome  # hears each skipped app
    problem: Callable[[str, str], None] = _ignore_problem  # message, detail (a traceback)


class Scheduler:
    def __init__(
        self,
        clock: Clock = time.monotonic,
        abandon_grace: float = ABANDON_GRACE,
        wait: Wait = _wait,
        start: Start = _start_thread,
    ) -> None:
        self._clock = clock
        self._abandon_grace = abandon_grace
        self._wait = wait
        self._start = start

    def run(self, phase: Phase) -> list[AppOutcome]:
        """One outcome per app, in ``phase.order``; returns when none is left running."""
        return _PhaseRun(self, phase).run()


@dataclass
class _Running:
    started: float
    limit: float  # its deadline plus the grace: past this it is abandoned
    cancel: threading.Event


class _PhaseRun:
    """The state of one ``Scheduler.run``."""

    def __init__(self, scheduler: Scheduler, phase: Phase) -> None:
        self.clock, self.wait = scheduler._clock, scheduler._wait
        self.start, self.grace = scheduler._start, scheduler._abandon_grace
        self.phase = phase
        self.pending = list(phase.order)
        self.done: dict[str, AppOutcome] = {}
        self.running: dict[str, _Running] = {}
        self.finished: list[tuple[str, AppOutcome]] = []  # handed over by the workers
        self.wake = threading.Condition()
        self.halted_by = ""

    def run(self) -> list[AppOutcome]:
        while self.pending or self.running:
            if not self.halted_by and self.clock() < self.phase.deadline:
                self._start_ready(self.clock())
            if not self.running:
                self._skip_pending()
                break
            with self.wake:
                if not self.finished:
                    first_limit = min(r.limit for r in self.running.values())
                    self.wait(self.wake, max(0.0, first_limit - self.clock()))
                batch, self.finished[:] = self.finished[:], []
            for app, outcome in batch:
                if app in self.running:  # an abandoned worker's late answer is ignored
                    del self.running[app]
                    self._done(app, outcome)
            self._abandon_overdue(self.clock())
        return [self.done[a] for a in self.phase.order if a in self.done]

    def _start_ready(self, now: float) -> None:
        phase = self.phase
        for app in [a for a in self.pending if all(d in self.done for d in phase.waits_for[a])]:
            self.pending.remove(app)
            deadline = min(now + phase.timeout(app), phase.deadline)
            cancel = threading.Event()
            self.running[app] = _Running(now, deadline + self.grace, cancel)
            self.start(f"{phase.label}-{app}", functools.partial(self._work, app, deadline, cancel))

    def _work(self, app: str, deadline: float, cancel: threading.Event) -> None:
        # Whatever happens, the runner hears back: a worker that died silently would hold the
        # whole cycle until the app's deadline (minutes) for nothing.
        try:
            outcome = self.phase.work(app, deadline, cancel)
        except Exception as exc:
            self.phase.problem(f"{app}: internal error", traceback.format_exc())
            outcome = self.phase.make_outcome(app, FAILED, 0, f"internal error: {exc!r}")
        with self.wake:
            self.finished.append((app, outcome))
            self.wake.notify()

    def _done(self, app: str, outcome: AppOutcome) -> None:
        self.done[app] = outcome
        if not self.halted_by and self.phase.halts(outcome):
            self.halted_by = app

    def _abandon_overdue(self, now: float) -> None:
        for app, running in list(self.running.items()):
            if now >= running.limit:
                running.cancel.set()  # whatever it has not paused yet, it must not pause any more
                del self.running[app]
                self._done(
                    app,
                    self.phase.make_outcome(
                        app,
                        TIMEOUT,
                        elapsed_ms(now - running.started),
                        "did not return by its deadline",
                    ),
                )
                self.phase.problem(
                    f"{app}: {self.phase.label} action abandoned past its deadline", ""
                )

    def _skip_pending(self) -> None:
        why = (
            f"not started: {self.halted_by} failed and the freeze is aborted"
            if self.halted_by
            else f"not started: the {self.phase.label} phase deadline passed"
        )
        for app in self.pending:
            self.done[app] = self.phase.make_outcome(app, SKIPPED, 0, why)
            self.phase.not_started(self.done[app])
