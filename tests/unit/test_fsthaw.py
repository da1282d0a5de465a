"""fsthaw: which mounts the watchdog thaws, read from /proc/self/mountinfo, and what a thaw of a
filesystem that is not frozen does (nothing); plus the setting that turns it off."""

from __future__ import annotations

import os

import pytest

from qgafreeze.config import parse_config
from qgafreeze.errors import ConfigError
from qgafreeze.fsthaw import MOUNTINFO, Mount, freezable, parse_mountinfo, thaw_all, thaw_mounts

# A Debian 12 guest: ext4 root and /boot on virtio, a vfat ESP, btrfs /srv with a bind mount of
# a subdirectory of it, and the usual pseudo filesystems.
DEBIAN_GUEST = """\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
23 28 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
24 28 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=987654k,nr_inodes=246913
25 24 0:23 / /dev/pts rw,nosuid,noexec,relatime shared:3 - devpts devpts rw,gid=5,mode=620
26 28 0:24 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=201232k,mode=755
28 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
29 22 0:6 / /sys/kernel/security rw,nosuid,nodev,noexec,relatime shared:8 - securityfs securityfs rw
30 24 0:25 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw
32 22 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
33 22 0:28 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:10 - pstore pstore rw
34 22 0:29 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:11 - bpf bpf rw,mode=700
35 23 0:30 / /proc/sys/fs/binfmt_misc rw,relatime shared:12 - autofs systemd-1 rw,fd=29
36 24 0:20 / /dev/mqueue rw,nosuid,nodev,noexec,relatime shared:14 - mqueue mqueue rw
37 22 0:7 / /sys/kernel/debug rw,nosuid,nodev,noexec,relatime shared:15 - debugfs debugfs rw
38 22 0:12 / /sys/kernel/tracing rw,nosuid,nodev,noexec,relatime shared:16 - tracefs tracefs rw
40 28 254:2 / /boot rw,relatime shared:22 - ext4 /dev/vda2 rw
41 40 254:3 / /boot/efi rw,relatime shared:23 - vfat /dev/vda3 rw,fmask=0077,dmask=0077
43 28 0:33 / /srv rw,relatime shared:25 - btrfs /dev/vdb rw,space_cache=v2,subvolid=5,subvol=/
44 28 0:33 /data /var/lib/data rw,relatime shared:25 - btrfs /dev/vdb rw,subvolid=5,subvol=/
45 28 254:1 /home /home rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
46 28 0:40 / /mnt/nfs rw,relatime shared:26 - nfs4 host:/export rw,vers=4.2
47 28 0:41 / /mnt/fuse rw,nosuid,nodev,relatime shared:27 - fuse.sshfs me@host:/ rw
48 26 0:42 / /run/user/1000 rw,nosuid,nodev,relatime shared:28 - tmpfs tmpfs rw,mode=700
"""


def mountpoints(mounts: list[Mount]) -> list[str]:
    return [mount.mountpoint for mount in mounts]


def test_only_block_backed_filesystems_are_thawed_each_once_parents_first():
    kept = freezable(parse_mountinfo(DEBIAN_GUEST))
    # /home is /dev/vda1 again and /var/lib/data the btrfs of /srv: one FITHAW thaws each
    # filesystem, whichever of its mounts it goes through.
    assert mountpoints(kept) == ["/", "/boot", "/boot/efi", "/srv"]
    assert [mount.fstype for mount in kept] == ["ext4", "ext4", "vfat", "btrfs"]


def test_pseudo_memory_and_network_filesystems_are_never_touched():
    every = {mount.mountpoint for mount in parse_mountinfo(DEBIAN_GUEST)}
    kept = set(mountpoints(freezable(parse_mountinfo(DEBIAN_GUEST))))
    for left_out in ("/proc", "/sys", "/dev", "/run", "/dev/shm", "/sys/fs/cgroup", "/mnt/nfs"):
        assert left_out in every and left_out not in kept
    assert "/mnt/fuse" not in kept and "/run/user/1000" not in kept


def test_mount_points_with_spaces_and_optional_fields_are_read_as_the_kernel_escapes_them():
    text = (
        "50 28 8:17 / /mnt/backup\\040disk rw,relatime shared:30 master:2 - xfs /dev/sdb1 rw\n"
        "51 28 8:33 / /mnt/tab\\011and\\134slash rw,relatime - ext4 /dev/sdc1 rw\n"
    )
    mounts = parse_mountinfo(text)
    assert mountpoints(mounts) == ["/mnt/backup disk", "/mnt/tab\tand\\slash"]
    assert [(m.fstype, m.source, m.device) for m in mounts] == [
        ("xfs", "/dev/sdb1", "8:17"),
        ("ext4", "/dev/sdc1", "8:33"),
    ]


def test_lines_that_do_not_parse_are_left_out_rather_than_failing_the_thaw():
    text = "garbage\n\n28 1 254:1 / / rw - ext4 /dev/vda1 rw\n1 2 3 4 5 6 no-dash-here\n"
    assert mountpoints(parse_mountinfo(text)) == ["/"]


def test_an_unopenable_mount_point_is_an_error_naming_it_and_the_rest_are_still_tried(tmp_path):
    gone = Mount(str(tmp_path / "gone"), "ext4", "/dev/vdz1", "254:9")
    result = thaw_mounts([gone])
    assert result.count == 0
    assert len(result.errors) == 1 and result.errors[0].startswith(f"{gone.mountpoint}: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="FITHAW needs CAP_SYS_ADMIN")
def test_a_filesystem_that_is_not_frozen_is_left_as_it_is_without_an_error():
    # The kernel answers FITHAW on a filesystem that is not frozen with EINVAL: not thawed.
    assert thaw_mounts([Mount("/", "ext4", "/dev/vda1", "254:1")]) == thaw_mounts([])


@pytest.mark.skipif(os.geteuid() != 0, reason="FITHAW needs CAP_SYS_ADMIN")
def test_thawing_this_machine_when_nothing_is_frozen_thaws_nothing():
    result = thaw_all()
    assert result.count == 0, result
    assert result.errors == (), result


def test_an_unreadable_mount_table_is_an_error_not_an_exception(tmp_path):
    result = thaw_all(str(tmp_path / "no-mountinfo"))
    assert result.count == 0
    assert result.errors and "cannot read" in result.errors[0]
    assert MOUNTINFO == "/proc/self/mountinfo"


def test_the_watchdog_thaws_filesystems_unless_the_setting_turns_it_off():
    assert parse_config({"version": 1}).settings.watchdog_thaws_filesystems is True
    off = {"version": 1, "settings": {"watchdog_thaws_filesystems": False}}
    assert parse_config(off).settings.watchdog_thaws_filesystems is False


def test_the_setting_takes_only_true_or_false():
    with pytest.raises(ConfigError) as caught:
        parse_config({"version": 1, "settings": {"watchdog_thaws_filesystems": "yes please"}})
    assert "settings.watchdog_thaws_filesystems: expected true or false" in str(caught.value)
