"""What the engine and an action exchange: the context of one app's part of one phase, the report
of each command it ran, and how several failures become one.

Standard library only, like ``legacy``, which implements an action and is imported by install.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .errors import ActionTimeout, QgafreezeError


@dataclass(frozen=True)
class StepReport:
    """One command's run, for the hook log's execute/finished pair and journald."""

    kind: str  # exec, shell, signal, session, legacy
    what: str  # the command or script, as the hook log names it
    phase: str
    started: float  # wall clock
    status: int
    output: tuple[str, ...]


def _ignore_step(report: StepReport) -> None:
    pass


def _ignore_problem(message: str) -> None:
    pass


def _no_checkpoint() -> None:
    pass


@dataclass
class ActionContext:
    """One app's part of one phase."""

    deadline: float  # time.monotonic() by which the action must return
    # What to undo, per action, shared by the freeze and the thaw of one cycle.  Plain data
    # (strings, numbers), so it can be kept outside the process.
    record: dict[str, list[Any]]
    output: list[str] = field(default_factory=list)  # lines for the hook log and journald
    cancelled: threading.Event = field(default_factory=threading.Event)
    step: Callable[[StepReport], None] = _ignore_step
    problem: Callable[[str], None] = _ignore_problem
    # Saves the record outside the process; called after noting what to undo, before pausing.
    checkpoint: Callable[[], None] = _no_checkpoint
    cycle: str = ""  # the cycle's id, given to commands as QGAFREEZE_CYCLE
    # What its commands said about the snapshot (``details``), for the app's cycle report entry.
    details: dict[str, Any] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        """Variables the daemon sets for the commands it runs (the config's env wins)."""
        return {"QGAFREEZE_CYCLE": self.cycle} if self.cycle else {}

    def undo(self, key: str) -> list[Any]:
        return self.record.setdefault(key, [])


class Action(Protocol):
    def describe(self) -> list[str]:
        """Human lines for ``qgafreeze check``, in the order they run on freeze."""
        ...

    def quiesce(self, ctx: ActionContext) -> None: ...

    def resume(self, ctx: ActionContext) -> None: ...


def raise_all(failures: list[QgafreezeError]) -> None:
    if len(failures) == 1:
        raise failures[0]
    if failures:
        if all(isinstance(f, ActionTimeout) for f in failures):
            raise ActionTimeout("; ".join(f.message for f in failures))
        raise QgafreezeError("; ".join(f.message for f in failures))


def record_is_empty(record: dict[str, list[Any]]) -> bool:
    return not any(record.values())
