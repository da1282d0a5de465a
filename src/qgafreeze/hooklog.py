"""The compatible hook log: its lines, and the file root appends them to.

The daemon runs as root and the log's path comes from the config, so opening it must never let
someone else choose what root writes to: no symbolic link is followed, and only a regular file
of root's with one link, in a directory only root can change, is written (``append_to_hook_log``).

Command output goes into the log between our own lines.  So that no command can print a line
that passes for one of ours (``<date>: qgafreeze:db finished with status=0``), every output line
starts with ``OUTPUT_MARK``, which none of our lines starts with, and control characters are
shown escaped (``visible``): no carriage return or escape sequence redraws a line in a terminal.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterable

from .trust import check_file_permissions, walk

# Starts every line of command output.  Our own lines start with a date (a capital letter) or a
# result word (``failed: ...``), never with a space: ``grep '^[^ ]'`` leaves output out.
OUTPUT_MARK = "  | "

# Groups below this are the system's own (Debian's and Fedora's SYS_GID_MAX is 999).
SYSTEM_GID_LIMIT = 1000

LOG_MODE = 0o600  # command output may be sensitive
_OPEN_FLAGS = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    | os.O_NOFOLLOW  # a symbolic link in the log's place is refused, not followed (ELOOP)
    | os.O_CLOEXEC  # commands are started from other threads meanwhile
    | os.O_NONBLOCK  # a FIFO in the log's place must not wait for a reader
    | os.O_NOCTTY
)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _escapes() -> dict[int, str]:
    """C0 but tab, DEL, C1, and the Unicode line separators and bidirectional controls (which
    can make a terminal or an editor show a line other than it is), as visible escapes."""
    codes = [*range(0x00, 0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0)]
    table = {code: f"\\x{code:02x}" for code in codes}
    for code in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F)):
        table[code] = f"\\u{code:04x}"
    for code in range(0x2066, 0x206A):
        table[code] = f"\\u{code:04x}"
    return table


_ESCAPES = _escapes()


def visible(text: str) -> str:
    """``text`` with every control character as an escape (``\\x1b``); a tab stays a tab."""
    return text.translate(_ESCAPES)


def visible_lines(text: str) -> str:
    """``visible`` for text of several lines: the newlines between them stay."""
    return "\n".join(visible(line) for line in text.split("\n"))


def output_lines(lines: Iterable[str]) -> list[str]:
    """Command output as it goes into the hook log: marked, so that it never passes for ours."""
    return [OUTPUT_MARK + line for line in lines]


def hook_log_date(epoch: float) -> str:
    """The date as date(1) prints it in the C locale: ``Thu Nov 23 13:38:05 MSK 2023``."""
    return time.strftime("%a %b %e %H:%M:%S %Z %Y", time.localtime(epoch))


def append_to_hook_log(path: str, lines: list[str]) -> str:
    """Append ``lines`` to the hook log at ``path``: "" once written, else why nothing was.

    Opened per call, not kept open: logrotate may have moved the file meanwhile.  The directory
    is opened first and checked, and the file is opened inside that very directory, so nothing
    can be swapped between the check and the write.
    """
    data = "".join(visible(line) + "\n" for line in lines).encode("utf-8", "replace")
    directory, name = os.path.split(path)
    try:
        dir_fd = os.open(directory or "/", _DIR_FLAGS)
        try:
            refused = _directory_problem(dir_fd, directory or "/")
            if refused:
                return f"cannot write the hook log {path}: refused: {refused}"
            fd = os.open(name, _OPEN_FLAGS, LOG_MODE, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            refused = _file_problem(st)
            if refused:
                return f"cannot write the hook log {path}: refused: {refused}"
            if stat.S_IMODE(st.st_mode) != LOG_MODE:
                os.fchmod(fd, LOG_MODE)  # an older install's 0644 log
            _write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"cannot write the hook log {path}: refused: it is a symbolic link"
        if exc.errno == errno.ENXIO:  # O_NONBLOCK: a FIFO nobody reads, a socket, a device
            return f"cannot write the hook log {path}: refused: not a regular file"
        return f"cannot write the hook log {path}: {exc.strerror or exc}"
    return ""


def _file_problem(st: os.stat_result) -> str | None:
    """Why the open file is not root's own log: another file reached through a hard link, a
    FIFO or a device put in its place, or a file someone else made and could read or truncate."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} links: another name reaches the same file"
    return None


def _directory_problem(dir_fd: int, directory: str) -> str | None:
    """Why the log's directory, open as ``dir_fd``, could be changed by someone but root, or
    swapped on the way to it.

    On the way, ``trust.walk``'s rule, as for the config's programs: a sticky directory of
    root's (``/tmp``) is fine, since nobody else can rename what is in it.  The log's own
    directory, as opened, must be root's alone: in a sticky one, someone else could take the
    log's name first.
    """
    real, why = walk(directory, os.getcwd())
    if real is None:  # refused on the way, or gone since it was opened
        return why or f"{directory} changed while it was checked"
    st = os.fstat(dir_fd)
    walked = os.lstat(real)
    if (walked.st_dev, walked.st_ino) != (st.st_dev, st.st_ino):
        return f"{real} changed while it was checked"
    # walk's verdict on the directory itself is not the last word: _log_group_dir may allow it.
    reason = check_file_permissions(real, st)
    if reason and not _log_group_dir(st):
        return f"{real} is {reason}"
    return None


def _log_group_dir(st: os.stat_result) -> bool:
    """Root's log directory that a system group may write too, as Ubuntu's rsyslog sets up
    /var/log (0775 root:syslog).  That group can delete the log or put its own file in its place,
    never make root write elsewhere: the file must still be root's, with one link, opened without
    following links.  Refusing it would leave Ubuntu without the hook log administrators read."""
    mode = stat.S_IMODE(st.st_mode)
    return st.st_uid == 0 and not mode & stat.S_IWOTH and 0 < st.st_gid < SYSTEM_GID_LIMIT


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
