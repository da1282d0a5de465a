"""The mariadb preset against the real MariaDB (the host's 10.11) in the container, through the
shim: the lock it holds, and how long writes wait when a 60-second UPDATE is running as the
freeze arrives (issue 14: never longer than lock_wait_timeout plus the frozen window)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
from container import Container
from helpers import PREFIX, configure, hook, hook_log

QUIESCE = f"{PREFIX}/libexec/qgafreeze/quiesce"
UNIT = "qgft-mariadb.service"
MARIADB_UNIT = """[Service]
Type=notify
User=mysql
ExecStart=/usr/sbin/mariadbd --no-defaults --datadir=/var/lib/mysql \\
  --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid --skip-networking
"""
LOCK_WAIT = 3  # the preset's default lock_wait_timeout
FROZEN = 2.0  # how long each test holds the freeze
# Process start-up and the container's scheduling on a loaded 2-core host, on top of the bound.
SLACK = 1.5

# Writes to a table of their own, one client each, timed: the longest wait is what matters.
WRITER = """
import json, subprocess, sys, time
end = time.monotonic() + float(sys.argv[1])
waits = []
while time.monotonic() < end:
    started = time.monotonic()
    subprocess.run(["mariadb", "-e", "INSERT INTO qgft.w (at) VALUES (NOW(6))"], check=True)
    waits.append(time.monotonic() - started)
    time.sleep(0.05)
print(json.dumps({"count": len(waits), "longest": max(waits)}))
"""


@pytest.fixture(scope="module")
def mariadb(installed: Container) -> Iterator[Container]:
    c = installed
    # The same server as test_sessions_freezer_signals_legacy.py's: set up once per container.
    c.run(
        "(getent group mysql >/dev/null || groupadd -r mysql)"
        " && (id mysql >/dev/null 2>&1"
        " || useradd -r -g mysql -M -d /var/lib/mysql -s /bin/sh mysql)"
        " && mkdir -p /var/lib/mysql /run/mysqld && chown mysql:mysql /var/lib/mysql /run/mysqld"
        " && (test -d /var/lib/mysql/mysql || mariadb-install-db --no-defaults --user=mysql"
        " --datadir=/var/lib/mysql --auth-root-authentication-method=socket --skip-test-db"
        " --force >/dev/null)",
        timeout=120,
    )
    c.install_unit(UNIT, MARIADB_UNIT)
    c.run(["systemctl", "start", UNIT], timeout=120)
    sql(
        c,
        "CREATE DATABASE IF NOT EXISTS qgft;"
        " CREATE TABLE IF NOT EXISTS qgft.w (id INT AUTO_INCREMENT PRIMARY KEY, at DATETIME(6));"
        " CREATE OR REPLACE TABLE qgft.big (id INT PRIMARY KEY, v INT) ENGINE=InnoDB;"
        " INSERT INTO qgft.big SELECT seq, 0 FROM qgft.seq_1_to_60;",
    )
    c.write_file("/root/qgft-writer.py", WRITER)
    yield c
    configure(c, "version: 1\napps: {}\n")
    c.run(["systemctl", "stop", UNIT], timeout=120)


def sql(c: Container, statements: str, check: bool = True, timeout: float = 60):
    return c.run(["mariadb", "-N", "-e", statements], check=check, timeout=timeout)


def preset(c: Container, session: str = "", options: str = "") -> None:
    extra = f"\n    session: {session}" if session else ""
    extra += f"\n    options: {options}" if options else ""
    configure(c, f"version: 1\napps:\n  db:\n    preset: mariadb\n    timeout: 30s{extra}\n")


def long_update(c: Container):
    """A 60-second UPDATE of qgft.big (one second a row), running once this returns."""
    update = c.popen(
        ["mariadb", "-e", "UPDATE qgft.big SET v = v + 1 WHERE SLEEP(1) = 0"],
        stdout=-1,
        stderr=-1,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = sql(c, "SELECT TIME FROM information_schema.PROCESSLIST WHERE INFO LIKE 'UPDATE%'")
        if out.stdout.strip() and int(out.stdout.split()[0]) >= 2:  # past the 1s threshold
            return update
        time.sleep(0.2)
    raise AssertionError("the UPDATE did not start")


def end_long_update(c: Container, update) -> str:
    ids = sql(c, "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE 'UPDATE%'")
    for ident in ids.stdout.split():
        sql(c, f"KILL QUERY {ident}", check=False)
    _, err = update.communicate(timeout=60)
    return err


def writes_during(c: Container, seconds: float):
    return c.popen(["python3", "/root/qgft-writer.py", str(seconds)], stdout=-1, text=True)


def longest_wait(writer) -> float:
    out, _ = writer.communicate(timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["count"] > 10, result
    print(f"longest write wait: {result['longest']:.2f}s of {result['count']} writes")  # figures
    return float(result["longest"])


def reports(c: Container) -> dict[str, object]:
    """The db app's details in the last cycle report: what the helper said of the snapshot."""
    report = json.loads(c.run(["cat", "/run/qgafreeze/report.json"]).stdout)
    (app,) = (a for a in report["apps"] if a["app"] == "db")
    return dict(app["details"])


def test_a_freeze_holds_backup_stage_block_commit_until_the_thaw(mariadb):
    c = mariadb
    preset(c)
    code, out = hook(c, "freeze")
    assert code == 0, out
    try:
        said = reports(c)
        assert said["lock"] == "BACKUP STAGE BLOCK_COMMIT"
        assert str(said["server"]).startswith("MariaDB 10.11")
        # Reads go on; a commit and DDL wait.
        assert sql(c, "SELECT COUNT(*) FROM qgft.w").returncode == 0
        ddl = c.run("timeout 2 mariadb -e 'CREATE TABLE IF NOT EXISTS qgft.d (i INT)'", check=False)
        assert ddl.returncode == 124, ddl
        writer = c.popen(["mariadb", "-e", "INSERT INTO qgft.w (id, at) VALUES (1000000, NOW())"])
        time.sleep(1)
        assert writer.poll() is None
        # The server says why the commit waits: for our lock.
        state = sql(
            c,
            "SELECT STATE FROM information_schema.PROCESSLIST"
            " WHERE INFO LIKE 'INSERT INTO qgft.w (id%'",
        )
        assert state.stdout.strip() == "Waiting for backup lock", state
    finally:
        code, out = hook(c, "thaw")
    assert code == 0, out
    assert writer.wait(30) == 0  # the waiting write went through once the lock was released
    assert sql(c, "SELECT id FROM qgft.w WHERE id = 1000000").stdout.strip() == "1000000"
    assert "BACKUP STAGE END" not in hook_log(c)  # what the helper sends is not logged


def test_a_60_second_update_in_flight_neither_fails_backup_stage_nor_stalls_other_writes(mariadb):
    c = mariadb
    preset(c)
    update = long_update(c)
    writer = writes_during(c, 8)
    time.sleep(1)
    started = time.monotonic()
    code, out = hook(c, "freeze")
    took = time.monotonic() - started
    assert code == 0, out
    time.sleep(FROZEN)
    code, out = hook(c, "thaw")
    assert code == 0, out

    # BLOCK_COMMIT does not wait for a running statement: the freeze does not wait for it.
    assert took < LOCK_WAIT, took
    assert reports(c)["lock"] == "BACKUP STAGE BLOCK_COMMIT"
    assert longest_wait(writer) < LOCK_WAIT + FROZEN + SLACK
    assert update.poll() is None  # not killed: it runs on, its commit waited for the thaw
    end_long_update(c, update)


def test_under_ftwrl_a_60_second_update_fails_the_freeze_fast_with_nothing_locked(mariadb):
    c = mariadb
    # FTWRL is what MySQL and MariaDB before 10.4 get; this server is made to take it.
    preset(c, session=f"{{argv: [{QUIESCE}, mariadb, --lock, ftwrl]}}")
    update = long_update(c)
    writer = writes_during(c, 10)
    time.sleep(1)
    started = time.monotonic()
    code, out = hook(c, "freeze")
    took = time.monotonic() - started
    hook(c, "thaw")  # as qemu-ga's caller does after a failed freeze

    assert code != 0
    log = hook_log(c)
    print(log)
    # Named: id, verb, seconds, user; never the statement's text.
    assert re.search(r"id \d+ \(UPDATE, \d+s, user root\)", log), log
    assert "SLEEP" not in log and "qgft.big" not in log
    assert "nothing locked" in log
    assert took < 5 + 3, took  # long_query_wait (5s), then it fails: no lock wait on top
    # Nothing was locked, so no write waited at all beyond its own few milliseconds.
    assert longest_wait(writer) < SLACK
    assert update.poll() is None
    end_long_update(c, update)


def test_under_ftwrl_kill_long_queries_ends_the_update_and_the_freeze_succeeds(mariadb):
    c = mariadb
    preset(c, session=f"{{argv: [{QUIESCE}, mariadb, --lock, ftwrl, --kill-long-queries]}}")
    update = long_update(c)
    writer = writes_during(c, 12)
    time.sleep(1)
    code, out = hook(c, "freeze")
    assert code == 0, out
    try:
        said = reports(c)
        assert said["lock"] == "FLUSH TABLES WITH READ LOCK"
        assert len(said["killed_statements"]) == 1  # type: ignore[arg-type]
        _, err = update.communicate(timeout=30)
        assert "interrupted" in err  # KILL QUERY's "Query execution was interrupted"
        time.sleep(FROZEN)
    finally:
        code, out = hook(c, "thaw")
    assert code == 0, out
    assert longest_wait(writer) < LOCK_WAIT + FROZEN + SLACK + 1  # the kill's rollback too
    assert sql(c, "SELECT SUM(v) FROM qgft.big").stdout.strip() == "0"  # rolled back


def test_mariadb_restarted_by_hand_while_frozen_is_reported_lost_and_the_thaw_is_prompt(mariadb):
    # The container has no real fsfreeze, and qemu-ga's frozen flag is never there: writes land
    # after the restart, and the report judges the lost lock against that flag, so the app is not
    # quiesced ("ended before qemu-ga had frozen the filesystems") and the cycle crash-consistent.
    c = mariadb
    preset(c)
    code, out = hook(c, "freeze")
    assert code == 0, out
    try:
        c.run(["systemctl", "restart", UNIT], timeout=120)
        sql(c, "INSERT INTO qgft.w (at) VALUES (NOW(6))")  # acknowledged inside the window
        time.sleep(1 + 0.5 + 3)  # the helper checks every 0.5s and waits 3s for an answer
    finally:
        started = time.monotonic()
        hook(c, "thaw")
        took = time.monotonic() - started
    print(f"thaw after the lost lock took {took:.2f}s")  # figures
    assert took < 10, took  # not the app's 30s timeout
    report = json.loads(c.run(["cat", "/run/qgafreeze/report.json"]).stdout)
    (app,) = (a for a in report["apps"] if a["app"] == "db")
    assert "reason" in app["details"]["lock_lost"], app
    assert app["quiesced"] is False, app
    assert "its held session ended before qemu-ga had frozen" in app["note"], app
    assert report["verdict"] == "crash-consistent", report
    # The next cycle takes the lock on the restarted server again, and its report says so.
    code, out = hook(c, "freeze")
    assert code == 0, out
    code, out = hook(c, "thaw")
    assert code == 0, out
    assert reports(c)["lock"] == "BACKUP STAGE BLOCK_COMMIT"
