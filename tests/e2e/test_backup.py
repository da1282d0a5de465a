"""A backup as a backup service takes it: the real qemu-ga in a real VM runs qgafreeze's hook,
MariaDB is quiesced, the disk is snapshotted while frozen, and the release's own MariaDB server
opens the snapshot's data directory to prove what it holds.  The tests marked EVERY_SUITE run on
each Debian release; the rest on trixie.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator

import pytest
from guest import (
    HOOK,
    HOOK_OUTPUT_IN_ERROR,
    MARIADB_APP,
    NO_APPS,
    acks,
    app_records,
    backup,
    configure,
    mariadb_active,
    mariadb_in_copy,
    qemu_ga_version,
    qgafreeze_status,
    run_in_background,
    sh,
    start_load,
    start_watcher,
    stop_load,
    stop_watcher,
    wait_for,
    wait_for_acks,
)
from vm import VM, QGAError, QGATimeout

EVERY_SUITE = pytest.mark.suites("bullseye", "bookworm", "trixie")


STUBBORN = "/etc/systemd/system/qgf-stubborn.service"


@pytest.fixture(scope="module")
def guest(shared_guest: VM) -> Iterator[VM]:
    assert f"fsfreeze-hook={HOOK}" in sh(shared_guest, "cat /etc/qemu/qemu-ga.conf").stdout
    yield shared_guest
    if not shared_guest.running():
        # Killed after its last user, before pytest got round to this teardown (a parametrized
        # module fixture is torn down when the next suite's test is set up): nothing to clean.
        return
    # The guest is shared with the next modules: take away what the tests here left running.
    sh(
        shared_guest,
        f"systemctl kill -s KILL qgf-stubborn.service; rm -f {STUBBORN}; systemctl daemon-reload;"
        " systemctl reset-failed",
        check=False,
    )


@pytest.fixture
def mariadb_guest(guest: VM) -> VM:
    configure(guest, MARIADB_APP)
    sh(guest, "truncate -s0 /var/log/qga-fsfreeze-hook.log; systemctl start mariadb.service")
    wait_for(guest, "systemctl is-active mariadb.service")
    return guest


def test_mariadb_is_down_for_the_whole_frozen_window_and_back_after_thaw(mariadb_guest):
    vm = mariadb_guest
    start_watcher(vm)
    wait_for(vm, "test $(wc -l < /run/qgf-watch.log) -ge 3")
    run = backup(vm, frozen_seconds=5)
    assert run.frozen >= 1
    wait_for(vm, "systemctl is-active mariadb.service")
    samples = stop_watcher(vm)

    cycle = qgafreeze_status(vm)["cycle"]
    records = {(r["QGAFREEZE_APP"], r["QGAFREEZE_PHASE"]): r for r in app_records(vm, cycle)}
    assert set(records) == {("mariadb", "freeze"), ("mariadb", "thaw")}
    for record in records.values():
        assert record["QGAFREEZE_RESULT"] == "ok"
        assert record["QGAFREEZE_UNIT"] == "mariadb.service"
        assert record["SYSLOG_IDENTIFIER"] == "qgafreeze"
    stopped = int(records[("mariadb", "freeze")]["__REALTIME_TIMESTAMP"]) * 1000
    thaw = records[("mariadb", "thaw")]
    restarting = (
        int(thaw["__REALTIME_TIMESTAMP"]) * 1000 - int(thaw["QGAFREEZE_DURATION_MS"]) * 10**6
    )
    # The hook stopped MariaDB before qemu-ga froze, and started it only after the thaw.
    assert stopped <= run.freeze_returned
    assert restarting >= run.thaw_sent - 10**9  # host/guest clock comparison: 1 s of slack
    window = [s for s in samples if run.freeze_returned <= s[0] <= run.thaw_sent]
    # Seen down early and late in the window; how many samples fit in it depends on how fast a
    # software-emulated guest runs the watcher (4 in 5 s on a loaded 2-core host), not on us.
    middle = (run.freeze_returned + run.thaw_sent) // 2
    assert any(t < middle for t, _, _ in window) and any(t >= middle for t, _, _ in window), samples
    # Down, and no client could start it again through mariadb.socket, the whole window.
    assert all(state != "active" and client == "out" for _, state, client in window), window
    assert samples[-1][1:] == ("active", "in")

    log = sh(vm, "cat /var/log/qga-fsfreeze-hook.log").stdout
    assert re.search(r": execute qgafreeze:mariadb freeze$", log, re.M), log
    assert re.search(r": execute qgafreeze:mariadb thaw$", log, re.M), log
    assert len(re.findall(r": qgafreeze:mariadb finished with status=0$", log, re.M)) == 2, log


@EVERY_SUITE
def test_restored_snapshot_holds_every_acknowledged_insert_without_crash_recovery(
    mariadb_guest, tmp_path
):
    vm = mariadb_guest
    before, after = secrets.token_hex(8), secrets.token_hex(8)
    vm.qga.write_file("/root/marker-before", before.encode())
    start_load(vm, first_id=1_000_000)
    wait_for_acks(vm, 20)
    run = backup(vm, snapshot_to=tmp_path / "after-qgafreeze.qcow2")
    stamp = run.snapshot.stat()
    # The harness's snapshot: the guest writes into a new top from now on, never into it.
    assert vm.overlay == tmp_path / "after-qgafreeze.qcow2"
    vm.qga.write_file("/root/marker-after", after.encode())
    sh(vm, "sync")
    wait_for(vm, "systemctl is-active mariadb.service")
    wait_for_acks(vm, len(acks(vm)) + 5)  # the load goes on after the thaw
    stop_load(vm)
    # MariaDB was stopped cleanly before the freeze and started after the thaw: every insert
    # acknowledged before the thaw was sent is in the snapshot.
    acknowledged = {i for t, i in acks(vm) if t < run.thaw_sent}
    assert len(acknowledged) >= 20

    assert (run.snapshot.stat().st_mtime_ns, run.snapshot.stat().st_size) == (
        stamp.st_mtime_ns,
        stamp.st_size,
    )

    # Restored as an admin restores a database's files: the release's own server opens the
    # snapshot's data directory (a writable copy, in the live guest; booting the snapshot would
    # cost this tier a guest boot per release, and trixie's restore_databases module boots one).
    # The control below opens the same kind of copy and does see crash recovery.
    copy = mariadb_in_copy(vm, run.snapshot, files=("/root/marker-before", "/root/marker-after"))
    assert copy.files == {"/root/marker-before": before, "/root/marker-after": None}
    assert acknowledged <= copy.ids
    assert copy.crash_recovery == []
    assert copy.check.split()[-1] == "OK", copy.check


def test_without_quiesced_apps_the_snapshot_needs_crash_recovery(mariadb_guest, tmp_path):
    # The same backup with no app declared: a filesystem freeze only. The snapshot is what a
    # power cut leaves; InnoDB recovers it, which is exactly what qgafreeze spares.  (This is
    # also the control for the restore above, opened the same way: it can tell crash recovery.)
    vm = mariadb_guest
    configure(vm, NO_APPS)
    start_load(vm, first_id=2_000_000)
    wait_for_acks(vm, 20)
    run = backup(vm, snapshot_to=tmp_path / "after-fsfreeze-only.qcow2")
    stop_load(vm)
    before_freeze = {i for t, i in acks(vm) if t < run.freeze_sent - 2 * 10**8}
    assert len(before_freeze) >= 10  # (the 0.2 s margin for clock skew drops the last few)

    copy = mariadb_in_copy(vm, run.snapshot)
    assert before_freeze <= copy.ids  # InnoDB is crash-safe, but ...
    assert copy.crash_recovery, "expected InnoDB crash recovery in the snapshot's copy"
    assert copy.check.split()[-1] == "OK", copy.check


@EVERY_SUITE
def test_failing_app_fails_the_freeze_and_leaves_nothing_frozen_or_stopped(mariadb_guest):
    vm = mariadb_guest
    sh(
        vm,
        "printf '[Unit]\\nRefuseManualStop=yes\\n[Service]\\nExecStart=/bin/sleep infinity\\n'"
        f" > {STUBBORN}"
        " && systemctl daemon-reload && systemctl start qgf-stubborn.service",
    )
    configure(vm, MARIADB_APP + "  stubborn:\n    units: [qgf-stubborn.service]\n")
    with pytest.raises(QGAError) as caught:
        vm.qga.fsfreeze_freeze()
    # Each release is held to what its qemu-ga can tell a backup service.
    if qemu_ga_version(vm) >= HOOK_OUTPUT_IN_ERROR:
        assert "fsfreeze hook" in caught.value.desc, caught.value.desc
        assert "stubborn" in caught.value.desc, caught.value.desc
    else:
        assert caught.value.desc == "fsfreeze hook has failed with status 1", caught.value.desc
    assert vm.qga.fsfreeze_status() == "thawed"
    wait_for(vm, "systemctl is-active mariadb.service qgf-stubborn.service")
    assert qgafreeze_status(vm)["paused_apps"] == []


def test_thaw_without_freeze_leaves_every_app_running(mariadb_guest):
    vm = mariadb_guest
    vm.qga.fsfreeze_thaw()
    assert mariadb_active(vm)
    assert "nothing to thaw" in sh(vm, "cat /var/log/qga-fsfreeze-hook.log").stdout


@EVERY_SUITE
def test_freeze_of_zero_filesystems_skips_the_thaw_hook_and_apps_still_come_back(mariadb_guest):
    vm = mariadb_guest
    # qemu-ga runs the freeze hook, freezes nothing, and never runs the thaw hook.
    assert vm.qga.fsfreeze_freeze_list(["/nonexistent"]) == 0
    assert vm.qga.fsfreeze_status() == "thawed"
    wait_for(vm, "systemctl is-active mariadb.service", timeout=120)
    last = qgafreeze_status(vm)["last"]
    assert last["reason"] == "agent" and last["op"] == "thaw", last


def test_qemu_ga_restarted_while_frozen_still_thaws_and_every_app_comes_back(mariadb_guest):
    vm = mariadb_guest
    # Nothing can be run in the guest while it is frozen (qemu-ga refuses guest-exec), so the
    # restart is armed before.  It must strike after the freeze was answered, however long the
    # hook took (a fixed 3 s once killed the agent mid-freeze on a loaded host): once qemu-ga's
    # frozen flag exists and the agent is back asleep waiting for commands (state S three
    # times in a row; it is running or in D while it freezes), kill it and start a new one.
    run_in_background(
        vm,
        "qgf-agent-restart",
        "until [ -e /run/qga.state.isfrozen ]; do sleep 0.2; done\n"
        "pid=$(systemctl show -P MainPID qemu-guest-agent.service); n=0\n"
        'while [ $n -lt 3 ]; do [ "$(cut -d" " -f3 /proc/$pid/stat)" = S ] && n=$((n+1)) || n=0;'
        " sleep 0.3; done\n"
        "systemctl kill -s KILL qemu-guest-agent.service; sleep 1\n"
        "systemctl start qemu-guest-agent.service",
    )
    assert vm.qga.fsfreeze_freeze() >= 1
    time.sleep(8)
    deadline = time.monotonic() + 120
    while True:  # the new agent answers once it is up; the client resyncs
        try:
            vm.qga.ping(timeout=10)
            break
        except (QGAError, QGATimeout, ConnectionError):
            assert time.monotonic() < deadline, "the restarted agent never answered"
    # The new agent found its predecessor's frozen flag and knows the disks are frozen.
    assert vm.qga.fsfreeze_status() == "frozen"
    assert vm.qga.fsfreeze_thaw() >= 1
    wait_for(vm, "systemctl is-active mariadb.service", timeout=120)
    assert qgafreeze_status(vm)["paused_apps"] == []
