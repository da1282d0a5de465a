"""What a failed rollback or thaw leaves paused is resumed again until it is back, and every
refused request is in both logs.  systemd is an in-memory unit table here; the container tier
has the same story with real systemd (tests/integration/test_leftovers.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeSystemd, RecordingEvents

from qgafreeze import protocol
from qgafreeze.actions import build_actions
from qgafreeze.cli import render_status
from qgafreeze.config import parse_config
from qgafreeze.daemon import Daemon, ImportGuard
from qgafreeze.engine import FROZEN, THAWED, Engine
from qgafreeze.errors import ActionTimeout, StateError
from qgafreeze.leftovers import RETRY_DELAYS, Retrier
from qgafreeze.logs import MSG_REFUSED, LogWriter
from qgafreeze.planner import build_plan
from qgafreeze.server import Server, bind_listener
from qgafreeze.state import StateFile

UNIT = "app.service"
REPO = Path(__file__).resolve().parents[2]


class HangingStop(FakeSystemd):
    """systemd with one unit whose stop hangs: the start that replaces it waits until the stop
    ends (``stop_ends``), then runs, whether anybody still waits for it or not."""

    def __init__(self) -> None:
        super().__init__({UNIT: "active"}, hang_stop={UNIT})
        self.stop_has_ended = threading.Event()

    def stop(self, units: Sequence[str], deadline: float) -> None:
        self.active[UNIT] = "deactivating"
        super().stop(units, deadline)

    def start(self, units: Sequence[str], deadline: float) -> None:
        for unit in units:
            self._record("start", unit)
        if not self.stop_has_ended.wait(max(0.0, deadline - time.monotonic())):
            raise ActionTimeout(f"{', '.join(units)}: start did not finish in time")
        self.active[UNIT] = "active"

    def stop_ends(self) -> None:
        """The stop ends at last, and systemd runs the start queued behind it."""
        self.active[UNIT] = "active"
        self.stop_has_ended.set()


def engine_for(
    systemd: FakeSystemd, delays: Sequence[float], events: Any = None, **kwargs: Any
) -> tuple[Engine, RecordingEvents]:
    config = parse_config({"apps": {"app": {"units": [UNIT], "timeout": "100ms"}}})
    events = RecordingEvents() if events is None else events
    actions = build_actions(config.apps, systemd)
    engine = Engine(config, build_plan(config), actions, events, retry_delays=delays, **kwargs)
    return engine, events


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    return bool(predicate())


def failed_freeze_with_rollback_timed_out(engine: Engine) -> None:
    report = engine.freeze()
    assert not report.ok
    assert [(o.app, o.result) for o in report.rollback] == [("app", "timeout")]
    assert engine.state == THAWED and engine.paused_apps == ["app"]


# -- the engine ----------------------------------------------------------------------------------


def test_a_rollback_that_timed_out_is_retried_on_a_timer_until_systemd_has_started_the_app():
    systemd = HangingStop()
    engine, events = engine_for(systemd, delays=(0.05,))
    failed_freeze_with_rollback_timed_out(engine)
    assert engine.status()["retry_in_s"] is not None
    assert wait_until(lambda: len(systemd.calls("start")) >= 3), "no retries on the timer"
    assert engine.paused_apps == ["app"]  # still down: still retried

    systemd.stop_ends()

    assert wait_until(lambda: engine.paused_apps == []), "the retry never saw the app back"
    assert wait_until(lambda: engine.status()["retry_in_s"] is None)
    assert wait_until(lambda: events.cycles[-1].reason == "retry" and events.cycles[-1].ok)
    calls = len(systemd.calls("start"))
    time.sleep(0.2)
    assert len(systemd.calls("start")) == calls, "retries went on with nothing left"


def test_the_next_freeze_succeeds_once_the_app_is_back_with_no_thaw_in_between():
    systemd = HangingStop()
    engine, events = engine_for(systemd, delays=(3600,))  # only the re-check before a freeze
    failed_freeze_with_rollback_timed_out(engine)

    started = time.monotonic()
    with pytest.raises(StateError) as refused:
        engine.freeze()
    assert time.monotonic() - started < 5  # the app's 100 ms timeout, not a cycle's
    message = refused.value.message
    assert "apps still paused by an earlier cycle: app" in message
    assert "start did not finish in time" in message, message  # and why, from the re-check

    systemd.stop_ends()
    systemd.hang_stop = set()
    report = engine.freeze()

    assert report.ok, report.error
    assert engine.state == FROZEN
    assert [c.reason for c in events.cycles] == ["request", "retry", "retry", "request"]
    assert [c.op for c in events.cycles] == ["freeze", "thaw", "thaw", "freeze"]
    assert engine.thaw().ok
    assert systemd.active[UNIT] == "active"


class GatedStart(FakeSystemd):
    """A start that waits for ``release``, telling ``starting`` it has begun."""

    def __init__(self) -> None:
        super().__init__({UNIT: "active"}, fail_start={UNIT})
        self.starting = threading.Event()
        self.release = threading.Event()

    def start(self, units: Sequence[str], deadline: float) -> None:
        if UNIT not in self.fail_start:
            self.starting.set()
            self.release.wait(5)
        super().start(units, deadline)


def test_a_freeze_that_finds_a_retry_running_waits_for_it_and_does_not_retry_again():
    systemd = GatedStart()
    engine, _ = engine_for(systemd, delays=(0.05,))
    assert engine.freeze().ok
    assert not engine.thaw().ok  # the start failed: app is left paused
    systemd.fail_start = set()
    assert systemd.starting.wait(5), "the retry did not start"
    starts = len(systemd.calls("start"))  # the retry's own is recorded once released
    replies: list[Any] = []
    freezing = threading.Thread(target=lambda: replies.append(engine.freeze()), daemon=True)
    freezing.start()
    time.sleep(0.2)
    assert not replies, "the freeze did not wait for the retry"
    systemd.release.set()
    freezing.join(5)

    assert replies and replies[0].ok, replies  # not busy: the retry let it through
    assert len(systemd.calls("start")) == starts + 1  # the retry's: the freeze tried no other
    assert engine.thaw().ok


def test_a_thaw_that_fails_to_start_an_app_leaves_it_retried_until_it_starts():
    systemd = FakeSystemd({UNIT: "active"})
    engine, _ = engine_for(systemd, delays=(0.05,))
    assert engine.freeze().ok
    systemd.fail_start = {UNIT}
    assert not engine.thaw().ok
    assert engine.paused_apps == ["app"]
    systemd.fail_start = set()
    assert wait_until(lambda: engine.paused_apps == [])
    assert systemd.active[UNIT] == "active"


def test_a_daemon_restarted_with_leftovers_retries_them_instead_of_taking_itself_for_frozen(
    tmp_path,
):
    state = StateFile(str(tmp_path / "state.json"))
    state.save({"state": THAWED, "cycle": "c1", "paused": {"app": {"units": [UNIT]}}})
    systemd = FakeSystemd({UNIT: "inactive"})
    engine, _ = engine_for(systemd, delays=(0.05,), state_file=state)
    assert engine.recover(state.load() or {}) == ["app"]
    assert engine.state == THAWED
    saved = tmp_path / "state.json"
    assert wait_until(lambda: json.loads(saved.read_text())["paused"] == {})  # saved after
    assert engine.paused_apps == [] and systemd.active[UNIT] == "active"


# -- the retrier ---------------------------------------------------------------------------------


def test_retries_back_off_and_stop_once_nothing_is_left():
    times: list[float] = []
    left = [4]

    def attempt() -> bool:
        times.append(time.monotonic())
        left[0] -= 1
        return left[0] > 0

    retrier = Retrier(attempt, delays=(0.02, 0.08))
    started = time.monotonic()
    retrier.kick()
    assert wait_until(lambda: retrier.due_in() is None and len(times) == 4)
    gaps = [b - a for a, b in zip([started, *times], times)]
    assert gaps[0] >= 0.015 and all(gap >= 0.075 for gap in gaps[1:]), gaps  # the last repeats
    time.sleep(0.2)
    assert len(times) == 4


def test_a_retry_that_raises_is_reported_and_retried_and_stop_ends_the_retries():
    problems: list[str] = []
    calls = []

    def attempt() -> bool:
        calls.append(1)
        raise RuntimeError("bug")

    retrier = Retrier(attempt, delays=(0.02,), problem=problems.append)
    retrier.kick()
    assert wait_until(lambda: len(calls) >= 3)
    retrier.stop()
    time.sleep(0.1)
    count = len(calls)
    time.sleep(0.1)
    assert len(calls) == count and retrier.due_in() is None
    assert "RuntimeError('bug')" in problems[0]


# -- refusals in both logs -----------------------------------------------------------------------


class Journal:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def send(self, message: str, **fields: Any) -> None:
        self.records.append({"MESSAGE": message, **fields})


def ask(path: str, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.settimeout(10)
        sock.sendall(payload)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return protocol.parse_reply(data.splitlines()[-1])


@pytest.fixture
def served(tmp_path):
    systemd = HangingStop()
    hook_log = tmp_path / "log" / "hook.log"
    hook_log.parent.mkdir(mode=0o700)
    journal = Journal()
    log = LogWriter(str(hook_log), journal.send)
    engine, _ = engine_for(systemd, delays=(3600,), events=log)
    daemon = Daemon(str(tmp_path / "c.yaml"), engine, log, systemd, ImportGuard(), 0.0)
    path = str(tmp_path / "run" / "q.sock")
    server = Server(bind_listener(path), daemon, log, request_timeout=1.0, refusals=log)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
    thread.start()
    yield path, engine, log, hook_log, journal
    stop.set()
    server.wake()
    thread.join(5)


def test_every_refused_request_is_in_the_hook_log_and_journald_with_its_reason(served):
    path, engine, log, hook_log, journal = served
    failed_freeze_with_rollback_timed_out(engine)

    refused = ask(path, b'{"op": "freeze"}\n')
    bad = ask(path, b"not json\n")

    assert refused["error"]["code"] == "bad-state"
    assert bad["error"]["code"] == "bad-request"
    assert log.flush(5)
    lines = hook_log.read_text().splitlines()
    assert any(
        "qgafreeze freeze refused [bad-state]: apps still paused by an earlier cycle: app" in line
        and line.endswith("finished with status=1")
        for line in lines
    ), lines
    assert any("request refused [bad-request]: request is not a JSON object" in ln for ln in lines)
    records = [r for r in journal.records if r["MESSAGE_ID"] == MSG_REFUSED]
    assert [(r.get("QGAFREEZE_OP"), r["QGAFREEZE_ERROR"]) for r in records] == [
        ("freeze", "bad-state"),
        (None, "bad-request"),
    ]
    assert "apps still paused by an earlier cycle: app" in records[0]["MESSAGE"]
    assert records[0]["PRIORITY"] == "4"


def test_the_retry_schedule_is_the_one_the_readme_and_the_fault_matrix_state():
    first, last = ", ".join(f"{d:g}" for d in RETRY_DELAYS[:-1]), f"{RETRY_DELAYS[-1]:g} s"
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"{first} s after the failure and then every {last}" in readme
    assert f"{first} s, then every {last}" in (REPO / "docs" / "reliability.md").read_text()
    assert f"{first} s, then every {last}" in (REPO / "docs" / "design.md").read_text()
    assert Engine.__init__.__defaults__ is not None and RETRY_DELAYS in Engine.__init__.__defaults__


def test_status_says_which_paused_apps_an_earlier_cycle_left_and_when_they_are_retried():
    systemd = HangingStop()
    engine, _ = engine_for(systemd, delays=(3600,))
    failed_freeze_with_rollback_timed_out(engine)
    text = render_status({"ok": True, **engine.status()})
    assert "paused apps: app (left by an earlier cycle; retried in 36" in text, text
    systemd.stop_ends()
    systemd.hang_stop = set()
    assert engine.freeze().ok
    text = render_status({"ok": True, **engine.status()})
    assert "paused apps: app\n" in text and "earlier cycle" not in text, text  # frozen, as usual
    assert engine.thaw().ok


def test_once_the_freeze_has_resumed_what_was_left_status_shows_no_retry():
    systemd = HangingStop()
    engine, _ = engine_for(systemd, delays=(3600,))
    failed_freeze_with_rollback_timed_out(engine)
    assert engine.status()["retry_in_s"] is not None
    systemd.stop_ends()
    systemd.hang_stop = set()
    assert engine.freeze().ok
    assert engine.status()["retry_in_s"] is None
    assert engine.thaw().ok
