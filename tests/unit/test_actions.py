"""Commands, held sessions and legacy hook scripts, run for real as child processes; systemd is
the in-memory table (the container tier runs them against the real one)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fakes import FakeSystemd, RecordingEvents

from qgafreeze.actions import build_actions
from qgafreeze.config import parse_config
from qgafreeze.engine import FROZEN, THAWED, Engine
from qgafreeze.legacy import legacy_scripts
from qgafreeze.planner import build_plan

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def engine_for(
    apps: dict, systemd: FakeSystemd | None = None, **settings
) -> tuple[Engine, RecordingEvents]:
    config = parse_config({"apps": apps, "settings": settings})
    events = RecordingEvents()
    manager = systemd or FakeSystemd({})
    actions = build_actions(config.apps, manager, config.settings.legacy_hook_timeout)
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
    assert "killed with its process group" in report.apps[0].message
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
