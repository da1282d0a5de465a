"""Core figures in the real-systemd container: cycle wall times, shim round trip, start-up, RSS.

    sudo /usr/bin/python3 bench/core_figures.py [--runs N]

Each figure is the median and the range over N runs.  The theoretical floor of the three-app
freeze is two 0.5 s stops in a chain (web, then db), 1.0 s; thaw has no start delay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from container import Container  # noqa: E402

PREFIX = "/opt/qgafreeze"
HOOK = f"{PREFIX}/libexec/qgafreeze/fsfreeze-hook"
UNIT = """[Service]
ExecStart=/bin/sleep infinity
ExecStop=/bin/sleep 0.5
"""
THREE_APPS = """version: 1
apps:
  db: {units: [qgft-db]}
  web: {units: [qgft-web], depends_on: [db]}
  cache: {units: [qgft-cache]}
"""


def timed(c: Container, argv: list[str]) -> float:
    # Timed inside the container, so nsenter's own start-up is not counted.
    script = (
        'a=$(date +%s%N); "$@" >/dev/null || exit 1; b=$(date +%s%N); echo $(( (b - a) / 1000 ))'
    )
    out = c.run(["/bin/sh", "-c", script, "sh", *argv]).stdout
    return int(out) / 1000.0  # ms


def rss_kib(c: Container) -> int:
    pid = c.run(
        ["systemctl", "show", "-p", "MainPID", "--value", "qgafreeze.service"]
    ).stdout.strip()
    for line in c.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def summary(values: list[float], unit: str) -> str:
    return (
        f"median {statistics.median(values):.1f} {unit}, range {min(values):.1f}-{max(values):.1f}"
        f" (n={len(values)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    c = Container.boot(REPO)
    try:
        c.run(f"make -C /src install PREFIX={PREFIX}", timeout=180)
        for name in ("qgft-db", "qgft-web", "qgft-cache"):
            c.install_unit(f"{name}.service", UNIT)

        # Start-up: systemctl start returns once the daemon has sent READY=1 (Type=notify).
        starts, ready = [], []
        for _ in range(args.runs):
            c.run(["systemctl", "stop", "qgafreeze.service"])
            c.run(["systemctl", "reset-failed", "qgafreeze.service"])  # StartLimitBurst is 5
            starts.append(timed(c, ["systemctl", "start", "qgafreeze.service"]))
            status = json.loads(c.run([f"{PREFIX}/bin/qgafreeze", "status", "--json"]).stdout)
            ready.append(float(status["daemon"]["ready_after_exec_ms"]))
        rss_idle = rss_kib(c)

        ping = [timed(c, [HOOK, "ping"]) for _ in range(args.runs)]
        empty = []
        for _ in range(args.runs):
            empty.append(timed(c, [HOOK, "freeze"]))
            c.run([HOOK, "thaw"])

        c.write_file("/etc/qgafreeze.yaml", THREE_APPS, 0o600)
        c.run(["systemctl", "restart", "qgafreeze.service"])
        c.run(["systemctl", "start", "qgft-db", "qgft-web", "qgft-cache"])
        freeze, thaw = [], []
        for _ in range(args.runs):
            freeze.append(timed(c, [HOOK, "freeze"]))
            thaw.append(timed(c, [HOOK, "thaw"]))
        rss_after = rss_kib(c)

        print(f"daemon start (systemctl start until READY=1): {summary(starts, 'ms')}")
        print(f"daemon ready after exec (its own clock):       {summary(ready, 'ms')}")
        print(f"shim round trip, ping:                         {summary(ping, 'ms')}")
        print(f"shim freeze with no apps:                      {summary(empty, 'ms')}")
        print(f"freeze, 3 apps (floor 1000 ms):                {summary(freeze, 'ms')}")
        print(f"thaw, 3 apps:                                  {summary(thaw, 'ms')}")
        print(
            f"daemon RSS idle: {rss_idle} KiB; after {2 * args.runs} more cycles: {rss_after} KiB"
        )
    finally:
        c.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
