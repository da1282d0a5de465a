"""One backup of a trixie guest where MariaDB (the preset's held BACKUP STAGE session) and
PostgreSQL 17 (the preset's backup held across the frozen window, WAL archived) both take inserts,
then the snapshot booted as the restore of a real VM, and each database checked in it.

Both are restored from one snapshot and one boot: a guest with two databases is how many
admins run them, and a boot of a software-emulated guest is the dearest step of the VM tier."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pgguest
import pytest
from guest import NO_APPS, SESSION_APP, Backup, backup, configure, mariadb_active, sh, wait_for
from guest import acks as mariadb_acks
from guest import start_load as start_mariadb_load
from guest import stop_load as stop_mariadb_load
from guest import wait_for_acks as wait_for_mariadb_acks
from vm import VM

from qgafreeze.quiesce.mariadb import BACKUP_STAGE

pytestmark = pytest.mark.suites("trixie")

BOTH_APPS = SESSION_APP + "  pg: {preset: postgresql, timeout: 2m}\n"


@dataclass
class Restore:
    """What the live guest acknowledged and reported around the backup, and the booted copy."""

    run: Backup
    mariadb_acked: list[tuple[int, int]]
    pg_acked: list[tuple[int, int]]
    mariadb_stayed_up: bool
    report: dict[str, Any]
    wal: bytes
    restored: VM


@pytest.fixture(scope="module")
def restore(
    shared_guest: VM, suite: str, vm_factory: Any, tmp_path_factory: Any
) -> Iterator[Restore]:
    vm = shared_guest
    major = pgguest.MAJOR[suite]
    pgguest.start_postgresql(vm)
    try:
        pgguest.enable_archiving(vm, major)
        configure(vm, BOTH_APPS)
        start_mariadb_load(vm, first_id=3_000_000)
        pgguest.start_load(vm, first_id=5_000_000)
        wait_for_mariadb_acks(vm, 20)
        pgguest.wait_for_acks(vm, 20)
        snapshot = tmp_path_factory.mktemp("restore-databases") / "after-two-databases.qcow2"
        run = backup(vm, snapshot_to=snapshot)
        # Both loads go on after the thaw.
        wait_for_mariadb_acks(vm, len(mariadb_acks(vm)) + 5)
        pgguest.wait_for_acks(vm, len(pgguest.acks(vm)) + 5)
        stop_mariadb_load(vm)
        pgguest.stop_load(vm)
        stayed_up = mariadb_active(vm)
        doc = pgguest.report(vm)
        wal = pgguest.archived_wal(vm)
        m_acked, p_acked = mariadb_acks(vm), pgguest.acks(vm)
    finally:
        # Shared with the next modules: thawed, no apps, PostgreSQL stopped, our files gone.
        if vm.qga.fsfreeze_status() == "frozen":
            vm.qga.fsfreeze_thaw()
        stop_mariadb_load(vm)
        configure(vm, NO_APPS)
        pgguest.stop_and_clean(vm, major)

    restored = vm_factory(disk=run.snapshot, name="restored-databases")
    try:
        wait_for(restored, "systemctl is-active mariadb.service", timeout=600)
        yield Restore(run, m_acked, p_acked, stayed_up, doc, wal, restored)
    finally:
        restored.kill()


def _inside(acked: list[tuple[int, int]], run: Backup) -> list[int]:
    return [i for t, i in acked if run.freeze_returned <= t <= run.thaw_sent]


def test_both_databases_were_quiesced_and_took_no_write_inside_the_frozen_window(
    restore: Restore,
) -> None:
    doc = restore.report
    assert doc["verdict"] == "application-consistent", doc
    apps = {entry["app"]: entry for entry in doc["apps"]}
    for name in ("mariadb", "pg"):
        assert apps[name]["freeze"]["result"] == "ok", apps[name]
        assert apps[name]["thaw"]["result"] == "ok", apps[name]
    assert apps["mariadb"]["details"]["lock"] == BACKUP_STAGE.name, apps["mariadb"]
    # MariaDB's commits wait at BLOCK_COMMIT, PostgreSQL's for the frozen disk.
    assert not _inside(restore.mariadb_acked, restore.run)
    assert not _inside(restore.pg_acked, restore.run)
    assert restore.mariadb_stayed_up  # the held session never stopped the server


def test_restored_mariadb_holds_every_insert_acknowledged_before_the_freeze_and_passes_check(
    restore: Restore,
) -> None:
    before = {i for t, i in restore.mariadb_acked if t < restore.run.freeze_sent}
    assert len(before) >= 20
    out = sh(restore.restored, "mariadb -N -e 'SELECT id FROM qgf.acks'").stdout
    assert before <= {int(x) for x in out.split()}
    check = sh(restore.restored, "mariadb -N -e 'CHECK TABLE qgf.acks'").stdout
    assert check.split()[-1] == "OK", check


def test_restored_postgresql_starts_as_a_base_backup_from_the_reported_label(
    restore: Restore, suite: str
) -> None:
    major = pgguest.MAJOR[suite]
    details = pgguest.entry(restore.report)["details"]
    label, start = details["backup_label"], details["backup_start"]["lsn"]
    assert f"LABEL: qgafreeze cycle {restore.report['cycle']}\n" in label

    pgguest.restore_as_base_backup(restore.restored, major, label, restore.wal)
    log = sh(restore.restored, f"cat {pgguest.server_log(major)}").stdout
    assert f"starting backup recovery with redo LSN {start}," in log, log
    assert "consistent recovery state reached" in log, log
    before = {i for t, i in restore.pg_acked if t < restore.run.freeze_sent}
    assert len(before) >= 20
    missing = before - pgguest.stored_ids(restore.restored)
    assert not missing, sorted(missing)[:10]
    pgguest.amcheck(restore.restored, major)
