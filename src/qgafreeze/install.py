"""Point qemu-ga's fsfreeze hook at the qgafreeze shim, and take it back.

``qgaconf`` knows where each distribution family keeps qemu-ga's hook path and edits that one
setting as text; this module reads and writes the file, and warns about what would still keep
qemu-ga from running the hook.  Before the first change a copy of the original file is kept
beside it, so that removal can put the administrator's own hook back.  Nothing here imports
outside the standard library: it runs from ``make install`` on a machine that may not have the
daemon's dependencies yet.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from typing import Optional

from .errors import InstallError
from .legacy import legacy_scripts
from .qgaconf import Target, detect

BACKUP_SUFFIX = ".qgafreeze-orig"

LEGACY_HOOK_DIRS = ("etc/qemu/fsfreeze-hook.d", "etc/qemu-ga/fsfreeze-hook.d")

QGA_UNIT = "qemu-guest-agent.service"
# systemd's search order: the first directory holding the unit file wins it.
_UNIT_DIRS = (
    "etc/systemd/system",
    "run/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
)

# The path lands unquoted in a systemd command line on RHEL (-F${FSFREEZE_HOOK_PATHNAME}) and in a
# GLib key file on Debian, which unescapes backslashes: anything outside this set would be split
# or rewritten on the way to qemu-ga.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+,:@%=/-]*$")


def configure_qemu_ga(hook: str, root: str = "/") -> list[str]:
    """Make qemu-ga run ``hook`` as its fsfreeze hook; return what was done, line by line."""
    _check_hook(hook)
    target = detect(root)
    lines: list[str] = []
    if target.created_text is not None and not os.path.lexists(target.path):
        _make_dir(os.path.dirname(target.path))
        _write_atomic(target.path, target.created_text(hook), 0o644)
        lines.append(
            f"created {target.path} with {target.describe(hook)} "
            f"(qemu-ga reads it when {QGA_UNIT} restarts)"
        )
    else:
        text, mode = _read(target.path)
        current = target.get(text)
        if current is not None and _same_path(current, hook):
            # debian/postinst restarts qemu-ga unless it reads "nothing changed" here.
            lines.append(f"qemu-ga already runs {hook} ({target.path}): nothing changed")
        else:
            backup = target.path + BACKUP_SUFFIX
            if not os.path.lexists(backup):
                _write_atomic(backup, text, mode)
                lines.append(f"saved the original {target.path} as {backup}")
            _write_atomic(target.path, target.set(text, hook), mode)
            was = f"was {current}" if current is not None else "was unset"
            lines.append(
                f"set {target.describe(hook)} in {target.path} ({was}; "
                f"qemu-ga reads it when {QGA_UNIT} restarts)"
            )
    lines.extend(_warnings(hook, root, target))
    return lines


def unconfigure_qemu_ga(hook: str, root: str = "/") -> list[str]:
    """Take ``hook`` out of qemu-ga's settings, if it is still ours; return what was done."""
    _check_hook(hook)
    target = detect(root)
    if not os.path.lexists(target.path):
        return [f"{target.path} does not exist: nothing to undo"]
    text, mode = _read(target.path)
    current = target.get(text)
    backup = target.path + BACKUP_SUFFIX
    if current is None or not _same_path(current, hook):
        what = f"points at {current}" if current is not None else "sets no fsfreeze hook"
        lines = [f"{target.path} {what}, not at {hook}: left alone"]
        if os.path.lexists(backup):
            lines.append(f"kept {backup}, which may be outdated: compare it by hand")
        return lines

    if os.path.lexists(backup):
        original, _ = _read(backup)
        if target.set(original, hook) == text:
            # Nothing else changed since we edited the file: put it back byte for byte.
            _write_atomic(target.path, original, mode)
            lines = [f"restored {target.path} from {backup}"]
        else:
            # The administrator edited the file since: restore only the setting we changed.
            previous = target.get(original)
            if previous is None:
                _write_atomic(target.path, target.remove(text), mode)
                lines = [f"removed {target.key} from {target.path} (it was unset before install)"]
            else:
                _write_atomic(target.path, target.set(text, previous), mode)
                lines = [
                    f"set {target.describe(previous)} in {target.path} again, "
                    "keeping your other changes made since install"
                ]
        _unlink(backup)
        lines.append(f"removed {backup}")
    elif target.created_text is not None and text == target.created_text(hook):
        _unlink(target.path)
        lines = [f"removed {target.path}, which qgafreeze install had created"]
    else:
        _write_atomic(target.path, target.remove(text), mode)
        lines = [f"removed {target.key} from {target.path}"]
    lines[0] += f" (qemu-ga reads it when {QGA_UNIT} restarts)"
    return lines


def _check_hook(hook: str) -> None:
    if not _SAFE_PATH.match(hook) or os.path.normpath(hook) != hook:
        raise InstallError(
            f"hook path {hook!r}: must be a normalised absolute path made of letters, digits and "
            "._+,:@%=/- only (qemu-ga's unit and config file would split or unescape the rest)"
        )


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


# --- warnings -------------------------------------------------------------------------------------


def _warnings(hook: str, root: str, target: Target) -> list[str]:
    found: list[str] = []
    hook_file = os.path.join(root, hook.lstrip("/"))
    if not os.access(hook_file, os.X_OK) or not os.path.isfile(hook_file):
        found.append(
            f"warning: {hook_file} is missing or not executable: qemu-ga fails every freeze "
            "until it is installed"
        )
    for rel in LEGACY_HOOK_DIRS:
        directory = os.path.join(root, rel)
        try:
            scripts = [os.path.basename(path) for path in legacy_scripts(directory)]
        except OSError:
            scripts = []
        if scripts:
            shown = ", ".join(scripts[:5]) + (", ..." if len(scripts) > 5 else "")
            found.append(
                f"warning: {directory} holds {len(scripts)} executable hook(s) ({shown}) that "
                f"qemu-ga no longer runs: set settings.legacy_hooks: /{rel} in "
                "/etc/qgafreeze.yaml to keep running them"
            )
    unit_warning = _unit_warning(root, target, hook)
    if unit_warning is not None:
        found.append(unit_warning)
    enforce = os.path.join(root, "sys/fs/selinux/enforce")
    if _read_quietly(enforce).strip() == "1":
        found.append(
            "warning: SELinux is enforcing: its qemu-ga policy may refuse to run the hook or let "
            "it reach the daemon's socket; after a test freeze, check `ausearch -m avc -c qemu-ga`"
        )
    return found


def _unit_warning(root: str, target: Target, hook: str) -> Optional[str]:
    """A warning when qemu-ga's unit does not hand it the setting we just wrote.

    Administrators following the usual backup tutorials put ``-F/etc/qemu/fsfreeze-hook`` into
    the unit. qemu-ga applies its command line after its config file, so such an option silently
    beats our setting; on RHEL the setting only reaches qemu-ga through ``-F${...}``.
    """
    exec_start: Optional[tuple[str, str]] = None
    for unit_file in _unit_files(root):
        # A trailing backslash continues a unit file line, as in RHEL's stock ExecStart.
        text = re.sub(r"\\\r?\n", " ", _read_quietly(unit_file))
        for line in text.splitlines():
            if line.lstrip().startswith(("#", ";")):
                continue
            key, sep, value = line.partition("=")
            if sep and key.strip() == "ExecStart":
                # An empty ExecStart= in a drop-in resets the list; the last one runs.
                exec_start = (unit_file, value) if value.strip() else None
    if exec_start is None:
        return None
    unit_file, command = exec_start
    ours = {"-F${" + target.key + "}", "-F$" + target.key} if target.family == "rhel" else set()
    passes_ours = False
    for word in command.split():
        if word in ours:
            passes_ours = True
        elif word.startswith("--fsfreeze-hook") or (
            word.startswith("-F") and not word.startswith("--")
        ):
            return (
                f"warning: {unit_file} starts qemu-ga with {word}, which overrides "
                f"{target.path}: remove that option or make it -F{hook}"
            )
    if ours and not passes_ours:
        return (
            f"warning: {unit_file} does not start qemu-ga with -F${{{target.key}}}, so "
            f"{target.path} does not reach it: add -F{hook} to its ExecStart"
        )
    return None


def _unit_files(root: str) -> list[str]:
    """qemu-ga's unit file and its drop-ins, in the order systemd applies them."""
    files: list[str] = []
    for rel in _UNIT_DIRS:
        path = os.path.join(root, rel, QGA_UNIT)
        if os.path.isfile(path):
            files.append(path)
            break
    dropins: dict[str, str] = {}
    for rel in _UNIT_DIRS:
        directory = os.path.join(root, rel, QGA_UNIT + ".d")
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.endswith(".conf") and name not in dropins:
                dropins[name] = os.path.join(directory, name)
    files.extend(dropins[name] for name in sorted(dropins))
    return files


# --- files ---------------------------------------------------------------------------------------


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _read(path: str) -> tuple[str, int]:
    """The file's text and permission bits; undecodable bytes survive a rewrite unchanged."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            text = f.read()
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {_reason(exc)}") from None
    return text, mode


def _read_quietly(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _make_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise InstallError(f"cannot create {path}: {_reason(exc)}") from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InstallError(f"cannot remove {path}: {_reason(exc)}") from None


def _write_atomic(path: str, text: str, mode: int) -> None:
    """Replace ``path`` so that a reader, or a crash, sees the old or the new file, never half.

    A symlink is written through to its target: replacing the link itself would quietly detach
    the file from wherever the administrator keeps the real one.
    """
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    owner: Optional[tuple[int, int]] = None
    try:
        st = os.stat(path)
        owner = (st.st_uid, st.st_gid)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {_reason(exc)}") from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
        with open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory is; a failure here loses no data, so it
    # is not worth failing the install for.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
