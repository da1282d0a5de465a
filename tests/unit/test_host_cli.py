"""qgafreeze-host's own logic: qemu-ga's line protocol against a peer that speaks it on a unix
socket (framing, sync, ordering, errors, silence), the backup flow's promises (the thaw always
sent, exit statuses, stale and missing reports, escaped guest text), and make install-host.
The real proof, against a real qemu-ga, is tests/e2e/test_host_client.py."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import jsonschema
import pytest

from qgafreeze import paths
from qgafreeze_host import cli
from qgafreeze_host.agent import Agent, AgentError, Unreachable

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs" / "cycle-report.schema.json").read_text())
HOOK_ERROR = (
    "child process has failed to execute fsfreeze hook: qgafreeze: freeze FAILED"
    " [freeze-failed]: stubborn failed: refused to stop (1200 ms, cycle c2)\n"
    "qgafreeze:   stubborn: freeze failed in 1200 ms: refused to stop\n"
)


def phase(reason: str = "request", ok: bool = True) -> dict[str, Any]:
    at = "2026-11-26T08:00:50.123Z"
    return {
        "reason": reason,
        "ok": ok,
        "started_at": at,
        "finished_at": at,
        "duration_ms": 1054,
        "error": None if ok else {"code": "freeze-failed", "message": "stubborn failed"},
    }


def app_entry(
    name: str, result: str = "ok", quiesced: bool = True, note: str = ""
) -> dict[str, Any]:
    return {
        "app": name,
        "actions": ["session"],
        "units": [],
        "mode": "stop",
        "preset": "mariadb",
        "on_failure": "abort",
        "guarantee": "writes blocked, tables flushed",
        "quiesced": quiesced,
        "note": note,
        "freeze": {"phase": "freeze", "result": result, "duration_ms": 523, "message": ""},
        "thaw": {"phase": "thaw", "result": "ok", "duration_ms": 210, "message": ""},
        "details": {},
    }


def report(cycle: str, verdict: str = "application-consistent", **changes: Any) -> dict[str, Any]:
    doc = {
        "version": 1,
        "cycle": cycle,
        "phase": "thaw",
        "reason": "request",
        "verdict": verdict,
        "verdict_reasons": [],
        "freeze": phase(),
        "thaw": phase(),
        "apps": [app_entry("mariadb")],
        "filesystems_thawed": None,
        **changes,
    }
    jsonschema.validate(doc, SCHEMA)  # the fakes' reports are ones the daemon could write
    return doc


class FakeQemuGA:
    """A peer speaking qemu-ga's line protocol on a unix socket, one client at a time, answering
    in order as qemu-ga's single main loop does.  ``files`` holds what guest-file-read serves;
    ``on_freeze``/``on_thaw`` say what those commands do (a return value, or an AgentError-like
    ``{"error": desc}``) and may change ``files``, as the daemon rewrites its report."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.files: dict[str, bytes] = {}
        self.received: list[str] = []
        self.frozen = False
        self.freeze_delay = 0.0
        self.freeze_answer: Any = 1
        self.thaw_answer: Any = 1
        self.after_freeze: Optional[dict[str, Any]] = None  # the report the freeze writes
        self.debris = b""  # what an earlier client left unread in the channel
        self.silent = False
        self._handles: dict[int, tuple[bytes, int]] = {}
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def set_report(self, doc: dict[str, Any]) -> None:
        self.files[cli.REPORT_FILE] = json.dumps(doc).encode()

    def close(self) -> None:
        self._server.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        if self.debris:
            conn.sendall(self.debris)
        buf = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.replace(b"\xff", b"")  # qemu-ga's parser resets on 0xff
                if line.strip() and not self.silent:
                    conn.sendall(self._answer(json.loads(line)))

    def _answer(self, request: dict[str, Any]) -> bytes:
        command = request["execute"]
        args = request.get("arguments", {})
        self.received.append(command)
        result = self._run(command, args)
        prefix = b"\xff" if command == "guest-sync-delimited" else b""
        if isinstance(result, dict) and set(result) == {"error"}:
            message = {"error": {"class": "GenericError", "desc": result["error"]}}
        else:
            message = {"return": result}
        return prefix + json.dumps(message).encode() + b"\n"

    def _run(self, command: str, args: dict[str, Any]) -> Any:
        if command == "guest-sync-delimited":
            return args["id"]
        if command == "guest-fsfreeze-freeze":
            time.sleep(self.freeze_delay)
            if self.after_freeze is not None:
                self.set_report(self.after_freeze)
            self.frozen = not isinstance(self.freeze_answer, dict)
            return self.freeze_answer
        if command == "guest-fsfreeze-thaw":
            self.frozen = False
            return self.thaw_answer
        if command == "guest-file-open":
            if args["path"] not in self.files:
                return {"error": f"failed to open file '{args['path']}' (mode: 'r'): No such file"}
            handle = len(self._handles) + 1000
            self._handles[handle] = (self.files[args["path"]], 0)
            return handle
        if command == "guest-file-read":
            data, offset = self._handles[args["handle"]]
            piece = data[offset : offset + args["count"]]
            self._handles[args["handle"]] = (data, offset + len(piece))
            eof = offset + len(piece) >= len(data)
            return {"count": len(piece), "buf-b64": base64.b64encode(piece).decode(), "eof": eof}
        if command == "guest-file-close":
            self._handles.pop(args["handle"], None)
            return {}
        return {"error": f"The command {command} has not been found"}


@pytest.fixture
def qga(tmp_path: Path) -> Iterator[FakeQemuGA]:
    fake = FakeQemuGA(str(tmp_path / "qga.sock"))
    yield fake
    fake.close()


def run(*argv: str) -> tuple[int, str, str]:
    """qgafreeze-host as a user runs it: its own process, its exit status and what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "qgafreeze_host", *argv],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def backup(qga: FakeQemuGA, *extra: str, hold: bool = False) -> tuple[int, str, str]:
    """A backup whose snapshot is /bin/true unless the test names one; ``hold``: none at all,
    so the client keeps the guest frozen for its default time instead."""
    if not hold and "--snapshot-cmd" not in extra:
        extra = (*extra, "--snapshot-cmd", "true")
    return run("backup", "--qga-socket", qga.path, *extra)


def test_a_backup_freezes_snapshots_while_frozen_thaws_and_reads_an_application_consistent_report(
    qga, tmp_path
):
    qga.set_report(report("c1"))
    qga.after_freeze = report("c2")
    seen = tmp_path / "seen"
    snapshot = f"sh -c 'echo snapshot taken > {seen}'"
    status, out, err = backup(qga, "--snapshot-cmd", snapshot)
    assert status == cli.Exit.APPLICATION_CONSISTENT, err
    assert seen.read_text() == "snapshot taken\n"
    sent = [c for c in qga.received if not c.startswith("guest-file")]
    assert sent == ["guest-sync-delimited", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert qga.received[-3:] == ["guest-file-open", "guest-file-read", "guest-file-close"]
    assert out.splitlines() == [
        "qgafreeze-host: application-consistent (cycle c2, freeze 1054 ms)",
        "  mariadb: freeze ok in 523 ms, thaw ok in 210 ms: writes blocked, tables flushed",
    ]


def test_the_snapshot_command_runs_while_the_guest_is_frozen_and_without_a_shell(qga, tmp_path):
    qga.set_report(report("c1"))
    qga.after_freeze = report("c2")
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import sys\nprint(sys.argv[1:], file=open({str(tmp_path / 'argv')!r}, 'w'))\n"
    )
    status, _, err = backup(qga, "--snapshot-cmd", f"{sys.executable} {probe} 'a b' '$HOME' ';'")
    assert status == 0, err
    assert (tmp_path / "argv").read_text() == "['a b', '$HOME', ';']\n"


def test_the_thaw_is_sent_after_a_refused_freeze_whose_first_line_names_the_failed_app(qga):
    qga.set_report(report("c1"))
    qga.freeze_answer = {"error": HOOK_ERROR}
    failed = report("c2", "failed", freeze=phase(ok=False), verdict_reasons=["stubborn failed"])
    failed["apps"] = [app_entry("stubborn", "failed", False, "the freeze failed")]
    qga.after_freeze = failed
    status, out, err = backup(qga)
    assert status == cli.Exit.FAILED
    assert qga.received.count("guest-fsfreeze-thaw") == 1
    assert (
        "qemu-ga refused the freeze: child process has failed to execute fsfreeze hook: qgafreeze:"
        " freeze FAILED [freeze-failed]: stubborn failed: refused to stop (1200 ms, cycle c2)"
        " (+1 more lines)"
    ) in err
    assert out.splitlines()[0] == (
        "qgafreeze-host: failed (cycle c2, freeze 1054 ms): stubborn failed"
    )
    assert "  stubborn: freeze failed in 523 ms, thaw ok in 210 ms: the freeze failed" in out


def test_the_thaw_is_sent_after_a_failed_snapshot_command_and_the_backup_fails(qga):
    qga.set_report(report("c1"))
    qga.after_freeze = report("c2")
    status, _, err = backup(qga, "--snapshot-cmd", "sh -c 'exit 3'")
    assert status == cli.Exit.FAILED
    assert qga.received.count("guest-fsfreeze-thaw") == 1 and not qga.frozen
    assert "sh -c 'exit 3' exited with status 3" in err


def test_a_snapshot_command_that_outlasts_the_timeout_is_killed_and_the_guest_thawed(qga):
    qga.set_report(report("c1"))
    started = time.monotonic()
    status, _, err = backup(qga, "--timeout", "1", "--snapshot-cmd", "sh -c 'sleep 30 & wait'")
    assert time.monotonic() - started < 20
    assert status == cli.Exit.FAILED
    assert "did not end in 1 s (killed)" in err
    assert not qga.frozen


def test_a_crash_consistent_report_exits_1_and_says_which_app_was_not_quiesced(qga):
    qga.set_report(report("c1"))
    note = "not quiesced: its freeze failed (stop job failed)"
    crash = report("c2", "crash-consistent", verdict_reasons=[f"cache: {note}"])
    crash["apps"].append(app_entry("cache", "failed", False, note))
    qga.after_freeze = crash
    status, out, _ = backup(qga)
    assert status == cli.Exit.CRASH_CONSISTENT
    assert f"  cache: freeze failed in 523 ms, thaw ok in 210 ms: {note}" in out.splitlines()


def test_a_report_of_an_earlier_cycle_is_stale_and_claims_no_consistency(qga):
    qga.set_report(report("c1"))  # the freeze leaves it alone: its hook never reached qgafreeze
    status, out, err = backup(qga, "--json")
    assert status == cli.Exit.UNKNOWN
    assert json.loads(out) is None
    assert "still that of cycle c1, from before this freeze" in err


def test_a_guest_without_qgafreeze_has_no_report_and_the_client_says_so(qga):
    status, out, err = backup(qga)
    assert status == cli.Exit.UNKNOWN
    assert out == ""
    assert "no qgafreeze report in the guest" in err and "No such file" in err
    assert qga.received.count("guest-fsfreeze-thaw") == 1


def test_json_prints_this_freezes_report_as_the_guest_wrote_it(qga):
    qga.set_report(report("c1"))
    qga.after_freeze = report("c2")
    status, out, _ = backup(qga, "--json", hold=True)
    assert status == 0
    assert json.loads(out) == report("c2")


def test_what_the_guest_wrote_is_printed_with_its_control_characters_escaped(qga):
    qga.set_report(report("c1"))
    hostile = report("c2")
    hostile["apps"][0]["app"] = "db\x1b[2J"
    hostile["apps"][0]["guarantee"] = "fine\nqgafreeze-host: application-consistent"
    qga.after_freeze = hostile
    qga.freeze_answer = {"error": "hook says \x1b]0;owned\x07 and \u202e"}
    status, out, err = backup(qga)
    assert status == cli.Exit.FAILED
    assert "\x1b" not in out + err and "\u202e" not in err
    assert "db\\x1b[2J: freeze ok" in out
    assert "fine\\x0aqgafreeze-host: application-consistent" in out
    assert "hook says \\x1b]0;owned\\x07 and \\u202e" in err
    assert len(out.splitlines()) == 2


def test_report_reads_the_last_report_without_freezing(qga):
    qga.set_report(report("c7", "crash-consistent"))
    status, out, _ = run("report", "--qga-socket", qga.path)
    assert status == cli.Exit.CRASH_CONSISTENT
    assert out.startswith("qgafreeze-host: crash-consistent (cycle c7")
    assert "guest-fsfreeze-freeze" not in qga.received
    assert "guest-fsfreeze-thaw" not in qga.received


def test_an_unreachable_socket_exits_3_in_one_line(tmp_path):
    status, out, err = run("report", "--qga-socket", str(tmp_path / "nothing.sock"))
    assert status == cli.Exit.UNREACHABLE
    assert out == ""
    assert err.splitlines() == [
        f"qgafreeze-host: cannot connect to qemu-ga at {tmp_path / 'nothing.sock'}: No such file"
        " or directory"
    ]


def test_an_agent_that_never_answers_is_given_up_on_within_the_timeout(qga):
    qga.silent = True
    agent = Agent(qga.path, reply_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(Unreachable, match="did not answer in 0.5 s"):
        agent.sync(0.5)
    assert time.monotonic() - started < 5
    agent.close()


def test_sync_skips_what_an_earlier_client_left_unread_in_the_channel(qga):
    qga.debris = b'{"return": 7}\n\xff{"return": 12345}\nnot json at all\n{"retu'
    agent = Agent(qga.path)
    assert agent.call("guest-fsfreeze-thaw") == 1
    agent.close()
    # The partial answer before qemu-ga's 0xff delimiter is dropped, not waited out and resent.
    assert qga.received == ["guest-sync-delimited", "guest-fsfreeze-thaw"]


def test_an_unanswered_freeze_is_followed_by_a_thaw_once_qemu_ga_answers_again(qga):
    qga.set_report(report("c1"))
    qga.freeze_delay = 1.0
    status, _, err = backup(qga, "--timeout", "0.5")
    assert status == cli.Exit.UNREACHABLE
    assert "no answer to the freeze" in err
    # qemu-ga answers in order: the sync before the thaw waited out the freeze's late answer.
    after = qga.received[qga.received.index("guest-fsfreeze-freeze") :]
    assert after[:3] == ["guest-fsfreeze-freeze", "guest-sync-delimited", "guest-fsfreeze-thaw"]
    assert not qga.frozen


def test_an_error_answer_names_the_command_and_keeps_qemu_gas_text(qga):
    agent = Agent(qga.path)
    with pytest.raises(AgentError) as caught:
        agent.call("guest-nonsense")
    assert caught.value.desc == "The command guest-nonsense has not been found"
    agent.close()


def test_usage_errors_exit_64(qga):
    assert run("backup")[0] == cli.Exit.USAGE
    assert run("backup", "--qga-socket", qga.path, "--snapshot-cmd", "'open")[0] == 64
    assert run("backup", "--qga-socket", qga.path, "--timeout", "0")[0] == 64
    assert qga.received == []


def exit_table_rows() -> list[str]:
    return [f"| {int(code)} | {meaning} |" for code, meaning in cli.EXIT_TABLE]


def test_the_exit_status_table_is_written_once_and_shown_by_help_readme_and_host_doc():
    help_text = run("backup", "--help")[1]
    for code, meaning in cli.EXIT_TABLE:
        assert re.search(rf"^  {int(code)}\s+{re.escape(meaning)}$", help_text, re.M), meaning
    for doc in (REPO / "README.md", REPO / "docs" / "host.md"):
        text = doc.read_text()
        table = "| status | meaning |\n| --- | --- |\n" + "\n".join(exit_table_rows()) + "\n"
        assert table in text, f"{doc.name} does not repeat qgafreeze_host.cli.EXIT_TABLE"
    assert len({code for code, _ in cli.EXIT_TABLE}) == len(cli.EXIT_TABLE)


def test_the_client_reads_the_report_where_the_daemon_writes_it():
    assert cli.REPORT_FILE == paths.REPORT_FILE


def test_the_client_imports_only_the_standard_library_and_itself():
    stdlib = sys.stdlib_module_names
    for module in (REPO / "src" / "qgafreeze_host").glob("*.py"):
        text = module.read_text()
        imported = re.findall(r"^(?:from|import) ([\w.]+)", text, flags=re.M)
        foreign = [
            name
            for name in imported
            if not name.startswith(".") and name.split(".")[0] not in stdlib | {"__future__"}
        ]
        assert foreign == [], f"{module.name} imports {foreign}"
        assert len(text.splitlines()) <= 400, f"{module.name} is over 400 lines"


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_install_host_installs_the_client_alone_and_uninstall_host_removes_it(tmp_path):
    def make(target: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        result = subprocess.run(
            [
                "make",
                "--no-print-directory",
                "-C",
                str(REPO),
                target,
                f"DESTDIR={tmp_path}",
                "PREFIX=/opt/qgf",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    make("install-host")
    installed = sorted(
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert installed == [
        "opt/qgf/bin/qgafreeze-host",
        *(
            f"opt/qgf/lib/qgafreeze-host/qgafreeze_host/{n}"
            for n in ("__init__.py", "__main__.py", "agent.py", "cli.py")
        ),
        "opt/qgf/share/doc/qgafreeze-host/cycle-report.schema.json",
        "opt/qgf/share/doc/qgafreeze-host/host.md",
    ]
    wrapper = (tmp_path / "opt/qgf/bin/qgafreeze-host").read_text()
    assert wrapper.startswith("#!/usr/bin/python3 -IB\n")
    assert 'sys.path.insert(0, "/opt/qgf/lib/qgafreeze-host")' in wrapper
    # What the hypervisor runs, from where it is installed, with no guest package anywhere.
    lib = tmp_path / "opt/qgf/lib/qgafreeze-host"
    probe = (
        f"import sys; sys.path.insert(0, {str(lib)!r}); sys.argv = ['qgafreeze-host', '--help']\n"
        "from qgafreeze_host.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'qgafreeze'], sys.modules\n"
    )
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "exit statuses:" in result.stdout
    make("uninstall-host")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
