"""Real libvirt from Debian's packages as the VM tier's caller: libvirtd started by hand (the host
has no systemd as PID 1), in a mount namespace of its own, and one transient domain of the
tier's guest image, which the tests reach only through `virsh`, as a backup tool would.

Privileged libvirtd keeps its configuration, state, sockets, cache and logs at fixed places
(/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt) and no
option moves them, so each is bound over with a directory of the test's own in libvirtd's
private mount namespace: the host's libvirt, if any, is neither read nor disturbed, and nothing
of this one is left behind. `stop` destroys every domain, ends libvirtd and removes the empty
mount points it had to create.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from image import GuestImage
from vm import (
    KERNEL_CMDLINE,
    QEMU_IMG,
    QGA,
    VM,
    QGAError,
    QGATimeout,
    _image_format,
    _set_pdeathsig,
    _virtual_size,
)

LIBVIRTD = "/usr/sbin/libvirtd"
VIRSH = "/usr/bin/virsh"
UNSHARE = "/usr/bin/unshare"
JQ = "/usr/bin/jq"
# What the tier needs from Debian for libvirt: the daemon, its QEMU driver, virsh, and jq, which
# docs/host.md's commands pipe virsh's answers through (the Makefile's DEB_TEST_PKGS has them).
PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "jq")
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AGENT_CHANNEL = "org.qemu.guest_agent.0"

# Private directory name -> where privileged libvirtd looks for it.
_BINDS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
# The QEMU driver looks this user up at start even when qemu.conf says user = "root".
_QEMU_USER = "libvirt-qemu"

# QEMU runs as root with no confinement and no cgroups of its own: this host has neither
# systemd nor a security driver, and the cached image must keep its owner for the other tests.
_QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
# Only root reaches the private socket; polkit is not running to ask.
_LIBVIRTD_CONF = """\
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

_START_TIMEOUT = 300.0
_STOP_TIMEOUT = 30.0
_BOOT_TIMEOUT = 600.0
_VIRSH_TIMEOUT = 120.0
_APT_TIMEOUT = 900


class LibvirtUnavailable(RuntimeError):
    """libvirt cannot be installed or started on this host."""


def _env(uri: str = "") -> dict[str, str]:
    env = {"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    if uri:
        env["LIBVIRT_DEFAULT_URI"] = uri
    return env


def _missing_packages() -> list[str]:
    missing = []
    for package in PACKAGES:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
            check=False,
        ).stdout
        if not status.endswith(" ok installed"):
            missing.append(package)
    return missing


def ensure_packages() -> None:
    """Install what is missing of PACKAGES with apt-get, as the tier does for its tools."""
    if shutil.which("dpkg-query", path=_SYSTEM_PATH) is None:
        if all(Path(p).is_file() for p in (LIBVIRTD, VIRSH, UNSHARE, JQ)):
            return
        raise LibvirtUnavailable("libvirt is not installed and this is no Debian host to install")
    missing = _missing_packages()
    if not missing:
        return
    argv = ["apt-get", "-q", "-y", "install", "--no-install-recommends", *missing]
    env = dict(_env(), DEBIAN_FRONTEND="noninteractive")
    result = None
    for attempt in range(2):
        if attempt:
            # A fresh machine may have no package lists yet.
            subprocess.run(
                ["apt-get", "-q", "update"],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_APT_TIMEOUT,
                check=False,
            )
        result = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT,
            check=False,
        )
        if result.returncode == 0:
            return
    assert result is not None
    raise LibvirtUnavailable(f"{shlex.join(argv)} failed: {result.stderr.strip()[-500:]}")


_running: set[Libvirt] = set()


@atexit.register
def _stop_leftovers() -> None:
    for libvirt in list(_running):
        libvirt.stop()


class Libvirt:
    """One libvirtd of our own; `virsh` talks to it. Use `Libvirt.start`, always `stop`."""

    def __init__(self, root: Path, proc: subprocess.Popen[bytes], made: list[Path]) -> None:
        self.root = root
        self.proc = proc
        self._made = made
        self.socket = root / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.start_seconds = 0.0
        self.log = root / "log" / "libvirtd.log"

    @classmethod
    def start(cls, root: Path, timeout: float = _START_TIMEOUT) -> Libvirt:
        """Start libvirtd with its directories under `root` and wait until virsh gets in."""
        ensure_packages()
        root = root.resolve()
        for name in _BINDS:
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / "etc" / "qemu.conf").write_text(_QEMU_CONF, encoding="utf-8")
        (root / "etc" / "libvirtd.conf").write_text(_LIBVIRTD_CONF, encoding="utf-8")
        binds = [(root / name, Path(target)) for name, target in _BINDS.items()]
        binds += _qemu_user_binds(root)
        # Mount points the host lacks are made empty here and removed by stop.
        made = [target for _, target in binds if not target.exists()]
        for target in made:
            target.mkdir(parents=True)
        script = "set -e\n" + "".join(
            f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}\n"
            for source, target in binds
        )
        # exec: the process we started is libvirtd itself, ended with its parent (pdeathsig).
        script += f"exec {LIBVIRTD} --config /etc/libvirt/libvirtd.conf\n"
        (root / "start.sh").write_text(script, encoding="utf-8")
        started = time.monotonic()
        with open(root / "libvirtd.out", "wb") as out:
            proc = subprocess.Popen(
                [UNSHARE, "--mount", "--propagation", "private", "/bin/sh", str(root / "start.sh")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(),
                preexec_fn=_set_pdeathsig,
            )
        libvirt = cls(root, proc, made)
        _running.add(libvirt)
        try:
            libvirt._wait_ready(started + timeout)
        except BaseException:
            libvirt.stop()
            raise
        libvirt.start_seconds = time.monotonic() - started
        return libvirt

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise LibvirtUnavailable(self._describe(f"libvirtd exited {self.proc.returncode}"))
            result = self.virsh("version", check=False, timeout=30.0)
            if result.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise LibvirtUnavailable(
                    self._describe(f"virsh could not reach libvirtd: {result.stderr.strip()}")
                )
            time.sleep(0.5)

    def _describe(self, what: str) -> str:
        out = (self.root / "libvirtd.out").read_text(errors="replace")[-2000:]
        log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"
        return f"{what}\n--- libvirtd output:\n{out}\n--- {self.log}:\n{log}"

    def _run(
        self, argv: list[str], timeout: float, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_env(self.uri),
            timeout=timeout,
            check=False,
        )

    def virsh(
        self, *args: str, check: bool = True, timeout: float = _VIRSH_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        result = self._run([VIRSH, "--quiet", *args], timeout)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"virsh {shlex.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def shell(self, script: str, cwd: Path, timeout: float = _VIRSH_TIMEOUT) -> str:
        """Run a shell script whose plain `virsh` reaches this libvirtd (LIBVIRT_DEFAULT_URI),
        as the commands in docs/host.md are written; its stdout."""
        result = self._run(["/bin/sh", "-ec", script], timeout, cwd=cwd)
        if result.returncode != 0:
            raise AssertionError(
                f"shell failed ({result.returncode}):\n{script}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}"
            )
        return result.stdout

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Destroy every domain, end libvirtd, remove the mount points made; idempotent."""
        if self.running():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                names = self.virsh("list", "--name", check=False, timeout=30.0).stdout.split()
                for name in names:
                    self.virsh("destroy", name, check=False, timeout=60.0)
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=_STOP_TIMEOUT)
            if self.running():
                self.proc.kill()
                self.proc.wait(timeout=_STOP_TIMEOUT)
        # A QEMU whose destroy failed would outlive libvirtd: libvirt daemonizes it.
        for pidfile in (self.root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        for target in reversed(self._made):
            with contextlib.suppress(OSError):
                target.rmdir()
        self._made = []
        _running.discard(self)


def _qemu_user_binds(root: Path) -> list[tuple[Path, Path]]:
    """Where the host has no libvirt-qemu user, libvirtd sees copies of passwd and group that
    add one, so that the host's own files stay untouched."""
    try:
        pwd.getpwnam(_QEMU_USER)
        return []
    except KeyError:
        pass
    binds = []
    for name, line in (
        ("passwd", f"{_QEMU_USER}:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n"),
        ("group", f"{_QEMU_USER}:x:64055:\n"),
    ):
        copy = root / name
        copy.write_text(Path(f"/etc/{name}").read_text(encoding="utf-8") + line, "utf-8")
        binds.append((copy, Path(f"/etc/{name}")))
    return binds


def domain_xml(name: str, image: GuestImage, overlay: Path, share: Path, serial_log: Path) -> str:
    """A TCG guest like vm.py's: the image's kernel booted directly, the overlay as vda, the
    checkout read-only at /src over 9p, the agent's channel, no network."""

    def text(value: object) -> str:
        return escape(str(value))

    return f"""<domain type='qemu'>
  <name>{text(name)}</name>
  <memory unit='MiB'>2048</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{text(image.kernel)}</kernel>
    <initrd>{text(image.initrd)}</initrd>
    <cmdline>{text(KERNEL_CMDLINE)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(overlay))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <filesystem type='mount' accessmode='squash'>
      <driver type='path'/>
      <source dir={quoteattr(str(share))}/>
      <target dir='src'/>
      <readonly/>
    </filesystem>
    <channel type='unix'>
      <target type='virtio' name='{AGENT_CHANNEL}'/>
    </channel>
    <serial type='file'>
      <source path={quoteattr(str(serial_log))}/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <seclabel type='none'/>
</domain>
"""


class VirshAgent(QGA):
    """The guest agent reached through `virsh qemu-agent-command`: libvirt holds the channel
    (and syncs it itself), so every command of the harness goes through libvirt too."""

    def __init__(self, libvirt: Libvirt, domain: str) -> None:
        super().__init__(Path(domain))
        self._libvirt = libvirt
        self._domain = domain

    def sync(self, timeout: float = 60.0) -> None:
        """libvirt syncs the channel itself."""

    def close(self) -> None:
        """Nothing to let go of: each command is one virsh run."""

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        request: dict[str, Any] = {"execute": cmd}
        if args is not None:
            request["arguments"] = args
        seconds = max(1, math.ceil(timeout))
        try:
            result = self._libvirt.virsh(
                "qemu-agent-command",
                self._domain,
                "--timeout",
                str(seconds),
                json.dumps(request),
                check=False,
                timeout=seconds + 30.0,
            )
        except subprocess.TimeoutExpired as exc:
            raise QGATimeout(f"{cmd}: virsh gave no answer in {seconds + 30} s") from exc
        if result.returncode != 0:
            error = result.stderr.strip()
            if "not responding" in error or "timed out" in error.lower():
                raise QGATimeout(f"{cmd}: {error}")
            raise QGAError("libvirt", error, cmd)
        return json.loads(result.stdout)["return"]

    def send_no_reply(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        request: dict[str, Any] = {"execute": cmd}
        if args is not None:
            request["arguments"] = args
        # --timeout 0: libvirt sends it and does not wait for an answer.
        self._libvirt.virsh(
            "qemu-agent-command", self._domain, "--timeout", "0", json.dumps(request), check=False
        )


class LibvirtVM(VM):
    """A transient libvirt domain of the tier's image, with the harness's `VM` interface (so
    that `guest.install`, `guest.sh` and `VM.run_unit` work through libvirt), plus what a
    libvirt caller does: `virsh` on the domain and quiesced disk-only snapshots."""

    def __init__(self, libvirt: Libvirt, name: str, workdir: Path, overlay: Path) -> None:
        # Not VM.__init__: there is no qemu child, socket or monitor of ours; libvirt owns them.
        self.libvirt = libvirt
        self.name = name
        self.workdir = workdir
        self.overlay = overlay
        self.serial_log = workdir / f"{name}-serial.log"
        self.qemu_log = libvirt.root / "log" / "qemu" / f"{name}.log"
        self.qmp = None
        self.top_node = "vda"
        self.boot_seconds = 0.0
        self.qga = VirshAgent(libvirt, name)

    @classmethod
    def create(
        cls,
        libvirt: Libvirt,
        image: GuestImage,
        workdir: Path,
        share: Path,
        name: str = "qgf-libvirt",
        timeout: float = _BOOT_TIMEOUT,
    ) -> LibvirtVM:
        """`virsh create` a transient domain on a new overlay of the image; wait for its agent."""
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        name = f"{name}-{secrets.token_hex(3)}"
        overlay = workdir / f"{name}.qcow2"
        backing = _image_format(image.root)
        size = str(_virtual_size(image.root, backing))
        # -u with the size given: the cached image may be the backing file of running guests.
        create = ["create", "-q", "-f", "qcow2", "-F", backing, "-u", "-b", str(image.root)]
        subprocess.run([QEMU_IMG, *create, str(overlay), size], check=True, timeout=60, env=_env())
        vm = cls(libvirt, name, workdir, overlay)
        xml = workdir / f"{name}.xml"
        xml.write_text(domain_xml(name, image, overlay, share.resolve(), vm.serial_log), "utf-8")
        started = time.monotonic()
        libvirt.virsh("create", str(xml))
        deadline = started + timeout
        while True:
            try:
                vm.qga.call("guest-ping", timeout=10.0)
                break
            except (QGAError, QGATimeout) as exc:
                if not vm.running():
                    raise RuntimeError(vm._describe_failure(f"domain {name} stopped")) from exc
                if time.monotonic() >= deadline:
                    vm.kill()
                    raise RuntimeError(
                        vm._describe_failure(f"domain {name}'s agent did not answer: {exc}")
                    ) from exc
                time.sleep(1.0)
        vm.boot_seconds = time.monotonic() - started
        return vm

    def running(self) -> bool:
        if not self.libvirt.running():
            return False
        state = self.libvirt.virsh("domstate", self.name, check=False, timeout=30.0)
        return state.returncode == 0 and state.stdout.strip() == "running"

    def _describe_failure(self, what: str) -> str:
        def tail(path: Path) -> str:
            try:
                return "\n".join(path.read_text(errors="replace").splitlines()[-40:])
            except OSError:
                return "(no log)"

        return (
            f"{what}\n--- qemu log {self.qemu_log}:\n{tail(self.qemu_log)}"
            f"\n--- serial console {self.serial_log}:\n{tail(self.serial_log)}"
        )

    def snapshot_quiesced(self, target: Path) -> subprocess.CompletedProcess[str]:
        """`virsh snapshot-create-as --disk-only --atomic --quiesce`: freeze through the agent,
        an external snapshot of vda into `target`, thaw; libvirt waits as long as it takes."""
        return self.libvirt.virsh(
            "snapshot-create-as",
            self.name,
            "--disk-only",
            "--atomic",
            "--quiesce",
            "--no-metadata",
            "--diskspec",
            f"vda,file={target}",
            check=False,
            timeout=1800.0,
        )

    def disk_source(self) -> str:
        """The file vda writes to now (`virsh domblklist`)."""
        for line in self.libvirt.virsh("domblklist", self.name).stdout.splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "vda":
                return words[1]
        raise AssertionError(f"no vda in virsh domblklist {self.name}")

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the domain at once: it is transient and its overlay is scratch."""
        self.kill()

    def kill(self) -> None:
        if self.libvirt.running():
            self.libvirt.virsh("destroy", self.name, check=False, timeout=60.0)
