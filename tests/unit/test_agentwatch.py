"""Catching qemu-ga leaving its frozen state without a thaw hook, on a real inotify watch."""

from __future__ import annotations

import threading

from qgafreeze.agentwatch import AgentFlagWatch


class Lost:
    def __init__(self) -> None:
        self.cycles: list[str] = []
        self.fired = threading.Event()

    def __call__(self, cycle: str) -> None:
        self.cycles.append(cycle)
        self.fired.set()


def test_flag_removed_with_no_thaw_reports_the_cycle(tmp_path):
    flag = tmp_path / "qga.state.isfrozen"
    lost = Lost()
    watch = AgentFlagWatch(str(flag), lost, grace=0.05)
    watch.arm("c1")
    flag.touch()  # qemu-ga marks itself frozen ...
    flag.unlink()  # ... and unmarks at once: it froze nothing
    assert lost.fired.wait(5)
    assert lost.cycles == ["c1"]


def test_thaw_within_the_grace_period_cancels_it(tmp_path):
    flag = tmp_path / "qga.state.isfrozen"
    lost = Lost()
    watch = AgentFlagWatch(str(flag), lost, grace=0.3)
    watch.arm("c1")
    flag.touch()
    flag.unlink()
    watch.disarm()  # the thaw hook arrived
    assert not lost.fired.wait(0.6)


def test_nothing_is_reported_while_disarmed(tmp_path):
    flag = tmp_path / "qga.state.isfrozen"
    lost = Lost()
    watch = AgentFlagWatch(str(flag), lost, grace=0.01)
    flag.touch()
    flag.unlink()
    watch.arm("c1")
    watch.disarm()
    flag.touch()
    flag.unlink()
    assert not lost.fired.wait(0.3)


def test_other_files_in_the_directory_are_ignored(tmp_path):
    lost = Lost()
    watch = AgentFlagWatch(str(tmp_path / "qga.state.isfrozen"), lost, grace=0.01)
    watch.arm("c1")
    other = tmp_path / "qga.state"
    other.touch()
    other.unlink()
    assert not lost.fired.wait(0.3)


def test_a_retargeted_watch_follows_the_new_flag_and_ignores_the_old_one(tmp_path):
    old, new = tmp_path / "old" / "isfrozen", tmp_path / "new" / "isfrozen"
    old.parent.mkdir()
    new.parent.mkdir()
    lost = Lost()
    watch = AgentFlagWatch(str(old), lost, grace=0.01)
    watch.retarget(str(new))  # a reload changed settings.agent_state_file
    watch.arm("c2")
    old.touch()
    old.unlink()
    assert not lost.fired.wait(0.3)
    new.touch()
    new.unlink()
    assert lost.fired.wait(5)
    assert lost.cycles == ["c2"]
