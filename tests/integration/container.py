"""Throwaway systemd-nspawn container with a real systemd as PID 1, for the integration tier.

The container boots the host's own /usr (read-only) on a volatile tmpfs root, so the distro
Python and its packages (pydbus, systemd, yaml) are available inside without building an image.
It has its own system bus and journald, which is exactly what the daemon talks to in production.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

Argv = Union[Sequence[str], str]

# A clean PATH: the caller's PATH may point at a pyenv build that does not exist inside.
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Commands inside get this environment rather than the host's, so a developer's shell
# (pyenv, virtualenvs, PYTHONPATH) cannot leak into what the container sees.
_BASE_ENV = {
    "PATH": _SYSTEM_PATH,
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "SYSTEMD_COLORS": "0",
    # /src is a read-write bind of the checkout; keep root-owned __pycache__ out of it.
    "PYTHONDONTWRITEBYTECODE": "1",
}

_LEADER_TIMEOUT = 30.0
_RUNNING_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
_LOG_TAIL_LINES = 40
_MAX_HOSTNAME = 64


def _cgroup_roots() -> list[Path]:
    """Mount points of the hierarchies nspawn needs a non-root cgroup in.

    On the hybrid layout that is the cgroup2 mount (for the delegated unified tree) plus the
    v1 name=systemd mount; on a pure cgroup2 host only the one cgroup2 mount.
    """
    roots: list[Path] = []
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 4:
                continue
            mountpoint, fstype, options = fields[1], fields[2], fields[3].split(",")
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options):
                roots.append(Path(mountpoint))
    return roots


def unmet_preconditions() -> list[str]:
    """Reasons this machine cannot boot a Container; empty when it can."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("must run as root (systemd-nspawn and cgroup writes need it)")
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool, path=_SYSTEM_PATH) is None:
            problems.append(f"{tool} not found in {_SYSTEM_PATH}")
    roots = _cgroup_roots()
    if not any(_is_cgroup2(root) for root in roots):
        problems.append("no cgroup2 hierarchy is mounted")
    for root in roots:
        if not os.access(root, os.W_OK):
            problems.append(f"cgroup hierarchy {root} is not writable")
    return problems


def _is_cgroup2(root: Path) -> bool:
    return (root / "cgroup.controllers").exists()


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except (FileNotFoundError, ProcessLookupError):
        return False
    # A zombie has exited; it only waits for its parent to reap it.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(encoding="utf-8")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children_map()
    found: list[int] = []
    pending = list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, []))
    return found


def _kill_inside(nsenter_pid: int) -> None:
    """SIGKILL everything an nsenter started, leaving nsenter to reap its child and exit.

    Killing nsenter first would orphan its child to the host's init, where it can linger as a
    zombie inside the container's pid namespace and hold up the container's shutdown.
    """
    for pid in _descendants(nsenter_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # nsenter stops itself whenever its child stops (systemd's final killall does SIGSTOP
    # first); it would never see the SIGCONT that went to the child alone.
    with contextlib.suppress(ProcessLookupError):
        os.kill(nsenter_pid, signal.SIGCONT)


def _nspawn_pids(machine: str) -> list[int]:
    """Live systemd-nspawn processes running the machine called `machine`."""
    found: list[int] = []
    wanted = f"--machine={machine}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        named = bool(argv) and argv[0].endswith(b"systemd-nspawn") and wanted in argv
        if named and _pid_alive(int(entry)):
            found.append(int(entry))
    return found


def _cgroup_pids(directory: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        if "cgroup.procs" in filenames:
            try:
                text = Path(dirpath, "cgroup.procs").read_text(encoding="utf-8")
            except OSError:
                continue
            pids.extend(int(p) for p in text.split())
    return pids


def _remove_cgroup_tree(name: str, timeout: float = 10.0) -> None:
    """Kill whatever is left in the container's cgroups and remove them, deepest first."""
    for root in _cgroup_roots():
        top = root / name
        if not top.is_dir():
            continue
        deadline = time.monotonic() + timeout
        while True:
            for pid in _cgroup_pids(top):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            busy = False
            # cgroupfs only allows rmdir, and only on a leaf without processes.
            for dirpath, _dirnames, _filenames in os.walk(top, topdown=False):
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    busy = True
            if not busy:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"cgroup {top} still busy after {timeout:.0f} s")
            # Killed tasks leave the cgroup asynchronously; give the kernel a moment.
            time.sleep(0.05)


def _stop_nspawn(pid: int, timeout: float) -> None:
    """Stop an nspawn we are not the parent of (a leftover of a crashed run)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_gone(pid, timeout):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _wait_gone(pid, 10.0)


def _reap_leftovers(prefix: str) -> None:
    """Remove containers of crashed earlier runs that used the same prefix.

    Only names whose owning test process is gone are touched: a live owner may be a parallel run
    that has created its cgroup but not started nspawn yet, and must not lose it.
    """
    seen: set[str] = set()
    for root in _cgroup_roots():
        try:
            entries = os.listdir(root)
        except OSError:
            continue
        for entry in entries:
            if entry in seen or not entry.startswith(prefix + "-"):
                continue
            seen.add(entry)
            owner = _owner_pid(entry, prefix)
            if owner is None or _pid_alive(owner):
                continue
            for pid in _nspawn_pids(entry):
                _stop_nspawn(pid, _STOP_TIMEOUT)
            _remove_cgroup_tree(entry)


def _owner_pid(name: str, prefix: str) -> int | None:
    parts = name[len(prefix) + 1 :].split("-")
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    return int(parts[0])


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _escape_bind_path(path: str) -> str:
    # nspawn splits --bind on ':' and honours backslash escapes.
    return path.replace("\\", "\\\\").replace(":", "\\:")


class _InsidePopen(subprocess.Popen):  # type: ignore[type-arg]
    """Popen of an nsenter whose signals go to the command it runs inside the container."""

    def send_signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        # nsenter forks the command into the container's pid namespace; right after start the
        # fork may not have happened yet.
        deadline = time.monotonic() + 2.0
        while True:
            children = _children_map().get(self.pid, [])
            if children or self.poll() is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        for child in children or [self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)


class Container:
    """A booted container; create it with `Container.boot()`, stop it with `shutdown()`."""

    def __init__(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        workdir: Path,
        log_path: Path,
    ) -> None:
        self.name = name
        self.process = process
        self.workdir = workdir
        self.log_path = log_path
        self.leader = 0
        self.boot_seconds = 0.0
        self.shutdown_seconds = 0.0
        self._stopped = False
        self._nsenter = shutil.which("nsenter", path=_SYSTEM_PATH) or "nsenter"
        self._background: list[subprocess.Popen[Any]] = []

    @classmethod
    def boot(cls, checkout: Path, name_prefix: str = "qgft") -> Container:
        """Boot a container with `checkout` bound at /src; returns once systemd is up."""
        _reap_leftovers(name_prefix)
        # The owner pid in the name lets a later run tell a crashed run's leftovers from a
        # live parallel run; the random part keeps names unique across pid reuse.
        name = f"{name_prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        if len(name) > _MAX_HOSTNAME:
            raise ValueError(f"name prefix too long: {name!r} exceeds {_MAX_HOSTNAME} chars")
        nspawn = shutil.which("systemd-nspawn", path=_SYSTEM_PATH)
        if nspawn is None:
            raise RuntimeError("systemd-nspawn not found")
        checkout = Path(checkout).resolve()

        workdir = Path(tempfile.mkdtemp(prefix=f"{name}."))
        log_path = workdir / "nspawn.log"
        procs_files = []
        for root in _cgroup_roots():
            (root / name).mkdir()
            procs_files.append(root / name / "cgroup.procs")

        nspawn_argv = [
            nspawn,
            "--directory=/",
            "--volatile=yes",
            "--boot",
            "--private-network",
            "--register=no",
            "--keep-unit",
            f"--machine={name}",
            "--console=passive",
            f"--bind={_escape_bind_path(str(checkout))}:/src",
            "--",
            "systemd.firstboot=off",
        ]
        # The host's PID 1 is not systemd, so nothing gives nspawn its own cgroup to delegate;
        # the shell moves itself into fresh ones and then becomes nspawn. Doing it in the child
        # keeps the test process itself out of the container's cgroups.
        moves = " && ".join(f"echo $$ > {shlex.quote(str(p))}" for p in procs_files)
        script = f'{moves} && exec "$@"'
        env = {
            "PATH": _SYSTEM_PATH,
            "LANG": "C.UTF-8",
            # The hybrid host layout would otherwise give the container a v1 tree it cannot use.
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        }
        started = time.monotonic()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                ["/bin/sh", "-c", script, "sh", *nspawn_argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C meant for pytest must not reach nspawn directly;
                # shutdown() stops it in order instead.
                start_new_session=True,
            )
        container = cls(name, process, workdir, log_path)
        atexit.register(container.shutdown)
        try:
            container._wait_for_leader(started + _LEADER_TIMEOUT)
            container._wait_for_running(time.monotonic() + _RUNNING_TIMEOUT)
        except BaseException:
            container.shutdown(keep_log=True)
            raise
        container.boot_seconds = time.monotonic() - started
        return container

    def _failure(self, what: str) -> RuntimeError:
        state = "running" if self.process.poll() is None else f"exited {self.process.returncode}"
        return RuntimeError(
            f"container {self.name}: {what} (nspawn pid {self.process.pid} {state}); "
            f"log {self.log_path}, last lines:\n{_tail(self.log_path)}"
        )

    def _wait_for_leader(self, deadline: float) -> None:
        own_pidns = os.readlink("/proc/self/ns/pid")
        while True:
            if self.process.poll() is not None:
                raise self._failure("nspawn exited before the container started")
            leader = self._find_leader(own_pidns)
            if leader:
                self.leader = leader
                return
            if time.monotonic() >= deadline:
                raise self._failure(f"no container leader after {_LEADER_TIMEOUT:.0f} s")
            time.sleep(0.02)

    def _find_leader(self, own_pidns: str) -> int:
        # The leader is nspawn's child in a new pid namespace; waiting for comm == systemd
        # makes sure it has exec'ed init and is not still nspawn's setup code.
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text(encoding="utf-8")
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != self.process.pid or comm != "systemd":
                    continue
                if os.readlink(f"/proc/{entry}/ns/pid") == own_pidns:
                    continue
            except (OSError, ValueError):
                continue
            return int(entry)
        return 0

    def _wait_for_running(self, deadline: float) -> None:
        last = ""
        while True:
            if self.process.poll() is not None:
                raise self._failure("nspawn exited during boot")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(
                    f"systemd not running after {_RUNNING_TIMEOUT:.0f} s; last state: {last!r}"
                )
            # Right after exec the manager may not accept connections yet; then systemctl
            # fails at once and we simply ask again.
            try:
                result = subprocess.run(
                    self._nsenter_argv(["systemctl", "is-system-running", "--wait"]),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    env=dict(_BASE_ENV),
                    timeout=remaining,
                )
            except subprocess.TimeoutExpired:
                continue
            state = result.stdout.strip()
            last = state or result.stderr.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.05)

    def _nsenter_argv(self, argv: Argv) -> list[str]:
        command = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        return [self._nsenter, "-t", str(self.leader), "-a", "--", *command]

    @staticmethod
    def _env(env: dict[str, str] | None) -> dict[str, str]:
        merged = dict(_BASE_ENV)
        if env:
            merged.update(env)
        return merged

    def run(
        self,
        argv: list[str] | str,
        *,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside and wait for it; a str is a /bin/sh -c script.

        With check, a non-zero exit raises AssertionError showing the command and its output.
        A timeout always raises AssertionError, after killing the command inside.
        """
        command = self._nsenter_argv(argv)
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(env),
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_inside(process.pid)
            try:
                stdout, stderr = process.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
            raise AssertionError(
                self._describe(argv, f"timed out after {timeout} s", stdout, stderr)
            ) from None
        result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                self._describe(argv, f"exit code {result.returncode}", stdout, stderr)
            )
        return result

    def _describe(self, argv: Argv, outcome: str, stdout: str, stderr: str) -> str:
        shown = argv if isinstance(argv, str) else shlex.join(argv)
        message = (
            f"in container {self.name}: {shown!r} {outcome}\n"
            f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        )
        if self.process.poll() is not None:
            message += f"\n--- container exited; nspawn log ---\n{_tail(self.log_path)}"
        return message

    def popen(self, argv: list[str] | str, **kw: Any) -> subprocess.Popen[Any]:
        """Start a background command inside; keyword arguments go to subprocess.Popen.

        `env` is merged over the container's base environment. send_signal(), terminate() and
        kill() on the result reach the command inside (not the nsenter wrapping it), and
        returncode is that command's. Whatever still runs is killed by shutdown().
        """
        kw["env"] = self._env(kw.get("env"))
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        process = _InsidePopen(self._nsenter_argv(argv), **kw)
        self._background.append(process)
        return process

    def _kill_background(self) -> None:
        """Kill every nsenter still attached to this container, ours or a test's own."""
        wanted = ["-t", str(self.leader)]
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
            except (OSError, UnicodeDecodeError):
                continue
            if argv[0].endswith("nsenter") and argv[1:3] == wanted:
                _kill_inside(int(entry))
                _wait_gone(int(entry), 5.0)
        for process in self._background:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                subprocess.Popen.kill(process)
                process.wait(timeout=5)
        self._background.clear()

    def write_file(self, path: str, content: str, mode: int = 0o644) -> None:
        """Create or replace `path` inside with `content`, creating parent directories."""
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.run(["/bin/sh", "-c", script, "sh", path, format(mode, "o")], input=content)

    def install_unit(self, name: str, content: str) -> None:
        """Install a runtime unit file and make systemd load it."""
        if "/" in name or not name:
            raise ValueError(f"not a unit file name: {name!r}")
        self.write_file(f"/run/systemd/system/{name}", content)
        self.run(["systemctl", "daemon-reload"])

    def journal(self, **match: str) -> list[dict[str, Any]]:
        """Journal records inside matching all FIELD=value pairs, oldest first."""
        # journald batches writes; without a sync a record sent a moment ago may be missing.
        self.run(["journalctl", "--sync"])
        argv = ["journalctl", "-o", "json", "--no-pager", "--all", "--quiet"]
        argv += [f"{field}={value}" for field, value in match.items()]
        output = self.run(argv).stdout
        return [json.loads(line) for line in output.splitlines() if line.startswith("{")]

    def shutdown(self, keep_log: bool = False) -> None:
        """Power the container off and remove its cgroups; safe to call more than once.

        The temporary directory with the nspawn log is removed only after a clean stop.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        started = time.monotonic()
        clean = True
        if self.leader:
            self._kill_background()
        if self.process.poll() is None:
            # nspawn turns SIGTERM into an orderly poweroff of the container's systemd.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                clean = False
                # Killing the pid namespace's init takes every process inside with it.
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                self.process.kill()
                self.process.wait(timeout=10)
        _remove_cgroup_tree(self.name)
        self.shutdown_seconds = time.monotonic() - started
        if clean and not keep_log:
            shutil.rmtree(self.workdir, ignore_errors=True)
