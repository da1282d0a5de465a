"""The cycle report: one JSON document per cycle that says what the snapshot taken in its frozen
window is worth, app by app (``docs/cycle-report.schema.json``).

The daemon rewrites it after each phase at ``paths.REPORT_FILE``, on tmpfs: writing it while the
disks are frozen cannot block, and the host reads it through qemu-ga's ``guest-file-read`` once
the thaw has returned.  ``qgafreeze status --json`` prints the same document.

Only what the engine decided goes in: results, durations, messages, and each app's declared
guarantee; and each app's ``details``, what its commands printed as ``qgafreeze-report KEY JSON``
lines (a backup label), bounded (``details.LIMIT``).  Never other command output, what a session
was sent, or an environment value.

The verdict:

* ``failed``: the freeze was refused, so qemu-ga took no snapshot;
* ``crash-consistent``: some declared app was not quiesced for the whole window: a failure let
  through by ``on_failure: continue``, or a held session that ended before qemu-ga had frozen the
  filesystems (its frozen flag was not there yet when the session ended);
* ``application-consistent``: every declared app was quiesced until the thaw.  A session that
  ended while qemu-ga's flag was there changed nothing on the frozen disks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import paths
from .actioncontext import StepReport
from .actions import SESSION_LOST
from .apprunner import AppEvents
from .errors import QgafreezeError
from .model import MODE_GUARANTEES, App, Config
from .outcome import OK, SKIPPED, AppOutcome
from .presets import GUARANTEES
from .state import write_atomically

if TYPE_CHECKING:
    from .engine import CycleReport

REPORT_VERSION = 1
APPLICATION_CONSISTENT = "application-consistent"
CRASH_CONSISTENT = "crash-consistent"
# The detail a quiesce helper reports when the lock it held is gone (a restarted server).
LOCK_LOST = "lock_lost"
FAILED = "failed"

# What an app's kinds of action guarantee, where no preset says it better (units: by mode).
ACTION_GUARANTEES = {
    "legacy": "legacy hook scripts ran",
    "steps": "freeze steps ran",
    "session": "session held until the thaw",
}

Document = dict[str, Any]
# app -> whether qemu-ga's frozen flag was there when its session ended (None: not watched)
Losses = dict[str, Optional[bool]]


def guarantee(app: App) -> str:
    parts = [GUARANTEES[app.preset]] if app.preset else []
    for kind in app.action_kinds:
        if kind in ("units", "freeze-units"):
            parts.append(MODE_GUARANTEES[app.mode])
        elif not app.preset:
            parts.append(ACTION_GUARANTEES[kind])
    return ", ".join(parts)


def timestamp(epoch: float) -> str:
    """RFC 3339 in UTC, to the millisecond: ``2026-11-26T08:00:50.123Z``."""
    millis = int(epoch * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{millis:03d}Z"


def nothing_to_resume(
    config: Config, label: str, done: set[str], freeze_results: Mapping[str, str]
) -> list[AppOutcome]:
    """A skipped outcome, with the reason, for every declared app that ``label`` (thaw or
    rollback) had nothing to do for: each app is in every phase of the report and the logs."""
    why = {
        OK: "its freeze paused nothing",
        SKIPPED: "the freeze never started it",
    }
    skipped = []
    for app in config.apps:
        if app.name in done:
            continue
        result = freeze_results.get(app.name)
        reason = why.get(result or "", "its freeze failed before pausing anything")
        if result is None:
            reason = "nothing of it was paused"
        skipped.append(AppOutcome.of(app, label, SKIPPED, 0, f"nothing to resume: {reason}"))
    return skipped


def _phase(
    reason: str, ok: bool, started: float, finished: float, error: QgafreezeError | None
) -> Document:
    return {
        "reason": reason,
        "ok": ok,
        "started_at": timestamp(started),
        "finished_at": timestamp(finished),
        "duration_ms": max(0, round((finished - started) * 1000)),
        "error": None if error is None else {"code": error.code, "message": error.message},
    }


def _result(outcome: AppOutcome) -> Document:
    return {
        "phase": outcome.phase,
        "result": outcome.result,
        "duration_ms": outcome.duration_ms,
        "message": outcome.message,
    }


def _app_entry(app: App, freeze: AppOutcome | None) -> Document:
    return {
        "app": app.name,
        "actions": list(app.action_kinds),
        "units": list(app.units),
        "mode": app.mode,
        "preset": app.preset,
        "on_failure": app.on_failure,
        "guarantee": guarantee(app),
        "quiesced": False,
        "note": "",
        "freeze": None if freeze is None else _result(freeze),
        "thaw": None,
        "details": {} if freeze is None else dict(freeze.details),
    }


def freeze_document(config: Config, report: CycleReport) -> Document:
    """After the freeze phase, and its rollback if it failed."""
    outcomes = {o.app: o for o in report.apps}
    freeze_end = report.rollback_at or report.finished_at
    doc: Document = {
        "version": REPORT_VERSION,
        "cycle": report.cycle,
        "phase": "freeze",
        "reason": report.reason,
        "freeze": _phase(report.reason, report.ok, report.started_at, freeze_end, report.error),
        "thaw": None,
        "apps": [_app_entry(app, outcomes.get(app.name)) for app in config.apps],
        "filesystems_thawed": None,
    }
    if report.rollback_at:
        doc["phase"], doc["reason"] = "thaw", "rollback"
        rollback = report.rollback + report.skipped
        ok = all(o.result in (OK, SKIPPED) for o in report.rollback)
        doc["thaw"] = _phase("rollback", ok, report.rollback_at, report.finished_at, None)
        _set_thaw(doc, rollback)
    return _judge(doc, {}, recovered=False)


def thaw_document(
    config: Config, base: Document | None, report: CycleReport, losses: Losses, recovered: bool
) -> Document:
    """``base`` (this cycle's freeze document, None if lost) with the thaw ``report`` added."""
    if base is None or base.get("cycle") != report.cycle:
        base = {
            "version": REPORT_VERSION,
            "cycle": report.cycle,
            "freeze": None,
            "apps": [_app_entry(app, None) for app in config.apps],
        }
    doc = {**base, "phase": "thaw", "reason": report.reason}
    doc["apps"] = [dict(entry) for entry in base["apps"]]
    doc["thaw"] = _phase(
        report.reason, report.ok, report.started_at, report.finished_at, report.error
    )
    _set_thaw(doc, report.apps + report.skipped)
    doc["filesystems_thawed"] = _filesystems(report)
    return _judge(doc, losses, recovered)


def _filesystems(report: CycleReport) -> Document | None:
    """What the watchdog's own thaw of the disks did, if it ran."""
    if report.filesystems is None:
        return None
    return {
        "at": timestamp(report.filesystems_at),
        "count": report.filesystems.count,
        "mountpoints": list(report.filesystems.thawed),
        "errors": list(report.filesystems.errors),
    }


def _set_thaw(doc: Document, outcomes: Sequence[AppOutcome]) -> None:
    by_app = {o.app: o for o in outcomes}
    for entry in doc["apps"]:
        outcome = by_app.get(entry["app"])
        entry["thaw"] = None if outcome is None else _result(outcome)
        # What the thaw reported (a backup label comes out only then) beside the freeze's.
        entry["details"] = {**entry.get("details", {}), **(outcome.details if outcome else {})}


def _judge(doc: Document, losses: Losses, recovered: bool) -> Document:
    freeze = doc.get("freeze")
    if freeze is not None and not freeze["ok"]:
        for entry in doc["apps"]:
            entry["quiesced"], entry["note"] = False, "the freeze failed: no snapshot was taken"
        error = freeze["error"]
        doc["verdict"] = FAILED
        doc["verdict_reasons"] = [error["message"] if error else "the freeze failed"]
        return doc
    for entry in doc["apps"]:
        entry["quiesced"], entry["note"] = _quiesced(entry, losses, recovered)
    doc["verdict_reasons"] = [f"{e['app']}: {e['note']}" for e in doc["apps"] if not e["quiesced"]]
    doc["verdict"] = CRASH_CONSISTENT if doc["verdict_reasons"] else APPLICATION_CONSISTENT
    return doc


def _quiesced(entry: Document, losses: Losses, recovered: bool) -> tuple[bool, str]:
    freeze = entry["freeze"]
    if freeze is None:
        return False, "what its freeze did is not known: the daemon restarted while frozen"
    if freeze["result"] != OK:
        return False, f"not quiesced: its freeze {freeze['result']} ({freeze['message']})"
    app = entry["app"]
    if app in losses:
        if losses[app]:
            return True, (
                "its held session ended after qemu-ga had frozen the filesystems, which"
                " therefore did not change"
            )
        if losses[app] is None:
            return False, (
                "its held session ended while frozen, and qemu-ga's frozen flag is not"
                " watched (settings.agent_state_file) to tell whether the disks were frozen yet"
            )
        return False, "its held session ended before qemu-ga had frozen the filesystems"
    lost = entry.get("details", {}).get(LOCK_LOST)
    if lost is not None:  # its helper found the lock gone only at the thaw: since when is unknown
        why = lost.get("reason") if isinstance(lost, dict) else None
        return False, f"its session found its lock lost at the thaw: {why or lost}"
    if recovered and "session" in entry["actions"]:
        return False, "its held session ended when the daemon restarted while frozen"
    return True, ""


def empty_document() -> Document:
    """What ``status --json`` prints before any cycle: the schema's shape, nothing in it."""
    return {
        "version": REPORT_VERSION,
        "cycle": None,
        "phase": None,
        "reason": None,
        "verdict": None,
        "verdict_reasons": [],
        "freeze": None,
        "thaw": None,
        "apps": [],
        "filesystems_thawed": None,
    }


class LossRecorder:
    """The engine's AppEvents for its runner: passes everything on, and notes each held session
    that ends while frozen, with whether qemu-ga's frozen flag (``flag()``, a path or None) was
    there at that moment: a stat on /run, which a frozen disk cannot block."""

    def __init__(self, events: AppEvents, flag: Callable[[], str | None]) -> None:
        self._events = events
        self._flag = flag
        self._lock = threading.Lock()
        self._lost: dict[str, Losses] = {}  # cycle -> its losses

    def app_started(self, cycle: str, phase: str, app: str) -> None:
        self._events.app_started(cycle, phase, app)

    def app_finished(self, cycle: str, outcome: AppOutcome) -> None:
        self._events.app_finished(cycle, outcome)

    def step_finished(self, cycle: str, app: str, report: StepReport) -> None:
        self._events.step_finished(cycle, app, report)

    def problem(self, message: str, cycle: str = "", detail: str = "") -> None:
        app, lost, _ = message.partition(SESSION_LOST)
        if lost and cycle:
            path = self._flag()
            frozen = None if path is None else os.path.exists(path)
            with self._lock:
                self._lost.setdefault(cycle, {})[app] = frozen
        self._events.problem(message, cycle, detail)

    def take(self, cycle: str) -> Losses:
        with self._lock:
            return self._lost.pop(cycle, {})


class CycleReporter:
    """The engine's side of the report: the current document, the losses, the file."""

    def __init__(self, events: AppEvents, file: ReportFile | None) -> None:
        self._events = events
        self.flag: str | None = None  # qemu-ga's frozen flag, settings.agent_state_file
        self.losses = LossRecorder(events, lambda: self.flag)
        self._file = file
        # The last cycle's report, kept across daemon restarts in the file.
        self.document = None if file is None else file.read()
        self.recovered = False  # this cycle was taken over from a daemon that died frozen

    def status(self) -> dict[str, Any]:
        error = self._file.error if self._file is not None else ""
        return {"report": self.document, "report_file_error": error or None}

    def nothing_to_resume(
        self, config: Config, report: CycleReport, label: str
    ) -> list[AppOutcome]:
        """The skipped outcomes of ``label`` (thaw or rollback), each also logged: the hook log
        and journald list every app in every phase, as the report does."""
        if label == "rollback":
            results = {o.app: o.result for o in report.apps}
            done = {o.app for o in report.rollback}
        else:
            doc = self.document
            entries = doc["apps"] if doc is not None and doc.get("cycle") == report.cycle else []
            results = {e["app"]: e["freeze"]["result"] for e in entries if e.get("freeze")}
            done = {o.app for o in report.apps}
        skipped = nothing_to_resume(config, label, done, results)
        for outcome in skipped:
            self._events.app_finished(report.cycle, outcome)
        return skipped

    def freeze_done(self, config: Config, report: CycleReport) -> None:
        self.recovered = False
        if report.rollback_at:
            report.skipped = self.nothing_to_resume(config, report, "rollback")
        self._write(freeze_document(config, report))

    def thaw_done(self, config: Config, report: CycleReport) -> None:
        """The thaw that ends the cycle; a thaw with nothing frozen leaves the report alone, so
        that the story of a failed freeze outlives the thaw a caller sends after it."""
        report.skipped = self.nothing_to_resume(config, report, "thaw")
        losses = self.losses.take(report.cycle)
        self._write(thaw_document(config, self.document, report, losses, self.recovered))
        self.recovered = False

    def _write(self, doc: Document) -> None:
        self.document = doc
        if self._file is not None:  # tmpfs: cannot block on the frozen disks
            self._file.write(doc)


class ReportFile:
    """The report on tmpfs, replaced whole after each phase."""

    def __init__(self, path: str = paths.REPORT_FILE) -> None:
        self.path = path
        self.error = ""  # the last write failure; status reports it

    def write(self, doc: Document) -> None:
        try:
            write_atomically(self.path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
            self.error = ""
        except OSError as exc:
            self.error = f"cannot write the cycle report {self.path}: {exc.strerror or exc}"

    def read(self) -> Document | None:
        """The last report, kept across daemon restarts (not reboots); None if there is none
        or it is of another version."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                doc = json.load(handle)
        except (OSError, ValueError):
            return None
        ok = isinstance(doc, dict) and doc.get("version") == REPORT_VERSION
        return doc if ok else None
