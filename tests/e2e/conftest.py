"""End-to-end tier: tests drive a real VM, with the real qemu-guest-agent, from the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests and scripts import the harness as `image` and `vm`, whatever pytest import mode is used.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from image import GuestImage, ensure_image
from vm import QEMU, QEMU_IMG, VMFactory

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parents[1]

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host package that provides each tool the tier runs.
_HOST_TOOLS = {
    QEMU: "qemu-system-x86",
    QEMU_IMG: "qemu-utils",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
}
_APT_TIMEOUT = 900

# Filled when the tier is skipped, so the terminal summary can repeat it where it is seen.
_skip_reasons: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml normally declares the marker; this keeps `-c other.ini` runs warning-free.
    if not any(line.startswith("e2e:") for line in config.getini("markers")):
        config.addinivalue_line(
            "markers", "e2e: needs a real VM with qemu-ga, driven from the host"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's.
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path == E2E_DIR or E2E_DIR in path.parents:
            item.add_marker(pytest.mark.e2e)


def _e2e_required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("QGAFREEZE_REQUIRE_E2E") == "1"


def _missing_tools() -> dict[str, str]:
    return {
        tool: package
        for tool, package in _HOST_TOOLS.items()
        if shutil.which(tool, path=_SYSTEM_PATH) is None
    }


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "-q", "-y", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={"PATH": _SYSTEM_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"},
        timeout=_APT_TIMEOUT,
        check=False,
    )


def _install_host_packages(packages: list[str]) -> str | None:
    """Install packages with apt-get; the reason it failed, or None."""
    if shutil.which("apt-get", path=_SYSTEM_PATH) is None:
        return "apt-get not found to install " + " ".join(packages)
    install = ("install", "--no-install-recommends", *packages)
    result = _apt_get(*install)
    if result.returncode != 0:
        # A fresh machine may have no package lists yet.
        _apt_get("update")
        result = _apt_get(*install)
    if result.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed: {result.stderr.strip()[-500:]}"
    return None


def unmet_preconditions() -> list[str]:
    """Reasons this machine cannot run the tier, after installing what is missing; [] if none."""
    if os.geteuid() != 0:
        return ["must run as root (debootstrap, chroot and the image cache need it)"]
    missing = _missing_tools()
    if missing:
        failure = _install_host_packages(sorted(set(missing.values())))
        if failure:
            return [failure]
    return [
        f"{tool} not found after installing {package}" for tool, package in _missing_tools().items()
    ]


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cached guest image, built on first use (2-3 minutes)."""
    problems = unmet_preconditions()
    if problems:
        reason = "e2e tests cannot run here: " + "; ".join(problems)
        if _e2e_required():
            pytest.fail(reason + " (required because CI=true or QGAFREEZE_REQUIRE_E2E=1)")
        if not _skip_reasons:
            _skip_reasons.append(reason)
        pytest.skip("E2E TIER NOT RUN: " + reason)
    return ensure_image()


@pytest.fixture(scope="module")
def vm_factory(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VMFactory]:
    """Boots VMs, each in its own work directory; all are shut down when the module ends.

    Module scope, so that a module can share one booted guest (a boot costs about 20 s under
    TCG); a test that boots a VM of its own may shut it down early with `vm.shutdown()`.
    """
    factory = VMFactory(guest_image, tmp_path_factory.mktemp("e2e"), REPO_ROOT)
    try:
        yield factory
    finally:
        factory.shutdown_all()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # A skip is easy to miss among dots; say it once more, in red, at the end of the run.
    for reason in _skip_reasons:
        terminalreporter.write_line(f"WARNING: E2E TIER SKIPPED: {reason}", red=True, bold=True)
