"""The hook log lines administrators grep, journald fields, and logging that never blocks."""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qgafreeze.actioncontext import StepReport
from qgafreeze.engine import CycleReport
from qgafreeze.hooklog import OUTPUT_MARK, hook_log_date
from qgafreeze.logs import MSG_APP_DONE, MSG_CYCLE_DONE, LogWriter
from qgafreeze.outcome import AppOutcome

DATE = r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d \S+ \d{4}"
FAKE_FINISHED = "Thu Nov 23 13:38:06 MSK 2023: qgafreeze:mariadb finished with status=0"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


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
    assert lines[1:3] == [
        OUTPUT_MARK + "stopping mariadb.service",
        OUTPUT_MARK + "mariadb.service: stopped",
    ]
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


# -- the hook log's file: root appends only to its own log, in a directory only root can write --


def log_dir(tmp_path: Path, mode: int = 0o755) -> Path:
    directory = tmp_path / "log"
    directory.mkdir()
    directory.chmod(mode)
    return directory


def write_one_app(path: Path, journal: Journal | None = None) -> LogWriter:
    writer = LogWriter(str(path), None if journal is None else journal.send)
    writer.app_finished("c1", outcome())
    assert writer.flush(5)
    return writer


def root_only_file(tmp_path: Path) -> Path:
    secret = tmp_path / "secret"
    secret.write_text("root's own\n")
    secret.chmod(0o600)
    return secret


def test_a_symlink_at_the_hook_log_path_is_refused_and_its_target_left_alone(tmp_path):
    secret = root_only_file(tmp_path)
    log = log_dir(tmp_path) / "hook.log"
    log.symlink_to(secret)
    journal = Journal()
    writer = write_one_app(log, journal)
    assert secret.read_text() == "root's own\n"
    assert "symbolic link" in writer.hook_log_error
    assert sum("cannot write the hook log" in r["MESSAGE"] for r in journal.records) == 1
    log.unlink()  # the administrator removes it: the next burst writes again
    writer.app_finished("c1", outcome())
    assert writer.flush(5)
    assert "qgafreeze:mariadb finished with status=0" in log.read_text()
    assert writer.hook_log_error == ""


def test_a_hard_link_to_another_file_is_refused(tmp_path):
    secret = root_only_file(tmp_path)
    log = log_dir(tmp_path) / "hook.log"
    os.link(secret, log)
    writer = write_one_app(log)
    assert secret.read_text() == "root's own\n"
    assert "2 links" in writer.hook_log_error


def test_a_fifo_at_the_hook_log_path_is_refused_without_waiting_for_a_reader(tmp_path):
    log = log_dir(tmp_path) / "hook.log"
    os.mkfifo(log)
    writer = write_one_app(log)  # flush(5) fails if the writer waits for a reader
    assert writer.hook_log_error


@needs_root
def test_a_hook_log_owned_by_someone_else_is_refused(tmp_path):
    log = log_dir(tmp_path) / "hook.log"
    log.write_text("")
    os.chown(log, 65534, 65534)
    writer = write_one_app(log)
    assert log.read_text() == ""
    assert "owned by uid 65534" in writer.hook_log_error


@pytest.mark.parametrize("mode", [0o777, 0o1777], ids=["world-writable", "sticky"])
def test_a_hook_log_in_a_directory_others_can_write_is_refused_and_not_created(tmp_path, mode):
    log = log_dir(tmp_path, mode) / "hook.log"
    writer = write_one_app(log)
    assert not log.exists()
    assert "writable by everyone" in writer.hook_log_error


@needs_root
def test_a_hook_log_in_a_directory_another_group_can_write_is_refused(tmp_path):
    directory = log_dir(tmp_path, 0o775)
    os.chown(directory, 0, 65534)
    writer = write_one_app(directory / "hook.log")
    assert not (directory / "hook.log").exists()
    assert "writable by group id 65534" in writer.hook_log_error


@needs_root
def test_a_hook_log_in_a_directory_a_system_group_can_write_is_used_as_on_ubuntu(tmp_path):
    # Ubuntu's rsyslog keeps /var/log 0775 root:syslog; the file itself must still be root's.
    directory = log_dir(tmp_path, 0o775)
    os.chown(directory, 0, 4)  # a system group (adm on Debian)
    writer = write_one_app(directory / "hook.log")
    assert writer.hook_log_error == ""
    assert "finished with status=0" in (directory / "hook.log").read_text()


def test_a_hook_log_below_a_directory_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could rename "logs" and put their own in its place
    (shared / "logs").mkdir(mode=0o755)
    writer = write_one_app(shared / "logs" / "hook.log")
    assert not (shared / "logs" / "hook.log").exists()
    assert f"{shared} is writable by everyone" in writer.hook_log_error


def test_a_new_hook_log_is_created_0600_and_an_old_0644_one_made_0600(tmp_path):
    directory = log_dir(tmp_path)
    write_one_app(directory / "new.log")
    assert stat.S_IMODE((directory / "new.log").stat().st_mode) == 0o600
    old = directory / "old.log"
    old.write_text("earlier lines\n")
    old.chmod(0o644)
    write_one_app(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert old.read_text().startswith("earlier lines\n")


# -- command output in the hook log: marked, so it never passes for a qgafreeze line -----------


def test_command_output_can_never_pass_for_a_qgafreeze_line(tmp_path):
    log = log_dir(tmp_path) / "hook.log"
    writer = LogWriter(str(log), None)
    fakes = (FAKE_FINISHED, "noise\r" + FAKE_FINISHED, "noise\n" + FAKE_FINISHED)
    writer.app_started("c1", "freeze", "mariadb")
    writer.step_finished(
        "c1", "mariadb", StepReport("exec", "/usr/bin/flush", "freeze", time.time(), 1, fakes)
    )
    writer.app_finished("c1", outcome("failed", message="x\n" + FAKE_FINISHED, output=fakes))
    assert writer.flush(5)
    text = log.read_text()
    assert "\r" not in text  # a terminal would draw the fake over its own line
    lines = text.split("\n")
    ours = [line for line in lines if re.match(DATE + ": ", line)]
    assert len(ours) == 4  # execute the app, execute the step, the step's finished, the app's
    assert [line for line in ours if "qgafreeze:mariadb finished" in line] == [ours[-1]]
    assert ours[-1].endswith("qgafreeze:mariadb finished with status=1")
    assert sum(line.endswith(FAKE_FINISHED) for line in lines) == 7  # every fake kept, marked


def test_control_characters_in_output_are_shown_escaped_in_the_hook_log_and_journald(tmp_path):
    log = log_dir(tmp_path) / "hook.log"
    journal = Journal()
    writer = LogWriter(str(log), journal.send)
    output = ("\x1b[2J\x1b]0;owned\x07cleared", "tab\tstays", "del\x7f c1\x9b bidi\u202e")
    writer.app_finished("c1", outcome(output=output))
    assert writer.flush(5)
    text = log.read_text()
    assert "\\x1b[2J\\x1b]0;owned\\x07cleared" in text
    assert "tab\tstays" in text
    assert "del\\x7f c1\\x9b bidi\\u202e" in text
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", text)
    field = journal.records[0]["QGAFREEZE_OUTPUT"]
    assert field.split("\n") == [
        "\\x1b[2J\\x1b]0;owned\\x07cleared",
        "tab\tstays",
        "del\\x7f c1\\x9b bidi\\u202e",
    ]
