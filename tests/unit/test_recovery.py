"""A daemon that died mid-cycle: what the next one finds under /run, and what it does with it."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

from fakes import FakeSystemd, RecordingEvents

from qgafreeze.actions import build_actions
from qgafreeze.config import parse_config
from qgafreeze.engine import FROZEN, THAWED, Engine
from qgafreeze.planner import build_plan
from qgafreeze.state import StateFile

APPS = {"db": {"units": ["db"]}, "web": {"units": ["web"], "depends_on": ["db"]}}


def daemon(systemd: FakeSystemd, state: StateFile, **settings) -> tuple[Engine, RecordingEvents]:
    config = parse_config({"apps": APPS, "settings": settings})
    events = RecordingEvents()
    engine = Engine(
        config, build_plan(config), build_actions(config.apps, systemd), events, state_file=state
    )
    return engine, events


def test_what_to_undo_is_saved_before_the_unit_is_stopped(tmp_path):
    state = StateFile(str(tmp_path / "state.json"))
    systemd = FakeSystemd({"db.service": "active", "web.service": "active"})
    seen_before_stop = []
    systemd.on_stop = lambda units: seen_before_stop.append(
        json.loads((tmp_path / "state.json").read_text())["paused"]
    )
    engine, _ = daemon(systemd, state)
    engine.freeze()
    assert seen_before_stop[0] == {"web": {"units": ["web.service"]}}
    assert seen_before_stop[1]["db"] == {"units": ["db.service"]}


def test_a_new_daemon_resumes_what_the_killed_one_paused(tmp_path):
    state = StateFile(str(tmp_path / "state.json"))
    systemd = FakeSystemd({"db.service": "active", "web.service": "active"})
    first, _ = daemon(systemd, state)
    cycle = first.freeze().cycle
    # The first daemon is gone (SIGKILL); a new one reads the state it left.
    second, _ = daemon(systemd, state)
    assert second.recover(state.load() or {}) == ["db", "web"]
    assert second.state == FROZEN and second.cycle == cycle
    report = second.thaw()
    assert report.ok and report.cycle == cycle
    assert systemd.active == {"db.service": "active", "web.service": "active"}
    assert json.loads((tmp_path / "state.json").read_text())["paused"] == {}


def test_the_watchdog_deadline_survives_a_restart(tmp_path):
    state = StateFile(str(tmp_path / "state.json"))
    systemd = FakeSystemd({"db.service": "active", "web.service": "active"})
    first, _ = daemon(systemd, state, max_frozen="300ms")
    first.freeze()
    # The new daemon sees the units as the dead one left them: stopped.  (The old engine's
    # own timer acts on its own table above, not on this one.)
    after_crash = FakeSystemd({"db.service": "inactive", "web.service": "inactive"})
    second, events = daemon(after_crash, state, max_frozen="1h")
    saved = state.load() or {}
    assert saved["watchdog_at"] is not None
    second.recover(saved)
    assert events.cycle_done.wait(5), "the watchdog did not fire at the original deadline"
    assert events.cycles[-1].reason == "watchdog"
    assert second.state == THAWED
    assert after_crash.active == {"db.service": "active", "web.service": "active"}


def test_a_state_left_by_a_finished_cycle_changes_nothing(tmp_path):
    state = StateFile(str(tmp_path / "state.json"))
    systemd = FakeSystemd({"db.service": "active", "web.service": "active"})
    first, _ = daemon(systemd, state)
    first.freeze()
    first.thaw()
    second, _ = daemon(systemd, state)
    assert second.recover(state.load() or {}) == []
    assert second.state == THAWED


def test_an_unreadable_state_file_is_ignored_and_said(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    state = StateFile(str(path))
    assert state.load() is None
    assert "ignoring unreadable cycle state" in state.error


def test_an_app_no_longer_configured_is_reported_not_fatal(tmp_path):
    state = StateFile(str(tmp_path / "state.json"))
    state.save({"state": FROZEN, "cycle": "c1", "paused": {"gone": {"units": ["x.service"]}}})
    systemd = FakeSystemd({"db.service": "active", "web.service": "active"})
    engine, events = daemon(systemd, state)
    assert engine.recover(state.load() or {}) == []
    assert any("gone: paused by the previous daemon" in p for p in events.problems)


def test_with_two_hundred_apps_stopping_at_once_each_is_saved_before_its_stop(tmp_path):
    # Saves from apps pausing together share writes (group commit); none may be skipped, and
    # copying the paused table while other apps change it must not break a save.
    path = tmp_path / "state.json"
    units = {f"u{i}.service": "active" for i in range(200)}
    systemd = FakeSystemd(dict(units))
    unsaved: list[str] = []

    def check_saved(stopping: Sequence[str]) -> None:
        paused = json.loads(path.read_text())["paused"]
        saved = {unit for record in paused.values() for unit in record.get("units", [])}
        unsaved.extend(unit for unit in stopping if unit not in saved)

    systemd.on_stop = check_saved
    apps = {f"a{i}": {"units": [f"u{i}.service"]} for i in range(200)}
    config = parse_config({"apps": apps})
    engine = Engine(
        config,
        build_plan(config),
        build_actions(config.apps, systemd),
        RecordingEvents(),
        state_file=StateFile(str(path)),
    )
    for _ in range(3):
        freeze = engine.freeze()
        assert freeze.ok, freeze.error
        assert len(json.loads(path.read_text())["paused"]) == 200
        assert engine.thaw().ok
        assert json.loads(path.read_text())["paused"] == {}
    assert unsaved == []
    assert systemd.active == units


class StateFileFailingOnce(StateFile):
    """Raises, once, on the n-th save: stands for any bug in the code around an action."""

    def __init__(self, path: str, fail_on: int) -> None:
        super().__init__(path)
        self.calls = 0
        self.fail_on = fail_on

    def save(self, data: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected")
        super().save(data)


def test_an_error_around_an_action_fails_that_app_at_once_and_rolls_back(tmp_path):
    # Saves: 1 cycle start, 2 before db's stop, 3 after db's action (fails here), ...  A worker
    # that died silently would leave the cycle waiting for the app's one-hour deadline.
    state = StateFileFailingOnce(str(tmp_path / "state.json"), fail_on=3)
    systemd = FakeSystemd({"db.service": "active"})
    config = parse_config({"apps": {"db": {"units": ["db"], "timeout": "1h"}}})
    events = RecordingEvents()
    engine = Engine(
        config, build_plan(config), build_actions(config.apps, systemd), events, state_file=state
    )
    reports = []
    worker = threading.Thread(target=lambda: reports.append(engine.freeze()), daemon=True)
    worker.start()
    worker.join(30)
    assert reports, "the freeze waited for the app's deadline instead of failing the app"
    assert not reports[0].ok
    assert "internal error" in reports[0].apps[0].message
    assert [o.result for o in reports[0].rollback] == ["ok"]
    assert systemd.active == {"db.service": "active"}
    assert "db: internal error" in events.problems


def test_a_session_held_by_the_previous_daemon_is_reported_gone_on_thaw(tmp_path):
    # The pipes to that session died with the daemon: nothing is left to close it through.
    state = StateFile(str(tmp_path / "state.json"))
    state.save({"state": FROZEN, "cycle": "c1", "paused": {"db": {"session": [1234]}}})
    session = {"argv": ["/bin/cat"], "ready": "ready"}
    config = parse_config({"apps": {"db": {"session": session}}})
    engine = Engine(
        config,
        build_plan(config),
        build_actions(config.apps, FakeSystemd({})),
        RecordingEvents(),
        state_file=state,
    )
    assert engine.recover(state.load() or {}) == ["db"]
    report = engine.thaw()
    assert not report.ok
    assert "the session (pid 1234) is no longer ours" in report.apps[0].message
    assert engine.paused_apps == []
