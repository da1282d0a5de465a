"""Each app's part of a phase: its actions run, what it must undo noted first, its outcome.

The engine decides which phase runs and when; the scheduler decides when each app starts and
when it is given up on; this runs an app's actions for the phase, keeps the paused table in step
with them (an app is entered before anything is paused, so a failure is always undone) and turns
what happened into the app's outcome.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import replace
from typing import Callable, Protocol

from .actioncontext import Action, ActionContext, StepReport, record_is_empty
from .errors import ActionTimeout, QgafreezeError
from .model import Config
from .outcome import FAILED, OK, TIMEOUT, AppOutcome, elapsed_ms
from .planner import PhasePlan, Plan, subset
from .scheduler import Clock, Phase, Scheduler
from .state import PausedApps, Record

# app, its deadline, its cancel flag, the cycle, the phase's label -> its outcome
AppStep = Callable[[str, float, threading.Event, str, str], AppOutcome]


class AppEvents(Protocol):
    """What the runner reports, app by app; part of the engine's EventSink."""

    def app_started(self, cycle: str, phase: str, app: str) -> None: ...

    def app_finished(self, cycle: str, outcome: AppOutcome) -> None: ...

    def step_finished(self, cycle: str, app: str, report: StepReport) -> None: ...

    def problem(self, message: str, cycle: str = "", detail: str = "") -> None: ...


class AppRunner:
    def __init__(
        self,
        config: Config,
        plan: Plan,
        actions: Mapping[str, Action],
        events: AppEvents,
        paused: PausedApps,
        save: Callable[[], None],
        scheduler: Scheduler,
        clock: Clock = time.monotonic,
    ) -> None:
        self._config = config
        self._plan = plan
        self._actions = actions
        self._events = events
        self._paused = paused
        self._save = save  # keeps the paused table outside the process
        self._scheduler = scheduler
        self._clock = clock

    def quiesce(
        self, cycle: str, deadline: float, halts: Callable[[AppOutcome], bool]
    ) -> list[AppOutcome]:
        """The freeze phase, over every app."""
        return self._run(self._plan.freeze, "freeze", cycle, deadline, self._quiesce_app, halts)

    def resume_paused(self, cycle: str, label: str) -> list[AppOutcome]:
        """Resume every paused app, in thaw order; ``label`` is thaw or rollback."""
        # The names are copied under the table's lock: an abandoned worker may still change it.
        phase = subset(self._plan.thaw, self._paused.names())
        deadline = self._clock() + self._config.settings.thaw_timeout
        return self._run(phase, label, cycle, deadline, self._resume_app)

    def _run(
        self,
        phase: PhasePlan,
        label: str,
        cycle: str,
        deadline: float,
        step: AppStep,
        halts: Callable[[AppOutcome], bool] | None = None,
    ) -> list[AppOutcome]:
        config, events = self._config, self._events

        def outcome(app: str, result: str, duration_ms: int, message: str) -> AppOutcome:
            return AppOutcome.of(config.app(app), label, result, duration_ms, message)

        spec = Phase(
            label=label,
            order=phase.order,
            waits_for=dict(phase.waits_for),
            deadline=deadline,
            timeout=lambda app: config.app(app).timeout,
            work=lambda app, app_deadline, cancel: step(app, app_deadline, cancel, cycle, label),
            make_outcome=outcome,
            not_started=lambda skipped: events.app_finished(cycle, skipped),
            problem=lambda message, detail: events.problem(message, cycle, detail),
        )
        # Without halts, the scheduler's default: nothing an app comes to stops the others.
        return self._scheduler.run(spec if halts is None else replace(spec, halts=halts))

    def _quiesce_app(
        self, app: str, deadline: float, cancel: threading.Event, cycle: str, phase: str
    ) -> AppOutcome:
        record = self._paused.add(app)  # before anything is paused, so a failure is always undone
        ctx = self._context(app, deadline, record, cancel, cycle)
        outcome = self._run_action(app, ctx, self._actions[app].quiesce, cycle, phase)
        if record_is_empty(record) and outcome.result == OK:
            self._paused.drop(app)  # nothing was paused (all its units were already stopped)
        self._save()
        return outcome

    def _resume_app(
        self, app: str, deadline: float, cancel: threading.Event, cycle: str, phase: str
    ) -> AppOutcome:
        ctx = self._context(app, deadline, self._paused.record(app), cancel, cycle)
        outcome = self._run_action(app, ctx, self._actions[app].resume, cycle, phase)
        # Paused means something is left to undo: a failure that left nothing (a session that
        # had died) is reported, not retried.
        if outcome.result == OK or record_is_empty(ctx.record):
            self._paused.drop(app)
        self._save()
        return outcome

    def _context(
        self, app: str, deadline: float, record: Record, cancel: threading.Event, cycle: str
    ) -> ActionContext:
        events = self._events
        return ActionContext(
            deadline=deadline,
            record=record,
            cancelled=cancel,
            step=lambda report: events.step_finished(cycle, app, report),
            problem=lambda message: events.problem(message, cycle),
            checkpoint=self._save,
            cycle=cycle,
        )

    def _run_action(
        self,
        app: str,
        ctx: ActionContext,
        step: Callable[[ActionContext], None],
        cycle: str,
        phase: str,
    ) -> AppOutcome:
        self._events.app_started(cycle, phase, app)
        started = self._clock()
        result, message = OK, ""
        try:
            step(ctx)
        except ActionTimeout as exc:
            result, message = TIMEOUT, exc.message
        except QgafreezeError as exc:
            result, message = FAILED, exc.message
        except Exception as exc:  # a bug must fail one app, not the cycle or the daemon
            result, message = FAILED, f"internal error: {exc!r}"
            self._events.problem(f"{app}: internal error", cycle, traceback.format_exc())
        duration_ms = elapsed_ms(self._clock() - started)
        outcome = AppOutcome.of(
            self._config.app(app), phase, result, duration_ms, message, ctx.output, ctx.details
        )
        self._events.app_finished(cycle, outcome)
        return outcome
