"""The watchdog thaws the filesystems too: before it resumes the apps, through the thawer the
daemon gives the engine (a fake here), unless settings.watchdog_thaws_filesystems is false; and
the cycle report, the hook log, journald and status say so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fakes import FakeSystemd, RecordingEvents

from qgafreeze.actions import build_actions
from qgafreeze.cli import render_status
from qgafreeze.config import parse_config
from qgafreeze.engine import THAWED, Engine
from qgafreeze.fsthaw import ThawResult
from qgafreeze.logs import LogWriter
from qgafreeze.planner import build_plan
from qgafreeze.report import ReportFile


class FakeThawer:
    """Records when it was called: which units were running by then."""

    def __init__(self, systemd: FakeSystemd, result: ThawResult) -> None:
        self.systemd = systemd
        self.result = result
        self.calls: list[dict[str, str]] = []

    def __call__(self) -> ThawResult:
        self.calls.append(dict(self.systemd.active))
        return self.result


TWO_THAWED = ThawResult(thawed=("/", "/boot"))


def make_engine(tmp_path: Path, events: Any, thaw: ThawResult = TWO_THAWED, **settings):
    settings.setdefault("agent_state_file", None)
    config = parse_config(
        {"version": 1, "settings": settings, "apps": {"a": {"units": ["a.service"]}}}
    )
    systemd = FakeSystemd({"a.service": "active"})
    thawer = FakeThawer(systemd, thaw)
    report_file = ReportFile(str(tmp_path / "report.json"))
    engine = Engine(
        config, build_plan(config), build_actions(config.apps, systemd), events,
        report_file=report_file, fs_thawer=thawer,
    )  # fmt: skip
    return engine, thawer, report_file


def watchdog_fires(engine: Engine, events: RecordingEvents) -> None:
    engine.freeze()
    events.cycle_done.clear()
    assert events.cycle_done.wait(5), "the watchdog did not thaw"
    assert events.cycles[-1].reason == "watchdog"


def test_the_watchdog_thaws_the_filesystems_before_resuming_the_apps(tmp_path):
    events = RecordingEvents()
    engine, thawer, report_file = make_engine(tmp_path, events, max_frozen="50ms")
    watchdog_fires(engine, events)
    # Once, while the app was still stopped: its start may need to write to disk.
    assert thawer.calls == [{"a.service": "inactive"}]
    assert engine.state == THAWED
    assert any(
        p.startswith("watchdog thawed 2 filesystem(s): /, /boot; a snapshot taken from now on")
        for p in events.problems
    ), events.problems
    doc = json.loads(Path(report_file.path).read_text())
    assert doc["reason"] == "watchdog"
    disks = doc["filesystems_thawed"]
    assert (disks["count"], disks["mountpoints"], disks["errors"]) == (2, ["/", "/boot"], [])
    assert doc["thaw"]["started_at"] <= disks["at"] <= doc["thaw"]["finished_at"]
    assert engine.thaw().ok  # the host's late thaw still succeeds, and thaws no disk
    assert len(thawer.calls) == 1


def test_with_the_setting_off_the_watchdog_resumes_the_apps_and_leaves_the_disks(tmp_path):
    events = RecordingEvents()
    engine, thawer, report_file = make_engine(
        tmp_path, events, max_frozen="50ms", watchdog_thaws_filesystems=False
    )
    watchdog_fires(engine, events)
    assert thawer.calls == []
    assert not any("filesystem" in p for p in events.problems)
    assert json.loads(Path(report_file.path).read_text())["filesystems_thawed"] is None


def test_a_thaw_the_host_sends_never_touches_the_filesystems(tmp_path):
    # qemu-ga thaws them itself, after the thaw hook; the daemon's part is only the apps.
    events = RecordingEvents()
    engine, thawer, report_file = make_engine(tmp_path, events)
    engine.freeze()
    assert engine.thaw().ok
    assert thawer.calls == []
    assert json.loads(Path(report_file.path).read_text())["filesystems_thawed"] is None


def test_filesystems_it_could_not_thaw_are_each_logged_and_reported(tmp_path):
    events = RecordingEvents()
    failing = ThawResult(thawed=("/",), errors=("/srv: Operation not permitted",))
    engine, _, report_file = make_engine(tmp_path, events, failing, max_frozen="50ms")
    watchdog_fires(engine, events)
    assert "watchdog could not thaw a filesystem: /srv: Operation not permitted" in events.problems
    assert json.loads(Path(report_file.path).read_text())["filesystems_thawed"]["errors"] == [
        "/srv: Operation not permitted"
    ]


def test_when_none_was_frozen_the_logs_say_so(tmp_path):
    events = RecordingEvents()
    engine, _, _ = make_engine(tmp_path, events, ThawResult(), max_frozen="50ms")
    watchdog_fires(engine, events)
    assert any("watchdog thawed 0 filesystem(s) (none was frozen)" in p for p in events.problems)


def test_the_hook_log_journald_and_status_say_the_watchdog_thawed_the_disks(tmp_path):
    records: list[dict[str, Any]] = []
    hook_log = tmp_path / "hook.log"
    log = LogWriter(str(hook_log), lambda m, **f: records.append({"MESSAGE": m, **f}))

    class AlsoLogged(RecordingEvents):
        def problem(self, message: str, cycle: str = "", detail: str = "") -> None:
            super().problem(message, cycle, detail)
            log.problem(message, cycle, detail)

    events = AlsoLogged()
    engine, _, _ = make_engine(tmp_path, events, max_frozen="50ms")
    watchdog_fires(engine, events)
    assert log.flush(5)
    said = "watchdog thawed 2 filesystem(s): /, /boot; a snapshot taken from now on"
    assert f"qgafreeze warning: {said}" in hook_log.read_text()
    journal = [r for r in records if r["MESSAGE"].startswith(said)]
    assert journal and journal[0]["PRIORITY"] == "4", records
    status = render_status({"ok": True, **engine.status()})
    assert "the watchdog thawed 2 filesystem(s) at " in status
    assert "a snapshot taken after that is not consistent" in status
