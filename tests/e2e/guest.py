"""What the end-to-end scenarios and `make demo` do to a guest: install qgafreeze the README's way,
declare apps, run load and watchers inside, and read back what happened.

Everything here goes through the real guest agent (vm.qga), the way a backup service reaches a
VM; nothing reaches into the guest any other way.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
from vm import VM, ExecResult

REPO_ROOT = Path(__file__).resolve().parents[2]
HOOK = "/usr/libexec/qgafreeze/fsfreeze-hook"
HOOK_LOG = "/var/log/qga-fsfreeze-hook.log"
WATCH_LOG = "/run/qgf-watch.log"  # /run is tmpfs: writable while the disks are frozen
ACK_LOG = "/run/qgf-acks.log"

# TCG runs the guest about 15 times slower than the host: generous, bounded deadlines.
MARIADB_APP = """version: 1
settings:
  freeze_timeout: 5m
  thaw_timeout: 5m
  max_frozen: 15m
apps:
  mariadb:
    units: [mariadb.service]
    timeout: 4m
"""
NO_APPS = "version: 1\napps: {}\n"
SESSION_APP = MARIADB_APP.replace("units: [mariadb.service]", "preset: mariadb")
CGROUP_APP = MARIADB_APP.replace("timeout: 4m", "mode: freeze\n    timeout: 4m")


def sh(vm: VM, script: str, timeout: float = 300, check: bool = True) -> ExecResult:
    result = vm.qga.exec(["/bin/sh", "-c", script], timeout=timeout)
    if check and result.exitcode != 0:
        raise AssertionError(
            f"guest command failed ({result.exitcode}): {script}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def make_install(vm: VM) -> str:
    """`make install` from the checkout mounted at /src, offline, as the README says."""
    result = vm.run_unit(["make", "-C", "/src", "install"], timeout=900)
    if result.exitcode != 0:
        raise AssertionError(f"make install failed in the guest:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def guest_path(host_path: Path) -> str:
    """Where the guest sees a file of the checkout: the checkout is mounted at /src."""
    return str(PurePosixPath("/src") / host_path.resolve().relative_to(REPO_ROOT))


def install_package(vm: VM, deb_guest_path: str, *options: str) -> str:
    """`apt-get install ./qgafreeze_*.deb` the way an admin does it, offline: the image holds
    every dependency, and has no network and no apt sources.  A transient unit, since the
    package's scripts restart qemu-ga."""
    argv = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y"]
    result = vm.run_unit(
        [*argv, *options, deb_guest_path],
        timeout=900,
    )
    if result.exitcode != 0:
        raise AssertionError(
            f"apt-get install {deb_guest_path} failed in the guest:\n{result.stdout}\n"
            f"{result.stderr}"
        )
    return result.stdout


def install(vm: VM, package: Path | None = None) -> str:
    """Install qgafreeze in the guest: the .deb when given (`deb_package`), else make install."""
    if package is not None:
        return install_package(vm, guest_path(package))
    return make_install(vm)


def qemu_ga_version(vm: VM) -> tuple[int, int]:
    """(major, minor) of the guest's qemu-ga, from `qemu-ga --version`."""
    out = sh(vm, "qemu-ga --version").stdout
    found = re.search(r"(\d+)\.(\d+)", out)
    if found is None:
        raise AssertionError(f"no version in qemu-ga --version: {out!r}")
    return int(found.group(1)), int(found.group(2))


# qemu-ga 9.1 and later put what the hook printed in the error of a failed freeze.
HOOK_OUTPUT_IN_ERROR = (9, 1)


def configure(vm: VM, yaml: str) -> None:
    vm.qga.write_file("/etc/qgafreeze.yaml", yaml.encode())
    sh(vm, "chmod 600 /etc/qgafreeze.yaml && systemctl restart qgafreeze.service")


def wait_for(vm: VM, script: str, timeout: float = 240, interval: float = 1.0) -> None:
    """Poll a guest command until it succeeds; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        if sh(vm, script, check=False).exitcode == 0:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout:.0f} s in the guest: {script}")
        time.sleep(interval)


def mariadb_active(vm: VM) -> bool:
    return sh(vm, "systemctl is-active mariadb.service", check=False).stdout.strip() == "active"


def guest_clock_offset_ns(vm: VM) -> int:
    """guest clock - host clock, in ns, from guest-get-time bracketed by host readings."""
    before = time.time_ns()
    guest = int(vm.qga.call("guest-get-time"))
    after = time.time_ns()
    return guest - (before + after) // 2


def start_watcher(vm: VM) -> None:
    """Samples MariaDB every 0.2 s into /run: its unit state, and whether a client gets in
    (a client connecting to mariadb.socket would restart a stopped server)."""
    sh(vm, f"systemctl stop qgf-watch.service 2>/dev/null; rm -f {WATCH_LOG}")
    loop = (
        "while :; do s=$(systemctl is-active mariadb.service); "
        "if timeout 3 mariadb -N -e 'select 1' >/dev/null 2>&1; then c=in; else c=out; fi; "
        f'echo "$(date +%s%N) $s $c" >> {WATCH_LOG}; sleep 0.2; done'
    )
    run_in_background(vm, "qgf-watch", loop)


def stop_watcher(vm: VM) -> list[tuple[int, str, str]]:
    """Stop sampling once the watcher itself has seen MariaDB active and taking clients."""
    wait_for(vm, f"tail -n1 {WATCH_LOG} | grep -q ' active in$'", timeout=120, interval=0.5)
    sh(vm, "systemctl stop qgf-watch.service", check=False)
    samples = []
    for line in vm.qga.read_file(WATCH_LOG).decode().splitlines():
        parts = line.split()
        if len(parts) == 3:
            samples.append((int(parts[0]), parts[1], parts[2]))
    return samples


def start_load(vm: VM, first_id: int) -> None:
    """Inserts rows one by one; each acknowledged insert is noted in /run with its time."""
    sh(
        vm,
        "mariadb -e 'CREATE DATABASE IF NOT EXISTS qgf; CREATE TABLE IF NOT EXISTS qgf.acks"
        " (id BIGINT PRIMARY KEY, payload VARCHAR(200)) ENGINE=InnoDB'",
    )
    sh(vm, f"systemctl stop qgf-load.service 2>/dev/null; rm -f {ACK_LOG}")
    loop = (
        f"i={first_id}; while :; do i=$((i+1)); "
        "if mariadb -e \"INSERT INTO qgf.acks VALUES ($i, REPEAT('x', 200))\" 2>/dev/null; "
        f'then echo "$(date +%s%N) $i" >> {ACK_LOG}; else sleep 0.2; fi; done'
    )
    run_in_background(vm, "qgf-load", loop)


def acks(vm: VM) -> list[tuple[int, int]]:
    """(guest time ns, id) of every acknowledged insert so far."""
    out: list[tuple[int, int]] = []
    if sh(vm, f"test -e {ACK_LOG}", check=False).exitcode != 0:
        return out
    for line in vm.qga.read_file(ACK_LOG).decode().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((int(parts[0]), int(parts[1])))
    return out


def wait_for_acks(vm: VM, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(acks(vm)) < count:
        if time.monotonic() >= deadline:
            raise AssertionError(f"fewer than {count} inserts acknowledged in {timeout:.0f} s")
        time.sleep(1)


def stop_load(vm: VM) -> None:
    sh(vm, "systemctl stop qgf-load.service", check=False)


def journal(vm: VM, *matches: str) -> list[dict[str, Any]]:
    out = sh(vm, "journalctl --no-pager -o json " + " ".join(matches)).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


REPORT_SCHEMA = json.loads((REPO_ROOT / "docs" / "cycle-report.schema.json").read_text())


def qgafreeze_status(vm: VM) -> dict[str, Any]:
    """The daemon's live status: `status --json` gives it under "daemon", beside the report of
    the last cycle.  The whole document is validated against the report's schema first, so that
    every status --json the VM tier reads is held to it."""
    document = json.loads(sh(vm, "qgafreeze status --json").stdout)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(document)
    return dict(document["daemon"])


def run_in_background(vm: VM, unit: str, script: str) -> None:
    """A shell loop as a transient unit (so qemu-ga restarts do not kill it).  The script goes
    in a file: systemd would expand $ and % in a command line."""
    path = f"/run/{unit}.sh"
    vm.qga.write_file(path, (script + "\n").encode())
    sh(vm, f"systemd-run --unit={unit} --collect /bin/sh {path}")


@dataclass
class Backup:
    """One backup as a backup service runs it, with host-side times converted to guest time."""

    offset_ns: int
    frozen: int = 0
    freeze_sent: int = 0  # guest-clock ns
    freeze_returned: int = 0
    thaw_sent: int = 0
    thaw_returned: int = 0
    snapshot: Any = None
    events: list[tuple[int, str]] = field(default_factory=list)

    def mark(self, what: str) -> int:
        now = time.time_ns() + self.offset_ns
        self.events.append((now, what))
        return now


def backup(vm: VM, snapshot_to: Any = None, frozen_seconds: float = 3.0) -> Backup:
    """guest-fsfreeze-freeze, optionally a disk snapshot, then guest-fsfreeze-thaw."""
    run = Backup(offset_ns=guest_clock_offset_ns(vm))
    run.freeze_sent = run.mark("backup service: guest-fsfreeze-freeze")
    run.frozen = int(vm.qga.fsfreeze_freeze())
    run.freeze_returned = run.mark(f"qemu-ga: {run.frozen} filesystem(s) frozen")
    status = vm.qga.fsfreeze_status()
    assert status == "frozen", status
    if snapshot_to is not None:
        run.snapshot = vm.snapshot(snapshot_to)
        run.mark("backup service: disk snapshot taken (QMP blockdev-snapshot-sync)")
    time.sleep(frozen_seconds)
    run.thaw_sent = run.mark("backup service: guest-fsfreeze-thaw")
    vm.qga.fsfreeze_thaw()
    run.thaw_returned = run.mark("qemu-ga: filesystems thawed")
    return run


def app_records(vm: VM, cycle: str) -> list[dict[str, Any]]:
    return [r for r in journal(vm, f"QGAFREEZE_CYCLE={cycle}") if "QGAFREEZE_APP" in r]


def timeline(vm: VM, run: Backup, samples: list[tuple[int, str, str]]) -> list[tuple[int, str]]:
    """Every step of one backup in guest-clock order: host calls, qemu-ga, qgafreeze, MariaDB."""
    events = list(run.events)
    since = f"--since=@{run.freeze_sent // 1_000_000_000 - 2}"
    for record in journal(vm, since, "SYSLOG_IDENTIFIER=qgafreeze", "SYSLOG_IDENTIFIER=qemu-ga"):
        when = int(record["__REALTIME_TIMESTAMP"]) * 1000
        message = str(record.get("MESSAGE", ""))
        if record.get("SYSLOG_IDENTIFIER") == "qemu-ga":
            if "fsfreeze" in message:
                events.append((when, f"qemu-ga: {message}"))
            continue
        if "QGAFREEZE_APP" in record:
            took = int(record.get("QGAFREEZE_DURATION_MS", 0)) * 1_000_000
            phase = record.get("QGAFREEZE_PHASE")
            verb = "stopping" if phase == "freeze" else "starting"
            events.append((when - took, f"qgafreeze: {record['QGAFREEZE_APP']} {verb} ({phase})"))
        if "MESSAGE_ID" in record and "QGAFREEZE_PHASE" in record:
            events.append((when, f"qgafreeze: {message}"))
    previous = ""
    for when, state, client in samples:
        seen = f"{state}, client {'gets in' if client == 'in' else 'refused'}"
        if seen != previous:
            events.append((when, f"mariadb: {seen}"))
            previous = seen
    return sorted(events)


def render_timeline(events: list[tuple[int, str]], origin: int) -> str:
    return "\n".join(f"  {(when - origin) / 1e9:+8.3f} s  {what}" for when, what in events)


def downtime_ns(samples: list[tuple[int, str, str]]) -> tuple[int, int]:
    """(first sample not taking clients, first one taking them again after it), guest ns."""
    down = next(t for t, _, client in samples if client != "in")
    up = next(t for t, _, client in samples if t > down and client == "in")
    return down, up


def longest_write_gap_ns(acked: list[tuple[int, int]], start: int, end: int) -> int:
    """The longest time between two acknowledged inserts around [start, end]: how long
    writers waited, whatever the reason (server stopped, lock held, processes frozen)."""
    times = sorted(t for t, _ in acked)
    before = [t for t in times if t < start]
    after = [t for t in times if t > end]
    if not before or not after:
        raise AssertionError("the load must have acknowledged inserts before and after")
    window = [before[-1], *[t for t in times if start <= t <= end], after[0]]
    return max(b - a for a, b in zip(window, window[1:]))


COPY_MOUNT = "/mnt/qgf-copy"
COPY_SOCKET = "/run/mysqld/qgf-copy.sock"  # /run/mysqld: the mysql user may write there
COPY_ERRORS = "/run/mysqld/qgf-copy.err"


@dataclass
class CopyOfMariaDB:
    """What a second MariaDB server found in a snapshot's data directory."""

    ids: set[int]
    crash_recovery: list[str]
    check: str
    # The text of each file asked for, as the snapshot holds it; None where it holds none.
    files: dict[str, str | None]


def mariadb_in_copy(vm: VM, frozen: Path, files: tuple[str, ...] = ()) -> CopyOfMariaDB:
    """Start a second MariaDB server, of the guest's own version, on a writable copy of a frozen
    image's data directory (hot-plugged, mounted beside the live one), as an admin who restores
    the files would; read `files` (absolute paths in the snapshot), qgf.acks and the server's
    log, then stop it and unmount the copy."""
    device = vm.attach_copy(frozen)
    wait_for(vm, f"test -b {device}", timeout=120)
    sh(vm, f"mkdir -p {COPY_MOUNT} && mount {device} {COPY_MOUNT} && rm -f {COPY_ERRORS}")
    try:
        found_files: dict[str, str | None] = {}
        for path in files:
            # Absent (3) is an answer; any other failure to read is the harness's, not the
            # snapshot's, and must not pass for a file the snapshot does not hold.
            name = shlex.quote(COPY_MOUNT + path)
            read = sh(vm, f"if [ -e {name} ]; then cat {name}; else exit 3; fi", check=False)
            if read.exitcode not in (0, 3):
                raise AssertionError(f"cannot read {path} in the copy: {read.stderr}")
            found_files[path] = read.stdout if read.exitcode == 0 else None
        run_in_background(
            vm,
            "qgf-copy-db",
            f"exec mariadbd --no-defaults --user=mysql --datadir={COPY_MOUNT}/var/lib/mysql"
            f" --socket={COPY_SOCKET} --skip-networking --pid-file=/run/mysqld/qgf-copy.pid"
            f" --log-error={COPY_ERRORS} --innodb-buffer-pool-size=32M",
        )
        client = f"mariadb -S {COPY_SOCKET} -N"
        wait_for(vm, f"{client} -e 'SELECT 1'", timeout=300)
        ids = {int(x) for x in sh(vm, f"{client} -e 'SELECT id FROM qgf.acks'").stdout.split()}
        check = sh(vm, f"{client} -e 'CHECK TABLE qgf.acks'").stdout
        log = sh(vm, f"cat {COPY_ERRORS}").stdout
    finally:
        sh(vm, "systemctl stop qgf-copy-db.service", timeout=300, check=False)
        sh(vm, f"umount {COPY_MOUNT}", check=False)
    found = [line for line in log.splitlines() if re.search(r"crash recovery", line, re.I)]
    return CopyOfMariaDB(ids, found, check, found_files)
