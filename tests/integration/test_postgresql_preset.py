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


ARCHIVE = "/var/lib/qgft-pg-archive"
COPY = "/var/lib/qgft-pg-copy"
RESTORE_SOCKET = "/run/qgft-pg-restore"
ACKS = "/run/qgft-pg-acks"
PG_BIN = "/usr/lib/postgresql/15/bin"


def start_copy(c: Container, datadir: str, log: str) -> int:
    """A second server on ``datadir`` on its own socket; pg_ctl's exit status."""
    return c.run(
        f"{AS_POSTGRES} {PG_BIN}/pg_ctl -D {datadir} -l {log} -w -t 120 start"
        f" -o '-k {RESTORE_SOCKET} -p 5499 -c listen_addresses= -c archive_mode=off'",
        check=False,
        timeout=180,
    ).returncode


def test_a_copy_taken_while_frozen_restores_as_a_base_backup_as_the_readme_says(postgres):
    # The README's restore as a base backup, on a copy of the data directory made file by file
    # while frozen (not atomic: the case the label is for), under insert load: with the label of
    # the cycle and the archived WAL it starts from the label's checkpoint, holds every insert
    # acknowledged before the freeze and passes pg_amcheck; with the label alone it refuses.
    c = postgres
    c.run(
        f"install -d -o postgres -g postgres -m 0700 {ARCHIVE} {RESTORE_SOCKET}"
        f" && rm -rf {COPY} {COPY}-nowal {ACKS}"
    )
    psql(c, "ALTER SYSTEM SET archive_mode = on")
    psql(c, f"ALTER SYSTEM SET archive_command = 'cp %p {ARCHIVE}/%f'")
    c.run(["systemctl", "restart", "qgft-postgres.service"])
    assert eventually(lambda: psql(c, "SHOW archive_mode", check=False) == "on")
    psql(c, "CREATE TABLE IF NOT EXISTS acks (id bigint PRIMARY KEY, payload text)")
    configure(c, CONFIG)
    load = c.popen(
        "i=0; while :; do i=$((i+1)); if "
        f"{AS_POSTGRES} psql -Xqc \"INSERT INTO acks VALUES ($i, repeat('x', 200))\""
        f' 2>/dev/null; then echo "$(date +%s%N) $i" >> {ACKS}; fi; done'
    )
    try:
        assert eventually(lambda: len(c.run(f"cat {ACKS}", check=False).stdout.split()) > 40)
        freeze_sent = time.time_ns()
        code, out = hook(c, "freeze")
        assert code == 0, out
        c.run(f"cp -a /var/lib/qgft-pg {COPY} && cp -a {COPY} {COPY}-nowal")
        code, out = hook(c, "thaw")
        assert code == 0, out
        time.sleep(0.5)
    finally:
        load.kill()
    acked = [line.split() for line in c.run(f"cat {ACKS}").stdout.splitlines()]
    before_freeze = {int(i) for t, i in acked if int(t) < freeze_sent}
    assert len(before_freeze) > 20

    details = pg_entry(report(c))["details"]
    label, start = details["backup_label"], details["backup_start"]["lsn"]
    for copy in (COPY, f"{COPY}-nowal"):
        c.write_file(f"{copy}/backup_label", label, mode=0o600)
        c.run(f"rm -f {copy}/postmaster.pid && chown -R postgres:postgres {copy}")

    # The label alone: the WAL up to the backup's end was written after the copy.
    assert start_copy(c, f"{COPY}-nowal", f"{RESTORE_SOCKET}/nowal.log") != 0
    refused = c.run(["cat", f"{RESTORE_SOCKET}/nowal.log"]).stdout
    assert "WAL ends before end of online backup" in refused, refused

    c.run(
        f"touch {COPY}/recovery.signal && chown postgres: {COPY}/recovery.signal && printf '%s\\n'"
        f" \"restore_command = 'cp {ARCHIVE}/%f %p'\" \"recovery_target = 'immediate'\""
        f" \"recovery_target_action = 'promote'\" >> {COPY}/postgresql.conf"
    )
    log = f"{RESTORE_SOCKET}/restore.log"
    try:
        assert start_copy(c, COPY, log) == 0, c.run(["cat", log]).stdout
        restored = f"{AS_POSTGRES} psql -h {RESTORE_SOCKET} -p 5499 -XAt"
        assert eventually(
            lambda: c.run(f"{restored} -c 'SELECT pg_is_in_recovery()'", check=False).stdout
            == "f\n"
        )
        text = c.run(["cat", log]).stdout
        assert f"starting backup recovery with redo LSN {start}," in text, text
        assert "consistent recovery state reached" in text, text
        rows = {int(x) for x in c.run(f"{restored} -c 'SELECT id FROM acks'").stdout.split()}
        assert before_freeze <= rows, sorted(before_freeze - rows)[:10]
        check = c.run(
            f"{AS_POSTGRES} {PG_BIN}/pg_amcheck -h {RESTORE_SOCKET} -p 5499 --all"
            " --install-missing",
            check=False,
            timeout=300,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        c.run(f"{AS_POSTGRES} {PG_BIN}/pg_ctl -D {COPY} -m fast -w stop", check=False)
        c.run(f"rm -rf {COPY} {COPY}-nowal", check=False)
        psql(c, "ALTER SYSTEM RESET archive_mode", check=False)
        psql(c, "ALTER SYSTEM RESET archive_command", check=False)
