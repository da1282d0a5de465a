"""Facts written once and the places that repeat them: each repetition is checked here."""

from __future__ import annotations

import ast
import io
import os
import re
from pathlib import Path

from qgafreeze import __version__, cli, errors, logs, protocol, shim
from qgafreeze.engine import AppOutcome, CycleReport

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "qgafreeze"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_an_apps_result_reads_the_same_in_the_hook_status_and_journal():
    outcome = AppOutcome("db", "freeze", "failed", 523, "stop job failed", units=("db.service",))
    expected = "db: freeze failed in 523 ms: stop job failed"
    assert protocol.app_line(outcome.to_dict()) == expected

    hook = io.StringIO()
    shim.summarize({"ok": False, "op": "freeze", "apps": [outcome.to_dict()]}, hook)
    assert f"qgafreeze:   {expected}" in hook.getvalue().splitlines()

    last = {"op": "freeze", "ok": False, "apps": [outcome.to_dict()]}
    assert f"  {expected}" in cli.render_status({"ok": True, "last": last}).splitlines()

    sent: list[str] = []
    writer = logs.LogWriter(None, lambda message, **fields: sent.append(message))
    writer.app_finished("c1", outcome)
    writer.cycle_finished(CycleReport(op="freeze", cycle="c1", reason="request"))
    assert writer.flush(5)
    assert sent[0] == expected


def test_readme_and_help_state_the_exit_statuses_of_the_one_table():
    listed = ", ".join(f"{code} {meaning}" for code, meaning in errors.EXIT_MEANINGS)
    readme = _one_line((REPO / "README.md").read_text())
    assert f"Exit statuses of `qgafreeze` and of the hook: {listed}." in readme
    assert cli.exit_statuses_text() == f"exit statuses: {listed}"
    assert f"exit statuses: {listed}" in _one_line(cli._parser().format_help())


def test_design_docs_error_table_gives_each_code_the_exit_status_it_has():
    design = (REPO / "docs" / "design.md").read_text()
    table = design.split("| code | exit | meaning |\n| --- | --- | --- |\n", 1)[1]
    rows = re.findall(r"^\| (`[^|]+`) \| (\d+) \|", table.split("\n\n", 1)[0], flags=re.M)
    documented = {
        code: int(status) for codes, status in rows for code in re.findall(r"`([^`]+)`", codes)
    }
    assert sorted(documented) == errors.all_codes()
    assert documented == {code: errors.exit_status(code) for code in documented}


def test_design_doc_lists_every_error_code_and_every_message_id():
    design = (REPO / "docs" / "design.md").read_text()
    for code in errors.all_codes():
        assert f"`{code}`" in design, f"docs/design.md does not list error code {code!r}"
    ids = {name: value for name, value in vars(logs).items() if name.startswith("MSG_")}
    assert len(ids) >= 5
    for name, value in ids.items():
        assert f"`{value}`" in design, f"docs/design.md does not list {name} ({value})"


def test_version_is_written_once():
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert "qgafreeze.__version__" in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M)


def test_the_socket_unit_listens_where_the_hook_and_the_cli_connect():
    from qgafreeze import paths

    unit = (REPO / "systemd" / "qgafreeze.socket").read_text()
    assert re.findall(r"^ListenStream=(.*)$", unit, flags=re.M) == [paths.SOCKET]
    assert shim.socket_path(None) in (paths.SOCKET, os.environ.get(paths.SOCKET_ENV))


def test_no_module_is_over_400_lines_and_no_class_over_250():
    # Rooms of one job each: past these sizes a module or class has grown a second job.
    too_big = []
    for path in sorted(SRC.glob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > 400:
            too_big.append(f"{path.name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > 250:
                    too_big.append(f"{path.name}: class {node.name}: {size} lines")
    assert too_big == []


def test_every_test_the_docs_cite_exists():
    # design.md, reliability.md and security.md prove each guarantee by naming its test: a
    # renamed or deleted test must not leave a promise that nothing keeps.
    cited: set[str] = set()
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        cited |= set(re.findall(r"`(test_[A-Za-z0-9_*]+)`", doc.read_text()))
    defined = {path.stem for path in (REPO / "tests").rglob("test_*.py")}
    for path in (REPO / "tests").rglob("*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
    missing = [
        name
        for name in sorted(cited)
        if name not in defined
        and not (name.endswith("*") and any(d.startswith(name[:-1]) for d in defined))
    ]
    assert len(cited) > 100
    assert missing == []


def test_test_modules_have_names_unique_across_the_tiers():
    # make test collects every tier in one pytest run, without packages: two test_x.py in two
    # tiers stop the whole collection.
    names = [path.name for path in (REPO / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
