"""Redis: a background save (BGSAVE) that has finished, and succeeded, before the freeze.

The ``redis`` preset's freeze step: ``quiesce redis [--timeout SECONDS] [--] [REDIS-CLI OPTION
...]``.  The options after ours go to every ``redis-cli`` it runs (``-h``, ``-p``, ``-s``,
``--user``, ``--tls`` ...); a password belongs in ``REDISCLI_AUTH`` (the step's ``env:``), never
on a command line, which the hook log shows.  Nothing here prints those options.

Why not ``SAVE``: it dumps the dataset in Redis's one thread, so no client is answered until the
file is written (32 s for 3 million keys in a Debian 12 guest).  ``BGSAVE`` forks and the parent
goes on serving; this program waits, bounded, for that save to end and checks that it succeeded.

What the RDB file must hold: every write acknowledged before the freeze was asked for.  Hence:

- A save already running began before that, so it may miss writes acknowledged since: wait for
  it to end, then start our own.  Sending BGSAVE while it runs would only be refused
  ("Background save already in progress"), never doubled.  A save that someone else starts
  between our look and our BGSAVE gets the same treatment.
- ``BGSAVE SCHEDULE`` (Redis 3.2.2 and later): while an AOF rewrite runs, Redis schedules the
  save for when it ends, instead of refusing it.
- Done when no save is running, ``rdb_last_save_time`` is at or after the second in which BGSAVE
  was sent (by the server's clock, ``TIME``) and ``rdb_last_bgsave_status:ok``.  Redis sets that
  time only when a save succeeds, and in whole seconds: so BGSAVE is sent only once the server's
  clock has left the second of the previous save, and a save ending in that second is never
  taken for ours.

With AOF on, Redis loads the AOF at start, not the RDB: the report says so (``aof``).  The
snapshot's AOF holds what Redis had written to it when the filesystems froze (the freeze writes
its pages out, whatever ``appendfsync`` says): every acknowledged write, unless a slow fsync made
Redis hold writes back, which ``appendfsync everysec`` allows.  Report lines: ``qgafreeze-report
rdb {...}`` and ``qgafreeze-report aof {...}`` (the cycle report's details).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

USAGE = "usage: quiesce redis [--timeout SECONDS] [--] [REDIS-CLI OPTION ...]"
POLL = 0.1  # how often INFO persistence is read while waiting
PROGRESS_EVERY = 5.0  # a line saying what is awaited, so that a kill at the deadline names it
# A Redis error reply as redis-cli prints it: an upper-case code first (ERR, NOAUTH, LOADING...).
_ERROR = re.compile(r"^(?:\(error\) )?[A-Z][A-Z_]+ ")

# Runs redis-cli with these arguments (after the admin's options), within ``timeout`` seconds
# (None: no bound), and returns what it printed.
Call = Callable[[Sequence[str], Optional[float]], str]


class RedisFailure(Exception):
    """Why the save cannot be vouched for; printed as the step's last line."""


def redis_cli(options: Sequence[str], program: str = "redis-cli") -> Call:
    """A ``Call`` through the real ``redis-cli`` with ``options`` (host, port, socket, user)."""

    def call(command: Sequence[str], timeout: Optional[float]) -> str:
        what = " ".join(command)
        try:
            done = subprocess.run(
                [program, *options, *command],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            raise RedisFailure(f"{program}: not found (Debian's redis-tools has it)") from None
        except subprocess.TimeoutExpired:
            raise RedisFailure(f"redis-cli {what}: no answer by the deadline") from None
        out = done.stdout.strip()
        if done.returncode != 0 or not out:
            # stderr says why (connection refused, a bad option); it never echoes the options.
            said = (done.stderr.strip() or out or f"exit status {done.returncode}").splitlines()
            raise RedisFailure(f"redis-cli {what}: {said[-1]}")
        return out

    return call


def error_reply(text: str) -> Optional[str]:
    """The error Redis answered with, or None when ``text`` is a reply."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if _ERROR.match(first) else None


def parse_info(text: str) -> dict[str, str]:
    """``INFO`` output as a dict: ``key:value`` lines; section headers and blanks skipped."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value
    return fields


@dataclass(frozen=True)
class Persistence:
    """What ``INFO persistence`` says about saving (the same fields on Redis 6.0 to 8)."""

    loading: bool
    saving: bool  # rdb_bgsave_in_progress
    last_save: int  # rdb_last_save_time: the end of the last successful save (or the start)
    last_ok: bool  # rdb_last_bgsave_status
    save_seconds: int  # rdb_current_bgsave_time_sec: how long the running save has taken
    last_save_seconds: int  # rdb_last_bgsave_time_sec: how long the last one took
    aof_enabled: bool
    aof_rewriting: bool
    aof_write_ok: bool

    @classmethod
    def parse(cls, text: str) -> Persistence:
        fields = parse_info(text)
        try:
            return cls(
                loading=fields.get("loading", "0") == "1",
                saving=fields["rdb_bgsave_in_progress"] == "1",
                last_save=int(fields["rdb_last_save_time"]),
                last_ok=fields["rdb_last_bgsave_status"] == "ok",
                save_seconds=int(fields.get("rdb_current_bgsave_time_sec", "-1")),
                last_save_seconds=int(fields.get("rdb_last_bgsave_time_sec", "-1")),
                aof_enabled=fields.get("aof_enabled", "0") == "1",
                aof_rewriting=fields.get("aof_rewrite_in_progress", "0") == "1",
                aof_write_ok=fields.get("aof_last_write_status", "ok") == "ok",
            )
        except (KeyError, ValueError):
            said = error_reply(text) or (text.strip().splitlines() or ["nothing"])[0]
            raise RedisFailure(f"INFO persistence: not what Redis answers: {said}") from None


def utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class Saver:
    """The decisions above, against a ``Call``; clock, sleep and output injected for tests."""

    def __init__(
        self,
        call: Call,
        timeout: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        say: Callable[[str], None] = print,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._call = call
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self._say = say
        self._wall = wall
        self._deadline = None if timeout is None else clock() + timeout
        self._waited = False  # for a save that was running before ours

    def _remaining(self) -> Optional[float]:
        return None if self._deadline is None else max(0.0, self._deadline - self._clock())

    def _send(self, command: Sequence[str]) -> str:
        remaining = self._remaining()
        if remaining is not None and remaining <= 0:
            raise RedisFailure(
                f"not done within --timeout {self._timeout:g}s (Redis goes on with any save it"
                " started); no snapshot can hold it"
            )
        return self._call(command, remaining)

    def _ask(self, *command: str) -> str:
        reply = self._send(command)
        said = error_reply(reply)
        if said is not None:
            raise RedisFailure(f"{' '.join(command)}: {said}")
        return reply

    def state(self) -> Persistence:
        return Persistence.parse(self._ask("INFO", "persistence"))

    def _server_time(self) -> tuple[int, int]:
        """The server's clock, seconds and microseconds (the local one if TIME is refused)."""
        try:
            seconds, micros = self._ask("TIME").split()[:2]
            return int(seconds), int(micros)
        except (RedisFailure, ValueError):
            now = self._wall()
            return int(now), int((now % 1) * 1_000_000)

    def _wait(self, what: str, done: Callable[[Persistence], bool]) -> Persistence:
        """Read the state until ``done`` says so, saying what is awaited now and then."""
        self._say(f"redis: waiting for {what}")
        started = self._clock()
        note = started + PROGRESS_EVERY
        while True:
            state = self.state()
            if done(state):
                return state
            now = self._clock()
            if self._deadline is not None and now >= self._deadline:
                raise RedisFailure(
                    f"{what}: not done within --timeout {self._timeout:g}s (Redis goes on"
                    " with any save it started); no snapshot can hold it"
                )
            if now >= note:
                self._say(f"redis: still waiting for {what} ({now - started:.0f} s)")
                note += PROGRESS_EVERY
            remaining = self._remaining()
            self._sleep(POLL if remaining is None else min(POLL, remaining))

    def _idle(self, state: Persistence) -> Persistence:
        if not state.saving:
            return state
        self._waited = True
        return self._wait(
            f"the background save already running (for {max(state.save_seconds, 0)} s) to"
            " end: it began before this freeze was asked for, so another follows it",
            lambda s: not s.saving,
        )

    def _past_second_of(self, last_save: int) -> int:
        """Once the server's clock has left ``last_save``'s second, that second."""
        while True:
            seconds, micros = self._server_time()
            if seconds > last_save:
                return seconds
            self._sleep((1_000_000 - micros) / 1_000_000 + 0.005)

    def _start(self, state: Persistence) -> tuple[int, bool, Persistence]:
        """BGSAVE once no save runs: the second it was sent in, whether it was only scheduled
        (behind an AOF rewrite), and the state just before."""
        while True:
            state = self._idle(state)
            asked = self._past_second_of(state.last_save)
            reply = self._send(("BGSAVE", "SCHEDULE")).strip()
            if reply.startswith("Background saving started"):
                return asked, False, state
            if "scheduled" in reply:
                self._say("redis: an AOF rewrite is running; the save starts when it ends")
                return asked, True, state
            if "already in progress" not in reply:
                raise RedisFailure(f"BGSAVE refused: {reply.splitlines()[0] if reply else ''}")
            state = self.state()  # someone else's save began after our look: it goes first

    def save(self) -> dict[str, Any]:
        """Run the save; the report's details: ``rdb`` and ``aof``."""
        before = self.state()
        if before.loading:
            raise RedisFailure(
                "Redis is still loading its dataset (loading:1) and refuses BGSAVE until it is"
                " done; try the backup again then"
            )
        asked, scheduled, state = self._start(before)
        seen = not scheduled  # "started" means it is running now

        def finished(now: Persistence) -> bool:
            nonlocal seen
            if now.saving:
                seen = True
                return False
            if now.last_save >= asked:
                if now.last_ok:
                    return True
                raise RedisFailure(
                    "a background save failed after ours (rdb_last_bgsave_status:err):"
                    " see Redis's log"
                )
            if seen or (state.last_ok and not now.last_ok):
                raise RedisFailure(
                    "the background save failed (rdb_last_bgsave_status:err); Redis's log says"
                    " why (often a full disk, or a fork refused: vm.overcommit_memory)"
                )
            return False

        done = self._wait("the background save to finish", finished)
        self._say(f"redis: background save done ({max(done.last_save_seconds, 0)} s)")
        return {"rdb": self._rdb(done, asked, self._waited), "aof": self._aof(done)}

    def _config(self, name: str) -> Optional[str]:
        """A CONFIG GET value, or None where CONFIG is renamed, refused or unknown."""
        try:
            lines = self._ask("CONFIG", "GET", name).splitlines()
        except RedisFailure:
            return None
        return lines[1].strip() if len(lines) >= 2 and lines[0].strip() == name else None

    def _rdb(self, done: Persistence, asked: int, earlier: bool) -> dict[str, Any]:
        rdb: dict[str, Any] = {
            "saved_at": utc(done.last_save),
            "asked_at": utc(asked),
            "took_s": max(done.last_save_seconds, 0),
            "waited_for_earlier_save": earlier,
        }
        directory, name = self._config("dir"), self._config("dbfilename")
        if directory and name:
            rdb["file"] = name if name.startswith("/") else f"{directory.rstrip('/')}/{name}"
        return rdb

    def _aof(self, done: Persistence) -> dict[str, Any]:
        if not done.aof_enabled:
            return {"enabled": False, "restore_loads": "rdb"}
        aof: dict[str, Any] = {
            "enabled": True,
            # Redis loads the AOF at start when appendonly is on: it is what a restore gets.
            "restore_loads": "aof",
            # The freeze writes out the file's pages, whatever appendfsync says; but with
            # everysec Redis holds writes back (and acknowledges them) behind a slow fsync.
            "holds": "what Redis had written to it when the filesystems froze: every"
            " acknowledged write, unless a slow fsync made Redis hold writes back"
            " (appendfsync everysec)",
            "last_write_ok": done.aof_write_ok,
        }
        fsync = self._config("appendfsync")
        if fsync:
            aof["appendfsync"] = fsync
        if not done.aof_write_ok:
            aof["holds"] = "not every write: Redis's last AOF write failed (see its log)"
        return aof


def parse_args(args: Sequence[str]) -> tuple[Optional[float], list[str]]:
    """Our options first (``--timeout``), then, after an optional ``--``, redis-cli's."""
    timeout: Optional[float] = None
    rest = list(args)
    while rest:
        arg = rest[0]
        if arg == "--":
            rest.pop(0)
            break
        if arg == "--timeout" or arg.startswith("--timeout="):
            rest.pop(0)
            value = arg.partition("=")[2] if "=" in arg else (rest.pop(0) if rest else "")
            try:
                timeout = float(value)
            except ValueError:
                raise ValueError(f"--timeout: expected seconds, got {value!r}") from None
            if not timeout > 0:
                raise ValueError(f"--timeout: expected seconds above 0, got {value!r}")
            continue
        break
    return timeout, rest


def main(args: list[str]) -> int:
    if args[:1] == ["--help"]:  # not -h: that is redis-cli's host
        print(USAGE)
        return 0
    try:
        timeout, options = parse_args(args)
    except ValueError as exc:
        print(f"redis: {exc}\n{USAGE}", file=sys.stderr, flush=True)
        return 64
    saver = Saver(redis_cli(options), timeout, say=lambda line: print(line, flush=True))
    try:
        details = saver.save()
    except RedisFailure as exc:
        print(f"redis: {exc}", file=sys.stderr, flush=True)
        return 1
    for key, value in details.items():
        print(f"qgafreeze-report {key} {json.dumps(value, sort_keys=True)}", flush=True)
    return 0
