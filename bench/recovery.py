"""Recovery times of the fault matrix's main rows, in the real-systemd container.

    sudo /usr/bin/python3 bench/recovery.py [--runs N]

Each figure runs from the fault to "every app running again", as systemd reports it, with two
apps whose units take 0.1 s to stop.  Median and range over N runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from container import Container  # noqa: E402

PREFIX = "/opt/qgafreeze"
SHIM = f"{PREFIX}/libexec/qgafreeze/fsfreeze-hook"
UNITS = ("qgft-a.service", "qgft-b.service")
UNIT = "[Service]\nExecStart=/bin/sleep infinity\nExecStop=/bin/sleep 0.1\n"
CONFIG = """version: 1
settings: {{max_frozen: {max_frozen}}}
apps:
  a: {{units: [qgft-a]}}
  b: {{units: [qgft-b], depends_on: [a]}}
"""


def all_running(c: Container) -> bool:
    out = c.run(["systemctl", "is-active", *UNITS], check=False).stdout.split()
    return out == ["active", "active"]


def until_running(c: Container, since: float, limit: float = 60) -> float:
    while not all_running(c):
        if time.monotonic() - since > limit:
            raise RuntimeError("apps not running again")
        time.sleep(0.02)
    return (time.monotonic() - since) * 1000


def configure(c: Container, max_frozen: str) -> None:
    c.write_file("/etc/qgafreeze.yaml", CONFIG.format(max_frozen=max_frozen), mode=0o600)
    c.run(["systemctl", "restart", "qgafreeze.service"])
    c.run(["systemctl", "start", *UNITS])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    c = Container.boot(REPO)
    figures: dict[str, list[float]] = {}
    try:
        c.run(f"make -C /src install PREFIX={PREFIX}", timeout=300)
        for unit in UNITS:
            c.install_unit(unit, UNIT)
        for _ in range(args.runs):
            configure(c, "2s")
            c.run([SHIM, "freeze"])
            start = time.monotonic()
            figures.setdefault("watchdog (max_frozen 2s): freeze done to apps running", []).append(
                until_running(c, start)
            )

            configure(c, "0")
            c.run([SHIM, "freeze"])
            start = time.monotonic()
            c.run(["systemctl", "kill", "-s", "KILL", "qgafreeze.service"])
            while c.run([SHIM, "ping"], check=False).returncode != 0:
                time.sleep(0.05)
            figures.setdefault("SIGKILL to a restarted daemon holding the state", []).append(
                (time.monotonic() - start) * 1000
            )
            c.run([SHIM, "thaw"])

            c.run([SHIM, "freeze"])
            start = time.monotonic()
            c.run(["systemctl", "stop", "qgafreeze.service"])
            figures.setdefault("SIGTERM (systemctl stop) to apps running", []).append(
                until_running(c, start)
            )
            c.run(["systemctl", "start", "qgafreeze.socket"])

            c.run([SHIM, "freeze"])
            start = time.monotonic()
            c.run("touch /run/qga.state.isfrozen && rm /run/qga.state.isfrozen")
            figures.setdefault(
                "qemu-ga flag gone, no thaw hook: to apps running (10 s grace)", []
            ).append(until_running(c, start))
    finally:
        c.shutdown()
    for name, values in figures.items():
        print(
            f"{name}: median {statistics.median(values):.0f} ms,"
            f" range {min(values):.0f}-{max(values):.0f} (n={len(values)})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
