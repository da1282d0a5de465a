"""The old ``fsfreeze-hook.d`` scripts, as QEMU's stock ``fsfreeze-hook`` chain treats them.

Standard library only: ``qgafreeze install`` counts these scripts on a machine that may not have
the daemon's dependencies yet, and the daemon runs them; both must mean the same scripts.
"""

from __future__ import annotations

import os
import stat

# The stock hook skips these, as package managers and editors leave them beside real scripts.
SKIPPED_SUFFIXES = (
    "~",
    ".bak",
    ".orig",
    ".rpmnew",
    ".rpmorig",
    ".rpmsave",
    ".sample",
    ".dpkg-old",
    ".dpkg-new",
    ".dpkg-tmp",
    ".dpkg-dist",
    ".dpkg-bak",
    ".dpkg-backup",
    ".dpkg-remove",
)


def legacy_scripts(directory: str) -> list[str]:
    """The scripts the stock hook would run, as paths, in its order (the shell's glob in the C
    locale: bytes, dotfiles left out); executable regular files only.  A missing directory
    holds none; any other error reading it is raised."""
    try:
        names = sorted(os.listdir(directory), key=os.fsencode)
    except FileNotFoundError:
        return []
    scripts = []
    for name in names:
        if name.startswith(".") or name.endswith(SKIPPED_SUFFIXES):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        # os.access, as the stock hook's `[ -x ]`: for root, any execute bit.
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            scripts.append(path)
    return scripts
