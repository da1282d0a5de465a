"""The cycle report: what the snapshot of each cycle is worth, app by app, validated against
docs/cycle-report.schema.json wherever a test here produces one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
from fakes import FakeSystemd, RecordingEvents

from qgafreeze import paths
from qgafreeze.actions import build_actions
from qgafreeze.cli import render_status, status_document
from qgafreeze.config import parse_config
from qgafreeze.engine import Engine
from qgafreeze.logs import PRIORITY_INFO, LogWriter
from qgafreeze.planner import build_plan
from qgafreeze.report import ReportFile, empty_document, guarantee

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "cycle-report.schema.json").read_text()
)
SECRET = "s3cr3t-hunter2"


def valid(doc: dict[str, Any]) -> dict[str, Any]:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc


def make_engine(tmp_path: Path, apps: dict, systemd: FakeSystemd, events: Any = None, **settings):
    settings.setdefault("agent_state_file", None)
    config = parse_config({"version": 1, "settings": settings, "apps": apps})
    events = events or RecordingEvents()
    report_file = ReportFile(str(tmp_path / "run" / "report.json"))
    engine = Engine(
        config, build_plan(config), build_actions(config.apps, systemd), events,
        abandon_grace=0.5, report_file=report_file,
    )  # fmt: skip
    return engine, events, report_file


def written(report_file: ReportFile) -> dict[str, Any]:
    return valid(json.loads(Path(report_file.path).read_text()))


def apps_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["app"]: entry for entry in doc["apps"]}


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    return predicate()


def test_quiesced_apps_make_an_application_consistent_report_with_every_app_in_both_phases(
    tmp_path,
):
    systemd = FakeSystemd({"db.service": "active", "idle.service": "inactive"})
    apps = {"db": {"units": ["db.service"]}, "idle": {"units": ["idle.service"]}}
    engine, _, report_file = make_engine(tmp_path, apps, systemd)

    assert engine.freeze().ok
    frozen = written(report_file)
    assert (frozen["phase"], frozen["reason"], frozen["thaw"]) == ("freeze", "request", None)
    assert frozen["verdict"] == "application-consistent"

    assert engine.thaw().ok
    doc = written(report_file)
    assert doc["cycle"] == frozen["cycle"] and doc["phase"] == "thaw"
    assert doc["verdict"] == "application-consistent" and doc["verdict_reasons"] == []
    assert doc["freeze"]["started_at"] <= doc["freeze"]["finished_at"] <= doc["thaw"]["started_at"]
    db, idle = apps_of(doc)["db"], apps_of(doc)["idle"]
    assert (db["freeze"]["result"], db["thaw"]["result"]) == ("ok", "ok")
    assert db["guarantee"] == "stopped" and db["quiesced"] is True
    assert idle["thaw"] == {
        "phase": "thaw",
        "result": "skipped",
        "duration_ms": 0,
        "message": "nothing to resume: its freeze paused nothing",
    }


def test_an_app_with_nothing_to_resume_gets_a_skipped_thaw_line_in_the_hook_log_and_journald(
    tmp_path,
):
    records: list[dict[str, Any]] = []
    log = LogWriter(str(tmp_path / "hook.log"), lambda m, **f: records.append({"MESSAGE": m, **f}))
    systemd = FakeSystemd({"idle.service": "inactive"})
    engine, _, _ = make_engine(tmp_path, {"idle": {"units": ["idle.service"]}}, systemd, log)

    engine.freeze()
    engine.thaw()
    assert log.flush(5)

    hook_log = (tmp_path / "hook.log").read_text()
    assert "qgafreeze:idle thaw skipped: nothing to resume: its freeze paused nothing" in hook_log
    thaw = [
        r for r in records if r.get("QGAFREEZE_APP") == "idle" and r["QGAFREEZE_PHASE"] == "thaw"
    ]
    assert [(r["QGAFREEZE_RESULT"], r["PRIORITY"]) for r in thaw] == [
        ("skipped", str(PRIORITY_INFO))
    ]


def test_an_on_failure_continue_app_that_failed_makes_the_snapshot_crash_consistent(tmp_path):
    systemd = FakeSystemd({"db.service": "active", "cache.service": "active"})
    systemd.fail_stop = {"cache.service"}
    apps = {
        "db": {"units": ["db.service"]},
        "cache": {"units": ["cache.service"], "on_failure": "continue"},
    }
    engine, _, report_file = make_engine(tmp_path, apps, systemd)

    assert engine.freeze().ok
    assert written(report_file)["verdict"] == "crash-consistent"
    engine.thaw()

    doc = written(report_file)
    assert doc["verdict"] == "crash-consistent"
    cache = apps_of(doc)["cache"]
    assert cache["quiesced"] is False and cache["freeze"]["result"] == "failed"
    assert [r.split(":")[0] for r in doc["verdict_reasons"]] == ["cache"]
    assert apps_of(doc)["db"]["quiesced"] is True


def test_a_refused_freeze_is_failed_and_a_thaw_sent_after_it_leaves_the_report_alone(tmp_path):
    # Proxmox sends a thaw even after a failed freeze: the host must still read why it failed.
    systemd = FakeSystemd(dict.fromkeys(["db.service", "web.service", "disk.service"], "active"))
    systemd.fail_stop = {"db.service"}
    apps = {
        "web": {"units": ["web.service"], "depends_on": ["db"]},
        "db": {"units": ["db.service"], "depends_on": ["disk"]},
        "disk": {"units": ["disk.service"]},  # quiesced after db: never started
    }
    engine, _, report_file = make_engine(tmp_path, apps, systemd)

    assert not engine.freeze().ok
    failed = written(report_file)
    assert (failed["verdict"], failed["phase"], failed["reason"]) == ("failed", "thaw", "rollback")
    assert "db" in failed["verdict_reasons"][0]
    assert apps_of(failed)["web"]["thaw"]["phase"] == "rollback"
    assert apps_of(failed)["disk"]["freeze"]["result"] == "skipped"
    assert apps_of(failed)["disk"]["thaw"] == {
        "phase": "rollback",
        "result": "skipped",
        "duration_ms": 0,
        "message": "nothing to resume: the freeze never started it",
    }

    engine.thaw()
    assert written(report_file) == failed


def session_app(script: str, **extra: Any) -> dict[str, Any]:
    return {"session": {"argv": ["/bin/sh", "-c", script], "ready": "^ready$", **extra}}


def test_a_session_lost_before_qemu_ga_froze_the_filesystems_makes_it_crash_consistent(tmp_path):
    flag = tmp_path / "qga.state.isfrozen"  # never created: qemu-ga had not frozen anything
    engine, events, report_file = make_engine(
        tmp_path, {"db": session_app("echo ready; exit 7")}, FakeSystemd({}),
        agent_state_file=str(flag),
    )  # fmt: skip
    assert engine.freeze().ok
    assert wait_until(lambda: any("held session exited" in p for p in events.problems))

    engine.thaw()

    doc = written(report_file)
    assert doc["verdict"] == "crash-consistent"
    assert "before qemu-ga had frozen the filesystems" in apps_of(doc)["db"]["note"]


def test_a_session_lost_after_qemu_ga_froze_the_filesystems_leaves_it_application_consistent(
    tmp_path,
):
    flag = tmp_path / "qga.state.isfrozen"
    engine, events, report_file = make_engine(
        tmp_path, {"db": session_app("echo ready; sleep 1; exit 7")}, FakeSystemd({}),
        agent_state_file=str(flag),
    )  # fmt: skip
    assert engine.freeze().ok
    flag.touch()  # qemu-ga marks itself frozen, then freezes the disks; the session ends later
    assert wait_until(lambda: any("held session exited" in p for p in events.problems))

    engine.thaw()

    doc = written(report_file)
    assert doc["verdict"] == "application-consistent"
    assert "after qemu-ga had frozen the filesystems" in apps_of(doc)["db"]["note"]


def test_a_session_that_finds_its_lock_lost_at_the_thaw_makes_it_crash_consistent(tmp_path):
    # A helper that checks its lock only at the thaw cannot say when it went: not quiesced.
    lost = 'qgafreeze-report lock_lost {\\"reason\\": \\"the server restarted\\"}'
    script = f'echo ready; read x; echo "{lost}"; exit 1'
    engine, _, report_file = make_engine(tmp_path, {"db": session_app(script)}, FakeSystemd({}))
    assert engine.freeze().ok

    engine.thaw()

    doc = written(report_file)
    assert doc["verdict"] == "crash-consistent"
    assert apps_of(doc)["db"]["quiesced"] is False
    assert apps_of(doc)["db"]["note"] == (
        "its session found its lock lost at the thaw: the server restarted"
    )


def test_the_report_holds_nothing_a_session_was_sent_and_no_environment_value(tmp_path):
    apps = {
        "db": session_app(
            'read pw; echo "got $pw $TOKEN"; echo ready; read x; echo "$x"',
            open=f"{SECRET}-open\n",
            close=f"{SECRET}-close\n",
            env={"TOKEN": f"{SECRET}-env"},
        ),
        "job": {"freeze": [{"exec": ["/bin/sh", "-c", 'echo "$TOKEN"; exit 3'],
                            "env": {"TOKEN": f"{SECRET}-step"}}],
                "on_failure": "continue"},
    }  # fmt: skip
    engine, _, report_file = make_engine(tmp_path, apps, FakeSystemd({}))

    assert engine.freeze().ok
    frozen = Path(report_file.path).read_text()
    engine.thaw()

    for text in (frozen, Path(report_file.path).read_text(), json.dumps(engine.status()["report"])):
        assert SECRET not in text


def test_each_preset_and_mode_says_what_its_quiescing_guarantees():
    config = parse_config(
        {
            "version": 1,
            "apps": {
                "maria": {"preset": "mariadb"},
                "pg": {"preset": "postgresql"},
                "web": {"units": ["web.service"]},
                "paused": {"units": ["api.service"], "mode": "freeze"},
            },
        }
    )
    said = {app.name: guarantee(app) for app in config.apps}
    # The lock depends on the server's version, which only the cycle's details can tell.
    assert "BACKUP STAGE BLOCK_COMMIT" in said["maria"]
    assert "FLUSH TABLES WITH READ LOCK" in said["maria"]
    assert "details name the lock" in said["maria"]
    assert "backup_label" in said["pg"]
    assert said["web"] == "stopped"
    assert said["paused"] == "processes frozen"


def test_status_json_is_the_last_report_with_the_daemons_live_state_under_daemon(tmp_path):
    engine, _, report_file = make_engine(
        tmp_path, {"db": {"units": ["db.service"]}}, FakeSystemd({"db.service": "active"})
    )
    before = status_document({"ok": True, "op": "status", **engine.status()})
    assert valid(before)["cycle"] is None and before["daemon"]["state"] == "thawed"

    engine.freeze()
    engine.thaw()
    after = valid(status_document({"ok": True, "op": "status", **engine.status()}))

    assert {k: v for k, v in after.items() if k != "daemon"} == written(report_file)
    assert after["daemon"]["apps"] == ["db"] and "report" not in after["daemon"]
    assert valid(empty_document())["apps"] == []


def test_the_last_report_outlives_a_daemon_restart(tmp_path):
    systemd = FakeSystemd({"db.service": "active"})
    engine, _, report_file = make_engine(tmp_path, {"db": {"units": ["db.service"]}}, systemd)
    engine.freeze()
    engine.thaw()

    restarted, _, _ = make_engine(tmp_path, {"db": {"units": ["db.service"]}}, systemd)

    assert restarted.status()["report"] == written(report_file)


def test_status_names_the_verdict_of_the_last_snapshot_and_why(tmp_path):
    systemd = FakeSystemd({"db.service": "active"})
    systemd.fail_stop = {"db.service"}
    apps = {"db": {"units": ["db.service"], "on_failure": "continue"}}
    engine, _, _ = make_engine(tmp_path, apps, systemd)
    engine.freeze()
    engine.thaw()

    text = render_status({"ok": True, "op": "status", **engine.status()})

    assert f"snapshot of cycle {engine.cycle}: crash-consistent" in text.splitlines()
    assert any(
        line.startswith("  db: not quiesced: its freeze failed") for line in text.splitlines()
    )


def test_the_report_path_is_where_the_docs_say():
    repo = Path(__file__).resolve().parents[2]
    assert paths.REPORT_FILE == "/run/qgafreeze/report.json"
    for doc in ("README.md", "docs/design.md", "docs/qgafreeze.8"):
        assert paths.REPORT_FILE in (repo / doc).read_text(), doc


def test_a_cycle_taken_over_from_a_daemon_that_died_frozen_counts_its_sessions_as_lost(tmp_path):
    apps = {"db": session_app("echo ready; read x"), "web": {"units": ["web.service"]}}
    systemd = FakeSystemd({"web.service": "active"})
    dead, _, report_file = make_engine(tmp_path, apps, systemd)
    assert dead.freeze().ok
    saved = {"state": "frozen", "cycle": dead.cycle, "paused": {"db": {"session": [1]}}}
    saved["paused"]["web"] = {"units": ["web.service"]}

    restarted, _, _ = make_engine(tmp_path, apps, systemd)
    restarted.recover(saved)
    restarted.thaw()

    doc = written(report_file)
    assert (doc["cycle"], doc["verdict"]) == (dead.cycle, "crash-consistent")
    assert (
        apps_of(doc)["db"]["note"]
        == "its held session ended when the daemon restarted while frozen"
    )
    assert apps_of(doc)["web"]["quiesced"] is True
    dead.thaw()  # closes the session the first engine still holds
