"""Where qemu-ga reads its fsfreeze hook path, and that one setting read, set and removed as text.

* RHEL family: the packaged unit runs ``qemu-ga ... -F${FSFREEZE_HOOK_PATHNAME}`` with
  ``EnvironmentFile=/etc/sysconfig/qemu-ga`` (a systemd environment file);
* Debian family: the unit runs a bare ``qemu-ga``, which reads the ``fsfreeze-hook`` key of the
  ``[general]`` group in ``/etc/qemu/qemu-ga.conf`` (a GLib key file).

Every edit changes that setting only: every other byte of the text stays as it was.  Pure text
in, text out; ``install`` does the reading, writing and keeping of backups.  Standard library
only, as ``install``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

RHEL_SYSCONFIG = "etc/sysconfig/qemu-ga"
RHEL_KEY = "FSFREEZE_HOOK_PATHNAME"
DEBIAN_CONF = "etc/qemu/qemu-ga.conf"
DEBIAN_GROUP = "general"
DEBIAN_KEY = "fsfreeze-hook"

CREATED_HEADER = "# Created by qgafreeze install; `qgafreeze install --remove` deletes it again.\n"

_GROUP_RE = re.compile(r"^\s*\[([^\]]*)\]\s*$")
_INI_KEY_RE = re.compile(r"^\s*([^=#\s][^=]*?)\s*=\s*(.*?)\s*$")
_ENV_KEY_RE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*?)\s*$")


@dataclass(frozen=True)
class Target:
    """Where one distribution family keeps qemu-ga's hook path, and how to edit it there."""

    family: str
    path: str
    key: str
    get: Callable[[str], Optional[str]]
    set: Callable[[str, str], str]
    remove: Callable[[str], str]
    # Only families whose file may be absent know how to create one.
    created_text: Optional[Callable[[str], str]]

    def describe(self, value: str) -> str:
        if self.family == "debian":
            return f"{self.key}={value} under [{DEBIAN_GROUP}]"
        return f"{self.key}={value}"


def detect(root: str) -> Target:
    """Where ``root``'s qemu-ga reads its hook path: RHEL's sysconfig file if there is one."""
    sysconfig = os.path.join(root, RHEL_SYSCONFIG)
    if os.path.isfile(sysconfig):
        return Target(
            family="rhel",
            path=sysconfig,
            key=RHEL_KEY,
            get=_env_get,
            set=_env_set,
            remove=_env_remove,
            created_text=None,
        )
    return Target(
        family="debian",
        path=os.path.join(root, DEBIAN_CONF),
        key=DEBIAN_KEY,
        get=_ini_get,
        set=_ini_set,
        remove=_ini_remove,
        created_text=_ini_created,
    )


# --- GLib key file (/etc/qemu/qemu-ga.conf) ---------------------------------------------------


def _ini_unescape(value: str) -> str:
    # GLib's string escapes, so that a value we compare is the one qemu-ga would use.
    escapes = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group(0)), value)


def _ini_key_lines(lines: list[str]) -> tuple[list[int], list[int]]:
    """Indexes of our key's lines in the target group, and of the target group's headers."""
    keys: list[int] = []
    headers: list[int] = []
    group: Optional[str] = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _GROUP_RE.match(line)
        if header:
            group = header.group(1)
            if group == DEBIAN_GROUP:
                headers.append(i)
            continue
        match = _INI_KEY_RE.match(line)
        if group == DEBIAN_GROUP and match and match.group(1) == DEBIAN_KEY:
            keys.append(i)
    return keys, headers


def _ini_get(text: str) -> Optional[str]:
    lines = text.splitlines(keepends=True)
    keys, _ = _ini_key_lines(lines)
    if not keys:
        return None
    # GLib keeps the last of repeated keys, and so does qemu-ga.
    match = _INI_KEY_RE.match(lines[keys[-1]])
    assert match is not None
    return _ini_unescape(match.group(2))


def _ending(line: str) -> str:
    return line[len(line.rstrip("\r\n")) :] or "\n"


def _replace_setting(lines: list[str], keys: list[int], setting: str) -> str:
    """The first line that sets the key becomes ``setting``; later ones, which would win over
    it, go."""
    first, *rest = keys
    lines[first] = f"{setting}{_ending(lines[first])}"
    for i in reversed(rest):
        del lines[i]
    return "".join(lines)


def _ini_set(text: str, value: str) -> str:
    lines = text.splitlines(keepends=True)
    keys, headers = _ini_key_lines(lines)
    if keys:
        return _replace_setting(lines, keys, f"{DEBIAN_KEY}={value}")
    entry = f"{DEBIAN_KEY}={value}\n"
    if headers:
        # After the group's last setting, so that comments heading the next group stay there.
        at = headers[0]
        for i in range(headers[0] + 1, len(lines)):
            stripped = lines[i].strip()
            if _GROUP_RE.match(lines[i]):
                break
            if stripped and not stripped.startswith("#"):
                at = i
        if not lines[at].endswith(("\n", "\r")):
            lines[at] += "\n"
        lines.insert(at + 1, entry)
        return "".join(lines)
    prefix = text
    if prefix and not prefix.endswith("\n"):
        prefix += "\n"
    if prefix.strip():
        prefix += "\n"
    return f"{prefix}[{DEBIAN_GROUP}]\n{entry}"


def _ini_remove(text: str) -> str:
    lines = text.splitlines(keepends=True)
    keys, _ = _ini_key_lines(lines)
    for i in reversed(keys):
        del lines[i]
    return "".join(lines)


def _ini_created(hook: str) -> str:
    return f"{CREATED_HEADER}[{DEBIAN_GROUP}]\n{DEBIAN_KEY}={hook}\n"


# --- systemd environment file (/etc/sysconfig/qemu-ga) ------------------------------------------


def _env_unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _env_key_lines(lines: list[str]) -> list[int]:
    found = []
    for i, line in enumerate(lines):
        match = _ENV_KEY_RE.match(line)
        if match and match.group(1) == RHEL_KEY:
            found.append(i)
    return found


def _env_get(text: str) -> Optional[str]:
    lines = text.splitlines(keepends=True)
    keys = _env_key_lines(lines)
    if not keys:
        return None
    # systemd applies assignments in order: the last one is what qemu-ga gets.
    match = _ENV_KEY_RE.match(lines[keys[-1]])
    assert match is not None
    return _env_unquote(match.group(2))


def _env_set(text: str, value: str) -> str:
    lines = text.splitlines(keepends=True)
    keys = _env_key_lines(lines)
    if keys:
        return _replace_setting(lines, keys, f"{RHEL_KEY}={value}")
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"
    lines.append(f"{RHEL_KEY}={value}\n")
    return "".join(lines)


def _env_remove(text: str) -> str:
    lines = text.splitlines(keepends=True)
    for i in reversed(_env_key_lines(lines)):
        del lines[i]
    return "".join(lines)
