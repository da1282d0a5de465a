"""Runs a plan: freeze and thaw cycles, in dependency order, in parallel, under deadlines.

States: thawed -> freezing -> frozen -> thawing -> thawed.  The rules an administrator relies on:

* a failed or timed-out freeze (``on_failure: abort``, or the whole-phase deadline) resumes every
  app this cycle touched, in thaw order, and the freeze fails;
* thaw resumes only what this cycle paused, goes on past failures, and keeps what it could not
  resume so that the next thaw tries again;
* thaw with nothing frozen succeeds and changes nothing; a freeze while frozen is refused;
* one cycle at a time: a request that arrives during a cycle is answered ``busy``, not queued;
* what a failed rollback or thaw left paused is retried on a timer and before each freeze
  (``leftovers``); a freeze is refused only while something is still left;
* the watchdog (``max_frozen``) thaws by itself when no thaw arrives in time.

The engine decides which phase runs and keeps the state; ``apprunner`` runs each app's part of
a phase, ``scheduler`` orders the apps under their deadlines, ``state`` keeps the paused table
and writes it under /run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .actioncontext import Action
from .apprunner import AppEvents, AppRunner
from .errors import ActionTimeout, Busy, CycleFailed, QgafreezeError, StateError
from .fsthaw import ThawResult
from .leftovers import RETRY, RETRY_DELAYS, CycleLock, Retrier, refusal
from .model import Config
from .outcome import FAILED, OK, SKIPPED, TIMEOUT, AppOutcome, elapsed_ms
from .planner import Plan
from .report import CycleReporter, ReportFile

# ABANDON_GRACE is re-exported: the daemon adds it to the deadlines it tells the hook about.
from .scheduler import ABANDON_GRACE as ABANDON_GRACE
from .scheduler import Clock, Scheduler
from .state import BatchedStateWriter, PausedApps, StateFile
from .watchdog import Watchdog

THAWED, FREEZING, FROZEN, THAWING = "thawed", "freezing", "frozen", "thawing"


@dataclass
class CycleReport:
    op: str  # freeze or thaw
    cycle: str
    reason: str  # request, watchdog, shutdown, agent, retry
    ok: bool = True
    state: str = THAWED
    apps: list[AppOutcome] = field(default_factory=list)
    rollback: list[AppOutcome] = field(default_factory=list)
    error: QgafreezeError | None = None
    note: str = ""
    duration_ms: int = 0
    # Apps the phase had nothing to do for (thaw, rollback), each with the reason.
    skipped: list[AppOutcome] = field(default_factory=list)
    started_at: float = 0.0  # wall clock, for the cycle report
    rollback_at: float = 0.0  # when a failed freeze began to roll back; 0: it did not
    finished_at: float = 0.0
    # What the watchdog's thaw of the filesystems did; None: it did not run.
    filesystems: ThawResult | None = None
    filesystems_at: float = 0.0  # wall clock: a snapshot taken after this is not consistent

    def summary(self) -> dict[str, Any]:
        """The last cycle, as ``qgafreeze status`` shows it."""
        return {
            "op": self.op,
            "cycle": self.cycle,
            "reason": self.reason,
            "ok": self.ok,
            "duration_ms": self.duration_ms,
            "error": self.error.message if self.error else None,
            "apps": [o.to_dict() for o in self.apps + self.rollback],
        }


class EventSink(AppEvents, Protocol):
    """Where the engine reports; logs.py writes these to journald and the hook log."""

    def cycle_finished(self, report: CycleReport) -> None: ...


class Engine:
    def __init__(
        self,
        config: Config,
        plan: Plan,
        actions: Mapping[str, Action],
        events: EventSink,
        clock: Clock = time.monotonic,
        abandon_grace: float = ABANDON_GRACE,
        state_file: StateFile | None = None,
        report_file: ReportFile | None = None,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        fs_thawer: Callable[[], ThawResult] | None = None,
    ) -> None:
        self._events = events
        self._reporter = CycleReporter(events, report_file)
        self._clock = clock
        self._scheduler = Scheduler(clock, abandon_grace)
        self._state_file = state_file
        # app -> what to undo, per action; survives failed thaws so the next thaw retries
        self._paused = PausedApps()
        self._writer = (
            None if state_file is None else BatchedStateWriter(state_file, self._snapshot)
        )
        # Held for a whole cycle, or a retry of leftovers, which requests wait for.
        self._cycle_lock = CycleLock(lambda: self._config.settings.thaw_timeout + abandon_grace)
        self._retrier = Retrier(self._retry_leftovers, retry_delays, events.problem)
        self._state = THAWED
        self._cycle = ""
        self._frozen_at = 0.0  # wall clock, for status
        self._last: CycleReport | None = None
        # max_frozen; fs_thawer (fsthaw.thaw_all in the daemon, None: never) thaws the disks too
        self._watchdog = Watchdog(
            lambda: self._config.settings, self.thaw, events.problem, fs_thawer
        )
        self._configure(config, plan, actions)

    def _configure(self, config: Config, plan: Plan, actions: Mapping[str, Action]) -> None:
        self._config, self._plan, self._actions = config, plan, actions
        self._reporter.flag = config.settings.agent_state_file
        self._apps = AppRunner(
            config,
            plan,
            actions,
            self._reporter.losses,  # the runner reports through it, so lost sessions are noted
            self._paused,
            self._save,
            self._scheduler,
            self._clock,
        )

    # -- queries -------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def state(self) -> str:
        return self._state

    @property
    def cycle(self) -> str:
        return self._cycle

    @property
    def paused_apps(self) -> list[str]:
        return [app for app in self._plan.thaw.order if app in self._paused]

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "cycle": self._cycle,
            "frozen_since": self._frozen_at if self._state == FROZEN else None,
            "paused_apps": self.paused_apps,
            "watchdog_in_s": None
            if self._watchdog.at is None
            else max(0, round(self._watchdog.at - time.time())),
            "retry_in_s": self._retrier.due_in(),  # leftovers: the next retry
            "state_file_error": self._state_file.error if self._state_file else None,
            "apps": list(self._config.app_names),
            "last": None if self._last is None else self._last.summary(),
            **self._reporter.status(),
        }

    def reconfigure(self, config: Config, plan: Plan, actions: Mapping[str, Action]) -> None:
        """Take a new config, only between cycles with nothing paused (never mid-cycle)."""
        if not self._cycle_lock.acquire(blocking=False):
            raise Busy("a cycle is in progress; the new config was not applied, reload again later")
        try:
            if self._state != THAWED or self._paused:
                raise StateError(
                    f"state is {self._state} with paused apps {', '.join(self.paused_apps) or '-'};"
                    " the new config was not applied: thaw first, then reload"
                )
            self._configure(config, plan, actions)
        finally:
            self._cycle_lock.release()

    # -- cycles --------------------------------------------------------------------------------

    def freeze(self, reason: str = "request") -> CycleReport:
        retried = self._cycle_lock.take()
        if retried is None:
            raise Busy(f"a {self._state} cycle is in progress; try again when it ends")
        try:
            if self._state == FROZEN:
                raise StateError(
                    f"already frozen (cycle {self._cycle}); a second freeze is refused, thaw first"
                )
            if self._paused and not retried:  # leftovers: the re-check, unless a retry just was
                self._thaw(RETRY)
            if self._paused:
                last = self._last.error if self._last else None
                raise StateError(refusal(self.paused_apps, last.message if last else "?"))
            return self._freeze(reason)
        finally:
            self._cycle_lock.release()

    def thaw(self, reason: str = "request", wait: float = 0.0) -> CycleReport:
        """Resume what is paused.  ``wait`` > 0 waits that long for a running cycle to end."""
        if self._cycle_lock.take(wait) is None:
            raise Busy(f"a {self._state} cycle is in progress; try again when it ends")
        try:
            return self._thaw(reason)
        finally:
            self._cycle_lock.release()

    def _freeze(self, reason: str) -> CycleReport:
        started = self._clock()
        self._cycle = uuid.uuid4().hex[:12]
        self._state = FREEZING
        self._save()
        report = CycleReport(op="freeze", cycle=self._cycle, reason=reason, started_at=time.time())
        phase_deadline = started + self._config.settings.freeze_timeout

        def halts(outcome: AppOutcome) -> bool:
            return outcome.result in (FAILED, TIMEOUT) and (
                self._config.app(outcome.app).on_failure == "abort"
            )

        report.apps = self._apps.quiesce(report.cycle, phase_deadline, halts)
        # Skipped apps exist only after a halt or past the phase deadline: either way some app is
        # not quiesced, so the snapshot would not be consistent and the freeze must fail.
        abort = [o for o in report.apps if halts(o)] + [
            o for o in report.apps if o.result == SKIPPED
        ]
        if abort:
            report.ok = False
            report.error = _failure(abort[0], "freeze")
            self._state = THAWING
            report.rollback_at = time.time()
            report.rollback = self._apps.resume_paused(report.cycle, "rollback")
            self._state = THAWED
        else:
            self._state = FROZEN
            self._frozen_at = time.time()
            self._watchdog.arm(self._cycle)
        report.state = self._state
        report.duration_ms = elapsed_ms(self._clock() - started)
        report.finished_at = time.time()
        self._reporter.freeze_done(self._config, report)
        self._finish(report)
        return report

    def _thaw(self, reason: str) -> CycleReport:
        started = self._clock()
        self._watchdog.disarm()
        report = CycleReport(op="thaw", cycle=self._cycle, reason=reason, started_at=time.time())
        ends_cycle = self._state == FROZEN  # else nothing is frozen: no cycle to report on
        if reason == "watchdog" and ends_cycle:
            # The disks first: a stopped app's start (a database opening its files) would
            # otherwise hang on the frozen disk until its timeout.
            self._watchdog.thaw_disks(report)
        if not self._paused:
            report.note = "nothing to thaw: no app is paused"
            if self._state == FROZEN:  # every app was skipped or continued past a failure
                report.note = "no app needed resuming"
            self._state = THAWED
        else:
            self._state = THAWING
            report.apps = self._apps.resume_paused(report.cycle, "thaw")
            self._state = THAWED
            failed = [o for o in report.apps if o.result != OK]
            if failed:
                report.ok = False
                report.error = _failure(failed[0], "thaw")
        report.state = self._state
        report.duration_ms = elapsed_ms(self._clock() - started)
        report.finished_at = time.time()
        if ends_cycle:
            self._reporter.thaw_done(self._config, report)
        self._finish(report)
        return report

    def _finish(self, report: CycleReport) -> None:
        self._save()
        self._last = report
        self._events.cycle_finished(report)
        if self._state != THAWED or not self._paused:
            self._retrier.stop()  # nothing left over: no retry to run, or to show in status
        elif report.reason != RETRY:
            self._retrier.kick()  # leftovers: retried until they are back (a retry goes on)

    def _retry_leftovers(self) -> bool:
        """The retrier's attempt: resume what is left; True while something still is."""
        with self._cycle_lock.retry() as held:
            if held and self._state == THAWED and self._paused:
                self._thaw(RETRY)
            return not held or (self._state == THAWED and bool(self._paused))

    # -- state kept outside the process ----------------------------------------------------------

    def _save(self) -> None:
        """Write what is paused to the state file; called before anything is paused, and after
        every change.  tmpfs: this never waits on a frozen disk."""
        if self._writer is not None:
            self._writer.save()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "cycle": self._cycle,
            "frozen_at": self._frozen_at,
            "watchdog_at": self._watchdog.at,
            "paused": self._paused.copy(),
        }

    def recover(self, saved: Mapping[str, Any]) -> list[str]:
        """Take over the cycle a previous daemon left (it crashed or was killed).  Returns the
        paused apps; a thaw resumes them, and the watchdog keeps its original deadline."""
        paused = saved.get("paused") or {}
        known = {app: record for app, record in paused.items() if app in self._actions}
        for app in sorted(set(paused) - set(known)):
            self._events.problem(f"{app}: paused by the previous daemon but no longer configured")
        self._paused.replace(known)
        self._cycle = str(saved.get("cycle") or "")
        self._frozen_at = float(saved.get("frozen_at") or 0.0)
        if saved.get("state") == THAWED and self._paused:  # leftovers of a failed rollback
            self._retrier.kick()
        elif self._paused or saved.get("state") in (FREEZING, FROZEN, THAWING):
            self._state = FROZEN
            self._reporter.recovered = True
            watchdog_at = saved.get("watchdog_at")
            if isinstance(watchdog_at, (int, float)):
                self._watchdog.arm(self._cycle, max(0.0, watchdog_at - time.time()))
        self._save()
        return self.paused_apps


def _failure(outcome: AppOutcome, phase: str) -> QgafreezeError:
    if outcome.result == TIMEOUT:
        return ActionTimeout(f"{phase} of {outcome.app} timed out: {outcome.message}")
    return CycleFailed(phase, f"{phase} of {outcome.app} {outcome.result}: {outcome.message}")
