"""In-memory stand-ins for unit tests of pure logic.  The real ones are tested in the container."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

from qgafreeze.actioncontext import StepReport
from qgafreeze.engine import CycleReport
from qgafreeze.errors import ActionTimeout, UnitError, UnitNotFound
from qgafreeze.outcome import AppOutcome
from qgafreeze.units import UnitState


@dataclass
class FakeSystemd:
    """A unit table with scripted behaviour: delays, failures, hangs, and gates between units.

    ``gates`` maps a unit to an Event that its stop waits for (bounded by the deadline): tests use
    it to prove two stops overlap without measuring time.
    """

    active: dict[str, str]  # unit -> ActiveState
    triggers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fail_stop: set[str] = field(default_factory=set)
    fail_start: set[str] = field(default_factory=set)
    hang_stop: set[str] = field(default_factory=set)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)  # ("stop"|"start"|"stopped"|..., unit)
    started_stop: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_stop: Callable[[Sequence[str]], None] | None = None  # sees each stop before it happens

    def unit_state(self, unit: str, deadline: float) -> UnitState:
        if unit not in self.active:
            raise UnitNotFound(f"{unit}: no such unit")
        return UnitState(unit, "loaded", self.active[unit], "", self.triggers.get(unit, ()))

    def _record(self, what: str, unit: str) -> None:
        with self.lock:
            self.log.append((what, unit))

    def stop(self, units: Sequence[str], deadline: float) -> None:
        if self.on_stop is not None:
            self.on_stop(units)
        for unit in units:
            self._record("stop", unit)
            self.started_stop.setdefault(unit, threading.Event()).set()
        for unit in units:
            if unit in self.hang_stop:
                time.sleep(max(0.0, deadline - time.monotonic()))
                raise ActionTimeout(f"{unit}: stop did not finish in time")
            gate = self.gates.get(unit)
            if gate is not None and not gate.wait(max(0.0, deadline - time.monotonic())):
                raise ActionTimeout(f"{unit}: stop did not finish in time (gate)")
            if unit in self.fail_stop:
                raise UnitError(f"{unit}: stop job finished with result 'failed'")
            self.active[unit] = "inactive"
            self._record("stopped", unit)

    def start(self, units: Sequence[str], deadline: float) -> None:
        failures = []
        for unit in units:
            self._record("start", unit)
            if unit in self.fail_start:
                failures.append(f"{unit}: start job finished with result 'failed'")
                continue
            self.active[unit] = "active"
            self._record("started", unit)
        if failures:
            raise UnitError("; ".join(failures))

    def freeze(self, units: Sequence[str], deadline: float) -> None:
        for unit in units:
            self._record("freeze", unit)
            self.active[unit] = "active (frozen)"

    def thaw(self, units: Sequence[str], deadline: float) -> None:
        for unit in units:
            self._record("thaw", unit)
            self.active[unit] = "active"

    def kill(self, unit: str, whom: str, signal: int, deadline: float) -> None:
        if unit not in self.active:
            raise UnitNotFound(f"{unit}: no such unit")
        self._record(f"kill {signal} {whom}", unit)

    def calls(self, what: str) -> list[str]:
        with self.lock:
            return [unit for kind, unit in self.log if kind == what]


@dataclass
class RecordingEvents:
    """engine.EventSink that keeps everything in memory."""

    started: list[tuple[str, str, str]] = field(default_factory=list)
    finished: list[AppOutcome] = field(default_factory=list)
    cycles: list[CycleReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    steps: list[tuple[str, StepReport]] = field(default_factory=list)
    cycle_done: threading.Event = field(default_factory=threading.Event)

    def app_started(self, cycle: str, phase: str, app: str) -> None:
        self.started.append((cycle, phase, app))

    def app_finished(self, cycle: str, outcome: AppOutcome) -> None:
        self.finished.append(outcome)

    def cycle_finished(self, report: CycleReport) -> None:
        self.cycles.append(report)
        self.cycle_done.set()

    def problem(self, message: str, cycle: str = "", detail: str = "") -> None:
        self.problems.append(message)

    def step_finished(self, cycle: str, app: str, report: StepReport) -> None:
        self.steps.append((app, report))
