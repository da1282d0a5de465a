"""`make bench`, Redis part: how long Redis clients wait while a backup's freeze saves millions of
keys, with the redis preset (BGSAVE, awaited) against the stock approach (`redis-cli SAVE` as the
freeze step, what the preset did before), in the real-systemd container with the host's Redis.

One client writes (`SET`) in a loop on one connection, noting when each write was acknowledged;
the figures are the worst write latency and the longest gap between acknowledged writes from the
freeze request to the end of the thaw, next to the freeze's own duration and the frozen window.
Both approaches run in turn on the same dataset, several times; medians (min-max) and the ratio
SAVE / preset from the same run.  Nothing here asserts a speed.  Rewrites the Redis section of
docs/performance.md (after bench/compare.py has rewritten the rest) and docs/performance-redis.png.

    sudo /usr/bin/python3 bench/redis_stall.py [--quick] [--keys N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from container import Container  # noqa: E402

PREFIX = "/opt/qgafreeze"
SHIM = f"{PREFIX}/libexec/qgafreeze/fsfreeze-hook"
DOC = REPO / "docs" / "performance.md"
PLOT = REPO / "docs" / "performance-redis.png"
BEGIN, END = "<!-- bench:redis begin -->", "<!-- bench:redis end -->"
FROZEN = 1.0  # seconds between the freeze's answer and the thaw, as a snapshot would take
UNIT = """[Service]
ExecStartPre=/bin/mkdir -p /var/lib/bench-redis
ExecStart=/usr/bin/redis-server --bind 127.0.0.1 --port 6379 --dir /var/lib/bench-redis \\
  --save "" --appendonly no --enable-debug-command local
"""
APPROACHES = {
    "preset": "    preset: redis\n",
    "SAVE": "    freeze: [{exec: [redis-cli, SAVE]}]\n",
}
CONFIG = """version: 1
settings: {{freeze_timeout: 10m, thaw_timeout: 1m}}
apps:
  cache:
    timeout: 9m
{app}"""
WRITER = """
import json, os, socket, time
s = socket.create_connection(("127.0.0.1", 6379))
acks = []
i = 0
while not os.path.exists("/run/bench-writer.stop"):
    i += 1
    sent = time.monotonic()
    s.sendall(b"SET bench:w %d\\r\\n" % i)
    assert s.recv(64) == b"+OK\\r\\n"
    acks.append((time.time(), time.monotonic() - sent))
    time.sleep(0.005)
print(json.dumps(acks))
"""


@dataclass
class Run:
    freeze: float  # ms from the freeze request to its answer
    worst: float  # ms, the slowest write
    gap: float  # ms, the longest time without an acknowledged write
    writes: int
    series: list[tuple[float, float]]  # (seconds since the request, latency ms) of each write


def run_once(c: Container, approach: str) -> Run:
    c.write_file("/etc/qgafreeze.yaml", CONFIG.format(app=APPROACHES[approach]), mode=0o600)
    c.run(["systemctl", "restart", "qgafreeze.service"])
    c.run("rm -f /run/bench-writer.stop")
    writer = c.popen(["python3", "/root/bench-writer.py"], stdout=-1, text=True)
    time.sleep(1.0)
    asked = time.time()
    c.run([SHIM, "freeze"], timeout=900)
    answered = time.time()
    time.sleep(FROZEN)
    c.run([SHIM, "thaw"], timeout=120)
    thawed = time.time()
    time.sleep(0.5)
    c.run("touch /run/bench-writer.stop")
    acks = json.loads(writer.communicate(timeout=120)[0])
    window = [(at, latency) for at, latency in acks if asked <= at <= thawed + 0.5]
    times = [asked] + [at for at, _ in window] + [thawed]
    return Run(
        freeze=(answered - asked) * 1000,
        worst=max(latency for _, latency in window) * 1000 if window else float("nan"),
        gap=max(b - a for a, b in zip(times, times[1:])) * 1000,
        writes=len(window),
        series=[(at - asked, latency * 1000) for at, latency in window],
    )


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1 million keys, 2 runs each")
    parser.add_argument("--keys", type=int, help="keys in the dataset (default 3 million)")
    args = parser.parse_args()
    keys = args.keys or (1_000_000 if args.quick else 3_000_000)
    runs = 2 if args.quick else 3
    c = Container.boot(REPO)
    results: dict[str, list[Run]] = {name: [] for name in APPROACHES}
    try:
        # /usr is the host's, read-only there: the units go to /etc (as the container tier's).
        c.run(f"make -C /src install PREFIX={PREFIX} UNITDIR=/etc/systemd/system", timeout=300)
        c.install_unit("bench-redis.service", UNIT)
        c.run(["systemctl", "start", "bench-redis.service"])
        deadline = time.monotonic() + 30
        while c.run(["redis-cli", "PING"], check=False).stdout.strip() != "PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer")
            time.sleep(0.2)
        c.run(["redis-cli", "DEBUG", "POPULATE", str(keys), "bench"], timeout=600)
        memory = c.run(["redis-cli", "INFO", "memory"]).stdout
        used = re.search(r"^used_memory_human:(\S+)", memory, re.M)
        version = c.run(["redis-server", "--version"]).stdout.split()[2].split("=")[1]
        c.write_file("/root/bench-writer.py", WRITER)
        for _ in range(runs):  # interleaved, so that drift hits both alike
            for name in APPROACHES:
                result = run_once(c, name)
                results[name].append(result)
                print(
                    f"{name}: freeze {result.freeze:.0f} ms, worst write"
                    f" {result.worst:.0f} ms, longest gap {result.gap:.0f} ms",
                    flush=True,
                )
    finally:
        c.shutdown()
    write_section(results, keys, version, used.group(1) if used else "?", runs, args.quick)
    plot(results, keys)
    return 0


def write_section(
    results: dict[str, list[Run]],
    keys: int,
    version: str,
    memory: str,
    runs: int,
    quick: bool,
) -> None:
    def worst(name: str) -> float:
        return statistics.median(r.worst for r in results[name])

    def freeze(name: str) -> float:
        return statistics.median(r.freeze for r in results[name]) / 1000

    ratio = worst("SAVE") / worst("preset")
    lines = [
        BEGIN,
        "## Redis: how long clients wait while a backup saves the dataset",
        "",
        f"Regenerated by `sudo make bench` (`bench/redis_stall.py`{' --quick' if quick else ''}).",
        f"Redis {version} (the host's) in the container, {keys:,} keys ({memory}), no save"
        " rules, no AOF. One client writes (`SET`) in a loop on one connection, 5 ms apart;",
        "from the freeze request to the end of the thaw we note its worst write latency and the",
        "longest gap between acknowledged writes. *preset*: the `redis` preset (`BGSAVE`,",
        "awaited until it has succeeded). *SAVE*: `redis-cli SAVE` as the freeze step (the stock",
        f"approach, and this preset before). Thaw {FROZEN:g} s after the freeze answered (the",
        "frozen window, which Redis does not see here: nothing of it is held). Times in ms,",
        f"median (min-max) of {runs} runs each, interleaved; ratio = SAVE / preset medians.",
        "",
        "| approach | freeze (the save) | worst write latency | longest gap between acknowledged"
        " writes | writes acknowledged in the window |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in APPROACHES:
        rows = results[name]
        lines.append(
            f"| {name} | {stats([r.freeze for r in rows])} | {stats([r.worst for r in rows])}"
            f" | {stats([r.gap for r in rows])} | {stats([float(r.writes) for r in rows])} |"
        )
    lines += [
        "",
        f"Worst write latency, SAVE / preset: {ratio:.0f}x. With SAVE no client is answered",
        "until the dump is written, so the worst wait is the whole save; with the preset Redis",
        "forks and keeps answering, and what remains is the fork and the machine's own load",
        "(2 cores, shared with the save's child). The freeze itself, which the backup waits",
        f"for, took {freeze('preset'):.1f} s with the preset against {freeze('SAVE'):.1f} s with"
        " SAVE (medians): up to a second",
        "waiting for the server's clock to leave the last save's second, then the save in a",
        "forked child that shares the cores with the parent still serving writes. The file is",
        "complete before the filesystems freeze either way; the app's `timeout` must leave",
        "room for the save (`rdb_last_bgsave_time_sec`).",
        "",
        "![Redis write latency during a backup](performance-redis.png)",
        END,
    ]
    text = DOC.read_text() if DOC.exists() else ""
    section = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def plot(results: dict[str, list[Run]], keys: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(9, 3.6))
    for name, style in (("SAVE", "tab:red"), ("preset", "tab:blue")):
        first = results[name][0]
        axis.plot(
            [t for t, _ in first.series],
            [ms for _, ms in first.series],
            ".",
            markersize=3,
            color=style,
            label=f"{name}: freeze {first.freeze / 1000:.1f} s",
        )
    axis.set_yscale("log")
    axis.set_xlabel("seconds since the freeze request, when the write was acknowledged")
    axis.set_ylabel("write latency (ms)")
    axis.set_title(f"Redis, {keys:,} keys: each write's latency during a backup (first run)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
