"""The one error hierarchy of qgafreeze.

Every error carries a stable ``code`` (used in socket replies, journald fields and tests) and a
human message.  The CLI maps the classes to exit codes; nothing below it prints tracebacks.
"""

from __future__ import annotations


class QgafreezeError(Exception):
    """Base class: a failure that is explained to the user, never shown as a traceback."""

    code = "error"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(QgafreezeError):
    """The configuration cannot be used; ``problems`` lists every error with its place."""

    code = "config-invalid"
    exit_code = 2

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} error(s)\n{lines}")


class UnitError(QgafreezeError):
    """systemd refused or failed an operation on a unit."""

    code = "unit-failed"


class UnitNotFound(UnitError):
    code = "unit-not-found"


class ActionTimeout(QgafreezeError):
    code = "timeout"


class BusError(QgafreezeError):
    """The system bus or the systemd manager cannot be reached."""

    code = "bus-unavailable"
    exit_code = 3


class CycleFailed(QgafreezeError):
    """An app failed during a phase; ``code`` says which phase (freeze-failed, thaw-failed)."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(message)
        self.code = f"{phase}-failed"


class StateError(QgafreezeError):
    """A request that the current state does not allow (a freeze while frozen, for one)."""

    code = "bad-state"


class Busy(QgafreezeError):
    """Another cycle is running; requests are never queued behind it."""

    code = "busy"


class ProtocolError(QgafreezeError):
    """A malformed, oversized, unknown or stalled request."""

    code = "bad-request"


class Forbidden(QgafreezeError):
    code = "forbidden"
    exit_code = 4


class Unreachable(QgafreezeError):
    """The daemon's socket cannot be reached (client side)."""

    code = "unreachable"
    exit_code = 3


class InstallError(QgafreezeError):
    code = "install-failed"
