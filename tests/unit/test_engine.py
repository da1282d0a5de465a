"""The engine's promises, with systemd replaced by an in-memory unit table."""

from __future__ import annotations

import threading

import pytest
from fakes import FakeSystemd, RecordingEvents

from qgafreeze.actions import build_actions
from qgafreeze.config import parse_config
from qgafreeze.engine import FROZEN, THAWED, Engine
from qgafreeze.errors import Busy, StateError
from qgafreeze.planner import build_plan


def make_engine(apps: dict, systemd: FakeSystemd, **settings) -> tuple[Engine, RecordingEvents]:
    config = parse_config({"version": 1, "settings": settings, "apps": apps})
    events = RecordingEvents()
    engine = Engine(config, build_plan(config), build_actions(config.apps, systemd), events)
    return engine, events


THREE_APPS = {
    "mariadb": {"units": ["mariadb.service"]},
    "shop": {"units": ["shop.service"], "depends_on": ["mariadb"]},
    "cache": {"units": ["cache.service"]},
}


def all_active(*units: str) -> dict[str, str]:
    return dict.fromkeys(units, "active")


def test_freeze_stops_dependents_before_their_dependencies_and_thaw_reverses_it():
    systemd = FakeSystemd(all_active("mariadb.service", "shop.service", "cache.service"))
    engine, _ = make_engine(THREE_APPS, systemd)

    report = engine.freeze()
    assert report.ok, report.error
    assert engine.state == FROZEN
    stopped = systemd.calls("stopped")
    assert stopped.index("shop.service") < stopped.index("mariadb.service")

    report = engine.thaw()
    assert report.ok
    assert engine.state == THAWED
    started = systemd.calls("started")
    assert started.index("mariadb.service") < started.index("shop.service")
    assert sorted(started) == ["cache.service", "mariadb.service", "shop.service"]


def test_independent_apps_are_stopped_at_the_same_time():
    # Each stop waits (bounded) until the other has begun: only parallel stops both succeed.
    systemd = FakeSystemd(all_active("a.service", "b.service"))
    systemd.gates = {"a.service": threading.Event(), "b.service": threading.Event()}
    systemd.started_stop = {
        "a.service": systemd.gates["b.service"],
        "b.service": systemd.gates["a.service"],
    }
    engine, _ = make_engine(
        {
            "a": {"units": ["a.service"], "timeout": "5s"},
            "b": {"units": ["b.service"], "timeout": "5s"},
        },
        systemd,
    )
    report = engine.freeze()
    assert report.ok, report.error
    assert [o.result for o in report.apps] == ["ok", "ok"]


def test_an_app_starts_as_soon_as_what_it_waits_for_is_done_not_level_by_level():
    # Chain x -> y (x depends on y) beside a slow independent z: y must be stopped while z is
    # still stopping, which a level-by-level runner would not do.
    systemd = FakeSystemd(all_active("x.service", "y.service", "z.service"))
    z_may_finish = threading.Event()
    systemd.gates = {"z.service": z_may_finish}
    engine, _ = make_engine(
        {
            "x": {"units": ["x.service"], "depends_on": ["y"]},
            "y": {"units": ["y.service"]},
            "z": {"units": ["z.service"], "timeout": "5s"},
        },
        systemd,
    )
    # y is at level 2 of the freeze, z at level 1; y finishing releases z.
    systemd.started_stop = {"y.service": z_may_finish}
    report = engine.freeze()
    assert report.ok, report.error


def test_thaw_skips_unit_that_was_inactive_before_freeze():
    systemd = FakeSystemd(
        {"mariadb.service": "active", "shop.service": "inactive", "cache.service": "active"}
    )
    engine, _ = make_engine(THREE_APPS, systemd)
    engine.freeze()
    engine.thaw()
    assert "shop.service" not in systemd.calls("stop")
    assert "shop.service" not in systemd.calls("start")
    assert systemd.active["shop.service"] == "inactive"


def test_failed_stop_rolls_back_every_app_already_quiesced_and_fails_the_freeze():
    systemd = FakeSystemd(all_active("mariadb.service", "shop.service", "cache.service"))
    systemd.fail_stop = {"mariadb.service"}
    engine, events = make_engine(THREE_APPS, systemd)

    report = engine.freeze()

    assert not report.ok
    assert report.error is not None and "mariadb" in report.error.message
    assert engine.state == THAWED
    assert engine.paused_apps == []
    assert all(state == "active" for state in systemd.active.values())
    assert {o.app for o in report.rollback} == {"mariadb", "shop", "cache"}
    # Reverse order: mariadb (the dependency) is resumed before shop.
    started = systemd.calls("started")
    assert started.index("mariadb.service") < started.index("shop.service")
    assert events.cycles[-1] is report


def test_timed_out_stop_is_rolled_back_and_reported_as_timeout():
    systemd = FakeSystemd(all_active("slow.service", "fast.service"))
    systemd.hang_stop = {"slow.service"}
    engine, _ = make_engine(
        {
            "slow": {"units": ["slow.service"], "timeout": "200ms"},
            "fast": {"units": ["fast.service"]},
        },
        systemd,
    )
    report = engine.freeze()
    assert not report.ok
    assert report.error is not None and report.error.code == "timeout"
    slow = next(o for o in report.apps if o.app == "slow")
    assert slow.result == "timeout"
    # The stop was requested, so the unit is started again even though the stop never finished.
    assert "slow.service" in systemd.calls("start")
    assert systemd.active["fast.service"] == "active"


def test_on_failure_continue_logs_the_failure_and_freezes_the_rest():
    systemd = FakeSystemd(all_active("a.service", "b.service"))
    systemd.fail_stop = {"a.service"}
    engine, _ = make_engine(
        {"a": {"units": ["a.service"], "on_failure": "continue"}, "b": {"units": ["b.service"]}},
        systemd,
    )
    report = engine.freeze()
    assert report.ok
    assert engine.state == FROZEN
    assert {o.app: o.result for o in report.apps} == {"a": "failed", "b": "ok"}
    assert systemd.active["b.service"] == "inactive"
    engine.thaw()
    assert systemd.active == {"a.service": "active", "b.service": "active"}


def test_after_an_abort_apps_not_yet_started_are_skipped():
    systemd = FakeSystemd(all_active("dep.service", "user.service"))
    systemd.fail_stop = {"user.service"}
    engine, events = make_engine(
        {
            "dep": {"units": ["dep.service"]},
            "user": {"units": ["user.service"], "depends_on": ["dep"]},
        },
        systemd,
    )
    report = engine.freeze()
    assert {o.app: o.result for o in report.apps} == {"user": "failed", "dep": "skipped"}
    assert "dep.service" not in systemd.calls("stop")
    # Every outcome names the app's units and actions, even the skipped app's: journald's
    # QGAFREEZE_UNIT and QGAFREEZE_ACTION find an app's records whatever became of it.
    for outcome in [*report.apps, *report.rollback]:
        assert (outcome.units, outcome.actions) == ((f"{outcome.app}.service",), ("units",))
    skipped = report.apps[1]
    assert (skipped.app, skipped.result) == ("dep", "skipped")
    assert skipped in events.finished


def test_thaw_without_freeze_succeeds_and_changes_nothing():
    systemd = FakeSystemd(all_active("mariadb.service", "shop.service", "cache.service"))
    engine, _ = make_engine(THREE_APPS, systemd)
    report = engine.thaw()
    assert report.ok
    assert report.note
    assert systemd.log == []


def test_second_thaw_succeeds_and_changes_nothing():
    systemd = FakeSystemd(all_active("mariadb.service", "shop.service", "cache.service"))
    engine, _ = make_engine(THREE_APPS, systemd)
    engine.freeze()
    engine.thaw()
    calls = list(systemd.log)
    report = engine.thaw()
    assert report.ok
    assert systemd.log == calls


def test_freeze_while_frozen_is_refused_not_doubled():
    systemd = FakeSystemd(all_active("mariadb.service", "shop.service", "cache.service"))
    engine, _ = make_engine(THREE_APPS, systemd)
    first = engine.freeze()
    with pytest.raises(StateError, match="already frozen"):
        engine.freeze()
    assert len(systemd.calls("stop")) == 3
    assert engine.status()["cycle"] == first.cycle


def test_request_during_a_cycle_is_answered_busy():
    systemd = FakeSystemd(all_active("a.service"))
    release = threading.Event()
    systemd.gates = {"a.service": release}
    engine, _ = make_engine({"a": {"units": ["a.service"], "timeout": "5s"}}, systemd)
    worker = threading.Thread(target=engine.freeze)
    worker.start()
    systemd.started_stop.setdefault("a.service", threading.Event()).wait(5)
    try:
        with pytest.raises(Busy):
            engine.thaw()
        with pytest.raises(Busy):
            engine.freeze()
    finally:
        release.set()
        worker.join(5)
    assert engine.state == FROZEN


def test_failed_start_on_thaw_is_reported_and_retried_by_the_next_thaw():
    systemd = FakeSystemd(all_active("a.service", "b.service"))
    engine, _ = make_engine({"a": {"units": ["a.service"]}, "b": {"units": ["b.service"]}}, systemd)
    engine.freeze()
    systemd.fail_start = {"a.service"}
    report = engine.thaw()
    assert not report.ok
    assert {o.app: o.result for o in report.apps} == {"a": "failed", "b": "ok"}
    assert engine.paused_apps == ["a"]
    with pytest.raises(StateError, match="still paused"):
        engine.freeze()
    systemd.fail_start = set()
    assert engine.thaw().ok
    assert systemd.active["a.service"] == "active"
    assert engine.paused_apps == []


def test_socket_that_triggers_a_service_is_stopped_and_started_before_it():
    systemd = FakeSystemd(all_active("mariadb.service", "mariadb.socket"))
    systemd.triggers = {"mariadb.service": ("mariadb.socket",)}
    engine, _ = make_engine({"db": {"units": ["mariadb.service"]}}, systemd)
    engine.freeze()
    assert systemd.calls("stop") == ["mariadb.socket", "mariadb.service"]
    engine.thaw()
    # systemd refuses to start a socket whose service already runs; the service gets its fds.
    assert systemd.calls("start") == ["mariadb.socket", "mariadb.service"]


def test_unknown_unit_fails_the_app_with_its_name():
    systemd = FakeSystemd({})
    engine, _ = make_engine({"db": {"units": ["nosuch.service"]}}, systemd)
    report = engine.freeze()
    assert not report.ok
    assert "nosuch.service" in report.apps[0].message


def test_watchdog_resumes_apps_when_no_thaw_arrives():
    systemd = FakeSystemd(all_active("a.service"))
    engine, events = make_engine({"a": {"units": ["a.service"]}}, systemd, max_frozen="50ms")
    engine.freeze()
    events.cycle_done.clear()
    assert events.cycle_done.wait(5), "the watchdog did not thaw"
    assert events.cycles[-1].reason == "watchdog"
    assert systemd.active["a.service"] == "active"
    assert engine.state == THAWED
    assert any("max_frozen" in p for p in events.problems)
    assert engine.thaw().ok  # a late thaw from qemu-ga still succeeds


def test_thaw_disarms_the_watchdog():
    systemd = FakeSystemd(all_active("a.service"))
    engine, events = make_engine({"a": {"units": ["a.service"]}}, systemd, max_frozen="100ms")
    engine.freeze()
    engine.thaw()
    events.cycle_done.clear()
    assert not events.cycle_done.wait(0.3)
    assert [c.reason for c in events.cycles] == ["request", "request"]


def test_freeze_and_its_thaw_share_one_cycle_id():
    systemd = FakeSystemd(all_active("a.service"))
    engine, events = make_engine({"a": {"units": ["a.service"]}}, systemd)
    freeze = engine.freeze()
    thaw = engine.thaw()
    assert freeze.cycle == thaw.cycle
    assert {cycle for cycle, _, _ in events.started} == {freeze.cycle}
    assert engine.freeze().cycle != freeze.cycle


def test_reconfigure_is_refused_while_apps_are_paused():
    systemd = FakeSystemd(all_active("a.service"))
    engine, _ = make_engine({"a": {"units": ["a.service"]}}, systemd)
    engine.freeze()
    config = parse_config({"apps": {}})
    with pytest.raises(StateError):
        engine.reconfigure(config, build_plan(config), {})
    engine.thaw()
    engine.reconfigure(config, build_plan(config), {})
    assert engine.config.apps == ()


class StuckAction:
    """An action that ignores its deadline, as a call into a wedged bus would."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.resumed: list[list[str]] = []

    def describe(self) -> list[str]:
        return []

    def quiesce(self, ctx) -> None:
        ctx.undo("stuck").append("stuck.service")
        self.release.wait(10)

    def resume(self, ctx) -> None:
        self.resumed.append(list(ctx.undo("stuck")))


def test_action_stuck_past_its_deadline_is_abandoned_and_rolled_back():
    config = parse_config({"apps": {"stuck": {"units": ["stuck"], "timeout": "100ms"}}})
    action = StuckAction()
    engine = Engine(
        config, build_plan(config), {"stuck": action}, RecordingEvents(), abandon_grace=0.05
    )
    try:
        report = engine.freeze()
    finally:
        action.release.set()
    assert not report.ok
    assert [(o.phase, o.result) for o in report.apps] == [("freeze", "timeout")]
    assert report.apps[0].message == "did not return by its deadline"
    assert action.resumed == [["stuck.service"]]
    assert engine.state == THAWED
