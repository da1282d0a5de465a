"""What the README shows a user is what the program does."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def first_yaml_block_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def session_blocks(text: str) -> list[list[str]]:
    """Indented blocks that start with a '$ ' command, as lists of lines without the indent."""
    blocks: list[list[str]] = []
    for block in re.findall(r"(?:^    .*\n|^\n)+", text, flags=re.M):
        lines = [line[4:] for line in block.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        while lines and not lines[0]:
            lines.pop(0)
        if lines and lines[0].startswith("$ "):
            blocks.append(lines)
    return blocks


def transcript(lines: list[str]) -> list[tuple[str, list[str]]]:
    """[(command, expected output lines)] of one shown terminal session (blank lines split)."""
    shown: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            shown.append((line[2:], []))
        elif line:
            shown[-1][1].append(line)
    return shown


def matches(expected: list[str], actual: list[str]) -> bool:
    """``...`` in the README stands for any number of lines."""
    pattern = "".join(
        r"(?:.*\n)*?" if line == "..." else re.escape(line) + r"\n" for line in expected
    )
    return re.fullmatch(pattern + r"(?:.*\n)*", "".join(f"{a}\n" for a in actual)) is not None


def test_the_readmes_check_sessions_are_what_check_prints(tmp_path):
    files = {"/etc/qgafreeze.yaml": first_yaml_block_after("## Declare your applications")}
    sessions = [b for b in session_blocks(README) if "qgafreeze check" in b[0] or "cat " in b[0]]
    ran = 0
    for block in sessions:
        for command, expected in transcript(block):
            words = command.split()
            if words[0] == "cat":
                files[words[1]] = "".join(f"{line}\n" for line in expected)
                continue
            assert words[:2] == ["qgafreeze", "check"], command
            shown_path = words[3] if words[2:3] == ["-c"] else "/etc/qgafreeze.yaml"
            real = tmp_path / os.path.basename(shown_path)
            real.write_text(files[shown_path])
            result = subprocess.run(
                [sys.executable, "-m", "qgafreeze", "check", "-c", real.name],
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                capture_output=True,
                text=True,
                check=False,
            )
            output = (result.stdout + result.stderr).replace(real.name, shown_path)
            assert matches(expected, output.splitlines()), (
                f"README shows for `{command}`:\n" + "\n".join(expected) + f"\n\nbut:\n{output}"
            )
            ran += 1
    assert ran >= 2


def platform_rows() -> dict[str, str]:
    """README's platform table: the platform cell -> the status cell."""
    text = (REPO / "README.md").read_text()
    table = text.split("| platform | installed as | status |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.strip().splitlines()[1:]]
    return {cells[0].strip(): cells[2].strip() for cells in rows}


def test_the_platform_table_says_tested_in_a_vm_for_exactly_the_vm_tiers_guests():
    # The VM tier's own list, read from its source (importing it would pull in its harness).
    source = (REPO / "tests/e2e/image.py").read_text()
    suites = ast.literal_eval(re.search(r"^SUITES = (\(.*?\))$", source, re.M).group(1))  # type: ignore[union-attr]

    tested = [
        re.search(r"Debian \d+ (\w+)", platform).group(1)  # type: ignore[union-attr]
        for platform, status in platform_rows().items()
        if status.startswith("tested in a VM")
    ]
    assert sorted(tested) == sorted(suites)
    others = [s for p, s in platform_rows().items() if not p.startswith("Debian")]
    assert others and all(s.startswith(("untested", "built and checked here")) for s in others)
