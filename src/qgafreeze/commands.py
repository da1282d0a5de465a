"""Running commands for apps: one-shot steps and sessions held from freeze to thaw.

Every child runs in its own session with a clean environment, in a cgroup of its own
(``containment``), so that ending it ends everything it started, even what called setsid(), and
nothing is left holding qemu-ga's pipe.  Run as another user (``user:``), it is that user whole:
uid and primary gid (real, effective and saved), the user's own supplementary groups and none of
the daemon's, and an ordinary OOM score rather than the daemon's -500.  No shell is involved
unless the config says ``shell:`` (but for the gate, ``containment.start``).  Output is read
through a pseudo-terminal for sessions: database clients buffer their output on a pipe, and a
held session must show its ``ready`` line while it keeps running.
"""

from __future__ import annotations

import os
import pty
import pwd
import re
import select
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from . import details
from .containment import Child, Jail, new_jail, start
from .errors import ActionTimeout, CommandFailed
from .paths import SAFE_PATH
from .sessioninput import SessionInput

OUTPUT_LINES = 200  # kept per command for the logs; the rest is counted, not stored
LINE_LIMIT = 2000
READ_SIZE = 65536
POLL = 0.05  # how often a process is checked for where the kernel cannot say (no pidfd)


@dataclass(frozen=True)
class Outcome:
    status: int  # exit status, or 128 + signal number
    output: tuple[str, ...]
    reports: tuple[str, ...] = ()  # its qgafreeze-report lines, whole (``details``)


def _account(user: str | None) -> Optional[pwd.struct_passwd]:
    if user is None:
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise CommandFailed(f"no such user {user!r}") from None


def workdir(user: str | None, cwd: str | None) -> str:
    """The working directory a command runs in: ``cwd``, else the home directory of ``user``
    (root's without one) if it is a directory, else /.  An unknown user's is / (``spawn`` then
    refuses to run as it; the trust check judges from there)."""
    try:
        entry = _account(user)
    except CommandFailed:
        return cwd or "/"
    return _workdir(entry, cwd)


def _workdir(entry: Optional[pwd.struct_passwd], cwd: str | None) -> str:
    home = "/root" if entry is None else entry.pw_dir
    return cwd or (home if os.path.isdir(home) else "/")


def _check_program(program: str, search_path: str, cwd: str) -> None:
    """Fail as Popen failed before the gate: at the gate the shell would only print it."""
    if "/" in program:
        candidates = [os.path.join(cwd, program)]
    else:
        candidates = [os.path.join(cwd, d, program) for d in search_path.split(os.pathsep)]
    if any(os.path.isfile(c) and os.access(c, os.X_OK) for c in candidates):
        return
    why = "Permission denied" if any(os.path.exists(c) for c in candidates) else None
    raise CommandFailed(f"{program}: cannot run: {why or 'No such file or directory'}")


class Lines:
    """Collects output lines from a file descriptor, keeping the first OUTPUT_LINES; and aside,
    whole and wherever they come, its report lines (up to ``details.KEPT`` bytes)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.dropped = 0
        self.reports: list[str] = []
        self._report_bytes = 0
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        # A report line may be longer than others (its collector then says it is too long).
        report = self._partial.startswith(details.PREFIX.encode())
        if len(self._partial) > (details.LIMIT + 1 if report else LINE_LIMIT):
            complete.append(self._partial)
            self._partial = b""
        whole = [c.decode("utf-8", "replace").rstrip("\r") for c in complete]
        for line in whole:
            if details.is_report(line):
                self._keep_report(line)
        new = [line[:LINE_LIMIT] for line in whole]
        for line in new:
            if len(self.lines) < OUTPUT_LINES:
                self.lines.append(line)
            else:
                self.dropped += 1
        return new

    def _keep_report(self, line: str) -> None:
        if self._report_bytes > details.KEPT:
            return
        self._report_bytes += len(line)
        self.reports.append(line if self._report_bytes <= details.KEPT else details.OVERFLOW)

    def finish(self) -> tuple[str, ...]:
        if self._partial:
            self.feed(b"\n")
        if self.dropped:
            self.lines.append(f"({self.dropped} more lines not kept)")
            self.dropped = 0
        return tuple(self.lines)


def spawn(
    argv: Sequence[str],
    user: str | None,
    env: Sequence[tuple[str, str]],
    cwd: str | None,
    output: int,
    keep_stdin: bool = False,
    extra_env: dict[str, str] | None = None,
    jails: Callable[[], Jail] = new_jail,
) -> Child:
    """Start a child in a jail of its own, with a clean environment, as ``user`` (its uid, gid
    and groups, as initgroups(3) gives them).  Its stdin is /dev/null, or with ``keep_stdin`` a
    pipe the caller writes to."""
    entry = _account(user)
    # A clean environment: nothing inherited from the daemon.
    home, name = ("/root", "root") if entry is None else (entry.pw_dir, entry.pw_name)
    environ = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": home, "USER": name, "LOGNAME": name}
    environ.update(env)
    for variable, value in (extra_env or {}).items():
        environ.setdefault(variable, value)  # the config's env wins
    where = _workdir(entry, cwd)
    _check_program(argv[0], environ.get("PATH", os.defpath), where)
    identity = None
    if entry is not None:
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        identity = (entry.pw_uid, entry.pw_gid, groups)
    return start(argv, environ, where, output, keep_stdin, identity, jails)


def run(
    argv: Sequence[str],
    deadline: float,
    user: str | None = None,
    env: Sequence[tuple[str, str]] = (),
    cwd: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Outcome:
    """Run a command to completion by ``deadline``; its output (stdout and stderr) is returned.
    ``extra_env``: variables the daemon sets (QGAFREEZE_CYCLE), unless ``env`` sets them.

    On timeout it is killed with everything it started and ActionTimeout raised; what it leaves
    running when it exits is killed too.
    """
    child = spawn(argv, user, env, cwd, subprocess.PIPE, extra_env=extra_env)
    stdout = child.process.stdout
    assert stdout is not None
    lines = Lines()
    try:
        read_output(child, lines, deadline, f"{argv[0]}: ")
        status = child.wait(deadline)
        if status is None:
            child.end()
            raise ActionTimeout(f"{argv[0]}: closed its output but did not exit by its deadline")
        child.close()
    finally:
        stdout.close()
    output = lines.finish()
    return Outcome(status=status, output=output, reports=tuple(lines.reports))


def read_output(
    child: Child, lines: Lines, deadline: float, prefix: str = "", until_exit: bool = False
) -> bool:
    """Read the child's output pipe into ``lines`` until every writer has closed it, or with
    ``until_exit`` until its leader has exited; whether the pipe is still open.

    One read per wake-up, then the deadline again: a writer that never stops (``yes``) never
    lets the pipe run empty.  At ``deadline`` the child is ended with all it started and
    ActionTimeout raised (its message after ``prefix``).
    """
    stdout = child.process.stdout
    assert stdout is not None
    fd = stdout.fileno()
    os.set_blocking(fd, False)
    exited = _exit_notifier(child.pid) if until_exit else None
    pipe_open = True
    try:
        while child.status() is None if until_exit else pipe_open:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                child.end()
                output = lines.finish()
                raise ActionTimeout(
                    f"{prefix}still running at its deadline; killed with all it started"
                    + (f" (last output: {output[-1]})" if output else "")
                )
            watched = [fd] if pipe_open else []
            if exited is not None:
                watched.append(exited)
            elif until_exit:
                remaining = min(remaining, POLL)
            ready, _, _ = select.select(watched, [], [], remaining)
            if fd in ready:
                pipe_open = read_once(fd, lines)
    finally:
        if exited is not None:
            os.close(exited)
    return pipe_open


def read_once(fd: int, lines: Lines) -> bool:
    """One read from the non-blocking ``fd`` into ``lines``; False once every writer has closed
    it."""
    try:
        data = os.read(fd, READ_SIZE)
    except BlockingIOError:
        return True
    if data:
        lines.feed(data)
    return bool(data)


def _exit_notifier(pid: int) -> Optional[int]:
    """A file descriptor that turns readable when ``pid`` exits (Linux 5.3+), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class HeldSession:
    """A process kept running from freeze to thaw, fed through stdin, read through a pty.

    What it is sent is written by a thread of its own (``SessionInput``): a session that stops
    reading fails its app at the caller's deadline instead of blocking it for ever.
    """

    def __init__(
        self,
        argv: Sequence[str],
        user: str | None,
        env: Sequence[tuple[str, str]],
        cwd: str | None,
        on_exit: Callable[[int], None],
        extra_env: dict[str, str] | None = None,
    ) -> None:
        master, slave = pty.openpty()
        try:
            variables = {"TERM": "dumb", **(extra_env or {})}
            self._child = spawn(argv, user, env, cwd, slave, True, variables)
        except CommandFailed:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.pid = self._child.pid
        self._master = master
        self._lines = Lines()
        self._recent: deque[str] = deque(maxlen=20)
        self._new_line = threading.Condition()
        self._closed = False
        self._eof = threading.Event()  # the drain thread has read everything the session wrote
        self._on_exit = on_exit
        # An exit is news (on_exit) only once ``ready`` was seen and before finish/kill: before,
        # nothing is held yet (a wrong password) and wait_for tells the caller.  The three below
        # are guarded by _new_line; on_exit is called by whichever of the exit and the ready
        # line is noticed second.
        self._held = False
        self._expected_exit = False
        self._exit_status: Optional[int] = None
        stdin = self._child.process.stdin
        assert stdin is not None
        self._input = SessionInput(stdin, lambda: not self.running, f"session-in-{self.pid}")
        threading.Thread(target=self._drain, name=f"session-{self.pid}", daemon=True).start()

    def _drain(self) -> None:
        # Keep reading so the client never blocks on a full terminal, and notice its exit.
        while True:
            try:
                data = os.read(self._master, READ_SIZE)
            except OSError:  # EIO: every writer of the pty is gone
                data = b""
            with self._new_line:
                if data:
                    self._recent.extend(self._lines.feed(data))
                else:
                    self._closed = True
                self._new_line.notify_all()
            if not data:
                break
        self._eof.set()
        status = self._child.wait(None)
        os.close(self._master)
        with self._new_line:
            self._exit_status = status
            news = self._held and not self._expected_exit
        if news and status is not None:
            self._on_exit(status)

    def send(self, text: str, deadline: Optional[float] = None) -> None:
        """Queue ``text`` for its stdin; with ``deadline``, wait until its pipe has accepted it
        (see ``SessionInput.send``); without, ``wait_for``'s deadline bounds it."""
        self._input.send(text, deadline)

    def wait_for(self, pattern: str, deadline: float) -> None:
        """Return once an output line matches ``pattern``; the session keeps running."""
        regex = re.compile(pattern)
        seen = 0
        with self._new_line:
            while not any(regex.search(line) for line in self._lines.lines[seen:]):
                seen = len(self._lines.lines)
                if self._closed:
                    raise CommandFailed(
                        f"session ended before it was ready: {self.tail() or 'no output'}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ActionTimeout(
                        f"session not ready by its deadline{self._input.unread()}:"
                        f" {self.tail() or 'no output'}"
                    )
                self._new_line.wait(remaining)
            self._held = True
            gone = None if self._expected_exit else self._exit_status
        if gone is not None:  # it exited even before its ready line was read here
            self._on_exit(gone)

    def tail(self) -> str:
        return " | ".join(self._recent)

    @property
    def running(self) -> bool:
        return self._child.status() is None

    @property
    def returncode(self) -> Optional[int]:
        return self._child.status()

    def finish(self, close_text: str, deadline: float) -> int:
        """Send ``close_text``, end stdin, wait for the exit (killing all it started if it
        lingers); what it leaves running is killed."""
        with self._new_line:
            self._expected_exit = True
        if self.running:
            try:
                self.send(close_text)
            except CommandFailed:
                pass
        self._input.close()
        status = self._child.wait(max(time.monotonic() + 0.1, deadline))
        if status is None:
            self._child.end()
            raise ActionTimeout(
                f"session did not exit after its close text{self._input.unread()};"
                " killed with all it started"
            )
        self._child.close()
        self._eof.wait(1.0)  # its last words, for the logs (bounded: a grandchild may hold the pty)
        return status

    def kill(self) -> None:
        with self._new_line:
            self._expected_exit = True
        self._child.end()
        self._input.close()

    def output(self) -> tuple[str, ...]:
        with self._new_line:
            return tuple(self._lines.lines)

    def reports(self) -> tuple[str, ...]:
        """Its qgafreeze-report lines so far (see ``Lines``)."""
        with self._new_line:
            return tuple(self._lines.reports)
