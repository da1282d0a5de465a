"""The harness itself, checked against a real VM and the real qemu-guest-agent."""

from __future__ import annotations

import hashlib
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vm import VM, QGAError

REPO_ROOT = Path(__file__).resolve().parents[2]
_MARIADB_READY_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def vm(shared_guest: VM) -> Iterator[VM]:
    """The suite's shared guest: every test here leaves it thawed and running.  (A snapshot of
    it is opened by test_backup.py's restore test, and booted by test_restore_databases.py, which
    check what the harness's snapshot holds and that later writes never reach it.)"""
    print(f"boot to guest-ping: {shared_guest.boot_seconds:.1f} s")
    yield shared_guest


def _agent_pid(vm: VM) -> str:
    result = vm.exec(["systemctl", "show", "--property=MainPID", "--value", "qemu-guest-agent"])
    assert result.exitcode == 0, result.stderr
    return result.stdout.strip()


def test_guest_agent_answers_ping_and_runs_commands(vm: VM) -> None:
    vm.qga.ping()
    uname = vm.exec(["uname", "-r"])
    assert uname.exitcode == 0
    assert uname.stdout.strip().endswith("-amd64")
    assert vm.exec(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    failing = vm.exec(["sh", "-c", "echo oops >&2; exit 3"])
    assert (failing.exitcode, failing.stderr) == (3, "oops\n")
    assert vm.exec(["cat"], input=b"fed through stdin").stdout == "fed through stdin"


def test_files_round_trip_through_the_agent(vm: VM) -> None:
    # Over a megabyte of every byte value: more than one chunk each way, nothing text-only.
    data = secrets.token_bytes(1_300_000) + bytes(range(256))
    vm.qga.write_file("/root/roundtrip.bin", data)
    assert vm.qga.read_file("/root/roundtrip.bin") == data
    checksum = vm.exec(["sha256sum", "/root/roundtrip.bin"]).stdout.split()[0]
    assert checksum == hashlib.sha256(data).hexdigest()
    with pytest.raises(QGAError):
        vm.qga.read_file("/root/no-such-file")


def test_checkout_is_mounted_read_only_at_src(vm: VM) -> None:
    assert vm.qga.read_file("/src/README.md") == (REPO_ROOT / "README.md").read_bytes()
    mount = vm.exec(["findmnt", "--noheadings", "--output=FSTYPE,OPTIONS", "/src"]).stdout.split()
    assert mount[0] == "9p"
    assert "ro" in mount[1].split(",")
    write = vm.exec(["touch", "/src/qgf-write-probe"])
    assert write.exitcode != 0
    assert "Read-only file system" in write.stderr
    assert not (REPO_ROOT / "qgf-write-probe").exists()


def test_agent_freezes_and_thaws_the_root_filesystem(vm: VM) -> None:
    assert vm.qga.fsfreeze_status() == "thawed"
    try:
        assert vm.qga.fsfreeze_freeze() >= 1
        assert vm.qga.fsfreeze_status() == "frozen"
        # qemu-ga 7.2 says the command is refused while frozen; 10.0 that it is disabled.
        with pytest.raises(QGAError, match="frozen|has been disabled"):
            vm.exec(["true"])
        vm.qga.ping()
    finally:
        thawed = vm.qga.fsfreeze_thaw()
    assert thawed >= 1
    assert vm.qga.fsfreeze_status() == "thawed"
    assert vm.exec(["true"]).exitcode == 0


def test_freezing_a_list_that_matches_nothing_returns_zero(vm: VM) -> None:
    try:
        assert vm.qga.fsfreeze_freeze_list(["/qgf-not-a-mountpoint"]) == 0
    finally:
        # qemu-ga may count itself frozen even when it froze nothing; leave it usable.
        vm.qga.fsfreeze_thaw()
    assert vm.qga.fsfreeze_status() == "thawed"


def test_run_unit_survives_a_guest_agent_restart(vm: VM) -> None:
    before = _agent_pid(vm)
    result = vm.run_unit("systemctl restart qemu-guest-agent; echo done; echo err >&2; exit 7")
    assert (result.exitcode, result.stdout, result.stderr) == (7, "done\n", "err\n")
    after = _agent_pid(vm)
    assert after not in ("", "0", before)
    vm.qga.ping()


def test_run_unit_reports_exit_status_and_passes_dollar_signs_to_the_command(vm: VM) -> None:
    shell = vm.run_unit("echo $HOME $((6 * 7)); exit 3")
    assert (shell.exitcode, shell.stdout) == (3, "/root 42\n")
    assert vm.run_unit(["sh", "-c", "kill -TERM $$"]).exitcode == -signal.SIGTERM


def test_mariadb_runs_in_the_guest(vm: VM) -> None:
    deadline = time.monotonic() + _MARIADB_READY_TIMEOUT
    # The module's VM answers ping before the boot has finished starting everything.
    while (state := vm.exec(["systemctl", "is-active", "mariadb"]).stdout.strip()) != "active":
        assert state in ("activating", "inactive") and time.monotonic() < deadline, state
        time.sleep(1)
    query = vm.exec(["mariadb", "--batch", "--skip-column-names", "-e", "select 1"])
    assert (query.exitcode, query.stdout) == (0, "1\n"), query.stderr
