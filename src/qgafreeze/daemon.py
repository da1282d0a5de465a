"""The composition root: builds the daemon's objects, serves requests, handles signals.

Everything the control path will need is imported here, at start-up: between freeze and thaw an
import would read (and, without ``dont_write_bytecode``, write) files on a frozen disk.  An audit
hook counts any import that still happens while a cycle is running; ``status`` reports the count.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from . import __version__, protocol
from .actions import build_actions
from .agentwatch import AgentFlagWatch
from .config import load_file, parse_config
from .engine import ABANDON_GRACE, FROZEN, THAWED, CycleReport, Engine
from .errors import Busy, ConfigError, QgafreezeError
from .fsthaw import thaw_all
from .logs import PRIORITY_ERR, PRIORITY_INFO, PRIORITY_WARNING, LogWriter, default_journal_send
from .model import Config
from .planner import build_plan
from .report import ReportFile
from .server import Peer, Send, Server, activated_listener, bind_listener, notify
from .shim import socket_path
from .state import StateFile
from .systemd_manager import SystemdManager
from .trust import resolve_group
from .units import UnitManager

# Bounded wait for the hook log to reach the disk before we tell qemu-ga to freeze it.
FLUSH_BEFORE_FREEZE = 1.0
# Asked of systemd on top of the cycle deadlines when stopping: the log flush and exit.
SHUTDOWN_MARGIN = 10.0
# What each signal asks of the daemon; qgafreeze(8)'s SIGNALS section is checked against it.
SIGNALS = {signal.SIGTERM: "stop", signal.SIGINT: "stop", signal.SIGHUP: "reload"}


def report_reply(report: CycleReport) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "ok": report.ok,
        "op": report.op,
        "cycle": report.cycle,
        "reason": report.reason,
        "state": report.state,
        "duration_ms": report.duration_ms,
        "apps": [o.to_dict() for o in report.apps],
        "rollback": [o.to_dict() for o in report.rollback],
    }
    if report.note:
        reply["note"] = report.note
    if report.error is not None:
        reply["error"] = {"code": report.error.code, "message": report.error.message}
    return reply


class ImportGuard:
    """sys.addaudithook callback: counts module imports made while a cycle is running."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.count = 0
        self.last = ""

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "import" and self.engine is not None and self.engine.state != THAWED:
            self.count += 1
            self.last = str(args[0])


class Daemon:
    def __init__(
        self,
        config_path: str,
        engine: Engine,
        log: LogWriter,
        manager: UnitManager,
        guard: ImportGuard,
        started: float,
        config_error: ConfigError | None = None,
    ) -> None:
        self._config_path = config_path
        self.engine = engine
        self._log = log
        self._manager = manager
        self._guard = guard
        self._stop = False
        self._reload = False
        self._started = started
        self._ready_ms = -1
        # Set when the config could not be used at start-up: we still serve, so that qemu-ga's
        # hook gets this explanation at once instead of a socket that never answers.
        self._config_error = config_error
        # One inotify instance and reader thread for the daemon's life, re-pointed on reload.
        self._watcher: AgentFlagWatch | None = None
        self._watching = False  # False: agent_state_file is null, or the watcher failed
        self.server: Server | None = None  # set once built; reload updates who may ask

    def watch_agent(self, path: str | None) -> None:
        """Watch qemu-ga's frozen flag at ``path`` (None: stop watching); only between cycles."""
        self._watching = False
        if self._watcher is not None:
            self._watcher.disarm()
        if path is None:
            return
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            self._log.daemon_event(
                f"settings.agent_state_file: {directory} does not exist: until it does, a freeze"
                " of zero filesystems goes unnoticed (is qemu-ga's state directory elsewhere?)",
                PRIORITY_WARNING,
            )
        if self._watcher is not None:
            self._watcher.retarget(path)
        else:
            try:
                self._watcher = AgentFlagWatch(path, self.agent_left_frozen_state)
            except OSError as exc:  # out of inotify instances: a safety net less, not a failure
                self._log.problem(f"qemu-ga's frozen flag is not watched: {exc.strerror or exc}")
                return
        self._watching = True

    # -- requests ------------------------------------------------------------------------------

    def __call__(self, request: dict[str, Any], peer: Peer, send: Send) -> dict[str, Any]:
        op = request["op"]
        engine = self.engine
        if op == "ping":
            return {"ok": True, "op": op, "state": engine.state, "version": __version__}
        if op == "status":
            return {
                "ok": True,
                "op": op,
                **engine.status(),
                "version": __version__,
                "pid": os.getpid(),
                "config": self._config_path,
                "uptime_s": round(time.monotonic() - self._started, 1),
                "ready_after_exec_ms": self._ready_ms,
                "log_records_dropped": self._log.dropped,
                "hook_log_error": self._log.hook_log_error or None,
                "imports_during_cycles": self._guard.count,
                "config_error": str(self._config_error) if self._config_error else None,
            }
        if self._stop:
            raise Busy("the daemon is shutting down")
        if op == "freeze" and self._config_error is not None:
            raise self._config_error
        settings = engine.config.settings
        budget = settings.thaw_timeout + ABANDON_GRACE
        if op == "freeze":  # a failed freeze rolls back within the thaw budget
            budget += settings.freeze_timeout + ABANDON_GRACE
            if engine.state == THAWED and engine.paused_apps:  # leftovers: resumed again first
                budget += settings.thaw_timeout + ABANDON_GRACE
        send({"accepted": True, "op": op, "timeout_ms": round((budget + 1) * 1000)})
        notify(f"STATUS={op} requested by pid {peer.pid}")
        try:
            report = engine.freeze() if op == "freeze" else engine.thaw()
        finally:
            notify(f"STATUS={self._status_line()}")
        watch = self._watcher if self._watching else None  # once: a reload may change it
        if watch is not None:
            # Armed before the reply goes out, so qemu-ga cannot create and remove its flag
            # file before we watch it.  Only a safety net: a watch that cannot be set must not
            # fail the freeze, after which qemu-ga would run no thaw hook at all.
            try:
                if report.state == FROZEN:
                    watch.arm(report.cycle)
                else:
                    watch.disarm()
            except OSError as exc:
                self._log.problem(
                    f"qemu-ga's frozen flag is not watched ({exc.strerror or exc}): a freeze of"
                    " zero filesystems will not be noticed; the thaw hook or the watchdog"
                    " resumes the apps",
                    report.cycle,
                )
        if op == "freeze":
            self._log.flush(FLUSH_BEFORE_FREEZE)
        return report_reply(report)

    def agent_left_frozen_state(self, cycle: str) -> None:
        """qemu-ga thawed (or froze nothing) and ran no thaw hook: resume what we paused."""
        engine = self.engine
        if engine.state != FROZEN or engine.cycle != cycle:
            return
        self._log.problem(
            "qemu-ga left its frozen state without running the thaw hook (a freeze of zero"
            " filesystems?): resuming every paused app",
            cycle,
        )
        try:
            engine.thaw(reason="agent", wait=engine.config.settings.thaw_timeout)
        except QgafreezeError as exc:
            self._log.problem(
                f"thaw after qemu-ga left its frozen state failed: {exc.message}", cycle
            )
        notify(f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        engine = self.engine
        paused = engine.paused_apps
        if self._config_error is not None:
            return f"config invalid ({len(self._config_error.problems)} error(s)): freezes refused"
        line = f"{engine.state}; {len(engine.config.apps)} app(s) configured"
        if paused:
            line += f"; paused: {', '.join(paused)}"
        return line

    # -- signals and lifecycle -----------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop = True

    def request_reload(self) -> None:
        self._reload = True

    def reload(self) -> None:
        self._reload = False
        notify("RELOADING=1")
        try:
            config = load_file(self._config_path)
            plan = build_plan(config)
            self.engine.reconfigure(
                config,
                plan,
                build_actions(config.apps, self._manager, config.settings.legacy_hook_timeout),
            )
        except ConfigError as exc:
            if self._config_error is not None:  # no good config to keep: report the new errors
                self._config_error = exc
            self._log.daemon_event(
                f"reload refused, keeping the last good config: {exc}", PRIORITY_ERR
            )
        except QgafreezeError as exc:
            self._log.daemon_event(f"reload refused: {exc.message}", PRIORITY_WARNING)
        else:
            self._config_error = None
            # Every setting takes effect on reload; reconfigure() only succeeds between cycles,
            # with nothing paused, so no watch is armed and no write is pending here.
            self._log.set_hook_log(config.settings.hook_log)
            self.watch_agent(config.settings.agent_state_file)
            if self.server is not None:
                self.server.allow(allowed_gid(config, self._log), config.settings.allowed_group_ops)
            self._log.daemon_event(f"reloaded {self._config_path}: {len(config.apps)} app(s)")
            log_warnings(config, self._log)
        notify(f"READY=1\nSTATUS={self._status_line()}")

    def shutdown(self) -> int:
        """SIGTERM or SIGINT: resume every paused app before exiting (also mid-cycle)."""
        settings = self.engine.config.settings
        # A cycle in progress ends within its deadlines, then the thaw within its own: ask
        # systemd for exactly that (and the log flush) rather than trust a fixed
        # TimeoutStopSec=, which an admin who raised the timeouts would outgrow mid-resume.
        wait = settings.freeze_timeout + settings.thaw_timeout + 2 * ABANDON_GRACE
        extend_us = round((wait + SHUTDOWN_MARGIN) * 1_000_000)
        notify(
            f"STOPPING=1\nEXTEND_TIMEOUT_USEC={extend_us}\nSTATUS=stopping: resuming paused apps"
        )
        status = 0
        try:
            report = self.engine.thaw(reason="shutdown", wait=wait)
            if not report.ok:
                status = 1
        except QgafreezeError as exc:
            self._log.daemon_event(f"shutdown thaw failed: {exc.message}", PRIORITY_ERR)
            status = 1
        self._log.daemon_event("qgafreeze daemon stopped", PRIORITY_INFO)
        self._log.close()
        return status

    def run(self, server: Server) -> int:
        handlers = {"stop": self.request_stop, "reload": self.request_reload}
        for signum, what in SIGNALS.items():
            signal.signal(signum, _waking(handlers[what], server))
        notify(f"READY=1\nSTATUS={self._status_line()}\nMAINPID={os.getpid()}")
        self._ready_ms = process_age_ms()
        self._log.daemon_event(
            f"qgafreeze {__version__} ready: {len(self.engine.config.apps)} app(s) from"
            f" {self._config_path}, {self._ready_ms} ms after exec"
        )
        while True:
            server.serve(lambda: self._stop or self._reload)
            if self._stop:
                return self.shutdown()
            self.reload()


def process_age_ms() -> int:
    """Milliseconds since this process was exec'd, interpreter start-up included."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): starttime
        return round((time.clock_gettime(time.CLOCK_BOOTTIME) - started) * 1000)
    except (OSError, ValueError, IndexError):
        return -1


def _waking(handler: Any, server: Server) -> Any:
    def on_signal(signum: int, frame: object) -> None:
        handler()
        server.wake()

    return on_signal


def _warm_up(log: LogWriter) -> None:
    """Run once what the control path runs, so lazy imports happen now, not while frozen."""
    protocol.parse_reply(protocol.encode({"op": "ping", "x": [1, 2.5, None, True]}))
    time.strftime("%a %b %e %H:%M:%S %Z %Y", time.localtime())
    "é".encode().decode("utf-8")
    traceback.format_exc()
    threading.Event().wait(0)
    log.flush(1.0)


def log_warnings(config: Config, log: LogWriter) -> None:
    for warning in config.warnings:
        log.daemon_event(f"{config.source}: {warning}", PRIORITY_WARNING)


def allowed_gid(config: Config, log: LogWriter) -> int | None:
    """The group that may use the socket, looked up now; a group gone since the config was
    checked leaves the socket to root alone, and says so."""
    name = config.settings.allowed_group
    gid = resolve_group(name) if name else None
    if name and gid is None:
        log.daemon_event(
            f"settings.allowed_group: no group {name!r} on this system: only root may ask",
            PRIORITY_WARNING,
        )
    return gid


def run(config_path: str) -> int:
    """Build everything, then serve.  Raises QgafreezeError for a start-up failure."""
    started = time.monotonic()
    sys.dont_write_bytecode = True  # never write .pyc files, least of all on a frozen disk
    guard = ImportGuard()
    sys.addaudithook(guard)
    config_error: ConfigError | None = None
    try:
        config: Config = load_file(config_path)
    except ConfigError as exc:
        config_error = exc
        config = parse_config({}, source=config_path)  # no apps; every freeze is refused
    log = LogWriter(config.settings.hook_log, default_journal_send())
    if config_error is not None:
        log.daemon_event(
            f"refusing every freeze until the config is fixed: {config_error}", PRIORITY_ERR
        )
    manager = SystemdManager()
    plan = build_plan(config)
    state_file = StateFile()
    saved = state_file.load()
    engine = Engine(
        config,
        plan,
        build_actions(config.apps, manager, config.settings.legacy_hook_timeout),
        log,
        state_file=state_file,
        report_file=ReportFile(),
        fs_thawer=thaw_all,
    )
    if state_file.error:
        log.problem(state_file.error)
    if saved is not None:
        paused = engine.recover(saved)
        if paused:
            log.problem(
                f"the previous daemon left cycle {engine.cycle} with paused apps:"
                f" {', '.join(paused)}; the next thaw (or the watchdog, or the retry of what a"
                " failed rollback left) resumes them",
                engine.cycle,
            )
    guard.engine = engine
    log_warnings(config, log)
    gid = allowed_gid(config, log)
    listener = activated_listener()
    if listener is None:
        listener = bind_listener(socket_path(), gid)
    daemon = Daemon(config_path, engine, log, manager, guard, started, config_error)
    daemon.watch_agent(config.settings.agent_state_file)
    server = Server(listener, daemon, log, gid, config.settings.allowed_group_ops, refusals=log)
    daemon.server = server
    _warm_up(log)
    return daemon.run(server)
