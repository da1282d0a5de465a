"""qemu-ga's line protocol, from the host end of a guest's agent channel (a unix socket).

Everything the guest sends is untrusted: every wait is bounded and every answer's size capped.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import time
from typing import Any, Optional

REPLY_TIMEOUT = 30.0  # connect, sync and the file commands
SYNC_RESEND = 5.0  # bytes sent while no agent listened are lost: ask again this often
MAX_LINE = 4 << 20  # one answer of qemu-ga; a report's base64 is a few KiB
MAX_FILE = 1 << 20
READ_CHUNK = 64 << 10

Document = dict[str, Any]


class Unreachable(Exception):
    """qemu-ga cannot be reached, or did not answer in time."""


class AgentError(Exception):
    """qemu-ga answered a command with an error."""

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.desc = desc


def printable(value: object) -> str:
    """What the guest wrote, safe to print: each character a terminal would act on, escaped."""
    text = str(value)
    out = []
    for char in text:
        code = ord(char)
        out.append(
            char if char.isprintable() else f"\\u{code:04x}" if code > 0xFF else f"\\x{code:02x}"
        )
    return "".join(out)


class Agent:
    """qemu-ga's line protocol on the host end of its channel: one JSON object per line each
    way, answers in order.  A sync (``guest-sync-delimited`` after a 0xff byte, which resets
    qemu-ga's parser) makes the next answer the answer to the next command; it is done on
    connect and after any wait that ended without its answer."""

    def __init__(self, path: str, reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.path = path
        self.reply_timeout = reply_timeout
        self._sock: Optional[socket.socket] = None
        self._buf = b""
        self._unsynced = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.reply_timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                raise Unreachable(
                    f"cannot connect to qemu-ga at {self.path}: {exc.strerror or exc}"
                ) from None
            self._sock, self._buf = sock, b""
        return self._sock

    def _send(self, data: bytes) -> None:
        try:
            self._connected().sendall(data)
        except socket.timeout:
            raise Unreachable(f"qemu-ga at {self.path} takes no input") from None
        except OSError as exc:
            raise Unreachable(f"cannot write to qemu-ga at {self.path}: {exc}") from None

    def _message(self, deadline: float) -> Document:
        """The next JSON object qemu-ga sent; bytes that are not one (what a resync leaves
        behind) are skipped."""
        while True:
            line, newline, rest = self._buf.partition(b"\n")
            if newline:
                self._buf = rest
                # qemu-ga puts 0xff before its answer to guest-sync-delimited: whatever came
                # before it on the line is a partial answer left over from an earlier client.
                line = line.rpartition(b"\xff")[2]
                try:
                    message = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(message, dict):
                    return message
                continue
            if len(self._buf) > MAX_LINE:
                raise Unreachable(f"qemu-ga at {self.path} sent a line over {MAX_LINE} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unreachable(f"qemu-ga at {self.path} did not answer in time")
            sock = self._connected()
            sock.settimeout(left)
            try:
                chunk = sock.recv(READ_CHUNK)
            except socket.timeout:
                continue
            except OSError as exc:
                raise Unreachable(f"cannot read from qemu-ga at {self.path}: {exc}") from None
            if not chunk:
                self.close()
                raise Unreachable(f"qemu-ga at {self.path} closed the connection")
            self._buf += chunk

    def sync(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            token = secrets.randbelow(1 << 30) + 1
            request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
            self._send(b"\xff" + json.dumps(request).encode() + b"\n")
            attempt_ends = min(deadline, time.monotonic() + SYNC_RESEND)
            try:
                # qemu-ga answers in order: older answers, syncs or not, come before ours.
                while self._message(attempt_ends).get("return") != token:
                    pass
                self._unsynced = False
                return
            except Unreachable:
                if time.monotonic() >= deadline or self._sock is None:
                    raise Unreachable(
                        f"qemu-ga at {self.path} did not answer in {timeout:g} s"
                    ) from None

    def call(self, command: str, arguments: Optional[Document] = None, timeout: float = 0) -> Any:
        """qemu-ga's answer to ``command``; AgentError if it refused, Unreachable if none came
        within ``timeout`` (the reply timeout when 0)."""
        timeout = timeout or self.reply_timeout
        if self._unsynced:
            self.sync(timeout)
        request: Document = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + timeout
        try:
            while True:
                message = self._message(deadline)
                if "return" in message:
                    return message["return"]
                if "error" in message:
                    error = message["error"]
                    desc = error.get("desc", "") if isinstance(error, dict) else error
                    raise AgentError(command, str(desc))
        except BaseException:
            self._unsynced = True  # the answer may still come, before the next one
            raise

    def read_file(self, path: str) -> bytes:
        handle = self.call("guest-file-open", {"path": path, "mode": "r"})
        data = b""
        try:
            while len(data) <= MAX_FILE:
                chunk = self.call("guest-file-read", {"handle": handle, "count": READ_CHUNK})
                if not isinstance(chunk, dict):
                    raise AgentError("guest-file-read", f"unexpected answer {chunk!r:.80}")
                data += base64.b64decode(str(chunk.get("buf-b64", "")), validate=False)
                if chunk.get("eof") or not chunk.get("count"):
                    return data
            raise AgentError("guest-file-read", f"{path} is over {MAX_FILE} bytes")
        finally:
            try:
                self.call("guest-file-close", {"handle": handle})
            except (AgentError, Unreachable):
                pass
