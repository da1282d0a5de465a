"""Unit tier: under CI=true a skip is a failure, as in the container and VM tiers; and every
cycle report a test leaves under its tmp_path matches docs/cycle-report.schema.json.

Some unit tests need root (switching users) or GNU make; CI runs as root with make installed, so
a skip there means the machine is not what CI promises and the tests did not run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from reportcheck import check_reports_under


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where every unit test must run: {reason}"


@pytest.fixture(autouse=True)
def _every_cycle_report_left_under_tmp_path_matches_its_schema(
    request: pytest.FixtureRequest,
) -> Iterator[None]:
    # Asked for before the test runs, so that tmp_path outlives this check.
    root = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is not None:
        check_reports_under(root)
