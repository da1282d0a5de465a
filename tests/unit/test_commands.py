"""Child processes as the daemon starts them: who they run as, what holds them together, how they
end, and how a held session is fed.  Run for real; root, as the daemon, for switching users."""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_actions import processes_with, wait_until

from qgafreeze import commands
from qgafreeze.containment import ProcessGroup, own_cgroup
from qgafreeze.errors import ActionTimeout, CommandFailed

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
MIB = 1 << 20
# What a child says about itself: ids (real, effective, saved, fs), groups, OOM score, cgroup.
WHO = (
    "grep -E '^(Uid|Gid|Groups):' /proc/self/status; echo oom $(cat /proc/self/oom_score_adj);"
    " echo cgroup $(sed -n 's/^0:://p' /proc/self/cgroup)"
)


def described(output) -> dict[str, list[str]]:
    return {line.split()[0].rstrip(":"): line.split()[1:] for line in output if line.strip()}


def sleeper(marker: str) -> str:
    return f"/usr/bin/python3 -c 'import time; time.sleep(100)' {marker}"


@pytest.fixture
def as_the_daemon_runs() -> Iterator[None]:
    """This process as systemd starts the daemon: an OOM score of its own and supplementary
    groups (group root among them), neither of which a command may inherit.  (The daemon has
    -500; +500 shows inheritance as well and needs no CAP_SYS_RESOURCE, set or undone.)"""
    groups = os.getgroups()
    with open("/proc/self/oom_score_adj") as f:
        score = f.read().strip()
    os.setgroups([0, 4242])
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("500")
    try:
        yield
    finally:
        os.setgroups(groups)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(score)


def assert_is_only(user: str, output: tuple[str, ...]) -> None:
    """``output`` of WHO shows ``user``'s ids, groups and nothing else, and an OOM score of 0."""
    entry = pwd.getpwnam(user)
    seen = described(output)
    assert {key: seen[key] for key in ("Uid", "Gid", "oom")} == {
        "Uid": [str(entry.pw_uid)] * 4,  # real, effective, saved, filesystem
        "Gid": [str(entry.pw_gid)] * 4,
        "oom": ["0"],
    }
    assert sorted(map(int, seen["Groups"])) == sorted(set(os.getgrouplist(user, entry.pw_gid)))


# -- who a command runs as --------------------------------------------------------------------


@needs_root
def test_a_step_run_as_a_user_has_that_users_ids_and_groups_only_and_an_ordinary_oom_score(
    as_the_daemon_runs,
):
    outcome = commands.run(["/bin/sh", "-c", WHO], time.monotonic() + 10, user="nobody")
    assert_is_only("nobody", outcome.output)


@needs_root
def test_a_session_run_as_a_user_has_that_users_ids_and_groups_only_and_an_ordinary_oom_score(
    as_the_daemon_runs,
):
    exits: list[int] = []
    held = commands.HeldSession(
        ["/bin/sh", "-c", WHO + "; echo ready; cat >/dev/null"], "nobody", (), None, exits.append
    )
    try:
        held.wait_for("^ready$", time.monotonic() + 10)
    finally:
        assert held.finish("", time.monotonic() + 5) == 0
    assert_is_only("nobody", held.output())


@needs_root
def test_a_command_run_as_root_is_not_shielded_from_the_oom_killer_as_the_daemon_is(
    as_the_daemon_runs,
):
    outcome = commands.run(["/bin/sh", "-c", WHO], time.monotonic() + 10)
    assert described(outcome.output)["oom"] == ["0"]


def test_the_program_gets_its_own_name_and_its_arguments_unchanged():
    script = 'tr "\\0" " " </proc/$$/cmdline; echo'
    outcome = commands.run(["sh", "-c", script, "$0", "a b"], time.monotonic() + 10)
    assert outcome.output == (f"sh -c {script} $0 a b ",)


def test_a_program_that_does_not_exist_cannot_run_and_says_so():
    with pytest.raises(CommandFailed, match="qgft-nothing: cannot run: No such file"):
        commands.run(["/nonexistent/qgft-nothing"], time.monotonic() + 5)
    with pytest.raises(CommandFailed, match="cannot run: No such file"):
        commands.run(["qgft-nothing-on-the-path"], time.monotonic() + 5)


@needs_root
def test_a_command_without_cwd_runs_where_workdir_says_its_users_home_or_slash():
    for user in (None, "nobody"):
        outcome = commands.run(["/bin/sh", "-c", "pwd"], time.monotonic() + 10, user=user)
        assert outcome.output == (commands.workdir(user, None),)
    home = pwd.getpwnam("nobody").pw_dir
    assert commands.workdir("nobody", None) == (home if os.path.isdir(home) else "/")
    assert commands.workdir("qgft-no-such-user", None) == "/"
    assert commands.workdir("nobody", "/tmp") == "/tmp"


# -- what holds a command's processes together --------------------------------------------------


@pytest.mark.skipif(own_cgroup() is None, reason="needs a cgroup2 hierarchy")
def test_each_command_runs_in_a_cgroup_of_its_own_that_is_removed_after(as_the_daemon_runs):
    mine = own_cgroup()
    assert mine is not None
    first = described(commands.run(["/bin/sh", "-c", WHO], time.monotonic() + 10).output)
    second = described(commands.run(["/bin/sh", "-c", WHO], time.monotonic() + 10).output)
    (cgroup,) = first["cgroup"]
    assert cgroup.startswith(mine[1].rstrip("/") + "/qgafreeze-")
    assert second["cgroup"] != first["cgroup"]
    assert not os.path.exists(os.path.join(mine[0], os.path.basename(cgroup)))


def test_a_step_that_double_forks_with_setsid_is_ended_when_it_exits():
    marker = f"qgft-escape-{os.getpid()}"
    script = f"(setsid {sleeper(marker)} </dev/null >/dev/null 2>&1 &); exit 0"
    outcome = commands.run(["/bin/sh", "-c", script], time.monotonic() + 10)
    assert outcome.status == 0
    assert wait_until(lambda: not processes_with(marker)), processes_with(marker)


def test_a_step_that_double_forks_with_setsid_is_ended_when_it_times_out():
    marker = f"qgft-escape-timeout-{os.getpid()}"
    script = f"(setsid {sleeper(marker)} </dev/null >/dev/null 2>&1 &); exec /bin/sleep 100"
    with pytest.raises(ActionTimeout, match="killed with all it started"):
        commands.run(["/bin/sh", "-c", script], time.monotonic() + 0.5)
    assert wait_until(lambda: not processes_with(marker)), processes_with(marker)


def test_ending_a_command_never_signals_a_process_outside_it():
    stranger = subprocess.Popen(["/bin/sleep", "100"], start_new_session=True)
    try:
        with pytest.raises(ActionTimeout):
            commands.run(["/bin/sh", "-c", "/bin/sleep 100 & exec /bin/sleep 100"], 0)
        commands.run(
            ["/bin/sh", "-c", "/bin/sleep 100 >/dev/null 2>&1 & exit 0"], time.monotonic() + 9
        )
        time.sleep(0.2)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_without_cgroups_a_leader_is_held_unreaped_so_its_group_number_stays_its_own():
    marker = f"qgft-group-{os.getpid()}"
    child = commands.spawn(
        ["/bin/sh", "-c", f"{sleeper(marker)} >/dev/null & exit 3"],
        None,
        (),
        None,
        subprocess.DEVNULL,
        jails=ProcessGroup,
    )
    assert child.wait(time.monotonic() + 10) == 3
    # Exited, and still a zombie: the kernel cannot hand its number to a new group.
    assert Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z")
    assert wait_until(lambda: [name for _, name in child.members()] == ["python3"])
    child.close()
    assert wait_until(lambda: not processes_with(marker))
    assert not os.path.exists(f"/proc/{child.pid}")  # reaped once its group was ended


# -- feeding a held session ---------------------------------------------------------------------


def test_sending_to_a_session_that_never_reads_fails_at_the_callers_deadline():
    marker = f"qgft-deaf-{os.getpid()}"
    held = commands.HeldSession(["/bin/sh", "-c", f"exec {sleeper(marker)}"], None, (), None, print)
    try:
        started = time.monotonic()
        with pytest.raises(ActionTimeout, match="did not read its input by its deadline"):
            held.send("x" * MIB, started + 0.5)
        assert time.monotonic() - started < 2
    finally:
        held.kill()
    assert wait_until(lambda: not processes_with(marker))
    writers = [t.name for t in threading.enumerate() if t.name == f"session-in-{held.pid}"]
    assert wait_until(
        lambda: not any(t.name == f"session-in-{held.pid}" for t in threading.enumerate())
    ), writers


def test_what_a_session_is_sent_reaches_it_whole_when_it_reads():
    held = commands.HeldSession(
        ["/bin/sh", "-c", "wc -c | sed 's/^ */got /'; echo ready"], None, (), None, print
    )
    held.send("y" * MIB + "\n", time.monotonic() + 10)
    assert held.finish("", time.monotonic() + 10) == 0
    assert f"got {MIB + 1}" in held.output()


def test_a_session_that_exits_before_it_is_ready_is_never_reported_as_exiting_while_held():
    # A wrong password: the session ends at once.  Nothing was held, so nothing was released
    # while frozen: the caller's "ended before it was ready" says it all.  Its drain thread is
    # let finish before the caller kills it, the order in which the old race reported the exit.
    exits: list[int] = []
    held = commands.HeldSession(
        ["/bin/sh", "-c", "echo denied; exit 1"], None, (), None, exits.append
    )
    with pytest.raises(CommandFailed, match="session ended before it was ready: denied"):
        held.wait_for("^ready$", time.monotonic() + 10)
    drain = f"session-{held.pid}"
    assert wait_until(lambda: not any(t.name == drain for t in threading.enumerate()))
    held.kill()
    assert exits == []
