"""journald records and the compatible hook log, written off the control path.

Between freeze and thaw the guest's disks refuse writes: a synchronous write to the hook log, or a
journald that blocks on its own files, would stall the cycle that is meant to end the freeze.  So
the engine only puts records on a bounded in-memory queue (it never waits on it); one writer
thread drains it.  When the queue is full, records are dropped and counted, never waited for.

The hook log keeps the lines administrators already grep (see the seed tutorial), with what an
app's actions and commands printed marked and escaped (``hooklog``):

    Thu Nov 23 13:38:05 MSK 2023: execute qgafreeze:mariadb freeze
      | mariadb.service: stopped
    Thu Nov 23 13:38:06 MSK 2023: qgafreeze:mariadb finished with status=0

journald's fields are structured, but ``journalctl`` prints them to a terminal: messages and
fields get the same escapes, without the mark.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Optional

from .actioncontext import StepReport
from .engine import CycleReport
from .hooklog import append_to_hook_log, hook_log_date, output_lines, visible_lines
from .outcome import FAILED, OK, SKIPPED, TIMEOUT, AppOutcome
from .protocol import app_line

try:  # systemd-python; without it the hook log still works and the daemon says so
    from systemd import journal as _journal
except ImportError:  # pragma: no cover - the package is a hard dependency on real systems
    _journal = None

# Stable ids per event type (journalctl MESSAGE_ID=...); never change one once released.
MSG_APP_DONE = "5f6c1a6e2c0b4d1f9a3e7b8c2d4e6f01"
MSG_CYCLE_DONE = "5f6c1a6e2c0b4d1f9a3e7b8c2d4e6f02"
MSG_PROBLEM = "5f6c1a6e2c0b4d1f9a3e7b8c2d4e6f03"
MSG_DAEMON = "5f6c1a6e2c0b4d1f9a3e7b8c2d4e6f04"
MSG_STEP_DONE = "5f6c1a6e2c0b4d1f9a3e7b8c2d4e6f05"
MSG_REFUSED = "5f6c1a6e2c0b4d1f9a3e7b8c2d4e6f06"

SYSLOG_IDENTIFIER = "qgafreeze"
PRIORITY_ERR, PRIORITY_WARNING, PRIORITY_INFO = 3, 4, 6
QUEUE_LIMIT = 10_000

# Exit statuses written to the hook log, as the stock script writes a hook's exit status.
HOOK_STATUS = {OK: 0, FAILED: 1, TIMEOUT: 124}

JournalSend = Callable[..., None]


def default_journal_send() -> JournalSend | None:
    return None if _journal is None else _journal.send


def _hook_phase(phase: str) -> str:
    return "thaw" if phase == "rollback" else phase


class LogWriter:
    """engine.EventSink that queues records; a thread writes them to journald and the hook log."""

    def __init__(self, hook_log: str | None, journal_send: JournalSend | None) -> None:
        self._hook_log = hook_log
        self._send = journal_send
        self._queue: queue.Queue[Optional[tuple[float, str, Any]]] = queue.Queue(QUEUE_LIMIT)
        self._done = threading.Condition()
        self._queued = 0
        self._written = 0
        self.dropped = 0
        self.hook_log_error = ""  # why the last burst was not written, reported once per change
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def set_hook_log(self, path: str | None) -> None:
        self._hook_log = path  # read by the writer thread on its next burst

    # -- EventSink ----------------------------------------------------------------------------

    def app_started(self, cycle: str, phase: str, app: str) -> None:
        self._put("app_started", (cycle, phase, app))

    def app_finished(self, cycle: str, outcome: AppOutcome) -> None:
        self._put("app_finished", (cycle, outcome))

    def cycle_finished(self, report: CycleReport) -> None:
        self._put("cycle_finished", report)

    def step_finished(self, cycle: str, app: str, report: StepReport) -> None:
        self._put("step_finished", (cycle, app, report))

    def problem(self, message: str, cycle: str = "", detail: str = "") -> None:
        self._put("problem", (message, cycle, detail))

    def daemon_event(self, message: str, priority: int = PRIORITY_INFO) -> None:
        self._put("daemon", (message, priority))

    def refused(self, op: str | None, pid: int, uid: int, code: str, message: str) -> None:
        """server.Refusals: a request answered with an error instead of being carried out."""
        self._put("refused", (op, pid, uid, code, message))

    # -- queue --------------------------------------------------------------------------------

    def _put(self, kind: str, payload: Any) -> None:
        try:
            self._queue.put_nowait((time.time(), kind, payload))
        except queue.Full:
            self.dropped += 1
            return
        with self._done:
            self._queued += 1

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for what is queued now to be written.  Never unbounded."""
        with self._done:
            target = self._queued
            return self._done.wait_for(lambda: self._written >= target, timeout)

    def close(self, timeout: float = 2.0) -> None:
        self.flush(timeout)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:  # drain what is there, so the hook log is opened once per burst
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._write(batch)
                    return
                batch.append(nxt)
            self._write(batch)

    def _write(self, batch: list[tuple[float, str, Any]]) -> None:
        lines: list[str] = []
        for when, kind, payload in batch:
            try:
                lines.extend(getattr(self, f"_render_{kind}")(when, payload))
            except Exception as exc:  # a logging bug must not kill the writer
                self._journal(f"log writer failed on {kind}: {exc!r}", PRIORITY_ERR, MSG_PROBLEM)
        self._append_hook_log(lines)
        with self._done:
            self._written += len(batch)
            self._done.notify_all()

    def _append_hook_log(self, lines: list[str]) -> None:
        if not self._hook_log or not lines:
            return
        error = append_to_hook_log(self._hook_log, lines)
        if error and error != self.hook_log_error:  # once per change, not once per record
            self._journal(error, PRIORITY_WARNING, MSG_PROBLEM)
        self.hook_log_error = error

    def _journal(self, message: str, priority: int, message_id: str, **fields: Any) -> None:
        if self._send is None:
            return
        clean = {k: visible_lines(str(v)) for k, v in fields.items() if v is not None and v != ""}
        try:
            self._send(
                visible_lines(message),
                MESSAGE_ID=message_id,
                PRIORITY=str(priority),
                SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                **clean,
            )
        except OSError:
            self.dropped += 1  # journald is not running; the hook log still has the story

    # -- rendering: one journald record per event, hook-log lines returned ---------------------

    def _render_app_started(self, when: float, payload: tuple[str, str, str]) -> list[str]:
        _cycle, phase, app = payload
        return [f"{hook_log_date(when)}: execute qgafreeze:{app} {_hook_phase(phase)}"]

    def _render_app_finished(self, when: float, payload: tuple[str, AppOutcome]) -> list[str]:
        cycle, outcome = payload
        phase = _hook_phase(outcome.phase)
        text = app_line(outcome.to_dict())
        # A thaw that had nothing to resume for an app is news, not a problem.
        calm = outcome.result == OK or (outcome.result == SKIPPED and phase == "thaw")
        self._journal(
            text,
            PRIORITY_INFO if calm else PRIORITY_WARNING,
            MSG_APP_DONE,
            QGAFREEZE_CYCLE=cycle,
            QGAFREEZE_PHASE=phase,
            QGAFREEZE_REASON="rollback" if outcome.phase == "rollback" else None,
            QGAFREEZE_APP=outcome.app,
            QGAFREEZE_ACTION=" ".join(outcome.actions) or None,
            QGAFREEZE_UNIT=" ".join(outcome.units) or None,
            QGAFREEZE_RESULT=outcome.result,
            QGAFREEZE_DURATION_MS=outcome.duration_ms,
            QGAFREEZE_OUTPUT="\n".join(outcome.output) or None,
        )
        if outcome.result == SKIPPED:
            return [
                f"{hook_log_date(when)}: qgafreeze:{outcome.app} {phase} skipped: {outcome.message}"
            ]
        lines = output_lines(outcome.output)
        if outcome.message:
            lines.append(f"{outcome.result}: {outcome.message}")
        status = HOOK_STATUS[outcome.result]
        lines.append(
            f"{hook_log_date(when)}: qgafreeze:{outcome.app} finished with status={status}"
        )
        return lines

    def _render_step_finished(self, when: float, payload: tuple[str, str, StepReport]) -> list[str]:
        cycle, app, report = payload
        self._journal(
            f"{app}: {report.phase} {report.kind} {report.what}: status {report.status}",
            PRIORITY_INFO if report.status == 0 else PRIORITY_WARNING,
            MSG_STEP_DONE,
            QGAFREEZE_CYCLE=cycle,
            QGAFREEZE_PHASE=report.phase,
            QGAFREEZE_APP=app,
            QGAFREEZE_ACTION=report.kind,
            QGAFREEZE_STEP=report.what,
            QGAFREEZE_EXIT_STATUS=report.status,
            QGAFREEZE_DURATION_MS=round((when - report.started) * 1000),
            QGAFREEZE_OUTPUT="\n".join(report.output) or None,
        )
        # The stock hook's own pair of lines, around this command's output.
        return [
            f"{hook_log_date(report.started)}: execute {report.what} {report.phase}",
            *output_lines(report.output),
            f"{hook_log_date(when)}: {report.what} finished with status={report.status}",
        ]

    def _render_cycle_finished(self, when: float, report: CycleReport) -> list[str]:
        result = "ok" if report.ok else "failed"
        text = (
            f"{report.op} {result}: {len(report.apps)} app(s) in {report.duration_ms} ms"
            f" (cycle {report.cycle}, {report.reason})"
        )
        if report.rollback:
            text += f"; rolled back {len(report.rollback)} app(s)"
        if report.error is not None:
            text += f": {report.error.message}"
        if report.note:
            text += f"; {report.note}"
        self._journal(
            text,
            PRIORITY_INFO if report.ok else PRIORITY_ERR,
            MSG_CYCLE_DONE,
            QGAFREEZE_CYCLE=report.cycle,
            QGAFREEZE_PHASE=report.op,
            QGAFREEZE_REASON=report.reason,
            QGAFREEZE_RESULT=result,
            QGAFREEZE_STATE=report.state,
            QGAFREEZE_DURATION_MS=report.duration_ms,
            QGAFREEZE_ERROR=report.error.code if report.error else None,
        )
        status = 0 if report.ok else 1
        return [f"{hook_log_date(when)}: qgafreeze {text}; finished with status={status}"]

    def _render_problem(self, when: float, payload: tuple[str, str, str]) -> list[str]:
        message, cycle, detail = payload
        self._journal(
            message + (f"\n{detail}" if detail else ""),
            PRIORITY_WARNING,
            MSG_PROBLEM,
            QGAFREEZE_CYCLE=cycle or None,
        )
        return [f"{hook_log_date(when)}: qgafreeze warning: {message}"]

    def _render_refused(self, when: float, payload: tuple[Any, ...]) -> list[str]:
        op, pid, uid, code, message = payload
        text = f"{op or 'request'} refused [{code}]: {message} (pid {pid}, uid {uid})"
        self._journal(
            text,
            PRIORITY_WARNING,
            MSG_REFUSED,
            QGAFREEZE_OP=op,
            QGAFREEZE_ERROR=code,
            QGAFREEZE_PEER_PID=pid,
            QGAFREEZE_PEER_UID=uid,
        )
        # status=1, as a failed hook's: ``grep 'status=[^0]'`` finds refusals too.
        return [f"{hook_log_date(when)}: qgafreeze {text}; finished with status=1"]

    def _render_daemon(self, when: float, payload: tuple[str, int]) -> list[str]:
        message, priority = payload
        self._journal(message, priority, MSG_DAEMON)
        return []
