"""Thaw every frozen filesystem, as qemu-ga's ``guest-fsfreeze-thaw`` does, from inside the guest.

The watchdog calls this when no thaw arrived within ``max_frozen``: qemu-ga has no timer of its
own, so a host that froze and went away would otherwise leave every write to disk hanging.

It runs while the disks may be frozen, so it reads only /proc (in memory) and opens each mount
point read-only as a directory: an open neither writes nor lists the directory, and path lookup
only reads, which a frozen filesystem allows.  Everything it needs is imported with the module,
which the daemon imports at start-up, never during a cycle.

A filesystem that is not frozen answers ``FITHAW`` with EINVAL and is left as it is: qemu-ga
relies on the same answer, so a thaw the host sends later succeeds and reports 0 filesystems.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

MOUNTINFO = "/proc/self/mountinfo"

# _IOWR('X', 120, int), from linux/fs.h.
FITHAW = 0xC0045878

# FITHAW undoes one freeze; a filesystem frozen several times (older kernels let each FIFREEZE
# nest) needs as many.  qemu-ga loops until the ioctl fails; this bounds the loop.
MAX_THAWS_PER_FILESYSTEM = 64

# Filesystems that are never frozen: in memory, kernel interfaces, or over the network (qemu-ga
# leaves out the network ones too).  Block-backed ones are kept even when the kernel names no
# block device for them (btrfs reports device 0:N): their source is a /dev path.
NOT_FREEZABLE = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "cifs",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fuse.gvfsd-fuse",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nfs",
        "nfs4",
        "nsfs",
        "overlay",
        "proc",
        "pstore",
        "ramfs",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "smb3",
        "smbfs",
        "squashfs",
        "sysfs",
        "tmpfs",
        "tracefs",
    }
)


# FITHAW's answer for a filesystem that is not frozen (EOPNOTSUPP: one that cannot be).
NOT_FROZEN = (errno.EINVAL, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str
    device: str  # major:minor of the superblock; the same for every bind mount of it


@dataclass(frozen=True)
class ThawResult:
    """What a thaw did: the mount points thawed, in order, and the errors (text, each naming its
    mount point).  A filesystem that was not frozen is in neither."""

    thawed: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.thawed)


def _unescape(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash as octal escapes (``\040``)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount of ``text`` (the format of /proc/self/mountinfo), in its order; lines that do
    not parse are left out."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)  # optional fields end with a lone dash
            device, mountpoint = fields[2], fields[4]
            fstype, source = fields[dash + 1], fields[dash + 2]
        except (ValueError, IndexError):
            continue
        mounts.append(Mount(_unescape(mountpoint), fstype, _unescape(source), device))
    return mounts


def freezable(mounts: Iterable[Mount]) -> list[Mount]:
    """The mounts that may be frozen, each filesystem once (its first mount: a bind mount of the
    same superblock is the same filesystem, and one FITHAW on either thaws both), parents
    before children, as listed: ``/`` first, so that it is writable again soonest."""
    seen: set[str] = set()
    kept = []
    for mount in mounts:
        if mount.fstype in NOT_FREEZABLE or mount.device in seen:
            continue
        if mount.device.startswith("0:") and not mount.source.startswith("/dev/"):
            continue  # no block device behind it
        seen.add(mount.device)
        kept.append(mount)
    return kept


def thaw_mountpoint(mountpoint: str) -> bool:
    """FITHAW until the filesystem says it is not frozen.  True: it was frozen, now thawed.
    Raises OSError for any other error (EPERM without CAP_SYS_ADMIN, a mount point gone)."""
    # O_DIRECTORY: refuse anything but the directory, and never create; no read follows.
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOCTTY)
    thawed = False
    try:
        for _ in range(MAX_THAWS_PER_FILESYSTEM):
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as exc:
                if exc.errno in NOT_FROZEN:
                    return thawed
                raise
            thawed = True
        return thawed
    finally:
        os.close(fd)


def thaw_mounts(mounts: Sequence[Mount]) -> ThawResult:
    thawed, errors = [], []
    for mount in mounts:
        try:
            if thaw_mountpoint(mount.mountpoint):
                thawed.append(mount.mountpoint)
        except OSError as exc:
            errors.append(f"{mount.mountpoint}: {exc.strerror or exc}")
    return ThawResult(tuple(thawed), tuple(errors))


def thaw_all(mountinfo: str = MOUNTINFO) -> ThawResult:
    """Thaw every frozen filesystem this process sees mounted."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            text = handle.read()  # procfs: in memory, never on the frozen disks
    except OSError as exc:
        return ThawResult(errors=(f"cannot read {mountinfo}: {exc.strerror or exc}",))
    return thaw_mounts(freezable(parse_mountinfo(text)))


def thaw_and_say(
    thaw: Callable[[], ThawResult], say: Callable[[str, str], None], cycle: str
) -> ThawResult:
    """The watchdog's thaw of the disks, and what the logs (``say``: a warning in both) must tell
    about it: that a snapshot taken from then on is not consistent."""
    result = thaw()
    for error in result.errors:
        say(f"watchdog could not thaw a filesystem: {error}", cycle)
    thawed = f": {', '.join(result.thawed)}" if result.thawed else " (none was frozen)"
    say(
        f"watchdog thawed {result.count} filesystem(s){thawed}; a snapshot taken from now on"
        " is not consistent",
        cycle,
    )
    return result
