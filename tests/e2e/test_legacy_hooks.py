"""An old fsfreeze-hook.d script under settings.legacy_hooks, through the real qemu-ga: one in the
pattern of QEMU's MySQL sample hook, which leaves a client holding MariaDB's global read lock
running after it exits and releases it when the thaw script writes a FIFO.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest import backup, configure, run_in_background, sh, wait_for
from vm import VM

HOOK_DIR = "/etc/qemu/fsfreeze-hook.d"
SCRIPT = f"{HOOK_DIR}/50-mariadb-lock"
FIFO = "/run/qgf-legacy-lock.fifo"
WRITES = "/run/qgf-legacy-writes.log"  # /run is tmpfs: writable while the disks are frozen
AGENT_FROZEN_FLAG = "/run/qga.state.isfrozen"  # qemu-ga's, on Debian

# The same script as the container tier's (its header says what it does).
LOCK_SCRIPT = (Path(__file__).resolve().parents[1] / "data" / "mariadb-fifo-lock.sh").read_text()

# TCG runs the guest about 15 times slower than the host: generous, bounded deadlines.
LEGACY_CONFIG = f"""version: 1
settings:
  freeze_timeout: 5m
  thaw_timeout: 5m
  legacy_hooks: {HOOK_DIR}
  legacy_hook_timeout: 2m
apps: {{}}
"""

# Armed before the freeze, since qemu-ga runs nothing while frozen: once qemu-ga marks itself
# frozen, a write that gives up after 2 s of waiting for a lock, then a write that waits.
WRITER = """
while [ ! -e {flag} ]; do sleep 0.05; done
if mariadb -e "SET SESSION lock_wait_timeout=2; INSERT INTO qgf.legacy VALUES ({probe})" \\
    2> {log}.err; then
    echo "probe-written $(date +%s%N)" >> {log}
elif grep -q 'Lock wait timeout' {log}.err; then
    echo "probe-waited-for-the-lock $(date +%s%N)" >> {log}
fi
echo "write-sent $(date +%s%N)" >> {log}
mariadb -e "INSERT INTO qgf.legacy VALUES ({id})" && echo "write-done $(date +%s%N)" >> {log}
"""


@pytest.fixture(scope="module")
def guest(shared_guest: VM) -> Iterator[VM]:
    vm = shared_guest
    sh(
        vm,
        "mariadb -e 'CREATE DATABASE IF NOT EXISTS qgf; CREATE TABLE IF NOT EXISTS qgf.legacy"
        " (id INT PRIMARY KEY) ENGINE=InnoDB'",
    )
    had_dir = sh(vm, f"test -d {HOOK_DIR}", check=False).exitcode == 0
    sh(vm, f"mkdir -p {HOOK_DIR}")
    vm.qga.write_file(SCRIPT, LOCK_SCRIPT.encode())
    sh(vm, f"chmod 755 {SCRIPT}")
    configure(vm, LEGACY_CONFIG)
    yield vm
    # Shared with the next modules: no legacy hook may run in their cycles, and the package's
    # purge test compares /etc/qemu with what it was before.
    sh(vm, f"rm -f {SCRIPT} {FIFO}" + ("" if had_dir else f"; rmdir {HOOK_DIR}"), check=False)


def writes(vm: VM) -> dict[str, int]:
    found = {}
    for line in vm.qga.read_file(WRITES).decode().splitlines():
        what, _, when = line.partition(" ")
        found[what] = int(when)
    return found


def test_legacy_script_leaving_a_locking_client_behind_through_qemu_ga(guest):
    vm = guest
    for cycle in (1, 2):
        sh(vm, f"truncate -s0 /var/log/qga-fsfreeze-hook.log; rm -f {WRITES} {WRITES}.err")
        unit = f"qgf-legacy-writer-{cycle}"
        run_in_background(
            vm, unit, WRITER.format(flag=AGENT_FROZEN_FLAG, log=WRITES, probe=cycle, id=10 + cycle)
        )
        run = backup(vm, frozen_seconds=12)
        froze_in = (run.freeze_returned - run.freeze_sent) / 1e9
        print(f"cycle {cycle}: guest-fsfreeze-freeze returned after {froze_in:.2f} s")
        assert run.frozen >= 1
        assert froze_in < 20, f"the freeze took {froze_in:.1f} s: it waited for the client"

        wait_for(vm, f"grep -q write-done {WRITES}", timeout=120, interval=0.5)
        seen = writes(vm)
        # While frozen, the lock held: a write gave up waiting for it, the next one waited ...
        assert "probe-waited-for-the-lock" in seen, seen
        assert "probe-written" not in seen
        assert run.freeze_returned - 10**9 <= seen["write-sent"] < run.thaw_sent
        # ... and completed once the thaw script had written the FIFO (1 s of clock slack).
        assert seen["write-done"] > run.thaw_sent - 10**9
        row = sh(vm, f"mariadb -N -e 'SELECT id FROM qgf.legacy WHERE id={10 + cycle}'").stdout
        assert row.strip() == str(10 + cycle)

        # Released: a write gets through at once, and the script's FIFO is gone with the client.
        started = time.monotonic()
        sh(
            vm,
            f"mariadb -e 'SET SESSION lock_wait_timeout=5; INSERT INTO qgf.legacy VALUES"
            f" ({20 + cycle})'",
        )
        print(f"cycle {cycle}: a write after the thaw took {time.monotonic() - started:.2f} s")
        assert sh(vm, f"test -e {FIFO}", check=False).exitcode == 1
        assert vm.qga.fsfreeze_status() == "thawed"

        log = sh(vm, "cat /var/log/qga-fsfreeze-hook.log").stdout
        assert re.search(rf": {SCRIPT} finished with status=0$", log, re.M), log
        assert "left running: pid " in log, log
        assert re.search(rf"^  \| {SCRIPT} freeze left .* ended by itself$", log, re.M), log
