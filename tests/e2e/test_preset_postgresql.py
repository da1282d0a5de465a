"""The postgresql preset against each release's own PostgreSQL (13 on bullseye, 15 on bookworm, 17
on trixie) through the real qemu-ga: a backup held across the frozen window, the backup label of
the cycle in the thaw's report; and on trixie the restore proof: a snapshot taken under insert
load, restored as the README says (the label and the archived WAL in place), starts as a base
backup from the label's checkpoint, holds every insert acknowledged before the freeze and passes
pg_amcheck."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from guest import NO_APPS, REPORT_SCHEMA, backup, configure, run_in_background, sh, wait_for
from vm import VM

MAJOR = {"bullseye": 13, "bookworm": 15, "trixie": 17}
AS_POSTGRES = "runuser -u postgres --"
PRESET_APP = "version: 1\napps:\n  pg: {preset: postgresql, timeout: 2m}\n"
ACKS = "/run/qgf-pg-acks.log"  # tmpfs: the load notes its acknowledgements while frozen
ARCHIVE = "/var/lib/postgresql/qgf-archive"
RESTORE_WAL = "/var/lib/postgresql/qgf-restore-wal"


def conf_d(major: int) -> str:
    return f"/etc/postgresql/{major}/main/conf.d/qgf-archive.conf"


def psql(vm: VM, sql: str, check: bool = True) -> str:
    return sh(vm, f'{AS_POSTGRES} psql -XAtc "{sql}"', check=check).stdout.strip()


def start_postgresql(vm: VM) -> None:
    sh(vm, "systemctl start postgresql.service", timeout=300)
    wait_for(vm, f"{AS_POSTGRES} psql -XAtc 'SELECT 1'", timeout=300)


@pytest.fixture(scope="module")
def pg_guest(shared_guest: VM, suite: str) -> Iterator[VM]:
    vm = shared_guest
    start_postgresql(vm)
    yield vm
    # Shared with the next modules: thawed, no apps, PostgreSQL stopped, our files gone.
    if vm.qga.fsfreeze_status() == "frozen":
        vm.qga.fsfreeze_thaw()
    sh(vm, "systemctl stop qgf-pg-load.service", check=False)
    configure(vm, NO_APPS)
    sh(vm, "systemctl stop postgresql.service", timeout=300, check=False)
    sh(vm, f"rm -rf {conf_d(MAJOR[suite])} {ARCHIVE} {ACKS}", check=False)


def report(vm: VM) -> dict[str, Any]:
    doc = json.loads(sh(vm, "cat /run/qgafreeze/report.json").stdout)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(doc)
    return doc


def pg_entry(doc: dict[str, Any]) -> dict[str, Any]:
    return next(entry for entry in doc["apps"] if entry["app"] == "pg")


@pytest.mark.suites("bullseye", "bookworm", "trixie")
def test_each_releases_postgresql_is_backed_up_and_the_label_of_the_cycle_reported(pg_guest, suite):
    vm = pg_guest
    configure(vm, PRESET_APP)
    sh(vm, "truncate -s0 /var/log/qga-fsfreeze-hook.log")
    backup(vm)

    doc = report(vm)
    assert doc["phase"] == "thaw" and doc["verdict"] == "application-consistent", doc
    entry = pg_entry(doc)
    assert entry["freeze"]["result"] == "ok" and entry["thaw"]["result"] == "ok", entry
    details = entry["details"]
    assert details["backup_start"]["server_version_num"] // 10000 == MAJOR[suite]
    label = details["backup_label"]
    assert label.startswith("START WAL LOCATION: "), label
    assert f"LABEL: qgafreeze cycle {doc['cycle']}\n" in label
    assert details["backup_start"]["lsn"] == label.split()[3]
    log = sh(vm, "cat /var/log/qga-fsfreeze-hook.log").stdout
    assert len(re.findall(r": qgafreeze:pg finished with status=0$", log, re.M)) == 2, log
    # The held session is gone: the helper and its psql ended at the thaw.
    assert "quiesce postgresql" not in sh(vm, "ps -u postgres -o args=").stdout


def start_load(vm: VM, first_id: int) -> None:
    psql(vm, "CREATE TABLE IF NOT EXISTS qgf_acks (id bigint PRIMARY KEY, payload text)")
    sh(vm, f"systemctl stop qgf-pg-load.service 2>/dev/null; rm -f {ACKS}", check=False)
    loop = (
        f"i={first_id}; while :; do i=$((i+1)); "
        f"if {AS_POSTGRES} psql -Xq -c \"INSERT INTO qgf_acks VALUES ($i, repeat('x', 200))\""
        f' 2>/dev/null; then echo "$(date +%s%N) $i" >> {ACKS}; else sleep 0.2; fi; done'
    )
    run_in_background(vm, "qgf-pg-load", loop)


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


@pytest.mark.suites("trixie")
def test_a_snapshot_under_insert_load_restores_as_a_base_backup_with_the_reported_label(
    pg_guest, suite, vm_factory, tmp_path
):
    vm = pg_guest
    major = MAJOR[suite]
    # WAL archiving, as the README requires for a restore as a base backup; the archive is
    # outside the snapshot once copied off below (the live guest's copy of it).
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
    configure(vm, PRESET_APP)
    start_load(vm, first_id=5_000_000)
    wait_for_acks(vm, 20)

    run = backup(vm, snapshot_to=tmp_path / "after-postgresql.qcow2")
    wait_for_acks(vm, len(acks(vm)) + 5)  # the load goes on after the thaw
    sh(vm, "systemctl stop qgf-pg-load.service", check=False)
    acked = acks(vm)
    before_freeze = {i for t, i in acked if t < run.freeze_sent}
    assert len(before_freeze) >= 20
    # Commits wait for the frozen disk: none is acknowledged inside the frozen window.
    assert not [i for t, i in acked if run.freeze_returned <= t <= run.thaw_sent]

    doc = report(vm)
    assert doc["verdict"] == "application-consistent", doc
    details = pg_entry(doc)["details"]
    label, start = details["backup_label"], details["backup_start"]["lsn"]
    assert f"LABEL: qgafreeze cycle {doc['cycle']}\n" in label
    # pg_backup_stop(true) returned once the WAL up to the backup's end was archived.
    sh(vm, f"tar -C {ARCHIVE} -czf /run/qgf-wal.tgz .")
    wal = vm.qga.read_file("/run/qgf-wal.tgz")
    sh(vm, "rm -f /run/qgf-wal.tgz")

    restored = vm_factory(disk=run.snapshot, name="restored-postgresql")
    datadir = f"/var/lib/postgresql/{major}/main"
    restored.qga.write_file("/run/qgf-wal.tgz", wal)
    restored.qga.write_file(f"{datadir}/backup_label", label.encode())
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
        f" && chown postgres: {datadir}/backup_label && chmod 0600 {datadir}/backup_label"
        f" && touch {datadir}/recovery.signal && chown postgres: {datadir}/recovery.signal"
        f" && : > /var/log/postgresql/postgresql-{major}-main.log",
    )
    start_postgresql(restored)
    wait_for(restored, f"{AS_POSTGRES} psql -XAtc 'SELECT NOT pg_is_in_recovery()' | grep -qx t")

    log = sh(restored, f"cat /var/log/postgresql/postgresql-{major}-main.log").stdout
    assert f"starting backup recovery with redo LSN {start}," in log, log
    assert "consistent recovery state reached" in log, log
    rows = {int(x) for x in psql(restored, "SELECT id FROM qgf_acks").split()}
    assert before_freeze <= rows, sorted(before_freeze - rows)[:10]
    check = sh(
        restored,
        f"{AS_POSTGRES} /usr/lib/postgresql/{major}/bin/pg_amcheck --all --install-missing",
        check=False,
        timeout=600,
    )
    assert check.exitcode == 0, check.stdout + check.stderr
    restored.kill()
