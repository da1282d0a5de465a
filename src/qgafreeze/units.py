"""What the rest of qgafreeze knows about systemd units: plain data and a protocol.

systemd_manager.py implements ``UnitManager`` over D-Bus; unit tests implement it in memory.
Keeping the protocol here lets actions and the engine be tested without a bus or GLib.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

from .errors import BusError


@dataclass(frozen=True)
class UnitState:
    name: str
    load_state: str  # loaded, not-found, masked, error, ...
    active_state: str  # active, inactive, failed, activating, deactivating, reloading
    sub_state: str
    triggered_by: tuple[str, ...] = ()  # sockets, paths and timers that can start this unit

    @property
    def is_running(self) -> bool:
        """Whether stopping would change anything: every state but stopped counts as running."""
        return self.active_state not in ("inactive", "failed")


class UnitManager(Protocol):
    """Blocking calls bounded by ``deadline`` (time.monotonic()); failures are QgafreezeErrors."""

    def unit_state(self, unit: str, deadline: float) -> UnitState: ...

    def stop(self, units: Sequence[str], deadline: float) -> None: ...

    def start(self, units: Sequence[str], deadline: float) -> None: ...

    def freeze(self, units: Sequence[str], deadline: float) -> None:
        """Pause every process of the units with the cgroup freezer (systemd 246+)."""
        ...

    def thaw(self, units: Sequence[str], deadline: float) -> None: ...

    def kill(self, unit: str, whom: str, signal: int, deadline: float) -> None:
        """Send a signal to the unit's processes (whom: all, main or control)."""
        ...


class NoManager:
    """For building actions only to describe them (``qgafreeze check``): never talks to systemd."""

    def _refuse(self, *args: object) -> NoReturn:
        raise BusError("not connected to systemd (this is a dry run)")

    unit_state = start = stop = freeze = thaw = kill = _refuse
