"""The one error hierarchy of qgafreeze, and the one table from error code to exit status.

Every error carries a stable ``code`` (used in socket replies, journald fields and tests) and a
human message.  ``qgafreeze`` and the hook exit with ``exit_status(code)`` whether the error was
raised in their own process or arrived in the daemon's reply; nothing prints a traceback.
Standard library only: the shim imports it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
EXIT_FORBIDDEN = 4
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130

# What each exit status means, for --help, the README and the man pages (checked by tests).
EXIT_MEANINGS = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "failure"),
    (EXIT_CONFIG, "invalid config"),
    (EXIT_UNREACHABLE, "daemon or bus unreachable"),
    (EXIT_FORBIDDEN, "forbidden"),
    (EXIT_USAGE, "usage"),
)


class QgafreezeError(Exception):
    """Base class: a failure that is explained to the user, never shown as a traceback."""

    code = "error"
    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(QgafreezeError):
    """The configuration cannot be used; ``problems`` lists every error with its place."""

    code = "config-invalid"
    exit_code = EXIT_CONFIG

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
    exit_code = EXIT_UNREACHABLE


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
    exit_code = EXIT_FORBIDDEN


class Unreachable(QgafreezeError):
    """The daemon's socket cannot be reached (client side)."""

    code = "unreachable"
    exit_code = EXIT_UNREACHABLE


class InstallError(QgafreezeError):
    code = "install-failed"


class CommandFailed(QgafreezeError):
    """A command, session or hook script an app runs failed or could not be started."""

    code = "command-failed"


class InternalError(QgafreezeError):
    """A bug: logged with its traceback in the journal, answered with this code."""

    code = "internal"


def all_errors() -> list[type[QgafreezeError]]:
    """Every class of the hierarchy, the base first."""
    found: list[type[QgafreezeError]] = [QgafreezeError]
    for cls in found:
        found.extend(c for c in cls.__subclasses__() if c not in found)
    return found


# Codes that are not one class's constant: CycleFailed names its phase.
PHASE_CODES = ("freeze-failed", "thaw-failed")


def all_codes() -> list[str]:
    codes = [c.code for c in all_errors() if c is not CycleFailed] + list(PHASE_CODES)
    return sorted(set(codes))


def exit_status(code: str | None) -> int:
    """The exit status for an error ``code``, wherever the error happened."""
    for cls in all_errors():
        if cls.code == code and cls is not QgafreezeError:
            return cls.exit_code
    return EXIT_FAILED
