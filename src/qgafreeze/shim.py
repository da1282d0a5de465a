"""The fsfreeze hook that qemu-ga runs: ``fsfreeze-hook freeze|thaw``.  Standard library only.

It asks the daemon over its socket, prints one line per app for qemu-ga and the administrator, and
exits 0 on success, non-zero on failure: qemu-ga then fails the freeze and the backup service
knows the snapshot would not be application-consistent.  It starts no child process, so nothing
can keep qemu-ga's pipe open after it exits.  Every wait is bounded: the daemon announces how long
a cycle may take at most, and the shim waits that long plus a margin, never for ever.
"""

from __future__ import annotations

import _socket  # not socket: see protocol.py
import os
import sys
import time

from . import paths, protocol
from .errors import (
    EXIT_OK,
    EXIT_USAGE,
    Forbidden,
    ProtocolError,
    QgafreezeError,
    Unreachable,
    exit_status,
)

# The shim runs once per freeze and thaw, and importing typing costs it milliseconds (a tenth of
# its start-up); the names are for type checkers only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, TextIO

CONNECT_TIMEOUT = 5.0
# Time for the daemon to accept a request, including its start-up under socket activation
# (about 0.2 s, docs/performance.md).  Kept short because it adds to the announced cycle time
# in the worst case, and the sum must stay within what the callers wait (docs/callers.md).
ACCEPT_TIMEOUT = 10.0
REPLY_MARGIN = 5.0


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get(paths.SOCKET_ENV) or paths.SOCKET


def request(
    op: str,
    path: str,
    on_accepted: Callable[[dict[str, Any]], None] | None = None,
    margin: float = REPLY_MARGIN,
) -> dict[str, Any]:
    """Send one request and return the daemon's final reply.  Raises Unreachable, Forbidden,
    ProtocolError."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except PermissionError as exc:  # EACCES, EPERM: the socket is there, not for us
            raise Forbidden(
                f"cannot connect to the qgafreeze daemon at {path}: {exc.strerror}: only root"
                " may, and the members of settings.allowed_group once the socket unit lets"
                " that group in (see README.md)"
            ) from None
        except OSError as exc:
            raise Unreachable(
                f"cannot reach the qgafreeze daemon at {path}: {exc.strerror or exc}"
                " (is it running? see: systemctl status qgafreeze.socket qgafreeze.service)"
            ) from None
        reader = protocol.LineReader(sock)
        try:
            sock.sendall(protocol.encode_request(op))
        except OSError as exc:
            # The daemon may have refused us (forbidden, busy) before reading the request:
            # its answer says why, so read it before giving up.
            try:
                return protocol.parse_reply(reader.read_line(time.monotonic() + CONNECT_TIMEOUT))
            except ProtocolError:
                raise Unreachable(f"the daemon at {path} closed the connection: {exc}") from None
        reply = protocol.parse_reply(reader.read_line(time.monotonic() + ACCEPT_TIMEOUT))
        if reply.get("accepted"):
            if on_accepted is not None:
                on_accepted(reply)
            limit = float(reply.get("timeout_ms", 0)) / 1000 + margin
            reply = protocol.parse_reply(reader.read_line(time.monotonic() + limit))
        return reply
    finally:
        sock.close()


# The first line of the hook's output is all a hypervisor's task log may show: qemu-ga 9.1 and
# later put the output into the freeze's error (``child process has failed to execute fsfreeze
# hook: <output>``).  It names every failed app and why, within this many characters.
FIRST_LINE_LIMIT = 300
_SHORTEST_REASON = 12  # below this a cut reason says nothing: name the apps alone


def printable(text: str) -> str:
    """``text`` with each character that a terminal or a log would not show as itself (line
    breaks, escapes, bidirectional controls) written as an escape, so one line stays one line."""
    return text if text.isprintable() else "".join(map(_escape, text))


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


def failed_apps(reply: dict[str, Any], budget: int) -> str:
    """``db failed: why; web timeout: why`` for each app that failed the phase, in ``budget``
    characters: every app named, the reasons cut evenly; with too many apps for any reason, the
    names alone, then how many more."""
    parts = [
        (printable(f"{a.get('app')} {a.get('result')}"), printable(str(a.get("message") or "")))
        for a in reply.get("apps") or []
        if a.get("result") in ("failed", "timeout")
    ]
    text = "; ".join(f"{name}: {why}" if why else name for name, why in parts)
    if len(text) <= budget or not parts:
        return text
    share = (budget - sum(len(name) + 4 for name, _ in parts)) // len(parts)
    if share >= _SHORTEST_REASON:
        return "; ".join(f"{name}: {_cut(why, share)}" for name, why in parts)
    names = ""
    for index, (name, _) in enumerate(parts):
        more = f"; +{len(parts) - index} more"
        if len(names) + len(name) + 2 + len(more) > budget:
            return names + more if names else _cut(more.lstrip("; "), budget)
        names += ("; " if names else "") + name
    return names


def summarize(reply: dict[str, Any], out: TextIO) -> None:
    """One line for the cycle, then one per app: what qemu-ga's caller and the admin will read."""
    op = reply.get("op") or "request"
    details = []
    if "duration_ms" in reply:
        details.append(f"{reply['duration_ms']} ms")
    if reply.get("cycle"):
        details.append(f"cycle {reply['cycle']}")
    if reply.get("state"):
        details.append(f"state {reply['state']}")
    tail = f" ({', '.join(details)})" if details else ""
    if reply.get("ok"):
        head = f"qgafreeze: {op} ok"
    else:
        error = reply.get("error") or {}
        head = f"qgafreeze: {op} FAILED [{printable(str(error.get('code', '?')))}]: "
        budget = FIRST_LINE_LIMIT - len(head) - len(tail)
        why = failed_apps(reply, budget)
        head += why or _cut(printable(str(error.get("message", "no reason given"))), budget)
    print(_cut(head + tail, FIRST_LINE_LIMIT), file=out)
    if reply.get("note"):
        print(f"qgafreeze: {printable(str(reply['note']))}", file=out)
    for app in list(reply.get("apps") or []) + list(reply.get("rollback") or []):
        print(f"qgafreeze:   {printable(protocol.app_line(app))}", file=out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in protocol.OPS:
        print(f"usage: fsfreeze-hook {{{'|'.join(protocol.OPS)}}}", file=sys.stderr)
        return EXIT_USAGE
    op = args[0]
    try:
        reply = request(op, socket_path())
    except QgafreezeError as exc:  # Unreachable, Forbidden, ProtocolError
        line = f"qgafreeze: {op} FAILED [{exc.code}]: {printable(exc.message)}"
        print(_cut(line, FIRST_LINE_LIMIT), file=sys.stdout)
        return exc.exit_code
    summarize(reply, sys.stdout)
    sys.stdout.flush()
    return reply_status(reply)


def reply_status(reply: dict[str, Any]) -> int:
    """The exit status for the daemon's reply: the same table as for errors raised here."""
    if reply.get("ok"):
        return EXIT_OK
    error = reply.get("error")
    return exit_status(error.get("code") if isinstance(error, dict) else None)


if __name__ == "__main__":
    raise SystemExit(main())
