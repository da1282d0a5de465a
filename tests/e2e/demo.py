"""`make demo`: one backup of a MariaDB guest through the real qemu-ga, as a timeline.

Builds (first run) or reuses the guest image, boots it under QEMU, installs qgafreeze with the
README's `make install`, declares MariaDB, then does what a backup service does: freeze, snapshot,
thaw.  Prints when MariaDB stopped and resumed, when the filesystems froze and thawed, and the
hook log excerpt.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from guest import (  # noqa: E402
    CGROUP_APP,
    MARIADB_APP,
    SESSION_APP,
    acks,
    backup,
    configure,
    downtime_ns,
    install,
    longest_write_gap_ns,
    render_timeline,
    sh,
    start_load,
    start_watcher,
    stop_load,
    stop_watcher,
    timeline,
    wait_for,
    wait_for_acks,
)
from image import ensure_image  # noqa: E402
from vm import VM  # noqa: E402


def step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def compare_modes(vm: VM) -> None:
    """The same backup under an insert load, with MariaDB stopped, locked, or cgroup-frozen."""
    print()
    print("How long writers wait, by how MariaDB is quiesced (3 s frozen window, TCG guest):")
    for number, (label, yaml) in enumerate(
        (
            ("stop (units)", MARIADB_APP),
            ("held backup lock session (preset)", SESSION_APP),
            ("cgroup freeze (mode: freeze)", CGROUP_APP),
        ),
        1,
    ):
        configure(vm, yaml)
        wait_for(vm, "systemctl is-active mariadb.service")
        start_load(vm, first_id=number * 10_000_000)
        wait_for_acks(vm, 15)
        run = backup(vm, frozen_seconds=3)
        wait_for(vm, "systemctl is-active mariadb.service")
        wait_for_acks(vm, len(acks(vm)) + 10)
        stop_load(vm)
        gap = longest_write_gap_ns(acks(vm), run.freeze_sent, run.thaw_returned)
        window = (run.thaw_sent - run.freeze_returned) / 1e9
        print(
            f"  {label:30} longest wait between acknowledged writes {gap / 1e9:6.2f} s"
            f" (frozen window {window:.2f} s)"
        )


def main() -> int:
    compare = "--compare" in sys.argv[1:]
    started = time.monotonic()
    step("guest image: building or reusing (the first build takes a few minutes)")
    image = ensure_image()
    workdir = Path(tempfile.mkdtemp(prefix="qgafreeze-demo-"))
    step(f"booting the guest under QEMU (TCG, a slow software CPU); logs in {workdir}")
    vm = VM.boot(image, workdir, share=REPO, name="demo")
    try:
        step(
            f"guest agent answers after {vm.boot_seconds:.0f} s; running make install in the guest"
        )
        install(vm)
        configure(vm, MARIADB_APP)
        wait_for(vm, "systemctl is-active mariadb.service")
        sh(vm, "truncate -s0 /var/log/qga-fsfreeze-hook.log")
        start_watcher(vm)
        wait_for(vm, "test $(wc -l < /run/qgf-watch.log) -ge 3")
        step("backup: guest-fsfreeze-freeze, disk snapshot, guest-fsfreeze-thaw")
        run = backup(vm, snapshot_to=workdir / "backup.qcow2", frozen_seconds=3)
        wait_for(vm, "systemctl is-active mariadb.service")
        time.sleep(1)
        samples = stop_watcher(vm)

        print()
        print("Timeline (guest clock, 0 = the backup service's freeze request):")
        print(render_timeline(timeline(vm, run, samples), run.freeze_sent))
        down, up = downtime_ns(samples)
        print()
        print(f"filesystems frozen: {run.frozen}")
        window = (run.thaw_sent - run.freeze_returned) / 1e9
        print(f"frozen window (freeze returned to thaw sent): {window:.2f} s")
        print(f"MariaDB unavailable (watcher, 0.2 s samples): {(up - down) / 1e9:.2f} s")
        print()
        print("/var/log/qga-fsfreeze-hook.log:")
        print(sh(vm, "cat /var/log/qga-fsfreeze-hook.log").stdout.rstrip())
        if compare:
            compare_modes(vm)
        print()
        step(f"done in {time.monotonic() - started:.0f} s; the snapshot is {run.snapshot}")
    finally:
        vm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
