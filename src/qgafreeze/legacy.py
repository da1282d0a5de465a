"""The old ``fsfreeze-hook.d`` scripts, as QEMU's stock ``fsfreeze-hook`` chain treats them: which
scripts run, how each runs, what it may leave running, and the action that runs them.

Standard library only: ``qgafreeze install`` counts these scripts on a machine that may not have
the daemon's dependencies yet, and the daemon runs them; both must mean the same scripts.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO, Optional

from . import commands
from .actioncontext import ActionContext, StepReport, raise_all
from .containment import KILL_GRACE, Child, Member
from .errors import ActionTimeout, CommandFailed, QgafreezeError
from .trust import legacy_problems

# The stock hook skips these, as package managers and editors leave them beside real scripts.
SKIPPED_SUFFIXES = (
    "~",
    ".bak",
    ".orig",
    ".rpmnew",
    ".rpmorig",
    ".rpmsave",
    ".sample",
    ".dpkg-old",
    ".dpkg-new",
    ".dpkg-tmp",
    ".dpkg-dist",
    ".dpkg-bak",
    ".dpkg-backup",
    ".dpkg-remove",
)


def legacy_scripts(directory: str) -> list[str]:
    """The scripts the stock hook would run, as paths, in its order (the shell's glob in the C
    locale: bytes, dotfiles left out); executable regular files only.  A missing directory
    holds none; any other error reading it is raised."""
    try:
        names = sorted(os.listdir(directory), key=os.fsencode)
    except FileNotFoundError:
        return []
    scripts = []
    for name in names:
        if name.startswith(".") or name.endswith(SKIPPED_SUFFIXES):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        # os.access, as the stock hook's `[ -x ]`: for root, any execute bit.
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            scripts.append(path)
    return scripts


# --- running one script as the stock chain does ---------------------------------------------------

# After the thaw scripts, what a script left running gets this long to end by itself before it
# is sent SIGTERM (and SIGKILL, KILL_GRACE later).
LEFTOVER_GRACE = 3.0
# Reads of what a script wrote just before it exited: a full pipe, 64 KiB by default, 1 MiB
# (pipe-max-size) at the most.  Bounded, as a process it left running may write without end.
_FINAL_READS = (1 << 20) // commands.READ_SIZE
_LAST_WORDS = 0.5  # once its processes are gone, how long their last output may take to be read


@dataclass(frozen=True)
class ScriptRun:
    status: int  # exit status, or 128 + signal number
    output: tuple[str, ...]  # what the script wrote before it exited
    leftover: Optional[Leftover]  # what it left running, if anything


def run_script(script: str, phase: str, deadline: float) -> ScriptRun:
    """Run ``script phase`` until the script exits, as the stock chain does.

    The stock chain sends each script's output to its log file, so a script may start a
    background process and exit: QEMU's own MySQL sample hook leaves a client holding
    ``FLUSH TABLES WITH READ LOCK`` until the thaw script writes a FIFO.  Such a process keeps the
    output pipe open, so the script is done when it exits, not at the end of its output.  What
    it leaves running (all that is left in its cgroup, setsid() or not) keeps running, as a
    Leftover.  A script still running at ``deadline`` is killed with all it started and
    ActionTimeout is raised.
    """
    child = commands.spawn([script, phase], None, (), None, subprocess.PIPE)
    stdout = child.process.stdout
    assert stdout is not None
    lines = commands.Lines()
    try:
        pipe_open = commands.read_output(child, lines, deadline, until_exit=True)
    except ActionTimeout:
        stdout.close()
        raise
    for _ in range(_FINAL_READS):  # the Leftover, if any, reads on
        if not pipe_open or not select.select([stdout], [], [], 0)[0]:
            break
        pipe_open = commands.read_once(stdout.fileno(), lines)
    status = child.status()
    assert status is not None
    members = child.members()
    if not pipe_open and not members:
        stdout.close()
        child.release()
        return ScriptRun(status, lines.finish(), None)
    leftover = Leftover(script, phase, child, stdout, members)
    return ScriptRun(status, (*lines.finish(), leftover.describe()), leftover)


def _pids(members: list[Member], jail: str) -> str:
    listed = ", ".join(f"pid {pid} ({name})" for pid, name in members)
    return listed or f"a process outside its {jail}, holding its output,"


class Leftover:
    """What one script left running when it exited: the processes left in its cgroup (its
    process group where there are no cgroups) and the read end of its output, which a thread
    keeps draining so that none of them blocks on a full pipe.

    Only the processes inside are ever signalled; the script's own pid is held (left unreaped)
    until they are gone, so that a process group's number stays the script's.
    """

    def __init__(
        self, script: str, phase: str, child: Child, pipe: IO[bytes], members: list[Member]
    ) -> None:
        self.script = script
        self.phase = phase
        self.child = child
        self.first_members = members
        self._pipe = pipe
        self._lines = commands.Lines()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drained = threading.Event()
        threading.Thread(target=self._drain, name=f"legacy-{child.pid}", daemon=True).start()

    def describe(self) -> str:
        return (
            f"left running: {_pids(self.first_members, self.child.jail.kind)},"
            f" {self.child.jail.describe()}; kept until the thaw scripts have run"
        )

    def named(self) -> str:
        return _pids(self.first_members, self.child.jail.kind)

    def _drain(self) -> None:
        fd = self._pipe.fileno()
        try:
            while not self._stop.is_set():
                # Woken now and then to notice _stop: a writer outside the cgroup may hold the
                # pipe for ever.
                # One read at a time: a writer that never stops must not hold the lock.
                ready, _, _ = select.select([fd], [], [], _LAST_WORDS)
                if ready:
                    with self._lock:
                        if not commands.read_once(fd, self._lines):
                            return
        finally:
            self._pipe.close()
            self._drained.set()

    def members(self) -> list[Member]:
        return self.child.members()

    def signal(self, signum: int) -> None:
        self.child.signal(signum)

    def output(self) -> tuple[str, ...]:
        """Everything it wrote, once it is gone; stops reading from a pipe still held open."""
        self.child.release()
        self._drained.wait(_LAST_WORDS)
        self._stop.set()
        self._drained.wait(_LAST_WORDS * 2)
        with self._lock:
            return self._lines.finish()


# Unlike the stock chain, which leaves them be: a thaw script's leftovers live in the daemon's
# cgroup, which systemd ends at any restart of the daemon anyway.
_THAW_LEFTOVER = (
    "; what a thaw script leaves running is ended: long-running processes must be started"
    " through systemd (systemctl start, systemd-run)"
)


def settle(leftovers: list[Leftover], deadline: float, grace: float = LEFTOVER_GRACE) -> list[str]:
    """End what the scripts left running: ``grace`` seconds to end by itself (bounded by
    ``deadline``), then SIGTERM to every process left in its cgroup, then SIGKILL.  Returns, per
    leftover, a line saying which script left which processes and how they ended, then their
    output (for a thaw script's, that it must start what is to last through systemd)."""
    waited_until = min(time.monotonic() + grace, deadline)
    how = {id(left): "ended by itself" for left in leftovers}
    while any(left.members() for left in leftovers) and time.monotonic() < waited_until:
        time.sleep(commands.POLL)
    signalled: set[int] = set()
    for signum in (signal.SIGTERM, signal.SIGKILL):
        running = [left for left in leftovers if left.members()]
        for left in running:
            left.signal(signum)
            signalled.add(id(left))
            how[id(left)] = (
                f"still running {grace:g}s after the thaw scripts: ended with"
                f" {signal.Signals(signum).name}"
            )
        waited_until = time.monotonic() + KILL_GRACE
        while any(left.members() for left in running) and time.monotonic() < waited_until:
            time.sleep(commands.POLL)
    lines = []
    for left in leftovers:
        if left.members():  # not even SIGKILL: stuck in the kernel (D state)
            how[id(left)] += ", but is still there"
        if left.phase == "thaw" and id(left) in signalled:
            how[id(left)] += _THAW_LEFTOVER
        lines.append(f"{left.script} {left.phase} left {left.named()} running: " + how[id(left)])
        lines.extend(left.output())
    return lines


class LegacyHooksAction:
    """The old ``fsfreeze-hook.d`` scripts, run as the stock chain runs them (``legacy``), with its
    log lines, but with a timeout per script, thaw in reverse order, an exit status that counts,
    and what the scripts left running ended once the thaw scripts have run."""

    key = "legacy"

    def __init__(
        self, directory: str, script_timeout: float, leftover_grace: float = LEFTOVER_GRACE
    ) -> None:
        self._directory = directory
        self._timeout = script_timeout
        self._grace = leftover_grace
        self._left: list[Leftover] = []  # a rollback may run while a freeze is abandoned
        self._left_lock = threading.Lock()

    def describe(self) -> list[str]:
        found = legacy_scripts(self._directory)
        listed = ", ".join(os.path.basename(p) for p in found) or "none at the moment"
        return [
            f"run the scripts of {self._directory} with 'freeze' (glob order), 'thaw' in reverse;"
            f" {self._timeout:g}s each; now: {listed}"
        ]

    def quiesce(self, ctx: ActionContext) -> None:
        undo = ctx.undo(self.key)
        scripts = legacy_scripts(self._directory)
        refused = legacy_problems(self._directory, scripts)  # scripts come and go after the load
        if refused:
            raise CommandFailed("; ".join(refused))
        for script in scripts:
            if ctx.cancelled.is_set():
                return
            undo.append(script)
            ctx.checkpoint()
            self._run(script, "freeze", ctx)

    def resume(self, ctx: ActionContext) -> None:
        undo = ctx.undo(self.key)
        failures: list[QgafreezeError] = []
        for script in list(reversed(undo)):
            try:
                self._run(script, "thaw", ctx)
            except QgafreezeError as exc:
                failures.append(exc)
            else:
                undo.remove(script)
        with self._left_lock:
            left, self._left = self._left, []
        ctx.output.extend(settle(left, ctx.deadline, self._grace))
        raise_all(failures)

    def _run(self, script: str, phase: str, ctx: ActionContext) -> None:
        refused = legacy_problems(self._directory, [script])  # again, just before it runs
        if refused:
            raise CommandFailed("; ".join(refused))
        started = time.time()
        deadline = min(ctx.deadline, time.monotonic() + self._timeout)
        try:
            ran = run_script(script, phase, deadline)
        except ActionTimeout as exc:
            ctx.step(StepReport("legacy", script, phase, started, 124, ()))
            raise ActionTimeout(f"{script}: {exc.message}") from None
        except CommandFailed as exc:
            ctx.step(StepReport("legacy", script, phase, started, 126, (exc.message,)))
            raise
        if ran.leftover is not None:
            with self._left_lock:
                self._left.append(ran.leftover)
        ctx.step(StepReport("legacy", script, phase, started, ran.status, ran.output))
        if ran.status != 0:
            raise CommandFailed(f"{script} {phase} exited with status {ran.status}")
