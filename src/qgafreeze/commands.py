"""Running commands for apps: one-shot steps and sessions held from freeze to thaw.

Every child runs in its own session (process group) with a clean environment and, when asked,
as another user, so that a timeout can kill it with everything it started and nothing is left
holding qemu-ga's pipe.  No shell is involved unless the config says ``shell:``.  Output is read
through a pseudo-terminal for sessions: database clients buffer their output on a pipe, and a
held session must show its ``ready`` line while it keeps running.
"""

from __future__ import annotations

import os
import pty
import pwd
import re
import select
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import ActionTimeout, CommandFailed
from .paths import SAFE_PATH

KILL_GRACE = 2.0  # between SIGTERM and SIGKILL of a process group
OUTPUT_LINES = 200  # kept per command for the logs; the rest is counted, not stored
LINE_LIMIT = 2000


@dataclass(frozen=True)
class Outcome:
    status: int  # exit status, or 128 + signal number
    output: tuple[str, ...]


def environment(user: str | None, extra: Sequence[tuple[str, str]]) -> tuple[dict[str, str], str]:
    """A clean environment (nothing inherited from the daemon) and the home directory."""
    if user is None:
        home, name = "/root", "root"
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise CommandFailed(f"no such user {user!r}") from None
        home, name = entry.pw_dir, entry.pw_name
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": home, "USER": name, "LOGNAME": name}
    env.update(extra)
    return env, home


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def kill_group(process: subprocess.Popen[bytes], grace: float = KILL_GRACE) -> None:
    """SIGTERM the whole process group, SIGKILL it if anything is left after ``grace``."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; children it left in the group go too.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


class Lines:
    """Collects output lines from a file descriptor, keeping the first OUTPUT_LINES."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.dropped = 0
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        if len(self._partial) > LINE_LIMIT:
            complete.append(self._partial)
            self._partial = b""
        new = [c.decode("utf-8", "replace").rstrip("\r")[:LINE_LIMIT] for c in complete]
        for line in new:
            if len(self.lines) < OUTPUT_LINES:
                self.lines.append(line)
            else:
                self.dropped += 1
        return new

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
    stdin: int,
    output: int,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, clean environment, as ``user``."""
    environ, home = environment(user, env)
    for name, value in (extra_env or {}).items():
        environ.setdefault(name, value)  # the config's env wins
    try:
        return subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=output,
            stderr=subprocess.STDOUT if output == subprocess.PIPE else output,
            env=environ,
            cwd=cwd or (home if os.path.isdir(home) else "/"),
            user=user,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise CommandFailed(f"{argv[0]}: cannot run: {exc.strerror or exc}") from None


def run(
    argv: Sequence[str],
    deadline: float,
    user: str | None = None,
    env: Sequence[tuple[str, str]] = (),
    cwd: str | None = None,
) -> Outcome:
    """Run a command to completion by ``deadline``; its output (stdout and stderr) is returned.

    On timeout the whole process group is killed and ActionTimeout raised.
    """
    process = spawn(argv, user, env, cwd, subprocess.DEVNULL, subprocess.PIPE)
    assert process.stdout is not None
    lines = Lines()
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kill_group(process)
                output = lines.finish()
                raise ActionTimeout(
                    f"{argv[0]}: still running at its deadline; killed with its process group"
                    + (f" (last output: {output[-1]})" if output else "")
                )
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                break
            lines.feed(data)
        try:
            returncode = process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(process)
            raise ActionTimeout(
                f"{argv[0]}: closed its output but did not exit by its deadline"
            ) from None
        # Whatever it left behind in its group must not outlive it.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    finally:
        process.stdout.close()
    return Outcome(status=exit_status(returncode), output=lines.finish())


class HeldSession:
    """A process kept running from freeze to thaw, fed through stdin, read through a pty."""

    def __init__(
        self,
        argv: Sequence[str],
        user: str | None,
        env: Sequence[tuple[str, str]],
        cwd: str | None,
        on_exit: Callable[[int], None],
    ) -> None:
        master, slave = pty.openpty()
        try:
            self._process = spawn(
                argv, user, env, cwd, subprocess.PIPE, slave, extra_env={"TERM": "dumb"}
            )
        except CommandFailed:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.pid = self._process.pid
        self._master = master
        self._lines = Lines()
        self._recent: deque[str] = deque(maxlen=20)
        self._new_line = threading.Condition()
        self._closed = False
        self._eof = threading.Event()  # the drain thread has read everything the session wrote
        self._on_exit = on_exit
        self._expected_exit = False
        threading.Thread(target=self._drain, name=f"session-{self.pid}", daemon=True).start()

    def _drain(self) -> None:
        # Keep reading so the client never blocks on a full terminal, and notice its exit.
        while True:
            try:
                data = os.read(self._master, 65536)
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
        returncode = self._process.wait()
        os.close(self._master)
        if not self._expected_exit:
            self._on_exit(exit_status(returncode))

    def send(self, text: str) -> None:
        if not text:
            return
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(text.encode())
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise CommandFailed(f"session stopped reading its input: {exc}") from None

    def wait_for(self, pattern: str, deadline: float) -> None:
        """Return once an output line matches ``pattern``; the session keeps running."""
        regex = re.compile(pattern)
        seen = 0
        with self._new_line:
            while True:
                lines = self._lines.lines
                for line in lines[seen:]:
                    if regex.search(line):
                        return
                seen = len(lines)
                if self._closed:
                    raise CommandFailed(
                        f"session ended before it was ready: {self.tail() or 'no output'}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ActionTimeout(
                        f"session not ready by its deadline: {self.tail() or 'no output'}"
                    )
                self._new_line.wait(remaining)

    def tail(self) -> str:
        return " | ".join(self._recent)

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        code = self._process.poll()
        return None if code is None else exit_status(code)

    def finish(self, close_text: str, deadline: float) -> int:
        """Send ``close_text``, end stdin, wait for the exit; kill the group if it lingers."""
        self._expected_exit = True
        if self.running:
            try:
                self.send(close_text)
            except CommandFailed:
                pass
        if self._process.stdin is not None:
            try:
                self._process.stdin.close()
            except OSError:
                pass
        try:
            self._process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(self._process)
            raise ActionTimeout(
                "session did not exit after its close text; killed with its process group"
            ) from None
        self._eof.wait(1.0)  # its last words, for the logs (bounded: a grandchild may hold the pty)
        return exit_status(self._process.returncode)

    def kill(self) -> None:
        self._expected_exit = True
        kill_group(self._process)

    def output(self) -> tuple[str, ...]:
        with self._new_line:
            return tuple(self._lines.lines)
