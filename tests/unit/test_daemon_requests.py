"""The daemon's request handling and reload, with systemd replaced by an in-memory unit table."""

from __future__ import annotations

import grp
import socket
import time
from pathlib import Path
from typing import Any

from fakes import FakeSystemd

from qgafreeze.actions import build_actions
from qgafreeze.config import parse_config
from qgafreeze.daemon import Daemon, ImportGuard
from qgafreeze.engine import FROZEN, THAWED, Engine
from qgafreeze.logs import PRIORITY_WARNING, LogWriter
from qgafreeze.planner import build_plan
from qgafreeze.server import Peer, Server

ROOT = Peer(pid=1, uid=0, gid=0, groups=())


class Journal:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def send(self, message: str, **fields: Any) -> None:
        self.records.append({"MESSAGE": message, **fields})

    def messages(self, priority: int | None = None) -> list[str]:
        return [
            r["MESSAGE"] for r in self.records if priority is None or r["PRIORITY"] == str(priority)
        ]


def make_daemon(tmp_path: Path, **settings: Any) -> tuple[Daemon, FakeSystemd, Journal, LogWriter]:
    config = parse_config(
        {"version": 1, "settings": settings, "apps": {"db": {"units": ["db.service"]}}}
    )
    systemd = FakeSystemd({"db.service": "active"})
    journal = Journal()
    log = LogWriter(None, journal.send)
    engine = Engine(config, build_plan(config), build_actions(config.apps, systemd), log)
    daemon = Daemon(
        str(tmp_path / "qgafreeze.yaml"), engine, log, systemd, ImportGuard(), time.monotonic()
    )
    daemon.watch_agent(config.settings.agent_state_file)
    return daemon, systemd, journal, log


def ask(daemon: Daemon, op: str) -> dict[str, Any]:
    return daemon({"op": op}, ROOT, lambda message: None)


def test_a_flag_watch_that_cannot_be_set_does_not_fail_the_freeze_and_is_reported(tmp_path):
    # The watch is a safety net: failing the freeze over it would leave the apps paused with no
    # thaw hook to come (qemu-ga runs none after a failed freeze hook).
    missing = tmp_path / "no-such-dir" / "qga.state.isfrozen"
    daemon, systemd, journal, log = make_daemon(tmp_path, agent_state_file=str(missing))
    assert log.flush(5)
    assert any(
        str(missing.parent) in m and "does not exist" in m
        for m in journal.messages(PRIORITY_WARNING)
    ), journal.messages()

    freeze = ask(daemon, "freeze")

    assert freeze["ok"] is True, freeze
    assert daemon.engine.state == FROZEN
    assert systemd.active["db.service"] == "inactive"
    assert log.flush(5)
    assert any("cannot watch" in m for m in journal.messages()), journal.messages()

    thaw = ask(daemon, "thaw")

    assert thaw["ok"] is True, thaw
    assert daemon.engine.state == THAWED
    assert systemd.active["db.service"] == "active"


def test_a_reload_applies_the_allowed_group_and_what_it_may_ask(tmp_path):
    daemon, _, _, log = make_daemon(tmp_path)
    daemon.server = Server(socket.socket(socket.AF_UNIX), daemon, log)
    assert daemon.server.access == (None, ("ping", "status"))
    group = grp.getgrgid(0).gr_name
    config = tmp_path / "qgafreeze.yaml"
    config.write_text(
        "version: 1\n"
        f"settings: {{allowed_group: {group}, allowed_group_ops: [ping, status, thaw]}}\n"
        "apps: {db: {units: [db.service]}}\n"
    )
    config.chmod(0o600)

    daemon.reload()

    assert daemon.server.access == (0, ("ping", "status", "thaw"))

    config.write_text("version: 1\napps: {db: {units: [db.service]}}\n")
    daemon.reload()

    assert daemon.server.access == (None, ("ping", "status"))
