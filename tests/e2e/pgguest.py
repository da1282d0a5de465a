"""PostgreSQL in a guest, for the preset's tests: the release's cluster, an insert load that
notes each acknowledgement, WAL archiving, and the README's restore of a snapshot as a base
backup (the cycle's backup label and the archived WAL put in place)."""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema
from guest import REPORT_SCHEMA, run_in_background, sh, wait_for
from vm import VM

MAJOR = {"bullseye": 13, "bookworm": 15, "trixie": 17}
AS_POSTGRES = "runuser -u postgres --"
PRESET_APP = "version: 1\napps:\n  pg: {preset: postgresql, timeout: 2m}\n"
ACKS = "/run/qgf-pg-acks.log"  # tmpfs: the load notes its acknowledgements while frozen
ARCHIVE = "/var/lib/postgresql/qgf-archive"
RESTORE_WAL = "/var/lib/postgresql/qgf-restore-wal"
LOAD_UNIT = "qgf-pg-load"


def conf_d(major: int) -> str:
    return f"/etc/postgresql/{major}/main/conf.d/qgf-archive.conf"


def datadir(major: int) -> str:
    return f"/var/lib/postgresql/{major}/main"


def server_log(major: int) -> str:
    return f"/var/log/postgresql/postgresql-{major}-main.log"


def psql(vm: VM, sql: str, check: bool = True) -> str:
    return sh(vm, f'{AS_POSTGRES} psql -XAtc "{sql}"', check=check).stdout.strip()


def start_postgresql(vm: VM) -> None:
    sh(vm, "systemctl start postgresql.service", timeout=300)
    wait_for(vm, f"{AS_POSTGRES} psql -XAtc 'SELECT 1'", timeout=300)


def stop_and_clean(vm: VM, major: int) -> None:
    """What a module leaves to the next user of a shared guest: no load, PostgreSQL stopped,
    our files gone."""
    sh(vm, f"systemctl stop {LOAD_UNIT}.service", check=False)
    sh(vm, "systemctl stop postgresql.service", timeout=300, check=False)
    sh(vm, f"rm -rf {conf_d(major)} {ARCHIVE} {ACKS}", check=False)


def report(vm: VM) -> dict[str, Any]:
    doc = json.loads(sh(vm, "cat /run/qgafreeze/report.json").stdout)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(doc)
    return doc


def entry(doc: dict[str, Any], app: str = "pg") -> dict[str, Any]:
    return next(e for e in doc["apps"] if e["app"] == app)


def enable_archiving(vm: VM, major: int) -> None:
    """WAL archiving, as the README requires for a restore as a base backup; the archive is
    copied off the live guest after the backup (`archived_wal`)."""
    sh(vm, f"install -d -o postgres -g postgres -m 0700 {ARCHIVE}")
    vm.qga.write_file(
        conf_d(major),
        (
            "archive_mode = on\n"
            f"archive_command = 'test ! -f {ARCHIVE}/%f && cp %p {ARCHIVE}/%f'\n"
        ).encode(),
    )
    sh(vm, "systemctl restart postgresql.service", timeout=300)
    wait_for(vm, f"{AS_POSTGRES} psql -XAtc 'SELECT 1'", timeout=300)


def archived_wal(vm: VM) -> bytes:
    """The live guest's WAL archive as a tarball: pg_backup_stop(true) returned once the WAL up
    to the backup's end was in it."""
    sh(vm, f"tar -C {ARCHIVE} -czf /run/qgf-wal.tgz .")
    wal = vm.qga.read_file("/run/qgf-wal.tgz")
    sh(vm, "rm -f /run/qgf-wal.tgz")
    return wal


def restore_as_base_backup(restored: VM, major: int, label: str, wal: bytes) -> None:
    """The README's restore: the cycle's backup_label in the data directory, the archived WAL
    reachable by restore_command, recovery to the backup's end; then PostgreSQL started and
    waited for until it has left recovery."""
    data = datadir(major)
    restored.qga.write_file("/run/qgf-wal.tgz", wal)
    restored.qga.write_file(f"{data}/backup_label", label.encode())
    restored.qga.write_file(
        conf_d(major),
        (
            "archive_mode = off\n"
            f"restore_command = 'cp {RESTORE_WAL}/%f %p'\n"
            "recovery_target = 'immediate'\n"
            "recovery_target_action = 'promote'\n"
        ).encode(),
    )
    sh(
        restored,
        f"install -d -o postgres -g postgres -m 0700 {RESTORE_WAL}"
        f" && tar -C {RESTORE_WAL} -xzf /run/qgf-wal.tgz && chown -R postgres: {RESTORE_WAL}"
        f" && chown postgres: {data}/backup_label && chmod 0600 {data}/backup_label"
        f" && touch {data}/recovery.signal && chown postgres: {data}/recovery.signal"
        f" && : > {server_log(major)}",
    )
    start_postgresql(restored)
    wait_for(restored, f"{AS_POSTGRES} psql -XAtc 'SELECT NOT pg_is_in_recovery()' | grep -qx t")


def start_load(vm: VM, first_id: int) -> None:
    psql(vm, "CREATE TABLE IF NOT EXISTS qgf_acks (id bigint PRIMARY KEY, payload text)")
    sh(vm, f"systemctl stop {LOAD_UNIT}.service 2>/dev/null; rm -f {ACKS}", check=False)
    loop = (
        f"i={first_id}; while :; do i=$((i+1)); "
        f"if {AS_POSTGRES} psql -Xq -c \"INSERT INTO qgf_acks VALUES ($i, repeat('x', 200))\""
        f' 2>/dev/null; then echo "$(date +%s%N) $i" >> {ACKS}; else sleep 0.2; fi; done'
    )
    run_in_background(vm, LOAD_UNIT, loop)


def stop_load(vm: VM) -> None:
    sh(vm, f"systemctl stop {LOAD_UNIT}.service", check=False)


def acks(vm: VM) -> list[tuple[int, int]]:
    """(guest time ns, id) of every acknowledged insert so far."""
    if sh(vm, f"test -e {ACKS}", check=False).exitcode != 0:
        return []
    lines = vm.qga.read_file(ACKS).decode().splitlines()
    return [(int(t), int(i)) for t, i in (line.split() for line in lines if len(line.split()) == 2)]


def wait_for_acks(vm: VM, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(acks(vm)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} inserts acknowledged"
        time.sleep(1)


def stored_ids(vm: VM) -> set[int]:
    return {int(x) for x in psql(vm, "SELECT id FROM qgf_acks").split()}


def amcheck(vm: VM, major: int) -> None:
    check = sh(
        vm,
        f"{AS_POSTGRES} /usr/lib/postgresql/{major}/bin/pg_amcheck --all --install-missing",
        check=False,
        timeout=600,
    )
    assert check.exitcode == 0, check.stdout + check.stderr
