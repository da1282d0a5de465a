"""Integration tier: tests run against a real systemd, system bus and journald in a container."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

# Tests and bench scripts import the harness as `container`, whatever pytest import mode is used.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from container import Container, unmet_preconditions
from helpers import PREFIX

INTEGRATION_DIR = Path(__file__).resolve().parent
REPO_ROOT = INTEGRATION_DIR.parents[1]

# Filled when the tier is skipped, so the terminal summary can repeat it where it is seen.
_skip_reasons: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml normally declares the marker; this keeps `-c other.ini` runs warning-free.
    if not any(line.startswith("integration:") for line in config.getini("markers")):
        config.addinivalue_line(
            "markers", "integration: needs root and boots a systemd-nspawn container"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's.
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path == INTEGRATION_DIR or INTEGRATION_DIR in path.parents:
            item.add_marker(pytest.mark.integration)


def _integration_required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("QGAFREEZE_REQUIRE_INTEGRATION") == "1"


@pytest.fixture(scope="session")
def container() -> Iterator[Container]:
    """One booted container for the whole session, with the checkout bound at /src."""
    problems = unmet_preconditions()
    if problems:
        reason = "integration tests cannot run here: " + "; ".join(problems)
        if _integration_required():
            pytest.fail(reason + " (required because CI=true or QGAFREEZE_REQUIRE_INTEGRATION=1)")
        if not _skip_reasons:
            _skip_reasons.append(reason)
        pytest.skip("INTEGRATION TIER NOT RUN: " + reason)
    booted = Container.boot(REPO_ROOT)
    try:
        yield booted
    finally:
        booted.shutdown()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # A skip is easy to miss among dots; say it once more, in red, at the end of the run.
    for reason in _skip_reasons:
        terminalreporter.write_line(
            f"WARNING: INTEGRATION TIER SKIPPED: {reason}", red=True, bold=True
        )


@pytest.fixture(scope="session")
def installed(container: Container) -> Container:
    """The container after the README's `make install`.  /usr is the host's and read-only there,
    so the files go under /opt and the units into /etc/systemd/system instead of the
    distribution's unit directory."""
    result = container.run(
        f"make -C /src install PREFIX={PREFIX} UNITDIR=/etc/systemd/system", timeout=180
    )
    assert "qgafreeze.socket is enabled" in result.stdout, result.stdout
    return container


REPORT_SCHEMA = json.loads((REPO_ROOT / "docs" / "cycle-report.schema.json").read_text())


@pytest.fixture(autouse=True)
def _the_cycle_report_left_behind_matches_its_schema(
    request: pytest.FixtureRequest,
) -> Iterator[None]:
    """After every test that ran the installed daemon, its last cycle report validates against
    docs/cycle-report.schema.json (test_cycle_report.py validates each one it reads)."""
    yield
    if "installed" not in request.fixturenames:
        return
    container: Container = request.getfixturevalue("installed")
    read = container.run(["cat", "/run/qgafreeze/report.json"], check=False)
    if read.returncode == 0:
        jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(json.loads(read.stdout))
