"""The mariadb preset against each release's own MariaDB (10.5 on bullseye, 10.11 on bookworm,
11.8 on trixie) through the real qemu-ga: the helper takes the lock that release's server has
(BACKUP STAGE BLOCK_COMMIT, MariaDB 10.4 and later), the cycle report names it, commits wait
while frozen and go through again after the thaw.  (The restore proof in test_backup.py covers
what such a snapshot holds.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from guest import NO_APPS, REPORT_SCHEMA, backup, configure, run_in_background, sh
from vm import VM

VERSION = {"bullseye": "10.5.", "bookworm": "10.11.", "trixie": "11.8."}
# TCG runs the guest about 15 times slower than the host: phases with room to spare.
PRESET_APP = """version: 1
settings:
  freeze_timeout: 5m
  thaw_timeout: 5m
apps:
  db: {preset: mariadb, timeout: 2m}
"""
ACKS = "/run/qgf-my-acks.log"  # tmpfs: the writer notes its commits while the disks are frozen
LOAD = "qgf-my-load"


@pytest.fixture(scope="module")
def my_guest(shared_guest: VM) -> Iterator[VM]:
    vm = shared_guest
    yield vm
    # Shared with the next modules: thawed, no apps, the writer and its table gone.
    if vm.qga.fsfreeze_status() == "frozen":
        vm.qga.fsfreeze_thaw()
    sh(vm, f"systemctl stop {LOAD}.service", check=False)
    configure(vm, NO_APPS)
    sh(vm, f"mariadb -e 'DROP DATABASE IF EXISTS qgf_my'; rm -f {ACKS}", check=False)


def acks(vm: VM) -> list[int]:
    """Guest times (ns) of every commit the writer saw acknowledged so far."""
    if sh(vm, f"test -e {ACKS}", check=False).exitcode != 0:
        return []
    return [int(line) for line in vm.qga.read_file(ACKS).decode().split() if line.isdigit()]


def wait_for_acks_after(vm: VM, after: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while True:
        later = [t for t in acks(vm) if t > after]
        if later:
            return later[0]
        assert time.monotonic() < deadline, "no write went through after the thaw"
        time.sleep(1)


@pytest.mark.suites("bullseye", "bookworm", "trixie")
def test_each_releases_mariadb_is_held_at_block_commit_and_writes_resume_after_the_thaw(
    my_guest, suite
):
    vm = my_guest
    configure(vm, PRESET_APP)
    sh(
        vm,
        "mariadb -e 'CREATE DATABASE IF NOT EXISTS qgf_my;"
        " CREATE TABLE IF NOT EXISTS qgf_my.t (id INT AUTO_INCREMENT PRIMARY KEY) ENGINE=InnoDB'",
    )
    run_in_background(
        vm,
        LOAD,
        f"while :; do if mariadb -e 'INSERT INTO qgf_my.t VALUES ()'; then date +%s%N >> {ACKS};"
        " else sleep 0.5; fi; done",
    )
    wait_for_acks_after(vm, 0)

    run = backup(vm, frozen_seconds=3.0)
    resumed = wait_for_acks_after(vm, run.thaw_sent)

    doc: dict[str, Any] = json.loads(sh(vm, "cat /run/qgafreeze/report.json").stdout)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(doc)
    assert doc["phase"] == "thaw" and doc["verdict"] == "application-consistent", doc
    entry = next(e for e in doc["apps"] if e["app"] == "db")
    details = entry["details"]
    assert details["lock"] == "BACKUP STAGE BLOCK_COMMIT", details
    assert details["server"].startswith(f"MariaDB {VERSION[suite]}"), details
    # No commit went through while the lock was held (a second's grace for a commit acknowledged
    # just before the lock whose note was written just after).
    held = [t for t in acks(vm) if run.freeze_returned + 1_000_000_000 < t < run.thaw_sent]
    assert held == [], (held, run)
    print(f"{suite}: first commit {(resumed - run.thaw_returned) / 1e9:.2f}s after the thaw")
    # The helper and its client ended at the thaw.
    assert "quiesce mariadb" not in sh(vm, "ps -eo args=").stdout
