"""Every process a command starts, kept together so that ending the command ends all of them,
and nothing else.

Each step, held session and legacy script runs in a cgroup of its own, which the daemon makes
under its own cgroup (``Delegate=yes`` in qgafreeze.service hands that subtree to it).  A process
cannot leave a cgroup by calling setsid() or double-forking, only a root process can move
itself out, and the cgroup is named by us, not by a number the kernel hands out again: ending it
never reaches anyone else's process.  Making one costs about 0.5 ms (a mkdir and one write);
a transient systemd scope cost 6 ms to start and 15 ms to stop, on the bus, in PID 1's time.

Where no cgroup can be made (no cgroup2 hierarchy, or not ours to write: a daemon started by
hand inside a container), the command's process group stands in for it, as it did before, and
its leader is left unreaped until the group has been ended: while the leader's zombie exists,
the kernel cannot give its number, the group's, to anyone else.  A process that calls setsid()
leaves such a group, and is not ended with it.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Callable, Optional, Protocol

from .errors import CommandFailed

Member = tuple[int, str]  # pid, command name
KILL_GRACE = 2.0  # between SIGTERM and SIGKILL of what a command started
GATE_SHELL = "/bin/sh"
# $0 names the gate in the one message it may print: that the command could not be executed.
_GATE = 'read -r _ || exit 125; exec "$@"'
_GATE_TO_NULL = _GATE + " </dev/null"  # steps and scripts: stdin is /dev/null, as before
_NAMES = itertools.count(1)  # cgroups of this daemon: qgafreeze-<daemon pid>-<n>
_EMPTY_WAIT = 0.5  # after SIGKILL, how long release() waits for the cgroup to empty
_KILL_ROUNDS = 100  # without cgroup.kill: SIGKILL rounds against a fork bomb, at the most


class Jail(Protocol):
    kind: str  # "cgroup" or "process group", for the logs

    def adopt(self, pid: int) -> None:
        """Take in a child that has not run anything yet (it waits at the gate)."""
        ...

    def members(self) -> list[Member]:
        """The live processes inside (zombies hold nothing and are left out)."""
        ...

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process inside, and to nothing else."""
        ...

    def release(self) -> None:
        """Done with it; for a process group, called just before its leader is reaped."""
        ...

    def describe(self) -> str: ...


def new_jail() -> Jail:
    """A cgroup of its own under the daemon's, or the process group where none can be made."""
    base = own_cgroup()
    if base is not None:
        name = f"qgafreeze-{os.getpid()}-{next(_NAMES)}"
        try:
            os.mkdir(os.path.join(base[0], name))
        except OSError:
            pass
        else:
            return Cgroup(os.path.join(base[0], name), f"{base[1].rstrip('/')}/{name}")
    return ProcessGroup()


def exit_status(returncode: int) -> int:
    """Popen's returncode as a shell shows it: 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


def start(
    argv: Sequence[str],
    env: dict[str, str],
    cwd: str,
    output: int,
    keep_stdin: bool,
    identity: Optional[tuple[int, int, list[int]]],
    jails: Callable[[], Jail] = new_jail,
) -> Child:
    """Start ``argv`` through the gate in a jail of its own; ``identity`` is (uid, gid, groups).

    The gate, ``/bin/sh`` already running as the user, waits for one line on its stdin, then
    execs ``argv`` unchanged.  Meanwhile the daemon moves it into its jail and resets its OOM
    score, so not even the command's first fork happens outside them.  Popen could do neither in
    the child but through ``preexec_fn``, Python run in a forked copy of a threaded process (it
    may deadlock).  The gate costs about 1 ms.  Its stdin is /dev/null, or with ``keep_stdin``
    a pipe the caller writes to.
    """
    jail = jails()
    try:
        process = subprocess.Popen(
            [GATE_SHELL, "-c", _GATE if keep_stdin else _GATE_TO_NULL, "qgafreeze", *argv],
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT if output == subprocess.PIPE else output,
            env=env,
            cwd=cwd,
            # user, group and extra_groups: setgroups, then real, effective and saved ids.
            user=None if identity is None else identity[0],
            group=None if identity is None else identity[1],
            extra_groups=None if identity is None else identity[2],
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        jail.release()
        raise CommandFailed(f"{argv[0]}: cannot run: {exc.strerror or exc}") from None
    assert process.stdin is not None
    try:
        jail.adopt(process.pid)
        # The daemon has OOMScoreAdjust=-500 so that it lives to resume the apps; what it runs
        # is judged as any other process.
        _write(f"/proc/{process.pid}/oom_score_adj", "0")
        process.stdin.write(b"\n")
        process.stdin.flush()
    except OSError as exc:
        process.kill()  # still at the gate, it has run nothing; unreaped, its pid is ours
        process.wait()
        jail.release()
        raise CommandFailed(f"{argv[0]}: cannot start in a {jail.kind} of its own: {exc}") from None
    if not keep_stdin:
        process.stdin.close()
    return Child(process, jail)


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class Child:
    """A started command: its leader, left unreaped until ``release`` (a process group's
    number stays ours while its leader's zombie exists), and the jail holding all it started."""

    def __init__(self, process: subprocess.Popen[bytes], jail: Jail) -> None:
        self.process = process
        self.jail = jail
        self.pid = process.pid
        self._status: Optional[int] = None
        self._released = False
        self._lock = threading.Lock()

    def status(self) -> Optional[int]:
        """The leader's exit status once it has exited (without reaping it), else None."""
        if self._status is None and self.process.returncode is not None:
            self._status = exit_status(self.process.returncode)  # reaped: the pid is not ours
        elif self._status is None:
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped by release() meanwhile
                info = None
            if info is not None:
                killed = info.si_code != os.CLD_EXITED
                self._status = 128 + info.si_status if killed else info.si_status
        return self._status

    def wait(self, deadline: Optional[float]) -> Optional[int]:
        """The exit status, waiting for it until ``deadline`` (None: as long as it takes)."""
        if deadline is None and self.status() is None:
            try:
                os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass
        delay = 0.0005  # as Popen.wait polls: short at first, for the usual quick exit
        while self.status() is None:
            remaining = float("inf") if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(delay, remaining, 0.05))
            delay *= 2
        return self._status

    def members(self) -> list[Member]:
        return self.jail.members()

    def signal(self, signum: int) -> None:
        with self._lock:
            if not self._released:
                self.jail.signal(signum)

    def end(self, grace: float = KILL_GRACE) -> None:
        """SIGTERM to everything it started; SIGKILL to what is left once the leader has exited
        or ``grace`` has passed; then release."""
        self.signal(signal.SIGTERM)
        if self.wait(time.monotonic() + grace) is None:
            self.signal(signal.SIGKILL)
            self.wait(time.monotonic() + grace)
        self.close()

    def close(self) -> None:
        """The leader has exited: what it left in its jail does not outlive it."""
        self.signal(signal.SIGKILL)
        self.release()

    def release(self) -> None:
        """Reap the leader and let the jail go; nothing is signalled after this."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self.jail.release()
        try:
            self.process.wait(KILL_GRACE)  # at once, unless stuck in the kernel
        except subprocess.TimeoutExpired:
            pass


@functools.lru_cache(maxsize=1)
def own_cgroup() -> Optional[tuple[str, str]]:
    """This process's cgroup in the cgroup2 hierarchy: (directory, path as /proc shows it)."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = f.read().splitlines()
    except OSError:
        return None
    paths = [line[3:] for line in lines if line.startswith("0::")]
    if not paths:
        return None
    for mount in mounts:
        fields, _, fs = mount.partition(" - ")
        if not fs.startswith("cgroup2 "):
            continue
        root, point = (_unescape(field) for field in fields.split()[3:5])
        inside = os.path.relpath(paths[0], root)
        if inside == ".." or inside.startswith("../"):
            continue  # outside what this mount shows (another cgroup namespace's view)
        return os.path.normpath(os.path.join(point, inside)), paths[0]
    return None


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040).
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _process(pid: int) -> Optional[tuple[str, list[bytes]]]:
    """(name, fields after the name: state ppid pgrp session ...) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except OSError:
        return None
    end = line.rfind(b")")
    name = line[line.find(b"(") + 1 : end].decode("utf-8", "replace")
    return name, line[end + 2 :].split()


class Cgroup:
    kind = "cgroup"

    def __init__(self, directory: str, path: str) -> None:
        self.directory = directory
        self.path = path  # as /proc/PID/cgroup names it

    def describe(self) -> str:
        return f"cgroup {self.path}"

    def adopt(self, pid: int) -> None:
        _write(os.path.join(self.directory, "cgroup.procs"), str(pid))

    def _pids(self) -> list[int]:
        try:
            with open(os.path.join(self.directory, "cgroup.procs"), "rb") as f:
                return [int(pid) for pid in f.read().split()]
        except FileNotFoundError:
            return []

    def members(self) -> list[Member]:
        found = []
        for pid in self._pids():
            process = _process(pid)
            if process is not None and process[1][:1] != [b"Z"]:
                found.append((pid, process[0]))
        return found

    def signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            try:
                _write(os.path.join(self.directory, "cgroup.kill"), "1")
                return  # Linux 5.14+: every process at once, forks included
            except OSError:
                pass
        signalled: set[int] = set()
        # Again while new ones appear: a process may fork between the reading and its signal.
        for _ in range(_KILL_ROUNDS if signum == signal.SIGKILL else 1):
            pids = set(self._pids()) - signalled
            if not pids:
                return
            for pid in pids:
                self._signal_member(pid, signum)
            signalled |= pids

    def _signal_member(self, pid: int, signum: int) -> None:
        # The pidfd pins the process that has this number now.  Its cgroup is read after that:
        # if the number changed hands in between, we read the newcomer's and the signal goes to
        # the pinned process, which has then exited: nothing outside the cgroup is ever hit.
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError as exc:  # before Linux 5.3: the check below still holds
            if exc.errno != errno.ENOSYS:
                return
            pidfd = -1
        try:
            if self._holds(pid):
                if pidfd >= 0:
                    signal.pidfd_send_signal(pidfd, signum)
                else:
                    os.kill(pid, signum)
        except ProcessLookupError:
            pass
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def _holds(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
                return f"0::{self.path}\n" in f.read()
        except OSError:
            return False

    def release(self) -> None:
        until = time.monotonic() + _EMPTY_WAIT
        while True:
            try:
                os.rmdir(self.directory)
                return
            except FileNotFoundError:
                return
            except OSError:  # still populated: the last ones are dying; or stuck (D state)
                if time.monotonic() >= until:
                    return  # left for systemd, which removes it with the service
                time.sleep(0.01)


class ProcessGroup:
    """The fallback: the child's own session and group, numbered after it (start_new_session)."""

    kind = "process group"

    def __init__(self) -> None:
        self.pgid = 0
        self._released = False

    def describe(self) -> str:
        return f"process group {self.pgid}"

    def adopt(self, pid: int) -> None:
        self.pgid = pid

    def members(self) -> list[Member]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            process = _process(int(entry))
            if process is None:
                continue
            fields = process[1]
            if len(fields) < 4 or fields[0] == b"Z":
                continue
            if int(fields[2]) == self.pgid and int(fields[3]) == self.pgid:
                found.append((int(entry), process[0]))
        return found

    def signal(self, signum: int) -> None:
        # Safe only while the leader is unreaped, which the caller keeps until release().
        if self._released or not self.pgid:
            return
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            pass

    def release(self) -> None:
        self._released = True
