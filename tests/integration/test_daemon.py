"""The whole path, for real: make install, socket activation, the shim as qemu-ga runs it, the
daemon stopping and starting real units through systemd over the system bus, journald and the
hook log read back.  Runs in a container with systemd as PID 1 (see conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from container import Container
from helpers import (
    CLI,
    DATE,
    HOOK,
    active,
    add_unit,
    configure,
    cycle_of,
    hook,
    hook_log,
    status,
    timestamps,
)

REPO = Path(__file__).resolve().parents[2]

THREE_APPS = """
version: 1
settings: {freeze_timeout: 30s, thaw_timeout: 30s, max_frozen: 0}
apps:
  db: {units: [qgft-db]}
  web: {units: [qgft-web], depends_on: [db]}
  cache: {units: [qgft-cache]}
"""
THREE_UNITS = ("qgft-db.service", "qgft-web.service", "qgft-cache.service")


@pytest.fixture
def three_apps(installed: Container) -> Iterator[Container]:
    for unit in THREE_UNITS:
        add_unit(installed, unit)
    configure(installed, THREE_APPS, start=THREE_UNITS)
    yield installed
    hook(installed, "thaw")  # whatever a failed test left paused


def test_make_install_enables_the_socket_and_points_qemu_ga_at_the_hook(installed):
    c = installed
    assert c.run(["systemctl", "is-enabled", "qgafreeze.socket"]).stdout.strip() == "enabled"
    assert active(c, "qgafreeze.socket") == ["active"]
    assert c.run(["stat", "-c", "%a %U", "/run/qgafreeze/qgafreeze.sock"]).stdout.split() == [
        "600",
        "root",
    ]
    conf = c.run(["cat", "/etc/qemu/qemu-ga.conf"]).stdout
    assert f"fsfreeze-hook={HOOK}" in conf
    assert c.run([CLI, "check"]).returncode == 0  # the fresh config declares no apps


def test_socket_activation_starts_the_daemon_which_reports_ready(installed):
    c = installed
    c.run(["systemctl", "stop", "qgafreeze.service"])
    assert active(c, "qgafreeze.service") == ["inactive"]
    code, out = hook(c, "ping")
    assert code == 0, out
    # Type=notify: "active" means the daemon sent READY=1.
    assert active(c, "qgafreeze.service") == ["active"]
    status_text = c.run(["systemctl", "show", "-p", "StatusText", "qgafreeze.service"]).stdout
    assert "thawed" in status_text
    assert status(c)["ready_after_exec_ms"] > 0


def test_freeze_stops_in_dependency_order_with_independent_apps_overlapping(three_apps):
    c = three_apps
    code, out = hook(c, "freeze")
    assert code == 0, out
    assert active(c, *THREE_UNITS) == ["inactive"] * 3
    db, web, cache = (timestamps(c, u) for u in THREE_UNITS)
    # web uses db: web is fully stopped before db starts stopping.
    assert web["stop-end"] <= db["stop-begin"]
    # cache is independent: its stop overlaps web's (each began before the other ended).
    assert cache["stop-begin"] < web["stop-end"]
    assert web["stop-begin"] < cache["stop-end"]

    code, out = hook(c, "thaw")
    assert code == 0, out
    assert active(c, *THREE_UNITS) == ["active"] * 3
    db, web, cache = (timestamps(c, u) for u in THREE_UNITS)
    # Thaw reverses it: db is running again before web starts.
    assert db["start-end"] <= web["start-begin"]


def test_unit_inactive_before_freeze_stays_inactive_after_thaw(three_apps):
    c = three_apps
    c.run(["systemctl", "stop", "qgft-cache.service"])
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0
    assert active(c, *THREE_UNITS) == ["active", "active", "inactive"]
    assert "qgft-cache.service: inactive before the freeze, left alone" in hook_log(c)


def test_journald_and_the_hook_log_show_every_step(three_apps):
    c = three_apps
    code, out = hook(c, "freeze")
    assert code == 0, out
    cycle = cycle_of(out)
    assert hook(c, "thaw")[0] == 0

    records = []
    deadline = time.monotonic() + 10
    while len(records) < 8 and time.monotonic() < deadline:
        records = c.journal(QGAFREEZE_CYCLE=cycle)
    apps = {(r["QGAFREEZE_APP"], r["QGAFREEZE_PHASE"]): r for r in records if "QGAFREEZE_APP" in r}
    assert set(apps) == {(a, p) for a in ("db", "web", "cache") for p in ("freeze", "thaw")}
    for record in apps.values():
        assert record["SYSLOG_IDENTIFIER"] == "qgafreeze"
        assert record["QGAFREEZE_RESULT"] == "ok"
        assert int(record["QGAFREEZE_DURATION_MS"]) >= 0
        assert record["QGAFREEZE_UNIT"].startswith("qgft-")
        assert len(record["MESSAGE_ID"]) == 32
    assert apps[("db", "freeze")]["QGAFREEZE_UNIT"] == "qgft-db.service"
    cycles = [r for r in records if "QGAFREEZE_APP" not in r]
    assert sorted(r["QGAFREEZE_PHASE"] for r in cycles) == ["freeze", "thaw"]

    log = hook_log(c)
    for app in ("db", "web", "cache"):
        for phase in ("freeze", "thaw"):
            assert re.search(
                rf"^{DATE}: execute qgafreeze:{app} {phase}$",
                log,
                re.M,
            ), log
        assert len(re.findall(rf": qgafreeze:{app} finished with status=0$", log, re.M)) == 2
    assert "qgft-web.service: stopped" in log


def test_unit_that_refuses_to_stop_rolls_back_and_the_hook_fails(three_apps):
    c = three_apps
    add_unit(c, "qgft-stubborn.service", extra="[Unit]\nRefuseManualStop=yes")
    configure(
        c,
        THREE_APPS + "  stubborn: {units: [qgft-stubborn]}\n",
        start=(*THREE_UNITS, "qgft-stubborn.service"),
    )
    code, out = hook(c, "freeze")
    assert code == 1, out
    assert "freeze FAILED" in out
    assert "qgft-stubborn.service" in out
    # Every app is running again, whatever the freeze had stopped before it failed.
    assert active(c, *THREE_UNITS, "qgft-stubborn.service") == ["active"] * 4
    assert status(c)["paused_apps"] == []
    records = c.journal(QGAFREEZE_CYCLE=cycle_of(out))
    assert any(
        r.get("QGAFREEZE_APP") == "stubborn" and r["QGAFREEZE_RESULT"] == "failed" for r in records
    )
    assert "finished with status=1" in hook_log(c)


def test_stop_that_outlasts_the_app_timeout_is_rolled_back(installed):
    c = installed
    add_unit(c, "qgft-slow.service", stop=3)
    add_unit(c, "qgft-quick.service", stop=0.1)
    configure(
        c,
        "version: 1\napps:\n  slow: {units: [qgft-slow], timeout: 1s}\n"
        "  quick: {units: [qgft-quick]}\n",
        start=("qgft-slow.service", "qgft-quick.service"),
    )
    code, out = hook(c, "freeze")
    assert code == 1, out
    assert "[timeout]" in out
    # systemd runs the rollback's start as soon as the slow stop ends; it is not left down.
    deadline = time.monotonic() + 20
    while active(c, "qgft-slow.service") != ["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert active(c, "qgft-slow.service", "qgft-quick.service") == ["active", "active"]


def test_socket_that_would_restart_the_service_is_stopped_while_frozen(installed):
    c = installed
    c.install_unit(
        "qgft-sock.socket", "[Socket]\nListenStream=/run/qgft-sock.sock\n[Install]\nWantedBy=x\n"
    )
    add_unit(c, "qgft-sock.service", stop=0.1)
    configure(c, "version: 1\napps:\n  sock: {units: [qgft-sock]}\n")
    c.run(["systemctl", "start", "qgft-sock.socket", "qgft-sock.service"])
    assert hook(c, "freeze")[0] == 0
    assert active(c, "qgft-sock.socket", "qgft-sock.service") == ["inactive", "inactive"]
    assert hook(c, "thaw")[0] == 0
    assert active(c, "qgft-sock.socket", "qgft-sock.service") == ["active", "active"]


def test_thaw_without_freeze_and_a_second_thaw_change_nothing(three_apps):
    c = three_apps
    code, out = hook(c, "thaw")
    assert code == 0, out
    assert "nothing to thaw" in out
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0
    before = [timestamps(c, u) for u in THREE_UNITS]
    assert hook(c, "thaw")[0] == 0
    assert [timestamps(c, u) for u in THREE_UNITS] == before


def test_freeze_while_frozen_is_refused_not_doubled(three_apps):
    c = three_apps
    assert hook(c, "freeze")[0] == 0
    code, out = hook(c, "freeze")
    assert code == 1
    assert "already frozen" in out
    assert hook(c, "thaw")[0] == 0
    assert active(c, *THREE_UNITS) == ["active"] * 3


def test_stopping_the_daemon_while_frozen_resumes_every_app(three_apps):
    c = three_apps
    assert hook(c, "freeze")[0] == 0
    c.run(["systemctl", "stop", "qgafreeze.service"])
    assert active(c, *THREE_UNITS) == ["active"] * 3
    shutdown = c.journal(SYSLOG_IDENTIFIER="qgafreeze", QGAFREEZE_REASON="shutdown")
    assert shutdown and shutdown[-1]["QGAFREEZE_RESULT"] == "ok"


def test_a_stop_that_needs_longer_than_timeoutstopsec_asks_systemd_and_resumes_every_app(
    installed,
):
    # An admin raised thaw_timeout for an app that starts slowly; the unit's own TimeoutStopSec=
    # (here cut to 3 s) must not kill the daemon half-way through resuming it.
    c = installed
    add_unit(c, "qgft-slow.service", extra="ExecStartPost=/bin/sleep 6")
    c.write_file(
        "/run/systemd/system/qgafreeze.service.d/short-stop.conf",
        "[Service]\nTimeoutStopSec=3s\n",
    )
    c.run(["systemctl", "daemon-reload"])
    try:
        configure(
            c,
            "version: 1\nsettings: {thaw_timeout: 30s, max_frozen: 0}\n"
            "apps:\n  slow: {units: [qgft-slow], timeout: 20s}\n",
            start=("qgft-slow.service",),
        )
        assert hook(c, "freeze")[0] == 0
        started = time.monotonic()
        c.run(["systemctl", "stop", "qgafreeze.service"], timeout=60)
        took = time.monotonic() - started
        result = c.run(["systemctl", "show", "-P", "Result", "qgafreeze.service"]).stdout
        assert result.strip() == "success", f"stopped with result {result.strip()}"
        assert took > 5  # it really waited for the slow start, past the 3 s limit
        assert active(c, "qgft-slow.service") == ["active"]
        shutdown = c.journal(SYSLOG_IDENTIFIER="qgafreeze", QGAFREEZE_REASON="shutdown")
        assert shutdown and shutdown[-1]["QGAFREEZE_RESULT"] == "ok"
    finally:
        c.run(["rm", "-rf", "/run/systemd/system/qgafreeze.service.d"])
        c.run(["systemctl", "daemon-reload"])


def test_reload_applies_a_new_agent_state_file(three_apps):
    c = three_apps
    pid = status(c)["pid"]
    c.write_file(
        "/etc/qgafreeze.yaml",
        THREE_APPS.replace("max_frozen: 0", "max_frozen: 0, agent_state_file: /run/qga2/flag"),
        0o600,
    )
    c.run("mkdir -p /run/qga2 && systemctl reload qgafreeze.service")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = c.journal(SYSLOG_IDENTIFIER="qgafreeze", _PID=str(pid))
        if any(r["MESSAGE"].startswith("reloaded") for r in records):
            break
        time.sleep(0.1)
    assert hook(c, "freeze")[0] == 0
    c.run("touch /run/qga2/flag && rm /run/qga2/flag")
    deadline = time.monotonic() + 30  # 10 s of grace for a late thaw hook, then the thaw
    while active(c, *THREE_UNITS) != ["active"] * 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert active(c, *THREE_UNITS) == ["active"] * 3
    assert status(c)["last"]["reason"] == "agent"
    assert status(c)["pid"] == pid


def test_reload_applies_a_valid_config_and_keeps_the_last_good_one_otherwise(three_apps):
    c = three_apps
    pid = status(c)["pid"]

    def reload_messages() -> list[str]:
        records = c.journal(SYSLOG_IDENTIFIER="qgafreeze", _PID=str(pid))
        return [r["MESSAGE"] for r in records if "reload" in r["MESSAGE"]]

    def reload() -> str:
        seen = len(reload_messages())
        c.run(["systemctl", "reload", "qgafreeze.service"])  # SIGHUP; it does not wait
        deadline = time.monotonic() + 10
        while len(reload_messages()) == seen and time.monotonic() < deadline:
            time.sleep(0.1)
        return reload_messages()[-1]

    c.write_file("/etc/qgafreeze.yaml", "version: 1\napps:\n  db: {units: [qgft-db]}\n", 0o600)
    assert reload().startswith("reloaded /etc/qgafreeze.yaml: 1 app(s)")
    assert status(c)["apps"] == ["db"]

    c.write_file("/etc/qgafreeze.yaml", "version: 1\napps:\n  db: {unitz: [qgft-db]}\n", 0o600)
    message = reload()
    assert message.startswith("reload refused, keeping the last good config")
    assert "apps.db.unitz: unknown key" in message
    assert status(c)["apps"] == ["db"]
    assert status(c)["pid"] == pid


def test_invalid_config_at_start_refuses_freezes_with_the_errors_until_fixed(three_apps):
    c = three_apps
    configure(c, "version: 1\napps:\n  db: {units: [qgft-db], depends_on: [nosuch]}\n")
    code, out = hook(c, "freeze")
    assert code == 2  # errors.EXIT_CONFIG: the hook's status says why, as the README promises
    assert "[config-invalid]" in out
    assert "apps.db.depends_on[0]: unknown app 'nosuch'" in out
    assert active(c, *THREE_UNITS) == ["active"] * 3
    assert hook(c, "thaw")[0] == 0  # nothing is paused, so thaw still succeeds
    assert "unknown app 'nosuch'" in status(c)["config_error"]

    c.write_file("/etc/qgafreeze.yaml", THREE_APPS, 0o600)
    c.run(["systemctl", "reload", "qgafreeze.service"])
    deadline = time.monotonic() + 10
    while status(c)["config_error"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0


def test_unknown_unit_fails_the_freeze_naming_the_unit(installed):
    c = installed
    add_unit(c, "qgft-db.service")
    configure(
        c,
        "version: 1\napps:\n  db: {units: [qgft-db]}\n  ghost: {units: [qgft-ghost]}\n",
        start=("qgft-db.service",),
    )
    code, out = hook(c, "freeze")
    assert code == 1
    assert "qgft-ghost.service: no such unit" in out
    assert active(c, "qgft-db.service") == ["active"]


def test_apps_resume_when_qemu_ga_leaves_frozen_state_without_a_thaw_hook(three_apps):
    # What qemu-ga does when a freeze list matches no filesystem: flag file created and removed
    # right after the freeze hook, and no thaw hook.
    c = three_apps
    assert hook(c, "freeze")[0] == 0
    c.run("touch /run/qga.state.isfrozen && rm /run/qga.state.isfrozen")
    deadline = time.monotonic() + 30  # 10 s of grace for a late thaw hook, then the thaw
    while active(c, *THREE_UNITS) != ["active"] * 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert active(c, *THREE_UNITS) == ["active"] * 3
    assert status(c)["last"]["reason"] == "agent"
    assert hook(c, "thaw")[0] == 0  # the late thaw, if it ever comes, is harmless


def test_a_daemon_killed_while_frozen_is_restarted_and_its_successor_resumes_the_apps(three_apps):
    c = three_apps
    code, out = hook(c, "freeze")
    assert code == 0, out
    cycle = cycle_of(out)
    old_pid = status(c)["pid"]
    c.run(["systemctl", "kill", "-s", "KILL", "qgafreeze.service"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # Restart=on-failure, RestartSec=1s
        pid = c.run(["systemctl", "show", "-p", "MainPID", "--value", "qgafreeze"]).stdout.strip()
        if pid not in ("0", str(old_pid)) and active(c, "qgafreeze.service") == ["active"]:
            break
        time.sleep(0.2)
    now = status(c)
    assert now["pid"] != old_pid
    assert (now["state"], now["cycle"], now["paused_apps"]) == (
        "frozen",
        cycle,
        ["db", "cache", "web"],
    )
    assert active(c, *THREE_UNITS) == ["inactive"] * 3
    code, out = hook(c, "thaw")
    assert code == 0, out
    assert active(c, *THREE_UNITS) == ["active"] * 3


def test_watchdog_resumes_apps_when_no_thaw_arrives_and_says_so_loudly(three_apps):
    c = three_apps
    configure(c, THREE_APPS.replace("max_frozen: 0", "max_frozen: 2s"))
    code, out = hook(c, "freeze")
    assert code == 0, out
    deadline = time.monotonic() + 30
    while active(c, *THREE_UNITS) != ["active"] * 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert active(c, *THREE_UNITS) == ["active"] * 3
    warnings = c.journal(SYSLOG_IDENTIFIER="qgafreeze", QGAFREEZE_CYCLE=cycle_of(out))
    assert any("max_frozen" in r["MESSAGE"] and int(r["PRIORITY"]) <= 4 for r in warnings)
    assert "max_frozen" in hook_log(c)
    # Then it thawed the disks: under real systemd, with nothing frozen here, it found nothing
    # to thaw and no mount it could not open or ask.
    report = json.loads(c.run([CLI, "status", "--json"]).stdout)
    assert report["filesystems_thawed"]["count"] == 0, report["filesystems_thawed"]
    assert report["filesystems_thawed"]["errors"] == [], report["filesystems_thawed"]
    assert "watchdog thawed 0 filesystem(s) (none was frozen)" in hook_log(c)
    assert hook(c, "thaw")[0] == 0  # qemu-ga's late thaw still succeeds


def test_a_shim_killed_mid_request_leaves_the_cycle_to_finish_and_the_thaw_works(three_apps):
    c = three_apps
    shim = c.popen([HOOK, "freeze"])
    time.sleep(0.3)  # the daemon is stopping units (0.5 s each)
    shim.kill()
    shim.wait(10)
    deadline = time.monotonic() + 20
    while status(c)["state"] != "frozen" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status(c)["state"] == "frozen"
    assert hook(c, "thaw")[0] == 0
    assert active(c, *THREE_UNITS) == ["active"] * 3


def test_the_cycle_completes_with_journald_stopped(three_apps):
    c = three_apps
    c.run(
        "systemctl stop systemd-journald.socket systemd-journald-dev-log.socket"
        " systemd-journald-audit.socket systemd-journald.service",
        check=False,
    )
    try:
        assert hook(c, "freeze")[0] == 0
        assert hook(c, "thaw")[0] == 0
        assert active(c, *THREE_UNITS) == ["active"] * 3
        assert "qgafreeze:web finished with status=0" in hook_log(c)
    finally:
        c.run(["systemctl", "start", "systemd-journald.socket", "systemd-journald.service"])


def test_the_daemon_imports_nothing_while_a_cycle_runs(three_apps):
    c = three_apps
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0
    assert status(c)["imports_during_cycles"] == 0


def test_non_root_cannot_reach_the_socket(installed):
    result = installed.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", HOOK, "ping"], check=False
    )
    assert result.returncode == 4, result.stdout  # forbidden, as README and qgafreeze(8) say
    assert "Permission denied" in result.stdout
    assert "FAILED [forbidden]" in result.stdout


def _readme_group_recipe() -> tuple[list[str], list[str]]:
    """The README's steps for letting a group in: the drop-in's settings, then the commands
    that follow `systemctl edit` (which writes the drop-in and reloads systemd itself)."""
    readme = " ".join((REPO / "README.md").read_text().split())
    paragraph = readme.split("To let a group in", 1)[1].split("Its members may then ask", 1)[0]
    settings = re.findall(r"`(\w+=\w+)`", paragraph)
    commands = re.findall(r"`((?:chmod|systemctl) [^`]+)`", paragraph)
    assert commands[0] == "systemctl edit qgafreeze.socket", paragraph
    return settings, commands[1:]


def _reload(c: Container) -> None:
    """systemctl reload (SIGHUP, not waited for), then wait until the daemon says it reloaded."""
    pid = status(c)["pid"]

    def reloaded() -> int:
        records = c.journal(SYSLOG_IDENTIFIER="qgafreeze", _PID=str(pid))
        return sum(r["MESSAGE"].startswith("reloaded") for r in records)

    seen = reloaded()
    c.run(["systemctl", "reload", "qgafreeze.service"])
    deadline = time.monotonic() + 10
    while reloaded() == seen and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reloaded() > seen


def test_the_readmes_recipe_lets_a_group_in_and_a_reload_changes_what_it_may_ask(installed):
    c = installed
    c.run("getent group qgft-ops >/dev/null || groupadd qgft-ops")
    gid = c.run(["getent", "group", "qgft-ops"]).stdout.split(":")[2]

    def member(*args: str) -> tuple[int, str]:
        result = c.run(
            ["setpriv", "--reuid=65534", "--regid=65534", f"--groups={gid}", CLI, *args],
            check=False,
        )
        return result.returncode, result.stdout + result.stderr

    settings, commands = (
        [step.replace("GROUP", "qgft-ops") for step in steps] for steps in _readme_group_recipe()
    )
    drop_in = "/etc/systemd/system/qgafreeze.socket.d/override.conf"
    try:
        configure(c, "version: 1\nsettings: {allowed_group: qgft-ops}\napps: {}\n")
        c.write_file(drop_in, "[Socket]\n" + "".join(f"{s}\n" for s in settings))
        c.run(["systemctl", "daemon-reload"])  # what `systemctl edit` does on saving
        for command in commands:
            c.run(command)
        code, out = member("status")
        assert code == 0, out
        assert "state: thawed" in out
        code, out = member("freeze")
        assert code == 4 and "[forbidden]" in out, out

        c.write_file(
            "/etc/qgafreeze.yaml",
            "version: 1\nsettings: {allowed_group: qgft-ops,"
            " allowed_group_ops: [ping, status, freeze, thaw]}\napps: {}\n",
            0o600,
        )
        _reload(c)
        assert member("freeze")[0] == 0
        assert member("thaw")[0] == 0

        c.write_file("/etc/qgafreeze.yaml", "version: 1\napps: {}\n", 0o600)
        _reload(c)
        code, out = member("status")
        assert code == 4 and "only root may" in out, out
    finally:
        c.run(["rm", "-rf", os.path.dirname(drop_in)])
        c.run(["systemctl", "daemon-reload"])
        c.run(["chmod", "0700", "/run/qgafreeze"])
        configure(c, "version: 1\napps: {}\n")
        c.run(["systemctl", "restart", "qgafreeze.socket"])
