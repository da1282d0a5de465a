"""The daemon's socket: activation or bind, peer checks, framing, one thread per client.

Each client gets its own thread so that ``status`` and ``ping`` stay answerable while a freeze
runs, and a client that stalls or disconnects can only hurt its own connection.  A cycle runs in
the thread of the request that started it and finishes whether or not its client is still there.

Root may ask anything.  Members of the allowed group may ask for the ops granted them only (ping
and status unless the config grants more), get replies without any command's output (which names
command lines), and hold at most half of the connection slots: the other half stays root's, so
that the hook never gets "busy" because of them.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import stat
import struct
import threading
import time
import traceback
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from . import protocol
from .errors import Busy, Forbidden, InternalError, QgafreezeError
from .model import ALLOWED_GROUP_OPS
from .trust import check_file_permissions

SD_LISTEN_FDS_START = 3
MAX_CLIENTS = 64  # concurrent connections; more get an immediate "busy"
NON_ROOT_CLIENTS = MAX_CLIENTS // 2  # of which non-root peers may hold this many
# Linux 4.13+; Python's socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_PEER_GROUPS = 256  # what getsockopt's 1024-byte buffer holds
REPLY_TIMEOUT = 5.0  # a client that does not read its reply is dropped after this


@dataclass(frozen=True)
class Peer:
    """Who connected, as the kernel recorded it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None  # supplementary; None: the kernel cannot say


Send = Callable[[dict[str, Any]], None]


class Handler(Protocol):
    def __call__(self, request: dict[str, Any], peer: Peer, send: Send) -> dict[str, Any]: ...


class Problems(Protocol):
    def problem(self, message: str, cycle: str = "", detail: str = "") -> None: ...


class Refusals(Protocol):
    """Where every refused request is told (logs.LogWriter: the hook log and journald)."""

    def refused(self, op: str | None, pid: int, uid: int, code: str, message: str) -> None: ...


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
    """SO_PEERCRED and SO_PEERGROUPS: the credentials the peer connected with, which a pid
    (exited, perhaps reused by another process by the time we look) cannot change."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] | None
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_PEER_GROUPS)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError as exc:
        if exc.errno == errno.ERANGE:
            groups = ()  # more than we can read: its supplementary groups do not let it in
        elif exc.errno == errno.ENOPROTOOPT:
            groups = None
        else:
            raise
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups)


def supplementary_groups(pid: int) -> set[int]:
    """The groups of process ``pid`` now, from /proc: only for a kernel without SO_PEERGROUPS
    (before 4.13), since the peer may have exited and its pid be another process's."""
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
    _access: tuple[int | None, tuple[str, ...]]  # who may ask besides root, and what

    def __init__(
        self,
        listener: socket.socket,
        handler: Handler,
        problems: Problems,
        allowed_gid: int | None = None,
        allowed_ops: Collection[str] = ALLOWED_GROUP_OPS,
        request_timeout: float = protocol.REQUEST_TIMEOUT,
        refusals: Refusals | None = None,
    ) -> None:
        self._listener = listener
        self._handler = handler
        self._problems = problems
        self._refusals = refusals  # None: refusals are told to ``problems`` instead
        self.allow(allowed_gid, allowed_ops)
        self._request_timeout = request_timeout
        self._clients = 0
        self._non_root = 0  # of them, non-root peers'
        self._clients_lock = threading.Lock()
        self._said_proc = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def allow(self, gid: int | None, ops: Collection[str] = ALLOWED_GROUP_OPS) -> None:
        """Let members of group ``gid`` ask for ``ops`` too (None: root alone).  Set in one
        assignment: a request sees one reload's group and ops, never half of each."""
        self._access = (gid, tuple(ops))

    @property
    def access(self) -> tuple[int | None, tuple[str, ...]]:
        """The group that may ask besides root, and what it may ask."""
        return self._access

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
        try:
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return
        with self._clients_lock:
            full = self._clients >= MAX_CLIENTS
            if peer.uid != 0:
                full = full or self._non_root >= NON_ROOT_CLIENTS
            if not full:
                self._clients += 1
                self._non_root += peer.uid != 0
        if full:
            self._refused(None, peer, Busy("too many connections"))
            _send_quietly(conn, protocol.error_reply(None, Busy.code, "too many connections"))
            conn.close()
            return
        threading.Thread(
            target=self._serve_client, args=(conn, peer), name="client", daemon=True
        ).start()

    def ops_for(self, peer: Peer, gid: int | None, granted: tuple[str, ...]) -> tuple[str, ...]:
        """What ``peer`` may ask: everything for root, ``granted`` for members of ``gid``, else
        nothing."""
        if peer.uid == 0:
            return protocol.OPS
        if gid is None:
            return ()
        groups = peer.groups
        if groups is None:
            if not self._said_proc:
                self._said_proc = True
                self._problems.problem(
                    "this kernel has no SO_PEERGROUPS (Linux 4.13+): a peer's groups are read"
                    " from /proc/PID/status instead, which a pid reused after the peer exits"
                    " could fool"
                )
            groups = tuple(supplementary_groups(peer.pid))
        return granted if peer.gid == gid or gid in groups else ()

    def _serve_client(self, conn: socket.socket, peer: Peer) -> None:
        op: str | None = None
        gid, granted = self._access  # read once: a reload may change it meanwhile
        try:
            ops = self.ops_for(peer, gid, granted)
            if not ops:
                who = "root" if gid is None else f"root and group {gid}"
                raise Forbidden(f"permission denied: only {who} may talk to qgafreeze")
            line = protocol.LineReader(conn).read_line(time.monotonic() + self._request_timeout)
            request = protocol.parse_request(line)
            op = request["op"]
            if op not in ops:
                raise Forbidden(
                    f"permission denied: {op} needs root; group {gid} may ask for"
                    f" {', '.join(ops)} (settings.allowed_group_ops)"
                )
            reply = self._handler(
                request, peer, lambda message: _send_quietly(conn, _shown_to(peer, message))
            )
        except QgafreezeError as exc:  # Forbidden, ProtocolError, and the handler's own
            reply = protocol.error_reply(op, exc.code, exc.message)
            self._refused(op, peer, exc)
        except Exception as exc:  # never let one request take the daemon down
            self._problems.problem(
                f"internal error serving {op}: {exc!r}", detail=traceback.format_exc()
            )
            reply = protocol.error_reply(op, InternalError.code, f"internal error: {exc!r}")
        finally:
            with self._clients_lock:
                self._clients -= 1
                self._non_root -= peer.uid != 0
        _send_quietly(conn, _shown_to(peer, reply))
        conn.close()

    def _refused(self, op: str | None, peer: Peer, exc: QgafreezeError) -> None:
        """Every refusal (busy, bad-state, forbidden, bad-request, ...) goes to both logs: a
        backup that fails on one must leave its reason where the administrator looks.  Queued
        by the log writer, never written here: the disks may be frozen."""
        if self._refusals is not None:
            self._refusals.refused(op, peer.pid, peer.uid, exc.code, exc.message)
        else:
            self._problems.problem(
                f"refused {op or 'a request'} from uid {peer.uid} (pid {peer.pid})"
                f" [{exc.code}]: {exc.message}"
            )


def _shown_to(peer: Peer, message: Any) -> Any:
    """``message`` as ``peer`` may see it: for anyone but root, without the output of any app
    (step labels and sessions name their command lines; commands print what they like)."""
    if peer.uid == 0:
        return message
    if isinstance(message, dict):
        return {key: _shown_to(peer, value) for key, value in message.items() if key != "output"}
    if isinstance(message, list):
        return [_shown_to(peer, item) for item in message]
    return message


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.settimeout(REPLY_TIMEOUT)
    conn.sendall(protocol.encode(message))


def _send_quietly(conn: socket.socket, message: dict[str, Any]) -> None:
    """The client may have gone (qemu-ga killed the shim): the cycle's result stands regardless."""
    try:
        _send(conn, message)
    except OSError:
        pass
