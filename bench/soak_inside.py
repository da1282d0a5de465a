"""The soak's cycles, run inside the container (bench/soak.py starts it; standard library only).

    python3 soak_inside.py --cycles N --seed S --hook PATH --out RESULT.json

Each cycle is a freeze and a thaw through the real shim and socket, with MariaDB (preset
`mariadb`, a held session) and a unit-based app declared, under the steady write load of
soak_writer.py.  Some cycles get a fault, drawn with a seeded RNG.  After every cycle it checks
that every app runs, that every write acknowledged before the freeze is in the table, that the
cycle report agrees with systemd and MariaDB, and samples the daemon's fds, threads and RSS.  It
runs here, not through nsenter from the host, because each nsenter costs tens of milliseconds
and a cycle makes about ten checks.  The first failed check ends the run; RESULT.json says why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from traceback import format_exc
from typing import Any

SOCKET = "/run/qgafreeze/qgafreeze.sock"
REPORT = "/run/qgafreeze/report.json"
SERVICE = "qgafreeze.service"
DB_UNIT = "qgft-mariadb.service"
WEB_UNIT = "qgft-soak-web.service"
ACKED = "/run/qgft-soak/acked"
# How long the "snapshot" takes: long enough for the writer (50 inserts/s) to show whether
# writes were really blocked.
HOLD = 0.15
# Kinds of fault, each once per shuffled bag so that every kind comes up in a short run; the
# daemon kills are rarer so that a daemon lives long enough to show a leak.
FAULTS = {
    "kill-daemon-then-thaw": 1,
    "kill-daemon-then-restart": 1,
    "kill-session": 2,
    "start-app-by-hand": 2,
    "stop-app-by-hand": 1,
    "restart-db-by-hand": 2,
    "reload": 3,
    "vanishing-clients": 3,
}


class SoakFailure(Exception):
    pass


def sh(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def sql(query: str) -> str:
    result = sh(["mariadb", "--batch", "--skip-column-names", "-e", query], timeout=30)
    if result.returncode != 0:
        raise SoakFailure(f"MariaDB does not answer {query!r}: {result.stderr.strip()}")
    return result.stdout.strip()


def main_pid() -> int:
    return int(sh(["systemctl", "show", "-p", "MainPID", "--value", SERVICE]).stdout.strip() or 0)


def active(*units: str) -> list[str]:
    return sh(["systemctl", "is-active", *units]).stdout.split()


def ask(op: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(SOCKET)
        sock.sendall(json.dumps({"op": op}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def resources(pid: int) -> dict[str, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "pid": pid,
        "fds": fds,
        "threads": int(fields["Threads"]),
        "rss_kib": int(fields["VmRSS"].split()[0]),
    }


class Acked:
    """The ids the writer has had acknowledged, read as it appends them."""

    def __init__(self, path: str) -> None:
        self._file = open(path, encoding="ascii")  # noqa: SIM115 - open for the whole run
        self._partial = ""
        self.ids: list[int] = []
        self.checked = 0  # ids[:checked] were found in the table already

    def count(self) -> int:
        self._partial += self._file.read()
        *lines, self._partial = self._partial.split("\n")
        self.ids.extend(int(line) for line in lines)
        return len(self.ids)

    def check_upto(self, upto: int) -> bool:
        """Every id acknowledged among the first `upto` is in the table; False when there was
        nothing new to look for."""
        wanted = self.ids[self.checked : upto]
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            where = f"FROM qgft_soak.t WHERE id IN ({','.join(map(str, chunk))})"
            if int(sql(f"SELECT COUNT(*) {where}")) != len(chunk):
                present = set(map(int, sql(f"SELECT id {where}").split()))
                raise SoakFailure(f"acknowledged writes lost: ids {sorted(set(chunk) - present)}")
        self.checked = max(self.checked, upto)
        return bool(wanted)


def session_pids() -> list[int]:
    """Everything in the daemon's cgroup tree but the daemon: while frozen, the held session."""
    group = sh(["systemctl", "show", "-p", "ControlGroup", "--value", SERVICE]).stdout.strip()
    pids: list[int] = []
    for procs in Path(f"/sys/fs/cgroup{group}").rglob("cgroup.procs"):
        try:
            pids.extend(int(p) for p in procs.read_text().split())
        except FileNotFoundError:
            pass  # a command's cgroup, removed as it ended
    return [p for p in pids if p != main_pid()]


def vanish(payloads: list[bytes]) -> None:
    """Clients that connect, maybe send part or all of a harmless request, and go away."""

    def one(payload: bytes) -> None:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(SOCKET)
                if payload:
                    sock.sendall(payload)
        except OSError:
            pass  # busy or refused: that is an answer too

    threads = [threading.Thread(target=one, args=(payload,)) for payload in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wait_for_new_daemon(old: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = main_pid()
        if pid not in (0, old) and active(SERVICE) == ["active"]:
            return
        time.sleep(0.1)
    raise SoakFailure(f"the daemon was not restarted within {timeout:.0f} s of its SIGKILL")


def hook(path: str, op: str) -> tuple[int, str]:
    result = sh([path, op], timeout=240)
    return result.returncode, result.stdout + result.stderr


def reload_daemon() -> None:
    result = sh(["systemctl", "reload", SERVICE])
    if result.returncode != 0:
        raise SoakFailure(f"systemctl reload failed: {result.stderr.strip()}")


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.acked = Acked(ACKED)
        self._bag: list[str] = []

    def draw(self, n: int) -> str | None:
        """The fault of cycle `n`, if any.  The last third of the run kills no daemon, so that
        one daemon lives long enough for its fds, threads and RSS to show a trend."""
        if self.rng.random() >= self.args.fault_rate:
            return None
        # Every kind by default ("all" says the same).
        kinds = list(FAULTS) if self.args.faults in ("", "all") else self.args.faults.split(",")
        if 3 * n > 2 * self.args.cycles:
            kinds = [kind for kind in kinds if not kind.startswith("kill-daemon")]
            self._bag = [kind for kind in self._bag if kind in kinds]
        if not self._bag:
            self._bag = [kind for kind in kinds for _ in range(FAULTS[kind])]
            self.rng.shuffle(self._bag)
        return self._bag.pop()

    def cycle(self, fault: str | None) -> dict[str, Any]:
        """One freeze and thaw with `fault` injected; returns what it measured."""
        rng, hook_path = self.rng, self.args.hook
        where = ""
        if fault == "reload":
            where = rng.choice(["before-freeze", "while-frozen", "after-thaw"])
        elif fault == "vanishing-clients":
            where = rng.choice(["during-freeze", "while-frozen"])
        payloads = [rng.choice(VANISHING) for _ in range(rng.randint(1, 20))]
        if where == "before-freeze":
            reload_daemon()
        started = time.monotonic()
        clients = threading.Thread(target=vanish, args=(payloads,))
        if where == "during-freeze":
            clients.start()
        code, out = hook(hook_path, "freeze")
        if clients.is_alive():
            clients.join()
        if code != 0:
            raise SoakFailure(f"freeze failed (exit {code}):\n{out}")
        match = CYCLE_ID.search(out)
        if not match:
            raise SoakFailure(f"no cycle id in the freeze's output:\n{out}")
        cycle_id = match.group(1)
        at_freeze = self.acked.count()
        if active(WEB_UNIT) != ["inactive"]:
            raise SoakFailure(f"{WEB_UNIT} still runs after a successful freeze")
        if fault and fault.startswith("kill-daemon"):
            old = main_pid()
            os.kill(old, signal.SIGKILL)
            if fault == "kill-daemon-then-restart":
                wait_for_new_daemon(old)
                sh(["systemctl", "restart", SERVICE])
        elif fault == "kill-session":
            pids = session_pids()
            if not pids:
                raise SoakFailure("no held session in the daemon's cgroup while frozen")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # ended with the one before
                    os.kill(pid, signal.SIGKILL)
        elif fault == "start-app-by-hand":
            sh(["systemctl", "start", WEB_UNIT])
        elif fault == "stop-app-by-hand":
            sh(["systemctl", "start", WEB_UNIT])
            sh(["systemctl", "stop", WEB_UNIT])
        elif fault == "restart-db-by-hand":
            sh(["systemctl", "restart", DB_UNIT])
        elif where == "while-frozen" and fault == "reload":
            reload_daemon()  # refused while apps are paused; must change nothing
        elif where == "while-frozen":
            vanish(payloads)
        time.sleep(HOLD)
        at_thaw = self.acked.count()
        thawing = time.monotonic()
        thaw_code, thaw_out = hook(hook_path, "thaw")
        finished = time.monotonic()
        if where == "after-thaw":
            reload_daemon()
        record = {
            "fault": fault,
            "where": where,
            "cycle": cycle_id,
            "seconds": round(finished - started, 4),
            "freeze_seconds": round(thawing - started - HOLD, 4),
            "thaw_code": thaw_code,
            "writes_while_frozen": at_thaw - at_freeze,
        }
        self.check(record, thaw_out)
        return record

    def check(self, record: dict[str, Any], thaw_out: str) -> None:
        """Apps run, acknowledged writes are kept, the report tells the truth."""
        states = active(DB_UNIT, WEB_UNIT)
        if states != ["active", "active"]:
            raise SoakFailure(f"apps not running after the thaw: {states}\n{thaw_out}")
        if not self.acked.check_upto(self.acked.count()):
            sql("SELECT 1")  # no new write to look for: MariaDB must still answer
        status = ask("status")
        if status.get("state") != "thawed" or status.get("paused_apps"):
            raise SoakFailure(f"daemon not idle after the thaw: {status}\n{thaw_out}")
        report = json.loads(Path(REPORT).read_text())
        record["verdict"] = report["verdict"]
        if (report["cycle"], report["phase"]) != (record["cycle"], "thaw"):
            raise SoakFailure(
                f"report is for {report['cycle']}/{report['phase']}, not {record['cycle']}/thaw"
            )
        apps = {app["app"]: app for app in report["apps"]}
        consistent = report["verdict"] == "application-consistent"
        # The shim's exit status is the thaw's "ok".  A thaw that came after the daemon had
        # already resumed everything (its shutdown) succeeds with nothing to do.
        ended_by_request = (report["thaw"] or {}).get("reason") == "request"
        thaw_ok = report["thaw"]["ok"] if ended_by_request else True
        if (record["thaw_code"] == 0) != thaw_ok:
            raise SoakFailure(
                f"thaw exit {record['thaw_code']}, but the report's thaw ok={thaw_ok}:\n"
                f"{json.dumps(report, indent=1)}\n{thaw_out}"
            )
        record["ended_by"] = (report["thaw"] or {}).get("reason")
        if consistent != all(app["quiesced"] for app in apps.values()):
            raise SoakFailure(f"verdict {report['verdict']} disagrees with the apps: {apps}")
        for name, app in apps.items():
            resumed = (app["thaw"] or {}).get("result") in ("ok", "skipped")
            if app["units"] and not resumed:
                raise SoakFailure(f"report: {name}'s thaw {app['thaw']}, but systemd says active")
        lost_lock = record["fault"] in ("kill-session", "restart-db-by-hand") or (
            record["fault"] or ""
        ).startswith("kill-daemon")
        # At most one insert may finish after the freeze returned: the one the lock caught
        # in flight whose ack the writer had not yet written down.
        if apps["db"]["quiesced"] and (lost_lock or record["writes_while_frozen"] > 1):
            raise SoakFailure(
                f"the report says db stayed quiesced (verdict {report['verdict']}), but the fault"
                f" was {record['fault']} and {record['writes_while_frozen']} writes went through"
                f" while frozen: {apps['db']}"
            )
        if not lost_lock and not (consistent and record["thaw_code"] == 0):
            raise SoakFailure(
                f"a cycle with no fault to explain it: thaw exit {record['thaw_code']},"
                f" report:\n{json.dumps(report, indent=1)}\n{thaw_out}"
            )
        record.update(resources(main_pid()))


CYCLE_ID = re.compile(r"cycle ([0-9a-f]{12})")
VANISHING = [b"", b'{"op": "fre', b'{"op": "status"}\n', b"\x00garbage\n", b'{"op":']


def run(args: argparse.Namespace) -> dict[str, Any]:
    Path(ACKED).parent.mkdir(parents=True, exist_ok=True)
    Path(ACKED).write_text("")
    writer = subprocess.Popen(
        ["/usr/bin/python3", str(Path(__file__).with_name("soak_writer.py")), ACKED]
    )
    soak = Soak(args)
    result: dict[str, Any] = {"seed": args.seed, "cycles": [], "failure": None}
    try:
        deadline = time.monotonic() + 30
        while soak.acked.count() < 5:
            if time.monotonic() > deadline or writer.poll() is not None:
                raise SoakFailure("the writer got no insert acknowledged in 30 s")
            time.sleep(0.1)
        began = time.monotonic()
        for n in range(1, args.cycles + 1):
            fault = soak.draw(n)
            try:
                result["cycles"].append(soak.cycle(fault))
            except SoakFailure as exc:
                result["failure"] = {"cycle": n, "fault": fault, "message": str(exc)}
                break
            except Exception:  # a check that could not even be made is a failure too
                result["failure"] = {"cycle": n, "fault": fault, "message": format_exc()}
                break
            if n % args.progress == 0:
                elapsed = time.monotonic() - began
                print(f"soak: {n}/{args.cycles} cycles, {elapsed:.0f} s", flush=True)
    except SoakFailure as exc:
        result["failure"] = {"cycle": 0, "fault": None, "message": str(exc)}
    finally:
        writer.kill()
        writer.wait()
    acked = set(soak.acked.ids[: soak.acked.count()])
    table = set(map(int, sql("SELECT id FROM qgft_soak.t").split()))
    result["acked_writes"] = len(acked)
    result["lost_writes"] = sorted(acked - table)[:20]
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--hook", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--progress", type=int, default=50)
    parser.add_argument("--faults", default="", help="kinds, comma-separated, or all")
    args = parser.parse_args()
    result = run(args)
    Path(args.out).write_text(json.dumps(result))
    return 1 if result["failure"] or result["lost_writes"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
