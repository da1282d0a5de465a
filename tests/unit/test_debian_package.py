"""debian/: the facts it repeats from the tree (version, licence, hook path) agree with the tree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from qgafreeze import __version__

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"
HOOK = "/usr/libexec/qgafreeze/fsfreeze-hook"


def test_the_newest_debian_changelog_entry_is_the_version_init_py_declares():
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"^qgafreeze \(([^)]+)\) ", first)
    assert match, first
    assert match.group(1) == __version__


def test_debian_copyright_is_machine_readable_and_gpl_2_or_later():
    text = (DEBIAN / "copyright").read_text()
    assert text.startswith(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    )
    licences = set(re.findall(r"^License: (\S+)", text, re.M))
    assert licences == {"GPL-2.0-or-later"}
    assert "/usr/share/common-licenses/GPL-2" in text


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_scripts_are_valid_sh_with_a_debhelper_token(script):
    path = DEBIAN / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["sh", "-n", str(path)], check=True)
    # debhelper replaces every occurrence of its token, in comments too.
    assert path.read_text().count("#DEBHELPER#") == 1


def test_postinst_wires_and_prerm_unwires_the_hook_make_install_installs():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^HOOK = \$\(LIBEXECDIR\)/fsfreeze-hook$", makefile, re.M)
    assert re.search(r"^LIBEXECDIR = \$\(PREFIX\)/libexec/qgafreeze$", makefile, re.M)
    assert f"HOOK={HOOK}\n" in (DEBIAN / "postinst").read_text()
    prerm = (DEBIAN / "prerm").read_text()
    assert f"HOOK={HOOK}\n" in prerm
    assert 'qgafreeze install --remove --hook "$HOOK"' in prerm


def test_the_docs_install_the_host_package_by_the_names_make_deb_and_make_rpm_give_it():
    control = (DEBIAN / "control").read_text()
    stanzas = {
        m.group(1): stanza
        for stanza in control.split("\n\n")
        if (m := re.search(r"^Package: (\S+)$", stanza, re.M))
    }
    assert set(stanzas) == {"qgafreeze", "qgafreeze-host"}
    assert "qemu-guest-agent" not in stanzas["qgafreeze-host"]
    makefile = (REPO / "Makefile").read_text()
    assert "for p in qgafreeze qgafreeze-host; do" in makefile
    assert re.search(r"^%package host$", (REPO / "qgafreeze.spec").read_text(), re.M)
    for doc in ("README.md", "docs/host.md"):
        text = " ".join((REPO / doc).read_text().split())
        assert "apt-get install ./dist/qgafreeze-host_*.deb" in text, doc
        assert "dnf install ./dist/qgafreeze-host-*.rpm" in text, doc
