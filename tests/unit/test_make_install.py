"""`make install` / `make uninstall` into a DESTDIR: the tree they leave, and nothing beyond it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from qgafreeze.config import parse_text

REPO = Path(__file__).resolve().parents[2]
LIB = "usr/lib/qgafreeze"
PACKAGE = f"{LIB}/qgafreeze"
CLI = "usr/bin/qgafreeze"
SHIM = "usr/libexec/qgafreeze/fsfreeze-hook"
QUIESCE = "usr/libexec/qgafreeze/quiesce"
OLD_UNITS = ("etc/systemd/system/qgafreeze.service", "etc/systemd/system/qgafreeze.socket")
OLD_WANTS = "etc/systemd/system/sockets.target.wants/qgafreeze.socket"
CONFIG = "etc/qgafreeze.yaml"
DOCS = "usr/share/doc/qgafreeze"

# Where an install without DESTDIR would write: none of it may change here.
HOST_PATHS = (
    "/usr/lib/qgafreeze",
    "/usr/libexec/qgafreeze",
    "/usr/bin/qgafreeze",
    "/usr/local/lib/qgafreeze",
    "/usr/local/bin/qgafreeze",
    "/etc/qgafreeze.yaml",
    "/etc/systemd/system/qgafreeze.service",
    "/etc/systemd/system/qgafreeze.socket",
    "/etc/systemd/system/sockets.target.wants/qgafreeze.socket",
    "/etc/qemu/qemu-ga.conf",
    "/etc/sysconfig/qemu-ga",
    "/usr/share/doc/qgafreeze",
    "/usr/share/man/man8/qgafreeze.8",
    "/usr/share/man/man5/qgafreeze.yaml.5",
    "/lib/systemd/system/qgafreeze.service",
    "/usr/lib/systemd/system/qgafreeze.service",
)

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def make(target: str, destdir: Path, prefix: str = "/usr") -> subprocess.CompletedProcess[str]:
    # Variables inherited from an outer `make test` (or a shell) would change what is tested.
    inherited = {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "DESTDIR", "PREFIX"}
    inherited |= {"PYTHON", "SYSCONFDIR", "UNITDIR"}
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            target,
            f"DESTDIR={destdir}",
            f"PREFIX={prefix}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"make {target} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result


def unit_dir() -> str:
    """Where install puts units, as the Makefile decides it (systemd.pc, else /usr/lib/...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "UNITDIR"}
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(REPO), "unitdir"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.fixture(scope="module")
def units() -> tuple[str, str]:
    """The installed units' paths under DESTDIR (asked of make once, when a test needs them)."""
    where = unit_dir().lstrip("/")
    return (f"{where}/qgafreeze.service", f"{where}/qgafreeze.socket")


def snapshot(paths: list[Path]) -> dict[str, tuple[int, int, int]]:
    """Every file and directory under ``paths``, with what would show a change."""
    seen: dict[str, tuple[int, int, int]] = {}
    for top in paths:
        if not os.path.lexists(top):
            continue
        for current in [top, *(top.rglob("*") if top.is_dir() and not top.is_symlink() else [])]:
            if "__pycache__" in current.parts:
                continue
            st = current.lstat()
            seen[str(current)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def modules() -> list[str]:
    return sorted(p.name for p in (REPO / "src/qgafreeze").glob("*.py"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    destdir = tmp_path_factory.mktemp("destdir")
    # The host paths, and the parts of the source tree that install reads.
    watched = [Path(p) for p in HOST_PATHS]
    watched += [REPO / name for name in ("src", "systemd", "config", "docs", "Makefile")]
    before = snapshot(watched)
    result = make("install", destdir)
    assert snapshot(watched) == before, "make install with DESTDIR changed files outside DESTDIR"
    return destdir, result.stdout + result.stderr


def test_install_copies_every_module_readable_by_all(installed: tuple[Path, str]) -> None:
    destdir, _ = installed

    package = destdir / PACKAGE
    assert sorted(p.name for p in package.glob("*.py")) == modules()
    for name in modules():
        assert (package / name).read_bytes() == (REPO / "src/qgafreeze" / name).read_bytes()
        assert stat.S_IMODE((package / name).stat().st_mode) == 0o644


def test_install_copies_the_quiesce_helpers_beside_the_package(installed: tuple[Path, str]) -> None:
    destdir, _ = installed

    helpers = sorted(p.name for p in (REPO / "src/qgafreeze/quiesce").glob("*.py"))
    assert "__init__.py" in helpers and "__main__.py" in helpers
    package = destdir / PACKAGE / "quiesce"
    assert sorted(p.name for p in package.glob("*.py")) == helpers
    for name in helpers:
        assert (package / name).read_bytes() == (REPO / "src/qgafreeze/quiesce" / name).read_bytes()
        assert stat.S_IMODE((package / name).stat().st_mode) == 0o644
    assert list((package / "__pycache__").glob("__init__.*.pyc"))


def test_the_installed_package_runs_the_quiesce_program_installed_beside_it(
    installed: tuple[Path, str], tmp_path: Path
) -> None:
    destdir, _ = installed
    # Under any PREFIX: the container tier installs under /opt, packages under /usr.
    opt = tmp_path / "opt"
    make("install", opt, prefix="/opt")
    for root, prefix in ((destdir, "usr"), (opt, "opt")):
        found = subprocess.run(
            [
                "/usr/bin/python3",
                "-IB",
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]);"
                " from qgafreeze import paths; print(paths.QUIESCE)",
                str(root / prefix / "lib/qgafreeze"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        assert found == str(root / prefix / "libexec/qgafreeze/quiesce")
        assert os.access(found, os.X_OK)


def test_install_byte_compiles_with_the_final_paths(installed: tuple[Path, str]) -> None:
    destdir, _ = installed

    for name in modules():
        stem = name[: -len(".py")]
        compiled = list((destdir / PACKAGE / "__pycache__").glob(f"{stem}.*.pyc"))
        assert compiled, f"no bytecode for {name}"
        data = compiled[0].read_bytes()
        # Tracebacks and coverage must name the installed file, not the staging tree.
        assert f"/{PACKAGE}/{name}".encode() in data
        assert str(destdir).encode() not in data


# The hook needs the standard library only, so it also skips site (-S): faster, and no .pth file
# of some installed package runs inside qemu-ga's hook.
@pytest.mark.parametrize(
    ("wrapper", "module", "flags"),
    [(CLI, "cli", "-IB"), (SHIM, "shim", "-IBS"), (QUIESCE, "quiesce", "-IBS")],
)
def test_wrappers_run_the_system_python_isolated_from_libdir(
    installed: tuple[Path, str], wrapper: str, module: str, flags: str
) -> None:
    destdir, _ = installed

    path = destdir / wrapper
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert text.splitlines()[0] == f"#!/usr/bin/python3 {flags}"
    assert f'sys.path.insert(0, "/{LIB}")' in text
    assert f"from qgafreeze.{module} import main" in text
    assert "raise SystemExit(main())" in text
    compile(text, str(path), "exec")


@pytest.mark.parametrize("wrapper", [CLI, SHIM, QUIESCE])
def test_installed_wrappers_start_without_a_traceback(
    installed: tuple[Path, str], wrapper: str, tmp_path: Path
) -> None:
    destdir, _ = installed
    # The wrapper as installed, pointed at the DESTDIR copy of the library.
    relocated = tmp_path / "wrapper"
    relocated.write_text((destdir / wrapper).read_text().replace(f'"/{LIB}"', f'"{destdir / LIB}"'))
    before = files_under(destdir)

    result = subprocess.run(
        ["/usr/bin/python3", "-IB", str(relocated), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )

    assert "Traceback" not in result.stdout + result.stderr
    assert "broken installation" not in result.stderr
    # -B: nothing is written next to the installed modules when they are imported.
    assert files_under(destdir) == before


def test_units_name_the_installed_bindir(
    installed: tuple[Path, str], units: tuple[str, str]
) -> None:
    destdir, _ = installed

    for unit in units:
        source = (REPO / "systemd" / Path(unit).name).read_text()
        text = (destdir / unit).read_text()
        assert "@BINDIR@" not in text
        assert text == source.replace("@BINDIR@", "/usr/bin")
        assert stat.S_IMODE((destdir / unit).stat().st_mode) == 0o644


def test_config_is_installed_readable_by_root_only(installed: tuple[Path, str]) -> None:
    destdir, _ = installed

    config = destdir / CONFIG
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_fresh_config_declares_no_apps_so_backups_keep_working(installed: tuple[Path, str]) -> None:
    # The example's apps name units most machines do not have: installing them as they are
    # would fail every freeze until the administrator edits the file.
    destdir, _ = installed
    text = (destdir / CONFIG).read_text()
    config = parse_text(text)
    assert config.apps == ()
    assert "#   mariadb:" in text  # the examples stay, commented out
    example = destdir / DOCS / "qgafreeze.yaml.example"
    assert example.read_bytes() == (REPO / "config/qgafreeze.yaml").read_bytes()


def test_docs_are_installed(installed: tuple[Path, str]) -> None:
    destdir, _ = installed

    sources = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("docs/*.schema.json")]
    expected = sorted(p.name for p in sources if p.is_file())
    assert "cycle-report.schema.json" in expected  # the host validates the report against it
    expected = sorted([*expected, "qgafreeze.yaml.example"])
    assert sorted(p.name for p in (destdir / DOCS).glob("*")) == expected


def test_man_pages_are_installed_in_their_sections(installed: tuple[Path, str]) -> None:
    destdir, _ = installed

    pages = sorted((REPO / "docs").glob("*.[1-8]"))
    assert "qgafreeze.8" in [p.name for p in pages]
    for page in pages:
        target = destdir / f"usr/share/man/man{page.suffix[1:]}" / page.name
        assert target.read_bytes() == page.read_bytes()
        assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_install_with_destdir_does_not_configure_the_host(installed: tuple[Path, str]) -> None:
    _, output = installed

    assert "systemctl" not in output
    assert not list(installed[0].glob("etc/qemu*"))


def test_second_install_keeps_an_edited_config(tmp_path: Path) -> None:
    make("install", tmp_path)
    config = tmp_path / CONFIG
    config.write_text("# edited by the administrator\n")

    result = make("install", tmp_path)

    assert config.read_text() == "# edited by the administrator\n"
    assert "kept the existing" in result.stdout


def test_reinstall_drops_modules_that_left_the_source_tree(tmp_path: Path) -> None:
    make("install", tmp_path)
    (tmp_path / PACKAGE / "gone.py").write_text("")

    make("install", tmp_path)

    assert not (tmp_path / PACKAGE / "gone.py").exists()
    assert sorted(p.name for p in (tmp_path / PACKAGE).glob("*.py")) == modules()
    assert not (tmp_path / f"{PACKAGE}.new").exists()
    assert not (tmp_path / f"{PACKAGE}.old").exists()


def test_uninstall_removes_everything_but_the_config(tmp_path: Path) -> None:
    make("install", tmp_path)

    result = make("uninstall", tmp_path)

    assert files_under(tmp_path) == [CONFIG]
    assert f"kept {tmp_path}/{CONFIG}" in result.stdout
    assert not (tmp_path / LIB).exists()
    assert not (tmp_path / DOCS).exists()


def test_units_go_where_the_distribution_keeps_its_units_not_in_etc() -> None:
    expected = subprocess.run(
        ["pkg-config", "--variable=systemdsystemunitdir", "systemd"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    assert unit_dir() == (expected or "/usr/lib/systemd/system")
    assert not unit_dir().startswith("/etc/")


def test_install_removes_units_an_older_install_left_in_etc_but_not_an_admins_override(
    tmp_path: Path, units: tuple[str, str]
) -> None:
    old_service, old_socket = (tmp_path / unit for unit in OLD_UNITS)
    old_service.parent.mkdir(parents=True)
    old_service.write_text("# qgafreeze.service: what an older make install wrote\n")
    old_socket.write_text("# the administrator's own full override\n[Socket]\n")
    link = enable_old_socket(tmp_path)

    result = make("install", tmp_path)

    assert not old_service.exists()
    assert f"removed {old_service} (left by an older install)" in result.stdout
    assert old_socket.read_text().startswith("# the administrator's own")
    assert os.readlink(link) == f"/{OLD_UNITS[1]}"  # still enables the override
    assert all((tmp_path / unit).is_file() for unit in units)


def test_uninstall_also_removes_units_an_older_install_left_in_etc(tmp_path: Path) -> None:
    make("install", tmp_path)
    for unit in OLD_UNITS:
        (tmp_path / unit).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / unit).write_text(f"# {Path(unit).name}: from an older install\n")
    enable_old_socket(tmp_path)

    make("uninstall", tmp_path)

    assert files_under(tmp_path) == [CONFIG]


def enable_old_socket(destdir: Path) -> Path:
    """The link `systemctl enable` made to an older install's socket unit in /etc."""
    link = destdir / OLD_WANTS
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(f"/{OLD_UNITS[1]}")
    return link


def test_install_removes_the_links_that_enabled_the_units_it_removes_from_etc(
    tmp_path: Path,
) -> None:
    # Left pointing at nothing, they make older systemctl refuse to enable the new units.
    old_socket = tmp_path / OLD_UNITS[1]
    old_socket.parent.mkdir(parents=True)
    old_socket.write_text("# qgafreeze.socket: what an older make install wrote\n")
    link = enable_old_socket(tmp_path)
    # An earlier install removed the unit but left its link: dangling now.
    service_link = tmp_path / "etc/systemd/system/multi-user.target.wants/qgafreeze.service"
    service_link.parent.mkdir(parents=True)
    service_link.symlink_to(f"/{OLD_UNITS[0]}")

    make("install", tmp_path)

    assert not old_socket.exists()
    assert not os.path.lexists(link)
    assert not os.path.lexists(service_link)


def test_prefix_reaches_wrappers_and_units(tmp_path: Path, units: tuple[str, str]) -> None:
    make("install", tmp_path, prefix="/usr/local")

    wrapper = (tmp_path / "usr/local/bin/qgafreeze").read_text()
    assert 'sys.path.insert(0, "/usr/local/lib/qgafreeze")' in wrapper
    assert (tmp_path / "usr/local/libexec/qgafreeze/fsfreeze-hook").is_file()
    for unit in units:
        assert "@BINDIR@" not in (tmp_path / unit).read_text()
    source = (REPO / "systemd/qgafreeze.service").read_text()
    if "@BINDIR@" in source:
        assert "/usr/local/bin/" in (tmp_path / units[0]).read_text()
