"""The defaults answer before the tightest common caller stops waiting (docs/callers.md).

The callers' figures live once, in the table of docs/callers.md; these tests read it, and take
qgafreeze's side from the code itself: the time a real daemon announces, the shim's waits.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from fakes import FakeSystemd

from qgafreeze import shim
from qgafreeze.actions import build_actions
from qgafreeze.config import parse_config
from qgafreeze.daemon import Daemon, ImportGuard
from qgafreeze.engine import Engine
from qgafreeze.fields import parse_duration
from qgafreeze.logs import LogWriter
from qgafreeze.planner import build_plan
from qgafreeze.server import Peer

CALLERS = Path(__file__).resolve().parents[2] / "docs" / "callers.md"
ROOT = Peer(pid=1, uid=0, gid=0, groups=())


def limits() -> list[dict[str, str]]:
    """The rows of the callers' table: caller, freeze, thaw (durations or none)."""
    text = CALLERS.read_text()
    table = text.split("<!-- callers:limits begin -->")[1].split("<!-- callers:limits end -->")[0]
    rows = [line for line in table.strip().splitlines()[2:] if line.startswith("|")]
    out = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        out.append({"caller": cells[0], "freeze": cells[1].strip("`"), "thaw": cells[2].strip("`")})
    return out


def tightest(column: str) -> float:
    return min(parse_duration(row[column]) for row in limits() if row[column] != "none")


def qemu_ga_share() -> float:
    """The seconds docs/callers.md keeps for qemu-ga's own freeze after the hook returns."""
    found = re.search(r"qemu-ga's own share: (\d+) s", CALLERS.read_text())
    assert found, "docs/callers.md no longer says what it keeps for qemu-ga"
    return float(found.group(1))


def announced_seconds(op: str) -> float:
    """What a daemon with the default settings tells the hook it may take for ``op``."""
    config = parse_config({"version": 1, "apps": {"db": {"units": ["db.service"]}}})
    systemd = FakeSystemd({"db.service": "active"})
    log = LogWriter(None, lambda message, **fields: None)
    engine = Engine(config, build_plan(config), build_actions(config.apps, systemd), log)
    daemon = Daemon("/nonexistent.yaml", engine, log, systemd, ImportGuard(), time.monotonic())
    sent: list[dict[str, Any]] = []
    try:
        daemon({"op": "freeze"}, ROOT, lambda message: sent.append(message))
        if op == "thaw":
            daemon({"op": "thaw"}, ROOT, lambda message: sent.append(message))
    finally:
        log.close()
    accepted = [m for m in sent if m.get("accepted") and m.get("op") == op]
    return float(accepted[-1]["timeout_ms"]) / 1000


def test_the_table_names_every_common_caller_with_a_figure_for_each_phase():
    callers = " ".join(row["caller"] for row in limits())
    for name in ("Proxmox", "libvirt", "KubeVirt", "Nova", "VDSM"):
        assert name in callers
    for row in limits():
        for phase in ("freeze", "thaw"):
            assert row[phase] == "none" or parse_duration(row[phase]) > 0, row


def test_a_freeze_with_its_rollback_answers_before_the_tightest_caller_stops_waiting():
    budget = announced_seconds("freeze")
    assert budget + qemu_ga_share() <= tightest("freeze")


def test_even_a_hung_daemon_fails_the_hook_before_the_tightest_caller_stops_waiting():
    # The shim's own waits are the backstop: the hook must fail, not outlive the caller.
    backstop = shim.ACCEPT_TIMEOUT + announced_seconds("freeze") + shim.REPLY_MARGIN
    assert backstop <= tightest("freeze")


def test_a_thaw_answers_before_the_tightest_caller_stops_waiting():
    assert announced_seconds("thaw") <= tightest("thaw")


def test_the_watchdog_outlasts_every_freeze_a_caller_holds_on_purpose():
    # VDSM holds the freeze for as long as its snapshot may take (its freeze limit), and KubeVirt
    # thaws by itself after its 5 min failureDeadline: resuming the apps before then would
    # spoil a snapshot still being taken.
    vdsm = next(row for row in limits() if "VDSM" in row["caller"])
    max_frozen = parse_config({"version": 1}).settings.max_frozen
    assert max_frozen > parse_duration(vdsm["freeze"])
    assert max_frozen > parse_duration("5m")
