"""The cycle report for real: written by the installed daemon under /run after each phase, read
back as the host reads it (root, the file itself) and through ``qgafreeze status --json``, and
every document read here validated against docs/cycle-report.schema.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from container import Container
from helpers import CLI, HOOK_LOG, add_unit, configure, cycle_of, hook, hook_log

REPORT = "/run/qgafreeze/report.json"
SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "cycle-report.schema.json").read_text()
)
UNITS = ("qgft-report-db.service", "qgft-report-idle.service")

APPS = """
version: 1
settings: {freeze_timeout: 30s, thaw_timeout: 30s, max_frozen: 0}
apps:
  db: {units: [qgft-report-db]}
  idle: {units: [qgft-report-idle]}
  flaky: {freeze: [{exec: [/bin/false]}], on_failure: %s}
"""


def valid(doc: dict[str, Any]) -> dict[str, Any]:
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc


def report(c: Container) -> dict[str, Any]:
    return valid(json.loads(c.run(["cat", REPORT]).stdout))


def status_json(c: Container) -> dict[str, Any]:
    return valid(json.loads(c.run([CLI, "status", "--json"]).stdout))


def apps_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["app"]: entry for entry in doc["apps"]}


@pytest.fixture
def report_apps(installed: Container) -> Iterator[Container]:
    for unit in UNITS:
        add_unit(installed, unit, stop=0.1)
    yield installed
    hook(installed, "thaw")


def test_each_phase_writes_the_report_root_reads_and_status_json_prints(report_apps):
    c = report_apps
    configure(c, APPS % "continue", start=(UNITS[0],))  # idle stays stopped

    code, out = hook(c, "freeze")
    assert code == 0, out
    frozen = report(c)
    assert (frozen["cycle"], frozen["phase"]) == (cycle_of(out), "freeze")
    assert c.run(["stat", "-c", "%a %U", REPORT]).stdout.split() == ["600", "root"]

    code, out = hook(c, "thaw")
    assert code == 0, out
    doc = report(c)
    assert (doc["phase"], doc["reason"], doc["verdict"]) == ("thaw", "request", "crash-consistent")
    assert [r.split(":")[0] for r in doc["verdict_reasons"]] == ["flaky"]
    db = apps_of(doc)["db"]
    assert (db["freeze"]["result"], db["thaw"]["result"], db["quiesced"]) == ("ok", "ok", True)
    assert apps_of(doc)["idle"]["thaw"]["result"] == "skipped"

    printed = status_json(c)
    assert {k: v for k, v in printed.items() if k != "daemon"} == doc
    assert printed["daemon"]["state"] == "thawed"


def test_an_app_with_nothing_to_resume_is_skipped_alike_in_report_hook_log_and_journald(
    report_apps,
):
    c = report_apps
    configure(c, APPS % "continue", start=(UNITS[0],))
    hook(c, "freeze")
    code, out = hook(c, "thaw")
    assert code == 0, out
    cycle = cycle_of(out)

    idle = apps_of(report(c))["idle"]["thaw"]
    assert idle["message"] == "nothing to resume: its freeze paused nothing"
    assert f"qgafreeze:idle thaw skipped: {idle['message']}" in hook_log(c), c.run(
        ["cat", HOOK_LOG]
    ).stdout
    records = c.journal(QGAFREEZE_CYCLE=cycle, QGAFREEZE_APP="idle", QGAFREEZE_PHASE="thaw")
    assert [r["QGAFREEZE_RESULT"] for r in records] == ["skipped"]


def test_a_refused_freeze_reads_failed_even_after_the_thaw_a_caller_sends_after_it(report_apps):
    c = report_apps
    configure(c, APPS % "abort", start=UNITS)

    code, out = hook(c, "freeze")
    assert code != 0, out
    # What qemu-ga 9.1+ puts into the freeze's error: the first line names the app and why.
    assert "flaky failed: /bin/false exited with status 1" in out.splitlines()[0], out
    failed = report(c)
    assert failed["verdict"] == "failed" and "flaky" in failed["verdict_reasons"][0]

    code, out = hook(c, "thaw")  # Proxmox thaws after a failed freeze too
    assert code == 0, out
    assert report(c) == failed
    assert status_json(c)["verdict"] == "failed"
