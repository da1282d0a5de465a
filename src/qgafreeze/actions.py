"""What quiescing an app means, one class per kind of action.

An action records what it must undo *before* it pauses anything, in ``ActionContext.restore``,
so that rollback, thaw and (later) crash recovery all resume exactly what was paused, including a
unit whose stop was requested but timed out.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .config import PROTECTED_UNITS, App
from .errors import QgafreezeError, UnitError
from .units import UnitManager, UnitState


@dataclass
class ActionContext:
    """One app's part of one phase."""

    deadline: float  # time.monotonic() by which the action must return
    restore: list[str]  # shared by the freeze and thaw of one cycle: what to resume
    output: list[str] = field(default_factory=list)  # lines for the hook log and journald
    cancelled: threading.Event = field(default_factory=threading.Event)


class Action(Protocol):
    def describe(self) -> list[str]:
        """Human lines for ``qgafreeze check``."""
        ...

    def quiesce(self, ctx: ActionContext) -> None: ...

    def resume(self, ctx: ActionContext) -> None: ...


class UnitsAction:
    """Stop units on freeze; start on thaw only those that were running before the freeze.

    Units that can start a service behind our back (its socket, path or timer units: Debian
    enables ``mariadb.socket``) are stopped first, or the first client to connect during the
    frozen window would restart the database on a frozen disk.  On thaw they are started first
    too: systemd refuses to start a socket whose service is already running, and a service
    started after its socket receives the socket's file descriptors, as at boot.
    """

    def __init__(self, app: App, manager: UnitManager) -> None:
        self._units = app.units
        self._manager = manager

    def describe(self) -> list[str]:
        return [
            f"stop {', '.join(self._units)} (and the sockets, paths and timers that start them)"
        ]

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
        triggers = self._running_triggers(states, ctx)

        for batch in (triggers, running):
            if not batch or ctx.cancelled.is_set():
                continue
            ctx.restore.extend(batch)  # before the stop: a timed-out stop must still be undone
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
        if not ctx.restore:
            ctx.output.append("nothing was stopped by the freeze; nothing to start")
            return
        services = [u for u in reversed(ctx.restore) if u in self._units]
        triggers = [u for u in reversed(ctx.restore) if u not in self._units]
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
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise UnitError("; ".join(str(f) for f in failures))


def build_actions(apps: Sequence[App], manager: UnitManager) -> dict[str, Action]:
    return {app.name: UnitsAction(app, manager) for app in apps}
