"""A host that freezes the guest and goes away: qgafreeze's watchdog resumes the app and thaws the
disks itself, and the host's thaw, when it comes late, still succeeds through the real qemu-ga.

Nothing can be run in the guest while qemu-ga believes it is frozen (it answers only ping, sync,
fsfreeze-status and fsfreeze-thaw), so what happened in the guest is noted by processes started
before the freeze, with guest-clock times in /run (tmpfs), and read after the late thaw.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from guest import (
    HOOK_LOG,
    NO_APPS,
    backup,
    configure,
    guest_clock_offset_ns,
    journal,
    qgafreeze_status,
    run_in_background,
    sh,
    wait_for,
)
from vm import VM, QGAError

MAX_FROZEN = 20.0
# What the guest may take beyond max_frozen, under TCG on a loaded host, to resume the app and
# thaw the disks (the watchdog's thaw phase, then FITHAW on each filesystem).
MARGIN = 20.0
APP_UNIT = "/run/systemd/system/qgf-thawapp.service"  # tmpfs: gone at reboot whatever happens
BEATS = "/run/qgf-thawapp.beats"  # one line per heartbeat of the app: guest ns
WRITES = "/run/qgf-root-writes.log"  # per write to /: "began_ns ended_ns"
PROBE = "/var/tmp/qgf-root-probe"  # on /: blocks while / is frozen

CONFIG = f"""version: 1
settings:
  freeze_timeout: 2m
  thaw_timeout: 2m
  max_frozen: {MAX_FROZEN:g}s
apps:
  thawapp:
    units: [qgf-thawapp.service]
    timeout: 100s
"""
APP = f"""[Unit]
Description=qgafreeze test app: a heartbeat in /run
[Service]
ExecStart=/bin/sh -c 'while :; do date +%%s%%N >> {BEATS}; sleep 0.5; done'
"""
# Each write is fsync'ed (sync FILE): it completes only on a filesystem that is not frozen.
WRITER = (
    f"while :; do b=$(date +%s%N); echo $b > {PROBE} && sync {PROBE}"
    f' && echo "$b $(date +%s%N)" >> {WRITES}; sleep 0.2; done'
)


@pytest.fixture
def guest(shared_guest: VM) -> Iterator[VM]:
    vm = shared_guest
    vm.qga.write_file(APP_UNIT, APP.encode())
    sh(vm, f"rm -f {BEATS} {WRITES}; systemctl daemon-reload; systemctl start qgf-thawapp.service")
    configure(vm, CONFIG)
    run_in_background(vm, "qgf-root-writer", WRITER)
    wait_for(vm, f"test -s {WRITES} && test -s {BEATS}", timeout=60, interval=0.5)
    yield vm
    sh(
        vm,
        "systemctl stop qgf-root-writer.service qgf-thawapp.service;"
        f" rm -f {APP_UNIT} {PROBE} {BEATS} {WRITES}; systemctl daemon-reload;"
        " systemctl reset-failed",
        check=False,
    )
    configure(vm, NO_APPS)


def lines(vm: VM, path: str) -> list[list[int]]:
    return [[int(n) for n in line.split()] for line in vm.qga.read_file(path).decode().splitlines()]


def test_a_host_that_freezes_and_vanishes_leaves_a_writable_guest_and_a_late_thaw_still_succeeds(
    guest,
):
    vm = guest
    offset = guest_clock_offset_ns(vm)
    assert vm.qga.fsfreeze_freeze() >= 1
    frozen_ns = time.time_ns() + offset  # qemu-ga answered: every filesystem is frozen
    vm.qga.close()  # the host goes away without a thaw
    time.sleep(MAX_FROZEN + MARGIN)

    # The host comes back.  qemu-ga still believes the guest is frozen: it refuses to run
    # anything and says frozen, until it is sent the thaw.
    assert vm.qga.fsfreeze_status() == "frozen"
    with pytest.raises(QGAError):
        vm.qga.exec(["/bin/true"])
    late_ns = time.time_ns() + offset
    # Its FITHAW finds nothing frozen: the late thaw succeeds, having thawed 0 filesystems.
    assert vm.qga.fsfreeze_thaw() == 0
    assert vm.qga.fsfreeze_status() == "thawed"

    # The report is the watchdog's: the late thaw found nothing frozen and left it as it was.
    report = json.loads(sh(vm, "qgafreeze status --json").stdout)
    assert (report["phase"], report["reason"]) == ("thaw", "watchdog"), report
    disks = report["filesystems_thawed"]
    assert disks is not None and disks["errors"] == [], report
    assert disks["count"] >= 1 and "/" in disks["mountpoints"], disks
    at = datetime.strptime(disks["at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    thawed_ns = int(at.timestamp() * 1e9)
    deadline_ns = frozen_ns + int((MAX_FROZEN + MARGIN) * 1e9)
    assert frozen_ns < thawed_ns < deadline_ns

    # Writes to / waited while frozen, and went through within max_frozen and the margin: done
    # by the watchdog, long before the host's thaw.
    writes = lines(vm, WRITES)
    assert not [w for w in writes if frozen_ns + 500_000_000 < w[1] < thawed_ns], writes
    released = [w for w in writes if w[1] >= thawed_ns]
    assert released and released[0][1] < deadline_ns and released[0][1] < late_ns, (
        released[:3],
        deadline_ns,
    )
    after = {"thawed": thawed_ns, "written": released[0][1], "host": late_ns}
    print(
        "seconds after the freeze (max_frozen {:g}): disks thawed by the watchdog {thawed:.1f},"
        " first write to / through {written:.1f}, the host's late thaw {host:.1f}".format(
            MAX_FROZEN, **{k: (v - frozen_ns) / 1e9 for k, v in after.items()}
        )
    )
    # The app was stopped for the freeze and runs again from the watchdog on.
    beats = [b[0] for b in lines(vm, BEATS)]
    # (The watchdog was armed when the hook returned, before qemu-ga froze the disks: slack.)
    assert not [b for b in beats if frozen_ns < b < frozen_ns + int((MAX_FROZEN - 8) * 1e9)]
    assert [b for b in beats if frozen_ns < b < deadline_ns], "the app did not run again in time"
    assert sh(vm, "systemctl is-active qgf-thawapp.service").stdout.strip() == "active"

    # Both logs say the watchdog thawed the disks, and that a snapshot after it is not consistent.
    said = "watchdog thawed"
    hook_log = sh(vm, f"cat {HOOK_LOG}").stdout
    assert f"qgafreeze warning: {said}" in hook_log and "is not consistent" in hook_log, hook_log
    warned = journal(vm, "SYSLOG_IDENTIFIER=qgafreeze", "PRIORITY=4")
    assert any(str(r.get("MESSAGE", "")).startswith(said) for r in warned)

    # The next backup works as usual.
    run = backup(vm, frozen_seconds=1.0)
    assert run.frozen >= 1
    status = qgafreeze_status(vm)
    assert status["state"] == "thawed" and status["paused_apps"] == [], status
    assert status["last"]["reason"] == "request" and status["last"]["ok"], status["last"]
    wait_for(vm, "systemctl is-active qgf-thawapp.service", timeout=120)
