"""How `make test` splits the tiers between two pytest runs (tests/run-tiers), and that the split
never lets CI leave a Debian suite out (tests/e2e/conftest.py's suite_selection)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_TIERS = REPO / "tests" / "run-tiers"
E2E = REPO / "tests" / "e2e"
MOVED = "tests/e2e/test_libvirt_caller.py"

# Stands in for python: says which suites it was given and exits with $FAKE_EXIT_<first suite>.
FAKE_PYTHON = """#!/bin/sh
echo "suites=[$QGAFREEZE_SUITES] elsewhere=[$QGAFREEZE_SUITES_ELSEWHERE] args=[$*]"
echo "start=[$QGAFREEZE_VM_TIER_START] await=[$QGAFREEZE_VM_TIER_AWAIT]"
first=${QGAFREEZE_SUITES%% *}
eval "exit \\${FAKE_EXIT_$first:-0}"
"""


def run_tiers(tmp_path: Path, suites: str, **exits: int) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON, encoding="utf-8")
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"]}
    env.update({f"FAKE_EXIT_{suite}": str(code) for suite, code in exits.items()})
    return subprocess.run(
        [str(RUN_TIERS), str(fake), suites],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_trixie_runs_beside_the_other_tiers_and_each_run_is_told_what_the_other_covers(
    tmp_path: Path,
) -> None:
    result = run_tiers(tmp_path, "bullseye bookworm trixie")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("suites=", "start="))]
    assert lines == [
        "suites=[bullseye bookworm] elsewhere=[trixie]"
        " args=[-m pytest -q --durations=15 tests/unit tests/integration tests/e2e]",
        # The first run says when its VM tier begins; the run beside waits for that.
        "start=[build/vm-tier.start] await=[]",
        # trixie's libvirt module follows in the first run, to even out the two sides ...
        f"suites=[trixie] elsewhere=[bullseye bookworm]"
        f" args=[-m pytest -q -p no:cacheprovider --durations=5 {MOVED}]",
        "start=[] await=[]",
        # ... and the run beside (its report printed last) leaves it out.
        "suites=[trixie] elsewhere=[bullseye bookworm]"
        f" args=[-m pytest -q -p no:cacheprovider --durations=15 --ignore={MOVED} tests/e2e]",
        "start=[] await=[build/vm-tier.start]",
    ]
    assert (tmp_path / "build" / "e2e-trixie.log").read_text().startswith("suites=[trixie]")


def test_the_module_moved_to_the_first_run_exists() -> None:
    # A renamed module would make that run fail, not vanish; this says why at once.
    assert (REPO / MOVED).is_file()


@pytest.mark.parametrize("failing", ["bullseye", "trixie"])
def test_make_test_fails_when_either_run_fails(tmp_path: Path, failing: str) -> None:
    result = run_tiers(tmp_path, "bullseye trixie", **{failing: 1})
    assert result.returncode != 0, result.stdout
    assert "exit 1" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize("suites", ["trixie", "bullseye bookworm"])
def test_a_selection_without_both_sides_is_one_run_of_every_tier(
    tmp_path: Path, suites: str
) -> None:
    result = run_tiers(tmp_path, suites)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"suites=[{suites}] elsewhere=[]"
        " args=[-m pytest -q tests/unit tests/integration tests/e2e]",
        "start=[] await=[]",
    ]
    assert not (tmp_path / "build").exists()


@pytest.fixture
def e2e_conftest() -> ModuleType:
    """tests/e2e/conftest.py as a plain module (its imports are the tier's own helpers)."""
    sys.path.insert(0, str(E2E))
    try:
        spec = importlib.util.spec_from_file_location("qgf_e2e_conftest", E2E / "conftest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(E2E))


def selection(module: ModuleType, monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple:
    for name in ("CI", "QGAFREEZE_REQUIRE_E2E", "QGAFREEZE_SUITES", "QGAFREEZE_SUITES_ELSEWHERE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return module.suite_selection()


def test_under_ci_a_suite_left_out_of_both_runs_is_an_error(
    e2e_conftest: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen, problem = selection(
        e2e_conftest,
        monkeypatch,
        CI="true",
        QGAFREEZE_SUITES="trixie",
        QGAFREEZE_SUITES_ELSEWHERE="bullseye",
    )
    assert chosen == ("trixie",)
    assert "runs every suite (bullseye bookworm trixie)" in problem


def test_under_ci_two_runs_that_cover_every_suite_between_them_are_accepted(
    e2e_conftest: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert selection(
        e2e_conftest,
        monkeypatch,
        CI="true",
        QGAFREEZE_SUITES="bullseye bookworm",
        QGAFREEZE_SUITES_ELSEWHERE="trixie",
    ) == (("bullseye", "bookworm"), "")


def test_a_suite_in_both_runs_or_an_unknown_one_is_an_error(
    e2e_conftest: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, both = selection(
        e2e_conftest, monkeypatch, QGAFREEZE_SUITES="trixie", QGAFREEZE_SUITES_ELSEWHERE="trixie"
    )
    assert "both name" in both
    _, unknown = selection(e2e_conftest, monkeypatch, QGAFREEZE_SUITES="sid")
    assert "unknown suite(s) sid" in unknown


def test_outside_ci_one_suite_may_be_chosen_for_a_quick_run(
    e2e_conftest: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert selection(e2e_conftest, monkeypatch, QGAFREEZE_SUITES="trixie") == (("trixie",), "")
