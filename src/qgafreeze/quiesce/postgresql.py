"""PostgreSQL 13 and later: a non-exclusive base backup held open across the frozen window.

``quiesce postgresql [PSQL ARGS...]`` runs as the ``postgresql`` preset's session, as the
``postgres`` user.  It runs ``psql`` as a child (the extra arguments go to it: ``-p 5433``, ``-d``),
reads ``server_version_num`` and picks the functions: ``pg_backup_start``/``pg_backup_stop`` from
15, ``pg_start_backup(label, true, false)``/``pg_stop_backup(false, true)`` (non-exclusive) on 13
and 14; older servers are refused with the reason.  It checkpoints first (the backup's start then
needs no long wait, and a restore little replay), starts the backup, labelled with the daemon's
cycle id (QGAFREEZE_CYCLE), and prints ``qgafreeze-ready``.  At the thaw (a ``thaw`` line or the
end of its input) it stops the backup in the same connection, as a non-exclusive backup must be,
and prints the backup label (and tablespace map) that ``pg_backup_stop`` returns as
``qgafreeze-report`` lines: the daemon puts them into the cycle's report.  Nothing is written to
disk by it or by PostgreSQL for the label; the label only exists once the backup has stopped,
after the thaw, so it is in the thaw's report of the same cycle.

If the connection ends while the backup is held (the server restarted), it exits non-zero at
once: the daemon then reports the session lost.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Sequence
from typing import IO, Optional, Protocol

PSQL = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
READY = "qgafreeze-ready"
# Ends every batch sent to psql: a query's result is flushed at once, \echo's output may not be.
_END = "qgafreeze-end"
MINIMUM = 130000  # non-exclusive backups through SQL functions of these names
NEW_FUNCTIONS = 150000  # pg_backup_start/pg_backup_stop replace pg_start_backup/pg_stop_backup
EXIT_FAILED = 1


class Failed(Exception):
    """The backup cannot be taken or ended; the message says why."""


class Client(Protocol):
    def query(self, sql: str) -> list[str]:
        """The output lines of ``sql`` (one row a line, columns split by ``|``)."""
        ...

    def wait_for_thaw(self, stdin: IO[str]) -> None:
        """Return at a ``thaw`` line or the end of ``stdin``; raise Failed if the client ends
        first (the server closed the connection: the backup was aborted)."""
        ...

    def close(self) -> int:
        """End the client; its exit status."""
        ...


class Psql:
    """``psql`` as a child, fed SQL on its stdin; its stderr is ours (the session's output)."""

    def __init__(self, args: Sequence[str]) -> None:
        self._process = subprocess.Popen(
            [*PSQL, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def query(self, sql: str) -> list[str]:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(f"{sql}\nSELECT '{_END}';\n")
            stdin.flush()
        except OSError:
            pass  # it exited: the read below says so
        lines: list[str] = []
        for line in stdout:
            line = line.rstrip("\n")
            if line == _END:
                return lines
            lines.append(line)
        status = self._process.wait()
        raise Failed(f"psql exited with status {status} on: {sql.strip()}")

    def wait_for_thaw(self, stdin: IO[str]) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        while True:
            ready, _, _ = select.select([stdin, stdout], [], [])
            if stdout in ready:  # it prints nothing unasked: this is its end
                status = self._process.wait()
                raise Failed(
                    f"psql exited with status {status} while the backup was held:"
                    " the backup was aborted"
                )
            line = stdin.readline()
            if not line or line.strip() == "thaw":
                return

    def close(self) -> int:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write("\\q\n")
            stdin.close()
        except OSError:
            pass
        return self._process.wait()


def quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def label_for(cycle: str) -> str:
    return f"qgafreeze cycle {cycle}" if cycle else "qgafreeze"


def server_version(client: Client) -> int:
    rows = client.query("SHOW server_version_num;")
    try:
        return int(rows[0])
    except (IndexError, ValueError):
        raise Failed(f"cannot read server_version_num from {rows!r}") from None


def start_sql(version: int, label: str) -> str:
    if version < MINIMUM:
        raise Failed(
            f"PostgreSQL {version // 10000} is not supported: the postgresql preset needs 13 or"
            " later (non-exclusive backups through SQL)"
        )
    if version >= NEW_FUNCTIONS:
        return f"SELECT pg_backup_start({quote(label)}, true);"
    return f"SELECT pg_start_backup({quote(label)}, true, false);"


def stop_sql(version: int) -> str:
    # Hex: the label and map are multi-line text, and psql's unaligned output has no escaping.
    columns = (
        "lsn, encode(convert_to(labelfile, 'UTF8'), 'hex'),"
        " encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex')"
    )
    # Waiting for the archive (if archiving is on) makes the archive hold the backup's end.
    function = "pg_backup_stop(true)" if version >= NEW_FUNCTIONS else "pg_stop_backup(false, true)"
    return f"SELECT {columns} FROM {function};"


def parse_stop(rows: list[str]) -> tuple[str, str, str]:
    """The stop LSN, the backup label and the tablespace map ('' if none) of stop_sql's row."""
    try:
        lsn, label, spcmap = rows[-1].split("|")
        return lsn, bytes.fromhex(label).decode(), bytes.fromhex(spcmap).decode()
    except (IndexError, ValueError):
        raise Failed(f"cannot read what the backup's stop returned: {rows!r}") from None


def restore_advice(start: str, stop: str) -> str:
    return (
        "The snapshot restores as it is, by PostgreSQL's crash recovery (it was taken atomically)."
        " To restore it as a base backup instead (point-in-time recovery), write backup_label"
        " (and tablespace_map, if given) from this report into the restored data directory"
        " before starting PostgreSQL, with recovery.signal and a restore_command that reaches"
        f" the WAL archived from {start} through {stop}: without that WAL PostgreSQL refuses to"
        " start ('WAL ends before end of online backup'). Never use a label of another cycle."
    )


def report(out: IO[str], key: str, value: object) -> None:
    out.write(f"qgafreeze-report {key} {json.dumps(value)}\n")


def run(client: Client, stdin: IO[str], out: IO[str], cycle: str) -> int:
    """The whole session: checkpoint, start, ready, hold, stop, report; an exit status."""
    version = server_version(client)
    start_query = start_sql(version, label_for(cycle))
    client.query("CHECKPOINT;")
    start = client.query(start_query)[-1]
    report(out, "backup_start", {"lsn": start, "server_version_num": version})
    out.write(f"{READY}\n")
    out.flush()
    client.wait_for_thaw(stdin)
    stop, label, spcmap = parse_stop(client.query(stop_sql(version)))
    report(out, "backup_label", label)
    if spcmap:
        report(out, "tablespace_map", spcmap)
    report(out, "backup_stop", {"lsn": stop})
    report(out, "restore", restore_advice(start, stop))
    out.flush()
    return 0


def main(args: list[str], client: Optional[Client] = None) -> int:
    cycle = os.environ.get("QGAFREEZE_CYCLE", "")
    try:
        psql = client or Psql(args)
    except OSError as exc:
        print(f"postgresql: cannot run psql: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        status = run(psql, sys.stdin, sys.stdout, cycle)
    except Failed as exc:
        print(f"postgresql: {exc}", file=sys.stderr)
        psql.close()
        return EXIT_FAILED
    closed = psql.close()
    if closed != 0:
        print(f"postgresql: psql exited with status {closed}", file=sys.stderr)
    return status or (EXIT_FAILED if closed else 0)
