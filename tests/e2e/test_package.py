"""The Debian package in a guest of each release, the way an admin runs it: installed offline
with apt-get, qemu-ga running its hook, its man pages, an upgrade over an older build while apps
are declared and a backup is in progress, and a purge that leaves qemu-ga's files as they were
before install.

The install is the one the suite's shared guest began with (tests/e2e/shared.py: `apt-get
install ./qgafreeze_*.deb` on a fresh guest, qemu-ga's files recorded just before), and this
module is the last to use that guest.  Its tests run in order: each starts where the one before
left the package (on trixie taken back to an older build, then upgraded; then purged).  Last, on
trixie, `sudo make install`, the README's other way in, on the guest the package was purged from
(as an admin moving from the package to a source install does).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest import (
    HOOK,
    HOOK_LOG,
    NO_APPS,
    configure,
    guest_path,
    install_package,
    make_install,
    qemu_ga_version,
    qgafreeze_status,
    run_in_background,
    sh,
    wait_for,
)
from shared import QGA_FILES
from vm import VM

REPO_ROOT = Path(__file__).resolve().parents[2]
EVERY_SUITE = pytest.mark.suites("bullseye", "bookworm", "trixie")
pytestmark = [EVERY_SUITE, pytest.mark.shared_guest_last]

DUMMY_UNIT = "qgf-pkg-dummy.service"
DUMMY_UNIT_TEXT = """[Unit]
Description=an application qgafreeze quiesces in the package tests
[Service]
ExecStart=/bin/sleep infinity
"""
# The admin's own config, replacing the packaged one: a comment of theirs and one app.  No
# agent_state_file watch is needed by the hand-made freeze below, which qemu-ga never sees.
ADMIN_CONFIG = f"""# edited by the admin: kept across upgrades
version: 1
settings:
  freeze_timeout: 5m
  thaw_timeout: 5m
apps:
  dummy:
    units: [{DUMMY_UNIT}]
    timeout: 4m
"""
UPGRADE_LOG = "/run/qgf-upgrade.log"
UPGRADE_RC = "/run/qgf-upgrade.rc"


def _make_deb(version: str) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    result = subprocess.run(
        ["make", "-C", str(REPO_ROOT), "deb", f"DEB_VERSION={version}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"make deb DEB_VERSION={version} failed:\n{result.stdout}\n{result.stderr}")
    return REPO_ROOT / "dist" / f"qgafreeze_{version}_all.deb"


def _version_of(deb: Path) -> str:
    return deb.name.split("_")[1]


@pytest.fixture(scope="session")
def older_package(deb_package: Path) -> Iterator[Path]:
    """The tree built as a version dpkg orders before this one (`~` sorts first), once a
    session; removed after, so that dist/ holds one qgafreeze_*.deb to install."""
    older = _make_deb(f"{_version_of(deb_package)}~older")
    yield older
    older.unlink(missing_ok=True)
    # make deb builds the host client's package beside it, of the same version.
    older.with_name(older.name.replace("qgafreeze_", "qgafreeze-host_", 1)).unlink(missing_ok=True)


# The upgrade is proven on the default guest; the older releases install this build directly,
# which keeps the VM tier within its time (the maintainer scripts are the same on every release).
UPGRADE_SUITE = "trixie"


@pytest.fixture(scope="module")
def first_package(suite: str, deb_package: Path, older_package: Path) -> Path:
    """What the module starts from: an older build where the upgrade is tested, else this."""
    return older_package if suite == UPGRADE_SUITE else deb_package


@pytest.fixture(scope="module")
def guest(
    shared_guest, qemu_ga_files_before_install: str, first_package: Path
) -> Iterator[tuple[VM, str]]:
    """The suite's shared guest, with the package it was installed with; also what qemu-ga's
    files were before that install."""
    vm = shared_guest
    vm.qga.write_file(f"/etc/systemd/system/{DUMMY_UNIT}", DUMMY_UNIT_TEXT.encode())
    sh(vm, f"systemctl daemon-reload && systemctl start {DUMMY_UNIT}")
    if _installed_version(vm) != _version_of(first_package):
        # Back to the older build, so that the upgrade over it can be tested.
        install_package(
            vm,
            guest_path(first_package),
            "--allow-downgrades",
            "-o",
            "Dpkg::Options::=--force-confold",
        )
    yield vm, qemu_ga_files_before_install


def _installed_version(vm: VM) -> str:
    return sh(vm, "dpkg-query -W -f '${Version}' qgafreeze").stdout


def _unit_state(vm: VM, *args: str) -> str:
    return sh(vm, f"systemctl {' '.join(args)}", check=False).stdout.strip()


def _backup_through_qemu_ga(vm: VM) -> str:
    """A freeze and thaw through the real qemu-ga; the hook log lines they added."""
    sh(vm, f"truncate -s0 {HOOK_LOG}")
    # While frozen, qemu-ga runs no command: the hook log tells what happened in between.
    assert vm.qga.fsfreeze_freeze() >= 1
    vm.qga.fsfreeze_thaw()
    log = vm.qga.read_file(HOOK_LOG).decode()
    assert f"{DUMMY_UNIT}: stopped" in log, log
    assert _unit_state(vm, "is-active", DUMMY_UNIT) == "active"
    return log


def test_the_package_installs_offline_wiring_qemu_ga_and_enabling_only_the_socket(
    guest, first_package
):
    vm, _ = guest
    assert _installed_version(vm) == _version_of(first_package)
    conf = sh(vm, "cat /etc/qemu/qemu-ga.conf").stdout
    assert f"fsfreeze-hook={HOOK}" in conf
    assert _unit_state(vm, "is-enabled", "qgafreeze.socket") == "enabled"
    assert _unit_state(vm, "is-active", "qgafreeze.socket") == "active"
    # Socket-activated: the service is started by the first request, never enabled on its own.
    assert _unit_state(vm, "is-enabled", "qgafreeze.service") == "disabled"
    assert sh(vm, "stat -c '%a %U:%G' /etc/qgafreeze.yaml").stdout.split() == ["600", "root:root"]
    # dh_python3 compiled the private package at install time.
    sh(vm, "ls /usr/lib/qgafreeze/qgafreeze/__pycache__/shim.*.pyc")


def test_qemu_ga_runs_the_packaged_hook_for_a_declared_app(guest):
    vm, _ = guest
    vm.qga.write_file("/etc/qgafreeze.yaml", ADMIN_CONFIG.encode())
    sh(vm, "systemctl restart qgafreeze.service")
    log = _backup_through_qemu_ga(vm)
    for phase in ("freeze", "thaw"):
        assert f"execute qgafreeze:dummy {phase}" in log, log
    assert log.count("qgafreeze:dummy finished with status=0") == 2, log


def test_the_readmes_platform_row_names_this_guests_qemu_ga_systemd_and_python(guest, suite):
    vm, _ = guest
    readme = (REPO_ROOT / "README.md").read_text()
    row = re.search(
        rf"^\| Debian \d+ {suite} \(qemu-ga ([\d.]+), systemd (\d+), Python ([\d.]+)\)",
        readme,
        re.M,
    )
    assert row is not None, f"README's platform table has no row for {suite}"
    qga, systemd, python = row.groups()
    assert "%d.%d" % qemu_ga_version(vm) == qga
    assert sh(vm, "systemctl --version").stdout.split()[1] == systemd
    assert sh(vm, "python3 --version").stdout.split()[1].startswith(python + ".")


def test_both_man_pages_are_installed(guest):
    vm, _ = guest
    page = sh(vm, "man -P cat qgafreeze").stdout
    assert "EXIT STATUS" in page and "THE HOOK" in page
    assert "SETTINGS" in sh(vm, "man -P cat 5 qgafreeze.yaml").stdout


@pytest.mark.suites(UPGRADE_SUITE)
def test_an_upgrade_during_a_freeze_waits_for_the_thaw_then_restarts_the_daemon_keeping_edits(
    guest, deb_package
):
    vm, _ = guest
    # The state a backup is in between its freeze and thaw hooks, made by hand so that the
    # disks stay writable for dpkg.
    sh(vm, "qgafreeze freeze")
    try:
        frozen = qgafreeze_status(vm)
        assert frozen["state"] == "frozen" and frozen["paused_apps"] == ["dummy"]
        # As unattended upgrades run it: no prompt, and an edited conffile is kept even when
        # the packaged one changed (the tree may have moved on since the older build).
        run_in_background(
            vm,
            "qgf-upgrade",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -o Dpkg::Options::=--force-confdef"
            f" -o Dpkg::Options::=--force-confold {guest_path(deb_package)}"
            f" > {UPGRADE_LOG} 2>&1; echo $? > {UPGRADE_RC}",
        )
        wait_for(
            vm,
            f"grep -q 'waiting for the backup to end' {UPGRADE_LOG} || test -s {UPGRADE_RC}",
            timeout=600,
        )
        log = sh(vm, f"cat {UPGRADE_LOG}").stdout
        assert "waiting for the backup to end" in log, log
        still = qgafreeze_status(vm)
        assert (still["state"], still["pid"]) == ("frozen", frozen["pid"])
        assert _unit_state(vm, "is-active", DUMMY_UNIT) != "active"
    finally:
        sh(vm, "qgafreeze thaw", check=False)
    wait_for(vm, f"test -s {UPGRADE_RC}", timeout=600)
    log = sh(vm, f"cat {UPGRADE_LOG}").stdout
    assert sh(vm, f"cat {UPGRADE_RC}").stdout.strip() == "0", log
    assert _installed_version(vm) == _version_of(deb_package)
    after = qgafreeze_status(vm)
    assert after["pid"] != frozen["pid"] and after["version"] == _version_of(deb_package), after
    assert after["apps"] == ["dummy"]
    assert vm.qga.read_file("/etc/qgafreeze.yaml").decode() == ADMIN_CONFIG
    assert sh(vm, "stat -c %a /etc/qgafreeze.yaml").stdout.strip() == "600"
    assert "qgafreeze:dummy finished with status=0" in _backup_through_qemu_ga(vm)


def test_purge_leaves_qemu_ga_as_before_install_and_removes_config_and_units(guest):
    vm, before = guest
    result = vm.run_unit(["apt-get", "purge", "-y", "qgafreeze"], timeout=900)
    assert result.exitcode == 0, f"{result.stdout}\n{result.stderr}"
    assert sh(vm, QGA_FILES).stdout == before
    sh(vm, "test ! -e /etc/qgafreeze.yaml && test ! -e /usr/lib/qgafreeze")
    sh(vm, "test ! -e /usr/lib/systemd/system/qgafreeze.socket")
    sh(vm, "test ! -e /lib/systemd/system/qgafreeze.socket")
    assert _unit_state(vm, "cat", "qgafreeze.socket") == ""
    # qemu-ga, restarted by the removal, freezes and thaws without running the hook.
    sh(vm, f"truncate -s0 {HOOK_LOG}")
    assert vm.qga.fsfreeze_freeze() >= 1
    vm.qga.fsfreeze_thaw()
    assert "qgafreeze" not in vm.qga.read_file(HOOK_LOG).decode()


def test_purge_restores_an_existing_qemu_ga_conf_byte_for_byte(guest, deb_package):
    vm, _ = guest
    # An admin's own file: their hook, another setting, comments, no final newline.
    own = b"# the admin's\n[general]\nverbose=false\nfsfreeze-hook=/etc/qemu/fsfreeze-hook\n# end"
    vm.qga.write_file("/etc/qemu/qemu-ga.conf", own)
    sh(vm, "chmod 640 /etc/qemu/qemu-ga.conf")
    before = sh(vm, QGA_FILES).stdout
    install_package(vm, guest_path(deb_package))
    assert f"fsfreeze-hook={HOOK}" in sh(vm, "cat /etc/qemu/qemu-ga.conf").stdout
    result = vm.run_unit(["apt-get", "purge", "-y", "qgafreeze"], timeout=900)
    assert result.exitcode == 0, f"{result.stdout}\n{result.stderr}"
    assert sh(vm, QGA_FILES).stdout == before
    assert vm.qga.read_file("/etc/qemu/qemu-ga.conf") == own


@pytest.mark.suites(UPGRADE_SUITE)
def test_make_install_points_qemu_ga_at_the_hook_and_qemu_ga_runs_it(guest):
    vm, _ = guest
    make_install(vm)
    assert f"fsfreeze-hook={HOOK}" in sh(vm, "cat /etc/qemu/qemu-ga.conf").stdout
    configure(vm, NO_APPS)
    try:
        assert vm.qga.fsfreeze_freeze() >= 1
    finally:
        vm.qga.fsfreeze_thaw()
    last = qgafreeze_status(vm)["last"]
    # The daemon saw the thaw that qemu-ga's hook relayed, so qemu-ga ran the installed hook.
    assert (last["op"], last["reason"]) == ("thaw", "request"), last


@pytest.mark.suites(UPGRADE_SUITE)
def test_make_install_installs_both_man_pages(guest):
    vm, _ = guest
    assert "qgafreeze" in sh(vm, "man -P cat qgafreeze").stdout
    assert "qgafreeze.yaml" in sh(vm, "man -P cat 5 qgafreeze.yaml").stdout
