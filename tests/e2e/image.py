"""Throwaway Debian guest images (bullseye, bookworm, trixie) with the real qemu-guest-agent,
for the e2e tier.

`ensure_image(suite)` returns a cached image of that suite, building it first when the cache has
none for the current recipe. The cache key hashes the suite, its package list and this module's
text, so any change to how an image is made builds a new one; stale images of the same suite are
removed, images of other suites are left alone. Builds of one suite are serialised with an flock
(builds of different suites may run at once) and published with one rename, so a reader never
sees half an image.

The guest boots its kernel directly (`-kernel`/`-initrd`), so the image is a bare ext4
filesystem: no partition table, no boot loader.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/qgafreeze/e2e")
SUITES = ("bullseye", "bookworm", "trixie")
DEFAULT_SUITE = "trixie"
# The same names exist in all three suites' Packages indexes (mmdebstrap fails the build on a
# name its suite lacks); the table per suite is where a release that renames one says so.
_COMMON_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "qemu-guest-agent",
    "linux-image-amd64",
    "initramfs-tools",
    "python3",
    "python3-yaml",
    "python3-systemd",
    "python3-pydbus",
    "make",
    "mariadb-server",
    "mariadb-client",
    # The presets' own servers, each release's (PostgreSQL 13/15/17, Redis 6.0/7.0/8.0); not
    # started at boot (_DISABLED_AT_BOOT): a test that needs one starts it.
    "postgresql",
    "redis-server",
    "procps",
    "util-linux",
    "kmod",
    "e2fsprogs",
    # `man qgafreeze` in a guest: man-db and its formatter.
    "man-db",
    "groff-base",
)
PACKAGES: dict[str, tuple[str, ...]] = {suite: _COMMON_PACKAGES for suite in SUITES}
_FALLBACK_MIRROR = "http://deb.debian.org/debian"
IMAGE_SIZE = "4G"
HOSTNAME = "qgfguest"

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The host's environment (pyenv, PYTHONPATH, locale) must not leak into the chroot's scripts.
_CHROOT_ENV = {
    "PATH": _SYSTEM_PATH,
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}
_BOOTSTRAP_TIMEOUT = 1800.0
_MERGED_USR_HOOK = "/usr/share/mmdebstrap/hooks/merged-usr/setup00.sh"
_STEP_TIMEOUT = 600.0

_ROOT_NAME = "root.img"
_KERNEL_NAME = "vmlinuz"
_INITRD_NAME = "initrd.img"
_KEY_NAME = "key"
_SECONDS_NAME = "build-seconds"
_IMAGE_PREFIX = "image-"
_BUILD_PREFIX = ".build-"

_FSTAB = """\
/dev/vda / ext4 rw,errors=remount-ro 0 1
src /src 9p trans=virtio,version=9p2000.L,ro,msize=262144,nofail 0 0
"""
# Loaded at boot so that the fstab mount of /src never races module autoloading.
_MODULES_LOAD = "9p\n9pnet\n9pnet_virtio\n"
# MODULES=most already carries these; naming them keeps the root mountable should a later
# initramfs-tools default change.
_INITRAMFS_MODULES = "virtio_pci\nvirtio_blk\next4\n"
# Periodic jobs that would compete with the tests for a TCG guest's slow CPU.
_MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    # Kernel interfaces no test uses, each a unit that every boot of a slow guest would start.
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "systemd-pstore.service",
)
# Servers that only some tests use: starting them at every boot would cost each guest seconds of
# its slow CPU.  Disabled, not masked: a test starts them with systemctl.
_DISABLED_AT_BOOT = ("postgresql.service", "redis-server.service")


@dataclass(frozen=True)
class GuestImage:
    root: Path
    kernel: Path
    initrd: Path
    key: str
    suite: str


def recipe_key(suite: str) -> str:
    """Hash of everything that decides the image's content."""
    digest = hashlib.sha256()
    digest.update(suite.encode())
    digest.update(b"\0")
    digest.update("\0".join(PACKAGES[suite]).encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def build_seconds(image: GuestImage) -> float | None:
    """How long the build of this image took, if it was built by this recipe."""
    try:
        return float((image.root.parent / _SECONDS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_image(suite: str = DEFAULT_SUITE, cache_root: Path = DEFAULT_CACHE) -> GuestImage:
    """The image of `suite` for the current recipe, built under `cache_root` if not there yet."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: the e2e tier knows {', '.join(SUITES)}")
    key = recipe_key(suite)
    final = cache_root / f"{_IMAGE_PREFIX}{suite}-{key}"
    image = _published(final, suite, key)
    if image is not None:
        return image
    cache_root.mkdir(parents=True, exist_ok=True)
    with _flock(cache_root / f".lock-{suite}"):
        # Another run may have built it while this one waited for the lock.
        image = _published(final, suite, key)
        if image is not None:
            return image
        _remove_stale_images(cache_root, suite, keep=final.name)
        build_dir = Path(
            tempfile.mkdtemp(prefix=f"{_BUILD_PREFIX}{suite}-{key}-", dir=cache_root)
        )
        try:
            started = time.monotonic()
            _build(build_dir, suite)
            took = time.monotonic() - started
            (build_dir / _SECONDS_NAME).write_text(f"{took:.0f}\n", encoding="utf-8")
            (build_dir / _KEY_NAME).write_text(key + "\n", encoding="utf-8")
            os.chmod(build_dir, 0o755)
            os.rename(build_dir, final)
            _log(f"{suite} image {key} built in {took:.0f} s at {final}")
        except BaseException:
            _remove_tree(build_dir)
            raise
    image = _published(final, suite, key)
    if image is None:
        raise RuntimeError(f"image build finished but {final} is incomplete")
    return image


def _published(directory: Path, suite: str, key: str) -> GuestImage | None:
    image = GuestImage(
        root=directory / _ROOT_NAME,
        kernel=directory / _KERNEL_NAME,
        initrd=directory / _INITRD_NAME,
        key=key,
        suite=suite,
    )
    # The key file is written last, before the rename; its presence means the rest is whole.
    key_file = directory / _KEY_NAME
    if not key_file.is_file() or key_file.read_text(encoding="utf-8").strip() != key:
        return None
    if not all(p.is_file() for p in (image.root, image.kernel, image.initrd)):
        return None
    return image


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# Images from before the cache knew suites: `image-<key>`, all of them bookworm.
_UNSUITED = re.compile(r"(image-|\.build-)[0-9a-f]{16}(-.*)?")


def _remove_stale_images(cache_root: Path, suite: str, keep: str) -> None:
    # Only called under the suite's lock: no other build is writing any of these.
    own = (f"{_IMAGE_PREFIX}{suite}-", f"{_BUILD_PREFIX}{suite}-")
    for entry in cache_root.iterdir():
        if entry.name == keep or not entry.is_dir():
            continue
        # The unsuited ones are bookworm's: only its lock keeps other builds away from them.
        legacy = suite == "bookworm" and _UNSUITED.fullmatch(entry.name) is not None
        if entry.name.startswith(own) or legacy:
            _log(f"removing {entry}")
            _remove_tree(entry)


def _log(message: str) -> None:
    print(f"[e2e image] {message}", file=sys.stderr, flush=True)


def host_suite() -> str:
    """The host's Debian codename, from /etc/os-release; "" when it names none."""
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    found = re.search(r"(?m)^VERSION_CODENAME=\"?([a-z]+)\"?$", text)
    return found.group(1) if found else ""


def mirror_url() -> str:
    """The Debian mirror this host's apt uses for its own suite, for every suite: a Debian
    mirror serves them all. deb.debian.org when the host's configuration names none."""
    suite = host_suite()
    found = _configured_mirror(suite) if suite else None
    return found or _FALLBACK_MIRROR


def _configured_mirror(suite: str) -> str | None:
    sources_dir = Path("/etc/apt/sources.list.d")
    for path in sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []:
        for stanza in _deb822_stanzas(path.read_text(encoding="utf-8", errors="replace")):
            if stanza.get("enabled", "yes").lower() == "no":
                continue
            if "deb" not in stanza.get("types", "").split():
                continue
            if suite not in stanza.get("suites", "").split():
                continue
            uris = stanza.get("uris", "").split()
            if uris:
                return uris[0]
    candidates = [Path("/etc/apt/sources.list")]
    if sources_dir.is_dir():
        candidates += sorted(sources_dir.glob("*.list"))
    for path in candidates:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            # One-line format options: "deb [arch=amd64 signed-by=...] URI SUITE COMPONENTS".
            if words and words[0].startswith("["):
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if len(words) >= 2 and words[1] == suite:
                return words[0]
    return None


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    field = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanza:
                yield stanza
            stanza, field = {}, ""
            continue
        if raw[0].isspace() and field:
            stanza[field] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if sep:
            field = name.strip().lower()
            stanza[field] = value.strip()


def _run(argv: list[str], log: Path, timeout: float = _STEP_TIMEOUT) -> None:
    """Run argv, appending its output to the build log; fail with the log's tail."""
    with open(log, "ab") as out:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_CHROOT_ENV,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _chroot(tree: Path, argv: list[str], log: Path) -> None:
    try:
        _run(["chroot", str(tree), *argv], log=log)
    finally:
        _kill_processes_in(tree)


def _build(build_dir: Path, suite: str) -> None:
    tree = build_dir / "tree"
    log = build_dir / "build.log"
    mirror = mirror_url()
    _log(f"building the {suite} guest image from {mirror} in {build_dir} (log: {log})")
    started = time.monotonic()
    try:
        # mmdebstrap, not debootstrap: apt downloads in parallel and resolves the packages once,
        # and dpkg skips its fsyncs (a build that a crash interrupts is thrown away anyway).
        # Measured on the 2-core host for trixie: 84 s against debootstrap's 176 s.  Kept as
        # debootstrap left them: the package lists (apt-get install ./qgafreeze_*.deb in the
        # guest resolves against what the image holds) and the machine-id systemd's postinst
        # wrote (an empty one gives every boot a new id, and its journal a new directory).  And
        # /usr merged as debootstrap merges it (its own function, through mmdebstrap's hook):
        # bullseye's packages do not merge it themselves, and its installs are merged.
        _run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=minbase",
                "--setup-hook=" + _MERGED_USR_HOOK,
                "--include=" + ",".join(PACKAGES[suite]),
                "--dpkgopt=force-unsafe-io",
                "--skip=cleanup/apt/lists",
                "--skip=cleanup/reproducible",
                suite,
                str(tree),
                mirror,
            ],
            timeout=_BOOTSTRAP_TIMEOUT,
            log=log,
        )
    finally:
        # Package scripts run in the chroot may have left daemons behind.
        _kill_processes_in(tree)
        _unmount_under(tree)
    _log(f"{suite}: mmdebstrap took {time.monotonic() - started:.0f} s")
    _configure(tree, log)
    kernel, initrd = _kernel_and_initrd(tree)
    shutil.copy2(kernel, build_dir / _KERNEL_NAME)
    shutil.copy2(initrd, build_dir / _INITRD_NAME)
    _unmount_under(tree)
    _run(
        ["mkfs.ext4", "-q", "-d", str(tree), "-L", "root", str(build_dir / _ROOT_NAME), IMAGE_SIZE],
        log=log,
    )
    _remove_tree(tree)


def _configure(tree: Path, log: Path) -> None:
    etc = tree / "etc"
    (etc / "hostname").write_text(HOSTNAME + "\n", encoding="utf-8")
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n", encoding="utf-8")
    (etc / "fstab").write_text(_FSTAB, encoding="utf-8")
    (tree / "src").mkdir(exist_ok=True)
    (etc / "modules-load.d").mkdir(exist_ok=True)
    (etc / "modules-load.d" / "qgf-9p.conf").write_text(_MODULES_LOAD, encoding="utf-8")
    # The guest has no network: keep neither the host's resolver nor its mirror in the image.
    # Nor the build's unsafe dpkg: the guest's package installs are tested as an admin's run.
    for name in ("resolv.conf", "apt/sources.list", "dpkg/dpkg.cfg.d/99mmdebstrap"):
        with contextlib.suppress(FileNotFoundError):
            (etc / name).unlink()
    # Without this flag man-db's dpkg trigger does not rebuild the index (debconf's
    # man-db/auto-update=false), which under TCG added tens of seconds to every install and
    # purge of the package; `man` finds pages without the index.
    with contextlib.suppress(FileNotFoundError):
        (tree / "var/lib/man-db/auto-update").unlink()
    for unit in _MASKED_UNITS:
        link = etc / "systemd" / "system" / unit
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")
    for unit in _DISABLED_AT_BOOT:
        with contextlib.suppress(FileNotFoundError):
            (etc / "systemd/system/multi-user.target.wants" / unit).unlink()
    # What systemd-update-done writes after the first boot of a new /usr: without it every boot
    # of the image counts as the first and runs ldconfig, the journal catalog update and others
    # (ConditionNeedsUpdate=), seconds of a software-emulated CPU each.
    usr = (tree / "usr").stat()
    for marker in (etc / ".updated", tree / "var" / ".updated"):
        marker.write_text(f"TIMESTAMP_NSEC={usr.st_mtime_ns}\n", encoding="utf-8")
        os.utime(marker, ns=(usr.st_mtime_ns, usr.st_mtime_ns))
    # A throwaway guest reached only through its serial console: root logs in without password.
    _chroot(tree, ["passwd", "-d", "root"], log)
    with open(etc / "initramfs-tools" / "modules", "a", encoding="utf-8") as modules:
        modules.write(_INITRAMFS_MODULES)
    initramfs_conf = etc / "initramfs-tools" / "initramfs.conf"
    text = initramfs_conf.read_text(encoding="utf-8")
    initramfs_conf.write_text(re.sub(r"(?m)^MODULES=.*$", "MODULES=most", text), encoding="utf-8")
    kernel, initrd = _kernel_and_initrd(tree, need_initrd=False)
    version = kernel.name[len("vmlinuz-") :]
    with contextlib.suppress(FileNotFoundError):
        initrd.unlink()
    _chroot(tree, ["update-initramfs", "-c", "-k", version], log)
    _check_tree(tree)


def _kernel_and_initrd(tree: Path, need_initrd: bool = True) -> tuple[Path, Path]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in {tree / 'boot'}, found {kernels}")
    version = kernels[0].name[len("vmlinuz-") :]
    initrd = tree / "boot" / f"initrd.img-{version}"
    if need_initrd and not initrd.is_file():
        raise RuntimeError(f"{initrd} is missing")
    return kernels[0], initrd


def _check_tree(tree: Path) -> None:
    """Fail the build now rather than a boot later, for what the guest cannot do without."""
    problems: list[str] = []
    rules = list((tree / "usr/lib/udev/rules.d").glob("*qemu-guest-agent*")) + list(
        (tree / "lib/udev/rules.d").glob("*qemu-guest-agent*")
    )
    if not any("qemu-guest-agent.service" in r.read_text(encoding="utf-8") for r in rules):
        problems.append("no udev rule starts qemu-guest-agent.service when its port appears")
    if not (tree / "usr/sbin/qemu-ga").exists():
        problems.append("qemu-ga is not installed")
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    # The link is absolute, so it resolves only inside the guest: test the link itself.
    if not (wants / "mariadb.service").is_symlink():
        problems.append("mariadb.service is not enabled")
    for unit in _DISABLED_AT_BOOT:
        if (wants / unit).is_symlink():
            problems.append(f"{unit} is still enabled at boot")
    if not list((tree / "usr/lib/postgresql").glob("*/bin/postgres")):
        problems.append("PostgreSQL is not installed")
    if not (tree / "usr/bin/redis-server").exists():
        problems.append("redis-server is not installed")
    if not (tree / "usr/bin/man").exists():
        problems.append("man is not installed")
    kernel, initrd = _kernel_and_initrd(tree)
    version = kernel.name[len("vmlinuz-") :]
    # A driver built into the kernel needs no module in the initramfs.
    builtin = ""
    for base in ("usr/lib/modules", "lib/modules"):
        with contextlib.suppress(OSError):
            builtin = (tree / base / version / "modules.builtin").read_text(encoding="utf-8")
            break
    # The guest's own initramfs-tools reads it; the host may not have lsinitramfs at all.
    listing = subprocess.run(
        ["chroot", str(tree), "lsinitramfs", "/boot/" + initrd.name],
        capture_output=True,
        text=True,
        env=_CHROOT_ENV,
        timeout=_STEP_TIMEOUT,
        check=False,
    ).stdout
    for module in ("virtio_blk", "virtio_pci", "ext4"):
        if not re.search(rf"/{module}\.ko", listing + "\n" + builtin):
            problems.append(f"the initramfs lacks {module}")
    if problems:
        raise RuntimeError("guest tree is not usable: " + "; ".join(problems))


def _processes_in(tree: Path) -> list[int]:
    prefix = str(tree.resolve())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            root = os.readlink(f"/proc/{entry}/root")
        except OSError:
            continue
        if root == prefix or root.startswith(prefix + "/"):
            pids.append(int(entry))
    return pids


def _kill_processes_in(tree: Path) -> None:
    for _ in range(50):
        pids = _processes_in(tree)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise RuntimeError(f"processes {_processes_in(tree)} in {tree} survive SIGKILL")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _unmount_under(path: Path) -> None:
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, env=_CHROOT_ENV, timeout=60)


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    # rmtree would walk into a forgotten bind mount (/dev, /proc) and delete the host's files.
    _kill_processes_in(path)
    _unmount_under(path)
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"refusing to remove {path}: still mounted: {left}")
    shutil.rmtree(path)


if __name__ == "__main__":
    for name in sys.argv[1:] or [DEFAULT_SUITE]:
        print(ensure_image(name))
