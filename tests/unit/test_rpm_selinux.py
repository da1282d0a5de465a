"""The RHEL family's package: the RPM that `make rpm` builds, the SELinux module it carries, and
its -host subpackage for the hypervisor.

Built here with Debian's rpmbuild and checkpolicy; no test installs them on a RHEL machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qgafreeze import __version__, paths

REPO = Path(__file__).resolve().parents[2]
SELINUX = REPO / "selinux"
SPEC = REPO / "qgafreeze.spec"
# What the spec passes to `make install` (its %install), with the RHEL values of the macros.
RHEL_LAYOUT = {
    "PREFIX": "/usr",
    "SYSCONFDIR": "/etc",
    "UNITDIR": "/usr/lib/systemd/system",
    "BINDIR": "/usr/bin",
    "LIBEXECDIR": "/usr/libexec/qgafreeze",
    "MANDIR": "/usr/share/man",
    "DOCDIR": "/usr/share/doc/qgafreeze",
}
LICENCE_DIR = "/usr/share/licenses/qgafreeze"
# What the spec passes to `make install-host` for the -host subpackage.
RHEL_HOST_LAYOUT = {"PREFIX": "/usr", "BINDIR": "/usr/bin"}

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def clean_env() -> dict[str, str]:
    # Variables inherited from an outer `make test` would change what is built.
    return {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "DESTDIR"}


def run(argv: list[str], cwd: Path = REPO) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def installed_tree(
    destdir: Path, target: str = "install", layout: dict[str, str] = RHEL_LAYOUT
) -> dict[str, Path]:
    """Every path `make target` makes for the spec, as the target system sees it."""
    values = [f"{key}={value}" for key, value in layout.items()]
    run(["make", "--no-print-directory", target, f"DESTDIR={destdir}", *values])
    tree: dict[str, Path] = {}
    for root, dirs, files in os.walk(destdir):
        for name in dirs + files:
            real = Path(root, name)
            tree["/" + str(real.relative_to(destdir))] = real
    return tree


def file_contexts() -> list[tuple[re.Pattern[str], str, str]]:
    """(anchored path regex, file kind flag or '', type) for each line of qgafreeze.fc."""
    entries = []
    for line in (SELINUX / "qgafreeze.fc").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = line.split()
        regex, kind, context = (words[0], "", words[1]) if len(words) == 2 else words
        entries.append((re.compile(regex), kind, context.split(":")[2]))
    return entries


def label_of(path: str, kind: str) -> list[str]:
    """The types qgafreeze.fc gives ``path`` of ``kind``: '--' file, '-d' directory, '-s' socket."""
    return [
        type_
        for regex, flag, type_ in file_contexts()
        if regex.fullmatch(path) and flag in ("", kind)
    ]


@pytest.mark.skipif(shutil.which("checkmodule") is None, reason="checkpolicy is not installed")
def test_the_selinux_module_compiles_without_policy_headers(tmp_path):
    module, package = tmp_path / "qgafreeze.mod", tmp_path / "qgafreeze.pp"
    run(["checkmodule", "-M", "-m", "-o", str(module), str(SELINUX / "qgafreeze.te")])
    fc = str(SELINUX / "qgafreeze.fc")
    run(["semodule_package", "-o", str(package), "-m", str(module), "-f", fc])
    assert package.stat().st_size > 0


def test_the_selinux_module_grants_qemu_ga_only_the_hook_the_package_and_the_socket():
    text = (SELINUX / "qgafreeze.te").read_text()
    rules = re.findall(r"^allow\s+virt_qemu_ga_t\s+(\S+):(\S+)\s", text, flags=re.M)
    assert sorted(rules) == [
        ("qgafreeze_hook_exec_t", "file"),
        ("qgafreeze_lib_t", "dir"),
        ("qgafreeze_lib_t", "file"),
        ("qgafreeze_var_run_t", "dir"),
        ("qgafreeze_var_run_t", "file"),
        ("qgafreeze_var_run_t", "sock_file"),
        ("self", "unix_stream_socket"),
        ("unconfined_service_t", "unix_stream_socket"),
    ]
    connect = re.search(
        r"^allow virt_qemu_ga_t unconfined_service_t:unix_stream_socket (.*);$", text, flags=re.M
    )
    assert connect is not None and connect.group(1) == "connectto"
    # No transition out of qemu-ga's domain, and no write but to the socket.
    assert "type_transition virt_qemu_ga_t" not in text
    for target, perms in re.findall(r"^allow virt_qemu_ga_t (\S+:\S+) \{ (.*) \};$", text, re.M):
        if target not in ("qgafreeze_var_run_t:sock_file", "self:unix_stream_socket"):
            assert not {"write", "append", "create", "setattr"} & set(perms.split()), target
    sock = re.search(
        r"^allow virt_qemu_ga_t qgafreeze_var_run_t:sock_file \{ (.*) \};$", text, flags=re.M
    )
    assert sock is not None and sorted(sock.group(1).split()) == ["getattr", "write"]


@needs_make
def test_file_contexts_label_the_hook_package_socket_and_config_and_nothing_else(tmp_path):
    tree = installed_tree(tmp_path)
    hooks = [
        p
        for p, real in tree.items()
        if real.is_file() and "qgafreeze.shim import" in real.read_text(errors="replace")
    ]
    assert len(hooks) == 1
    packages = [
        p[: -len("/qgafreeze/__init__.py")] for p in tree if p.endswith("/qgafreeze/__init__.py")
    ]
    assert len(packages) == 1
    expected: dict[str, str] = {hooks[0]: "qgafreeze_hook_exec_t", paths.CONFIG: "qgafreeze_etc_t"}
    for path in tree:
        if path == packages[0] or path.startswith(packages[0] + "/"):
            expected[path] = "qgafreeze_lib_t"
    assert paths.CONFIG in tree
    for path, real in tree.items():
        kind = "-d" if real.is_dir() else "--"
        assert label_of(path, kind) == ([expected[path]] if path in expected else []), path

    # What exists only at run time, where the daemon and systemd make it.
    run_dir = os.path.dirname(paths.SOCKET)
    assert label_of(run_dir, "-d") == ["qgafreeze_var_run_t"]
    assert label_of(paths.SOCKET, "-s") == ["qgafreeze_var_run_t"]
    assert label_of(paths.STATE_FILE, "--") == ["qgafreeze_var_run_t"]
    te = (SELINUX / "qgafreeze.te").read_text()
    assert f'qgafreeze_var_run_t "{os.path.basename(run_dir)}";' in te


@needs_make
def test_the_rpm_takes_its_version_from_the_package_alone():
    spec = SPEC.read_text()
    assert re.search(r"^Version:\s+%\{qgafreeze_version\}$", spec, flags=re.M)
    assert not re.search(r"\b\d+\.\d+\.\d+\b", spec), "a version number is written in the spec"
    printed = run(["make", "-s", "--no-print-directory", "--eval", "v:\n\t@echo $(VERSION)", "v"])
    assert printed.strip() == __version__


@pytest.fixture(scope="module")
def rpm_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make rpm`, once for the module's tests: the directory that holds the three RPMs."""
    if shutil.which("make") is None or shutil.which("rpmbuild") is None:
        pytest.skip("GNU make or rpm (rpmbuild) is not installed")
    work = tmp_path_factory.mktemp("rpm")
    dist = work / "dist"
    run(["make", "--no-print-directory", "rpm", f"RPM_TOPDIR={work / 'rpm'}", f"RPM_DIST={dist}"])
    return dist


def test_the_rpm_holds_what_make_install_installs_with_the_config_kept_and_the_hook_wired(
    tmp_path, rpm_dist
):
    dist = rpm_dist
    main = dist / f"qgafreeze-{__version__}-1.noarch.rpm"
    selinux = dist / f"qgafreeze-selinux-{__version__}-1.noarch.rpm"

    listed = run(
        [
            "rpm",
            "-qp",
            "--qf",
            "[%{FILENAMES}\t%{FILEFLAGS:fflags}\t%{FILEMODES:perms}\n]",
            str(main),
        ]
    )
    files = {line.split("\t")[0]: line.split("\t")[1:] for line in listed.splitlines()}
    # The RPM owns what make install makes but the system's directories (/usr/bin), compresses
    # man pages as RHEL's rpmbuild does, and carries the licence.
    ours = {p for p in installed_tree(tmp_path / "root") if "qgafreeze" in p}
    licence = {LICENCE_DIR, LICENCE_DIR + "/LICENSE"}
    assert {re.sub(r"\.gz$", "", p) for p in files} == ours | licence
    assert files[paths.CONFIG] == ["cn", "-rw-------"]
    assert files[LICENCE_DIR + "/LICENSE"][0] == "l"

    scripts = run(["rpm", "-qp", "--scripts", str(main)])
    hook = RHEL_LAYOUT["LIBEXECDIR"] + "/fsfreeze-hook"
    assert f"/usr/bin/qgafreeze install --hook {hook}" in scripts
    assert f"/usr/bin/qgafreeze install --remove --hook {hook}" in scripts
    assert "%" not in scripts, "a macro was left unexpanded in the scriptlets"
    # An upgrade restarts the daemon only once no cycle is under way.
    wait = scripts.index("freezing | frozen | thawing) ;;")
    assert scripts.index("systemctl try-restart qgafreeze.service") > wait
    assert scripts.count("try-restart qgafreeze.service") == 1
    assert run(["rpm", "-qp", "--qf", "%{LICENSE}", str(main)]) == "GPL-2.0-or-later"
    requires = run(["rpm", "-qp", "--requires", str(main)]).split()
    for name in ("python3-pyyaml", "python3-pydbus", "python3-systemd", "qemu-guest-agent"):
        assert name in requires

    assert run(["rpm", "-qlp", str(selinux)]).split() == [
        "/usr/share/selinux/packages/targeted/qgafreeze.pp"
    ]
    selinux_scripts = " ".join(run(["rpm", "-qp", "--scripts", str(selinux)]).split(" \\\n"))
    selinux_scripts = " ".join(selinux_scripts.split())
    assert "semodule -X 200 -s targeted -i" in selinux_scripts
    assert "semodule -X 200 -s targeted -r qgafreeze" in selinux_scripts


def test_the_licence_is_gpl_2_or_later_in_every_place_that_names_it():
    licence = (REPO / "LICENSE").read_text()
    assert licence.split()[:6] == ["GNU", "GENERAL", "PUBLIC", "LICENSE", "Version", "2,"]
    assert "or (at your option) any later version" in " ".join(licence.split())
    expected = "GPL-2.0-or-later"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.findall(r"^license\s*=\s*(.*)$", pyproject, flags=re.M) == [
        f'{{ text = "{expected}" }}'
    ]
    assert re.findall(r"^License:\s*(.*)$", SPEC.read_text(), flags=re.M) == [expected]
    copyright_ = (REPO / "debian" / "copyright").read_text()
    stanzas = {s.split("\n", 1)[0]: s for s in copyright_.split("\n\n")}
    assert re.search(r"^License: (.*)$", stanzas["Files: *"], flags=re.M).group(1) == expected


def test_the_host_subpackage_holds_what_make_install_host_installs_and_needs_python3_alone(
    tmp_path, rpm_dist
):
    host = rpm_dist / f"qgafreeze-host-{__version__}-1.noarch.rpm"
    files = set(run(["rpm", "-qlp", str(host)]).split())
    tree = installed_tree(tmp_path, "install-host", RHEL_HOST_LAYOUT)
    # The subpackage owns what install-host makes but the system's directories (/usr/bin).
    ours = {p for p in tree if "qgafreeze-host" in p}
    licence = {"/usr/share/licenses/qgafreeze-host", "/usr/share/licenses/qgafreeze-host/LICENSE"}
    assert files == ours | licence
    assert "/usr/bin/qgafreeze-host" in files
    assert "/usr/share/doc/qgafreeze-host/cycle-report.schema.json" in files
    listed = run(["rpm", "-qp", "--requires", str(host)]).splitlines()
    requires = {line.split()[0] for line in listed if not line.startswith("rpmlib(")}
    # python3, and the wrapper's interpreter that rpm reads from its first line; no guest part.
    assert requires == {"python3", "/usr/bin/python3"}
    assert run(["rpm", "-qp", "--scripts", str(host)]) == ""
    main = rpm_dist / f"qgafreeze-{__version__}-1.noarch.rpm"
    assert not [p for p in run(["rpm", "-qlp", str(main)]).split() if "qgafreeze-host" in p]
