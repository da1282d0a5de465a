"""Pure figures of bench/dbstall.py (no container, no database), so that the unit tier can check
them: the longest wait between acknowledged writes, a figure's median (min-max), and reading
such a cell back from another section of docs/performance.md (the Redis one)."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from typing import Optional


def longest_gap(acks: Sequence[float], start: float, end: float) -> float:
    """Seconds of the longest time without an acknowledged write from `start` (the freeze
    request) until writes went on after `end` (the thaw's answer).

    The first gap runs from `start` to the first acknowledgement after it; the last one counted
    ends at the first acknowledgement at or after `end`.  If none came after `end`, the writes
    never resumed while measured and the gap runs to `end` (a lower bound, as nothing later is
    known)."""
    times = [start]
    for at in sorted(acks):
        if at <= start:
            continue
        times.append(at)
        if at >= end:
            break
    else:
        times.append(end)
    return max(b - a for a, b in zip(times, times[1:]))


def spread(values: Sequence[float], digits: int = 0) -> str:
    """``median (min-max)``, as the rest of docs/performance.md writes a figure."""
    if not values:
        return "-"
    form = f"{{:.{digits}f}}"
    middle = form.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({form.format(min(values))}-{form.format(max(values))})"


_CELL = re.compile(r"^\s*(-?[\d.]+)(?:\s*\((-?[\d.]+)-(-?[\d.]+)\))?\s*$")


def parse_spread(cell: str) -> Optional[tuple[float, float, float]]:
    """(median, min, max) of a ``median (min-max)`` cell; None if it is not one."""
    match = _CELL.match(cell)
    if not match:
        return None
    median = float(match.group(1))
    low = float(match.group(2)) if match.group(2) else median
    high = float(match.group(3)) if match.group(3) else median
    return median, low, high


def table_rows(text: str, begin: str, end: str) -> list[list[str]]:
    """The cells of each body row of the first table between the markers `begin` and `end`
    (header and rule left out); [] if the section is not there."""
    if begin not in text or end not in text:
        return []
    section = text[text.index(begin) : text.index(end)]
    rows: list[list[str]] = []
    seen_rule = False
    for line in section.splitlines():
        if not line.startswith("|"):
            if seen_rule:
                break
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(set(cell) <= {"-", " ", ":"} for cell in cells):
            seen_rule = True
        elif seen_rule:
            rows.append(cells)
    return rows


def replace_section(text: str, begin: str, end: str, section: str) -> str:
    """`text` with what lies between the markers (inclusive) replaced by `section`, which is
    appended if the markers are not there yet."""
    if begin in text and end in text:
        return text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    return text.rstrip("\n") + "\n\n" + section + "\n"
