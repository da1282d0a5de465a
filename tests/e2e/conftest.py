"""End-to-end tier: tests drive a real VM, with the real qemu-guest-agent, from the host.

Each test runs in guests of the Debian suites its `suites` marker lists (default: trixie only),
once per suite that `QGAFREEZE_SUITES` selects (default: all three), with the id suffix
`[SUITE]`. The selected suites' images are built in the background (two at a time) from the
moment the tier's tests are collected, so that building them overlaps the other tiers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

# Tests and scripts import the harness as `image` and `vm`, whatever pytest import mode is used.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from image import DEFAULT_SUITE, SUITES, GuestImage, build_seconds, ensure_image
from shared import LAST_MARKER, SharedGuests, uses_shared_guest
from vm import QEMU, QEMU_IMG, VM, VMFactory, e2e_required

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parents[1]
SUITES_ENV = "QGAFREEZE_SUITES"
ELSEWHERE_ENV = "QGAFREEZE_SUITES_ELSEWHERE"
_SUITES_MARKER = "suites(*names): run the test once per listed Debian suite that is selected"
_LAST_MARKER_TEXT = f"{LAST_MARKER}: the module uses its suite's shared guest after every other"
_MAX_CONCURRENT_BUILDS = 2
_MAKE_DEB_TIMEOUT = 1200

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host package that provides each tool the tier runs.
_HOST_TOOLS = {
    QEMU: "qemu-system-x86",
    QEMU_IMG: "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
}
_APT_TIMEOUT = 900

# Filled when the tier is skipped, so the terminal summary can repeat it where it is seen.
_skip_reasons: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml normally declares the markers; this keeps `-c other.ini` runs warning-free.
    declared = config.getini("markers")
    if not any(line.startswith("e2e:") for line in declared):
        config.addinivalue_line(
            "markers", "e2e: needs a real VM with qemu-ga, driven from the host"
        )
    if not any(line.startswith("suites(") for line in declared):
        config.addinivalue_line("markers", _SUITES_MARKER)
    if not any(line.startswith(LAST_MARKER) for line in declared):
        config.addinivalue_line("markers", _LAST_MARKER_TEXT)


def suite_selection() -> tuple[tuple[str, ...], str]:
    """The suites `QGAFREEZE_SUITES` selects, in release order, and what is wrong with the
    selection ("" if nothing): an unknown name, or less than every suite where e2e is required."""
    names = os.environ.get(SUITES_ENV, "").replace(",", " ").split() or list(SUITES)
    # The suites a pytest run beside this one covers (tests/run-tiers).
    elsewhere = os.environ.get(ELSEWHERE_ENV, "").replace(",", " ").split()
    problems = []
    unknown = [name for name in names + elsewhere if name not in SUITES]
    if unknown:
        problems.append(
            f"{SUITES_ENV} or {ELSEWHERE_ENV} names unknown suite(s) {', '.join(unknown)}"
            f" (known: {' '.join(SUITES)})"
        )
    if set(names) & set(elsewhere):
        problems.append(f"{SUITES_ENV} and {ELSEWHERE_ENV} both name {set(names) & set(elsewhere)}")
    if e2e_required() and set(names) | set(elsewhere) != set(SUITES):
        problems.append(
            f"{SUITES_ENV}={' '.join(names)}: CI=true or QGAFREEZE_REQUIRE_E2E=1 runs every suite"
            f" ({' '.join(SUITES)})"
        )
    return tuple(s for s in SUITES if s in names), "; ".join(problems)


def _in_tier(item: pytest.Item) -> bool:
    path = Path(str(item.fspath)).resolve()
    return path == E2E_DIR or E2E_DIR in path.parents


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "suite" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("suites")
    suites = list(marker.args) if marker is not None else [DEFAULT_SUITE]
    unknown = [name for name in suites if name not in SUITES]
    if unknown or not suites:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: @pytest.mark.suites needs suites among"
            f" {', '.join(SUITES)}, not {suites}"
        )
    # Module scope: a module's module-scoped guests are booted once per suite.
    metafunc.parametrize("suite", suites, ids=suites, indirect=True, scope="module")


def _item_suite(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("suite") if callspec is not None else None


def _order(items: list[pytest.Item]) -> list[pytest.Item]:
    """Suite by suite in release order, so that one suite's shared guest serves every module of
    that suite and is gone before the next suite's boots; within a suite, the modules that use
    the shared guest first (it is killed after its last user, before the modules that boot
    guests of their own start), then the others, each in collection order, and each module's
    tests in the order it defines them.

    pytest groups a module-scoped parameter by its index, not its value, and index 0 is bullseye
    for a marked test but trixie for an unmarked one: left alone, a module would boot its guests
    of one suite several times over."""
    rank: dict[str, int] = {}
    sharing: set[str] = set()
    last: set[str] = set()
    for item in items:
        rank.setdefault(str(item.fspath), len(rank))
        if uses_shared_guest(item):
            sharing.add(str(item.fspath))
        if item.get_closest_marker(LAST_MARKER) is not None:
            last.add(str(item.fspath))
    return sorted(
        items,
        key=lambda i: (
            SUITES.index(_item_suite(i) or DEFAULT_SUITE),
            str(i.fspath) not in sharing,
            str(i.fspath) in last,
            rank[str(i.fspath)],
            i.location[1] or 0,
        ),
    )


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's.
    tier = [i for i in items if _in_tier(i)]
    for item in tier:
        item.add_marker(pytest.mark.e2e)
    if tier:
        others = [i for i in items if not _in_tier(i)]
        items[:] = others + _order(tier)
    selected, problem = suite_selection()
    if not problem:
        # A wrong selection keeps every item, so that each fails saying what is wrong.
        dropped = [i for i in items if _item_suite(i) not in (None, *selected)]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if i not in dropped]
    needed = {_item_suite(i) for i in items}
    _shared.plan((i for i in items if _in_tier(i)), lambda i: _item_suite(i) or DEFAULT_SUITE)
    if problem or config.option.collectonly:
        return
    _builds.start([s for s in selected if s in needed])


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
        return ["must run as root (mmdebstrap, chroot and the image cache need it)"]
    missing = _missing_tools()
    if missing:
        failure = _install_host_packages(sorted(set(missing.values())))
        if failure:
            return [failure]
    return [
        f"{tool} not found after installing {package}" for tool, package in _missing_tools().items()
    ]


class _Builds:
    """The selected suites' images, built in background threads while other tests run."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future[GuestImage]] = {}
        self._lock = threading.Lock()
        self._problems: list[str] | None = None
        self.waited: dict[str, float] = {}
        self.built: dict[str, float] = {}

    def _preconditions(self) -> list[str]:
        # Once, whichever build thread or fixture asks first: it may install host packages.
        with self._lock:
            if self._problems is None:
                self._problems = unmet_preconditions()
            return self._problems

    def _build(self, suite: str) -> GuestImage:
        problems = self._preconditions()
        if problems:
            raise _Unmet(problems)
        started = time.monotonic()
        image = ensure_image(suite)
        seconds = build_seconds(image)
        # The file holds whole seconds: one of slack, or a build of this run reads as cached.
        if seconds is not None and time.monotonic() - started >= seconds - 1:
            self.built[suite] = seconds
        return image

    def start(self, suites: list[str]) -> None:
        if not suites or self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(
            max_workers=_MAX_CONCURRENT_BUILDS, thread_name_prefix="e2e-image"
        )
        for suite in suites:
            self._futures[suite] = self._executor.submit(self._build, suite)

    def image(self, suite: str) -> GuestImage:
        future = self._futures.get(suite)
        started = time.monotonic()
        try:
            return future.result() if future is not None else self._build(suite)
        finally:
            self.waited[suite] = time.monotonic() - started

    def stop(self) -> None:
        if self._executor is not None:
            # A build under way finishes (and is cached); those not begun are dropped.
            self._executor.shutdown(wait=False, cancel_futures=True)


class _Unmet(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))


_builds = _Builds()


_shared = SharedGuests()


def pytest_unconfigure(config: pytest.Config) -> None:
    _builds.stop()
    _shared.stop()


# tests/run-tiers: the run beside the first waits for this file before its first VM test, and the
# first run writes it when its own VM tier begins (or when it ends, whatever happened), so that
# the two VM sets overlap each other and not the container tier, which a guest beside it slowed
# down threefold.  Both runs build their images from collection on, regardless.
START_ENV = "QGAFREEZE_VM_TIER_START"
AWAIT_ENV = "QGAFREEZE_VM_TIER_AWAIT"
_AWAIT_LIMIT = 3600.0


def _vm_tier_begins() -> None:
    path = os.environ.get(START_ENV)
    if path:
        Path(path).touch()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _in_tier(item):
        _vm_tier_begins()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _vm_tier_begins()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Iterator[None]:
    path = os.environ.get(AWAIT_ENV)
    if path and any(_in_tier(item) for item in session.items):
        started = time.monotonic()
        while not Path(path).exists() and time.monotonic() - started < _AWAIT_LIMIT:
            time.sleep(1.0)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"e2e: waited {time.monotonic() - started:.0f} s for the first run's VM tier"
            )
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # After the item's own teardown, module fixtures included: they may still use the guest.
    yield
    if _in_tier(item):
        _shared.done(item, _item_suite(item) or DEFAULT_SUITE)


@pytest.fixture(scope="module")
def suite(request: pytest.FixtureRequest) -> str:
    """The Debian suite of this test's guests (the `suites` marker; trixie when unmarked)."""
    return str(getattr(request, "param", DEFAULT_SUITE))


@pytest.fixture(scope="module")
def guest_image(suite: str) -> GuestImage:
    """The cached image of the test's suite, built on first use (about 5 minutes)."""
    _selected, problem = suite_selection()
    if problem:
        pytest.fail(problem)
    try:
        return _builds.image(suite)
    except _Unmet as exc:
        reason = f"e2e tests cannot run here: {exc}"
        if e2e_required():
            pytest.fail(reason + " (required because CI=true or QGAFREEZE_REQUIRE_E2E=1)")
        if reason not in _skip_reasons:
            _skip_reasons.append(reason)
        pytest.skip("E2E TIER NOT RUN: " + reason)


@pytest.fixture(scope="module")
def vm_factory(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VMFactory]:
    """Boots VMs of the test's suite, each in its own work directory; all are killed when the
    module ends (throwaway guests: nothing reads their disks afterwards).

    Module scope, so that a module can share one booted guest (a boot costs about a minute
    under TCG); a test that boots a VM of its own may shut it down early with `vm.shutdown()`.
    """
    factory = VMFactory(guest_image, tmp_path_factory.mktemp(f"e2e-{guest_image.suite}"), REPO_ROOT)
    try:
        yield factory
    finally:
        factory.kill_all()


@pytest.fixture(scope="module")
def shared_guest(
    guest_image: GuestImage, deb_package: Path, tmp_path_factory: pytest.TempPathFactory
) -> VM:
    """The suite's shared guest (tests/e2e/shared.py): booted once, the package installed with
    `apt-get install ./…deb`, reset for each module to no apps declared, thawed, an empty hook
    log and MariaDB running; PostgreSQL and Redis are installed but stopped.  A module that uses
    it stops what it started and removes the unit files it wrote."""
    return _shared.get(
        guest_image,
        deb_package,
        lambda: tmp_path_factory.mktemp(f"e2e-shared-{guest_image.suite}"),
        REPO_ROOT,
    )


@pytest.fixture(scope="module")
def qemu_ga_files_before_install(shared_guest: VM, suite: str) -> str:
    """qemu-ga's files (shared.QGA_FILES) in the shared guest before the package was installed."""
    return _shared.before_install[suite]


def _version() -> str:
    text = (REPO_ROOT / "src" / "qgafreeze" / "__init__.py").read_text(encoding="utf-8")
    found = re.search(r"""(?m)^__version__ = ["']([^"']+)["']""", text)
    if found is None:
        raise RuntimeError("src/qgafreeze/__init__.py has no __version__")
    return found.group(1)


@pytest.fixture(scope="session")
def deb_package() -> Path:
    """The .deb that `make deb` builds from this tree (run once a session), on the host; a guest
    sees it under /src (`guest.guest_path`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = _SYSTEM_PATH
    result = subprocess.run(
        ["make", "-C", str(REPO_ROOT), "deb"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=_MAKE_DEB_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"make deb failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    package = REPO_ROOT / "dist" / f"qgafreeze_{_version()}_all.deb"
    if not package.is_file():
        pytest.fail(f"make deb succeeded but left no {package}:\n{result.stdout[-4000:]}")
    return package


_durations: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    found = re.search(r"\[(?:.*-)?(" + "|".join(SUITES) + r")(?:-.*)?\]$", report.nodeid)
    if found and "e2e" in report.keywords:
        _durations[found.group(1)] += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _durations:
        for suite in SUITES:
            if suite not in _durations:
                continue
            built = _builds.built.get(suite)
            image = f"image built in {built:.0f} s" if built is not None else "cached image"
            waited = _builds.waited.get(suite, 0.0)
            terminalreporter.write_line(
                f"e2e {suite}: tests {_durations[suite]:.0f} s; {image}; tests waited"
                f" {waited:.0f} s for it"
            )
    # A skip is easy to miss among dots; say it once more, in red, at the end of the run.
    for reason in _skip_reasons:
        terminalreporter.write_line(f"WARNING: E2E TIER SKIPPED: {reason}", red=True, bold=True)
