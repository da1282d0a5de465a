"""The postgresql quiesce helper: which functions for which server, and what it prints, with a
fake client (and a fake psql program for its real client)."""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from qgafreeze import details, paths
from qgafreeze.config import parse_config
from qgafreeze.quiesce import postgresql
from qgafreeze.quiesce.postgresql import Failed

LABEL = (
    "START WAL LOCATION: 0/6000028 (file 000000010000000000000006)\n"
    "CHECKPOINT LOCATION: 0/6000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n"
    "START TIME: 2026-12-01 21:18:13 UTC\nLABEL: qgafreeze cycle c-1\nSTART TIMELINE: 1\n"
)


def hexed(text: str) -> str:
    return text.encode().hex()


class FakeClient:
    def __init__(self, version: int, spcmap: str = "", dies_while_held: bool = False) -> None:
        self.version = version
        self.spcmap = spcmap
        self.dies_while_held = dies_while_held
        self.queries: list[str] = []
        self.out: io.StringIO | None = None
        self.printed_when_held = ""
        self.closed = False

    def query(self, sql: str) -> list[str]:
        self.queries.append(sql)
        if sql.startswith("SHOW server_version_num"):
            return [str(self.version)]
        if "start_backup" in sql or "backup_start" in sql:
            return ["0/6000028"]
        if "stop_backup" in sql or "backup_stop" in sql:
            return [f"0/6000FA8|{hexed(LABEL)}|{hexed(self.spcmap)}"]
        return []

    def wait_for_thaw(self, stdin) -> None:
        assert self.out is not None
        self.printed_when_held = self.out.getvalue()
        if self.dies_while_held:
            raise Failed("psql exited with status 2 while the backup was held")

    def close(self) -> int:
        self.closed = True
        return 0


def run_main(client: FakeClient, cycle: str, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setenv("QGAFREEZE_CYCLE", cycle)
    out = io.StringIO()
    client.out = out
    monkeypatch.setattr(sys, "stdout", out)
    status = postgresql.main([], client)
    return status, out.getvalue(), capsys.readouterr().err


def reports(text: str) -> dict:
    got: dict = {}
    problems: list[str] = []
    details.collect(text.splitlines(), got, problems.append, "session")
    assert problems == []
    return got


OLD_START = "pg_start_backup('qgafreeze cycle c-1', true, false)"
NEW_START = "pg_backup_start('qgafreeze cycle c-1', true)"


@pytest.mark.parametrize(
    ("version", "start", "stop"),
    [
        (130000, OLD_START, "pg_stop_backup(false, true)"),
        (140011, OLD_START, "pg_stop_backup(false, true)"),
        (150018, NEW_START, "pg_backup_stop(true)"),
        (170004, NEW_START, "pg_backup_stop(true)"),
    ],
)
def test_the_server_version_picks_the_non_exclusive_backup_functions(
    version, start, stop, monkeypatch, capsys
):
    client = FakeClient(version)
    status, _, _ = run_main(client, "c-1", monkeypatch, capsys)
    assert status == 0
    assert client.queries[:3] == ["SHOW server_version_num;", "CHECKPOINT;", f"SELECT {start};"]
    assert client.queries[3].endswith(f"FROM {stop};")
    assert client.closed


def test_a_server_older_than_13_is_refused_before_anything_is_started(monkeypatch, capsys):
    client = FakeClient(120017)
    status, out, err = run_main(client, "c-1", monkeypatch, capsys)
    assert status == 1
    assert "PostgreSQL 12 is not supported: the postgresql preset needs 13 or later" in err
    assert client.queries == ["SHOW server_version_num;"]
    assert postgresql.READY not in out


def test_ready_comes_once_the_backup_is_started_and_the_label_only_after_the_thaw(
    monkeypatch, capsys
):
    client = FakeClient(150018)
    status, out, _ = run_main(client, "c-1", monkeypatch, capsys)
    assert status == 0
    held = client.printed_when_held.splitlines()
    assert held[-1] == "qgafreeze-ready"
    assert "backup_label" not in client.printed_when_held
    got = reports(out)
    assert got["backup_label"] == LABEL
    assert got["backup_start"] == {"lsn": "0/6000028", "server_version_num": 150018}
    assert got["backup_stop"] == {"lsn": "0/6000FA8"}
    assert "tablespace_map" not in got
    assert "backup_label" in got["restore"] and "0/6000028 through 0/6000FA8" in got["restore"]


def test_a_tablespace_map_is_reported_beside_the_label(monkeypatch, capsys):
    spcmap = "16385 /srv/tablespace\n"
    _, out, _ = run_main(FakeClient(130000, spcmap=spcmap), "c-1", monkeypatch, capsys)
    assert reports(out)["tablespace_map"] == spcmap


def test_a_connection_lost_while_held_fails_the_session_with_no_label(monkeypatch, capsys):
    client = FakeClient(170004, dies_while_held=True)
    status, out, err = run_main(client, "c-1", monkeypatch, capsys)
    assert status == 1
    assert "while the backup was held" in err
    assert "backup_label" not in out


def test_the_label_names_the_cycle_quoted_as_sql_and_is_plain_without_one():
    assert postgresql.label_for("") == "qgafreeze"
    sql = postgresql.start_sql(150000, postgresql.label_for("it's"))
    assert sql == "SELECT pg_backup_start('qgafreeze cycle it''s', true);"


def test_unreadable_stop_output_is_a_failure_that_shows_it():
    with pytest.raises(Failed, match="cannot read what the backup's stop returned"):
        postgresql.parse_stop(["ERROR"])


FAKE_PSQL = """\
    #!{python}
    # A psql that answers the helper's batches as psql -A -t would, and logs what it was sent.
    import sys
    log = open({log!r}, "a")
    for line in sys.stdin:
        log.write(line)
        log.flush()
        line = line.strip()
        if line.startswith("SHOW"):
            print("{version}")
        elif "backup_start" in line:
            print("0/3000028")
        elif "backup_stop" in line:
            print("0/3000100|{label}|")
        elif line.startswith("SELECT 'qgafreeze-end'"):
            print("qgafreeze-end")
        elif line == "\\\\q":
            break
        sys.stdout.flush()
"""


def test_the_real_client_runs_psql_as_documented_and_reads_its_batches(tmp_path, monkeypatch):
    log = tmp_path / "sent.sql"
    fake = tmp_path / "psql"
    fake.write_text(
        textwrap.dedent(FAKE_PSQL).format(
            python=sys.executable, log=str(log), version=170004, label=hexed(LABEL)
        )
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    client = postgresql.Psql(["-p", "5433"])
    out = io.StringIO()
    read, write = os.pipe()
    os.write(write, b"thaw\n")
    with os.fdopen(read) as stdin:
        assert postgresql.run(client, stdin, out, "c-9") == 0
    os.close(write)
    assert client.close() == 0
    assert reports(out.getvalue())["backup_label"] == LABEL
    sent = log.read_text()
    assert "SELECT pg_backup_start('qgafreeze cycle c-9', true);" in sent
    assert sent.rstrip().endswith("\\q")


def test_the_psql_command_line_is_quiet_unaligned_and_stops_on_error():
    assert postgresql.PSQL == ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]


def test_the_preset_holds_the_helper_as_postgres_until_the_thaw():
    config = parse_config({"version": 1, "apps": {"pg": {"preset": "postgresql"}}})
    session = config.app("pg").session
    assert session is not None
    assert list(session.argv) == [paths.QUIESCE, "postgresql"]
    assert session.user == "postgres"
    assert session.ready == "^qgafreeze-ready$"
    assert config.app("pg").freeze == ()
    assert json.dumps(session.close) == json.dumps("thaw\n")


def test_the_helper_is_found_by_the_dispatcher():
    from qgafreeze.quiesce import helpers

    assert "postgresql" in helpers()
    assert Path(postgresql.__file__).name == "postgresql.py"
