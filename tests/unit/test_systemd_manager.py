"""SystemdManager against python-dbusmock's ``systemd`` template on a private bus.

The template fakes a manager whose StartUnit/StopUnit end their jobs with ``done``, and unit
objects.  What it lacks and SystemdManager calls (Subscribe, LoadUnit, ListUnitsByNames,
FreezeUnit, ThawUnit, KillUnit, the unit properties we read) is added here through dbusmock's own
API, answering as systemd does; a fault (a failed job, a job that never ends, a slow or refused
call) is one method replaced for one test.  The container tier runs the same calls against the
real systemd.

Needs python3-dbusmock, python3-pydbus and dbus-daemon (``make deps``): without them these tests
skip, which under CI=true fails them (conftest.py).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from qgafreeze.errors import ActionTimeout, BusError, UnitError, UnitNotFound
from qgafreeze.systemd_jobs import JobBook
from qgafreeze.units import UnitState

if TYPE_CHECKING:  # imported by the fixture below, once pydbus is known to be there
    from qgafreeze.systemd_manager import SystemdManager

MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
NEEDS = "needs python3-dbusmock, python3-pydbus and dbus-daemon (make deps)"

# Snippets run inside the mock for a call: ``args`` are the call's arguments, ``self`` is the
# manager object (``self.units``: name -> object path, kept by the template), ``objects`` maps
# paths to mock objects, ``ret`` is the reply.
UNKNOWN_UNIT_IS_NO_SUCH_UNIT = """
if args[0] not in self.units:
    raise dbus.exceptions.DBusException(
        'Unit %s not loaded.' % args[0], name='org.freedesktop.systemd1.NoSuchUnit')
"""
LIST_UNITS_BY_NAMES = """
ret = []
for name in args[0]:
    path = self.units.get(name)
    if path is None:  # systemd answers for any valid name; the unit is just not found
        ret.append((name, '', 'not-found', 'inactive', 'dead', '',
                    '/org/freedesktop/systemd1/unit/none', 0, '', '/'))
        continue
    unit = objects[path].props['org.freedesktop.systemd1.Unit']
    ret.append((name, unit['Description'], unit['LoadState'], unit['ActiveState'],
                unit['SubState'], '', path, 0, '', '/'))
"""


def set_freezer_state(state: str) -> str:
    return UNKNOWN_UNIT_IS_NO_SUCH_UNIT + (
        f"unit = objects[self.units[args[0]]]\n"
        f"unit.UpdateProperties({UNIT_IFACE!r}, {{'FreezerState': {state!r}}})\n"
    )


def job_that_ends_with(result: str | None) -> str:
    """A StopUnit/StartUnit whose job ends with ``result`` (None: never ends).

    JobRemoved is sent before the reply here, as systemd may do for a job that ends at once
    (the template sends it after): SystemdManager must keep it for the caller still waiting.
    """
    code = UNKNOWN_UNIT_IS_NO_SUCH_UNIT + textwrap.dedent("""
        job_id = self.next_job_id
        self.next_job_id += 1
        ret = '/org/freedesktop/systemd1/job/%d' % job_id
    """)
    if result is not None:
        code += (
            f"self.EmitSignal({MANAGER_IFACE!r}, 'JobRemoved', 'uoss',"
            f" [job_id, ret, args[0], {result!r}])\n"
        )
    return code


def job_at(path: str) -> str:
    """A StopUnit/StartUnit that creates the job ``path`` and leaves its end to the test."""
    return UNKNOWN_UNIT_IS_NO_SUCH_UNIT + f"ret = {path!r}\n"


class FakeSystemd:
    """The remote control of the mock: units, replaced methods, and the calls it received."""

    def __init__(self, address: str, timeout: float) -> None:
        import dbus
        import dbusmock

        self._dbus = dbus
        self._bus = dbus.bus.BusConnection(address)
        # Wait for the mock to own the name before asking for its object: asking first would
        # have the bus start the host's own service of that name.
        end = time.monotonic() + timeout
        while not self._bus.name_has_owner("org.freedesktop.systemd1"):
            assert time.monotonic() < end, "dbusmock's systemd did not appear on the bus"
            time.sleep(0.02)
        self._mock = dbus.Interface(
            self._bus.get_object("org.freedesktop.systemd1", "/org/freedesktop/systemd1"),
            dbusmock.MOCK_IFACE,
        )
        self._mock_iface = dbusmock.MOCK_IFACE
        # This connection runs no main loop, so it answers no Peer.Ping.
        self.name = str(self._bus.get_unique_name())

    def reset(self) -> None:
        """Back to the bare template, then add what systemd answers and the template does not."""
        self._mock.Reset()
        self._mock.ClearCalls()
        self.answer("Subscribe", "", "", "")
        self.answer(
            "LoadUnit", "s", "o", UNKNOWN_UNIT_IS_NO_SUCH_UNIT + "ret = self.units[args[0]]"
        )
        self.answer("ListUnitsByNames", "as", "a(ssssssouso)", LIST_UNITS_BY_NAMES)
        self.answer("FreezeUnit", "s", "", set_freezer_state("frozen"))
        self.answer("ThawUnit", "s", "", set_freezer_state("running"))
        self.answer("KillUnit", "ssi", "", UNKNOWN_UNIT_IS_NO_SUCH_UNIT)

    def answer(self, method: str, in_sig: str, out_sig: str, code: str) -> None:
        self._mock.AddMethod(MANAGER_IFACE, method, in_sig, out_sig, code)

    def add_unit(
        self,
        name: str,
        active_state: str = "active",
        sub_state: str = "running",
        triggered_by: tuple[str, ...] = (),
    ) -> None:
        """A loaded unit (the template's AddMockUnit) with the properties systemd gives it."""
        self._mock.AddMockUnit(name)
        path = self._mock.GetUnit(name, dbus_interface=MANAGER_IFACE)
        unit = self._dbus.Interface(
            self._bus.get_object("org.freedesktop.systemd1", path), self._mock_iface
        )
        unit.UpdateProperties(UNIT_IFACE, {"ActiveState": active_state})
        unit.AddProperties(
            UNIT_IFACE,
            {
                "SubState": sub_state,
                "Description": f"the {name} unit",
                "TriggeredBy": self._dbus.Array(triggered_by, signature="s"),
                "FreezerState": "running",
            },
        )

    def set_unit(self, name: str, **properties: str) -> None:
        """Change properties of a unit, as systemd does when the unit changes state."""
        path = self._mock.GetUnit(name, dbus_interface=MANAGER_IFACE)
        unit = self._dbus.Interface(
            self._bus.get_object("org.freedesktop.systemd1", path), self._mock_iface
        )
        unit.UpdateProperties(UNIT_IFACE, properties)

    def calls(self, method: str) -> list[tuple[Any, ...]]:
        return [tuple(args) for _when, args in self._mock.GetMethodCalls(method)]

    def job_removed(self, job: str, unit: str, result: str) -> None:
        """systemd itself (the owner of its name) announces that ``job`` ended."""
        job_id = int(job.rsplit("/", 1)[1])
        self._mock.EmitSignal(MANAGER_IFACE, "JobRemoved", "uoss", [job_id, job, unit, result])

    def wait_for_call(self, method: str, timeout: float = 5) -> None:
        end = time.monotonic() + timeout
        while not self.calls(method):
            assert time.monotonic() < end, f"{method} was never called"
            time.sleep(0.01)


class Forger:
    """Another local client of the bus, one that does not own org.freedesktop.systemd1: what an
    unprivileged user can do on the system bus.  Its signals go to everyone (a broadcast, which
    the bus routes only to match rules it satisfies) and to each connection by its unique name
    (a unicast, which the bus delivers whatever the match rules say: CVE-2024-34397)."""

    def __init__(self, address: str, deaf: tuple[str, ...] = ()) -> None:
        import dbus
        import dbus.lowlevel

        self._dbus = dbus
        self._lowlevel = dbus.lowlevel
        self._bus = dbus.bus.BusConnection(address)
        self.name = str(self._bus.get_unique_name())
        self._deaf = deaf  # connections that answer no ping

    def _others(self) -> list[str]:
        return [str(n) for n in self._bus.list_names() if n.startswith(":") and n != self.name]

    def emit(self, path: str, iface: str, member: str, signature: str, args: list[Any]) -> None:
        for destination in [None, *self._others()]:
            message = self._lowlevel.SignalMessage(path, iface, member)
            if destination is not None:
                message.set_destination(destination)
            message.append(*args, signature=signature)
            self._bus.send_message(message)
        # A round trip to each connection after the signals: each has read them (a bus keeps
        # one sender's messages to one receiver in order) before it answers.
        for destination in self._others():
            if destination in self._deaf:
                continue
            try:
                self._bus.call_blocking(
                    destination, "/", "org.freedesktop.DBus.Peer", "Ping", "", (), timeout=2
                )
            except self._dbus.exceptions.DBusException:
                pass

    def close(self) -> None:
        self._bus.close()


@pytest.fixture(scope="module")
def systemd_manager() -> ModuleType:
    """The module under test; importing it needs pydbus and gi."""
    pytest.importorskip("gi", reason=NEEDS)
    pytest.importorskip("pydbus", reason=NEEDS)
    return importlib.import_module("qgafreeze.systemd_manager")


@pytest.fixture(scope="module")
def mock_bus(systemd_manager: ModuleType) -> Iterator[tuple[str, FakeSystemd]]:
    """A private dbus-daemon with dbusmock's systemd template on it, for the whole module."""
    pytest.importorskip("dbusmock", reason=NEEDS)
    daemon_path = shutil.which("dbus-daemon")
    if daemon_path is None:
        pytest.skip(NEEDS)
    daemon = subprocess.Popen(
        [daemon_path, "--session", "--nofork", "--nopidfile", "--print-address=1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon.stdout is not None
    address = daemon.stdout.readline().strip()
    # --session: the mock's own option for "not the host's system bus", here our private one.
    mock = subprocess.Popen(
        [sys.executable, "-m", "dbusmock", "--session", "--template", "systemd"],
        env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": address},
        stdout=subprocess.DEVNULL,  # the mock logs every call there
    )
    try:
        yield address, FakeSystemd(address, timeout=10)
    finally:
        for process in (mock, daemon):
            process.terminate()
            process.wait(5)
        daemon.stdout.close()


@pytest.fixture
def systemd(mock_bus: tuple[str, FakeSystemd]) -> FakeSystemd:
    fake = mock_bus[1]
    fake.reset()
    return fake


@pytest.fixture
def manager(
    systemd_manager: ModuleType, mock_bus: tuple[str, FakeSystemd], systemd: FakeSystemd
) -> Iterator[SystemdManager]:
    made = systemd_manager.SystemdManager(address=mock_bus[0])
    yield made
    made.close()


def signal_loops() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "qgafreeze-dbus"]


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_stop_and_start_wait_for_their_jobs_and_change_the_units_state(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    systemd.add_unit("web.service")

    manager.stop(["db.service", "web.service"], soon())
    assert [manager.unit_state(u, soon()).active_state for u in ("db.service", "web.service")] == [
        "inactive",
        "inactive",
    ]
    manager.start(["db.service"], soon())

    assert manager.unit_state("db.service", soon()).active_state == "active"
    # "replace": a start replaces a pending stop of the same unit, which rollback relies on.
    assert systemd.calls("StartUnit") == [("db.service", "replace")]


def test_job_that_ends_with_a_result_other_than_done_is_a_unit_error_naming_the_unit(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service", active_state="inactive", sub_state="dead")
    systemd.answer("StartUnit", "ss", "o", job_that_ends_with("failed"))

    with pytest.raises(UnitError) as raised:
        manager.start(["db.service"], soon())

    assert type(raised.value) is UnitError
    assert str(raised.value) == "db.service: start job finished with result 'failed'"


def test_refused_stop_fails_the_call_and_the_other_units_still_stop(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    systemd.answer(
        "StopUnit",
        "ss",
        "o",
        "if args[0] == 'masked.service':\n"
        "    raise dbus.exceptions.DBusException("
        "'Unit masked.service is masked.', name='org.freedesktop.systemd1.UnitMasked')\n"
        + job_that_ends_with("done"),
    )

    with pytest.raises(UnitError, match=r"^masked\.service: StopUnit refused: .*is masked"):
        manager.stop(["masked.service", "db.service"], soon())

    assert [args[0] for args in systemd.calls("StopUnit")] == ["masked.service", "db.service"]


def test_job_that_never_ends_is_a_timeout_at_the_callers_deadline(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    systemd.answer("StopUnit", "ss", "o", job_that_ends_with(None))

    started = time.monotonic()
    with pytest.raises(ActionTimeout, match=r"^db\.service: stop did not finish in time$"):
        manager.stop(["db.service"], started + 0.3)

    assert 0.3 <= time.monotonic() - started < 2


def test_jobs_created_before_a_call_that_times_out_are_not_kept_for_ever(
    systemd_manager: ModuleType, mock_bus: tuple[str, FakeSystemd], systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    systemd.add_unit("web.service")
    slow_web = "if args[0] == 'web.service':\n    time.sleep(0.5)\n"
    systemd.answer("StopUnit", "ss", "o", slow_web + job_that_ends_with(None))
    jobs = JobBook()
    manager = systemd_manager.SystemdManager(address=mock_bus[0], jobs=jobs)
    try:
        with pytest.raises(ActionTimeout, match="did not answer StopUnit in time"):
            manager.stop(["db.service", "web.service"], soon(0.2))
        # db.service's job was created, and nobody will ever wait for it.
        assert len(jobs) == 0
    finally:
        manager.close()


def test_call_that_systemd_does_not_answer_by_the_deadline_is_a_timeout(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    systemd.answer("KillUnit", "ssi", "", "time.sleep(0.5)")

    started = time.monotonic()
    with pytest.raises(ActionTimeout, match="did not answer KillUnit in time"):
        manager.kill("db.service", "main", 10, started + 0.1)

    assert time.monotonic() - started < 0.45


def test_call_whose_deadline_has_passed_is_never_sent(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")

    with pytest.raises(ActionTimeout, match="deadline passed before StopUnit was sent"):
        manager.stop(["db.service"], time.monotonic() - 1)

    assert systemd.calls("StopUnit") == []


def test_unit_state_maps_list_units_by_names_and_triggered_by(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit(
        "db.service",
        active_state="deactivating",
        sub_state="stop-sigterm",
        triggered_by=("db.socket", "db-backup.timer"),
    )

    assert manager.unit_state("db.service", soon()) == UnitState(
        name="db.service",
        load_state="loaded",
        active_state="deactivating",
        sub_state="stop-sigterm",
        triggered_by=("db.socket", "db-backup.timer"),
    )
    # The cheap calls only: GetAll costs PID 1 about fifteen times as much.
    assert systemd.calls("ListUnitsByNames") == [(["db.service"],)]


def test_unknown_unit_is_unit_not_found(manager: SystemdManager, systemd: FakeSystemd) -> None:
    with pytest.raises(UnitNotFound, match=r"^nosuch\.service: no such unit$"):
        manager.unit_state("nosuch.service", soon())
    with pytest.raises(UnitNotFound, match=r"^nosuch\.service: .*Unit nosuch\.service not loaded"):
        manager.kill("nosuch.service", "all", 15, soon())


def test_unreachable_bus_address_is_a_bus_error(
    systemd_manager: ModuleType, tmp_path: Path
) -> None:
    with pytest.raises(BusError, match="cannot connect to the system bus at unix:path="):
        systemd_manager.SystemdManager(address=f"unix:path={tmp_path}/no-bus-here")


def test_a_closed_manager_leaves_no_thread_behind_and_its_calls_are_bus_errors(
    systemd_manager: ModuleType, mock_bus: tuple[str, FakeSystemd], systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    before = signal_loops()
    manager = systemd_manager.SystemdManager(address=mock_bus[0])
    assert len(signal_loops()) == len(before) + 1

    manager.close()

    assert signal_loops() == before
    with pytest.raises(BusError, match="connection is closed"):
        manager.unit_state("db.service", soon())


def test_freeze_and_thaw_succeed_when_the_freezer_state_follows(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    systemd.add_unit("web.service")

    manager.freeze(["db.service", "web.service"], soon())
    manager.thaw(["db.service", "web.service"], soon())

    assert [args[0] for args in systemd.calls("FreezeUnit")] == ["db.service", "web.service"]
    assert [args[0] for args in systemd.calls("ThawUnit")] == ["db.service", "web.service"]


def refuse(error: str, message: str) -> str:
    """A call that systemd refuses with org.freedesktop.systemd1.``error``."""
    name = f"org.freedesktop.systemd1.{error}"
    return f"raise dbus.exceptions.DBusException({message!r}, name={name!r})"


@pytest.mark.parametrize("after", ["inactive", "failed"])
def test_thaw_of_a_unit_that_stopped_while_frozen_succeeds(
    manager: SystemdManager, systemd: FakeSystemd, after: str
) -> None:
    # Stopped, or OOM-killed, while frozen: nothing of it is paused any more, and systemd refuses
    # to thaw an inactive unit.  Refused for ever, the app would stay paused and every later
    # freeze would be refused.
    systemd.add_unit("db.service")
    manager.freeze(["db.service"], soon())
    systemd.set_unit("db.service", ActiveState=after, SubState="dead")
    systemd.answer("ThawUnit", "s", "", refuse("UnitInactive", "Unit is not active."))

    manager.thaw(["db.service"], soon())

    assert systemd.calls("ThawUnit") == [("db.service",)]


def test_thaw_refused_for_a_unit_no_longer_frozen_succeeds(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    systemd.answer("ThawUnit", "s", "", refuse("UnitBusy", "Unit has no cgroup."))

    manager.thaw(["db.service"], soon())


def test_thaw_refused_for_a_unit_still_frozen_is_a_unit_error(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    manager.freeze(["db.service"], soon())
    systemd.answer("ThawUnit", "s", "", refuse("UnitBusy", "Unit is busy."))

    with pytest.raises(UnitError, match=r"^db\.service: ThawUnit refused: Unit is busy\.$"):
        manager.thaw(["db.service"], soon())


def test_freeze_that_leaves_the_unit_running_is_a_unit_error(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    systemd.answer("FreezeUnit", "s", "", "")

    with pytest.raises(UnitError) as raised:
        manager.freeze(["db.service"], soon())

    assert str(raised.value) == (
        "db.service: FreezerState is 'running' after FreezeUnit, not 'frozen'"
    )


def test_freeze_on_a_systemd_without_freeze_unit_says_what_it_needs(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")
    # What a systemd older than 246 answers.
    systemd.answer(
        "FreezeUnit",
        "s",
        "",
        "raise dbus.exceptions.DBusException(\"Unknown method 'FreezeUnit' or interface"
        " 'org.freedesktop.systemd1.Manager'.\", name='org.freedesktop.DBus.Error.UnknownMethod')",
    )

    with pytest.raises(UnitError, match="needs systemd 246 or later and the unified cgroup"):
        manager.freeze(["db.service"], soon())


def test_kill_sends_the_signal_to_the_processes_it_names(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    systemd.add_unit("db.service")

    manager.kill("db.service", "main", 10, soon())

    assert systemd.calls("KillUnit") == [("db.service", "main", 10)]


def test_errors_carry_systemds_words_without_the_dbus_error_name(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    with pytest.raises(UnitNotFound) as raised:
        manager.kill("nosuch.service", "all", 15, soon())

    assert str(raised.value) == "nosuch.service: Unit nosuch.service not loaded."


def test_a_job_removed_forged_by_another_client_is_ignored_and_the_call_waits_for_systemd(
    manager: SystemdManager, systemd: FakeSystemd, mock_bus: tuple[str, FakeSystemd]
) -> None:
    # On a GLib without the fix for CVE-2024-34397 a unicast signal reaches the subscriber
    # whoever sent it: only the sender's unique name, compared with the name's owner, tells.
    job = "/org/freedesktop/systemd1/job/77"
    systemd.add_unit("db.service")
    systemd.answer("StopUnit", "ss", "o", job_at(job))
    raised: list[BaseException] = []

    def stop() -> None:
        try:
            manager.stop(["db.service"], soon())
        except BaseException as exc:  # handed to the test's thread
            raised.append(exc)

    stopping = threading.Thread(target=stop)
    stopping.start()
    systemd.wait_for_call("StopUnit")
    forger = Forger(mock_bus[0], deaf=(systemd.name,))
    try:
        # First the forger claims the name, as only the bus itself may say, then ends the job.
        forger.emit(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
            "sss",
            ["org.freedesktop.systemd1", "", forger.name],
        )
        forger.emit(
            "/org/freedesktop/systemd1",
            MANAGER_IFACE,
            "JobRemoved",
            "uoss",
            [77, job, "db.service", "done"],
        )
        stopping.join(0.3)
        assert stopping.is_alive(), f"the forged 'done' was believed: {raised}"
        systemd.job_removed(job, "db.service", "failed")
        stopping.join(5)
    finally:
        forger.close()

    assert not stopping.is_alive()
    assert [str(exc) for exc in raised] == ["db.service: stop job finished with result 'failed'"]


def test_a_job_removed_for_a_job_not_yet_created_is_not_kept_for_it(
    manager: SystemdManager, systemd: FakeSystemd
) -> None:
    # systemd numbers jobs in order: a result announced for the next number, before the job
    # exists, is someone's lie (or another client's job), never the end of a job we create.
    job = "/org/freedesktop/systemd1/job/77"
    systemd.add_unit("db.service")
    systemd.add_unit("web.service")
    systemd.job_removed(job, "db.service", "done")
    # A job of ours that ends after the announcement was handled (signals are handled in order).
    manager.stop(["web.service"], soon())
    systemd.answer("StopUnit", "ss", "o", job_at(job))

    started = time.monotonic()
    with pytest.raises(ActionTimeout, match=r"^db\.service: stop did not finish in time$"):
        manager.stop(["db.service"], started + 0.5)
