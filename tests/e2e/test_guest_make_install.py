"""`sudo make install`, the README's other way in besides the package, on the default guest."""

from __future__ import annotations

import pytest
from guest import HOOK, NO_APPS, configure, make_install, qgafreeze_status, sh
from vm import VM


@pytest.fixture(scope="module")
def guest(vm_factory) -> VM:
    vm = vm_factory(name="make-install")
    make_install(vm)
    return vm


def test_make_install_points_qemu_ga_at_the_hook_and_qemu_ga_runs_it(guest):
    vm = guest
    assert f"fsfreeze-hook={HOOK}" in sh(vm, "cat /etc/qemu/qemu-ga.conf").stdout
    configure(vm, NO_APPS)
    try:
        assert vm.qga.fsfreeze_freeze() >= 1
    finally:
        vm.qga.fsfreeze_thaw()
    last = qgafreeze_status(vm)["last"]
    # The daemon saw the thaw that qemu-ga's hook relayed, so qemu-ga ran the installed hook.
    assert (last["op"], last["reason"]) == ("thaw", "request"), last


def test_make_install_installs_both_man_pages(guest):
    vm = guest
    assert "qgafreeze" in sh(vm, "man -P cat qgafreeze").stdout
    assert "qgafreeze.yaml" in sh(vm, "man -P cat 5 qgafreeze.yaml").stdout
