"""What root may be made to run: the config, every program, script and directory on the way must be
root's alone, judged as they will really be run, when the file is loaded and again before each run.

The attacker is ``nobody``: files and directories are given to that uid with chown (root), as a
local user or a compromised service account would hold them.
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeSystemd, RecordingEvents

from qgafreeze.actions import build_actions
from qgafreeze.config import load_file
from qgafreeze.engine import CycleReport, Engine
from qgafreeze.errors import ConfigError
from qgafreeze.model import Config
from qgafreeze.planner import build_plan

# Giving files to another user needs root, and so does running steps as the daemon runs them.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NOBODY = pwd.getpwnam("nobody").pw_uid


def nobodys_directory(parent: Path, name: str = "app") -> Path:
    directory = parent / name
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    return directory


def program(path: Path, body: str = "exit 0") -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def write_config(tmp_path: Path, data: Any, name: str = "qgafreeze.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))  # JSON is YAML
    path.chmod(0o600)
    return str(path)


def load(tmp_path: Path, data: Any) -> Config:
    return load_file(write_config(tmp_path, data))


def refusals(tmp_path: Path, data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, data)
    return caught.value.problems


def freeze_steps(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"apps": {"a": {"freeze": list(steps)}}}


def owned(path: Path) -> str:
    return f"{path} is owned by uid {NOBODY}, not root"


# -- the config file ------------------------------------------------------------------------------


def test_config_writable_by_others_is_refused(tmp_path):
    path = tmp_path / "qgafreeze.yaml"
    path.write_text("version: 1\n")
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError) as caught:
        load_file(str(path))
    assert "writable by everyone" in str(caught.value)


@needs_root
def test_a_config_in_a_directory_another_user_owns_is_refused(tmp_path):
    app = nobodys_directory(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_file(write_config(app, "version: 1\n"))
    assert caught.value.problems == [f"refused: {owned(app)}"]


@needs_root
def test_a_config_reached_through_a_symlink_in_a_directory_another_user_owns_is_refused(tmp_path):
    real = write_config(tmp_path, "version: 1\n")
    app = nobodys_directory(tmp_path)
    (app / "qgafreeze.yaml").symlink_to(real)
    with pytest.raises(ConfigError) as caught:
        load_file(str(app / "qgafreeze.yaml"))
    assert caught.value.problems == [f"refused: {owned(app)}"]
    assert load_file(real).apps == ()


# -- programs, as they will be run ----------------------------------------------------------------


def test_a_program_others_can_change_is_refused_as_sshd_would(tmp_path):
    tool = program(tmp_path / "flush")
    tool.chmod(0o757)
    assert refusals(tmp_path, f"apps:\n  a:\n    freeze: [{{exec: [{tool}]}}]\n") == [
        f"apps.a.freeze[0].exec[0]: refused: {tool} is writable by everyone (mode 0757);"
        f" run: chmod o-w {tool}"
    ]


def test_a_program_in_a_directory_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    tool = program(shared / "flush")
    text = f"apps:\n  a:\n    session: {{argv: [{tool}], ready: x}}\n"
    assert refusals(tmp_path, text)[0].startswith(f"apps.a.session.argv[0]: refused: {shared} is")


def test_programs_found_on_the_safe_path_are_checked_and_accepted(tmp_path):
    text = "apps:\n  a:\n    freeze: [{exec: [cat]}, {exec: [/bin/echo, x]}]\n"
    assert load(tmp_path, text).app("a").freeze[1].argv == ("/bin/echo", "x")


@needs_root
def test_a_symlink_in_a_directory_another_user_owns_is_refused(tmp_path):
    app = nobodys_directory(tmp_path)
    (app / "flush").symlink_to("/bin/true")  # the target is root's: the link is not
    assert refusals(tmp_path, freeze_steps({"exec": [f"{app}/flush"]})) == [
        f"apps.a.freeze[0].exec[0]: refused: {owned(app)}"
    ]


@needs_root
def test_a_symlink_another_user_owns_in_a_sticky_directory_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    link = shared / "flush"
    link.symlink_to("/bin/true")
    os.lchown(link, NOBODY, NOBODY)  # its owner may replace it, sticky bit or not
    assert refusals(tmp_path, freeze_steps({"exec": [str(link)]})) == [
        f"apps.a.freeze[0].exec[0]: refused: {link} is a symlink owned by uid {NOBODY}, not root"
    ]


@needs_root
def test_a_relative_program_is_judged_in_its_working_directory(tmp_path):
    app = nobodys_directory(tmp_path)
    program(app / "flush")
    assert refusals(tmp_path, freeze_steps({"exec": ["./flush"], "cwd": str(app)})) == [
        f"apps.a.freeze[0].exec[0]: refused: {owned(app)}"
    ]


@needs_root
def test_a_bare_name_is_looked_up_in_the_path_the_step_sets(tmp_path):
    bin_dir = nobodys_directory(tmp_path, "bin")
    program(bin_dir / "flush")
    data = freeze_steps({"exec": ["flush"], "env": {"PATH": f"{bin_dir}:/usr/bin"}})
    assert refusals(tmp_path, data) == [
        f"apps.a.freeze[0].env.PATH: refused: {owned(bin_dir)}",
        f"apps.a.freeze[0].exec[0]: refused: {owned(bin_dir)}",
    ]


@pytest.mark.parametrize("path", ["bin:/usr/bin", "/usr/bin:", "/usr/bin::/bin"])
def test_a_path_the_check_cannot_follow_is_refused(tmp_path, path):
    data = freeze_steps({"exec": ["/bin/true"], "env": {"PATH": path}})
    assert refusals(tmp_path, data) == [
        f"apps.a.freeze[0].env.PATH: refused: {entry!r} is not absolute"
        for entry in path.split(":")
        if not entry.startswith("/")
    ]


@pytest.mark.parametrize("name", ["BASH_ENV", "LD_PRELOAD", "PYTHONPATH", "LD_LIBRARY_PATH"])
@needs_root
def test_environment_that_makes_a_program_load_code_is_checked(tmp_path, name):
    app = nobodys_directory(tmp_path)
    data = freeze_steps({"exec": ["/bin/true"], "env": {name: f"{app}/lib"}})
    assert refusals(tmp_path, data) == [f"apps.a.freeze[0].env.{name}: refused: {owned(app)}"]


@pytest.mark.parametrize(
    "argv", [["/usr/bin/env", "LD_PRELOAD=/srv/x.so", "/bin/true"], ["env", "PATH=/srv/bin", "x"]]
)
def test_environment_a_wrapper_is_given_in_its_arguments_is_refused(tmp_path, argv):
    name = argv[1].partition("=")[0]
    assert refusals(tmp_path, freeze_steps({"exec": argv})) == [
        f"apps.a.freeze[0].exec[1]: refused: {name} is set in the arguments, where the check"
        " cannot follow it; set it with env:"
    ]


@needs_root
def test_the_interpreter_a_script_names_is_checked(tmp_path):
    app = nobodys_directory(tmp_path)
    interpreter = program(app / "interp")
    tool = tmp_path / "tool"
    tool.write_text(f"#!{interpreter} -e\nexit 0\n")
    tool.chmod(0o755)
    assert refusals(tmp_path, freeze_steps({"exec": [str(tool)]})) == [
        f"apps.a.freeze[0].exec[0]: refused: {tool} starts with #!{interpreter} -e: {owned(app)}"
    ]


@needs_root
def test_the_program_a_script_finds_through_env_is_looked_up_in_the_steps_path(tmp_path):
    bin_dir = nobodys_directory(tmp_path, "bin")
    program(bin_dir / "interp")
    tool = tmp_path / "tool"
    tool.write_text("#!/usr/bin/env interp\n")
    tool.chmod(0o755)
    data = freeze_steps({"exec": [str(tool)], "env": {"PATH": str(bin_dir)}})
    assert refusals(tmp_path, data) == [
        f"apps.a.freeze[0].env.PATH: refused: {owned(bin_dir)}",
        f"apps.a.freeze[0].exec[0]: refused: {tool} starts with #!/usr/bin/env interp:"
        f" {owned(bin_dir)}",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["/bin/sh", "SCRIPT"],
        ["sh", "-e", "SCRIPT", "/bin/true"],
        ["bash", "-euo", "pipefail", "SCRIPT"],
        ["dash", "--", "SCRIPT"],
        ["/usr/bin/python3", "-u", "-W", "ignore", "SCRIPT"],
        ["perl", "-w", "SCRIPT"],
    ],
)
@needs_root
def test_the_script_a_known_interpreter_runs_is_checked(tmp_path, argv):
    app = nobodys_directory(tmp_path)
    script = app / "job"
    script.write_text("exit 0\n")  # not executable: the interpreter reads it
    argv = [str(script) if word == "SCRIPT" else word for word in argv]
    assert refusals(tmp_path, freeze_steps({"exec": argv})) == [
        f"apps.a.freeze[0].exec[{argv.index(str(script))}]: refused: {owned(app)}"
    ]


@needs_root
def test_a_script_named_from_the_working_directory_is_checked_there(tmp_path):
    app = nobodys_directory(tmp_path)
    (app / "job.sh").write_text("exit 0\n")
    assert refusals(tmp_path, freeze_steps({"exec": ["bash", "job.sh"], "cwd": str(app)})) == [
        f"apps.a.freeze[0].exec[1]: refused: {owned(app)}"
    ]


@needs_root
def test_python_code_importing_from_a_working_directory_others_own_is_refused(tmp_path):
    app = nobodys_directory(tmp_path)
    data = freeze_steps(
        {"exec": ["python3", "-c", "import json"], "cwd": str(app)},
        {"exec": ["python3", "-I", "-c", "import json"], "cwd": str(app)},
    )
    assert refusals(tmp_path, data) == [
        "apps.a.freeze[0].exec[2]: refused: python imports from its working directory:"
        f" {owned(app)}"
    ]


@needs_root
def test_a_program_a_wrapper_runs_by_its_path_is_checked(tmp_path):
    app = nobodys_directory(tmp_path)
    tool = program(app / "flush")
    assert refusals(tmp_path, freeze_steps({"exec": ["nice", "-n", "5", str(tool)]})) == [
        f"apps.a.freeze[0].exec[3]: refused: {owned(app)}"
    ]


@needs_root
def test_a_program_a_wrapper_runs_by_a_relative_path_is_checked_in_its_working_directory(
    tmp_path,
):
    app = nobodys_directory(tmp_path)
    program(app / "flush")
    assert refusals(tmp_path, freeze_steps({"exec": ["nice", "./flush"], "cwd": str(app)})) == [
        f"apps.a.freeze[0].exec[1]: refused: {owned(app)}"
    ]


# -- shell text -----------------------------------------------------------------------------------


def running_a_tool_others_own(tmp_path: Path, text: str) -> tuple[str, str]:
    """``text`` with TOOL replaced by a program in nobody's directory, and why it is refused."""
    app = nobodys_directory(tmp_path)
    return text.replace("TOOL", str(program(app / "flush"))), owned(app)


@pytest.mark.parametrize(
    "text",
    [
        "TOOL",
        "echo start && TOOL --now 2>/dev/null",
        "cd /tmp; exec TOOL",
        "if true; then sh TOOL; fi",
        'echo "$(TOOL)"',
        "x=`TOOL`",
        "FOO=1 TOOL | cat",
        "case $1 in *) TOOL;; esac",
        "(TOOL) > /dev/null",
        "cat <<EOF\nnot a command\nEOF\nTOOL",
        "echo done # a comment\nTOOL",
        ". TOOL",
        "nohup TOOL &",
    ],
)
@needs_root
def test_every_program_shell_text_runs_is_checked(tmp_path, text):
    text, why = running_a_tool_others_own(tmp_path, text)
    assert refusals(tmp_path, freeze_steps({"shell": text})) == [
        f"apps.a.freeze[0].shell: refused: {why}"
    ]
    data = freeze_steps({"exec": ["/bin/sh", "-c", text]})
    assert refusals(tmp_path, data) == [f"apps.a.freeze[0].exec[2]: refused: {why}"]


@pytest.mark.parametrize(
    "text",
    [
        'echo "<<EOF"\nTOOL',
        "# see <<EOF\nTOOL",
        "x=$((1<<2))\nTOOL",
        "cat << 'E O'\nE O\nTOOL",
        "cat <<-A <<B\n\tA\nB\nTOOL",
        "cat <<EOF\n$(TOOL)\nEOF",
    ],
)
@needs_root
def test_a_command_after_or_inside_a_here_document_is_checked(tmp_path, text):
    # A here-document's body is data, up to its end word; a body the shell expands (end word not
    # quoted) still runs what it substitutes.  What only looks like one must hide no line.
    text, why = running_a_tool_others_own(tmp_path, text)
    assert refusals(tmp_path, freeze_steps({"shell": text})) == [
        f"apps.a.freeze[0].shell: refused: {why}"
    ]


@needs_root
def test_a_bare_name_in_shell_text_is_looked_up_in_the_path_in_force(tmp_path):
    bin_dir = nobodys_directory(tmp_path, "bin")
    program(bin_dir / "flush")
    data = freeze_steps({"shell": "sync && flush", "env": {"PATH": f"/usr/bin:/bin:{bin_dir}"}})
    assert refusals(tmp_path, data) == [
        f"apps.a.freeze[0].env.PATH: refused: {owned(bin_dir)}",
        f"apps.a.freeze[0].shell: refused: {owned(bin_dir)}",
    ]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("$TOOL --now", "'$TOOL' is expanded by a shell, which the check cannot follow;"),
        ("echo a; ~/bin/flush", "'~/bin/flush' is expanded by a shell"),
        ("bash -e $SCRIPT", "'$SCRIPT' is expanded by a shell"),
        ("cd /srv/app && ./flush", "'./flush' is a relative path, which the shell text may change"),
        ("cd /srv/app && . ./flush", "'./flush' is a relative path, which the shell text may"),
        ("cd /srv/app && sh ./flush", "'./flush' is a relative path, which the shell text may"),
        ("cd /srv/app; bash flush", "'flush' is a relative path, which the shell text may change"),
        ("PATH=/srv/bin:$PATH flush", "PATH is set in the shell text, where the check cannot"),
        ("export LD_PRELOAD=/srv/x.so; true", "LD_PRELOAD is set in the shell text"),
        ("echo 'unclosed", "the shell text cannot be read as sh would (a quote is not closed)"),
        ("eval eval eval eval eval /srv/app/flush", "shell text nested too deep to follow"),
        (
            "cat <<EOF\nbody\n/srv/app/flush",
            "the shell text cannot be read as sh would (a here-document is not closed)",
        ),
    ],
)
def test_shell_text_the_check_cannot_follow_is_refused(tmp_path, text, why):
    (problem,) = refusals(tmp_path, freeze_steps({"shell": text}))
    assert problem.startswith(f"apps.a.freeze[0].shell: refused: {why}")


def test_everyday_commands_and_shell_text_are_accepted(tmp_path):
    data = freeze_steps(
        {"shell": "sync; echo flushed > /dev/null 2>&1 && tr a-z A-Z < /etc/hostname | cat"},
        {"shell": "if [ -d /etc ]; then logger 'a $b'; fi\nmysql <<'EOF'\n./x; $Y\nEOF\n"},
        {"shell": 'for f in /etc/*.conf; do test -r "$f" || exit 1; done'},
        {"exec": ["sh", "-c", "exec sleep 0", "name", "$1"]},
        {"exec": ["python3", "-c", "print(1)"]},
        {"exec": ["/usr/bin/env", "LANG=C", "true"], "env": {"PATH": "/usr/bin:/bin"}},
        {"shell": "cat <<EOF >/dev/null\nPATH=/usr/bin $((1 << 2))\nEOF\necho $(($$ % 2))"},
    )
    assert len(load(tmp_path, data).app("a").freeze) == 7


# -- again, just before each run ------------------------------------------------------------------


def engine_for(config: Config) -> Engine:
    actions = build_actions(config.apps, FakeSystemd({}), config.settings.legacy_hook_timeout)
    return Engine(config, build_plan(config), actions, RecordingEvents(), abandon_grace=0.5)


def legacy_engine(tmp_path: Path, name: str, body: str) -> tuple[Engine, Path]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    script = program(hooks / name, body)
    return engine_for(load(tmp_path, {"settings": {"legacy_hooks": str(hooks)}})), script


def assert_refused_and_not_run(report: CycleReport, refusal: str, tmp_path: Path) -> None:
    assert not report.ok
    assert refusal in report.apps[0].message
    assert not (tmp_path / "ran").exists()


@needs_root
def test_a_program_changed_after_the_load_is_refused_before_it_runs(tmp_path):
    tool = program(tmp_path / "flush", f"touch {tmp_path}/ran")
    engine = engine_for(load(tmp_path, freeze_steps({"exec": [str(tool)]})))
    os.chown(tool, NOBODY, NOBODY)
    refusal = f"apps.a.freeze[0].exec[0]: refused: {owned(tool)}"
    assert_refused_and_not_run(engine.freeze(), refusal, tmp_path)


@needs_root
def test_a_thaw_step_changed_while_frozen_is_refused_and_not_run(tmp_path):
    tool = program(tmp_path / "resume", f"touch {tmp_path}/ran")
    data = {"apps": {"a": {"freeze": [{"exec": ["/bin/true"]}], "thaw": [{"shell": str(tool)}]}}}
    engine = engine_for(load(tmp_path, data))
    assert engine.freeze().ok
    tool.chmod(0o777)
    refusal = f"apps.a.thaw[0].shell: refused: {tool} is writable by everyone"
    assert_refused_and_not_run(engine.thaw(), refusal, tmp_path)


@needs_root
def test_a_session_program_changed_after_the_load_is_refused_before_it_starts(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = program(bin_dir / "client", f"touch {tmp_path}/ran; echo ready; cat")
    engine = engine_for(
        load(tmp_path, {"apps": {"db": {"session": {"argv": [str(tool)], "ready": "ready"}}}})
    )
    os.chown(bin_dir, NOBODY, NOBODY)
    refusal = f"apps.db.session.argv[0]: refused: {owned(bin_dir)}"
    assert_refused_and_not_run(engine.freeze(), refusal, tmp_path)


@needs_root
def test_a_legacy_script_added_after_the_load_is_refused_at_the_scan_and_none_runs(tmp_path):
    engine, script = legacy_engine(tmp_path, "10-good", f"touch {tmp_path}/ran")
    added = program(script.parent / "20-added", f"touch {tmp_path}/ran")
    os.chown(added, NOBODY, NOBODY)
    refusal = f"settings.legacy_hooks: refused: {owned(added)}"
    assert_refused_and_not_run(engine.freeze(), refusal, tmp_path)


@needs_root
def test_a_legacy_script_changed_while_frozen_is_not_run_at_the_thaw(tmp_path):
    body = f'[ "$1" = thaw ] && touch {tmp_path}/ran; exit 0'
    engine, script = legacy_engine(tmp_path, "10-db", body)
    assert engine.freeze().ok
    os.chown(script, NOBODY, NOBODY)
    refusal = f"settings.legacy_hooks: refused: {owned(script)}"
    assert_refused_and_not_run(engine.thaw(), refusal, tmp_path)
