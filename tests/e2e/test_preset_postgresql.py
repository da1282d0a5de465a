"""The postgresql preset against each release's own PostgreSQL (13 on bullseye, 15 on bookworm, 17
on trixie) through the real qemu-ga: a backup held across the frozen window, the backup label of
the cycle in the thaw's report.  (test_restore_databases.py restores such a snapshot on trixie as
a base backup.)"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from guest import NO_APPS, backup, configure, sh
from pgguest import MAJOR, PRESET_APP, entry, report, start_postgresql, stop_and_clean
from vm import VM


@pytest.fixture(scope="module")
def pg_guest(shared_guest: VM, suite: str) -> Iterator[VM]:
    vm = shared_guest
    start_postgresql(vm)
    yield vm
    # Shared with the next modules: thawed, no apps, PostgreSQL stopped, our files gone.
    if vm.qga.fsfreeze_status() == "frozen":
        vm.qga.fsfreeze_thaw()
    configure(vm, NO_APPS)
    stop_and_clean(vm, MAJOR[suite])


@pytest.mark.suites("bullseye", "bookworm", "trixie")
def test_each_releases_postgresql_is_backed_up_and_the_label_of_the_cycle_reported(pg_guest, suite):
    vm = pg_guest
    configure(vm, PRESET_APP)
    sh(vm, "truncate -s0 /var/log/qga-fsfreeze-hook.log")
    backup(vm)

    doc = report(vm)
    assert doc["phase"] == "thaw" and doc["verdict"] == "application-consistent", doc
    app = entry(doc)
    assert app["freeze"]["result"] == "ok" and app["thaw"]["result"] == "ok", app
    details = app["details"]
    assert details["backup_start"]["server_version_num"] // 10000 == MAJOR[suite]
    label = details["backup_label"]
    assert label.startswith("START WAL LOCATION: "), label
    assert f"LABEL: qgafreeze cycle {doc['cycle']}\n" in label
    assert details["backup_start"]["lsn"] == label.split()[3]
    log = sh(vm, "cat /var/log/qga-fsfreeze-hook.log").stdout
    assert len(re.findall(r": qgafreeze:pg finished with status=0$", log, re.M)) == 2, log
    # The held session is gone: the helper and its psql ended at the thaw.
    assert "quiesce postgresql" not in sh(vm, "ps -u postgres -o args=").stdout

