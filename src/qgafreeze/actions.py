"""What quiescing an app means, one class per kind of action.

An app is a sequence of actions: its ``freeze`` steps, its held session, its units, in that
order on freeze and in the reverse order on thaw (flush, then lock, then stop; start, then
unlock, then resume).  Each action notes what it must undo in ``ActionContext.record`` *before* it
pauses anything, so that rollback, thaw and crash recovery resume exactly what was paused,
including a unit whose stop was requested but timed out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from . import commands, details
from .actioncontext import Action, ActionContext, StepReport, raise_all
from .errors import ActionTimeout, CommandFailed, QgafreezeError
from .legacy import LEFTOVER_GRACE, LegacyHooksAction
from .model import LEGACY_APP, PROTECTED_UNITS, App, Session, Step, join_path
from .trust import session_problems, step_problems
from .units import UnitManager, UnitState

# "<app>" + this + "<status> while frozen...": the cycle report recognises a lost session by it.
SESSION_LOST = ": the held session exited with status "


class UnitsAction:
    """Stop (or cgroup-freeze) units on freeze; on thaw, resume only those that were running.

    Units that can start a service behind our back (its socket, path or timer units: Debian
    enables ``mariadb.socket``) are stopped first, or the first client to connect during the
    frozen window would restart the database on a frozen disk.  On thaw they are started first
    too: systemd refuses to start a socket whose service is already running, and a service
    started after its socket receives the socket's file descriptors, as at boot.  A frozen unit
    keeps its sockets: nothing can restart a service that is still there.
    """

    key = "units"

    def __init__(self, app: App, manager: UnitManager) -> None:
        self._units = app.units
        self._freeze = app.mode == "freeze"
        self._manager = manager

    def describe(self) -> list[str]:
        if self._freeze:
            return [f"freeze the processes of {', '.join(self._units)} (cgroup freezer)"]
        return [f"stop {', '.join(self._units)} (and the sockets, paths, timers that start them)"]

    def quiesce(self, ctx: ActionContext) -> None:
        states = [self._manager.unit_state(unit, ctx.deadline) for unit in self._units]
        running: list[str] = []
        for state in states:
            if state.is_running:
                running.append(state.name)
            else:
                ctx.output.append(
                    f"{state.name}: {state.active_state} before the freeze, left alone"
                )
        undo = ctx.undo(self.key)
        if self._freeze:
            if running and not ctx.cancelled.is_set():
                undo.extend(running)
                ctx.checkpoint()
                ctx.output.append(f"freezing {', '.join(running)}")
                self._manager.freeze(running, ctx.deadline)
                ctx.output.append(f"{', '.join(running)}: frozen")
            return
        triggers = self._running_triggers(states, ctx)
        for batch in (triggers, running):
            if not batch or ctx.cancelled.is_set():
                continue
            undo.extend(batch)  # before the stop: a timed-out stop must still be undone
            ctx.checkpoint()
            ctx.output.append(f"stopping {', '.join(batch)}")
            self._manager.stop(batch, ctx.deadline)
            ctx.output.append(f"{', '.join(batch)}: stopped")

    def _running_triggers(self, states: Sequence[UnitState], ctx: ActionContext) -> list[str]:
        names: list[str] = []
        for state in states:
            for trigger in state.triggered_by:
                if trigger in names or trigger in self._units:
                    continue
                if trigger in PROTECTED_UNITS:
                    ctx.output.append(f"{trigger}: needed by the freeze itself, left running")
                    continue
                names.append(trigger)
        return [name for name in names if self._manager.unit_state(name, ctx.deadline).is_running]

    def resume(self, ctx: ActionContext) -> None:
        undo = ctx.undo(self.key)
        if not undo:
            return
        if self._freeze:
            ctx.output.append(f"thawing {', '.join(undo)}")
            self._manager.thaw(list(undo), ctx.deadline)
            ctx.output.append(f"{', '.join(undo)}: thawed")
            undo.clear()
            return
        services = [u for u in reversed(undo) if u in self._units]
        triggers = [u for u in reversed(undo) if u not in self._units]
        failures: list[QgafreezeError] = []
        for batch in (triggers, services):
            if not batch:
                continue
            ctx.output.append(f"starting {', '.join(batch)}")
            try:
                self._manager.start(batch, ctx.deadline)
            except QgafreezeError as exc:  # still start the rest: better half restored than none
                ctx.output.append(f"start failed: {exc}")
                failures.append(exc)
            else:
                ctx.output.append(f"{', '.join(batch)}: started")
                for unit in batch:
                    undo.remove(unit)
        raise_all(failures)


class StepsAction:
    """The app's ``freeze`` steps on freeze, its ``thaw`` steps on thaw (after a freeze only)."""

    key = "steps"

    def __init__(self, app: App, manager: UnitManager) -> None:
        self._where = join_path("apps", app.name)
        self._freeze = app.freeze
        self._thaw = app.thaw
        self._manager = manager

    def describe(self) -> list[str]:
        lines = [f"freeze step: {s.describe()}" for s in self._freeze]
        return lines + [f"thaw step: {s.describe()}" for s in self._thaw]

    def quiesce(self, ctx: ActionContext) -> None:
        # Marked first: thaw steps undo whatever part of the freeze steps ran.
        ctx.undo(self.key).append("freeze steps started")
        ctx.checkpoint()
        for index, step in enumerate(self._freeze):
            if ctx.cancelled.is_set():
                return
            self._run(index, step, "freeze", ctx)

    def resume(self, ctx: ActionContext) -> None:
        undo = ctx.undo(self.key)
        if not undo:
            return
        failures: list[QgafreezeError] = []
        for index, step in enumerate(self._thaw):
            try:
                self._run(index, step, "thaw", ctx)
            except QgafreezeError as exc:  # the other thaw steps still run
                failures.append(exc)
        raise_all(failures)
        undo.clear()

    def _run(self, index: int, step: Step, phase: str, ctx: ActionContext) -> None:
        # Checked again as it is about to run: a file may have changed since the config was loaded.
        refused = step_problems(f"{self._where}.{phase}[{index}]", step)
        if refused:
            raise CommandFailed("; ".join(refused))
        started = time.time()
        what = step.describe()
        if step.kind == "signal":
            for unit in step.units:
                self._manager.kill(unit, step.whom, step.signal, ctx.deadline)
            ctx.output.append(f"sent {step.signal_name} to {', '.join(step.units)}")
            ctx.step(StepReport("signal", what, phase, started, 0, ()))
            return
        deadline = ctx.deadline
        if step.timeout:
            deadline = min(deadline, time.monotonic() + step.timeout)
        label = step.argv[2] if step.kind == "shell" else " ".join(step.argv)
        try:
            outcome = commands.run(
                step.argv, deadline, step.user, step.env, step.cwd, ctx.environment()
            )
        except ActionTimeout as exc:
            ctx.step(StepReport(step.kind, label, phase, started, 124, ()))
            raise ActionTimeout(f"{label}: {exc.message}") from None
        # The output goes to the step's own block in the hook log, not again into the app's.
        ctx.output.append(f"{label}: exit status {outcome.status}")
        ctx.step(StepReport(step.kind, label, phase, started, outcome.status, outcome.output))
        _collect(outcome.reports, ctx, label)
        if outcome.status != 0:
            raise CommandFailed(f"{label} exited with status {outcome.status}")


class SessionAction:
    """A process held open from freeze to thaw: a database client holding a lock.

    Its ``open`` text is written to its stdin at freeze, and the freeze goes on once its output
    shows ``ready``; at thaw ``close`` is written, stdin closed, and it must exit.  If it dies in
    between, the lock it held was released while frozen: that is logged at once, and the thaw
    reports it, because the snapshot may then not be application-consistent.
    """

    key = "session"

    def __init__(self, app: App, session: Session) -> None:
        self._app = app.name
        self._where = join_path("apps", app.name) + ".session"
        self._session = session
        self._held: commands.HeldSession | None = None
        self._reported = 0  # how many of its report lines are in the details already

    def describe(self) -> list[str]:
        who = f" as {self._session.user}" if self._session.user else ""
        return [
            f"hold a session: {' '.join(self._session.argv)}{who}, ready when the output"
            f" matches {self._session.ready!r}; closed on thaw"
        ]

    def quiesce(self, ctx: ActionContext) -> None:
        undo = ctx.undo(self.key)

        def on_exit(status: int) -> None:
            ctx.problem(
                f"{self._app}{SESSION_LOST}{status} while frozen:"
                " its lock is gone, the snapshot may not be application-consistent"
            )

        refused = session_problems(self._where, self._session)  # again: files change after load
        if refused:
            raise CommandFailed("; ".join(refused))
        started = time.time()
        held = commands.HeldSession(
            self._session.argv,
            self._session.user,
            self._session.env,
            self._session.cwd,
            on_exit,
            ctx.environment(),
        )
        undo.append(held.pid)
        ctx.checkpoint()
        self._held = held
        try:
            held.send(self._session.open, ctx.deadline)
            held.wait_for(self._session.ready, ctx.deadline)
        except QgafreezeError:
            ctx.output.extend(held.output())
            held.kill()
            self._held = None
            undo.clear()
            raise
        self._reported = 0  # a new session: the last cycle's count is not this one's
        self._reported = self._report(held, ctx)
        ctx.output.append(f"session {held.pid} ready: {' '.join(self._session.argv)}")
        ctx.step(StepReport("session", " ".join(self._session.argv), "freeze", started, 0, ()))

    def resume(self, ctx: ActionContext) -> None:
        undo = ctx.undo(self.key)
        if not undo:
            return
        held = self._held
        if held is None:
            pid = undo[0]  # the message names it, and the clear empties the list
            undo.clear()
            raise CommandFailed(
                f"the session (pid {pid}) is no longer ours: was the daemon restarted?"
            )
        started = time.time()
        died = held.returncode
        try:
            status = held.finish(self._session.close, ctx.deadline)
        finally:
            self._held = None
            undo.clear()
            ctx.output.extend(held.output())
            self._report(held, ctx)
        ctx.step(StepReport("session", " ".join(self._session.argv), "thaw", started, status, ()))
        if died is not None:
            raise CommandFailed(
                f"the held session had exited with status {died} before the thaw: its lock was"
                " released while frozen; the snapshot may not be application-consistent"
            )
        if status != 0:
            raise CommandFailed(f"the session exited with status {status} on close")
        ctx.output.append("session closed")

    def _report(self, held: commands.HeldSession, ctx: ActionContext) -> int:
        """Collect the report lines it printed since the last call; how many it has printed."""
        reports = held.reports()
        _collect(reports[self._reported :], ctx, "session")
        return len(reports)


def _collect(reports: Sequence[str], ctx: ActionContext, source: str) -> None:
    def problem(message: str) -> None:
        ctx.output.append(message)
        ctx.problem(message)

    details.collect(reports, ctx.details, problem, source)


class AppActions:
    """An app's actions in freeze order; thaw runs them in reverse and goes on past failures."""

    def __init__(self, actions: Sequence[Action]) -> None:
        self._actions = list(actions)

    def describe(self) -> list[str]:
        return [line for action in self._actions for line in action.describe()]

    def quiesce(self, ctx: ActionContext) -> None:
        for action in self._actions:
            if ctx.cancelled.is_set():
                return
            action.quiesce(ctx)

    def resume(self, ctx: ActionContext) -> None:
        failures: list[QgafreezeError] = []
        for action in reversed(self._actions):
            try:
                action.resume(ctx)
            except QgafreezeError as exc:
                failures.append(exc)
        raise_all(failures)


def build_app(
    app: App, manager: UnitManager, legacy_timeout: float, leftover_grace: float = LEFTOVER_GRACE
) -> Action:
    if app.name == LEGACY_APP and app.legacy_hooks:
        return LegacyHooksAction(app.legacy_hooks, legacy_timeout, leftover_grace)
    actions: list[Action] = []
    if app.freeze or app.thaw:
        actions.append(StepsAction(app, manager))
    if app.session is not None:
        actions.append(SessionAction(app, app.session))
    if app.units:
        actions.append(UnitsAction(app, manager))
    return actions[0] if len(actions) == 1 else AppActions(actions)


def build_actions(
    apps: Sequence[App],
    manager: UnitManager,
    legacy_timeout: float = 30.0,
    leftover_grace: float = LEFTOVER_GRACE,
) -> dict[str, Action]:
    """``leftover_grace``: how long what a legacy script left running may take to end by itself
    after the thaw scripts (tests shorten it)."""
    return {app.name: build_app(app, manager, legacy_timeout, leftover_grace) for app in apps}
