"""Commands, held sessions and legacy hook scripts, run for real as child processes; systemd is
the in-memory table (the container tier runs them against the real one)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from fakes import FakeSystemd, RecordingEvents

from qgafreeze.actions import build_actions
from qgafreeze.config import parse_config
from qgafreeze.engine import FROZEN, THAWED, Engine
from qgafreeze.errors import StateError
from qgafreeze.legacy import LEFTOVER_GRACE, legacy_scripts
from qgafreeze.planner import build_plan

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


# What a legacy script left running gets this long to end by itself in the tests that wait it
# out: the daemon's LEFTOVER_GRACE, scaled down.
GRACE = 0.5


def engine_for(
    apps: dict,
    systemd: FakeSystemd | None = None,
    leftover_grace: float = LEFTOVER_GRACE,
    **settings,
) -> tuple[Engine, RecordingEvents]:
    config = parse_config({"apps": apps, "settings": settings})
    events = RecordingEvents()
    manager = systemd or FakeSystemd({})
    actions = build_actions(
        config.apps, manager, config.settings.legacy_hook_timeout, leftover_grace
    )
    return Engine(config, build_plan(config), actions, events, abandon_grace=0.5), events


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(pid))
    return found


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- exec and shell steps ------------------------------------------------------------------------


def test_freeze_and_thaw_steps_run_with_their_output_reported_per_step(tmp_path):
    engine, events = engine_for(
        {
            "cache": {
                "freeze": [{"exec": ["/bin/echo", "flushed"]}],
                "thaw": [{"shell": f"echo resumed; echo thawed > {tmp_path}/thawed"}],
            }
        }
    )
    assert engine.freeze().ok
    assert engine.thaw().ok
    (freeze_app, freeze), (thaw_app, thaw) = events.steps
    assert (freeze_app, freeze.kind, freeze.what, freeze.phase) == (
        "cache",
        "exec",
        "/bin/echo flushed",
        "freeze",
    )
    assert freeze.output == ("flushed",) and freeze.status == 0
    assert (thaw.kind, thaw.phase, thaw.output) == ("shell", "thaw", ("resumed",))
    assert (tmp_path / "thawed").read_text() == "thawed\n"


def test_arguments_reach_the_command_as_they_are_without_a_shell():
    engine, events = engine_for({"a": {"freeze": [{"exec": ["/bin/echo", "$HOME;", "`id`", "*"]}]}})
    assert engine.freeze().ok
    assert events.steps[0][1].output == ("$HOME; `id` *",)


def test_commands_get_a_clean_environment_plus_their_own(monkeypatch):
    monkeypatch.setenv("QGFT_DAEMON_SECRET", "leak")
    engine, events = engine_for(
        {"a": {"freeze": [{"exec": ["/usr/bin/env"], "env": {"FOO": "bar"}}]}}
    )
    assert engine.freeze().ok
    env = dict(line.split("=", 1) for line in events.steps[0][1].output)
    assert env["FOO"] == "bar"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert "QGFT_DAEMON_SECRET" not in env


@needs_root
def test_commands_run_as_the_configured_user():
    engine, events = engine_for(
        {"a": {"freeze": [{"exec": ["/usr/bin/id", "-un"], "user": "nobody"}]}}
    )
    assert engine.freeze().ok
    assert events.steps[0][1].output == ("nobody",)


def test_failing_freeze_step_fails_the_freeze_and_its_thaw_steps_undo_it(tmp_path):
    engine, events = engine_for(
        {
            "a": {
                "freeze": [{"shell": "echo half-done; exit 3"}],
                "thaw": [{"shell": f"touch {tmp_path}/undone"}],
            }
        }
    )
    report = engine.freeze()
    assert not report.ok
    assert "exited with status 3" in report.apps[0].message
    assert (tmp_path / "undone").exists()  # the rollback ran the thaw steps
    assert engine.state == THAWED and engine.paused_apps == []


def test_step_that_hangs_is_killed_with_its_whole_process_group():
    marker = f"qgft-hang-{os.getpid()}"
    # The marker rides on a grandchild's command line, so a leftover would be found.
    engine, events = engine_for(
        {
            "a": {
                "freeze": [
                    {
                        "exec": [
                            "/bin/sh",
                            "-c",
                            f"/usr/bin/python3 -c 'import time; time.sleep(100)' {marker} & "
                            "exec /bin/sleep 100",
                        ],
                        "timeout": "300ms",
                    }
                ]
            }
        }
    )
    report = engine.freeze()
    assert report.apps[0].result == "timeout"
    assert "killed with all it started" in report.apps[0].message
    assert wait_until(lambda: not processes_with(marker)), processes_with(marker)


def test_signal_step_goes_through_systemd():
    systemd = FakeSystemd({"web.service": "active"})
    engine, _ = engine_for(
        {"web": {"freeze": [{"signal": "SIGUSR1", "units": ["web.service"], "whom": "main"}]}},
        systemd,
    )
    assert engine.freeze().ok
    assert systemd.calls("kill 10 main") == ["web.service"]


# -- cgroup freeze -------------------------------------------------------------------------------


def test_freeze_mode_pauses_running_units_and_thaws_only_those():
    systemd = FakeSystemd({"a.service": "active", "b.service": "inactive"})
    engine, _ = engine_for({"x": {"units": ["a", "b"], "mode": "freeze"}}, systemd)
    assert engine.freeze().ok
    assert systemd.calls("freeze") == ["a.service"]
    assert systemd.calls("stop") == []
    assert engine.thaw().ok
    assert systemd.calls("thaw") == ["a.service"]


# -- held sessions -------------------------------------------------------------------------------


SESSION_SCRIPT = "read what; echo got-$what; echo ready; read last; echo $last > {out}; echo bye"


def test_session_is_held_through_the_frozen_window_and_closed_on_thaw(tmp_path):
    out = tmp_path / "closed"
    engine, _ = engine_for(
        {
            "db": {
                "session": {
                    "argv": ["/bin/sh", "-c", SESSION_SCRIPT.format(out=out)],
                    "open": "lock",
                    "ready": "^ready$",
                    "close": "unlock",
                }
            }
        }
    )
    report = engine.freeze()
    assert report.ok, report.error
    assert engine.state == FROZEN
    assert not out.exists()  # still holding
    thaw = engine.thaw()
    assert thaw.ok, thaw.error
    assert out.read_text() == "unlock\n"
    assert {"got-lock", "ready", "bye"} <= set(thaw.apps[0].output)


def test_session_that_never_gets_ready_times_out_and_is_killed():
    marker = f"qgft-session-{os.getpid()}"
    engine, _ = engine_for(
        {
            "db": {
                "timeout": "300ms",
                "session": {
                    "argv": ["/bin/sh", "-c", f"exec /bin/sleep 100 # {marker}"],
                    "ready": "x",
                },
            }
        }
    )
    report = engine.freeze()
    assert report.apps[0].result == "timeout"
    assert not report.ok
    assert wait_until(lambda: not processes_with(marker))


def test_a_session_that_never_reads_its_open_text_fails_the_freeze_at_its_timeout():
    marker = f"qgft-deaf-session-{os.getpid()}"
    deaf = {"argv": ["/usr/bin/python3", "-c", "import time; time.sleep(100)", marker]}
    # Far more than a pipe holds: writing it all would block until the session reads it.
    deaf.update(open="x" * (1 << 20), ready="never")
    engine, _ = engine_for({"db": {"timeout": "1s", "session": deaf}})
    started = time.monotonic()
    report = engine.freeze()
    took = time.monotonic() - started
    assert report.apps[0].result == "timeout"
    assert re.search(
        r"its input was not read \(\d+ of the 1048577 bytes sent were taken\)",
        report.apps[0].message,
    ), report.apps[0].message
    assert took < 2, f"the freeze took {took:.1f} s"
    assert wait_until(lambda: not processes_with(marker))
    assert engine.state == THAWED and engine.paused_apps == []


def test_session_that_dies_while_frozen_is_logged_and_reported_by_the_thaw():
    engine, events = engine_for(
        {"db": {"session": {"argv": ["/bin/sh", "-c", "echo ready; exit 7"], "ready": "ready"}}}
    )
    assert engine.freeze().ok
    assert wait_until(
        lambda: any("held session exited with status 7" in p for p in events.problems)
    )
    report = engine.thaw()
    assert not report.ok
    assert "application-consistent" in report.apps[0].message


# -- legacy hook scripts -------------------------------------------------------------------------


def write_script(directory: Path, name: str, body: str, mode: int = 0o755) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(mode)


def test_legacy_scripts_follow_the_stock_selection_and_order(tmp_path):
    for name in ("20-b", "10-a", "30-c.dpkg-old", "40-d~", "50-e.rpmsave", "60-f.sample"):
        write_script(tmp_path, name, "true")
    write_script(tmp_path, "15-noexec", "true", mode=0o644)
    (tmp_path / "25-dir").mkdir()
    assert [Path(p).name for p in legacy_scripts(str(tmp_path))] == ["10-a", "20-b"]


def test_legacy_scripts_freeze_in_glob_order_and_thaw_in_reverse(tmp_path):
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    log = tmp_path / "calls"
    for name in ("10-a", "20-b"):
        write_script(hooks, name, f'echo "$(basename $0) $1" >> {log}; echo said-$1')
    engine, events = engine_for({}, legacy_hooks=str(hooks))
    assert engine.freeze().ok
    assert engine.thaw().ok
    assert log.read_text().splitlines() == ["10-a freeze", "20-b freeze", "20-b thaw", "10-a thaw"]
    first = events.steps[0][1]
    assert (first.kind, first.what, first.phase, first.output) == (
        "legacy",
        str(hooks / "10-a"),
        "freeze",
        ("said-freeze",),
    )


def test_a_failing_legacy_script_fails_the_freeze_and_what_ran_is_thawed(tmp_path):
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    log = tmp_path / "calls"
    write_script(hooks, "10-a", f'echo "a $1" >> {log}')
    write_script(hooks, "20-b", f'echo "b $1" >> {log}; [ "$1" = thaw ]')
    write_script(hooks, "30-c", f'echo "c $1" >> {log}')
    engine, _ = engine_for({}, legacy_hooks=str(hooks))
    report = engine.freeze()
    assert not report.ok
    assert "20-b freeze exited with status 1" in report.error.message
    assert log.read_text().splitlines() == ["a freeze", "b freeze", "b thaw", "a thaw"]


def test_a_legacy_script_that_hangs_is_killed_at_its_timeout(tmp_path):
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    write_script(hooks, "10-hang", "exec /bin/sleep 100")
    engine, _ = engine_for({}, legacy_hooks=str(hooks), legacy_hook_timeout="300ms")
    report = engine.freeze()
    assert report.apps[0].result == "timeout"


def test_a_legacy_script_that_writes_without_end_is_killed_at_its_timeout(tmp_path):
    # Its output never leaves the pipe empty: the deadline must be checked between reads.
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    marker = f"qgft-chatty-{os.getpid()}"
    (tmp_path / marker).symlink_to("/usr/bin/yes")  # "y" lines: the most lines a second
    write_script(hooks, "10-chatty", f"exec {tmp_path / marker}")
    engine, _ = engine_for({}, legacy_hooks=str(hooks), legacy_hook_timeout="300ms")
    report, took = timed(engine.freeze)
    assert report.apps[0].result == "timeout"
    assert "killed with all it started" in report.apps[0].message, report.apps[0].message
    assert took < 2, f"the freeze took {took:.1f} s"
    assert wait_until(lambda: not processes_with(marker)), processes_with(marker)


# A legacy script in the pattern of QEMU's MySQL sample hook: on freeze a background "client" is
# fed a lock request, then blocks reading a FIFO until the thaw script writes it; the freeze
# script waits until the lock holds and exits 0, leaving the client running and holding its
# output.  The client here is a shell loop that notes each line it is fed.
FIFO_SCRIPT = """
fifo={dir}/lock.fifo
case "$1" in
freeze)
    mkfifo "$fifo" || exit 1
    feed() {{
        trap 'echo killed > {dir}/feed-killed; exit 1' TERM
        echo lock
        read -r _ < "$fifo"
        echo unlock
        rm -f "$fifo"
    }}
    feed | while IFS= read -r line; do
        echo "client: $line"
        [ "$line" = lock ] && : > {dir}/locked
    done &
    until [ -e {dir}/locked ]; do sleep 0.01; done
    echo "lock held"
    ;;
thaw)
    [ -p "$fifo" ] || exit 1
    echo go > "$fifo"
    ;;
esac
"""


def fifo_engine(tmp_path: Path) -> tuple[Engine, RecordingEvents]:
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    write_script(hooks, "10-lock", FIFO_SCRIPT.format(dir=tmp_path))
    return engine_for({}, legacy_hooks=str(hooks), legacy_hook_timeout="10s")


def legacy_steps(events: RecordingEvents, phase: str) -> list:
    return [report for _, report in events.steps if report.phase == phase]


def test_a_legacy_script_that_leaves_a_process_holding_its_output_is_done_when_it_exits(tmp_path):
    engine, events = fifo_engine(tmp_path)
    started = time.monotonic()
    report = engine.freeze()
    took = time.monotonic() - started
    try:
        assert report.ok, report.error
        assert took < 3, f"the freeze took {took:.1f} s: it waited for more than the script"
        (step,) = legacy_steps(events, "freeze")
        assert step.status == 0
        assert "lock held" in step.output
        assert any(line.startswith("left running: pid ") for line in step.output), step.output
        assert (tmp_path / "lock.fifo").exists()  # the client still holds the lock
    finally:
        engine.thaw()


def test_what_a_legacy_script_left_running_ends_when_its_thaw_script_says_and_is_not_killed(
    tmp_path,
):
    engine, events = fifo_engine(tmp_path)
    assert engine.freeze().ok
    started = time.monotonic()
    report = engine.thaw()
    took = time.monotonic() - started
    assert report.ok, report.error
    assert took < LEFTOVER_GRACE, f"the thaw took {took:.1f} s"
    assert not (tmp_path / "lock.fifo").exists()
    assert not (tmp_path / "feed-killed").exists()
    output = report.apps[0].output
    assert any("10-lock freeze left pid" in line and "ended by itself" in line for line in output)


def test_output_of_what_a_legacy_script_left_running_reaches_the_logs(tmp_path):
    engine, events = fifo_engine(tmp_path)
    assert engine.freeze().ok
    report = engine.thaw()
    # Written by the client after the freeze script had exited, once the thaw script wrote the
    # FIFO: the hook log gets it with the thaw's lines.
    assert "client: unlock" in report.apps[0].output


def test_what_a_legacy_script_left_running_is_ended_after_the_thaw_scripts_and_a_grace(tmp_path):
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    marker = f"qgft-leftover-{os.getpid()}"
    sleeper = f"/usr/bin/python3 -c 'import time; time.sleep(100)' {marker}"
    write_script(hooks, "10-polite", f'[ "$1" = freeze ] && {sleeper} polite &\ntrue')
    # Ignores SIGTERM, as a client in the middle of something may.
    write_script(hooks, "20-stubborn", f"[ \"$1\" = freeze ] && (trap '' TERM; {sleeper}) &\ntrue")
    engine, events = engine_for({}, leftover_grace=GRACE, legacy_hooks=str(hooks))
    assert engine.freeze().ok
    # The scripts have exited; what they backgrounded may not have exec'd the sleeper yet.
    deadline = time.monotonic() + 10
    while len(processes_with(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(processes_with(marker)) == 2
    started = time.monotonic()
    report = engine.thaw()
    took = time.monotonic() - started
    assert report.ok, report.error
    assert not processes_with(marker)
    assert GRACE <= took < GRACE + 10
    output = report.apps[0].output
    ended = {Path(line.split()[0]).name: line for line in output if " freeze left pid" in line}
    assert set(ended) == {"10-polite", "20-stubborn"}, output
    assert ended["10-polite"].endswith("ended with SIGTERM"), ended
    assert ended["20-stubborn"].endswith("ended with SIGKILL"), ended


def test_what_a_thaw_script_left_running_is_ended_and_the_log_says_to_start_it_through_systemd(
    tmp_path,
):
    # A thaw script that restarts an app in the background: the stock chain would leave it be.
    # Here it lives in the daemon's cgroup, which systemd ends at any restart of the daemon
    # anyway; it is ended after the grace, and the log says how to start it so that it lasts.
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    marker = f"qgft-thaw-leftover-{os.getpid()}"
    sleeper = f"/usr/bin/python3 -c 'import time; time.sleep(100)' {marker}"
    write_script(hooks, "10-restart", f'[ "$1" = thaw ] && {sleeper} &\ntrue')
    engine, _ = engine_for({}, leftover_grace=GRACE, legacy_hooks=str(hooks))
    assert engine.freeze().ok
    report, took = timed(engine.thaw)
    assert report.ok, report.error
    assert not processes_with(marker)
    assert GRACE <= took < GRACE + 10
    (ended,) = (line for line in report.apps[0].output if " thaw left pid" in line)
    assert "ended with SIGTERM" in ended, ended
    assert "must be started through systemd (systemctl start, systemd-run)" in ended, ended


def test_a_legacy_script_that_leaves_a_process_and_fails_still_fails_the_app(tmp_path):
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    marker = f"qgft-failed-leftover-{os.getpid()}"
    sleeper = f"/usr/bin/python3 -c 'import time; time.sleep(100)' {marker}"
    write_script(hooks, "10-broken", f'[ "$1" = freeze ] || exit 0\n{sleeper} &\nexit 3')
    engine, events = engine_for({}, leftover_grace=GRACE, legacy_hooks=str(hooks))
    report = engine.freeze()
    assert not report.ok
    assert "10-broken freeze exited with status 3" in report.error.message
    assert legacy_steps(events, "freeze")[0].status == 3
    # The rollback is a thaw: what the failed script left is ended with the rest.
    assert not processes_with(marker)
    assert engine.paused_apps == []


def test_a_leftover_that_called_setsid_is_ended_after_the_thaw_scripts_and_a_grace(tmp_path):
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    marker = f"qgft-setsid-leftover-{os.getpid()}"
    sleeper = f"/usr/bin/python3 -c 'import time; time.sleep(100)' {marker}"
    # Its own session and process group, and not even the script's output: nothing but the
    # script's cgroup ties it to the script.
    write_script(
        hooks, "10-escape", f'[ "$1" = freeze ] && (setsid {sleeper} >/dev/null 2>&1 &)\ntrue'
    )
    engine, _ = engine_for({}, leftover_grace=GRACE, legacy_hooks=str(hooks))
    freeze = engine.freeze()
    assert freeze.ok, freeze.error
    assert wait_until(lambda: len(processes_with(marker)) == 1)
    report, took = timed(engine.thaw)
    assert (report.ok, processes_with(marker)) == (True, []), report.error
    assert GRACE <= took < GRACE + 10
    (ended,) = (line for line in report.apps[0].output if " freeze left pid" in line)
    assert ended.endswith("ended with SIGTERM"), ended


def test_ending_what_scripts_and_steps_left_never_signals_a_process_outside_them(tmp_path):
    hooks = tmp_path / "hook.d"
    hooks.mkdir()
    write_script(hooks, "10-leave", '[ "$1" = freeze ] && /bin/sleep 100 &\ntrue')
    # Started as a script's leftover would be, in a session and group of its own, but by us.
    stranger = subprocess.Popen(["/bin/sleep", "100"], start_new_session=True)
    try:
        engine, _ = engine_for(
            {
                "a": {
                    "freeze": [
                        {"shell": "/bin/sleep 100 & exec /bin/sleep 100", "timeout": "200ms"}
                    ]
                }
            },
            leftover_grace=GRACE,
            legacy_hooks=str(hooks),
        )
        assert not engine.freeze().ok  # the step timed out: the script's leftover is ended too
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


# -- rollback and the trust check at thaw --------------------------------------------------------


@needs_root
def test_a_thaw_step_refused_by_the_trust_check_keeps_the_app_paused_until_it_is_fixed(tmp_path):
    program = tmp_path / "resume"
    program.write_text(f"#!/bin/sh\necho resumed >> {tmp_path}/resumed\n")
    program.chmod(0o755)
    engine, _ = engine_for(
        {"a": {"freeze": [{"exec": ["/bin/true"]}], "thaw": [{"exec": [str(program)]}]}}
    )
    assert engine.freeze().ok
    program.chmod(0o757)  # while frozen, anyone could have put their code in it
    refused = engine.thaw()
    assert not refused.ok
    assert "refused: " in refused.apps[0].message, refused.apps[0].message
    assert "writable by everyone" in refused.apps[0].message
    assert not (tmp_path / "resumed").exists()
    assert engine.paused_apps == ["a"]
    with pytest.raises(StateError, match="apps still paused by an earlier cycle: a"):
        engine.freeze()
    # The way out: make the file root's alone again, and thaw again.
    program.chmod(0o755)
    thawed = engine.thaw()
    assert thawed.ok, thawed.error
    assert engine.paused_apps == []
    assert (tmp_path / "resumed").read_text() == "resumed\n"


def test_a_rollback_closes_a_session_held_by_an_app_quiesced_before_the_failure(tmp_path):
    out = tmp_path / "received"
    marker = f"qgft-rolled-back-session-{os.getpid()}"
    holder = f'echo ready; while read -r line; do echo "$line" >> {out}; done'
    engine, _ = engine_for(
        {
            # a depends on b: a is quiesced first, and is held when b fails.
            "a": {
                "depends_on": ["b"],
                "session": {
                    "argv": ["/bin/sh", "-c", holder, marker],
                    "ready": "^ready$",
                    "close": "unlock",
                },
            },
            "b": {"freeze": [{"shell": "exit 4"}], "on_failure": "abort"},
        }
    )
    report = engine.freeze()
    assert not report.ok
    assert [(o.app, o.result) for o in report.apps] == [("a", "ok"), ("b", "failed")]
    # b too: its freeze steps had started, and their thaw steps (none here) undo them.
    assert [(o.app, o.result) for o in report.rollback] == [("b", "ok"), ("a", "ok")]
    assert out.read_text() == "unlock\n"
    assert wait_until(lambda: not processes_with(marker)), processes_with(marker)
    assert engine.state == THAWED and engine.paused_apps == []


def test_the_daemon_gives_a_leftover_the_grace_the_docs_state():
    # The tests above scale the grace down; the daemon builds its actions with the default.
    assert inspect.signature(build_actions).parameters["leftover_grace"].default == LEFTOVER_GRACE
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"after the thaw scripts have run gets {LEFTOVER_GRACE:g} s, then SIGTERM" in readme
