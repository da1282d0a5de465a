"""The Redis helper (`quiesce redis`): BGSAVE, waited for until it has succeeded, against a fake
server that keeps Redis's rules (one RDB child at a time, the save time set only on success and
in whole seconds, BGSAVE SCHEDULE behind an AOF rewrite); the clock is fake, so nothing sleeps."""

from __future__ import annotations

import functools
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import pytest

from qgafreeze import details, paths
from qgafreeze.config import parse_text
from qgafreeze.quiesce import redis

EPOCH = 1_800_000_000.4  # the server's clock when the fake clock reads 0: mid-second


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class FakeRedis:
    """What redis-cli prints for the commands the helper sends, as Redis 7 answers them."""

    def __init__(
        self,
        clock: Clock,
        save_takes: float = 0.35,
        fails: bool = False,
        running_for: Optional[float] = None,
        aof: bool = False,
        aof_rewrite_for: Optional[float] = None,
        loading: bool = False,
    ) -> None:
        self.clock = clock
        self.save_takes = save_takes
        self.fails = fails
        self.aof = aof
        self.loading = loading
        self.last_save = int(EPOCH)  # a save ended in the very second the helper starts
        self.last_ok = True
        self.rdb_until: Optional[float] = None  # when the running save ends
        self.rdb_began = 0.0
        self.aof_until = aof_rewrite_for
        self.scheduled = False
        self.sent: list[tuple[str, ...]] = []
        self.refused: list[str] = []
        self.saves_started_at: list[float] = []  # server time of each fork
        self.others_start_before_next_bgsave = 0  # saves someone else starts (a race)
        self.time_refused = False
        if running_for is not None:
            self._fork(ends=self.clock.now + running_for)

    def wall(self) -> float:
        return EPOCH + self.clock.now

    def _fork(self, ends: float) -> None:
        self.rdb_until, self.rdb_began = ends, self.clock.now
        self.saves_started_at.append(self.wall())

    def _advance(self) -> None:
        if self.aof_until is not None and self.clock.now >= self.aof_until:
            self.aof_until = None
            if self.scheduled:  # serverCron starts the scheduled save once the child is gone
                self.scheduled = False
                self._fork(ends=self.clock.now + self.save_takes)
        if self.rdb_until is not None and self.clock.now >= self.rdb_until:
            self.rdb_until = None
            self.last_ok = not self.fails
            if not self.fails:
                self.last_save = int(self.wall())

    def info(self) -> str:
        fields = {
            "loading": int(self.loading),
            "rdb_changes_since_last_save": 12,
            "rdb_bgsave_in_progress": int(self.rdb_until is not None),
            "rdb_last_save_time": self.last_save,
            "rdb_last_bgsave_status": "ok" if self.last_ok else "err",
            "rdb_last_bgsave_time_sec": int(self.save_takes),
            "rdb_current_bgsave_time_sec": (
                int(self.clock.now - self.rdb_began) if self.rdb_until is not None else -1
            ),
            "aof_enabled": int(self.aof),
            "aof_rewrite_in_progress": int(self.aof_until is not None),
            "aof_last_write_status": "ok",
        }
        return "# Persistence\r\n" + "".join(f"{k}:{v}\r\n" for k, v in fields.items())

    def __call__(self, command: Sequence[str], timeout: Optional[float]) -> str:
        self.sent.append(tuple(command))
        self._advance()
        if command == ("INFO", "persistence"):
            return self.info()
        if command == ("TIME",):
            if self.time_refused:
                return "ERR unknown command 'TIME'"
            wall = self.wall()
            return f"{int(wall)}\n{int((wall % 1) * 1_000_000)}"
        if command == ("BGSAVE", "SCHEDULE"):
            if self.others_start_before_next_bgsave:
                self.others_start_before_next_bgsave -= 1
                self._fork(ends=self.clock.now + self.save_takes)
            if self.loading:
                return self._refuse("LOADING Redis is loading the dataset in memory")
            if self.rdb_until is not None:
                return self._refuse("ERR Background save already in progress")
            if self.aof_until is not None:
                self.scheduled = True
                return "Background saving scheduled"
            self._fork(ends=self.clock.now + self.save_takes)
            return "Background saving started"
        if command[:2] == ("CONFIG", "GET"):
            values = {"dir": "/var/lib/redis", "dbfilename": "dump.rdb", "appendfsync": "everysec"}
            return f"{command[2]}\n{values[command[2]]}"
        raise AssertionError(f"unexpected command {command}")

    def _refuse(self, error: str) -> str:
        self.refused.append(error)
        return error

    def bgsaves(self) -> int:
        return self.sent.count(("BGSAVE", "SCHEDULE"))


def saver(fake: FakeRedis, timeout: Optional[float] = None) -> tuple[redis.Saver, list[str]]:
    said: list[str] = []
    clock = fake.clock
    return redis.Saver(fake, timeout, clock, clock.sleep, said.append, fake.wall), said


def test_bgsave_is_sent_once_and_awaited_until_it_has_succeeded():
    fake = FakeRedis(Clock())
    done, said = saver(fake)

    report = done.save()

    assert fake.bgsaves() == 1
    assert fake.rdb_until is None, "returned while the save was still running"
    assert fake.last_ok and fake.last_save >= int(fake.saves_started_at[0])
    assert report["rdb"]["saved_at"] == redis.utc(fake.last_save)
    assert report["rdb"]["file"] == "/var/lib/redis/dump.rdb"
    assert report["rdb"]["waited_for_earlier_save"] is False
    assert said[-1].startswith("redis: background save done")


def test_bgsave_is_sent_only_once_the_server_clock_has_left_the_second_of_the_last_save():
    # Redis notes a save's end in whole seconds: a save ending in the second the last one ended
    # would be indistinguishable from it.
    fake = FakeRedis(Clock(), save_takes=0.05)
    done, _ = saver(fake)

    report = done.save()

    (forked,) = fake.saves_started_at
    assert int(forked) > int(EPOCH)
    assert report["rdb"]["asked_at"] == redis.utc(int(forked))
    assert fake.last_save > int(EPOCH)


def test_a_save_already_running_is_waited_for_and_then_a_fresh_one_is_started():
    # It began before the freeze was asked for: writes acknowledged since are not in it.
    fake = FakeRedis(Clock(), running_for=2.0)
    done, said = saver(fake)

    report = done.save()

    assert fake.refused == [], "BGSAVE was sent while a save was running"
    assert len(fake.saves_started_at) == 2 and fake.bgsaves() == 1
    assert fake.saves_started_at[1] >= EPOCH + 2.0
    assert report["rdb"]["waited_for_earlier_save"] is True
    assert any("already running" in line for line in said)


def test_a_save_someone_else_starts_just_before_our_bgsave_goes_first_then_ours_runs():
    fake = FakeRedis(Clock())
    fake.others_start_before_next_bgsave = 1
    done, _ = saver(fake)

    report = done.save()

    assert fake.refused == ["ERR Background save already in progress"]
    assert fake.bgsaves() == 2 and len(fake.saves_started_at) == 2
    assert report["rdb"]["waited_for_earlier_save"] is True


def test_during_an_aof_rewrite_the_save_is_scheduled_behind_it_and_awaited():
    fake = FakeRedis(Clock(), aof=True, aof_rewrite_for=1.5)
    done, said = saver(fake)

    done.save()

    assert fake.bgsaves() == 1 and fake.refused == []
    assert fake.saves_started_at[0] >= EPOCH + 1.5
    assert fake.rdb_until is None and fake.last_save >= int(EPOCH + 1.5)
    assert any("AOF rewrite" in line for line in said)


def test_a_failed_background_save_fails_with_where_to_look():
    fake = FakeRedis(Clock(), fails=True)
    done, _ = saver(fake)

    with pytest.raises(redis.RedisFailure, match=r"rdb_last_bgsave_status:err.*Redis's log"):
        done.save()


def test_a_failed_save_behind_an_aof_rewrite_is_noticed_too():
    fake = FakeRedis(Clock(), aof=True, aof_rewrite_for=0.5, fails=True)
    done, _ = saver(fake, timeout=30)

    with pytest.raises(redis.RedisFailure, match="the background save failed"):
        done.save()
    assert fake.clock.now < 5


def test_the_wait_is_bounded_by_the_timeout_and_names_what_it_waited_for():
    fake = FakeRedis(Clock(), save_takes=60)
    done, said = saver(fake, timeout=12)

    with pytest.raises(redis.RedisFailure, match=r"not done within --timeout 12s"):
        done.save()
    assert 12 <= fake.clock.now < 12.5
    # A line every few seconds, so that a kill at the app's own timeout names what was pending.
    progress = [line for line in said if line.startswith("redis: still waiting for")]
    assert len(progress) == 2 and "the background save to finish" in progress[-1]


def test_a_server_still_loading_its_dataset_is_refused_with_the_reason():
    done, _ = saver(FakeRedis(Clock(), loading=True))

    with pytest.raises(redis.RedisFailure, match=r"still loading its dataset \(loading:1\)"):
        done.save()


def test_with_aof_on_the_report_says_a_restore_loads_the_aof_and_what_it_holds():
    report = saver(FakeRedis(Clock(), aof=True))[0].save()

    assert report["aof"] == {
        "enabled": True,
        "restore_loads": "aof",
        "holds": "what Redis had written to it when the filesystems froze: every acknowledged"
        " write, unless a slow fsync made Redis hold writes back (appendfsync everysec)",
        "last_write_ok": True,
        "appendfsync": "everysec",
    }


def test_with_aof_off_the_report_says_a_restore_loads_the_rdb():
    assert saver(FakeRedis(Clock()))[0].save()["aof"] == {"enabled": False, "restore_loads": "rdb"}


def test_a_server_that_refuses_time_is_timed_by_the_local_clock():
    fake = FakeRedis(Clock())
    fake.time_refused = True
    done, _ = saver(fake)

    done.save()

    assert int(fake.saves_started_at[0]) > int(EPOCH)


def test_an_error_reply_is_named_not_a_traceback():
    def noauth(command: Sequence[str], timeout: Optional[float]) -> str:
        return "NOAUTH Authentication required."

    with pytest.raises(redis.RedisFailure, match="INFO persistence: NOAUTH Authentication"):
        redis.Saver(noauth).save()


def test_info_fields_are_read_from_the_crlf_lines_redis_cli_prints():
    text = (
        "# Persistence\r\nloading:0\r\nrdb_bgsave_in_progress:1\r\n"
        "rdb_last_save_time:1796159778\r\nrdb_last_bgsave_status:err\r\n"
        "rdb_current_bgsave_time_sec:7\r\naof_enabled:1\r\naof_rewrite_in_progress:0\r\n"
    )
    state = redis.Persistence.parse(text)

    assert (state.saving, state.last_save, state.last_ok, state.save_seconds) == (
        True,
        1796159778,
        False,
        7,
    )
    assert state.aof_enabled and not state.aof_rewriting and not state.loading


def test_our_options_come_first_and_the_rest_goes_to_redis_cli():
    assert redis.parse_args(["--timeout", "30", "-s", "/run/redis/redis.sock"]) == (
        30.0,
        ["-s", "/run/redis/redis.sock"],
    )
    assert redis.parse_args(["--timeout=5", "--", "--timeout", "1"]) == (5.0, ["--timeout", "1"])
    assert redis.parse_args(["-h", "db1", "-p", "6380"]) == (None, ["-h", "db1", "-p", "6380"])
    with pytest.raises(ValueError, match="expected seconds above 0"):
        redis.parse_args(["--timeout", "0"])


def fake_cli(tmp_path: Path, script: str) -> str:
    program = tmp_path / "redis-cli"
    program.write_text("#!/bin/sh\n" + script)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return str(program)


def test_redis_cli_gets_the_admins_options_and_no_error_repeats_them(tmp_path):
    program = fake_cli(
        tmp_path,
        f'echo "$@" > {tmp_path}/args\necho "Could not connect to Redis at db1:6380" >&2\nexit 1\n',
    )
    call = redis.redis_cli(["-h", "db1", "-p", "6380", "--pass", "s3cret"], program)

    with pytest.raises(redis.RedisFailure) as failed:
        call(["INFO", "persistence"], 5)

    assert (tmp_path / "args").read_text().split() == [
        *("-h", "db1", "-p", "6380", "--pass", "s3cret", "INFO", "persistence"),
    ]
    assert str(failed.value) == "redis-cli INFO persistence: Could not connect to Redis at db1:6380"


def test_the_password_reaches_redis_cli_through_rediscli_auth_not_its_command_line(
    tmp_path, monkeypatch
):
    program = fake_cli(tmp_path, f'echo "$REDISCLI_AUTH" > {tmp_path}/auth\necho "$@"\n')
    monkeypatch.setenv("REDISCLI_AUTH", "s3cret")

    assert redis.redis_cli([], program)(["TIME"], 5) == "TIME"
    assert (tmp_path / "auth").read_text() == "s3cret\n"


def test_a_missing_redis_cli_is_named(tmp_path):
    with pytest.raises(redis.RedisFailure, match="not found"):
        redis.redis_cli([], str(tmp_path / "absent"))(["TIME"], 5)


def test_main_prints_report_lines_that_the_daemon_takes_as_details(monkeypatch, capsys):
    fake = FakeRedis(Clock(), save_takes=0.0)
    seen: list[list[str]] = []

    def cli(options: Sequence[str], program: str = "redis-cli") -> redis.Call:
        seen.append(list(options))
        return fake

    monkeypatch.setattr(redis, "redis_cli", cli)
    clock = fake.clock
    fake_time = functools.partial(redis.Saver, clock=clock, sleep=clock.sleep, wall=fake.wall)
    monkeypatch.setattr(redis, "Saver", fake_time)

    assert redis.main(["--timeout", "20", "-p", "6380"]) == 0

    assert seen == [["-p", "6380"]]
    found: dict[str, Any] = {}
    details.collect(capsys.readouterr().out.splitlines(), found, pytest.fail, "redis")
    assert set(found) == {"rdb", "aof"}
    assert found["rdb"]["saved_at"] == redis.utc(fake.last_save)
    json.dumps(found)


def test_main_fails_with_status_1_and_the_reason_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(redis, "redis_cli", lambda options: FakeRedis(Clock(), loading=True))

    assert redis.main([]) == 1
    assert "loading:1" in capsys.readouterr().err


def test_a_bad_timeout_is_a_usage_error():
    assert redis.main(["--timeout", "soon"]) == 64


def test_the_preset_runs_the_helper_as_its_freeze_step_and_nothing_at_thaw():
    app = parse_text("apps:\n  cache: {preset: redis}\n").app("cache")

    (step,) = app.freeze
    assert step.argv == (paths.QUIESCE, "redis")
    assert app.thaw == () and app.session is None


def test_the_helper_is_found_by_the_dispatcher():
    from qgafreeze import quiesce

    assert "redis" in quiesce.helpers()
    assert os.path.basename(redis.__file__) == "redis.py"
