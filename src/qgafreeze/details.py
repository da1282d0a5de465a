"""What a command tells the cycle report about the snapshot: its ``qgafreeze-report KEY JSON``
output lines, which become the app's ``details`` there (a quiesce helper's backup label, the lock
it took).

Only lines under that prefix are taken, never the rest of a command's output (which may show a
password or a row), and each app's details are bounded (``LIMIT`` bytes as JSON): the report is
on tmpfs and read by the host, so a runaway command must not fill either.  Everything stays in
memory: this runs while the disks are frozen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Callable

PREFIX = "qgafreeze-report "
# One app's details, as JSON; a backup label is well under 1 KB.
LIMIT = 65536
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# What a command's report lines may take, together, before the rest are dropped (unread); and
# the line that then says so in their place.
KEPT = 4 * LIMIT
OVERFLOW = PREFIX + "!overflow"


def is_report(line: str) -> bool:
    return line.startswith(PREFIX)


def size(details: dict[str, Any]) -> int:
    return len(json.dumps(details, sort_keys=True).encode())


def collect(
    lines: Iterable[str], details: dict[str, Any], problem: Callable[[str], None], source: str
) -> None:
    """Add each report line of ``lines`` to ``details`` (a later KEY replaces an earlier one);
    a malformed line, or one that would take the details over LIMIT, is left out and named by
    ``problem`` (``source`` says which command printed it)."""
    for line in lines:
        if not is_report(line):
            continue
        if line == OVERFLOW:
            problem(f"{source}: its report lines took over {KEPT} bytes: the rest were ignored")
            continue
        if len(line.encode()) > LIMIT:
            problem(
                f"{source}: report line {line[len(PREFIX):][:64]!r}... ignored: over the limit"
                f" of {LIMIT} bytes"
            )
            continue
        key, _, text = line[len(PREFIX) :].partition(" ")
        if not _KEY.match(key):
            problem(
                f"{source}: report line ignored: its key {key[:64]!r} is not lower-case letters,"
                " digits and _ (at most 64)"
            )
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            problem(f"{source}: report line {key!r} ignored: its value is not JSON ({exc})")
            continue
        bigger = {**details, key: value}
        if size(bigger) > LIMIT:
            problem(
                f"{source}: report line {key!r} ignored: the app's details would take"
                f" {size(bigger)} bytes, over the limit of {LIMIT}"
            )
            continue
        details[key] = value
