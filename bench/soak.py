"""Soak: many freeze/thaw cycles under write load, with faults, in the real-systemd container.

    sudo make soak                      # 1000 cycles
    sudo make soak SOAK_CYCLES=200 SOAK_SEED=42

MariaDB (preset `mariadb`) and a unit-based app are declared; bench/soak_writer.py inserts rows
all along; bench/soak_inside.py drives the cycles and checks each one (its docstring says what).
This script boots the container, installs qgafreeze as the README says, sets the apps up, runs
the cycles and prints the figures docs/reliability.md quotes.  The seed is printed first: the same
seed draws the same faults in the same cycles.  tests/integration/test_soak.py runs a shorter soak
through the same functions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from container import Container  # noqa: E402
from soak_inside import HOLD  # noqa: E402

PREFIX = "/opt/qgafreeze"  # /usr is the host's, read-only, inside the container
HOOK = f"{PREFIX}/libexec/qgafreeze/fsfreeze-hook"
RESULT = "/run/qgft-soak/result.json"

MARIADB_UNIT = """[Service]
Type=notify
User=mysql
ExecStart=/usr/sbin/mariadbd --no-defaults --datadir=/var/lib/mysql \\
  --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid --skip-networking
"""
WEB_UNIT = "[Service]\nExecStart=/bin/sleep infinity\n"
CONFIG = """version: 1
settings: {freeze_timeout: 30s, thaw_timeout: 30s, max_frozen: 120s}
apps:
  db: {preset: mariadb, timeout: 20s}
  web: {units: [qgft-soak-web], depends_on: [db]}
"""
# A SIGKILLed daemon is restarted by systemd; the soak kills it dozens of times, and systemd's
# default start limit (5 in 10 s) is about crash loops, not about what the soak checks.
NO_START_LIMIT = "[Unit]\nStartLimitIntervalSec=0\n"


def prepare(c: Container) -> None:
    """MariaDB with an empty qgft_soak.t, the web unit, the soak's config; on an installed
    container, whatever an earlier test left there (MariaDB's data directory is reused)."""
    c.run(
        "(getent group mysql >/dev/null || groupadd -r mysql) &&"
        " (id mysql >/dev/null 2>&1 || useradd -r -g mysql -M -d /var/lib/mysql -s /bin/sh mysql)"
        " && mkdir -p /var/lib/mysql /run/mysqld && chown mysql:mysql /var/lib/mysql /run/mysqld"
        " && { test -d /var/lib/mysql/mysql || mariadb-install-db --no-defaults --user=mysql"
        " --datadir=/var/lib/mysql --auth-root-authentication-method=socket --skip-test-db"
        " --force >/dev/null; }",
        timeout=180,
    )
    c.install_unit("qgft-mariadb.service", MARIADB_UNIT)
    c.install_unit("qgft-soak-web.service", WEB_UNIT)
    c.write_file("/run/systemd/system/qgafreeze.service.d/soak.conf", NO_START_LIMIT)
    c.run(["systemctl", "daemon-reload"])
    c.run(["systemctl", "start", "qgft-mariadb.service", "qgft-soak-web.service"], timeout=120)
    c.run(
        "mariadb -e 'CREATE DATABASE IF NOT EXISTS qgft_soak;"
        " DROP TABLE IF EXISTS qgft_soak.t;"
        " CREATE TABLE qgft_soak.t (id INT PRIMARY KEY) ENGINE=InnoDB'"
    )
    c.write_file("/etc/qgafreeze.yaml", CONFIG, mode=0o600)
    c.run(["systemctl", "restart", "qgafreeze.service"])


def cleanup(c: Container) -> None:
    """Leave the container as prepare() found it, but for MariaDB's data directory."""
    c.run([HOOK, "thaw"], check=False, timeout=240)
    c.run(["systemctl", "stop", "qgft-soak-web.service", "qgft-mariadb.service"], check=False)
    c.run(["rm", "-rf", "/run/systemd/system/qgafreeze.service.d/soak.conf"], check=False)
    c.run(["systemctl", "daemon-reload"], check=False)
    c.write_file("/etc/qgafreeze.yaml", "version: 1\napps: {}\n", mode=0o600)
    c.run(["systemctl", "restart", "qgafreeze.service"], check=False)


def run(
    c: Container, cycles: int, seed: int, progress: int = 50, faults: str = ""
) -> dict[str, Any]:
    """The cycles, driven inside; their progress goes to our stdout, their result is returned."""
    driver = c.popen(
        [
            "/usr/bin/python3", "/src/bench/soak_inside.py", f"--cycles={cycles}",
            f"--seed={seed}", f"--hook={HOOK}", f"--out={RESULT}", f"--progress={progress}",
            *([f"--faults={faults}"] if faults else []),
        ]
    )
    driver.wait()
    return json.loads(c.run(["cat", RESULT]).stdout)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _slope(values: list[int]) -> float:
    """Least-squares change per cycle."""
    if len(values) < 2:
        return 0.0
    xs = range(len(values))
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(values)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values))
    return num / sum((x - mean_x) ** 2 for x in xs)


def resource_trend(cycles: list[dict[str, Any]], warmup: int = 10) -> dict[str, Any]:
    """The longest-lived daemon's fds, threads and RSS: first tenth against last tenth of its
    cycles (after `warmup`, while Python's allocator settles), and the slope over all of them."""
    lives: dict[int, list[dict[str, Any]]] = {}
    for record in cycles:
        if "pid" in record:
            lives.setdefault(record["pid"], []).append(record)
    if not lives:
        return {}
    samples = max(lives.values(), key=len)
    samples = samples[warmup:] if len(samples) > 2 * warmup else samples
    tenth = max(1, len(samples) // 10)
    trend: dict[str, Any] = {
        "pid": samples[0]["pid"], "cycles": len(samples), "daemons": len(lives)
    }
    for key in ("fds", "threads", "rss_kib"):
        series = [r[key] for r in samples]
        quarter = max(1, len(series) // 4)
        trend[key] = {
            "first": max(series[:tenth]),
            "last": max(series[-tenth:]),
            "per_1000_cycles": round(_slope(series) * 1000, 1),
            # Whether a rise levels off (an allocator warming up) or goes on (a leak).
            "quarters": [
                int(statistics.median(series[i : i + quarter]))
                for i in range(0, quarter * 4, quarter)
            ],
        }
    return trend


def flat(trend: dict[str, Any]) -> list[str]:
    """What grew more than noise allows: a few fds or threads (a cycle in flight, a log writer
    thread), RSS by 8 MiB or 10 %."""
    grew = []
    for key, allowed in (("fds", 3), ("threads", 2)):
        if trend[key]["last"] > trend[key]["first"] + allowed:
            grew.append(f"{key} {trend[key]['first']} -> {trend[key]['last']}")
    rss = trend["rss_kib"]
    if rss["last"] > max(rss["first"] * 1.10, rss["first"] + 8192):
        grew.append(f"RSS {rss['first']} -> {rss['last']} KiB")
    return grew


def figures(result: dict[str, Any]) -> str:
    cycles = result["cycles"]
    times = [r["seconds"] for r in cycles] or [0.0]
    faults = Counter(r["fault"] for r in cycles if r["fault"])
    lines = [
        f"seed {result['seed']}: {len(cycles)} cycles completed, "
        f"{sum(faults.values())} with a fault",
        "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())),
        f"cycle time (freeze + {HOLD:.2f} s hold + thaw): p50 {_percentile(times, 0.5):.3f} s,"
        f" p95 {_percentile(times, 0.95):.3f} s, max {max(times):.3f} s",
        f"writes acknowledged {result['acked_writes']}, lost {len(result['lost_writes'])}",
        "verdicts: " + ", ".join(
            f"{k} {v}" for k, v in sorted(Counter(r.get("verdict") for r in cycles).items())
        ),
    ]
    trend = resource_trend(cycles)
    if trend:
        lines.append(
            f"daemon pid {trend['pid']} over {trend['cycles']} cycles ({trend['daemons']} daemons"
            " in all), first tenth -> last tenth (max), slope per 1000 cycles:"
        )
        for key in ("fds", "threads", "rss_kib"):
            t = trend[key]
            lines.append(
                f"  {key}: {t['first']} -> {t['last']}, {t['per_1000_cycles']:+};"
                f" median by quarter {', '.join(map(str, t['quarters']))}"
            )
    if result["failure"]:
        f = result["failure"]
        lines.append(f"FAILED at cycle {f['cycle']} (fault {f['fault']}): {f['message']}")
    return "\n".join(lines)


def main() -> int:
    cycles = int(os.environ.get("SOAK_CYCLES") or 1000)
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"soak: {cycles} cycles, seed {seed} (SOAK_SEED={seed} repeats them)", flush=True)
    started = time.monotonic()
    # Killed, still power the container off (the finally below) instead of leaving it running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    c = Container.boot(REPO)
    try:
        c.run(f"make -C /src install PREFIX={PREFIX} UNITDIR=/etc/systemd/system", timeout=300)
        prepare(c)
        result = run(c, cycles, seed, faults=os.environ.get("SOAK_FAULTS", ""))
    finally:
        c.shutdown()
    # Every cycle's record, for a closer look than the figures give.
    saved = Path(os.environ.get("SOAK_RESULT") or f"/tmp/qgafreeze-soak-{seed}.json")
    saved.write_text(json.dumps(result))
    print(figures(result))
    print(f"soak: every cycle's record is in {saved}")
    grew = flat(resource_trend(result["cycles"])) if result["cycles"] else []
    if grew:
        print("NOT FLAT: " + "; ".join(grew))
    print(f"soak: {time.monotonic() - started:.0f} s in all")
    return 1 if result["failure"] or result["lost_writes"] or grew else 0


if __name__ == "__main__":
    raise SystemExit(main())
