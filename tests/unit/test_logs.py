"""The hook log lines administrators grep, journald fields, and logging that never blocks."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from qgafreeze.engine import CycleReport
from qgafreeze.logs import MSG_APP_DONE, MSG_CYCLE_DONE, LogWriter, hook_log_date
from qgafreeze.outcome import AppOutcome

DATE = r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d \S+ \d{4}"


class Journal:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.gate = threading.Event()
        self.gate.set()

    def send(self, message: str, **fields: Any) -> None:
        self.gate.wait(10)
        self.records.append({"MESSAGE": message, **fields})


def outcome(result: str = "ok", **kw: Any) -> AppOutcome:
    defaults = dict(
        app="mariadb",
        phase="freeze",
        result=result,
        duration_ms=612,
        output=("stopping mariadb.service", "mariadb.service: stopped"),
        units=("mariadb.service",),
        actions=("units",),
    )
    defaults.update(kw)
    return AppOutcome(**defaults)


def test_date_is_formatted_as_date_prints_it():
    assert re.fullmatch(DATE, hook_log_date(time.time()))


def test_hook_log_has_execute_output_and_finished_lines(tmp_path):
    path = tmp_path / "hook.log"
    writer = LogWriter(str(path), None)
    writer.app_started("c1", "freeze", "mariadb")
    writer.app_finished("c1", outcome())
    assert writer.flush(5)
    lines = path.read_text().splitlines()
    assert re.fullmatch(DATE + r": execute qgafreeze:mariadb freeze", lines[0])
    assert lines[1:3] == ["stopping mariadb.service", "mariadb.service: stopped"]
    assert re.fullmatch(DATE + r": qgafreeze:mariadb finished with status=0", lines[3])


def test_failure_and_timeout_have_non_zero_status_and_say_why(tmp_path):
    path = tmp_path / "hook.log"
    writer = LogWriter(str(path), None)
    writer.app_finished("c1", outcome("failed", message="stop job failed"))
    writer.app_finished("c1", outcome("timeout", message="did not finish", app="shop"))
    assert writer.flush(5)
    text = path.read_text()
    assert "failed: stop job failed" in text
    assert "qgafreeze:mariadb finished with status=1" in text
    assert "qgafreeze:shop finished with status=124" in text


def test_rollback_is_logged_as_a_thaw(tmp_path):
    path = tmp_path / "hook.log"
    journal = Journal()
    writer = LogWriter(str(path), journal.send)
    writer.app_started("c1", "rollback", "mariadb")
    writer.app_finished("c1", outcome(phase="rollback"))
    assert writer.flush(5)
    assert "execute qgafreeze:mariadb thaw" in path.read_text()
    assert journal.records[0]["QGAFREEZE_PHASE"] == "thaw"
    assert journal.records[0]["QGAFREEZE_REASON"] == "rollback"


def test_journal_records_carry_the_documented_fields():
    journal = Journal()
    writer = LogWriter(None, journal.send)
    writer.app_finished("c1", outcome())
    writer.cycle_finished(CycleReport(op="freeze", cycle="c1", reason="request", duration_ms=700))
    assert writer.flush(5)
    app, cycle = journal.records
    assert app["MESSAGE_ID"] == MSG_APP_DONE
    assert app["SYSLOG_IDENTIFIER"] == "qgafreeze"
    assert {k: app[k] for k in app if k.startswith("QGAFREEZE_")} == {
        "QGAFREEZE_CYCLE": "c1",
        "QGAFREEZE_PHASE": "freeze",
        "QGAFREEZE_APP": "mariadb",
        "QGAFREEZE_ACTION": "units",
        "QGAFREEZE_UNIT": "mariadb.service",
        "QGAFREEZE_RESULT": "ok",
        "QGAFREEZE_DURATION_MS": "612",
        "QGAFREEZE_OUTPUT": "stopping mariadb.service\nmariadb.service: stopped",
    }
    assert cycle["MESSAGE_ID"] == MSG_CYCLE_DONE
    assert cycle["QGAFREEZE_RESULT"] == "ok"
    assert cycle["QGAFREEZE_CYCLE"] == "c1"


def test_a_blocked_journal_never_blocks_the_caller():
    journal = Journal()
    journal.gate.clear()  # journald stuck, as when it writes to a frozen disk
    writer = LogWriter(None, journal.send)
    for _ in range(100):
        writer.app_finished("c1", outcome())  # returns at once: only a queue put
    assert writer.flush(0.05) is False  # bounded wait, and it says the records are not out
    journal.gate.set()
    assert writer.flush(5)
    assert len(journal.records) == 100


def test_unwritable_hook_log_is_reported_once_and_the_rest_still_flows(tmp_path):
    journal = Journal()
    writer = LogWriter(str(tmp_path / "missing-dir" / "hook.log"), journal.send)
    writer.app_finished("c1", outcome())
    writer.app_finished("c1", outcome())
    assert writer.flush(5)
    problems = [r for r in journal.records if "cannot write the hook log" in r["MESSAGE"]]
    assert len(problems) == 1
    assert "No such file or directory" in writer.hook_log_error
    assert sum(r["MESSAGE"].startswith("mariadb: freeze ok") for r in journal.records) == 2
