"""One booted guest per suite with the package installed, shared by the modules that ask for it.

A guest boot with the package installed costs 1.5 to 2 minutes under TCG; most modules need
nothing more than such a guest, so they share one (the `shared_guest` fixture) instead of each
booting its own.  The price is discipline, which the fixture checks where it can: each module
starts from a known state (`reset`: thawed, no apps declared, hook log empty, MariaDB running)
and must stop what it started and remove the files it wrote.  The package module comes last in
each suite (`shared_guest_last`): it checks the install this guest began with, then upgrades,
purges and compares qemu-ga's files with what they were before that install.  A guest that stopped
answering is replaced by a fresh one rather than failing every module after the one that broke
it.  A guest of another kind (one run by libvirt, a snapshot booted as a restored VM) is still
booted by the test that needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

import pytest
from guest import HOOK, NO_APPS, configure, install, sh, wait_for
from image import GuestImage
from vm import VM, QGAError, QGATimeout, VMFactory

FIXTURE = "shared_guest"
# The module that must use a suite's shared guest after every other (it purges the package).
LAST_MARKER = "shared_guest_last"
_HEALTH_TIMEOUT = 20.0
# What qemu-ga reads and the package may touch, listed with modes, owners and contents, so that
# a file created, changed or left behind shows as a difference.
QGA_FILES = (
    "cd /etc && find qemu -printf '%y %m %U:%G %p -> %l\\n' | sort"
    " && find qemu -type f -exec sha256sum {} + | sort"
)


def uses_shared_guest(item: pytest.Item) -> bool:
    return FIXTURE in getattr(item, "fixturenames", ())


def reset(vm: VM) -> None:
    """The state every module starts from."""
    with contextlib.suppress(QGAError, QGATimeout):
        if vm.qga.fsfreeze_status(timeout=10.0) == "frozen":
            vm.qga.fsfreeze_thaw(timeout=120.0)
    configure(vm, NO_APPS)
    sh(vm, "truncate -s0 /var/log/qga-fsfreeze-hook.log; systemctl start mariadb.service")
    wait_for(vm, "systemctl is-active mariadb.service")


def _answers(vm: VM) -> bool:
    if not vm.running():
        return False
    try:
        vm.qga.ping(timeout=_HEALTH_TIMEOUT)
    except (QGAError, QGATimeout, ConnectionError, OSError):
        return False
    return True


class SharedGuests:
    """The guests, and which collected tests still need each: the last one's teardown kills its
    guest (a TCG guest left idle still takes CPU from the next module's)."""

    def __init__(self) -> None:
        self._vms: dict[str, VM] = {}
        self._factories: dict[str, VMFactory] = {}
        self._remaining: dict[str, set[str]] = {}
        # QGA_FILES in each suite's guest before the package was installed.
        self.before_install: dict[str, str] = {}
        # Why a suite's guest could not be booted and installed: the modules after the first
        # fail at once instead of each waiting out another boot.
        self._broken: dict[str, str] = {}

    def plan(self, items: Iterable[pytest.Item], suite_of: Callable[[pytest.Item], str]) -> None:
        self._remaining = {}
        for item in items:
            if uses_shared_guest(item):
                self._remaining.setdefault(suite_of(item), set()).add(item.nodeid)

    def get(
        self, image: GuestImage, package: Path, workdir: Callable[[], Path], share: Path
    ) -> VM:
        suite = image.suite
        vm = self._vms.get(suite)
        if vm is not None and not _answers(vm):
            print(f"shared {suite} guest stopped answering: booting a new one")
            vm.kill()
            vm = None
        if vm is None:
            if suite in self._broken:
                pytest.fail(f"the shared {suite} guest failed earlier: {self._broken[suite]}")
            try:
                vm = self._start(image, package, workdir, share)
            except Exception as exc:
                self._broken[suite] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                raise
        reset(vm)
        return vm

    def _start(
        self, image: GuestImage, package: Path, workdir: Callable[[], Path], share: Path
    ) -> VM:
        suite = image.suite
        factory = self._factories.get(suite)
        if factory is None:
            factory = self._factories[suite] = VMFactory(image, workdir(), share)
        vm = factory(name=f"shared-{suite}")
        self._vms[suite] = vm
        self.before_install[suite] = sh(vm, QGA_FILES).stdout
        install(vm, package)
        assert f"fsfreeze-hook={HOOK}" in sh(vm, "cat /etc/qemu/qemu-ga.conf").stdout
        return vm

    def done(self, item: pytest.Item, suite: str) -> None:
        remaining = self._remaining.get(suite)
        if remaining is None:
            return
        remaining.discard(item.nodeid)
        if not remaining:
            self.stop(suite)

    def stop(self, suite: str | None = None) -> None:
        """Throwaway guests: killed, not powered off (nothing reads their disks afterwards)."""
        for name in [suite] if suite is not None else list(self._vms):
            vm = self._vms.pop(name, None)
            if vm is not None:
                vm.kill()
