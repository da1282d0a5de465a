"""The state file's batched writer: every caller is covered by a write that started after it."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from qgafreeze.state import BatchedStateWriter, PausedApps, StateFile


class Changes:
    """What the writer saves: a counter that each caller bumps before it asks for a save."""

    def __init__(self) -> None:
        self.value = 0
        self.snapshots = 0
        self._lock = threading.Lock()

    def bump(self) -> int:
        with self._lock:
            self.value += 1
            return self.value

    def snapshot(self) -> dict[str, Any]:
        self.snapshots += 1
        return {"value": self.value}


class GatedFile:
    """A state file whose first write waits for the test's go, and whose n-th write fails."""

    def __init__(self, fail_on: int = 0) -> None:
        self.written: list[int] = []  # the values of the writes that completed
        self.writing = threading.Event()  # the first write has begun
        self.go = threading.Event()
        self.fail_on = fail_on  # the call that raises, counting from 1
        self.calls = 0

    def save(self, data: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls == 1:
            self.writing.set()
            assert self.go.wait(5)
        if self.calls == self.fail_on:
            raise RuntimeError("injected")
        self.written.append(data["value"])


class WaitersSeen(threading.Condition):
    """A condition that tells the test how many threads are waiting on it."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.waiting: set[int] = set()
        self.expected = expected
        self.all_waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.add(threading.get_ident())
        if len(self.waiting) >= self.expected:
            self.all_waiting.set()
        return super().wait(timeout)


def saver(writer: BatchedStateWriter, changes: Changes, file: GatedFile, errors: list[str]):
    def run() -> None:
        mine = changes.bump()
        try:
            writer.save()
        except RuntimeError as exc:
            errors.append(str(exc))
            return
        if not file.written or file.written[-1] < mine:
            errors.append(f"returned before a write covered change {mine}: {file.written}")

    return threading.Thread(target=run)


def test_a_save_alone_writes_what_the_snapshot_holds_at_its_call(tmp_path):
    path = tmp_path / "state.json"
    changes = Changes()
    writer = BatchedStateWriter(StateFile(str(path)), changes.snapshot)
    changes.bump()
    writer.save()
    changes.bump()
    writer.save()
    assert changes.snapshots == 2
    assert '"value": 2' in path.read_text()


def test_callers_that_arrive_during_a_write_share_the_next_one():
    changes, file = Changes(), GatedFile()
    callers = 50
    condition = WaitersSeen(expected=callers - 1)
    writer = BatchedStateWriter(file, changes.snapshot, condition)  # type: ignore[arg-type]
    errors: list[str] = []
    first = saver(writer, changes, file, errors)
    first.start()
    assert file.writing.wait(5)
    rest = [saver(writer, changes, file, errors) for _ in range(callers - 1)]
    for thread in rest:
        thread.start()
    assert condition.all_waiting.wait(5)
    file.go.set()
    for thread in [first, *rest]:
        thread.join(5)
    assert errors == []
    # The first write held the first change only; one more write, from a snapshot taken after
    # everyone arrived, covered the other 49.
    assert file.written == [1, callers]


def test_a_write_that_raised_does_not_count_and_a_caller_it_covered_writes_again():
    # The first write holds two callers up; one of them then writes for both, and that write
    # fails: its own caller gets the error, and the other one is not told "saved" on its faith.
    changes, file = Changes(), GatedFile(fail_on=2)
    condition = WaitersSeen(expected=2)
    writer = BatchedStateWriter(file, changes.snapshot, condition)  # type: ignore[arg-type]
    errors: list[str] = []
    first = saver(writer, changes, file, errors)
    first.start()
    assert file.writing.wait(5)
    pair = [saver(writer, changes, file, errors) for _ in range(2)]
    for thread in pair:
        thread.start()
    assert condition.all_waiting.wait(5)
    file.go.set()
    for thread in [first, *pair]:
        thread.join(5)
    assert errors == ["injected"]
    assert file.written == [1, 3]


def test_a_snapshot_that_raised_does_not_stop_later_saves():
    file = GatedFile()
    file.go.set()
    snapshots = iter([RuntimeError("injected"), {"value": 1}])

    def snapshot() -> dict[str, Any]:
        taken = next(snapshots)
        if isinstance(taken, Exception):
            raise taken
        return taken

    writer = BatchedStateWriter(file, snapshot)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="injected"):
        writer.save()
    later = threading.Thread(target=writer.save, daemon=True)
    later.start()
    later.join(5)
    assert not later.is_alive(), "a failed snapshot left the writer believing a write was running"
    assert file.written == [1]


def test_a_copy_of_the_paused_table_keeps_what_it_held_when_it_was_taken():
    paused = PausedApps()
    record = paused.add("db")
    record.setdefault("units", []).append("db.service")
    copy = paused.copy()
    record["units"].append("db.socket")
    paused.add("web")
    assert copy == {"db": {"units": ["db.service"]}}
    assert paused.names() == {"db", "web"}


def test_the_paused_table_is_replaced_by_what_a_previous_daemon_saved():
    paused = PausedApps()
    paused.add("gone")
    saved = {"db": {"units": ["db.service"]}}
    paused.replace(saved)
    saved["db"]["units"].append("changed later")
    assert paused.copy() == {"db": {"units": ["db.service"]}}
    assert "db" in paused and "gone" not in paused
    paused.drop("db")
    assert not paused
