"""A throwaway QEMU VM with the real qemu-guest-agent, driven from the host, for the e2e tier.

The VM runs under TCG (this machine's KVM cannot run a stock guest kernel), boots the kernel of
a `GuestImage` directly, writes to a qcow2 overlay in its work directory (the image itself is
never written), sees the checkout read-only at /src through 9p and has no network. Everything
the tests do inside goes through the guest agent, as a backup service would.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from image import GuestImage

SOCKET_ROOT = Path("/run/qgf-e2e")
QEMU = "/usr/bin/qemu-system-x86_64"
QEMU_IMG = "/usr/bin/qemu-img"
# The guest's kernel command line (libvirt_host.py boots the same).  QEMU's pc machine keeps its
# floppy and IDE controllers even with -nodefaults, and probing them costs a software-emulated
# guest seconds of every boot; no test uses either.
KERNEL_CMDLINE = (
    "root=/dev/vda rw console=ttyS0 quiet modprobe.blacklist=floppy,ata_piix,pata_acpi,ata_generic"
)
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Commands run through guest-exec get this environment, not whatever qemu-ga inherited.
_GUEST_ENV = ["PATH=" + _SYSTEM_PATH, "LANG=C.UTF-8", "HOME=/root"]

# One virtual CPU: make test runs two guests side by side on two host cores (tests/run-tiers),
# and a guest's second vCPU, descheduled by the host, left the first spinning on its locks.
# Two trixie guests at once, measured on the 2-core host: boot to guest-ping 77 s with one vCPU
# each against 122 to 125 s with two, the same apt-get install and purge (106 to 118 s, 58 to
# 65 s); boot, install, three MariaDB restarts and a purge, 300 s against 340 s.
_VCPUS = "1"
# With one vCPU a boot to guest-ping took 36 to 43 s on the idle host and 77 s beside another
# guest; with two, up to 125 s beside others.
_BOOT_TIMEOUT = 360.0
# One unanswered guest-sync-delimited is re-sent this often: bytes written while no agent
# listened may be lost as well as answered late.
_SYNC_RESEND = 5.0
_POLL_MIN = 0.05
_POLL_MAX = 0.5
_FILE_CHUNK = 1 << 20
_UNIT_POLL_TIMEOUT = 20.0
_LOG_TAIL_LINES = 40
_QCOW2_MAGIC = b"QFI\xfb"
_PR_SET_PDEATHSIG = 1


def e2e_required() -> bool:
    """Whether a VM-tier test that cannot run must fail rather than skip: under CI, or asked."""
    return os.environ.get("CI") == "true" or os.environ.get("QGAFREEZE_REQUIRE_E2E") == "1"


class QGAError(Exception):
    """The guest agent answered with an error."""

    def __init__(self, cls: str, desc: str, command: str = "") -> None:
        super().__init__(f"{command}: {cls}: {desc}" if command else f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc
        self.command = command


class QGATimeout(TimeoutError):
    """No answer from the guest agent (or no end of a guest command) in the time allowed."""


class QMPError(Exception):
    def __init__(self, cls: str, desc: str, command: str = "") -> None:
        super().__init__(f"{command}: {cls}: {desc}")
        self.cls = cls
        self.desc = desc


@dataclass(frozen=True)
class ExecResult:
    """Outcome of a guest command; `exitcode` is -N when signal N killed it."""

    exitcode: int
    stdout: str
    stderr: str


class _JsonLines:
    """Newline-delimited JSON over a unix stream socket, every read bounded by a deadline."""

    def __init__(self, path: Path, alive: Optional[Callable[[], bool]] = None) -> None:
        self.path = path
        self._alive = alive
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self, deadline: float) -> socket.socket:
        while True:
            self._check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                self._sock = sock
                self._buf = b""
                return sock
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"cannot connect to {self.path}: {exc}") from exc
                time.sleep(0.1)

    def _check_alive(self) -> None:
        if self._alive is not None and not self._alive():
            raise ConnectionError(f"the VM behind {self.path} is not running")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        self._buf = b""

    def _send(self, data: bytes, deadline: float) -> None:
        sock = self._sock or self._connect(deadline)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise ConnectionError(f"send to {self.path} failed: {exc}") from exc

    def _next_message(self, deadline: float) -> dict[str, Any]:
        """The next JSON object received; lines that do not parse (resync debris) are skipped."""
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                line = line.strip()
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QGATimeout(f"no answer on {self.path} in time")
            sock = self._sock or self._connect(deadline)
            # Short slices, so a dead qemu is noticed long before the deadline.
            sock.settimeout(min(remaining, 1.0))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                self._check_alive()
                continue
            except OSError as exc:
                self.close()
                raise ConnectionError(f"receive from {self.path} failed: {exc}") from exc
            if not chunk:
                self.close()
                self._check_alive()
                raise ConnectionError(f"{self.path} closed the connection")
            # 0xff never occurs in UTF-8 JSON; qemu-ga puts it before a guest-sync-delimited reply.
            self._buf += chunk.replace(b"\xff", b"")


class QGA(_JsonLines):
    """Client of qemu-ga through the host end of its virtio-serial chardev.

    Every call first resynchronises the stream (`sync`): qemu-ga may answer late to bytes sent
    while no agent listened, and an agent restarted inside the guest starts from a fresh parser;
    after a sync, the next answer is the answer to the next command.
    """

    def sync(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sync_id = secrets.randbelow(2**31 - 1) + 1
            request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            attempt = min(deadline, time.monotonic() + _SYNC_RESEND)
            try:
                # The 0xff resets qemu-ga's parser, dropping any half command before it.
                self._send(b"\xff" + json.dumps(request).encode() + b"\n", attempt)
                while True:
                    message = self._next_message(attempt)
                    # Only the latest id counts: the agent answers in order, so every older
                    # command, sync or not, has been answered (or lost) before it.
                    if message.get("return") == sync_id:
                        return
            except (QGATimeout, ConnectionError) as exc:
                if time.monotonic() >= deadline:
                    raise QGATimeout(
                        f"guest agent at {self.path} did not sync in {timeout:g} s"
                    ) from exc
                self._check_alive()
                if self._sock is None:
                    time.sleep(0.2)

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        self.sync(timeout=timeout)
        request: dict[str, Any] = {"execute": cmd}
        if args is not None:
            request["arguments"] = args
        self._send(json.dumps(request).encode() + b"\n", deadline)
        while True:
            try:
                message = self._next_message(deadline)
            except QGATimeout as exc:
                raise QGATimeout(f"{cmd}: no answer from the guest agent in {timeout:g} s") from exc
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"]
                raise QGAError(error.get("class", "?"), error.get("desc", ""), cmd)

    def send_no_reply(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        """For commands that answer nothing on success (guest-shutdown)."""
        self.sync(timeout=30.0)
        request: dict[str, Any] = {"execute": cmd}
        if args is not None:
            request["arguments"] = args
        self._send(json.dumps(request).encode() + b"\n", time.monotonic() + 10.0)

    def ping(self, timeout: float = 30.0) -> None:
        self.call("guest-ping", timeout=timeout)

    def exec(
        self, argv: list[str], input: bytes | None = None, timeout: float = 120.0
    ) -> ExecResult:
        """Run argv in the guest as a child of qemu-ga; it dies if qemu-ga is restarted."""
        deadline = time.monotonic() + timeout
        args: dict[str, Any] = {
            "path": argv[0],
            "arg": list(argv[1:]),
            "env": list(_GUEST_ENV),
            "capture-output": True,
        }
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        pid = self.call("guest-exec", args, timeout=timeout)["pid"]
        pause = _POLL_MIN
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with contextlib.suppress(QGAError, QGATimeout, ConnectionError):
                    self.call("guest-exec", {"path": "kill", "arg": ["-KILL", str(pid)]}, 10.0)
                raise QGATimeout(f"{shlex.join(argv)} did not end in {timeout:g} s (killed)")
            status = self.call("guest-exec-status", {"pid": pid}, timeout=min(remaining, 30.0))
            if status.get("exited"):
                break
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX)
        exitcode = -int(status["signal"]) if "signal" in status else int(status.get("exitcode", 0))
        return ExecResult(
            exitcode=exitcode,
            stdout=_b64text(status.get("out-data")),
            stderr=_b64text(status.get("err-data")),
        )

    def read_file(self, path: str, timeout: float = 60.0) -> bytes:
        handle = self.call("guest-file-open", {"path": path, "mode": "r"}, timeout=timeout)
        data = b""
        try:
            while True:
                chunk = self.call(
                    "guest-file-read", {"handle": handle, "count": _FILE_CHUNK}, timeout=timeout
                )
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    return data
        finally:
            with contextlib.suppress(QGAError, QGATimeout, ConnectionError):
                self.call("guest-file-close", {"handle": handle}, timeout=timeout)

    def write_file(self, path: str, data: bytes, timeout: float = 60.0) -> None:
        handle = self.call("guest-file-open", {"path": path, "mode": "w"}, timeout=timeout)
        try:
            for start in range(0, len(data), _FILE_CHUNK):
                piece = data[start : start + _FILE_CHUNK]
                written = self.call(
                    "guest-file-write",
                    {"handle": handle, "buf-b64": base64.b64encode(piece).decode()},
                    timeout=timeout,
                )
                if written.get("count") != len(piece):
                    raise QGAError("ShortWrite", f"{path}: wrote {written} of {len(piece)} bytes")
        finally:
            self.call("guest-file-close", {"handle": handle}, timeout=timeout)

    def fsfreeze_status(self, timeout: float = 30.0) -> str:
        return str(self.call("guest-fsfreeze-status", timeout=timeout))

    # Freezing runs the fsfreeze hook, which may quiesce applications for minutes.
    def fsfreeze_freeze(self, timeout: float = 600.0) -> int:
        return int(self.call("guest-fsfreeze-freeze", timeout=timeout))

    def fsfreeze_freeze_list(self, mountpoints: list[str], timeout: float = 600.0) -> int:
        return int(
            self.call("guest-fsfreeze-freeze-list", {"mountpoints": mountpoints}, timeout=timeout)
        )

    def fsfreeze_thaw(self, timeout: float = 600.0) -> int:
        return int(self.call("guest-fsfreeze-thaw", timeout=timeout))


def _b64text(data: str | None) -> str:
    return base64.b64decode(data).decode("utf-8", errors="replace") if data else ""


class QMP(_JsonLines):
    """Client of a QEMU monitor socket in control mode."""

    def __init__(
        self,
        path: Path,
        alive: Optional[Callable[[], bool]] = None,
        timeout: float = 60.0,
    ) -> None:
        super().__init__(path, alive)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        deadline = time.monotonic() + timeout
        self._connect(deadline)
        while "QMP" not in self._next_message(deadline):
            pass
        self.execute("qmp_capabilities")

    def execute(self, cmd: str, arguments: dict[str, Any] | None = None, /, **args: Any) -> Any:
        """Run cmd; hyphenated argument names go in `arguments`, others may be keywords too."""
        merged = dict(arguments or {}, **args)
        self._next_id += 1
        request: dict[str, Any] = {"execute": cmd, "id": self._next_id}
        if merged:
            request["arguments"] = merged
        deadline = time.monotonic() + self.timeout
        self._send(json.dumps(request).encode() + b"\n", deadline)
        while True:
            message = self._next_message(deadline)
            if "event" in message:
                # Kept (bounded) for tests that want to see what happened, e.g. SHUTDOWN.
                self.events = [*self.events[-999:], message]
                continue
            if message.get("id") != self._next_id:
                continue
            if "error" in message:
                error = message["error"]
                raise QMPError(error.get("class", "?"), error.get("desc", ""), cmd)
            return message.get("return")


def _set_pdeathsig() -> None:
    # qemu dies with the test process, even one killed by SIGKILL, instead of lingering.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _image_format(path: Path) -> str:
    with open(path, "rb") as handle:
        return "qcow2" if handle.read(4) == _QCOW2_MAGIC else "raw"


def _virtual_size(path: Path, fmt: str) -> int:
    # -U: the image may be a backing file of a running VM; reading its header is safe.
    out = subprocess.run(
        [QEMU_IMG, "info", "-U", "-f", fmt, "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return int(json.loads(out)["virtual-size"])


def _opt(value: Union[str, Path]) -> str:
    """A path as a qemu option value: commas are doubled."""
    return str(value).replace(",", ",,")


def _create_overlay(backing: Path, backing_format: str, overlay: Path) -> None:
    """A new qcow2 file whose reads fall through to `backing` and which takes every write."""
    # -u with an explicit size: the backing may be held by another running VM.
    subprocess.run(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            backing_format,
            "-b",
            str(backing),
            "-u",
            str(overlay),
            str(_virtual_size(backing, backing_format)),
        ],
        check=True,
        timeout=60,
    )


def _unique(directory: Path, stem: str, suffix: str) -> Path:
    candidate = directory / f"{stem}{suffix}"
    counter = 1
    while candidate.exists():
        counter += 1
        candidate = directory / f"{stem}-{counter}{suffix}"
    return candidate


_live: set[VM] = set()


@atexit.register
def _kill_leftovers() -> None:
    for vm in list(_live):
        vm.kill()


Argv = Union[Sequence[str], str]


class VM:
    """One running guest. Use `VM.boot`; always `shutdown` (the fixtures do)."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        workdir: Path,
        sockdir: Path,
        overlay: Path,
        serial_log: Path,
        qemu_log: Path,
    ) -> None:
        self.name = name
        self.proc = proc
        self.workdir = workdir
        self.sockdir = sockdir
        self.overlay = overlay
        self.serial_log = serial_log
        self.qemu_log = qemu_log
        self.top_node = "disk0"
        self.boot_seconds = 0.0
        self._snapshots = 0
        # The node each image frozen by `snapshot` still has in this QEMU (as a backing node).
        self._frozen_nodes: dict[Path, str] = {}
        self._attached = 0
        self.qmp: QMP | None = None
        self.qga = QGA(sockdir / "qga.sock", alive=self.running)

    @classmethod
    def boot(
        cls,
        image: GuestImage,
        workdir: Path,
        share: Path,
        disk: Path | None = None,
        name: str = "vm",
        timeout: float = _BOOT_TIMEOUT,
    ) -> VM:
        """Start a guest on a new overlay of `disk` (or of the image) and wait for its agent.

        `share` is seen read-only at /src. The overlay, the serial console and qemu's own log
        go to `workdir`, which is kept after shutdown; the sockets live under /run/qgf-e2e.
        """
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        backing = (disk or image.root).resolve()
        backing_format = _image_format(backing)
        overlay = _unique(workdir, name, ".qcow2")
        _create_overlay(backing, backing_format, overlay)
        SOCKET_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A unix socket path must stay under 108 bytes: tmp work directories can be long.
        sockdir = Path(_make_socket_dir(SOCKET_ROOT))
        serial_log = _unique(workdir, f"{name}-serial", ".log")
        qemu_log = _unique(workdir, f"{name}-qemu", ".log")
        argv = [
            QEMU,
            "-name",
            name,
            "-no-user-config",
            "-nodefaults",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            _VCPUS,
            "-m",
            "2048",
            "-display",
            "none",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            KERNEL_CMDLINE,
            "-blockdev",
            f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={_opt(overlay)}",
            "-device",
            "virtio-blk-pci,drive=disk0,id=vda",
            "-chardev",
            f"socket,path={_opt(sockdir / 'qga.sock')},server=on,wait=off,id=qga0",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-chardev",
            f"socket,path={_opt(sockdir / 'qmp.sock')},server=on,wait=off,id=qmp0",
            "-mon",
            "chardev=qmp0,mode=control",
            "-virtfs",
            f"local,path={_opt(share.resolve())},mount_tag=src,security_model=none,readonly=on",
            "-chardev",
            f"file,id=serial0,path={_opt(serial_log)}",
            "-serial",
            "chardev:serial0",
            "-nic",
            "none",
        ]
        (workdir / f"{overlay.stem}-argv.txt").write_text(shlex.join(argv) + "\n", "utf-8")
        started = time.monotonic()
        try:
            with open(qemu_log, "wb") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_set_pdeathsig,
                )
        except BaseException:
            shutil.rmtree(sockdir, ignore_errors=True)
            raise
        vm = cls(name, proc, workdir, sockdir, overlay, serial_log, qemu_log)
        _live.add(vm)
        try:
            vm.qmp = QMP(sockdir / "qmp.sock", alive=vm.running)
            vm.qga.sync(timeout=max(1.0, timeout - (time.monotonic() - started)))
            vm.qga.ping()
        except Exception as exc:
            vm.kill()
            raise RuntimeError(
                vm._describe_failure(f"VM {name} did not answer guest-ping")
            ) from exc
        vm.boot_seconds = time.monotonic() - started
        return vm

    def running(self) -> bool:
        return self.proc.poll() is None

    def _describe_failure(self, what: str) -> str:
        return (
            f"{what} (qemu {'running' if self.running() else f'exited {self.proc.returncode}'})"
            f"\n--- qemu log {self.qemu_log}:\n{_tail(self.qemu_log)}"
            f"\n--- serial console {self.serial_log}:\n{_tail(self.serial_log)}"
        )

    def exec(
        self, argv: list[str], input: bytes | None = None, timeout: float = 120.0
    ) -> ExecResult:
        """`QGA.exec`: the command is a child of qemu-ga and dies if the agent restarts."""
        return self.qga.exec(argv, input=input, timeout=timeout)

    def run_unit(self, argv: Argv, timeout: float = 600.0) -> ExecResult:
        """Run argv as a transient systemd unit and wait for it to end.

        Unlike `exec`, the command is not a child of qemu-ga, so it may restart the agent (as
        `make install` does): the wait rides over the agent's absence.
        """
        command = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        unit = f"qgf-{secrets.token_hex(4)}"
        out, err, rc, go, run, post = (
            f"/run/{unit}.{ext}" for ext in ("log", "err", "rc", "go", "run", "post")
        )
        deadline = time.monotonic() + timeout
        # The command and the exit-status recorder go in script files, so that no unit
        # property holds a $: systemd expands $ in Exec lines, and a daemon-reload (which
        # make install does) re-reads transient units with different escaping.
        self.qga.write_file(run, ("exec " + shlex.join(command) + "\n").encode())
        # --collect unloads the unit as soon as it ends, with its exit status: ExecStopPost
        # (which systemd gives the main process's result) writes it down first.
        self.qga.write_file(
            post,
            f'echo "$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS" > {rc}.tmp'
            f" && mv {rc}.tmp {rc}\n".encode(),
        )
        # The command waits for our go: were it to restart qemu-ga before the agent had told us
        # how systemd-run ended, that answer would be lost with the agent.
        gate = f"while [ ! -e {go} ]; do sleep 0.1; done"
        started = self.qga.exec(
            [
                "systemd-run",
                f"--unit={unit}",
                "--collect",
                "--no-block",
                "--quiet",
                "--setenv=HOME=/root",
                "--setenv=LANG=C.UTF-8",
                f"--property=StandardOutput=file:{out}",
                f"--property=StandardError=file:{err}",
                f"--property=ExecStartPre=/bin/sh -c {shlex.quote(gate)}",
                f"--property=ExecStopPost=/bin/sh {post}",
                "--",
                "/bin/sh",
                run,
            ],
            timeout=min(timeout, 120.0),
        )
        if started.exitcode != 0:
            # e.g. argv[0] not found: systemd-run checks that before it creates the unit.
            raise RuntimeError(f"systemd-run {unit} failed: {started.stderr.strip()}")
        self.qga.write_file(go, b"")
        status = ""
        last_error = ""
        pause = _POLL_MIN
        while True:
            try:
                status = self.qga.read_file(rc, timeout=_UNIT_POLL_TIMEOUT).decode().strip()
                if status:
                    break
            except (QGAError, QGATimeout, ConnectionError) as exc:
                # Not there yet, or the agent is restarting (a read may span two agents).
                last_error = str(exc)
                self._check_running()
            if time.monotonic() >= deadline:
                with contextlib.suppress(QGAError, QGATimeout, ConnectionError):
                    self.qga.exec(["systemctl", "kill", "--signal=KILL", unit], timeout=30.0)
                raise QGATimeout(
                    f"unit {unit} ({shlex.join(command)}) did not end in {timeout:g} s (killed);"
                    f" last poll: {last_error}"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        stdout = self.qga.read_file(out).decode("utf-8", errors="replace")
        stderr = self.qga.read_file(err).decode("utf-8", errors="replace")
        with contextlib.suppress(QGAError, QGATimeout, ConnectionError):
            self.qga.exec(["rm", "-f", out, err, rc, go, run, post], timeout=30.0)
        return ExecResult(exitcode=_unit_exitcode(status), stdout=stdout, stderr=stderr)

    def _check_running(self) -> None:
        if not self.running():
            raise RuntimeError(self._describe_failure(f"VM {self.name} stopped"))

    def snapshot(self, target: Path) -> Path:
        """External snapshot, as a backup service takes one; returns the now frozen image.

        New writes go to `target`, the new top; the previous top is left unwritten from here
        on, a consistent copy of the disk at this instant that `VM.boot(disk=...)` can restore.
        """
        if self.qmp is None:
            raise RuntimeError(f"VM {self.name} has no monitor")
        target = target.resolve()
        self._snapshots += 1
        node = f"disk0-snap{self._snapshots}"
        self.qmp.execute(
            "blockdev-snapshot-sync",
            {
                "node-name": self.top_node,
                "snapshot-file": str(target),
                "snapshot-node-name": node,
                "format": "qcow2",
            },
        )
        self._frozen_nodes[self.overlay.resolve()] = self.top_node
        frozen, self.overlay, self.top_node = self.overlay, target, node
        return frozen

    def attach_copy(self, frozen: Path) -> str:
        """Hot-plug a writable copy of an image this guest froze (a new qcow2 overlay on it; the
        image itself stays unwritten) as a virtio disk; returns its path in the guest.

        This lets a test look into a snapshot, or restore a database's files from it, without
        the cost of a boot; where the whole guest's restore is the proof, boot the image with
        `VMFactory(disk=...)` instead."""
        if self.qmp is None:
            raise RuntimeError(f"VM {self.name} has no monitor")
        frozen = frozen.resolve()
        backing = self._frozen_nodes.get(frozen)
        if backing is None:
            raise ValueError(f"{frozen} is not an image that VM {self.name} froze")
        self._attached += 1
        name = f"att{self._attached}"
        overlay = _unique(self.workdir, f"{self.name}-{name}", ".qcow2")
        _create_overlay(frozen, _image_format(frozen), overlay)
        self.qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": name,
                "file": {"driver": "file", "filename": str(overlay)},
                "backing": backing,
            },
        )
        serial = f"qgf-{name}"
        self.qmp.execute(
            "device_add", {"driver": "virtio-blk-pci", "drive": name, "id": name, "serial": serial}
        )
        return f"/dev/disk/by-id/virtio-{serial}"

    def shutdown(self, timeout: float = 60.0) -> None:
        """Power off cleanly if possible, else quit, else kill; the work directory is kept."""
        if self.running():
            deadline = time.monotonic() + timeout
            with contextlib.suppress(QGAError, QGATimeout, ConnectionError, OSError):
                # A guest left frozen by a failed test would hang its poweroff on the sync.
                if self.qga.fsfreeze_status(timeout=10.0) == "frozen":
                    self.qga.fsfreeze_thaw(timeout=30.0)
            with contextlib.suppress(QGAError, QGATimeout, ConnectionError, OSError):
                self.qga.send_no_reply("guest-shutdown", {"mode": "powerdown"})
            self._wait_exit(deadline)
        if self.running() and self.qmp is not None:
            with contextlib.suppress(QMPError, QGATimeout, ConnectionError, OSError):
                self.qmp.execute("quit")
            self._wait_exit(time.monotonic() + 10.0)
        self.kill()

    def _wait_exit(self, deadline: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        """Stop qemu at once and remove the sockets; idempotent."""
        if self.running():
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self.qga.close()
        if self.qmp is not None:
            self.qmp.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        _live.discard(self)


class VMFactory:
    """Boots VMs sharing the checkout at /src, each in its own work directory under `root`."""

    def __init__(self, image: GuestImage, root: Path, share: Path) -> None:
        self.image = image
        self.root = root
        self.share = share
        self.vms: list[VM] = []

    def __call__(self, name: str = "vm", disk: Path | None = None) -> VM:
        workdir = self.root / name
        counter = 1
        while workdir.exists():
            counter += 1
            workdir = self.root / f"{name}-{counter}"
        vm = VM.boot(self.image, workdir, self.share, disk=disk, name=name)
        self.vms.append(vm)
        return vm

    def kill_all(self) -> None:
        for vm in reversed(self.vms):
            vm.kill()


def _make_socket_dir(root: Path) -> str:
    for _ in range(100):
        candidate = root / secrets.token_hex(4)
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return str(candidate)
    raise RuntimeError(f"cannot make a socket directory under {root}")


def _unit_exitcode(status: str) -> int:
    """`$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS` as ExecStopPost saw them, as an exit code."""
    words = status.split()
    if len(words) < 3:
        # The main process never ran (e.g. systemd could not exec it).
        return 255
    code, value = words[1], words[2]
    if code == "exited":
        return int(value)
    with contextlib.suppress(KeyError, ValueError):
        return -int(signal.Signals[f"SIG{value}"])
    return 255
