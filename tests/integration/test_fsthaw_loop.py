"""fsthaw against the real kernel: an ext4 filesystem on a loop device, frozen with fsfreeze(8)
as qemu-ga freezes it, is found in /proc/self/mountinfo and thawed by FITHAW; a writer blocked on
it goes on; a second thaw finds it not frozen and leaves it as it is.

Only that loop filesystem is touched (never this machine's others, which other tests may have
frozen on purpose), so this runs on the host, not in the container.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qgafreeze.fsthaw import MOUNTINFO, Mount, freezable, parse_mountinfo, thaw_mounts


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture
def loop_ext4(tmp_path: Path) -> Iterator[Path]:
    image, mountpoint = tmp_path / "fs.img", tmp_path / "mnt"
    mountpoint.mkdir()
    with image.open("wb") as handle:
        handle.truncate(32 * 1024 * 1024)
    run("mkfs.ext4", "-q", "-F", str(image))
    run("mount", "-o", "loop", str(image), str(mountpoint))  # the loop device autoclears
    try:
        yield mountpoint
    finally:
        subprocess.run(["fsfreeze", "-u", str(mountpoint)], capture_output=True, check=False)
        run("umount", str(mountpoint))


def this_mount(mountpoint: Path) -> list[Mount]:
    with open(MOUNTINFO, encoding="utf-8") as handle:
        mounts = parse_mountinfo(handle.read())
    return freezable(m for m in mounts if m.mountpoint == str(mountpoint))


def test_a_filesystem_frozen_as_qemu_ga_freezes_it_is_thawed_and_its_blocked_writer_goes_on(
    loop_ext4: Path,
):
    mounts = this_mount(loop_ext4)
    assert [(m.fstype, m.source.startswith("/dev/loop")) for m in mounts] == [("ext4", True)]
    run("fsfreeze", "-f", str(loop_ext4))
    target = loop_ext4 / "written"
    writer = subprocess.Popen(["/bin/sh", "-c", f"echo x > {target} && sync {target}"])
    try:
        time.sleep(1.0)
        assert writer.poll() is None, "a write to a frozen filesystem went through"

        result = thaw_mounts(mounts)
        assert (result.thawed, result.errors) == ((str(loop_ext4),), ())
        assert writer.wait(timeout=10) == 0
    finally:
        if writer.poll() is None:
            subprocess.run(["fsfreeze", "-u", str(loop_ext4)], check=False)
            writer.wait(timeout=10)
    assert target.read_text() == "x\n"

    # What a late thaw from the host meets: nothing frozen, nothing done, no error.
    again = thaw_mounts(mounts)
    assert (again.count, again.errors) == (0, ())
