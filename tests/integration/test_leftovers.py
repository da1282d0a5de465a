"""Issue 15's stuck daemon, with the real systemd: an app whose stop hangs past its timeout fails
the freeze, and its rollback's start, queued by systemd behind that stop, times out too.  systemd
starts the app once the stop gives up; the daemon must notice by itself, and the next freeze,
with no thaw sent in between, must succeed.  Every refusal meanwhile is in both logs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from container import Container
from helpers import HOOK_LOG, active, configure, cycle_of, hook, hook_log, status

from qgafreeze.logs import MSG_REFUSED

UNIT = "qgft-hang.service"
HANG = "/run/qgft-hang"
# While HANG exists, the stop hangs (sleep 30) past the app's timeout (1 s) until systemd gives
# up on it at its TimeoutStopSec (10 s), kills it, and runs the start that the rollback queued
# behind it.  Without HANG the stop is quick: the next backup's freeze can succeed.
HANGING_STOP = f"""[Service]
ExecStart=/bin/sleep infinity
ExecStop=/bin/sh -c 'test -e {HANG} && exec sleep 30; true'
TimeoutStopSec=10
"""
CONFIG = "version: 1\nsettings: {max_frozen: 0}\napps:\n  hang: {units: [qgft-hang], timeout: 1s}\n"


@pytest.fixture
def hanging(installed: Container) -> Iterator[Container]:
    installed.install_unit(UNIT, HANGING_STOP)
    configure(installed, CONFIG, start=(UNIT,))
    yield installed
    installed.run(["rm", "-f", HANG])
    wait_for(lambda: active(installed, UNIT) == ["active"], 20)
    hook(installed, "thaw")
    assert active(installed, UNIT) == ["active"], "the test left the app down"
    installed.run(["rm", "-f", f"/run/systemd/system/{UNIT}"])
    installed.run(["systemctl", "daemon-reload"])


def wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def freeze_whose_rollback_times_out(c: Container) -> tuple[float, str]:
    c.run(["touch", HANG])
    started = time.monotonic()
    code, out = hook(c, "freeze")
    c.run(["rm", HANG])  # this stop still hangs; the next one will not
    assert code == 1, out
    assert "[timeout]" in out, out
    assert status(c)["paused_apps"] == ["hang"]  # the rollback's start timed out: left over
    assert active(c, UNIT) != ["active"]
    return started, cycle_of(out)


def test_the_next_freeze_succeeds_once_the_app_is_back_with_no_thaw_in_between(hanging):
    c = hanging
    started, _ = freeze_whose_rollback_times_out(c)

    code, out = hook(c, "freeze")  # still down: re-checked, and refused

    assert code == 1, out
    assert "still paused by an earlier cycle: hang" in out, out
    assert active(c, UNIT) != ["active"], "the app came back too soon for this test"
    assert wait_for(lambda: active(c, UNIT) == ["active"], 20), "systemd never started it"
    back = time.monotonic()

    code, out = hook(c, "freeze")  # no thaw in between

    assert code == 0, out
    print(f"app back {back - started:.1f} s after the first freeze; next freeze ok")
    assert status(c)["state"] == "frozen"
    assert hook(c, "thaw")[0] == 0
    log = hook_log(c)
    assert "qgafreeze freeze refused [bad-state]: apps still paused by an earlier cycle: hang" in (
        log
    ), log
    refusals = [
        r
        for r in c.journal(MESSAGE_ID=MSG_REFUSED, QGAFREEZE_ERROR="bad-state")
        if "still paused by an earlier cycle: hang" in r["MESSAGE"]
    ]
    assert refusals
    assert all(r["PRIORITY"] == "4" and r["QGAFREEZE_OP"] == "freeze" for r in refusals)


def test_what_a_timed_out_rollback_left_is_found_running_again_without_any_request(hanging):
    c = hanging
    started, cycle = freeze_whose_rollback_times_out(c)
    assert status(c)["retry_in_s"] is not None

    assert wait_for(lambda: status(c)["paused_apps"] == [], 30), status(c)

    print(f"healed {time.monotonic() - started:.1f} s after the freeze, with no request")
    assert active(c, UNIT) == ["active"]
    assert status(c)["retry_in_s"] is None
    assert c.journal(QGAFREEZE_CYCLE=cycle, QGAFREEZE_REASON="retry", QGAFREEZE_RESULT="ok")
    assert hook(c, "freeze")[0] == 0
    assert hook(c, "thaw")[0] == 0
    assert "qgafreeze:hang thaw" in c.run(["cat", HOOK_LOG]).stdout
