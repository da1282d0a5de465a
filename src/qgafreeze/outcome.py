"""What one app's part of a phase came to: the unit of every report, log line and status entry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import App

OK, FAILED, TIMEOUT, SKIPPED = "ok", "failed", "timeout", "skipped"


@dataclass(frozen=True)
class AppOutcome:
    app: str
    phase: str
    result: str  # ok, failed, timeout, skipped
    duration_ms: int
    message: str = ""
    output: tuple[str, ...] = ()
    units: tuple[str, ...] = ()  # the units the app declares, for logs
    actions: tuple[str, ...] = ()  # the kinds of action the app has, for logs
    # What its commands reported about the snapshot (qgafreeze-report lines), for the report.
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        app: App,
        phase: str,
        result: str,
        duration_ms: int,
        message: str = "",
        output: Sequence[str] = (),
        details: dict[str, Any] | None = None,
    ) -> AppOutcome:
        """The outcome of ``app``, naming its units and kinds of action as the config declares
        them: journald's fields for an app are the same whether it ran, timed out or was skipped.
        """
        return cls(
            app=app.name,
            phase=phase,
            result=result,
            duration_ms=duration_ms,
            message=message,
            output=tuple(output),
            units=app.units,
            actions=app.action_kinds,
            details=dict(details or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "phase": self.phase,
            "result": self.result,
            "duration_ms": self.duration_ms,
            "message": self.message,
            "output": list(self.output),
        }


def elapsed_ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))
