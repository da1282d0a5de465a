"""The daemon's socket: activation or bind, peer checks, framing, one thread per client.

Each client gets its own thread so that ``status`` and ``ping`` stay answerable while a freeze
runs, and a client that stalls or disconnects can only hurt its own connection.  A cycle runs in
the thread of the request that started it and finishes whether or not its client is still there.
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import struct
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from . import protocol
from .errors import Busy, Forbidden, InternalError, ProtocolError, QgafreezeError
from .trust import check_file_permissions

SD_LISTEN_FDS_START = 3
MAX_CLIENTS = 64  # concurrent connections; more get an immediate "busy"
REPLY_TIMEOUT = 5.0  # a client that does not read its reply is dropped after this


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


Send = Callable[[dict[str, Any]], None]


class Handler(Protocol):
    def __call__(self, request: dict[str, Any], peer: Peer, send: Send) -> dict[str, Any]: ...


class Problems(Protocol):
    def problem(self, message: str, cycle: str = "", detail: str = "") -> None: ...


def activated_listener() -> socket.socket | None:
    """The socket systemd passed us (sd_listen_fds), or None when not socket-activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not inherited by anything we run
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    return sock


def bind_listener(path: str, group: int | None = None) -> socket.socket:
    """Bind the socket ourselves (no systemd socket unit): mode 0600, or 0660 for ``group``.

    A directory we create is root's (0700, or 0711 so that ``group`` can reach the socket); one
    that exists is used as it is, and only if root's alone: in a directory others could write,
    anyone could put their own socket in the hook's way.
    """
    directory = os.path.dirname(path) or "."
    created = _socket_directory(directory)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise QgafreezeError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale, left by a daemon that died
        else:
            raise QgafreezeError(f"another qgafreeze daemon is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the socket is open to others
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    if group is None:
        os.chmod(path, 0o600)
    else:
        os.chown(path, 0, group)
        os.chmod(path, 0o660)
        if created:
            os.chmod(directory, 0o711)
    sock.listen(128)
    return sock


def _socket_directory(directory: str) -> bool:
    """Make ``directory`` root-only and return True, or check the one that exists."""
    try:
        os.makedirs(directory, mode=0o700)
        return True
    except FileExistsError:
        pass
    st = os.lstat(directory)
    reason = (
        check_file_permissions(directory, st)
        if stat.S_ISDIR(st.st_mode)
        else "not a directory (a symlink?)"
    )
    if reason:
        raise QgafreezeError(
            f"refusing to put the socket in {directory}: it is {reason}; others could replace"
            " the socket there: use a directory only root can write"
        )
    return False


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid=pid, uid=uid, gid=gid)


def supplementary_groups(pid: int) -> set[int]:
    """The peer's supplementary groups (SO_PEERCRED carries only the primary one)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def notify(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, never blocking."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode("utf-8"), socket.MSG_DONTWAIT, address)
    except OSError:
        pass  # not fatal: systemd then judges us by the start timeout


class Server:
    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        problems: Problems,
        allowed_gid: int | None = None,
        request_timeout: float = protocol.REQUEST_TIMEOUT,
    ) -> None:
        self._listener = listener
        self._handler = handler
        self._problems = problems
        self.allowed_gid = allowed_gid  # members of this group may ask too; None: root only
        self._request_timeout = request_timeout
        self._clients = 0
        self._clients_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def wake(self) -> None:
        """Called from signal handlers: make serve() return to its caller's loop."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Accept until ``should_stop()`` is true after a wake()."""
        self._listener.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ, "accept")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not should_stop():
                for key, _ in selector.select():
                    if key.data == "wake":
                        os.read(self._wake_r, 512)
                    else:
                        self._accept()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        with self._clients_lock:
            full = self._clients >= MAX_CLIENTS
            if not full:
                self._clients += 1
        if full:
            _send_quietly(conn, protocol.error_reply(None, Busy.code, "too many connections"))
            conn.close()
            return
        threading.Thread(
            target=self._serve_client, args=(conn,), name="client", daemon=True
        ).start()

    def _may_ask(self, peer: Peer) -> bool:
        if peer.uid == 0:
            return True
        gid = self.allowed_gid
        return gid is not None and (peer.gid == gid or gid in supplementary_groups(peer.pid))

    def _serve_client(self, conn: socket.socket) -> None:
        op: str | None = None
        try:
            peer = peer_of(conn)
            if not self._may_ask(peer):
                who = "root" if self.allowed_gid is None else f"root and group {self.allowed_gid}"
                self._problems.problem(
                    f"refused a request from uid {peer.uid} (pid {peer.pid}): only {who} may ask"
                )
                raise Forbidden(f"permission denied: only {who} may talk to qgafreeze")
            line = protocol.LineReader(conn).read_line(time.monotonic() + self._request_timeout)
            request = protocol.parse_request(line)
            op = request["op"]
            reply = self._handler(request, peer, lambda message: _send_quietly(conn, message))
        except (ProtocolError, Forbidden) as exc:
            reply = protocol.error_reply(op, exc.code, exc.message)
        except QgafreezeError as exc:
            reply = protocol.error_reply(op, exc.code, exc.message)
        except Exception as exc:  # never let one request take the daemon down
            self._problems.problem(
                f"internal error serving {op}: {exc!r}", detail=traceback.format_exc()
            )
            reply = protocol.error_reply(op, InternalError.code, f"internal error: {exc!r}")
        finally:
            with self._clients_lock:
                self._clients -= 1
        _send_quietly(conn, reply)
        conn.close()


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.settimeout(REPLY_TIMEOUT)
    conn.sendall(protocol.encode(message))


def _send_quietly(conn: socket.socket, message: dict[str, Any]) -> None:
    """The client may have gone (qemu-ga killed the shim): the cycle's result stands regardless."""
    try:
        _send(conn, message)
    except OSError:
        pass
