"""`qgafreeze` as an administrator runs it: messages and exit statuses, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qgafreeze import paths

REPO = Path(__file__).resolve().parents[2]


def qgafreeze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [sys.executable, "-m", "qgafreeze", *args], capture_output=True, text=True, env=env
    )


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "qgafreeze.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def test_check_explains_the_plan_with_parallel_steps():
    result = qgafreeze("check", "-c", str(REPO / "config" / "qgafreeze.yaml"))
    assert result.returncode == 0, result.stderr
    assert "valid, 4 app(s)" in result.stdout
    freeze = result.stdout.split("freeze:", 1)[1].split("thaw:", 1)[0]
    assert (
        "step 1, in parallel:\n    shop\n    metrics\n    cache\n"
        "  step 2:\n    mariadb  (waits for shop)"
    ) in freeze


def test_check_lists_every_action_of_every_app_in_order():
    out = qgafreeze("check", "-c", str(REPO / "config" / "qgafreeze.yaml")).stdout
    apps = out.split("apps (", 1)[1]
    assert (
        "mariadb: timeout 15s, on failure abort, preset mariadb\n    1. hold a session:"
        f" {paths.QUIESCE} mariadb --client mariadb --long-query-threshold=1"
        " --long-query-wait=5 --lock-wait-timeout=3," in apps
    )
    assert "metrics: timeout 10s, on failure continue\n    1. freeze the processes of" in apps
    assert "    1. freeze step: send SIGUSR1 to cache.service (main)\n" in apps
    assert "    3. thaw step: run sh -c" in apps


def test_check_accepts_the_config_option_before_the_command_too(tmp_path):
    path = write(tmp_path, "version: 1\n")
    assert qgafreeze("-c", path, "check").returncode == 0


def test_check_names_every_error_and_exits_2(tmp_path):
    path = write(tmp_path, "apps:\n  a: {units: [x], depends_on: [b], timout: 1s}\n")
    result = qgafreeze("check", "-c", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "2 error(s)" in result.stderr
    assert "apps.a.timout: unknown key" in result.stderr
    assert "apps.a.depends_on[0]: unknown app 'b'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_is_one_line_not_a_traceback(tmp_path):
    result = qgafreeze("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_without_a_daemon_says_it_is_unreachable(tmp_path):
    result = qgafreeze("status", "--socket", str(tmp_path / "absent.sock"))
    assert result.returncode == 3
    assert "cannot reach the qgafreeze daemon" in result.stderr


def test_usage_errors_exit_64():
    result = qgafreeze("frobnicate")
    assert result.returncode == 64
    assert "invalid choice" in result.stderr


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `qgafreeze check | head -1`: the pipe closes before the plan is written.
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    process = subprocess.Popen(
        [sys.executable, "-m", "qgafreeze", "check", "-c", str(REPO / "config/qgafreeze.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(30) == 1
    assert "Traceback" not in stderr
