"""The postgresql preset against a real PostgreSQL 15 (the host's) in the container, through the
shim: a checkpoint and a backup held across the frozen window, and the backup label in the thaw's
cycle report, tied to the cycle, with nothing written to disk for it."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from container import Container
from helpers import PREFIX, configure, cycle_of, hook

POSTGRES_UNIT = """[Service]
User=postgres
ExecStart=/usr/lib/postgresql/15/bin/postgres -D /var/lib/qgft-pg -k /run/postgresql \\
  -c listen_addresses=
"""
# runuser and su need PAM, whose configuration the container's nearly empty /etc lacks.
AS_POSTGRES = "setpriv --reuid=postgres --regid=postgres --init-groups --"
# make install's helper under the container's PREFIX, which the preset runs there.
QUIESCE = f"{PREFIX}/libexec/qgafreeze/quiesce"
CONFIG = "version: 1\napps:\n  pg: {preset: postgresql, timeout: 60s}\n"


def eventually(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.fixture(scope="module")
def postgres(installed: Container) -> Container:
    c = installed
    # No /etc/login.defs in the container: useradd makes no user group by itself.
    c.run(
        "(getent group postgres >/dev/null || groupadd -r postgres) &&"
        " (id postgres >/dev/null 2>&1 ||"
        " useradd -r -g postgres -M -d /var/lib/postgresql -s /bin/sh postgres)"
        " && mkdir -p /var/lib/postgresql /var/lib/qgft-pg /run/postgresql"
        " && chown postgres:postgres /var/lib/postgresql /var/lib/qgft-pg /run/postgresql"
        f" && {{ test -f /var/lib/qgft-pg/PG_VERSION ||"
        f" {AS_POSTGRES} /usr/lib/postgresql/15/bin/initdb -D /var/lib/qgft-pg >/dev/null; }}",
        timeout=120,
    )
    c.install_unit("qgft-postgres.service", POSTGRES_UNIT)
    c.run(["systemctl", "start", "qgft-postgres.service"])
    assert eventually(lambda: psql(c, "SELECT 1", check=False) == "1")
    return c


def psql(c: Container, sql: str, check: bool = True) -> str:
    result = c.run(f'{AS_POSTGRES} psql -XAtc "{sql}"', check=check)
    return result.stdout.strip()


def report(c: Container) -> dict[str, Any]:
    return json.loads(c.run(["cat", "/run/qgafreeze/report.json"]).stdout)


def pg_entry(doc: dict[str, Any]) -> dict[str, Any]:
    return next(entry for entry in doc["apps"] if entry["app"] == "pg")


def test_the_backup_label_of_the_cycle_is_in_the_thaws_report_and_on_no_disk(postgres):
    c = postgres
    checkpoints = "SELECT checkpoints_req FROM pg_stat_bgwriter"
    before = int(psql(c, checkpoints))
    configure(c, CONFIG)
    files_before = c.run("find / -xdev -newer /etc/qgafreeze.yaml -type f | sort").stdout

    code, out = hook(c, "freeze")
    assert code == 0, out
    cycle = cycle_of(out)
    assert int(psql(c, checkpoints)) > before  # the helper's CHECKPOINT
    frozen = pg_entry(report(c))
    # At the freeze the backup has started; its label only exists once it stops.
    assert frozen["details"]["backup_start"]["server_version_num"] >= 150000
    assert "backup_label" not in frozen["details"]
    # The held session: the helper, as postgres, with its psql.
    held = c.run(["ps", "-u", "postgres", "-o", "args="]).stdout
    assert f"{QUIESCE} postgresql" in held and "psql -X -q -A -t" in held, held

    code, out = hook(c, "thaw")
    assert code == 0, out
    doc = report(c)
    assert doc["cycle"] == cycle and doc["verdict"] == "application-consistent"
    details = pg_entry(doc)["details"]
    label = details["backup_label"]
    assert label.startswith("START WAL LOCATION: ")
    assert f"LABEL: qgafreeze cycle {cycle}\n" in label
    start_lsn = label.split()[3]
    assert details["backup_start"]["lsn"] == start_lsn
    assert details["backup_stop"]["lsn"]
    assert "backup_label" in details["restore"]
    assert pg_entry(doc)["thaw"]["result"] == "ok"
    # No label file was written (the old preset's path, or any other).
    old_path = ["test", "-e", "/var/lib/postgresql/qgafreeze-backup_label"]
    assert c.run(old_path, check=False).returncode == 1
    files_after = c.run("find / -xdev -newer /etc/qgafreeze.yaml -type f | sort").stdout
    new_files = set(files_after.split()) - set(files_before.split())
    assert not [f for f in new_files if "backup_label" in f], new_files


def test_each_cycle_gets_its_own_label(postgres):
    c = postgres
    configure(c, CONFIG)
    labels = []
    for _ in range(2):
        code, out = hook(c, "freeze")
        assert code == 0, out
        code, out = hook(c, "thaw")
        assert code == 0, out
        doc = report(c)
        label = pg_entry(doc)["details"]["backup_label"]
        assert f"LABEL: qgafreeze cycle {doc['cycle']}" in label
        labels.append(label)
    assert labels[0] != labels[1]


def test_an_unreachable_server_fails_the_freeze_with_psqls_reason(postgres):
    c = postgres
    # Arguments after the helper's name go to psql.
    argv = f"[{QUIESCE}, postgresql, -p, '5999']"
    configure(c, f"version: 1\napps:\n  pg: {{preset: postgresql, session: {{argv: {argv}}}}}\n")
    code, out = hook(c, "freeze")
    assert code != 0, out
    doc = report(c)
    assert doc["verdict"] == "failed"
    message = pg_entry(doc)["freeze"]["message"]
    assert "session ended before it was ready" in message
    assert "5999" in message  # psql's own words: the socket it could not reach
    hook(c, "thaw")
