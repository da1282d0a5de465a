"""The unit tier's hold on docs/cycle-report.schema.json: every cycle report a unit test leaves
under its tmp_path is validated after the test (tests/unit/conftest.py), whoever wrote it and
whatever the test itself looked at.  The report is found by what it is, not by what its test
called it: a file named as the daemon names it, or any JSON document with a verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema

from qgafreeze import paths

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "cycle-report.schema.json"
SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
REPORT_NAME = os.path.basename(paths.REPORT_FILE)
# A report is a few kilobytes; anything far larger is some other test's data.
LARGEST = 1 << 20


def validate_report(doc: Any) -> dict[str, Any]:
    """``doc`` if the schema allows it (a report, or status --json's document); else raises."""
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert isinstance(doc, dict)
    return doc


def _is_report(path: Path) -> bool:
    if path.name == REPORT_NAME:
        return True
    try:
        if path.stat().st_size > LARGEST:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "verdict" in doc and "cycle" in doc


def reports_under(root: Path) -> list[Path]:
    """Every cycle report below ``root``."""
    found = {p for p in root.rglob(REPORT_NAME) if p.is_file()}
    found |= {p for p in root.rglob("*.json") if p.is_file() and _is_report(p)}
    return sorted(found)


def check_reports_under(root: Path) -> int:
    """Validates every cycle report below ``root``; returns how many there were."""
    reports = reports_under(root)
    for path in reports:
        try:
            validate_report(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, jsonschema.ValidationError) as exc:
            raise AssertionError(
                f"{path} does not match {SCHEMA_PATH.name}: {str(exc).splitlines()[0]}"
            ) from exc
    return len(reports)
