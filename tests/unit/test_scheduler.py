"""The DAG runner's promises, in simulated time: who starts when, deadlines, halts, skips."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Mapping, Sequence
from typing import Callable

from qgafreeze.outcome import AppOutcome
from qgafreeze.scheduler import Phase, Scheduler

NEVER = float("inf")


class SimulatedTime:
    """The scheduler's clock, waiter and thread starter, with time that moves only while the
    scheduler waits.  A worker started at ``t`` runs (in a real thread, at once) when the clock
    reaches ``t`` plus the duration the test gave its app: until then it is "busy"."""

    def __init__(self, durations: Mapping[str, float]) -> None:
        self.now = 0.0
        self.durations = durations  # app -> seconds; absent: 0; NEVER: a worker that hangs
        self.started: dict[str, float] = {}  # app -> when its worker started
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()

    def clock(self) -> float:
        return self.now

    def start(self, name: str, target: Callable[[], None]) -> None:
        app = name.partition("-")[2]  # threads are named <label>-<app>
        self.started[app] = self.now
        due = self.now + self.durations.get(app, 0.0)
        heapq.heappush(self._due, (due, next(self._sequence), target))

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        if self._due and self._due[0][0] <= self.now + timeout:
            due, _, target = heapq.heappop(self._due)
            self.now = max(self.now, due)
            threading.Thread(target=target).start()
            condition.wait(5)  # the worker reports through the condition the caller holds
        else:
            self.now += timeout


def outcome_of(label: str) -> Callable[[str, str, int, str], AppOutcome]:
    def make(app: str, result: str, duration_ms: int, message: str) -> AppOutcome:
        return AppOutcome(app, label, result, duration_ms, message)

    return make


def ok(app: str, deadline: float, cancel: threading.Event) -> AppOutcome:
    return AppOutcome(app, "freeze", "ok", 0)


def run(
    order: Sequence[str],
    waits_for: Mapping[str, Sequence[str]] | None = None,
    durations: Mapping[str, float] | None = None,
    timeout: float = 30.0,
    timeouts: Mapping[str, float] | None = None,
    deadline: float = 60.0,
    grace: float = 2.0,
    work: Callable[[str, float, threading.Event], AppOutcome] = ok,
    halts: Callable[[AppOutcome], bool] = lambda outcome: outcome.result != "ok",
) -> tuple[list[AppOutcome], SimulatedTime, list[AppOutcome], list[tuple[str, str]]]:
    """Run one freeze phase in simulated time; returns the outcomes, the time, the apps reported
    as never started and the problems."""
    time = SimulatedTime(durations or {})
    not_started: list[AppOutcome] = []
    problems: list[tuple[str, str]] = []
    scheduler = Scheduler(clock=time.clock, abandon_grace=grace, wait=time.wait, start=time.start)
    outcomes = scheduler.run(
        Phase(
            label="freeze",
            order=order,
            waits_for={app: (waits_for or {}).get(app, ()) for app in order},
            deadline=deadline,
            timeout=lambda app: (timeouts or {}).get(app, timeout),
            work=work,
            make_outcome=outcome_of("freeze"),
            halts=halts,
            not_started=not_started.append,
            problem=lambda message, detail: problems.append((message, detail)),
        )
    )
    return outcomes, time, not_started, problems


def results(outcomes: list[AppOutcome]) -> dict[str, str]:
    return {o.app: o.result for o in outcomes}


def test_each_app_starts_as_soon_as_what_it_waits_for_is_done():
    # b waits for a (1 s); c is independent and slow (5 s): b starts at 1 s, not level by level
    # after c.
    outcomes, time, _, _ = run(
        ["a", "c", "b"], waits_for={"b": ["a"]}, durations={"a": 1.0, "c": 5.0}
    )
    assert time.started == {"a": 0.0, "c": 0.0, "b": 1.0}
    assert results(outcomes) == {"a": "ok", "c": "ok", "b": "ok"}


def test_an_app_waiting_for_two_starts_when_the_last_of_them_is_done():
    _, time, _, _ = run(["a", "b", "c"], waits_for={"c": ["a", "b"]}, durations={"a": 1, "b": 3})
    assert time.started["c"] == 3.0


def test_outcomes_come_back_in_plan_order_not_in_finishing_order():
    outcomes, _, _, _ = run(["slow", "fast"], durations={"slow": 2.0, "fast": 1.0})
    assert [o.app for o in outcomes] == ["slow", "fast"]


def test_each_app_is_given_its_own_timeout_capped_by_the_phase_deadline():
    deadlines: dict[str, float] = {}

    def work(app: str, deadline: float, cancel: threading.Event) -> AppOutcome:
        deadlines[app] = deadline
        return ok(app, deadline, cancel)

    run(["a", "b"], waits_for={"b": ["a"]}, durations={"a": 7.0}, timeout=5, deadline=10, work=work)
    assert deadlines == {"a": 5.0, "b": 10.0}  # b, started at 7, would have had until 12


def test_an_app_stuck_past_its_deadline_and_grace_is_reported_timeout_and_cancelled():
    # stuck may take 1 s, plus a grace of 2 s; its worker answers only at 4 s, and b keeps the
    # phase going until 10 s so that the late answer arrives while the scheduler still runs.
    cancelled_when_it_answered: list[bool] = []

    def work(app: str, deadline: float, cancel: threading.Event) -> AppOutcome:
        if app == "stuck":
            cancelled_when_it_answered.append(cancel.is_set())
        return ok(app, deadline, cancel)

    outcomes, time, _, problems = run(
        ["stuck", "b"],
        durations={"stuck": 4.0, "b": 10.0},
        timeouts={"stuck": 1.0},
        grace=2.0,
        work=work,
        halts=lambda outcome: False,
    )
    stuck = outcomes[0]
    assert (stuck.result, stuck.duration_ms) == ("timeout", 3000)
    assert stuck.message == "did not return by its deadline"
    assert cancelled_when_it_answered == [True]  # and its late "ok" was ignored
    assert ("stuck: freeze action abandoned past its deadline", "") in problems
    assert results(outcomes) == {"stuck": "timeout", "b": "ok"}
    assert time.now == 10.0


def test_a_phase_with_a_stuck_app_ends_when_the_app_is_abandoned():
    outcomes, time, _, _ = run(["stuck"], durations={"stuck": NEVER}, timeout=1.0, grace=0.5)
    assert results(outcomes) == {"stuck": "timeout"}
    assert time.now == 1.5


def test_an_abandoned_app_that_halts_stops_what_has_not_started():
    outcomes, time, not_started, _ = run(
        ["stuck", "after"], waits_for={"after": ["stuck"]}, durations={"stuck": NEVER}, timeout=1
    )
    assert results(outcomes) == {"stuck": "timeout", "after": "skipped"}
    assert outcomes[1].message == "not started: stuck failed and the freeze is aborted"
    assert "after" not in time.started


def test_apps_not_started_when_the_phase_deadline_passes_are_skipped_with_the_reason():
    # a finishes at 4 s, past the phase deadline (3 s) but within its grace: b never starts.
    outcomes, time, not_started, _ = run(
        ["a", "b"],
        waits_for={"b": ["a"]},
        durations={"a": 4.0},
        deadline=3.0,
        halts=lambda outcome: False,
    )
    assert results(outcomes) == {"a": "ok", "b": "skipped"}
    skipped = outcomes[1]
    assert skipped.message == "not started: the freeze phase deadline passed"
    assert (skipped.phase, skipped.duration_ms) == ("freeze", 0)
    assert not_started == [skipped]
    assert "b" not in time.started


def test_after_a_halting_outcome_nothing_new_starts():
    # a fails at 1 s; b (independent, 3 s) finishes; c (waits for a) and d (waits for b) never
    # start, though nothing failed on d's own path.
    def work(app: str, deadline: float, cancel: threading.Event) -> AppOutcome:
        return AppOutcome(app, "freeze", "failed" if app == "a" else "ok", 0, "")

    outcomes, time, not_started, _ = run(
        ["a", "b", "c", "d"],
        waits_for={"c": ["a"], "d": ["b"]},
        durations={"a": 1.0, "b": 3.0},
        work=work,
    )
    assert results(outcomes) == {"a": "failed", "b": "ok", "c": "skipped", "d": "skipped"}
    assert set(time.started) == {"a", "b"}
    assert time.now == 3.0  # what was running is waited for, not abandoned
    assert [o.message for o in not_started] == [
        "not started: a failed and the freeze is aborted",
        "not started: a failed and the freeze is aborted",
    ]


def test_an_outcome_that_does_not_halt_lets_the_rest_go_on():
    def work(app: str, deadline: float, cancel: threading.Event) -> AppOutcome:
        return AppOutcome(app, "freeze", "failed" if app == "a" else "ok", 0, "")

    outcomes, _, _, _ = run(
        ["a", "b"], waits_for={"b": ["a"]}, work=work, halts=lambda outcome: False
    )
    assert results(outcomes) == {"a": "failed", "b": "ok"}


def test_a_worker_that_raises_outside_its_action_fails_its_app_at_once():
    def work(app: str, deadline: float, cancel: threading.Event) -> AppOutcome:
        if app == "a":
            raise RuntimeError("injected")
        return ok(app, deadline, cancel)

    outcomes, time, _, problems = run(
        ["a", "b"], durations={"a": 1.0, "b": 1.0}, timeout=3600, work=work
    )
    assert results(outcomes) == {"a": "failed", "b": "ok"}
    assert outcomes[0].message == "internal error: RuntimeError('injected')"
    assert time.now == 1.0  # not the app's hour
    [(message, detail)] = problems
    assert message == "a: internal error"
    assert "RuntimeError: injected" in detail


def test_an_empty_phase_returns_nothing():
    outcomes, time, _, _ = run([])
    assert outcomes == [] and time.started == {}
