"""``qgafreeze``: daemon | check | status | freeze | thaw | install.

Errors are printed as one clear message and mapped to exit statuses by ``errors.exit_status``
(listed by ``--help``); no traceback reaches a user.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from . import __version__, paths
from .actions import build_actions
from .config import load_file
from .errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MEANINGS,
    EXIT_USAGE,
    ConfigError,
    QgafreezeError,
)
from .fields import format_duration
from .model import Config
from .planner import PhasePlan, build_plan
from .protocol import app_line
from .report import empty_document
from .units import NoManager


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qgafreeze",
        description="Quiesce applications around QEMU guest-agent filesystem freezes.",
        epilog=exit_statuses_text(),
    )
    parser.add_argument("--version", action="version", version=f"qgafreeze {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        default=paths.CONFIG,
        help=f"config file (default {paths.CONFIG})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    # -c is accepted after the command too (`qgafreeze check -c FILE`), as people type it.
    config_option = _Parser(add_help=False)
    config_option.add_argument("-c", "--config", default=argparse.SUPPRESS, help="config file")
    sub.add_parser(
        "daemon", parents=[config_option], help="run the daemon (started by qgafreeze.service)"
    )
    sub.add_parser(
        "check",
        parents=[config_option],
        help="validate the config and print the freeze and thaw plan",
    )
    for name, text in (
        ("status", "show the daemon's state and its last cycle"),
        ("freeze", "quiesce every app now, as qemu-ga's freeze hook would"),
        ("thaw", "resume every paused app now, as qemu-ga's thaw hook would"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument(
            "--socket", help="daemon socket (default $QGAFREEZE_SOCKET or the standard path)"
        )
        command.add_argument("--json", action="store_true", help="print the daemon's raw reply")
    install = sub.add_parser(
        "install", help="make qemu-ga run the qgafreeze hook (used by make install)"
    )
    install.add_argument("--hook", required=True, help="path of the installed fsfreeze-hook shim")
    install.add_argument("--root", default="/", help="root of the system to configure (default /)")
    install.add_argument(
        "--remove", action="store_true", help="undo: stop qemu-ga from running the shim"
    )
    return parser


def exit_statuses_text() -> str:
    """``exit statuses: 0 success, 1 failure, ...``: the one table, as --help and README say it."""
    return "exit statuses: " + ", ".join(f"{code} {meaning}" for code, meaning in EXIT_MEANINGS)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = _run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return status
    except ConfigError as exc:
        print(f"qgafreeze: {exc}", file=sys.stderr)
        return exc.exit_code
    except QgafreezeError as exc:
        print(f"qgafreeze: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `qgafreeze check | head`: the reader left.  Point stdout at /dev/null so that the
        # interpreter's final flush does not print a traceback either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    if args.command == "daemon":
        from .daemon import run  # only the daemon needs pydbus and the systemd bindings

        status = run(args.config)
        # Every app is resumed and every log line written by now: leave at once.  Interpreter
        # finalization, with the D-Bus main loop's thread still inside GLib, was seen to hang a
        # stopped daemon for minutes (systemd then waited out the whole extended stop timeout
        # and a restart with it), and there is nothing left for it to do.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if args.command == "check":
        return _check(args.config)
    if args.command == "install":
        return _install(args)
    return _client(args.command, args.socket, args.json)


def _check(path: str) -> int:
    config = load_file(path)
    plan = build_plan(config)
    print(render_plan(config, plan.freeze, plan.thaw))
    return 0


def render_plan(config: Config, freeze: PhasePlan, thaw: PhasePlan) -> str:
    s = config.settings
    lines = [
        f"{config.source}: valid, {len(config.apps)} app(s)",
        f"settings: freeze_timeout {format_duration(s.freeze_timeout)}, thaw_timeout"
        f" {format_duration(s.thaw_timeout)}, max_frozen "
        + (format_duration(s.max_frozen) if s.max_frozen else "off (no watchdog)"),
        f"          hook_log {s.hook_log or 'off'}",
        *(f"warning: {warning}" for warning in config.warnings),
    ]
    if not config.apps:
        lines.append("no apps: a freeze only writes the logs")
    intro = {
        "freeze": "freeze: users before what they use; each app starts once its waits are done",
        "thaw": "thaw: the reverse; only apps the freeze paused, only units that were running",
    }
    for phase in (freeze, thaw):
        lines.append("")
        lines.append(intro[phase.name])
        for number, step in enumerate(phase.steps, 1):
            lines.append(f"  step {number}" + (", in parallel:" if len(step) > 1 else ":"))
            for name in step:
                waits = phase.predecessors(name)
                lines.append(f"    {name}" + (f"  (waits for {', '.join(waits)})" if waits else ""))
    lines.append("")
    lines.append("apps (what each does on freeze, in order; thaw undoes it in reverse):")
    actions = build_actions(config.apps, NoManager(), config.settings.legacy_hook_timeout)
    for app in config.apps:
        preset = f", preset {app.preset}" if app.preset else ""
        lines.append(
            f"  {app.name}: timeout {format_duration(app.timeout)}, on failure"
            f" {app.on_failure}{preset}"
        )
        for number, line in enumerate(actions[app.name].describe(), 1):
            lines.append(f"    {number}. {line}")
    return "\n".join(lines)


def _install(args: argparse.Namespace) -> int:
    from .install import configure_qemu_ga, unconfigure_qemu_ga

    action = unconfigure_qemu_ga if args.remove else configure_qemu_ga
    for line in action(args.hook, root=args.root):
        print(f"qgafreeze: {line}")
    return 0


def _client(op: str, socket: str | None, raw: bool) -> int:
    from .shim import reply_status, request, socket_path, summarize

    reply = request(op, socket_path(socket))
    if raw and op == "status" and reply.get("ok"):
        print(json.dumps(status_document(reply), indent=2, sort_keys=True))
    elif raw:
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif op == "status":
        print(render_status(reply))
    else:
        summarize(reply, sys.stdout)
    return reply_status(reply)


def status_document(reply: dict[str, Any]) -> dict[str, Any]:
    """``status --json``: the last cycle's report (the document the daemon wrote, which the
    schema describes), with the daemon's live state, the rest of its reply, under ``daemon``."""
    daemon = dict(reply)
    document = daemon.pop("report", None) or empty_document()
    return {**document, "daemon": daemon}


def _leftovers(reply: dict[str, Any]) -> str:
    """Paused apps while thawed were left by an earlier cycle's failed rollback or thaw."""
    if reply.get("state") != "thawed" or not reply.get("paused_apps"):
        return ""
    retry = reply.get("retry_in_s")
    when = f"retried in {retry:g} s" if isinstance(retry, (int, float)) else "retried by a thaw"
    return f" (left by an earlier cycle; {when}, and before the next freeze)"


def render_status(reply: dict[str, Any]) -> str:
    if not reply.get("ok"):
        error = reply.get("error") or {}
        return f"qgafreeze: status failed [{error.get('code')}]: {error.get('message')}"
    lines = [
        f"state: {reply.get('state')}"
        + (f" (cycle {reply['cycle']})" if reply.get("cycle") else ""),
        f"paused apps: {', '.join(reply.get('paused_apps') or []) or 'none'}" + _leftovers(reply),
        f"apps configured: {', '.join(reply.get('apps') or []) or 'none'}",
        f"daemon: pid {reply.get('pid')}, version {reply.get('version')},"
        f" up {reply.get('uptime_s')} s, config {reply.get('config')}",
    ]
    if reply.get("hook_log_error"):
        lines.append(f"hook log: {reply['hook_log_error']}")
    last = reply.get("last")
    if last:
        result = "ok" if last.get("ok") else f"FAILED: {last.get('error')}"
        lines.append(
            f"last cycle: {last.get('op')} {result} in {last.get('duration_ms')} ms"
            f" (cycle {last.get('cycle')}, {last.get('reason')})"
        )
        for app in last.get("apps") or []:
            lines.append(f"  {app_line(app)}")
    else:
        lines.append("last cycle: none since the daemon started")
    doc = reply.get("report")
    if doc:  # kept across daemon restarts, unlike "last"
        lines.append(f"snapshot of cycle {doc.get('cycle')}: {doc.get('verdict')}")
        lines.extend(f"  {reason}" for reason in doc.get("verdict_reasons") or [])
        disks = doc.get("filesystems_thawed")
        if disks:
            lines.append(
                f"  the watchdog thawed {disks.get('count')} filesystem(s) at {disks.get('at')}:"
                " a snapshot taken after that is not consistent"
            )
            lines.extend(f"  could not thaw {error}" for error in disks.get("errors") or [])
    return "\n".join(lines)
