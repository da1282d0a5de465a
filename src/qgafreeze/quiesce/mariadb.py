"""MariaDB and MySQL held still for a snapshot, as their own backup tools do it.

``quiesce mariadb [--client mariadb|mysql] [OPTIONS]`` is held as the preset's session.  It runs
the database's command-line client as its child, in batch mode, and at start:

1. reads the server's version (``SELECT VERSION()``) and picks the lock: ``BACKUP STAGE START``
   ... ``BLOCK_COMMIT`` on MariaDB 10.4 and later (mariabackup's sequence: commits and DDL wait,
   running statements do not block it), ``FLUSH TABLES WITH READ LOCK`` elsewhere (MySQL, older
   MariaDB), which blocks writes at once and then waits for every running statement;
2. before taking any lock, waits up to ``--long-query-wait`` for the statements that have run
   longer than ``--long-query-threshold`` and would hold the lock up (every statement under
   FTWRL; under BACKUP STAGE, all but plain reads and writes: DDL, maintenance, LOCK, CALL) to
   finish, as Percona XtraBackup's --ftwrl-wait-timeout/--ftwrl-wait-threshold do.  If they do
   not, it fails with nothing locked and names them (id, verb, seconds, user: never their text,
   which may hold secrets), or with ``--kill-long-queries`` ends them with ``KILL QUERY``;
3. sets the session's ``lock_wait_timeout`` to ``--lock-wait-timeout`` and takes the lock: writes
   never wait for it longer than that, and when it is not granted in time the app fails, naming
   what was running;
4. prints ``qgafreeze-report KEY JSON`` lines (server, lock, what the snapshot holds), then
   ``qgafreeze-ready``, and holds the lock until its standard input ends (the thaw), when it
   releases it (``BACKUP STAGE END`` / ``UNLOCK TABLES``) and exits 0.

The lock lives in the client's connection, and an idle client does not notice that connection
die (a server restarted by hand): so while holding, and again at the thaw, the helper asks for
the connection's id every ``CHECK_EVERY`` seconds.  No answer within ``CHECK_WITHIN``, an error,
a dead client or another id (a reconnect) means the lock is gone: it prints ``qgafreeze-report
lock_lost`` and exits 1 at once, so that the daemon reports the lock lost when it happened.
Every import happens before the ready line, and nothing is written to disk by this program.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from ._batch import BatchClient, ClientError, Failed

__all__ = ["BatchClient", "ClientError", "Failed", "main"]
READY = "qgafreeze-ready"
EXIT_FAILED = 1
# The preset's option defaults (schema.PRESET_OPTIONS says the same; a unit test holds them equal).
DEFAULTS = {"long_query_threshold": 1.0, "long_query_wait": 5.0, "lock_wait_timeout": 3.0}
POLL = 0.25  # how often the processlist is read again while waiting for long statements
CHECK_EVERY = 0.5  # how often a held lock's connection is checked (a statement, no disk)
CHECK_WITHIN = 3.0  # how long the server may take to answer that check, or to release the lock
# What a client's lines and a server's version look like.
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")
_VERB = re.compile(r"[A-Za-z]+")
# Statements that never hold BACKUP STAGE up: reads and row changes (their commit waits at
# BLOCK_COMMIT, the statement itself runs on).  Anything else (ALTER, OPTIMIZE, LOCK, CALL...)
# may need the DDL lock BLOCK_DDL waits for.
_DML = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "WITH", "VALUES", "TABLE"})
# Threads that are not a client's statement: idle connections, the server's own, replication.
_NOT_STATEMENTS = ("Sleep", "Daemon", "Binlog Dump", "Binlog Dump GTID", "Killed")


@dataclass(frozen=True)
class Statement:
    """A running statement, as much as may be logged of it: no text beyond its first word."""

    id: int
    seconds: int
    user: str
    verb: str

    def describe(self) -> str:
        return f"id {self.id} ({self.verb or '?'}, {self.seconds}s, user {self.user or '?'})"


@dataclass(frozen=True)
class Lock:
    name: str  # as the report says it
    take: tuple[str, ...]
    release: str
    holds: str  # what a snapshot taken under it holds
    conflicts: Callable[[Statement], bool]


BACKUP_STAGE = Lock(
    "BACKUP STAGE BLOCK_COMMIT",
    (
        "BACKUP STAGE START",
        "BACKUP STAGE FLUSH",
        "BACKUP STAGE BLOCK_DDL",
        "BACKUP STAGE BLOCK_COMMIT",
    ),
    "BACKUP STAGE END",
    "every transaction committed before the lock; commits and DDL waited until the thaw, other"
    " statements ran on (what they had not committed is rolled back at restore)",
    lambda s: s.verb not in _DML,
)
FTWRL = Lock(
    "FLUSH TABLES WITH READ LOCK",
    ("FLUSH TABLES WITH READ LOCK",),
    "UNLOCK TABLES",
    "every statement finished before the lock, tables flushed; writes waited until the thaw",
    lambda s: True,
)


def parse_version(text: str) -> tuple[str, tuple[int, int, int]]:
    """``10.11.6-MariaDB-0+deb12u1`` -> ("MariaDB", (10, 11, 6)); ``8.0.36`` -> ("MySQL", ...)."""
    match = _VERSION.match(text.strip())
    if not match:
        raise Failed(f"cannot read the server's version from {text.strip()[:40]!r}")
    numbers = (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))
    return ("MariaDB" if "mariadb" in text.lower() else "MySQL"), numbers


def choose_lock(product: str, version: tuple[int, int, int], wanted: str) -> Lock:
    """BACKUP STAGE where the server has it (MariaDB 10.4+), unless ``wanted`` says otherwise."""
    has_stages = product == "MariaDB" and version >= (10, 4, 0)
    if wanted == "ftwrl" or (wanted == "auto" and not has_stages):
        return FTWRL
    if not has_stages:
        raise Failed(f"{product} {'.'.join(map(str, version))} has no BACKUP STAGE (MariaDB 10.4+)")
    return BACKUP_STAGE


class Client(Protocol):
    def query(self, sql: str, within: Optional[float] = None) -> list[list[str]]: ...


def running(client: Client, threshold: float) -> list[Statement]:
    """Other connections' statements that have run for ``threshold`` seconds or longer."""
    excluded = ", ".join(f"'{c}'" for c in _NOT_STATEMENTS)
    rows = client.query(
        "SELECT 'long', ID, TIME, IFNULL(USER, ''),"
        " REPLACE(REPLACE(REPLACE(LEFT(TRIM(INFO), 24), CHAR(9), ' '), CHAR(10), ' '),"
        " CHAR(13), ' ')"
        " FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() AND INFO IS NOT NULL"
        f" AND COMMAND NOT IN ({excluded}) AND TIME >= {math.floor(threshold)}"
        " ORDER BY TIME DESC"
    )
    found = []
    for row in rows:
        if len(row) >= 5 and row[0] == "long" and row[1].isdigit():
            verb = _VERB.match(row[4].strip())
            seconds = int(row[2]) if row[2].isdigit() else 0
            found.append(
                Statement(int(row[1]), seconds, row[3][:32], verb.group(0).upper() if verb else "")
            )
    return found


def describe(statements: Sequence[Statement]) -> str:
    return ", ".join(s.describe() for s in statements[:10]) + (
        f" and {len(statements) - 10} more" if len(statements) > 10 else ""
    )


@dataclass
class Options:
    client: str = "mariadb"
    lock: str = "auto"
    long_query_threshold: float = DEFAULTS["long_query_threshold"]
    long_query_wait: float = DEFAULTS["long_query_wait"]
    lock_wait_timeout: float = DEFAULTS["lock_wait_timeout"]
    kill_long_queries: bool = False
    answer_within: float = CHECK_WITHIN
    client_args: tuple[str, ...] = ()


def report(out: Callable[[str], None], key: str, value: object) -> None:
    out(f"qgafreeze-report {key} {json.dumps(value)}")


def wait_for_long(
    client: Client,
    lock: Lock,
    options: Options,
    out: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once no long statement would hold ``lock`` up: they finished, or were killed."""
    started = clock()
    deadline = started + options.long_query_wait
    while True:
        long = [s for s in running(client, options.long_query_threshold) if lock.conflicts(s)]
        if not long:
            if clock() > started + POLL:
                report(out, "waited_for_long_statements", round(clock() - started, 1))
            return
        if clock() >= deadline:
            break
        sleep(min(POLL, max(0.0, deadline - clock())))
    if not options.kill_long_queries:
        raise Failed(
            f"nothing locked: {len(long)} statement(s) running longer than"
            f" {options.long_query_threshold:g}s did not finish within"
            f" {options.long_query_wait:g}s (long_query_wait) and would hold up {lock.name}:"
            f" {describe(long)}; kill_long_queries ends them instead"
        )
    for statement in long:
        try:
            client.query(f"KILL QUERY {statement.id}")
        except ClientError:
            pass  # it finished meanwhile (unknown thread id)
    print(f"killed {describe(long)} (kill_long_queries)", file=sys.stderr)
    report(out, "killed_statements", [s.id for s in long])


def take_lock(
    client: Client,
    options: Options,
    out: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Lock:
    """Everything up to the ready line; raises Failed with nothing left locked."""
    rows = client.query("SELECT 'version', VERSION()")
    version = rows[0][1] if rows and len(rows[0]) > 1 else ""
    product, numbers = parse_version(version)
    lock = choose_lock(product, numbers, options.lock)
    report(out, "server", f"{product} {version}")
    wait_for_long(client, lock, options, out, clock, sleep)
    seconds = max(1, math.ceil(options.lock_wait_timeout))  # the server counts whole seconds
    client.query(f"SET SESSION lock_wait_timeout = {seconds}")
    try:
        for statement in lock.take:
            client.query(statement)
    except ClientError as exc:
        try:
            blocking = running(client, 0)
            client.query(lock.release)
        except (ClientError, Failed):
            blocking = []
        why = f"; running: {describe(blocking)}" if blocking else ""
        raise Failed(
            f"{lock.name} not granted within {seconds}s (lock_wait_timeout): {exc}{why}"
        ) from None
    report(out, "lock", lock.name)
    report(out, "holds", lock.holds)
    return lock


def connection(client: Client, within: float = CHECK_WITHIN) -> str:
    """The id of the connection the lock lives in; another id later means it was lost."""
    rows = client.query("SELECT 'connection', CONNECTION_ID()", within)
    return rows[0][1] if rows and len(rows[0]) > 1 else ""


def lost(client: Client, ident: str, within: float = CHECK_WITHIN) -> Optional[str]:
    """Why the lock held in connection ``ident`` is gone, or None while it is still held."""
    try:
        now = connection(client, within)
    except (ClientError, Failed) as exc:
        return f"its connection did not answer: {exc}"
    if now != ident:
        return f"its connection was replaced (id {ident} -> {now or '?'}): the server restarted"
    return None


def hold(
    client: Client,
    fds: tuple[int, int],
    ident: str,
    every: float = CHECK_EVERY,
    within: float = CHECK_WITHIN,
) -> str:
    """Wait for the thaw (the end of ``fds[1]``, our stdin), checking the lock's connection every
    ``every`` seconds and at once when the client (``fds[0]``) stirs; why the lock was lost, or
    "" if it is still held at the thaw."""
    client_fd, stdin_fd = fds
    while True:
        ready, _, _ = select.select([client_fd, stdin_fd], [], [], every)
        thaw = stdin_fd in ready and not os.read(stdin_fd, 65536)
        why = lost(client, ident, within)
        if thaw or why:
            return why or ""


def parse_args(args: Sequence[str]) -> Options:
    """``[OPTIONS] [-- CLIENT ARGUMENTS]``: what follows ``--`` goes to the client as it is."""
    args = list(args)
    ours, theirs = (
        (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
    )
    parser = argparse.ArgumentParser(prog="quiesce mariadb", description=__doc__.split("\n")[0])
    parser.add_argument("--client", default="mariadb", help="the client program (mariadb, mysql)")
    parser.add_argument("--lock", choices=("auto", "backup-stage", "ftwrl"), default="auto")
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=default)
    parser.add_argument("--kill-long-queries", action="store_true")
    # How long the server may take to answer the held connection's check or the release; a
    # helper argument like --lock (session argv), for a server slower than CHECK_WITHIN.
    parser.add_argument("--answer-within", type=float, default=CHECK_WITHIN)
    return Options(**vars(parser.parse_args(ours)), client_args=tuple(theirs))


def main(args: Sequence[str]) -> int:
    options = parse_args(args)

    def out(line: str) -> None:
        print(line, flush=True)

    def fail(why: object) -> int:
        print(f"quiesce mariadb: {why}", file=sys.stderr, flush=True)
        return EXIT_FAILED

    try:
        client = BatchClient(options.client, options.client_args)
    except Failed as exc:
        return fail(exc)
    try:
        lock = take_lock(client, options, out)
        ident = connection(client)
    except (Failed, ClientError) as exc:
        client.close()  # the server drops whatever the session held with it
        return fail(exc)
    out(READY)
    held = time.monotonic()
    why = hold(client, (client.fd, sys.stdin.fileno()), ident, within=options.answer_within)
    if why:
        after = round(time.monotonic() - held, 1)
        report(out, "lock_lost", {"reason": why, "after_seconds": after})
        client.kill()  # not close(): a client stuck on a dead connection would hold the thaw up
        return fail(f"the lock was lost while held: {why}")
    try:
        client.query(lock.release, options.answer_within)
    except (ClientError, Failed) as exc:
        client.kill()
        return fail(f"{lock.release} failed: {exc}")
    status = client.close()
    return 0 if status == 0 else fail(f"the client exited with status {status}")
