"""The MariaDB/MySQL quiesce helper's decisions, against a scripted client: which lock for which
server, what it waits for before locking, what it kills, and what it says when it fails."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qgafreeze import schema
from qgafreeze.config import parse_text
from qgafreeze.errors import ConfigError
from qgafreeze.fields import parse_duration
from qgafreeze.quiesce import mariadb
from qgafreeze.quiesce.mariadb import BACKUP_STAGE, FTWRL, ClientError, Failed, Options

SRC = Path(__file__).resolve().parents[2] / "src"


class FakeClient:
    """Answers the helper's statements from a script; records every statement it was sent."""

    def __init__(self, version: str = "10.11.6-MariaDB-0+deb12u1") -> None:
        self.version = version
        self.sent: list[str] = []
        # Each read of the processlist pops the next answer; the last one repeats.
        self.processlists: list[list[list[str]]] = [[]]
        self.refuse: dict[str, Exception] = {}
        self.ident = "7"  # the connection's id: another one means the server restarted

    def query(self, sql: str, within: float | None = None) -> list[list[str]]:
        self.sent.append(sql)
        for prefix, error in self.refuse.items():
            if sql.startswith(prefix):
                raise error
        if sql.startswith("SELECT 'version'"):
            return [["version", self.version]]
        if sql.startswith("SELECT 'connection'"):
            assert within is not None  # a check that could hang would hold the thaw up
            return [["connection", self.ident]]
        if "PROCESSLIST" in sql:
            threshold = int(re.search(r"TIME >= (\d+)", sql).group(1))  # type: ignore[union-attr]
            rows = self.processlists[0] if len(self.processlists) == 1 else self.processlists.pop(0)
            return [row for row in rows if int(row[2]) >= threshold]
        return []

    def locks(self) -> list[str]:
        return [s for s in self.sent if s.startswith(("BACKUP", "FLUSH", "UNLOCK", "KILL"))]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def long_row(ident: int, seconds: int, text: str, user: str = "app") -> list[str]:
    return ["long", str(ident), str(seconds), user, text]


def take(client: FakeClient, **options) -> tuple[list[str], Clock]:
    out: list[str] = []
    clock = Clock()
    mariadb.take_lock(client, Options(**options), out.append, clock, clock.sleep)
    return out, clock


@pytest.mark.parametrize(
    ("version", "product", "numbers", "lock"),
    [
        ("10.11.6-MariaDB-0+deb12u1", "MariaDB", (10, 11, 6), BACKUP_STAGE),
        ("10.5.23-MariaDB-0+deb11u1-log", "MariaDB", (10, 5, 23), BACKUP_STAGE),
        ("11.8.3-MariaDB-1 from Debian", "MariaDB", (11, 8, 3), BACKUP_STAGE),
        ("10.4.0-MariaDB", "MariaDB", (10, 4, 0), BACKUP_STAGE),
        ("10.3.39-MariaDB-0+deb10u2", "MariaDB", (10, 3, 39), FTWRL),
        ("8.0.36-0ubuntu0.22.04.1", "MySQL", (8, 0, 36), FTWRL),
        ("5.7.44-log", "MySQL", (5, 7, 44), FTWRL),
    ],
)
def test_the_lock_is_chosen_by_the_servers_version(version, product, numbers, lock):
    assert mariadb.parse_version(version) == (product, numbers)
    assert mariadb.choose_lock(product, numbers, "auto") is lock


def test_an_unreadable_version_fails_without_echoing_much_of_it():
    with pytest.raises(Failed, match="cannot read the server's version"):
        mariadb.parse_version("not a version" + "x" * 100)


def test_backup_stage_can_be_refused_for_ftwrl_but_not_forced_on_a_server_without_it():
    assert mariadb.choose_lock("MariaDB", (10, 11, 6), "ftwrl") is FTWRL
    with pytest.raises(Failed, match="no BACKUP STAGE"):
        mariadb.choose_lock("MySQL", (8, 0, 36), "backup-stage")


def test_mariadb_10_4_and_later_take_mariabackups_stages_under_the_bounded_lock_wait():
    client = FakeClient()
    out, _ = take(client)

    assert client.locks() == [
        "BACKUP STAGE START",
        "BACKUP STAGE FLUSH",
        "BACKUP STAGE BLOCK_DDL",
        "BACKUP STAGE BLOCK_COMMIT",
    ]
    assert client.sent.index("SET SESSION lock_wait_timeout = 3") < client.sent.index(
        "BACKUP STAGE START"
    )
    assert 'qgafreeze-report lock "BACKUP STAGE BLOCK_COMMIT"' in out
    assert 'qgafreeze-report server "MariaDB 10.11.6-MariaDB-0+deb12u1"' in out
    assert any(line.startswith("qgafreeze-report holds ") for line in out)


def test_mysql_takes_flush_tables_with_read_lock():
    client = FakeClient("8.0.36")
    out, _ = take(client)
    assert client.locks() == ["FLUSH TABLES WITH READ LOCK"]
    assert 'qgafreeze-report lock "FLUSH TABLES WITH READ LOCK"' in out


@pytest.mark.parametrize(("given", "sent"), [(2.5, 3), (0.2, 1), (10, 10)])
def test_the_servers_lock_wait_timeout_is_whole_seconds_never_zero(given, sent):
    client = FakeClient()
    take(client, lock_wait_timeout=given)
    assert f"SET SESSION lock_wait_timeout = {sent}" in client.sent


def test_a_long_row_change_does_not_hold_backup_stage_up_so_it_is_not_waited_for():
    client = FakeClient()
    client.processlists = [[long_row(7, 60, "UPDATE t SET v = v + 1")]]
    _, clock = take(client)
    assert clock.now == 100.0  # no wait
    assert "BACKUP STAGE BLOCK_COMMIT" in client.locks()


def test_a_long_statement_that_does_not_finish_fails_the_app_with_nothing_locked_and_named():
    client = FakeClient("8.0.36")
    client.processlists = [[long_row(42, 61, "UPDATE t SET password = 's3cret' WHERE 1", "shop")]]
    with pytest.raises(Failed) as caught:
        take(client, long_query_wait=5)

    message = str(caught.value)
    assert "nothing locked" in message
    assert "id 42 (UPDATE, 61s, user shop)" in message
    assert "s3cret" not in message and "password" not in message
    assert "kill_long_queries" in message
    assert client.locks() == []
    assert not any("lock_wait_timeout" in s for s in client.sent)


def test_the_wait_for_long_statements_is_bounded_by_long_query_wait():
    client = FakeClient("8.0.36")
    client.processlists = [[long_row(42, 61, "UPDATE t")]]
    clock = Clock()
    with pytest.raises(Failed):
        mariadb.take_lock(client, Options(long_query_wait=5), [].append, clock, clock.sleep)
    assert 105.0 <= clock.now <= 105.0 + mariadb.POLL


def test_ddl_holds_backup_stage_up_so_it_is_waited_for_and_locking_follows_once_it_ends():
    client = FakeClient()
    alter = long_row(9, 30, "ALTER TABLE big ADD COLUMN c INT")
    client.processlists = [[alter], [alter], [alter], []]
    out, clock = take(client)

    assert clock.now == pytest.approx(100.0 + 3 * mariadb.POLL)
    assert "BACKUP STAGE BLOCK_COMMIT" in client.locks()
    assert any(line.startswith("qgafreeze-report waited_for_long_statements") for line in out)


def test_statements_shorter_than_the_threshold_are_left_to_the_lock_wait():
    client = FakeClient("8.0.36")
    client.processlists = [[long_row(3, 1, "UPDATE t")]]
    take(client, long_query_threshold=2)
    assert client.locks() == ["FLUSH TABLES WITH READ LOCK"]


def test_kill_long_queries_ends_them_after_the_wait_and_then_locks():
    client = FakeClient("8.0.36")
    client.processlists = [[long_row(42, 61, "UPDATE t"), long_row(43, 20, "SELECT 1")]]
    client.refuse["KILL QUERY 43"] = ClientError(1094, "ERROR 1094 (HY000): Unknown thread id")
    out, clock = take(client, kill_long_queries=True, long_query_wait=2)

    assert clock.now >= 102.0
    assert client.locks() == ["KILL QUERY 42", "KILL QUERY 43", "FLUSH TABLES WITH READ LOCK"]
    assert "qgafreeze-report killed_statements [42, 43]" in out


def test_a_lock_not_granted_in_time_fails_naming_what_ran_and_leaves_nothing_locked():
    client = FakeClient("8.0.36")
    client.refuse["FLUSH TABLES"] = ClientError(1205, "ERROR 1205 (HY000): Lock wait timeout")
    client.processlists = [[], [long_row(5, 0, "INSERT INTO t VALUES (1)")]]
    with pytest.raises(Failed) as caught:
        take(client)

    message = str(caught.value)
    assert "FLUSH TABLES WITH READ LOCK not granted within 3s (lock_wait_timeout)" in message
    assert "id 5 (INSERT, 0s, user app)" in message
    assert client.locks()[-1] == "UNLOCK TABLES"


def test_the_helpers_defaults_are_the_documented_preset_options():
    for name, value in mariadb.DEFAULTS.items():
        assert parse_duration(schema.PRESET_OPTIONS.key(name).value) == value, name
    assert schema.PRESET_OPTIONS.key("kill_long_queries").value is Options().kill_long_queries
    assert Options().kill_long_queries is False


# -- the preset and its options in the config --------------------------------------------------


def session_argv(text: str) -> tuple[str, ...]:
    session = parse_text(text).app("db").session
    assert session is not None
    return session.argv


def test_the_presets_hold_the_helper_with_every_option_in_force():
    argv = session_argv("apps:\n  db: {preset: mysql}\n")
    assert argv[1:] == (
        "mariadb",
        "--client",
        "mysql",
        "--long-query-threshold=1",
        "--long-query-wait=5",
        "--lock-wait-timeout=3",
    )


def test_options_reach_the_helper_as_arguments():
    argv = session_argv(
        "apps:\n  db:\n    preset: mariadb\n    options: {long_query_wait: 500ms,"
        " kill_long_queries: true, lock_wait_timeout: 1m}\n"
    )
    assert argv[2:] == (
        "--client",
        "mariadb",
        "--long-query-threshold=1",
        "--long-query-wait=0.5",
        "--kill-long-queries",
        "--lock-wait-timeout=60",
    )
    assert mariadb.parse_args(argv[2:]) == Options(
        long_query_wait=0.5, kill_long_queries=True, lock_wait_timeout=60.0
    )


def test_client_arguments_follow_a_double_dash():
    options = mariadb.parse_args(["--client", "mysql", "--", "--defaults-file=/etc/x.cnf", "-u"])
    assert options.client == "mysql"
    assert options.client_args == ("--defaults-file=/etc/x.cnf", "-u")


@pytest.mark.parametrize(
    ("app", "problem"),
    [
        ("{units: [a], options: {long_query_wait: 1s}}", "apps.db.options: applies to a preset"),
        ("{preset: mongodb, options: {long_query_wait: 1s}}", "preset mongodb does not take"),
        ("{preset: mariadb, options: {kill_long_queries: 'yes'}}", "expected true or false"),
        ("{preset: mariadb, options: {long_query_wait: soon}}", "apps.db.options.long_query_wait"),
        ("{preset: mariadb, options: [1]}", "apps.db.options: expected a mapping"),
        ("{preset: mariadb, options: {lock_timeout: 1s}}", "unknown key (allowed: long_query"),
    ],
)
def test_wrong_options_are_errors_at_their_place(app, problem):
    with pytest.raises(ConfigError) as caught:
        parse_text(f"apps:\n  db: {app}\n")
    assert any(problem in p for p in caught.value.problems), caught.value.problems


# -- the program, with a client that imitates mariadb --batch -----------------------------------

FAKE_CLIENT = r"""#!/usr/bin/python3
import re, sys
log = open(sys.argv[1], "a")
log.write(" ".join(sys.argv[2:]) + "\n"); log.flush()
hung = False
for line in sys.stdin:
    sql = line.strip().rstrip(";")
    log.write(sql + "\n"); log.flush()
    mark = re.match(r"SELECT '(qgafreeze-mark-\d+)'", sql)
    if hung:
        continue
    if mark:
        print(mark.group(1), flush=True)
    elif sql.startswith("SELECT 'version'"):
        print("version\t10.11.6-MariaDB-0+deb12u1", flush=True)
    elif sql.startswith("SELECT 'connection'"):
        try:  # the test changes it to play a server restarted under the held lock
            ident = open(sys.argv[1] + ".ident").read().strip()
        except OSError:
            ident = "7"
        hung = ident == "hang"  # a dead connection: the client never answers again
        if hung:
            continue
        print("connection\t" + ident, flush=True)
"""


@pytest.fixture
def fake_client(tmp_path: Path) -> tuple[str, Path]:
    program = tmp_path / "mariadb"
    log = tmp_path / "log"
    program.write_text(
        FAKE_CLIENT.replace("sys.argv[1]", repr(str(log))).replace("sys.argv[2:]", "sys.argv[1:]")
    )
    program.chmod(0o755)
    return str(program), log


def start(program: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "qgafreeze.quiesce", "mariadb", "--client", program, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


def read_until_ready(helper: subprocess.Popen[str]) -> list[str]:
    assert helper.stdout is not None
    lines = []
    for line in helper.stdout:
        lines.append(line.rstrip("\n"))
        if line.strip() == mariadb.READY:
            return lines
    raise AssertionError(f"no ready line: {lines} {helper.stderr.read() if helper.stderr else ''}")


def test_the_helper_holds_the_lock_until_its_input_ends_then_releases_it(fake_client):
    program, log = fake_client
    helper = start(program, "--", "--defaults-file=/etc/x.cnf")
    lines = read_until_ready(helper)
    assert 'qgafreeze-report lock "BACKUP STAGE BLOCK_COMMIT"' in lines
    time.sleep(0.2)
    assert helper.poll() is None
    assert "BACKUP STAGE END" not in log.read_text()

    helper.stdin.close()  # type: ignore[union-attr]  # the thaw
    assert helper.wait(10) == 0
    sent = log.read_text().splitlines()
    assert sent[0].startswith("--defaults-file=/etc/x.cnf --batch")
    assert sent[-2:] == ["BACKUP STAGE END", "SELECT 'qgafreeze-mark-1" + sent[-1][-2:]]
    assert "SELECT 'connection', CONNECTION_ID()" in sent  # checked while held and at the thaw


def test_the_helper_exits_non_zero_at_once_when_its_client_dies_while_holding(fake_client):
    program, log = fake_client
    helper = start(program)
    read_until_ready(helper)
    client_pid = int(
        subprocess.run(["pgrep", "-P", str(helper.pid)], capture_output=True, text=True).stdout
    )
    os.kill(client_pid, signal.SIGKILL)

    assert helper.wait(10) == mariadb.EXIT_FAILED
    assert "the lock was lost while held" in helper.stderr.read()  # type: ignore[union-attr]
    assert "qgafreeze-report lock_lost " in helper.stdout.read()  # type: ignore[union-attr]
    helper.stdin.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("ident", ["8", "hang"])
def test_the_helper_reports_the_lock_lost_and_exits_at_once_when_the_server_restarts(
    fake_client, ident
):
    # A restarted server gives a reconnecting client another connection id; a client that does
    # not reconnect sits on its dead connection and never answers: both lose the lock.
    program, log = fake_client
    within = 0.5  # how long the server may take to answer (3 s by default): kept short here
    helper = start(program, "--answer-within", str(within))
    read_until_ready(helper)
    Path(f"{log}.ident").write_text(ident)
    started = time.monotonic()

    assert helper.wait(10) == mariadb.EXIT_FAILED
    took = time.monotonic() - started
    assert took < mariadb.CHECK_EVERY + within + 2, took
    (line,) = (x for x in helper.stdout.read().splitlines() if "lock_lost" in x)  # type: ignore[union-attr]
    reason = json.loads(line.split(" ", 2)[2])["reason"]
    assert ("replaced (id 7 -> 8)" if ident == "8" else "did not answer in time") in reason
    assert "BACKUP STAGE END" not in log.read_text()
    helper.stdin.close()  # type: ignore[union-attr]


def test_a_lock_lost_just_before_the_thaw_is_reported_at_the_thaw_not_released_blindly(
    fake_client,
):
    program, log = fake_client
    helper = start(program)
    read_until_ready(helper)
    Path(f"{log}.ident").write_text("9")
    helper.stdin.close()  # type: ignore[union-attr]  # the thaw, likely before the next check

    assert helper.wait(10) == mariadb.EXIT_FAILED
    assert "qgafreeze-report lock_lost " in helper.stdout.read()  # type: ignore[union-attr]
    assert "BACKUP STAGE END" not in log.read_text()


def test_a_held_lock_is_lost_when_its_connection_errs_does_not_answer_or_changes():
    client = FakeClient()
    assert mariadb.lost(client, "7") is None
    client.ident = "8"
    assert "replaced (id 7 -> 8): the server restarted" in (mariadb.lost(client, "7") or "")
    client.refuse["SELECT 'connection'"] = ClientError(2006, "ERROR 2006: server has gone away")
    assert "gone away" in (mariadb.lost(client, "7") or "")
    client.refuse["SELECT 'connection'"] = Failed("the server did not answer in time")
    assert "did not answer in time" in (mariadb.lost(client, "7") or "")


def test_holding_checks_the_connection_until_the_thaw_and_says_why_it_was_lost():
    client = FakeClient()
    read_end, write_end = os.pipe()  # our stdin; the client's fd never stirs
    quiet, _ = os.pipe()
    try:
        os.close(write_end)  # the thaw
        assert mariadb.hold(client, (quiet, read_end), "7", every=0.01) == ""
        client.ident = "8"
        assert "replaced" in mariadb.hold(client, (quiet, read_end), "7", every=0.01)
    finally:
        os.close(read_end)


def test_a_client_that_cannot_start_fails_the_helper_with_its_reason(tmp_path):
    helper = start(str(tmp_path / "absent"))
    _, err = helper.communicate(timeout=10)
    assert helper.returncode == mariadb.EXIT_FAILED
    assert "cannot run" in err and "Traceback" not in err


def test_check_warns_when_the_helpers_waits_do_not_fit_in_the_apps_timeout():
    fits = parse_text("apps:\n  db: {preset: mariadb}\n")  # 5s + 3s inside the default 15s
    assert fits.warnings == ()
    tight = parse_text(
        "apps:\n  db: {preset: mysql, timeout: 10s, options: {long_query_wait: 8s}}\n"
    )
    (warning,) = tight.warnings
    assert warning.startswith("apps.db.options: long_query_wait + lock_wait_timeout (11s)")
