"""`python3 -m qgafreeze.quiesce NAME ARGS`: runs the named helper, refuses any other name."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import qgafreeze.quiesce as quiesce
from qgafreeze import paths

SRC = Path(__file__).resolve().parents[2] / "src"


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qgafreeze.quiesce", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


def test_the_helper_program_is_installed_beside_the_hook():
    assert paths.QUIESCE == "/usr/libexec/qgafreeze/quiesce"


def test_an_unknown_helper_is_a_usage_error_naming_the_known_ones():
    result = run_module("nosuchdb", "--x")

    assert result.returncode == quiesce.EXIT_USAGE == 64
    assert "unknown helper 'nosuchdb'" in result.stderr
    assert "Traceback" not in result.stderr
    for name in quiesce.helpers():
        assert name in result.stderr


@pytest.mark.parametrize("name", ["os", "..cli", "qgafreeze.cli", "Mariadb", "__main__", ""])
def test_names_outside_the_helper_package_are_never_imported(name):
    assert quiesce.main([name]) == quiesce.EXIT_USAGE


def test_no_name_is_a_usage_error_and_help_is_not(capsys):
    assert quiesce.main([]) == quiesce.EXIT_USAGE
    assert "usage: quiesce NAME" in capsys.readouterr().err
    assert quiesce.main(["--help"]) == 0
    assert "usage: quiesce NAME" in capsys.readouterr().out


def test_a_known_helper_gets_the_remaining_arguments_and_its_status_is_the_exit_status(
    monkeypatch,
):
    seen: list[list[str]] = []

    def fake_main(args: list[str]) -> int:
        seen.append(args)
        return 3

    module = types.ModuleType("qgafreeze.quiesce.fakedb")
    module.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qgafreeze.quiesce.fakedb", module)
    monkeypatch.setattr(quiesce, "helpers", lambda: ["fakedb"])

    assert quiesce.main(["fakedb", "--a", "b"]) == 3
    assert seen == [["--a", "b"]]


def test_the_helpers_listed_are_the_package_modules_without_the_dispatcher():
    names = quiesce.helpers()
    assert "__main__" not in names and "__init__" not in names
    modules = (SRC / "qgafreeze/quiesce").glob("*.py")
    on_disk = {p.stem for p in modules if not p.stem.startswith("_")}
    assert set(names) == on_disk
