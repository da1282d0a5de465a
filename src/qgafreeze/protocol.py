"""The socket protocol, shared by the daemon and the shim.  Standard library only.

Newline-delimited JSON over a stream unix socket, one request per connection:

    -> {"op": "freeze"}
    <- {"accepted": true, "op": "freeze", "timeout_ms": 185000}     (freeze and thaw only)
    <- {"ok": true, "op": "freeze", "state": "frozen", "cycle": "...", "apps": [...]}

The ``accepted`` line tells the client how long the daemon may take at most, so the shim waits
exactly that long (plus a margin) instead of a guess.  A failure reply carries
``"error": {"code": ..., "message": ...}``; codes are the ``code`` of errors.py classes.

The shim's start-up is on the time qemu-ga waits, which shapes two choices here:

* ``_socket``, the C module under ``socket``, not ``socket``: ``socket.py`` itself loads enum and
  selectors, 7 to 12 ms of a 23 ms round trip (measured).  The daemon's ``socket.socket``
  objects are ``_socket.socket`` objects too, so LineReader serves both.
* json is imported where it is used: the shim sends its request first (the request line needs no
  json) and loads json while the daemon is already at work.  The daemon has json loaded long
  before any cycle.
"""

from __future__ import annotations

import _socket
import time

from .errors import ProtocolError

# The shim runs once per freeze and thaw, and importing typing costs it milliseconds (a tenth of
# its start-up); the names are for type checkers only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

OPS = ("ping", "status", "freeze", "thaw")
MAX_LINE = 64 * 1024  # a request is a few dozen bytes; anything near this is hostile
REQUEST_TIMEOUT = 5.0  # a client that connects must say what it wants within this


def encode(message: dict[str, Any]) -> bytes:
    import json

    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode("utf-8") + b"\n"


class LineReader:
    """Reads newline-terminated lines from a stream socket, keeping what follows a line."""

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def read_line(self, deadline: float, limit: int = MAX_LINE) -> bytes:
        """One line, or ProtocolError on timeout, EOF, or a line over ``limit`` bytes."""
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                return line
            if len(self._buf) > limit:
                raise ProtocolError(f"line longer than {limit} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError("timed out waiting for a complete line")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except _socket.timeout:  # socket.timeout is this class (TimeoutError from 3.10)
                raise ProtocolError("timed out waiting for a complete line") from None
            except OSError as exc:
                raise ProtocolError(f"connection failed: {exc.strerror or exc}") from None
            if not chunk:
                raise ProtocolError("connection closed before a complete line")
            self._buf += chunk


def encode_request(op: str) -> bytes:
    """The request line, written without json (see the module's docstring)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    return b'{"op":"' + op.encode("ascii") + b'"}\n'  # ops are plain words: valid JSON as is


def _json_object(line: bytes, what: str) -> dict[str, Any]:
    import json

    try:
        message = json.loads(line.decode("utf-8"))
    # RecursionError: 64 KiB of "[" nests deeper than the parser goes; still just bad input.
    except (UnicodeDecodeError, ValueError, RecursionError):
        message = None
    if not isinstance(message, dict):
        raise ProtocolError(f"{what} is not a JSON object on one line")
    return message


def parse_request(line: bytes) -> dict[str, Any]:
    message = _json_object(line, "request")
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    unknown = sorted(set(message) - {"op"})
    if unknown:
        raise ProtocolError(f"unknown request field(s): {', '.join(map(str, unknown))}")
    return message


def parse_reply(line: bytes) -> dict[str, Any]:
    return _json_object(line, "the daemon's reply")


def app_line(app: dict[str, Any]) -> str:
    """``db: freeze ok in 523 ms: message``: one app's result, as the hook, ``qgafreeze status``
    and journald all say it (``app`` is AppOutcome.to_dict() or a reply's entry)."""
    line = f"{app.get('app')}: {app.get('phase')} {app.get('result')}"
    line += f" in {app.get('duration_ms')} ms"
    if app.get("message"):
        line += f": {app['message']}"
    return line


def error_reply(op: str | None, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "op": op, "error": {"code": code, "message": message}, **extra}
