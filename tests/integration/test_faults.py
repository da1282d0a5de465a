"""The fault matrix's rows that need the real systemd: each fault injected into the installed
daemon in the container, each ending with every app running (docs/reliability.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from container import Container
from helpers import CLI, HOOK, HOOK_LOG, active, add_unit, configure, hook, hook_log, status

UNITS = ("qgft-db.service", "qgft-web.service")
TWO_APPS = """version: 1
settings: {{freeze_timeout: 30s, thaw_timeout: 30s, max_frozen: 0{extra}}}
apps:
  db: {{units: [qgft-db]}}
  web: {{units: [qgft-web], depends_on: [db]}}
"""


@pytest.fixture
def two_apps(installed: Container) -> Iterator[Container]:
    for unit in UNITS:
        add_unit(installed, unit, stop=0.1)
    configure(installed, TWO_APPS.format(extra=""), start=UNITS)
    yield installed
    installed.run(["rm", "-f", "/run/qgft-refuse-start"])
    hook(installed, "thaw")
    assert active(installed, *UNITS) == ["active", "active"], "a fault test left an app down"


def test_unwritable_hook_log_does_not_stop_the_cycle_and_is_reported(two_apps):
    c = two_apps
    configure(c, TWO_APPS.format(extra=", hook_log: /nonexistent-dir/hook.log"))
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0
    assert "No such file or directory" in status(c)["hook_log_error"]
    assert active(c, *UNITS) == ["active", "active"]


def hook_log_error(c: Container) -> str:
    """What status says about the hook log, once the daemon's log writer has caught up."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        error = status(c)["hook_log_error"] or ""
        if error:
            return error
        time.sleep(0.2)
    return ""


def test_a_symlink_planted_as_the_hook_log_is_refused_and_its_target_left_alone(two_apps):
    c = two_apps
    c.write_file("/etc/qgft-secret", "root's own\n", mode=0o600)
    c.run(["ln", "-sf", "/etc/qgft-secret", HOOK_LOG])
    try:
        assert hook(c, "freeze")[0] == 0
        assert hook(c, "thaw")[0] == 0
        assert "refused: it is a symbolic link" in hook_log_error(c)
        assert c.run(["cat", "/etc/qgft-secret"]).stdout == "root's own\n"
        assert active(c, *UNITS) == ["active", "active"]
    finally:
        c.run(["rm", "-f", HOOK_LOG, "/etc/qgft-secret"])


def test_an_old_world_readable_hook_log_is_made_0600_and_kept(two_apps):
    c = two_apps
    c.write_file(HOOK_LOG, "an older cycle\n", mode=0o644)
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0
    assert hook_log(c).startswith("an older cycle\n")
    assert c.run(["stat", "-c", "%a %U", HOOK_LOG]).stdout.split() == ["600", "root"]
    assert status(c)["hook_log_error"] is None


def test_config_others_can_write_is_refused_on_reload_and_the_old_one_kept(two_apps):
    c = two_apps
    c.run(["chmod", "666", "/etc/qgafreeze.yaml"])
    try:
        checked = c.run([CLI, "check"], check=False)
        assert checked.returncode == 2
        assert "writable by everyone" in checked.stderr
        c.run(["systemctl", "reload", "qgafreeze.service"])
        time.sleep(1)
        assert status(c)["apps"] == ["db", "web"]
        assert hook(c, "freeze")[0] == 0  # still serving with the last good config
    finally:
        c.run(["chmod", "600", "/etc/qgafreeze.yaml"])


def test_a_unit_that_fails_to_start_on_thaw_stays_listed_and_the_next_thaw_retries(two_apps):
    c = two_apps
    c.install_unit(
        "qgft-web.service",
        "[Service]\nExecStartPre=/bin/sh -c 'test ! -e /run/qgft-refuse-start'\n"
        "ExecStart=/bin/sleep infinity\n",
    )
    c.run(["systemctl", "restart", "qgft-web.service"])
    assert hook(c, "freeze")[0] == 0
    c.run(["touch", "/run/qgft-refuse-start"])
    code, out = hook(c, "thaw")
    assert code == 1
    assert "qgft-web.service: start job finished with result 'failed'" in out
    assert status(c)["paused_apps"] == ["web"]
    assert active(c, "qgft-db.service") == ["active"]  # the rest was resumed
    # Resumed again first, and refused only because it still cannot start: no cycle on top.
    assert hook(c, "freeze")[1].count("still paused by an earlier cycle: web") == 1
    c.run(["rm", "/run/qgft-refuse-start"])
    assert hook(c, "thaw")[0] == 0
    assert active(c, *UNITS) == ["active", "active"]


def test_a_dependency_that_fails_to_stop_resumes_the_app_already_stopped(two_apps):
    c = two_apps
    add_unit(c, "qgft-db.service", stop=0.1, extra="[Unit]\nRefuseManualStop=yes")
    code, out = hook(c, "freeze")
    assert code == 1
    assert "db" in out and "web" in out
    assert active(c, *UNITS) == ["active", "active"]  # web was stopped first, then resumed
    log = hook_log(c)
    assert "execute qgafreeze:web freeze" in log and "execute qgafreeze:web thaw" in log


def test_a_command_that_hangs_is_killed_with_everything_it_started(two_apps):
    c = two_apps
    configure(
        c,
        TWO_APPS.format(extra="")
        + "  flush:\n    freeze: [{shell: 'sleep 300 & sleep 301', timeout: 1s}]\n",
    )
    code, out = hook(c, "freeze")
    assert code == 1
    assert "[timeout]" in out
    time.sleep(0.5)
    leftovers = c.run(["pgrep", "-f", "^sleep 30[01]$"], check=False)
    assert leftovers.returncode == 1, leftovers.stdout
    assert active(c, *UNITS) == ["active", "active"]


def test_a_held_session_killed_while_frozen_is_reported_by_the_thaw(two_apps):
    c = two_apps
    configure(
        c,
        TWO_APPS.format(extra="")
        + "  lock:\n"
        + "    session: {argv: [/bin/sh, -c, 'echo ready; exec sleep 300'], ready: ready}\n",
    )
    assert hook(c, "freeze")[0] == 0
    c.run(["pkill", "-f", "^sleep 300$"])
    code, out = hook(c, "thaw")
    assert code == 1
    assert "application-consistent" in out
    assert status(c)["paused_apps"] == []
    assert active(c, *UNITS) == ["active", "active"]


FLOOD = r"""
import json, socket, threading
path = "/run/qgafreeze/qgafreeze.sock"
answers = []
def client(i):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(20)
    kinds = [b"", b"\x00garbage\n", b"x" * 100000, b'{"op": "reboot"}\n', b'{"op": "ping"}\n']
    payload = kinds[i % 5]
    try:
        s.sendall(payload)
    except OSError:
        pass
    try:
        answers.append(s.recv(4096)[:1] == b"{")
    except OSError:
        answers.append(False)
    s.close()
threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"sent": len(threads), "answered": sum(answers)}))
"""


def test_hostile_clients_get_answers_while_a_freeze_runs_to_completion(two_apps):
    c = two_apps
    for unit in UNITS:  # a slower freeze, so the flood lands while it runs
        add_unit(c, unit, stop=1.5)
    c.run(["systemctl", "restart", *UNITS])
    freeze = c.popen([HOOK, "freeze"])
    time.sleep(0.3)
    flood = json.loads(c.run(["/usr/bin/python3", "-c", FLOOD], timeout=120).stdout)
    assert flood == {"sent": 200, "answered": 200}
    assert freeze.wait(60) == 0
    assert status(c)["state"] == "frozen"
    assert hook(c, "thaw")[0] == 0


def test_two_hundred_apps_in_parallel_stay_within_the_bus_limits(installed):
    # dbus-daemon lets one connection await at most 128 replies; 200 apps at once once hit it.
    c = installed
    units = [f"qgft-many-{i}.service" for i in range(200)]
    c.run(
        "".join(
            f"printf '[Service]\\nExecStart=/bin/sleep infinity\\n' > /run/systemd/system/{u};"
            for u in units
        )
        + " systemctl daemon-reload"
    )
    apps = "".join(f"  m{i}: {{units: [{u}]}}\n" for i, u in enumerate(units))
    configure(c, f"version: 1\napps:\n{apps}", start=tuple(units))
    try:
        code, out = hook(c, "freeze")
        assert code == 0, [line for line in out.splitlines() if "ok in" not in line][:5]
        assert set(active(c, *units)) == {"inactive"}
        assert hook(c, "thaw")[0] == 0
        assert set(active(c, *units)) == {"active"}
    finally:
        hook(c, "thaw")
        c.run(["systemctl", "stop", *units], check=False, timeout=120)
