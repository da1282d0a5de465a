"""The unit tier's schema check of the cycle reports tests leave behind (tests/unit/reportcheck.py,
run after every test by conftest.py): it finds what the engine writes, and it refuses what the
schema does not allow."""

from __future__ import annotations

import json

import pytest
from fakes import FakeSystemd, RecordingEvents
from reportcheck import check_reports_under, reports_under

from qgafreeze.actions import build_actions
from qgafreeze.cli import status_document
from qgafreeze.config import parse_config
from qgafreeze.engine import Engine
from qgafreeze.planner import build_plan
from qgafreeze.report import ReportFile, empty_document


def engine_writing_to(path: str) -> Engine:
    config = parse_config(
        {
            "version": 1,
            "settings": {"agent_state_file": None},
            "apps": {"db": {"units": ["db.service"]}},
        }
    )
    systemd = FakeSystemd({"db.service": "active"})
    return Engine(
        config,
        build_plan(config),
        build_actions(config.apps, systemd),
        RecordingEvents(),
        report_file=ReportFile(path),
    )


def test_the_check_finds_and_accepts_the_report_an_engine_writes_under_any_name(tmp_path):
    named = engine_writing_to(str(tmp_path / "run" / "report.json"))
    renamed = engine_writing_to(str(tmp_path / "elsewhere" / "cycle.json"))
    for engine in (named, renamed):
        assert engine.freeze().ok and engine.thaw().ok
    (tmp_path / "other.json").write_text(json.dumps({"version": 1, "apps": []}))

    assert reports_under(tmp_path) == [
        tmp_path / "elsewhere" / "cycle.json",
        tmp_path / "run" / "report.json",
    ]
    assert check_reports_under(tmp_path) == 2


def test_a_report_the_schema_refuses_fails_the_check_naming_the_file(tmp_path_factory):
    # Not under tmp_path: conftest's own check would fail this test at teardown.
    root = tmp_path_factory.mktemp("bad")
    engine = engine_writing_to(str(root / "report.json"))
    assert engine.freeze().ok and engine.thaw().ok
    doc = json.loads((root / "report.json").read_text())
    doc["verdict"] = "probably-fine"
    (root / "report.json").write_text(json.dumps(doc))

    with pytest.raises(AssertionError, match=r"report\.json does not match.*probably-fine"):
        check_reports_under(root)


def test_a_report_file_that_is_not_json_fails_the_check(tmp_path_factory):
    root = tmp_path_factory.mktemp("torn")
    (root / "report.json").write_text('{"version": 1, "cyc')

    with pytest.raises(AssertionError, match=r"report\.json does not match"):
        check_reports_under(root)


def test_status_json_before_any_cycle_also_validates(tmp_path):
    engine = engine_writing_to(str(tmp_path / "report.json"))
    document = status_document({"ok": True, "op": "status", **engine.status()})
    assert document == {**empty_document(), "daemon": document["daemon"]}
    (tmp_path / "status.json").write_text(json.dumps(document))
    assert check_reports_under(tmp_path) == 1
