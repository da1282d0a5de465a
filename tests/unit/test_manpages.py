"""The man pages say what the code does: commands, options, exit statuses, paths, units."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qgafreeze import cli, daemon, errors, paths, protocol

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "qgafreeze.8"


def sections(page: Path) -> dict[str, str]:
    """Section name -> its troff source with escapes for '-' undone."""
    text = page.read_text().replace("\\-", "-")
    parts = re.split(r"^\.SH (.+)$", text, flags=re.M)
    return {parts[i].strip('"'): parts[i + 1] for i in range(1, len(parts), 2)}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def option_words(text: str) -> set[str]:
    """Every option the troff text names, as whole words: "-c" is not found in "--config"."""
    text = re.sub(r"\\f[BIRP]", " ", text)  # font changes glue words together: \fP--config
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


def test_every_command_and_option_of_the_cli_is_in_the_man_page():
    page = sections(PAGE)
    described = option_words(page["OPTIONS"])
    for name, sub in subcommands().items():
        assert f".B {name}\n" in page["COMMANDS"], f"command {name} is not described"
        for action in sub._actions:
            for option in action.option_strings:
                assert option in described, f"{name} {option} is not described"
    for option in ("--version", "--config", "-c"):
        assert option in described
    assert option_words(".BI --config FILE") == {"--config"}  # no "-c" in it


def test_the_man_page_lists_the_exit_statuses_of_the_one_table():
    listed = re.findall(r"^\.B (\d+)\n(.+)$", sections(PAGE)["EXIT STATUS"], flags=re.M)
    assert [(int(code), meaning) for code, meaning in listed] == list(errors.EXIT_MEANINGS)


def test_the_man_page_names_the_default_paths_and_the_hooks_operations():
    page = sections(PAGE)
    for path in (paths.CONFIG, paths.SOCKET, paths.STATE_FILE, paths.HOOK_LOG):
        assert f".I {path}\n" in page["FILES"], path
    assert f".I {paths.AGENT_STATE_FILE}\n" in page["FILES"]
    assert f".B {paths.SOCKET_ENV}\n" in page["ENVIRONMENT"]
    synopsis = page["SYNOPSIS"].splitlines()
    hook_ops = synopsis[synopsis.index(".B /usr/libexec/qgafreeze/fsfreeze-hook") + 1]
    assert set(re.findall(r"\w+", hook_ops.split("{", 1)[1])) == set(protocol.OPS)


@pytest.mark.parametrize("unit", ["qgafreeze.service", "qgafreeze.socket"])
def test_the_man_pages_a_unit_points_at_exist(unit):
    text = (REPO / "systemd" / unit).read_text()
    for name, section in re.findall(r"man:([\w.-]+)\((\d)\)", text):
        if name != "qemu-ga":
            assert (REPO / "docs" / f"{name}.{section}").is_file(), f"{unit}: man:{name}({section})"


@pytest.mark.parametrize("page", sorted(p.name for p in (REPO / "docs").glob("*.[1-8]")))
def test_each_man_page_renders_without_a_warning(page):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (make deps installs groff-base)")
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(REPO / "docs" / page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_man_page_describes_exactly_the_signals_the_daemon_handles():
    described = re.findall(r"^\.B (SIG[A-Z]+)\n", sections(PAGE)["SIGNALS"], flags=re.M)
    assert sorted(described) == sorted(sig.name for sig in daemon.SIGNALS)


def test_every_example_in_the_man_page_is_a_command_the_cli_accepts():
    examples = sections(PAGE)["EXAMPLES"]
    commands = [line.split()[1:] for line in re.findall(r"^qgafreeze .*$", examples, flags=re.M)]
    assert commands, "no qgafreeze command in EXAMPLES"
    for argv in commands:
        cli._parser().parse_args(argv)  # exits (SystemExit) on a command it does not know
    assert "journalctl -u qgafreeze.service" in examples
