"""What one app's part of a phase came to: the unit of every report, log line and status entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
