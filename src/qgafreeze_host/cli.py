"""qgafreeze-host: a backup service's side of qgafreeze, run on the hypervisor.

It reaches a guest's qemu-ga through the host end of its channel, freezes, runs the snapshot
command, always thaws, then reads the guest's cycle report (``/run/qgafreeze/report.json``)
through ``guest-file-open``/``-read`` and says, in its exit status, what the snapshot is worth.
Every string the guest wrote is printed with its control characters escaped.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, NoReturn, Optional, TextIO

from .agent import Agent, AgentError, Document, Unreachable, printable

# The guest's paths.REPORT_FILE; this file may not import it (a unit test keeps them equal).
REPORT_FILE = "/run/qgafreeze/report.json"


class Exit(enum.IntEnum):
    """What the snapshot is worth, as the exit status says it."""

    APPLICATION_CONSISTENT = 0
    CRASH_CONSISTENT = 1
    FAILED = 2
    UNREACHABLE = 3
    UNKNOWN = 4
    USAGE = 64


# The one table of exit statuses: --help prints it, README.md and docs/host.md repeat it (tested).
EXIT_TABLE = (
    (Exit.APPLICATION_CONSISTENT, "application-consistent: every declared app was quiesced"),
    (Exit.CRASH_CONSISTENT, "crash-consistent: the snapshot was taken, not every app quiesced"),
    (Exit.FAILED, "failed: the freeze or the snapshot command failed; no snapshot to keep"),
    (Exit.UNREACHABLE, "unreachable: qemu-ga did not answer in time (the guest may be frozen)"),
    (Exit.UNKNOWN, "unknown: no report of this freeze (missing, stale or unreadable)"),
    (Exit.USAGE, "usage"),
)
VERDICT_EXIT = {
    "application-consistent": Exit.APPLICATION_CONSISTENT,
    "crash-consistent": Exit.CRASH_CONSISTENT,
    "failed": Exit.FAILED,
}

DEFAULT_TIMEOUT = 300.0  # freeze, thaw and snapshot command, each
HOLD_SECONDS = 1.0  # how long the guest stays frozen when there is no snapshot command


def read_report(agent: Agent) -> tuple[Optional[Document], str]:
    """The guest's last cycle report, or None and why there is none."""
    try:
        doc = json.loads(agent.read_file(REPORT_FILE))
    except AgentError as exc:
        return None, (
            f"no qgafreeze report in the guest ({printable(exc.desc)}): is qgafreeze installed"
            " there, and does its qemu-ga allow guest-file-open and guest-file-read?"
        )
    except (ValueError, RecursionError):
        return None, f"the guest's {REPORT_FILE} is not JSON"
    if (
        not isinstance(doc, dict)
        or doc.get("version") != 1
        or not isinstance(doc.get("apps"), list)
    ):
        return None, f"the guest's {REPORT_FILE} is not a qgafreeze report of version 1"
    return doc, ""


def _phase(result: Any) -> str:
    if not isinstance(result, dict):
        return ""
    text = f"{result.get('phase')} {result.get('result')} in {result.get('duration_ms')} ms"
    return text + (f" ({result['message']})" if result.get("message") else "")


def render(doc: Document, out: TextIO) -> None:
    """One line for the snapshot, one per app: its phases, and what its quiescing guaranteed or
    why it was not quiesced."""
    freeze = doc.get("freeze") if isinstance(doc.get("freeze"), dict) else {}
    head = f"qgafreeze-host: {doc.get('verdict')} (cycle {doc.get('cycle')}"
    head += f", freeze {freeze.get('duration_ms')} ms)" if freeze else ")"
    if doc.get("verdict") == "failed":
        head += ": " + "; ".join(str(r) for r in doc.get("verdict_reasons") or [])
    print(printable(head), file=out)
    for app in doc.get("apps") or []:
        if not isinstance(app, dict):
            continue
        phases = ", ".join(p for p in (_phase(app.get("freeze")), _phase(app.get("thaw"))) if p)
        worth = app.get("guarantee") if app.get("quiesced") else app.get("note")
        print("  " + printable(f"{app.get('app')}: {phases or 'no record'}: {worth}"), file=out)
        details = app.get("details")
        if isinstance(details, dict) and details:
            # Named only: a backup label is many lines; --json prints them whole.
            keys = ", ".join(str(key) for key in details)
            print("    " + printable(f"details (in --json): {keys}"), file=out)
    if doc.get("phase") == "freeze":
        print("qgafreeze-host: the guest has not recorded a thaw of this cycle yet", file=out)


def judge(doc: Optional[Document], before: Optional[Document], why_none: str) -> tuple[int, str]:
    """The exit status for the report read after a successful freeze and thaw, and what to say
    when it is not this freeze's (``before``: the report read before freezing)."""
    if doc is None:
        return Exit.UNKNOWN, why_none
    if before is not None and doc.get("cycle") == before.get("cycle"):
        return Exit.UNKNOWN, (
            f"the guest's report is still that of cycle {printable(doc.get('cycle'))}, from before"
            " this freeze: its hook did not reach qgafreeze (see the guest's hook log)"
        )
    return VERDICT_EXIT.get(str(doc.get("verdict")), Exit.UNKNOWN), ""


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP while the guest may be frozen: go on to the thaw."""


def _interrupt(signum: int, frame: object) -> NoReturn:
    _handle_signals(signal.SIG_IGN)  # nothing may stop the thaw that follows
    raise Interrupted(signal.Signals(signum).name)


def run_snapshot(argv: list[str], timeout: float) -> str:
    """Runs the snapshot command (no shell), its output on our stderr; why it failed, or ""."""
    try:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), start_new_session=True
        )
    except OSError as exc:
        return f"cannot run {shlex.join(argv)}: {exc.strerror or exc}"
    try:
        status = child.wait(timeout)
    except subprocess.TimeoutExpired:
        return f"{shlex.join(argv)} did not end in {timeout:g} s (killed)"
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)  # with whatever it started
            child.wait()
    return f"{shlex.join(argv)} exited with status {status}" if status else ""


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _handle_signals(handler: Any) -> None:
    for sig in SIGNALS:
        signal.signal(sig, handler)


def freeze_and_snapshot(
    agent: Agent, snapshot: Callable[[], str], timeout: float
) -> tuple[int, str]:
    """The freeze and the snapshot command: (exit status, why) if either failed, else (0, "")."""
    try:
        _handle_signals(_interrupt)
        frozen = agent.call("guest-fsfreeze-freeze", timeout=timeout)
        print(f"qgafreeze-host: {printable(frozen)} filesystem(s) frozen", file=sys.stderr)
        failure = snapshot()
        return (Exit.FAILED, failure) if failure else (0, "")
    except AgentError as exc:
        # qemu-ga 9.1+: "child process has failed to execute fsfreeze hook: <output>", whose
        # first line is qgafreeze's, naming each failed app; older ones give only the status.
        first, *more = exc.desc.splitlines() or [""]
        tail = f" (+{len(more)} more lines)" if more else ""
        return Exit.FAILED, f"qemu-ga refused the freeze: {first}{tail}"
    except Unreachable as exc:
        return Exit.UNREACHABLE, f"no answer to the freeze: {exc}"
    except Interrupted as exc:
        return Exit.FAILED, f"interrupted by {exc}"
    finally:
        _handle_signals(signal.SIG_IGN)  # nothing may stop the thaw that follows


def thaw(agent: Agent, timeout: float) -> tuple[int, str]:
    """Sent whatever came before, as Proxmox does: a freeze that failed or went unanswered may
    have frozen something.  (Exit.UNREACHABLE, why) when unanswered; (0, why) for an error."""
    try:
        thawed = agent.call("guest-fsfreeze-thaw", timeout=timeout)
    except Unreachable as exc:
        return Exit.UNREACHABLE, f"no answer to the thaw: the guest may still be frozen ({exc})"
    except AgentError as exc:
        # A failed thaw hook: qemu-ga has thawed the disks, but some app may not have resumed.
        return 0, f"the thaw reported an error (the disks are thawed): {exc.desc}"
    return 0, "" if isinstance(thawed, int) else f"unexpected answer to the thaw: {thawed!r:.80}"


def backup(
    agent: Agent, snapshot: Callable[[], str], timeout: float, out: TextIO, as_json: bool
) -> int:
    agent.sync(agent.reply_timeout)
    before, _ = read_report(agent)
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        status, failure = freeze_and_snapshot(agent, snapshot, timeout)
    finally:
        thaw_status, thaw_problem = thaw(agent, timeout)
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    doc, why_none = read_report(agent)
    ours = doc is not None and (before is None or doc.get("cycle") != before.get("cycle"))
    problem = failure
    if not failure:
        status, problem = judge(doc, before, why_none)
    for line in (problem, thaw_problem):
        if line:
            print(f"qgafreeze-host: {printable(line)}", file=sys.stderr)
    if as_json:
        print(json.dumps(doc if ours else None, indent=1, sort_keys=True), file=out)
    elif ours and doc is not None:
        render(doc, out)
    return thaw_status or status


def report(agent: Agent, as_json: bool) -> int:
    doc, why_none = read_report(agent)
    if as_json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    if doc is None or doc.get("cycle") is None:
        why = why_none or "the guest has had no freeze since it booted"
        print(f"qgafreeze-host: {why}", file=sys.stderr)
        return Exit.UNKNOWN
    if not as_json:
        render(doc, sys.stdout)
    return VERDICT_EXIT.get(str(doc.get("verdict")), Exit.UNKNOWN)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(Exit.USAGE, f"{self.prog}: {message}\n")


def exit_statuses_text() -> str:
    return "exit statuses:\n" + "\n".join(
        f"  {int(code):<3} {meaning}" for code, meaning in EXIT_TABLE
    )


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="qgafreeze-host",
        description="Freeze a guest through qemu-ga, snapshot it, thaw it, and read what qgafreeze"
        " in the guest says the snapshot is worth.",
        epilog=exit_statuses_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    backup_cmd = commands.add_parser(
        "backup",
        help="freeze, snapshot, always thaw, read the report",
        epilog=exit_statuses_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    backup_cmd.add_argument(
        "--snapshot-cmd",
        metavar="CMD",
        help="run while frozen, split as a shell"
        " would but run without one (write sh -c '...' for a shell); default: wait 1 s",
    )
    backup_cmd.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="the longest wait for the freeze, the thaw and the snapshot command, each"
        f" (default {DEFAULT_TIMEOUT:g})",
    )
    report_cmd = commands.add_parser(
        "report",
        help="read the last report, without freezing",
        epilog=exit_statuses_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for sub in (backup_cmd, report_cmd):
        sub.add_argument(
            "--qga-socket", required=True, metavar="PATH", help="the host end of qemu-ga's channel"
        )
        sub.add_argument(
            "--json", action="store_true", help="print the report as JSON (null if none)"
        )
    return top


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    command: list[str] = []
    if args.command == "backup":
        try:
            command = shlex.split(args.snapshot_cmd or "")
        except ValueError as exc:  # an unclosed quote
            print(f"qgafreeze-host: --snapshot-cmd: {exc}", file=sys.stderr)
            return Exit.USAGE
        if not args.timeout > 0:
            print("qgafreeze-host: --timeout must be a positive number of seconds", file=sys.stderr)
            return Exit.USAGE

    def snapshot() -> str:
        if command:
            return run_snapshot(command, args.timeout)
        time.sleep(HOLD_SECONDS)
        return ""

    agent = Agent(args.qga_socket)
    try:
        if args.command == "report":
            agent.sync(agent.reply_timeout)
            return report(agent, args.json)
        return backup(agent, snapshot, args.timeout, sys.stdout, args.json)
    except Unreachable as exc:
        print(f"qgafreeze-host: {printable(exc)}", file=sys.stderr)
        return Exit.UNREACHABLE
    except KeyboardInterrupt:  # before the freeze, or after the thaw
        return Exit.FAILED
    except Exception as exc:  # a bug: said in one line, never as a traceback
        print(f"qgafreeze-host: internal error: {printable(repr(exc))}", file=sys.stderr)
        return Exit.FAILED
    finally:
        agent.close()


if __name__ == "__main__":
    raise SystemExit(main())
