"""An app's details in the cycle report: what its commands print as qgafreeze-report lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fakes import FakeSystemd
from test_report import SECRET, apps_of, make_engine, session_app, written

from qgafreeze import details
from qgafreeze.commands import LINE_LIMIT, OUTPUT_LINES, Lines


def report_after_each_phase(tmp_path: Path, apps: dict[str, Any]):
    engine, events, report_file = make_engine(tmp_path, apps, FakeSystemd({}))
    assert engine.freeze().ok
    frozen = written(report_file)
    engine.thaw()
    return frozen, written(report_file), events


def test_a_sessions_report_lines_at_freeze_and_at_thaw_become_its_details_tied_to_the_cycle(
    tmp_path,
):
    script = (
        'echo "qgafreeze-report lock \\"backup stage\\""; echo ready; read x;'
        ' echo "qgafreeze-report backup_label \\"START WAL LOCATION: 0/2 $QGAFREEZE_CYCLE\\""'
    )
    frozen, thawed, _ = report_after_each_phase(tmp_path, {"db": session_app(script)})

    assert apps_of(frozen)["db"]["details"] == {"lock": "backup stage"}
    label = f"START WAL LOCATION: 0/2 {thawed['cycle']}"
    assert apps_of(thawed)["db"]["details"] == {"lock": "backup stage", "backup_label": label}


def test_each_cycles_session_reports_its_own_details_from_its_first_line(tmp_path):
    # The same config serves many cycles, each with a new session: what the last one printed
    # must not hide the first lines of the next.
    script = 'echo "qgafreeze-report lock \\"backup stage\\""; echo ready; read x'
    engine, _, report_file = make_engine(tmp_path, {"db": session_app(script)}, FakeSystemd({}))
    for _ in range(2):
        assert engine.freeze().ok
        assert apps_of(written(report_file))["db"]["details"] == {"lock": "backup stage"}
        engine.thaw()


def test_an_exec_steps_report_lines_become_its_details_and_nothing_else_of_its_output(tmp_path):
    report = 'qgafreeze-report saved {\\"cycle\\": \\"$QGAFREEZE_CYCLE\\"}'
    script = f'echo "{SECRET}"; echo "{report}"'
    step = {"exec": ["/bin/sh", "-c", script]}
    frozen, thawed, _ = report_after_each_phase(tmp_path, {"cache": {"freeze": [step]}})

    saved = {"saved": {"cycle": thawed["cycle"]}}
    assert apps_of(frozen)["cache"]["details"] == saved == apps_of(thawed)["cache"]["details"]
    assert SECRET not in json.dumps(thawed)


def test_an_app_that_reports_nothing_has_empty_details(tmp_path):
    frozen, thawed, _ = report_after_each_phase(tmp_path, {"db": session_app("echo ready; read x")})
    assert apps_of(frozen)["db"]["details"] == {} == apps_of(thawed)["db"]["details"]


def test_a_report_over_the_limit_or_malformed_is_left_out_with_a_problem_that_says_why(tmp_path):
    big = "x" * details.LIMIT
    script = (
        f"echo 'qgafreeze-report huge \"{big}\"'; echo 'qgafreeze-report Bad-Key 1';"
        " echo 'qgafreeze-report notjson {'; echo 'qgafreeze-report fine true'; echo ready; read x"
    )
    frozen, thawed, events = report_after_each_phase(tmp_path, {"db": session_app(script)})

    assert apps_of(thawed)["db"]["details"] == {"fine": True}
    assert apps_of(thawed)["db"]["quiesced"]  # the snapshot is no worse for it
    problems = " / ".join(events.problems)
    assert f"over the limit of {details.LIMIT} bytes" in problems
    assert "'Bad-Key' is not lower-case letters" in problems
    assert "'notjson' ignored: its value is not JSON" in problems


def test_reports_that_together_pass_the_limit_keep_those_that_fit():
    got: dict[str, Any] = {}
    problems: list[str] = []
    half = "y" * (details.LIMIT // 2)
    lines = [f"qgafreeze-report {k} {json.dumps(half)}" for k in ("a", "b")]
    details.collect(lines, got, problems.append, "session")
    assert list(got) == ["a"]
    assert "'b' ignored: the app's details would take" in problems[0]


def test_report_lines_are_kept_whole_past_the_output_line_cap_and_the_line_length_limit():
    lines = Lines()
    long_value = json.dumps("z" * (LINE_LIMIT * 3))
    noise = "".join(f"line {n}\n" for n in range(OUTPUT_LINES + 5))
    lines.feed(noise.encode())
    report = f"qgafreeze-report label {long_value}"
    for start in range(0, len(report), 1000):  # as a pty delivers it, in pieces
        lines.feed(report[start : start + 1000].encode())
    lines.feed(b"\r\n")
    lines.finish()
    assert lines.reports == [report]


def test_report_lines_past_what_is_kept_end_in_one_line_the_collector_names():
    lines = Lines()
    value = json.dumps("w" * (details.LIMIT - 100))
    for n in range(details.KEPT // details.LIMIT + 3):
        lines.feed(f"qgafreeze-report k{n} {value}\n".encode())
    assert lines.reports[-1] == details.OVERFLOW
    assert details.OVERFLOW not in lines.reports[:-1]
    problems: list[str] = []
    details.collect(lines.reports[-1:], {}, problems.append, "session")
    assert "the rest were ignored" in problems[0]


def test_the_host_client_names_an_apps_details_and_its_json_holds_them_whole():
    import io

    from qgafreeze_host import cli

    label = "START WAL LOCATION: 0/2 (file 000000010000000000000002)\nLABEL: qgafreeze cycle c\n"
    entry = {"app": "pg", "quiesced": True, "guarantee": "backup held", "freeze": None}
    doc = {"verdict": "application-consistent", "cycle": "c", "apps": [
        {**entry, "details": {"backup_label": label, "backup_stop": {"lsn": "0/3"}}},
        {**entry, "app": "web", "details": {}},
    ]}  # fmt: skip
    out = io.StringIO()
    cli.render(doc, out)
    lines = out.getvalue().splitlines()
    assert "    details (in --json): backup_label, backup_stop" in lines
    assert sum("details" in line for line in lines) == 1  # none for an app without
    assert "START WAL" not in out.getvalue()  # a label's many lines stay in --json
