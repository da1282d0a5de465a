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
# Time for the daemon to accept a request, including its start-up under socket activation.
ACCEPT_TIMEOUT = 30.0
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


def summarize(reply: dict[str, Any], out: TextIO) -> None:
    """One line for the cycle, then one per app: what qemu-ga's caller and the admin will read."""
    op = reply.get("op") or "request"
    if reply.get("ok"):
        head = f"{op} ok"
    else:
        error = reply.get("error") or {}
        head = f"{op} FAILED [{error.get('code', '?')}]: {error.get('message', 'no reason given')}"
    details = []
    if "duration_ms" in reply:
        details.append(f"{reply['duration_ms']} ms")
    if reply.get("cycle"):
        details.append(f"cycle {reply['cycle']}")
    if reply.get("state"):
        details.append(f"state {reply['state']}")
    print(f"qgafreeze: {head}" + (f" ({', '.join(details)})" if details else ""), file=out)
    if reply.get("note"):
        print(f"qgafreeze: {reply['note']}", file=out)
    for app in list(reply.get("apps") or []) + list(reply.get("rollback") or []):
        print(f"qgafreeze:   {protocol.app_line(app)}", file=out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in protocol.OPS:
        print(f"usage: fsfreeze-hook {{{'|'.join(protocol.OPS)}}}", file=sys.stderr)
        return EXIT_USAGE
    op = args[0]
    try:
        reply = request(op, socket_path())
    except QgafreezeError as exc:  # Unreachable, Forbidden, ProtocolError
        print(f"qgafreeze: {op} FAILED [{exc.code}]: {exc.message}", file=sys.stdout)
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
