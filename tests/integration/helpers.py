"""Shared by the container tests: where make install puts things, and how the tests use them."""

from __future__ import annotations

import json
import re
import time

from container import Container

PREFIX = "/opt/qgafreeze"  # /usr is the host's, read-only, inside the container
HOOK = f"{PREFIX}/libexec/qgafreeze/fsfreeze-hook"
CLI = f"{PREFIX}/bin/qgafreeze"
HOOK_LOG = "/var/log/qga-fsfreeze-hook.log"
DATE = r"\w{3} \w{3} [ \d]\d [\d:]{8} \S+ \d{4}"  # as date(1) prints it

# A service that takes a while to stop, like a database flushing its buffers, and notes when
# each stop and start begins and ends (systemd's own timestamps read 0 in this container).
SLOW_STOP = """[Unit]
Description=qgafreeze test app {name}
[Service]
ExecStartPre=/bin/sh -c 'mkdir -p /run/qgft; date +%%s%%N > /run/qgft/%n.start-begin'
ExecStart=/bin/sleep infinity
ExecStartPost=/bin/sh -c 'date +%%s%%N > /run/qgft/%n.start-end'
ExecStop=/bin/sh -c 'date +%%s%%N > /run/qgft/%n.stop-begin; sleep {stop}; \\
  date +%%s%%N > /run/qgft/%n.stop-end'
TimeoutStopSec=60
{extra}
"""


def add_unit(container: Container, name: str, stop: float = 0.5, extra: str = "") -> None:
    container.install_unit(name, SLOW_STOP.format(name=name, stop=stop, extra=extra))


def configure(container: Container, yaml: str, start: tuple[str, ...] = ()) -> None:
    """New config, a restarted daemon, the given units running, an empty hook log."""
    container.write_file("/etc/qgafreeze.yaml", yaml, mode=0o600)
    container.run(["systemctl", "restart", "qgafreeze.service"])
    if start:
        container.run(["systemctl", "start", *start])
    container.run(["truncate", "-s0", HOOK_LOG], check=False)


def hook(container: Container, op: str) -> tuple[int, str]:
    result = container.run([HOOK, op], check=False, timeout=120)
    return result.returncode, result.stdout + result.stderr


def cycle_of(output: str) -> str:
    match = re.search(r"cycle ([0-9a-f]{12})", output)
    assert match, output
    return match.group(1)


def active(container: Container, *units: str) -> list[str]:
    out = container.run(["systemctl", "is-active", *units], check=False).stdout
    return out.split()


def timestamps(container: Container, unit: str) -> dict[str, int]:
    """When the unit's last stop and start began and ended, in nanoseconds."""
    marks = {}
    for mark in ("stop-begin", "stop-end", "start-begin", "start-end"):
        out = container.run(["cat", f"/run/qgft/{unit}.{mark}"], check=False).stdout.strip()
        if out:
            marks[mark] = int(out)
    return marks


def status(container: Container) -> dict:
    """The daemon's live state: ``status --json`` prints the last cycle's report around it."""
    return json.loads(container.run([CLI, "status", "--json"]).stdout)["daemon"]


def hook_log(container: Container) -> str:
    container.run([CLI, "status"])  # the daemon writes the log from a queue; let it drain
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = container.run(["cat", HOOK_LOG], check=False).stdout
        if text.rstrip().endswith("finished with status=0") or "finished with status=1" in text:
            break
        time.sleep(0.1)
    return text
