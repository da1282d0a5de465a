"""Held database sessions, cgroup freeze, signals and legacy hook scripts against the real
systemd and a real MariaDB in the container, driven through the shim (PostgreSQL's preset:
test_postgresql_preset.py)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from container import Container
from helpers import DATE, HOOK_LOG, active, configure, hook, hook_log, status

MARIADB_UNIT = """[Service]
Type=notify
User=mysql
ExecStart=/usr/sbin/mariadbd --no-defaults --datadir=/var/lib/mysql \\
  --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid --skip-networking
"""
def eventually(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


# runuser and su need PAM, whose configuration the container's nearly empty /etc lacks.
AS_POSTGRES = "setpriv --reuid=postgres --regid=postgres --init-groups --"


def system_user(name: str, home: str) -> str:
    # No /etc/login.defs in the container: useradd makes no user group by itself.
    return (
        f"(getent group {name} >/dev/null || groupadd -r {name}) &&"
        f" (id {name} >/dev/null 2>&1 || useradd -r -g {name} -M -d {home} -s /bin/sh {name})"
    )


@pytest.fixture(scope="module")
def mariadb(installed: Container) -> Container:
    c = installed
    c.run(
        system_user("mysql", "/var/lib/mysql")
        + " && mkdir -p /var/lib/mysql /run/mysqld && chown mysql:mysql /var/lib/mysql /run/mysqld"
        " && mariadb-install-db --no-defaults --user=mysql --datadir=/var/lib/mysql"
        " --auth-root-authentication-method=socket --skip-test-db --force >/dev/null",
        timeout=120,
    )
    # (--force above: the container's host name does not resolve, which only matters to the
    # default grants that install-db writes for remote hosts.)
    c.install_unit("qgft-mariadb.service", MARIADB_UNIT)
    c.run(["systemctl", "start", "qgft-mariadb.service"], timeout=120)
    c.run(
        "mariadb -e 'CREATE DATABASE IF NOT EXISTS qgft;"
        " CREATE TABLE IF NOT EXISTS qgft.t (id INT PRIMARY KEY) ENGINE=InnoDB'"
    )
    return c


# The preset's helper (an argv list: no shell to match too), whose client holds the lock.
SESSION = ["pgrep", "-f", "/libexec/qgafreeze/quiesce mariadb --client mariadb "]


def test_held_mariadb_session_blocks_writes_while_frozen_and_releases_them_on_thaw(mariadb):
    c = mariadb
    configure(c, "version: 1\napps:\n  db: {preset: mariadb, timeout: 60s}\n")
    code, out = hook(c, "freeze")
    assert code == 0, out
    # Reads go on; a write waits for the backup lock (its commit, at BLOCK_COMMIT).
    assert c.run("mariadb -N -e 'SELECT COUNT(*) FROM qgft.t'").returncode == 0
    blocked = c.run("timeout 2 mariadb -e 'INSERT INTO qgft.t VALUES (1)'", check=False)
    assert blocked.returncode == 124, blocked
    writer = c.popen("mariadb -e 'INSERT INTO qgft.t VALUES (2)'")
    time.sleep(0.5)
    assert writer.poll() is None  # still waiting on the lock
    assert status(c)["paused_apps"] == ["db"]
    assert c.run(SESSION).stdout.split(), "no held mariadb session"

    code, out = hook(c, "thaw")
    assert code == 0, out
    assert writer.wait(30) == 0  # the waiting write completed once the lock was released
    assert c.run("mariadb -N -e 'SELECT id FROM qgft.t WHERE id=2'").stdout.strip() == "2"
    assert c.run(SESSION, check=False).returncode == 1  # the session is gone
    assert "UNLOCK" not in hook_log(c)  # what the session was sent is not logged


def test_cgroup_frozen_unit_stops_making_progress_and_resumes(installed):
    c = installed
    c.install_unit(
        "qgft-tick.service",
        "[Service]\nExecStart=/bin/sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/qgft-tick;"
        " sleep 0.05; done'\n",
    )
    c.run(["systemctl", "restart", "qgft-tick.service"])
    configure(c, "version: 1\napps:\n  tick: {units: [qgft-tick], mode: freeze}\n")

    def tick() -> int:
        return int(c.run(["cat", "/run/qgft-tick"]).stdout or 0)

    code, out = hook(c, "freeze")
    assert code == 0, out
    assert c.run(
        ["systemctl", "show", "-p", "FreezerState", "--value", "qgft-tick"]
    ).stdout.strip() == ("frozen")
    assert active(c, "qgft-tick.service") == ["active"]  # paused, not stopped
    first = tick()
    time.sleep(0.5)
    assert tick() == first
    code, out = hook(c, "thaw")
    assert code == 0, out
    assert eventually(lambda: tick() > first, timeout=5)
    assert c.run(
        ["systemctl", "show", "-p", "FreezerState", "--value", "qgft-tick"]
    ).stdout.strip() == ("running")


def test_a_unit_killed_while_frozen_counts_as_thawed_and_the_next_freeze_goes_ahead(installed):
    # As the OOM killer ends a frozen unit: SIGKILL reaches frozen processes.  systemd then
    # refuses to thaw the unit, which has nothing left to thaw.
    c = installed
    c.install_unit("qgft-doomed.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    c.run(["systemctl", "restart", "qgft-doomed.service"])
    c.run(["systemctl", "reset-failed", "qgafreeze.service"])  # restarted by the tests before
    configure(c, "version: 1\napps:\n  doomed: {units: [qgft-doomed], mode: freeze}\n")
    code, out = hook(c, "freeze")
    assert code == 0, out
    c.run(["systemctl", "kill", "--signal=KILL", "qgft-doomed.service"])
    assert eventually(lambda: active(c, "qgft-doomed.service") != ["active"], timeout=10)
    code, out = hook(c, "thaw")
    assert code == 0, out
    assert status(c)["paused_apps"] == []
    c.run(["systemctl", "start", "qgft-doomed.service"])
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0


def test_signal_step_reaches_the_units_processes(installed):
    c = installed
    c.install_unit(
        "qgft-flush.service",
        '[Service]\nExecStart=/bin/sh -c \'trap "echo flushed >> /run/qgft-flushed" USR1;'
        " while :; do sleep 0.1; done'\n",
    )
    c.run(["systemctl", "restart", "qgft-flush.service"])
    c.run(["rm", "-f", "/run/qgft-flushed"])
    configure(
        c,
        "version: 1\napps:\n  flush:\n"
        "    freeze: [{signal: USR1, units: [qgft-flush], whom: main}]\n",
    )
    code, out = hook(c, "freeze")
    assert code == 0, out
    assert eventually(
        lambda: c.run(["cat", "/run/qgft-flushed"], check=False).stdout == "flushed\n"
    )
    assert hook(c, "thaw")[0] == 0


@pytest.fixture
def legacy_dir(installed: Container) -> Iterator[str]:
    directory = "/etc/qemu/fsfreeze-hook.d"
    c = installed
    c.run(["rm", "-rf", directory])
    for name, body in (
        ("10-first.sh", 'echo "first $1"'),
        ("20-second.sh", 'echo "second $1"'),
        ("20-second.sh.dpkg-old", "exit 9"),
    ):
        c.write_file(f"{directory}/{name}", f"#!/bin/sh\n{body}\n", mode=0o755)
    yield directory
    c.run(["rm", "-rf", directory])


def test_legacy_hook_scripts_keep_running_with_the_stock_log_lines(installed, legacy_dir):
    c = installed
    configure(c, f"version: 1\nsettings: {{legacy_hooks: {legacy_dir}}}\napps: {{}}\n")
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0
    log = hook_log(c)
    calls = re.findall(rf"^{DATE}: execute ({legacy_dir}/\S+) (freeze|thaw)$", log, re.M)
    assert calls == [
        (f"{legacy_dir}/10-first.sh", "freeze"),
        (f"{legacy_dir}/20-second.sh", "freeze"),
        (f"{legacy_dir}/20-second.sh", "thaw"),
        (f"{legacy_dir}/10-first.sh", "thaw"),
    ]
    assert re.search(rf"^{DATE}: {legacy_dir}/20-second.sh finished with status=0$", log, re.M)
    assert "first freeze\n" in log and "second thaw\n" in log
    assert "dpkg-old" not in log


def test_failing_legacy_script_fails_the_freeze_through_the_hook(installed, legacy_dir):
    c = installed
    c.write_file(
        f"{legacy_dir}/15-broken.sh",
        '#!/bin/sh\n[ "$1" = thaw ] && exit 0\necho broken >&2\nexit 2\n',
        mode=0o755,
    )
    configure(c, f"version: 1\nsettings: {{legacy_hooks: {legacy_dir}}}\napps: {{}}\n")
    code, out = hook(c, "freeze")
    assert code == 1
    assert "15-broken.sh freeze exited with status 2" in out
    assert status(c)["paused_apps"] == []
    # The scripts that ran for the freeze were thawed again, in reverse.
    log = hook_log(c)
    assert re.findall(rf"^{DATE}: execute {legacy_dir}/(\S+) thaw$", log, re.M) == [
        "15-broken.sh",
        "10-first.sh",
    ]


# The same script as the VM tier's (its header says what it does).
LOCK_FIFO = "/run/qgf-legacy-lock.fifo"
FIFO_LOCK_SCRIPT = (
    Path(__file__).resolve().parents[1] / "data" / "mariadb-fifo-lock.sh"
).read_text()


def test_legacy_script_leaving_a_locking_client_behind_freezes_at_once_and_thaws(
    mariadb, legacy_dir
):
    c = mariadb
    c.run(["rm", "-f", f"{legacy_dir}/10-first.sh", f"{legacy_dir}/20-second.sh", LOCK_FIFO])
    script = f"{legacy_dir}/50-mariadb-lock"
    c.write_file(script, FIFO_LOCK_SCRIPT, mode=0o755)
    configure(c, f"version: 1\nsettings: {{legacy_hooks: {legacy_dir}}}\napps: {{}}\n")
    for cycle in (1, 2):
        started = time.monotonic()
        code, out = hook(c, "freeze")
        took = time.monotonic() - started
        print(f"cycle {cycle}: freeze through the shim took {took:.2f} s")
        assert code == 0, out
        assert took < 10, f"the freeze took {took:.1f} s: it waited for the client, not the script"
        # The client the script left holds the lock: reads go on, a write waits.
        assert c.run("mariadb -N -e 'SELECT COUNT(*) FROM qgft.t'").returncode == 0
        blocked = c.run("timeout 2 mariadb -e 'INSERT INTO qgft.t VALUES (10)'", check=False)
        assert blocked.returncode == 124, blocked
        writer = c.popen(f"mariadb -e 'INSERT INTO qgft.t VALUES ({100 + cycle})'")
        time.sleep(0.5)
        assert writer.poll() is None
        assert status(c)["paused_apps"] == ["legacy-hooks"]

        code, out = hook(c, "thaw")
        assert code == 0, out
        assert writer.wait(30) == 0  # released by the thaw script, through the FIFO
        row = c.run(f"mariadb -N -e 'SELECT id FROM qgft.t WHERE id={100 + cycle}'").stdout
        assert row.strip() == str(100 + cycle)
        assert c.run(["test", "-e", LOCK_FIFO], check=False).returncode == 1
        log = hook_log(c)
        assert re.search(rf"^{DATE}: {script} finished with status=0$", log, re.M), log
        assert "left running: pid " in log
        assert re.search(rf"^  \| {script} freeze left .* ended by itself$", log, re.M), log
        c.run(["truncate", "-s0", HOOK_LOG])


# What a command reports about itself, into the file OUT: ids (real, effective, saved, fs),
# groups, OOM score, cgroup; and whether it could make a setgid file.
WHO = (
    "(grep -E '^(Uid|Gid|Groups):' /proc/self/status; printf 'oom '; cat /proc/self/oom_score_adj;"
    " sed -n 's/^0::/cgroup /p' /proc/self/cgroup; touch OUT.sgid;"
    " chmod g+s OUT.sgid && echo sgid made || echo sgid refused) >OUT 2>&1"
)


def reconfigure(container: Container, yaml: str) -> None:
    # configure() restarts the daemon; quick tests in a row would use up systemd's start limit
    # (5 starts in 10 s), which is not what these tests are about.
    container.run(["systemctl", "reset-failed", "qgafreeze.service"])
    configure(container, yaml)


def reported(container: Container, out: str) -> dict[str, str]:
    text = container.run(["cat", out]).stdout
    return {line.split()[0]: " ".join(line.split()[1:]) for line in text.splitlines()}


def test_a_user_step_is_that_user_only_in_a_cgroup_of_its_own_and_makes_no_setgid_file(installed):
    c = installed
    c.run("rm -f /tmp/qgft-who /tmp/qgft-who.sgid /run/qgft-root /run/qgft-root.sgid")
    reconfigure(
        c,
        "version: 1\napps:\n  who:\n    freeze:\n"
        f"      - {{shell: \"{WHO.replace('OUT', '/tmp/qgft-who')}\", user: nobody}}\n"
        f"      - {{shell: \"{WHO.replace('OUT', '/run/qgft-root')}\"}}\n",
    )
    code, out = hook(c, "freeze")
    assert code == 0, out
    assert hook(c, "thaw")[0] == 0
    nobody = reported(c, "/tmp/qgft-who")
    gid = c.run(["id", "-g", "nobody"]).stdout.strip()
    groups = sorted(c.run(["id", "-G", "nobody"]).stdout.split(), key=int)
    assert nobody["Uid:"].split() == ["65534"] * 4
    assert nobody["Gid:"].split() == [gid] * 4
    assert sorted(nobody["Groups:"].split(), key=int) == groups
    assert nobody["oom"] == "0"
    assert re.fullmatch(r"/system.slice/qgafreeze.service/qgafreeze-\d+-\d+", nobody["cgroup"])
    assert nobody["sgid"] == "refused"  # RestrictSUIDSGID=yes
    root = reported(c, "/run/qgft-root")
    assert root["sgid"] == "refused"  # as root too
    assert root["cgroup"] != nobody["cgroup"]
    # The cgroups went with their commands.
    assert (
        c.run(
            "ls /sys/fs/cgroup/system.slice/qgafreeze.service | grep -c qgafreeze-", check=False
        ).stdout.strip()
        == "0"
    )


def test_what_a_step_or_a_legacy_script_starts_with_setsid_is_ended_with_it(installed, legacy_dir):
    c = installed
    c.run(["rm", "-f", f"{legacy_dir}/10-first.sh", f"{legacy_dir}/20-second.sh"])
    escape = "(setsid /bin/sleep {n} </dev/null >/dev/null 2>&1 &)"
    c.write_file(
        f"{legacy_dir}/10-escape",
        f'#!/bin/sh\n[ "$1" = freeze ] && {escape.format(n=4243)}\ntrue\n',
        mode=0o755,
    )
    reconfigure(
        c,
        f"version: 1\nsettings: {{legacy_hooks: {legacy_dir}}}\napps:\n  step:\n"
        f'    freeze: [{{shell: "{escape.format(n=4242)}; exit 0"}}]\n',
    )
    code, out = hook(c, "freeze")
    assert code == 0, out
    assert c.run(["pgrep", "-f", "sleep 4242"], check=False).returncode == 1  # ended with its step
    assert c.run(["pgrep", "-f", "sleep 4243"]).returncode == 0  # kept, as the stock chain would
    code, out = hook(c, "thaw")
    assert code == 0, out
    assert c.run(["pgrep", "-f", "sleep 4243"], check=False).returncode == 1
    log = hook_log(c)
    assert re.search(
        rf"{legacy_dir}/10-escape freeze left pid \d+ \(\w+\) running: .* ended with SIGTERM$",
        log,
        re.M,
    ), log
