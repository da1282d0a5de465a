"""`make deb` on the host: the guest's package holds what `make install` installs and the
hypervisor's (qgafreeze-host) what `make install-host` installs, each says what it needs, the
build leaves nothing in the tree but dist/, and lintian finds no error and no unexplained warning.

No container is needed; the tools are debhelper's and lintian (`make deps` installs them).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qgafreeze import __version__

REPO = Path(__file__).resolve().parents[2]
DEB = REPO / "dist" / f"qgafreeze_{__version__}_all.deb"
HOST_DEB = REPO / "dist" / f"qgafreeze-host_{__version__}_all.deb"
TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "lintian", "dpkg-deb")
# Package-only files that make install has no reason to write.
PACKAGE_ONLY = {
    "usr/share/doc/qgafreeze/copyright",
    "usr/share/doc/qgafreeze/changelog.gz",
    "usr/share/lintian/overrides/qgafreeze",
    "usr/share/python3/runtime.d/qgafreeze.rtupdate",
}
HOST_PACKAGE_ONLY = {
    "usr/share/doc/qgafreeze-host/copyright",
    "usr/share/doc/qgafreeze-host/changelog.gz",
    "usr/share/lintian/overrides/qgafreeze-host",
    "usr/share/python3/runtime.d/qgafreeze-host.rtupdate",
}


def _require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    reason = f"cannot build the Debian package here: {', '.join(missing)} missing (make deps)"
    if os.environ.get("CI") == "true" or os.environ.get("QGAFREEZE_REQUIRE_INTEGRATION") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _make(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    # The distribution's tools, not a pyenv python3 that PATH may put first.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    result = subprocess.run(
        ["make", "-C", str(cwd), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"make {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _tree_files() -> set[str]:
    """Every untracked or ignored path of the checkout, bytecode caches aside."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--ignored", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line[3:] for line in out.splitlines() if "__pycache__" not in line}


@pytest.fixture(scope="module")
def build() -> Iterator[set[str]]:
    """Runs make deb once; yields the paths it added to the checkout."""
    _require_tools()
    before = _tree_files()
    _make("deb")
    yield _tree_files() - before


def _tar(deb: Path, part: str) -> tarfile.TarFile:
    data = subprocess.run(["dpkg-deb", part, str(deb)], capture_output=True, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(data))


def _members(deb: Path) -> dict[str, tarfile.TarInfo]:
    with _tar(deb, "--fsys-tarfile") as tar:
        return {m.name.lstrip("./"): m for m in tar.getmembers() if m.name != "./"}


def _installed(target: str, destdir: Path) -> set[str]:
    """The files `make TARGET DESTDIR=destdir PREFIX=/usr` writes, bytecode caches aside."""
    _make("-s", target, f"DESTDIR={destdir}", "PREFIX=/usr")
    return {
        str(path.relative_to(destdir))
        for path in destdir.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def _control_files(deb: Path) -> dict[str, str]:
    with _tar(deb, "--ctrl-tarfile") as tar:
        return {
            m.name.lstrip("./"): tar.extractfile(m).read().decode()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def _field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_make_deb_writes_both_packages_to_dist_and_nothing_else_into_the_tree(build):
    assert DEB.is_file() and HOST_DEB.is_file()
    new = {path for path in build if path not in (f"dist/{DEB.name}", f"dist/{HOST_DEB.name}")}
    # A dist/ that did not exist yet shows as a whole directory.
    assert new <= {"dist/"}, new


def test_the_package_holds_every_file_make_install_installs(build, tmp_path):
    unitdir = _make("-s", "unitdir").stdout.strip().lstrip("/")
    installed = _installed("install", tmp_path)
    members = _members(DEB)
    files = {name for name, m in members.items() if m.isfile()}
    # dh_installman compresses man pages; nothing else changes name.
    expected = {re.sub(r"^(usr/share/man/man\d/.*)$", r"\1.gz", p) for p in installed}
    assert files - PACKAGE_ONLY == expected
    assert files >= PACKAGE_ONLY
    for name in (
        "usr/bin/qgafreeze",
        "usr/libexec/qgafreeze/fsfreeze-hook",
        f"{unitdir}/qgafreeze.service",
        f"{unitdir}/qgafreeze.socket",
        "usr/share/man/man8/qgafreeze.8.gz",
        "usr/share/man/man5/qgafreeze.yaml.5.gz",
        "usr/share/doc/qgafreeze/README.md",
        "usr/share/doc/qgafreeze/qgafreeze.yaml.example",
    ):
        assert name in files, name
    assert members["usr/bin/qgafreeze"].mode == 0o755
    assert members["usr/libexec/qgafreeze/fsfreeze-hook"].mode == 0o755
    config = members["etc/qgafreeze.yaml"]
    assert (config.mode, config.uname, config.gname) == (0o600, "root", "root")
    # Bytecode is compiled at install time, for the python3 installed then.
    assert not [name for name in members if name.endswith(".pyc") or "__pycache__" in name]


def test_the_control_fields_name_the_version_the_real_dependencies_and_the_conffile(build):
    assert _field(DEB, "Package") == "qgafreeze"
    assert _field(DEB, "Version") == __version__
    assert _field(DEB, "Architecture") == "all"
    depends = {dep.split()[0] for dep in _field(DEB, "Depends").split(", ")}
    assert {"python3-yaml", "python3-pydbus", "python3-systemd", "qemu-guest-agent"} <= depends
    assert depends & {"python3", "python3:any"}
    scripts = _control_files(DEB)
    assert scripts["conffiles"].split() == ["/etc/qgafreeze.yaml"]
    postinst, prerm = scripts["postinst"], scripts["prerm"]
    assert "py3compile -p qgafreeze /usr/lib/qgafreeze" in postinst
    assert "py3clean -p qgafreeze" in prerm
    # The socket is started at install; nothing starts the service, or restarts either unit,
    # behind the idle check.
    assert "deb-systemd-invoke start 'qgafreeze.socket'" in postinst
    assert not re.search(r"deb-systemd-invoke (start|restart) .*qgafreeze\.service", postinst)
    assert "deb-systemd-invoke restart" not in postinst
    assert "deb-systemd-invoke try-restart qgafreeze.service" in postinst


def test_the_host_package_holds_exactly_what_make_install_host_installs(build, tmp_path):
    installed = _installed("install-host", tmp_path)
    members = _members(HOST_DEB)
    files = {name for name, m in members.items() if m.isfile()}
    # The report's schema and host.md stay uncompressed, as install-host leaves them.
    assert files - HOST_PACKAGE_ONLY == installed
    assert files >= HOST_PACKAGE_ONLY
    for name in (
        "usr/bin/qgafreeze-host",
        "usr/lib/qgafreeze-host/qgafreeze_host/cli.py",
        "usr/share/doc/qgafreeze-host/host.md",
        "usr/share/doc/qgafreeze-host/cycle-report.schema.json",
    ):
        assert name in files, name
    assert members["usr/bin/qgafreeze-host"].mode == 0o755
    assert not [name for name in members if name.endswith(".pyc") or "__pycache__" in name]


def test_neither_package_holds_a_file_of_the_other(build):
    guest = {name for name, m in _members(DEB).items() if not m.isdir()}
    host = {name for name, m in _members(HOST_DEB).items() if not m.isdir()}
    assert guest & host == set()
    assert not [name for name in guest if "qgafreeze-host" in name or "qgafreeze_host" in name]
    assert not [name for name in host if re.search(r"qgafreeze(?![-_]host)", name)], host


def test_the_host_package_needs_python3_alone_and_has_no_conffile_and_no_scripts_of_its_own(
    build,
):
    assert _field(HOST_DEB, "Package") == "qgafreeze-host"
    assert _field(HOST_DEB, "Source") == "qgafreeze"
    assert _field(HOST_DEB, "Version") == __version__
    assert _field(HOST_DEB, "Architecture") == "all"
    depends = [dep.strip() for dep in _field(HOST_DEB, "Depends").split(",")]
    assert "python3 (>= 3.9)" in depends
    assert {dep.split()[0] for dep in depends} <= {"python3", "python3:any"}, depends
    control = _control_files(HOST_DEB)
    assert "conffiles" not in control
    # Only debhelper's: byte-compile the private directory at install, clean it at removal.
    assert set(control) <= {"control", "md5sums", "postinst", "prerm"}
    for script, command in (("postinst", "py3compile"), ("prerm", "py3clean")):
        body = [
            line
            for line in control[script].splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        assert f"{command} -p qgafreeze-host" in control[script]
        assert not [line for line in body if "systemctl" in line or "qgafreeze " in line], body


@pytest.mark.parametrize("deb", [DEB, HOST_DEB], ids=["qgafreeze", "qgafreeze-host"])
def test_lintian_reports_no_error_and_every_remaining_warning_is_overridden(build, deb):
    result = subprocess.run(
        ["lintian", "--fail-on", "none", str(deb)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    flagged = [line for line in result.stdout.splitlines() if line.startswith(("E:", "W:"))]
    assert flagged == []


@pytest.mark.parametrize("package", ["qgafreeze", "qgafreeze-host"])
def test_every_lintian_override_says_why(package):
    text = (REPO / "debian" / f"{package}.lintian-overrides").read_text()
    paragraphs = [p.splitlines() for p in text.strip().split("\n\n")]
    for lines in paragraphs:
        assert lines[0].startswith("# "), lines
        assert not lines[-1].startswith("#"), lines


def test_deb_version_builds_the_same_tree_as_an_older_version():
    _require_tools()
    older = REPO / "dist" / "qgafreeze_0.0.1~test_all.deb"
    older_host = REPO / "dist" / "qgafreeze-host_0.0.1~test_all.deb"
    try:
        _make("deb", "DEB_VERSION=0.0.1~test")
        assert _field(older, "Version") == "0.0.1~test"
        assert _field(older_host, "Version") == "0.0.1~test"
        init = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(older)], capture_output=True, check=True
        ).stdout
        assert b'__version__ = "0.0.1~test"' in init
    finally:
        older.unlink(missing_ok=True)
        older_host.unlink(missing_ok=True)
