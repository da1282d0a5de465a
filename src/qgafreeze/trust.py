"""What the host must hold for a config to be obeyed: the permission policy and the named group.

The daemon runs what the config says as root, so the file, every program and hook script it
names, and every directory above them must be root's alone, as sshd and sudo require of theirs.
Parsing (``config.parse_config``) never looks at the host; ``config.load_file`` runs these checks
on a parsed config, and the daemon resolves the allowed group when it applies a config.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat

from . import paths
from .model import Config, join_path


def check_file_permissions(path: str, st: os.stat_result) -> str | None:
    """Why the file must be refused, or None.

    The daemon runs what the file says as root, so anyone who can change it is root.  Like sshd
    and sudo, refuse a file that anyone but root (or the reader itself) can write.
    """
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root"
    if mode & stat.S_IWOTH:
        return f"writable by everyone (mode {mode:04o}); run: chmod o-w {path}"
    if mode & stat.S_IWGRP and st.st_gid != 0:
        return f"writable by group id {st.st_gid} (mode {mode:04o}); run: chmod g-w {path}"
    return None


def _writable_by_others(path: str) -> str | None:
    """Why ``path`` (after symlinks) or a directory above it could be changed by non-root."""
    real = os.path.realpath(path)
    candidate = real
    while True:
        try:
            st = os.stat(candidate)
        except OSError:
            return None  # missing: running it fails with a clear message instead
        reason = check_file_permissions(candidate, st)
        if reason and not (candidate != real and st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            return f"{candidate} is {reason}"
        parent = os.path.dirname(candidate)
        if parent == candidate:
            return None
        candidate = parent


def insecure_programs(config: Config) -> list[str]:
    """Programs and hook scripts the daemon would run as root that someone else could change.

    As sshd and sudo do with their files: the config is root's only if what it runs is too.
    """
    checks: list[tuple[str, str]] = []
    for app in config.apps:
        base = join_path("apps", app.name)
        if app.session is not None and app.session.argv:
            checks.append((f"{base}.session.argv[0]", app.session.argv[0]))
        for phase, steps in (("freeze", app.freeze), ("thaw", app.thaw)):
            for index, step in enumerate(steps):
                if step.kind == "exec" and step.argv:
                    checks.append((f"{base}.{phase}[{index}].exec[0]", step.argv[0]))
    legacy = config.settings.legacy_hooks
    if legacy:
        checks.append(("settings.legacy_hooks", legacy))
        try:
            names = sorted(os.listdir(legacy))
        except OSError:
            names = []
        checks.extend(("settings.legacy_hooks", os.path.join(legacy, n)) for n in names)
    problems = []
    for where, program in checks:
        resolved = program if "/" in program else shutil.which(program, path=paths.SAFE_PATH)
        if resolved:
            reason = _writable_by_others(resolved)
            if reason:
                problems.append(f"{where}: refused: {reason}")
    return problems


def resolve_group(name: str | None) -> int | None:
    """The gid of ``settings.allowed_group`` on this host; None when unset or unknown."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def host_problems(config: Config) -> list[str]:
    """Everything about the host that makes this config unsafe or impossible to obey."""
    problems = insecure_programs(config)
    group = config.settings.allowed_group
    if group is not None and resolve_group(group) is None:
        problems.append(f"settings.allowed_group: no such group {group!r}")
    return problems
