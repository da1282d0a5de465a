"""qemu-ga's hook setting: configure_qemu_ga / unconfigure_qemu_ga against a fake root."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qgafreeze.actioncontext import ActionContext, StepReport
from qgafreeze.errors import InstallError
from qgafreeze.install import configure_qemu_ga, unconfigure_qemu_ga
from qgafreeze.legacy import LegacyHooksAction

HOOK = "/usr/libexec/qgafreeze/fsfreeze-hook"

DEBIAN_CONF = "etc/qemu/qemu-ga.conf"
RHEL_SYSCONFIG = "etc/sysconfig/qemu-ga"

RHEL_STOCK = """\
# This is a systemd environment file, not a shell script.
# It provides settings for "/lib/systemd/system/qemu-guest-agent.service".

# Comma-separated blacklist of RPCs to disable, or empty list to enable all.
BLACKLIST_RPC=guest-file-open,guest-file-close,guest-file-read,guest-file-write

# Fsfreeze hook script specification.
#FSFREEZE_HOOK_PATHNAME=/dev/null
FSFREEZE_HOOK_PATHNAME="/etc/qemu-ga/fsfreeze-hook"
"""

RHEL_UNIT = """\
[Unit]
Description=QEMU Guest Agent

[Service]
EnvironmentFile=/etc/sysconfig/qemu-ga
ExecStart=/usr/bin/qemu-ga \\
  --method=virtio-serial \\
  --path=/dev/virtio-ports/org.qemu.guest_agent.0 \\
  --blacklist=${BLACKLIST_RPC} \\
  -F${FSFREEZE_HOOK_PATHNAME}
Restart=always
"""

DEBIAN_UNIT = """\
[Unit]
Description=QEMU Guest Agent
BindsTo=dev-virtio\\x2dports-org.qemu.guest_agent.0.device

[Service]
ExecStart=-/usr/sbin/qemu-ga
"""


def write(root: Path, rel: str, text: str, mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fake root where the hook is installed, so that only the warnings under test appear."""
    write(tmp_path, HOOK.lstrip("/"), "#!/bin/sh\n", 0o755)
    return tmp_path


def warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("warning:")]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- Debian family ------------------------------------------------------------------------------


def test_debian_conf_is_created_with_a_general_section_when_absent(root: Path) -> None:
    lines = configure_qemu_ga(HOOK, str(root))

    conf = root / DEBIAN_CONF
    assert "[general]\nfsfreeze-hook=" + HOOK + "\n" in conf.read_text()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert any(line.startswith(f"created {conf}") for line in lines)
    assert warnings(lines) == []


def test_debian_conf_created_by_us_gets_no_backup(root: Path) -> None:
    configure_qemu_ga(HOOK, str(root))

    assert not (root / (DEBIAN_CONF + ".qgafreeze-orig")).exists()


def test_debian_conf_keeps_other_keys_and_comments(root: Path) -> None:
    original = (
        "# site settings\n"
        "[general]\n"
        "# keep this comment\n"
        "verbose=true\n"
        "fsfreeze-hook=/etc/qemu/fsfreeze-hook\n"
        "blacklist=guest-exec;guest-exec-status\n"
        "\n"
        "# about the next group\n"
        "[other]\n"
        "fsfreeze-hook=/not/ours\n"
    )
    write(root, DEBIAN_CONF, original)

    configure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).read_text() == original.replace(
        "fsfreeze-hook=/etc/qemu/fsfreeze-hook", f"fsfreeze-hook={HOOK}"
    )


def test_debian_hook_key_with_spaces_around_equals_is_replaced(root: Path) -> None:
    write(root, DEBIAN_CONF, "[general]\n  fsfreeze-hook = /etc/qemu/fsfreeze-hook  \n")

    lines = configure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).read_text() == f"[general]\nfsfreeze-hook={HOOK}\n"
    assert any("was /etc/qemu/fsfreeze-hook" in line for line in lines)


def test_debian_duplicate_hook_keys_collapse_into_ours(root: Path) -> None:
    # GLib keeps the last of repeated keys: a leftover duplicate would beat our setting.
    write(root, DEBIAN_CONF, "[general]\nfsfreeze-hook=/a\nverbose=1\nfsfreeze-hook=/b\n")

    configure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).read_text() == f"[general]\nfsfreeze-hook={HOOK}\nverbose=1\n"


def test_debian_key_goes_after_the_last_setting_of_general(root: Path) -> None:
    write(root, DEBIAN_CONF, "[general]\nverbose=1\n\n# next group\n[x]\nk=v\n")

    configure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).read_text() == (
        f"[general]\nverbose=1\nfsfreeze-hook={HOOK}\n\n# next group\n[x]\nk=v\n"
    )


def test_debian_general_section_is_appended_when_missing(root: Path) -> None:
    write(root, DEBIAN_CONF, "# nothing yet\n[other]\nk=v")

    configure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).read_text() == (
        f"# nothing yet\n[other]\nk=v\n\n[general]\nfsfreeze-hook={HOOK}\n"
    )


def test_debian_crlf_line_endings_are_kept(root: Path) -> None:
    (root / "etc/qemu").mkdir(parents=True)
    (root / DEBIAN_CONF).write_bytes(b"[general]\r\nfsfreeze-hook=/old\r\nverbose=1\r\n")

    configure_qemu_ga(HOOK, str(root))

    expected = f"[general]\r\nfsfreeze-hook={HOOK}\r\nverbose=1\r\n".encode()
    assert (root / DEBIAN_CONF).read_bytes() == expected


def test_debian_backup_is_taken_once_from_the_preexisting_file(root: Path) -> None:
    original = "[general]\nfsfreeze-hook=/etc/qemu/fsfreeze-hook\n"
    write(root, DEBIAN_CONF, original, 0o640)
    backup = root / (DEBIAN_CONF + ".qgafreeze-orig")

    configure_qemu_ga(HOOK, str(root))
    configure_qemu_ga("/opt/other/hook", str(root))

    assert backup.read_text() == original
    assert stat.S_IMODE(backup.stat().st_mode) == 0o640


def test_second_configure_changes_nothing(root: Path) -> None:
    write(root, DEBIAN_CONF, "[general]\nverbose=1\n")
    configure_qemu_ga(HOOK, str(root))
    before = (root / DEBIAN_CONF).stat()

    lines = configure_qemu_ga(HOOK, str(root))

    after = (root / DEBIAN_CONF).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert lines == [f"qemu-ga already runs {HOOK} ({root / DEBIAN_CONF}): nothing changed"]


def test_configure_keeps_file_mode_and_leaves_no_temporary_files(root: Path) -> None:
    write(root, DEBIAN_CONF, "[general]\n", 0o600)
    inode = (root / DEBIAN_CONF).stat().st_ino

    configure_qemu_ga(HOOK, str(root))

    st = (root / DEBIAN_CONF).stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    # A new inode means the file was replaced by rename, never rewritten in place.
    assert st.st_ino != inode
    assert leftovers(root / "etc/qemu") == []


def test_symlinked_conf_is_edited_through_the_link(root: Path) -> None:
    real = write(root, "srv/qemu-ga.conf", "[general]\n")
    (root / "etc/qemu").mkdir(parents=True)
    (root / DEBIAN_CONF).symlink_to(real)

    configure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).is_symlink()
    assert f"fsfreeze-hook={HOOK}" in real.read_text()


# --- RHEL family --------------------------------------------------------------------------------


def test_rhel_family_is_chosen_when_sysconfig_exists(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, RHEL_STOCK)

    configure_qemu_ga(HOOK, str(root))

    assert not (root / DEBIAN_CONF).exists()


def test_rhel_sysconfig_hook_path_is_replaced(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, RHEL_STOCK, 0o600)

    lines = configure_qemu_ga(HOOK, str(root))

    assert (root / RHEL_SYSCONFIG).read_text() == RHEL_STOCK.replace(
        'FSFREEZE_HOOK_PATHNAME="/etc/qemu-ga/fsfreeze-hook"', f"FSFREEZE_HOOK_PATHNAME={HOOK}"
    )
    assert stat.S_IMODE((root / RHEL_SYSCONFIG).stat().st_mode) == 0o600
    assert any("was /etc/qemu-ga/fsfreeze-hook" in line for line in lines)


def test_rhel_hook_path_is_appended_when_unset(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, "BLACKLIST_RPC=guest-exec")

    configure_qemu_ga(HOOK, str(root))

    assert (root / RHEL_SYSCONFIG).read_text() == (
        f"BLACKLIST_RPC=guest-exec\nFSFREEZE_HOOK_PATHNAME={HOOK}\n"
    )


def test_rhel_backup_is_taken_once(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, RHEL_STOCK)

    configure_qemu_ga(HOOK, str(root))
    configure_qemu_ga("/opt/other/hook", str(root))

    assert (root / "etc/sysconfig/qemu-ga.qgafreeze-orig").read_text() == RHEL_STOCK


def test_rhel_second_configure_changes_nothing(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, RHEL_STOCK)
    configure_qemu_ga(HOOK, str(root))
    before = (root / RHEL_SYSCONFIG).stat().st_mtime_ns

    lines = configure_qemu_ga(HOOK, str(root))

    assert (root / RHEL_SYSCONFIG).stat().st_mtime_ns == before
    assert "nothing changed" in lines[0]


# --- unconfigure --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "original"),
    [
        (DEBIAN_CONF, "# mine\n[general]\nfsfreeze-hook = /etc/qemu/fsfreeze-hook\nverbose=1\n"),
        (DEBIAN_CONF, "[general]\nverbose=1\n"),
        (RHEL_SYSCONFIG, RHEL_STOCK),
    ],
)
def test_unconfigure_restores_the_original_byte_for_byte(
    root: Path, rel: str, original: str
) -> None:
    write(root, rel, original, 0o640)
    configure_qemu_ga(HOOK, str(root))

    lines = unconfigure_qemu_ga(HOOK, str(root))

    assert (root / rel).read_text() == original
    assert stat.S_IMODE((root / rel).stat().st_mode) == 0o640
    assert not (root / (rel + ".qgafreeze-orig")).exists()
    assert lines[0].startswith(f"restored {root / rel}")


def test_unconfigure_restores_only_the_hook_when_the_file_was_edited_since(root: Path) -> None:
    write(root, DEBIAN_CONF, "[general]\nfsfreeze-hook=/etc/qemu/fsfreeze-hook\n")
    configure_qemu_ga(HOOK, str(root))
    conf = root / DEBIAN_CONF
    conf.write_text(conf.read_text() + "verbose=1\n")

    unconfigure_qemu_ga(HOOK, str(root))

    assert conf.read_text() == "[general]\nfsfreeze-hook=/etc/qemu/fsfreeze-hook\nverbose=1\n"


def test_unconfigure_removes_a_key_that_was_unset_before_install(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, "BLACKLIST_RPC=\n")
    configure_qemu_ga(HOOK, str(root))
    sysconfig = root / RHEL_SYSCONFIG
    sysconfig.write_text("# edited\n" + sysconfig.read_text())

    unconfigure_qemu_ga(HOOK, str(root))

    assert sysconfig.read_text() == "# edited\nBLACKLIST_RPC=\n"


def test_unconfigure_deletes_the_conf_it_created(root: Path) -> None:
    configure_qemu_ga(HOOK, str(root))

    lines = unconfigure_qemu_ga(HOOK, str(root))

    assert not (root / DEBIAN_CONF).exists()
    assert "had created" in lines[0]


def test_unconfigure_keeps_a_created_conf_the_administrator_extended(root: Path) -> None:
    configure_qemu_ga(HOOK, str(root))
    conf = root / DEBIAN_CONF
    conf.write_text(conf.read_text() + "verbose=1\n")

    unconfigure_qemu_ga(HOOK, str(root))

    assert "verbose=1" in conf.read_text()
    assert "fsfreeze-hook" not in conf.read_text().replace("qgafreeze install", "")


def test_unconfigure_leaves_foreign_hook_alone(root: Path) -> None:
    original = "[general]\nfsfreeze-hook=/usr/local/sbin/my-hook\n"
    write(root, DEBIAN_CONF, original)

    lines = unconfigure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).read_text() == original
    assert "left alone" in lines[0]


def test_unconfigure_leaves_a_hook_changed_after_install_alone(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, RHEL_STOCK)
    configure_qemu_ga(HOOK, str(root))
    changed = (root / RHEL_SYSCONFIG).read_text().replace(HOOK, "/usr/local/sbin/my-hook")
    (root / RHEL_SYSCONFIG).write_text(changed)

    lines = unconfigure_qemu_ga(HOOK, str(root))

    assert (root / RHEL_SYSCONFIG).read_text() == changed
    assert (root / "etc/sysconfig/qemu-ga.qgafreeze-orig").exists()
    assert any("kept" in line for line in lines)


def test_second_unconfigure_changes_nothing(root: Path) -> None:
    write(root, DEBIAN_CONF, "[general]\nverbose=1\n")
    configure_qemu_ga(HOOK, str(root))
    unconfigure_qemu_ga(HOOK, str(root))
    before = (root / DEBIAN_CONF).stat().st_mtime_ns

    lines = unconfigure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).stat().st_mtime_ns == before
    assert "left alone" in lines[0]


def test_unconfigure_without_any_conf_has_nothing_to_undo(root: Path) -> None:
    assert "nothing to undo" in unconfigure_qemu_ga(HOOK, str(root))[0]
    assert not (root / "etc/qemu").exists()


def test_reinstall_after_uninstall_takes_a_fresh_backup(root: Path) -> None:
    write(root, DEBIAN_CONF, "[general]\nverbose=1\n")
    configure_qemu_ga(HOOK, str(root))
    unconfigure_qemu_ga(HOOK, str(root))
    (root / DEBIAN_CONF).write_text("[general]\nverbose=2\n")

    configure_qemu_ga(HOOK, str(root))
    unconfigure_qemu_ga(HOOK, str(root))

    assert (root / DEBIAN_CONF).read_text() == "[general]\nverbose=2\n"


# --- warnings -----------------------------------------------------------------------------------


def test_executable_legacy_hooks_are_reported_in_both_directories(root: Path) -> None:
    write(root, "etc/qemu/fsfreeze-hook.d/10-mysql", "#!/bin/sh\n", 0o755)
    write(root, "etc/qemu/fsfreeze-hook.d/README", "docs\n", 0o644)
    write(root, "etc/qemu/fsfreeze-hook.d/20-old.dpkg-old", "#!/bin/sh\n", 0o755)
    write(root, "etc/qemu-ga/fsfreeze-hook.d/example-hook.sh", "#!/bin/sh\n", 0o700)

    found = warnings(configure_qemu_ga(HOOK, str(root)))

    assert len(found) == 2
    assert "1 executable hook(s) (10-mysql)" in found[0]
    assert "settings.legacy_hooks: /etc/qemu/fsfreeze-hook.d" in found[0]
    assert "(example-hook.sh)" in found[1]


def test_install_counts_exactly_the_legacy_scripts_the_daemon_runs(root: Path) -> None:
    hooks = "etc/qemu/fsfreeze-hook.d"
    for name in ("20-web", "10-db", "30-cache"):
        write(root, f"{hooks}/{name}", "#!/bin/sh\n", 0o755)
    # What the stock hook skips: editor and package-manager leftovers, dotfiles, the rest.
    for name in (
        "10-db~",
        "10-db.bak",
        "10-db.orig",
        "10-db.sample",
        "10-db.dpkg-tmp",
        "10-db.dpkg-bak",
        "10-db.dpkg-backup",
        "10-db.dpkg-remove",
        "10-db.rpmnew",
        ".10-db.swp",
    ):
        write(root, f"{hooks}/{name}", "#!/bin/sh\n", 0o755)
    write(root, f"{hooks}/40-readme", "docs\n", 0o644)
    (root / hooks / "50-dir").mkdir(mode=0o755)
    os.mkfifo(root / hooks / "60-fifo", 0o755)

    warning = warnings(configure_qemu_ga(HOOK, str(root)))[0]
    match = re.search(r"holds (\d+) executable hook\(s\) \(([^)]*)\)", warning)
    assert match, warning
    counted = match.group(2).split(", ")
    ran: list[StepReport] = []
    action = LegacyHooksAction(str(root / hooks), 10.0)
    action.quiesce(ActionContext(deadline=time.monotonic() + 10, record={}, step=ran.append))

    assert [Path(report.what).name for report in ran] == counted
    assert counted == ["10-db", "20-web", "30-cache"] and match.group(1) == "3"


def test_legacy_hooks_are_reported_again_on_a_second_configure(root: Path) -> None:
    write(root, "etc/qemu/fsfreeze-hook.d/10-mysql", "#!/bin/sh\n", 0o755)
    configure_qemu_ga(HOOK, str(root))

    assert len(warnings(configure_qemu_ga(HOOK, str(root)))) == 1


def test_non_executable_legacy_files_raise_no_warning(root: Path) -> None:
    write(root, "etc/qemu/fsfreeze-hook.d/10-mysql", "#!/bin/sh\n", 0o644)

    assert warnings(configure_qemu_ga(HOOK, str(root))) == []


def test_a_missing_hook_executable_is_reported(tmp_path: Path) -> None:
    found = warnings(configure_qemu_ga(HOOK, str(tmp_path)))

    assert len(found) == 1
    assert "missing or not executable" in found[0]


def test_a_hook_option_in_a_debian_unit_drop_in_is_reported(root: Path) -> None:
    write(root, "lib/systemd/system/qemu-guest-agent.service", DEBIAN_UNIT)
    write(
        root,
        "etc/systemd/system/qemu-guest-agent.service.d/override.conf",
        "[Service]\nExecStart=\nExecStart=-/usr/sbin/qemu-ga -F/etc/qemu/fsfreeze-hook\n",
    )

    found = warnings(configure_qemu_ga(HOOK, str(root)))

    assert len(found) == 1
    assert "-F/etc/qemu/fsfreeze-hook, which overrides" in found[0]


def test_the_stock_debian_unit_raises_no_warning(root: Path) -> None:
    write(root, "lib/systemd/system/qemu-guest-agent.service", DEBIAN_UNIT)

    assert warnings(configure_qemu_ga(HOOK, str(root))) == []


def test_the_stock_rhel_unit_raises_no_warning(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, RHEL_STOCK)
    write(root, "usr/lib/systemd/system/qemu-guest-agent.service", RHEL_UNIT)

    assert warnings(configure_qemu_ga(HOOK, str(root))) == []


def test_a_rhel_unit_that_ignores_the_sysconfig_hook_is_reported(root: Path) -> None:
    write(root, RHEL_SYSCONFIG, RHEL_STOCK)
    unit = RHEL_UNIT.replace(" \\\n  -F${FSFREEZE_HOOK_PATHNAME}", "")
    write(root, "usr/lib/systemd/system/qemu-guest-agent.service", unit)

    found = warnings(configure_qemu_ga(HOOK, str(root)))

    assert len(found) == 1
    assert "does not start qemu-ga with -F${FSFREEZE_HOOK_PATHNAME}" in found[0]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hook",
    ["relative/hook", "/usr/lib/with space/hook", "/usr/lib/back\\slash", "/usr//lib/hook", ""],
)
def test_an_unsafe_hook_path_is_refused(root: Path, hook: str) -> None:
    with pytest.raises(InstallError, match="hook path"):
        configure_qemu_ga(hook, str(root))
    assert not (root / "etc/qemu").exists()


def test_an_unreadable_conf_becomes_an_install_error_naming_it(root: Path) -> None:
    (root / DEBIAN_CONF).mkdir(parents=True)

    with pytest.raises(InstallError, match=str(root / DEBIAN_CONF)):
        configure_qemu_ga(HOOK, str(root))


def test_an_uncreatable_conf_directory_becomes_an_install_error(root: Path) -> None:
    write(root, "etc/qemu", "not a directory\n")

    with pytest.raises(InstallError, match="cannot create"):
        configure_qemu_ga(HOOK, str(root))


def test_a_failed_write_becomes_an_install_error_and_leaves_no_temporary_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(root, DEBIAN_CONF, "[general]\n")

    # A read-only filesystem, which root's permissions cannot simulate.
    def failing_replace(src: str, dst: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(InstallError, match="Read-only file system"):
        configure_qemu_ga(HOOK, str(root))
    assert leftovers(root / "etc/qemu") == []
    assert (root / DEBIAN_CONF).read_text() == "[general]\n"


def test_install_and_the_legacy_selection_import_nothing_outside_the_standard_library() -> None:
    # make install runs it before the daemon's dependencies are installed.
    probe = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("yaml", "pydbus", "systemd", "gi"):
            raise ImportError("not in the standard library: " + name)
sys.meta_path.insert(0, Refuse())
import qgafreeze.install, qgafreeze.legacy
"""
    src = str(Path(__file__).resolve().parents[2] / "src")
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {src!r})\n{probe}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
