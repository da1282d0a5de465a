"""The hook's first output line, which qemu-ga 9.1+ hands to the backup service inside the freeze's
error: it names each failed app and why, within FIRST_LINE_LIMIT characters, on one line."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from qgafreeze import shim
from qgafreeze.shim import FIRST_LINE_LIMIT


def first_line(reply: dict[str, Any]) -> str:
    out = io.StringIO()
    shim.summarize(reply, out)
    return out.getvalue().splitlines()[0]


def failed_freeze(*apps: tuple[str, str, str]) -> dict[str, Any]:
    return {
        "ok": False,
        "op": "freeze",
        "error": {"code": "freeze-failed", "message": "freeze of the first app failed"},
        "cycle": "5c0f2d9e1a7b",
        "state": "thawed",
        "duration_ms": 812,
        "apps": [
            {"app": app, "phase": "freeze", "result": result, "duration_ms": 5, "message": why}
            for app, result, why in apps
        ],
    }


def test_the_first_line_names_each_failed_app_and_why():
    line = first_line(
        failed_freeze(
            ("db", "failed", "mariadb.service: stop job finished with result 'failed'"),
            ("web", "timeout", "did not return by its deadline"),
            ("cache", "ok", ""),
            ("disk", "skipped", "not started: db failed and the freeze is aborted"),
        )
    )

    assert line == (
        "qgafreeze: freeze FAILED [freeze-failed]: db failed: mariadb.service: stop job finished"
        " with result 'failed'; web timeout: did not return by its deadline"
        " (812 ms, cycle 5c0f2d9e1a7b, state thawed)"
    )


def test_long_reasons_are_cut_evenly_so_that_every_failed_app_is_named_within_the_bound():
    apps = [(f"app{i}", "failed", "a long explanation " * 20) for i in range(6)]

    line = first_line(failed_freeze(*apps))

    assert len(line) <= FIRST_LINE_LIMIT
    assert all(f"app{i} failed: a long expl" in line for i in range(6)), line
    assert line.endswith("(812 ms, cycle 5c0f2d9e1a7b, state thawed)")


def test_with_too_many_failed_apps_for_any_reason_the_line_names_those_it_can_and_counts_the_rest():
    apps = [(f"application-number-{i}", "failed", "why") for i in range(60)]

    line = first_line(failed_freeze(*apps))

    assert len(line) <= FIRST_LINE_LIMIT
    assert "application-number-0 failed; application-number-1 failed" in line
    named = line.count("application-number-")
    assert f"; +{60 - named} more (812 ms" in line


def test_a_reason_cannot_break_the_line_or_print_a_line_that_passes_for_ours():
    line_feed_and_escape = "no\nqgafreeze: freeze ok\x1b[2K\u202e"

    out = io.StringIO()
    shim.summarize(failed_freeze(("db", "failed", line_feed_and_escape)), out)
    lines = out.getvalue().splitlines()

    assert "db failed: no\\x0aqgafreeze: freeze ok\\x1b[2K\\u202e" in lines[0]
    assert not any(line.startswith("qgafreeze: freeze ok") for line in lines)


def test_an_unreachable_daemon_is_one_bounded_line_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QGAFREEZE_SOCKET", str(tmp_path / ("x" * 250) / "qgafreeze.sock"))

    status = shim.main(["freeze"])

    line = capsys.readouterr().out.splitlines()[0]
    assert status == 3
    assert line.startswith("qgafreeze: freeze FAILED [unreachable]: cannot reach")
    assert len(line) <= FIRST_LINE_LIMIT


def test_the_readme_states_the_bound_of_the_first_line():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"line of at most {FIRST_LINE_LIMIT} characters" in " ".join(readme.split())
