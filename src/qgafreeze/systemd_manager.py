"""The systemd manager over the system bus.  The only module that imports pydbus or gi.

Named ``systemd_manager``, not ``systemd``, so that it is never mistaken for systemd-python's
``systemd`` package (``from systemd import journal`` in logs.py).

Jobs are asynchronous in systemd: StopUnit/StartUnit return a job object at once and the outcome
arrives later as a ``JobRemoved`` signal.  We keep a private bus connection (so our ``Subscribe``
is ours alone; pydbus' ``SystemBus()`` is shared), a GLib main loop in one thread that records
the JobRemoved of our jobs, and callers that each wait on an event of their own for their jobs,
bounded by their own deadline, never by the D-Bus call timeout alone.

Which JobRemoved signals are believed, and for which jobs, is ``systemd_jobs.JobBook``'s part.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import pydbus
from gi.repository import Gio, GLib

from .errors import ActionTimeout, BusError, UnitError, UnitNotFound
from .systemd_jobs import BUS_NAME, DBUS_NAME, JobBook
from .units import UnitState

MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
DBUS_PATH = "/org/freedesktop/DBus"

JOB_MODE = "replace"  # a start replaces a pending stop of the same unit, which rollback relies on
# The system bus caps the replies one connection may await (dbus-daemon's
# max_replies_per_connection, 128 by default); with hundreds of apps in parallel, calls beyond
# it fail with LimitsExceeded.  Stay well below it.
MAX_CALLS_IN_FLIGHT = 64

_NOT_FOUND_ERRORS = {"org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.systemd1.LoadFailed"}


class SystemdManager:
    """``units.UnitManager`` over D-Bus; errors are qgafreeze errors, never GLib.Error."""

    def __init__(
        self, address: str | None = None, connect_timeout: float = 10.0, jobs: JobBook | None = None
    ) -> None:
        address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS
        try:
            self._bus = pydbus.connect(address)
        except GLib.Error as exc:
            raise BusError(
                f"cannot connect to the system bus at {address}: {exc.message}"
            ) from None
        self._con: Gio.DBusConnection = self._bus.con
        self._in_flight = threading.BoundedSemaphore(MAX_CALLS_IN_FLIGHT)
        self._jobs = JobBook() if jobs is None else jobs
        self._context = GLib.MainContext.new()
        self._loop = GLib.MainLoop.new(self._context, False)
        subscribed = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(subscribed,), name="qgafreeze-dbus", daemon=True
        )
        self._thread.start()
        if not subscribed.wait(connect_timeout):
            raise BusError("the D-Bus signal loop did not start")
        try:
            self._learn_owner(_deadline(connect_timeout))
            # Without Subscribe, systemd does not emit JobRemoved to us.
            self._manager("Subscribe", "", (), "", _deadline(connect_timeout))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the signal loop and close the connection; calls fail with BusError after this.
        The daemon keeps its manager for life; a short-lived one must leave nothing behind."""
        self._loop.quit()
        self._thread.join(5)
        self._con.close_sync(None)

    def _run_loop(self, subscribed: threading.Event) -> None:
        # Signals are dispatched in the main context that is thread-default when subscribing.
        # No sender in either subscription: the handlers compare senders themselves (see the
        # module's docstring).  Both in one context, so they are handled in the order received:
        # the bus announces a new owner before anything the new owner sends.
        self._context.push_thread_default()
        jobs = self._jobs
        self._bus.subscribe(
            iface=DBUS_NAME,
            signal="NameOwnerChanged",
            object=DBUS_PATH,
            arg0=BUS_NAME,
            signal_fired=lambda sender, _p, _i, _s, args: jobs.owner_changed(sender, *args),
        )
        self._bus.subscribe(
            iface=MANAGER_IFACE,
            signal="JobRemoved",
            object=MANAGER_PATH,
            signal_fired=lambda sender, _p, _i, _s, args: jobs.job_removed(sender, *args),
        )
        subscribed.set()
        self._loop.run()

    def _learn_owner(self, deadline: float) -> None:
        """Who owns org.freedesktop.systemd1 now; asked after subscribing to its changes."""
        try:
            reply = self._con.call_sync(
                DBUS_NAME,
                DBUS_PATH,
                DBUS_NAME,
                "GetNameOwner",
                GLib.Variant("(s)", (BUS_NAME,)),
                GLib.VariantType.new("(s)"),
                Gio.DBusCallFlags.NONE,
                max(1, int((deadline - time.monotonic()) * 1000)),
                None,
            )
        except GLib.Error as exc:
            if Gio.DBusError.get_remote_error(exc) == "org.freedesktop.DBus.Error.NameHasNoOwner":
                return  # not there (yet): every JobRemoved is refused until the bus names it
            raise _translate(exc, "GetNameOwner", None) from None
        self._jobs.owner_replied(reply.unpack()[0])

    # -- the public calls --------------------------------------------------------------------

    def unit_state(self, unit: str, deadline: float) -> UnitState:
        # ListUnitsByNames loads the unit if needed and answers with its states and path at the
        # cost of a Get; GetAll serialises about a hundred properties in PID 1 (3 ms a unit here,
        # against 0.2 ms), time that systemd then lacks for the stop jobs it is running.
        (rows,) = self._manager(
            "ListUnitsByNames", "as", ([unit],), "a(ssssssouso)", deadline, unit
        )
        if not rows:  # systemd skips names it cannot parse; config.py refuses them first
            raise UnitNotFound(f"{unit}: systemd does not accept this unit name")
        _name, _description, load_state, active_state, sub_state, _following, path = rows[0][:7]
        if load_state == "not-found":
            raise UnitNotFound(f"{unit}: no such unit")
        return UnitState(
            name=unit,
            load_state=str(load_state),
            active_state=str(active_state),
            sub_state=str(sub_state),
            triggered_by=tuple(self._property(path, "TriggeredBy", deadline, unit)),
        )

    def stop(self, units: Sequence[str], deadline: float) -> None:
        self._run_jobs("StopUnit", "stop", units, deadline)

    def start(self, units: Sequence[str], deadline: float) -> None:
        self._run_jobs("StartUnit", "start", units, deadline)

    def freeze(self, units: Sequence[str], deadline: float) -> None:
        self._freezer("FreezeUnit", "frozen", units, deadline)

    def thaw(self, units: Sequence[str], deadline: float) -> None:
        self._freezer("ThawUnit", "running", units, deadline)

    def kill(self, unit: str, whom: str, signal: int, deadline: float) -> None:
        self._manager("KillUnit", "ssi", (unit, whom, signal), "", deadline, unit)

    def _freezer(self, method: str, wanted: str, units: Sequence[str], deadline: float) -> None:
        """FreezeUnit/ThawUnit answer once the cgroup freezer is done; check it says so."""
        failures = []
        for unit in units:
            try:
                self._manager(method, "s", (unit,), "", deadline, unit)
                # LoadUnit, not GetUnit: GetUnit fails for a unit that exists but is not loaded.
                (path,) = self._manager("LoadUnit", "s", (unit,), "o", deadline, unit)
                state = self._property(path, "FreezerState", deadline, unit)
            except UnitError as exc:
                if method != "ThawUnit" or not self._unfrozen(unit, deadline):
                    failures.append(_freezer_hint(exc.message))
                continue
            if state != wanted:
                failures.append(f"{unit}: FreezerState is {state!r} after {method}, not {wanted!r}")
        if failures:
            raise UnitError("; ".join(failures))

    def _unfrozen(self, unit: str, deadline: float) -> bool:
        """Whether a unit whose thaw was refused (UnitInactive; UnitBusy once its cgroup is gone)
        has nothing paused: stopped or OOM-killed while frozen, it counts as thawed."""
        try:
            (path,) = self._manager("LoadUnit", "s", (unit,), "o", deadline, unit)
            active = self._property(path, "ActiveState", deadline, unit)
            frozen = self._property(path, "FreezerState", deadline, unit)
        except UnitError:
            return False
        return active in ("inactive", "failed") or frozen == "running"

    def _run_jobs(self, method: str, verb: str, units: Sequence[str], deadline: float) -> None:
        """Queue one job per unit (so they run side by side), then wait for all of them."""
        jobs: dict[str, str] = {}
        failures: list[str] = []
        try:
            for unit in units:
                try:
                    job = self._start_job(method, "ss", (unit, JOB_MODE), deadline, unit)
                except UnitError as exc:
                    failures.append(str(exc))
                    continue
                jobs[job] = unit
        except BaseException:  # a timeout, the bus gone: the jobs made are waited for by nobody
            self._jobs.forget(jobs)
            raise
        results = self._jobs.wait(jobs, deadline, verb)
        for job, unit in jobs.items():
            if results[job] != "done":
                failures.append(f"{unit}: {verb} job finished with result '{results[job]}'")
        if failures:
            raise UnitError("; ".join(failures))

    # -- the two kinds of D-Bus call, and the one place that sends them ------------------------

    def _manager(
        self,
        method: str,
        signature: str,
        args: tuple[Any, ...],
        reply: str,
        deadline: float,
        unit: str | None = None,
    ) -> tuple[Any, ...]:
        """Call ``method`` of the manager with ``args`` typed by ``signature``; "" is no reply."""
        return self._call(
            MANAGER_PATH, MANAGER_IFACE, method, signature, args, reply, deadline, unit
        )

    def _property(self, path: str, name: str, deadline: float, unit: str) -> Any:
        """One property of the unit object at ``path`` (one Get: see unit_state on GetAll)."""
        (value,) = self._call(
            path, PROPERTIES_IFACE, "Get", "ss", (UNIT_IFACE, name), "v", deadline, unit
        )
        return value

    def _call(
        self,
        path: str,
        iface: str,
        method: str,
        signature: str,
        args: tuple[Any, ...],
        reply: str,
        deadline: float,
        unit: str | None,
    ) -> tuple[Any, ...]:
        if not self._in_flight.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ActionTimeout(f"{unit or method}: the bus was busy until the deadline")
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise ActionTimeout(f"{unit or method}: deadline passed before {method} was sent")
            result = self._con.call_sync(
                BUS_NAME,
                path,
                iface,
                method,
                GLib.Variant(f"({signature})", args) if signature else None,
                GLib.VariantType.new(f"({reply})") if reply else None,
                Gio.DBusCallFlags.NONE,
                max(1, int(remaining * 1000)),
                None,
            )
        except GLib.Error as exc:
            raise _translate(exc, method, unit) from None
        finally:
            self._in_flight.release()
        return tuple(result.unpack()) if result is not None else ()

    def _start_job(
        self, method: str, signature: str, args: tuple[Any, ...], deadline: float, unit: str
    ) -> str:
        """Call a manager method that creates a job; ``self._jobs.wait`` for it then."""
        return self._jobs.create(
            lambda: str(self._manager(method, signature, args, "o", deadline, unit)[0])
        )


def _freezer_hint(message: str) -> str:
    lowered = message.lower()
    if "unknownmethod" in lowered or "unknown method" in lowered or "not supported" in lowered:
        return (
            f"{message} (mode: freeze needs systemd 246 or later and the unified cgroup"
            " hierarchy, cgroup v2; use mode: stop on this system)"
        )
    return message


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def _translate(exc: GLib.Error, method: str, unit: str | None) -> Exception:
    name = Gio.DBusError.get_remote_error(exc) or ""
    # GDBus puts "GDBus.Error:NAME: " before the remote message.  Gio.DBusError.strip_remote_error
    # cannot remove it: PyGObject hands it a copy of the error, and exc.message stays as it was.
    prefix = f"GDBus.Error:{name}: "
    message = exc.message[len(prefix) :] if name and exc.message.startswith(prefix) else exc.message
    what = unit or method
    if name in _NOT_FOUND_ERRORS:
        return UnitNotFound(f"{what}: {message}")
    if exc.matches(Gio.io_error_quark(), Gio.IOErrorEnum.TIMED_OUT) or name.endswith(".NoReply"):
        return ActionTimeout(f"{what}: systemd did not answer {method} in time")
    if exc.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CLOSED) or name.endswith(".Disconnected"):
        return BusError(f"{what}: the system bus connection is closed")
    if name.startswith("org.freedesktop.systemd1.") or name.startswith(
        "org.freedesktop.DBus.Error"
    ):
        return UnitError(f"{what}: {method} refused: {message}")
    return BusError(f"{what}: {method} failed: {message}")
