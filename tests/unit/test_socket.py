"""The daemon's socket and the shim, over a real unix socket, with a scripted request handler."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qgafreeze import errors, protocol, shim
from qgafreeze.errors import Forbidden, ProtocolError, Unreachable
from qgafreeze.server import MAX_CLIENTS, Peer, Send, Server, bind_listener


class ScriptedHandler:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.release.set()
        self.in_cycle = threading.Event()
        self.done: list[str] = []
        self.reply_ok = True
        self.error_code = "freeze-failed"
        self.announce_ms = 1000

    def __call__(self, request: dict[str, Any], peer: Peer, send: Send) -> dict[str, Any]:
        op = request["op"]
        if op in ("freeze", "thaw"):
            send({"accepted": True, "op": op, "timeout_ms": self.announce_ms})
            self.in_cycle.set()
            self.release.wait(10)
            self.done.append(op)
            if not self.reply_ok:
                return {"ok": False, "op": op, "error": {"code": self.error_code, "message": "x"}}
            return {"ok": True, "op": op, "state": "frozen", "apps": [{"app": "a", "result": "ok"}]}
        return {"ok": True, "op": op, "state": "thawed", "uid": peer.uid}


class Problems:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def problem(self, message: str, cycle: str = "", detail: str = "") -> None:
        self.messages.append(message)


@pytest.fixture
def served() -> Iterator[tuple[str, ScriptedHandler, Problems]]:
    # Not under tmp_path: pytest makes that 0700, and two tests connect as another user.
    base = tempfile.mkdtemp(prefix="qgft-sock-")
    os.chmod(base, 0o755)
    path = os.path.join(base, "run", "q.sock")
    handler, problems = ScriptedHandler(), Problems()
    server = Server(bind_listener(path), handler, problems, request_timeout=0.3)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
    thread.start()
    yield path, handler, problems
    handler.release.set()
    stop.set()
    server.wake()
    thread.join(5)
    shutil.rmtree(base, ignore_errors=True)


def raw_exchange(path: str, payload: bytes, read_timeout: float = 5) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.settimeout(read_timeout)
        try:
            sock.sendall(payload)
        except OSError:
            pass  # the server may already have answered and closed
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.splitlines()[-1])


def test_socket_is_created_root_only(served):
    path, _, _ = served
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"


def test_ping_round_trip(served):
    path, _, _ = served
    assert shim.request("ping", path)["ok"] is True


def test_freeze_announces_its_budget_then_replies(served):
    path, _, _ = served
    announced = []
    reply = shim.request("freeze", path, on_accepted=announced.append)
    assert announced == [{"accepted": True, "op": "freeze", "timeout_ms": 1000}]
    assert reply["ok"] is True


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json\n", "not a JSON object"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"op": "reboot"}\n', "unknown op 'reboot'"),
        (b'{"op": "ping", "extra": 1}\n', "unknown request field(s): extra"),
        (b"\xff\xfe\n", "not a JSON object"),
        (b"[" * 60000 + b"\n", "not a JSON object"),  # deeper than json's recursion limit
    ],
)
def test_malformed_requests_get_a_clear_error(served, payload, message):
    path, _, problems = served
    reply = raw_exchange(path, payload)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "bad-request"
    assert message in reply["error"]["message"]
    assert not [m for m in problems.messages if "internal error" in m]


def test_oversized_request_is_refused(served):
    path, _, _ = served
    reply = raw_exchange(path, b"x" * (200 * 1024))
    assert reply["error"]["code"] == "bad-request"
    assert "longer than" in reply["error"]["message"]


def test_client_that_sends_nothing_is_timed_out(served):
    path, _, _ = served
    reply = raw_exchange(path, b"")
    assert reply["error"]["code"] == "bad-request"
    assert "timed out" in reply["error"]["message"]


def test_status_is_answered_while_a_cycle_runs(served):
    path, handler, _ = served
    handler.release.clear()
    worker = threading.Thread(target=shim.request, args=("freeze", path))
    worker.start()
    assert handler.in_cycle.wait(5)
    assert shim.request("status", path)["state"] == "thawed"  # the scripted reply
    handler.release.set()
    worker.join(5)


def test_client_that_disconnects_mid_cycle_does_not_stop_the_cycle(served):
    path, handler, _ = served
    handler.release.clear()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(b'{"op": "freeze"}\n')
        assert handler.in_cycle.wait(5)
    handler.release.set()
    deadline = time.monotonic() + 5
    while not handler.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.done == ["freeze"]
    assert shim.request("ping", path)["ok"] is True


PEER_GROUP = 4242  # a supplementary group of the test's peers (their primary one is 65534)


def _as_nobody(child: Any, groups: tuple[int, ...] = (PEER_GROUP,)) -> Any:
    """Run ``child()`` in a process of uid and gid 65534 with ``groups``; return what it
    returned (JSON), or the exception it raised, as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(65534)
            os.setuid(65534)
            try:
                outcome = json.dumps(child())
            except Exception as exc:  # reported to the parent, which shows it on failure
                outcome = json.dumps(f"error: {exc!r}")
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        seen = reader.read()
    os.waitpid(pid, 0)
    return json.loads(seen)


def _connect_as_nobody(path: str) -> str:
    """Connect from a child process running as uid 65534; return what it saw."""

    def child() -> str:
        try:
            return json.dumps(shim.request("ping", path))
        except (Unreachable, Forbidden) as exc:
            return f"{exc.code}: {exc.message}"

    return str(_as_nobody(child, groups=()))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_non_root_cannot_open_the_socket(served):
    path, _, _ = served
    os.chmod(os.path.dirname(path), 0o755)  # let it reach the socket file itself
    seen = _connect_as_nobody(path)
    assert "Permission denied" in seen
    assert seen.startswith("forbidden: "), seen  # exit 4, as README and qgafreeze(8) promise
    assert "only root" in seen
    assert errors.exit_status(seen.split(":", 1)[0]) == errors.EXIT_FORBIDDEN


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_non_root_peer_is_refused_even_when_the_socket_is_open(served):
    path, _, problems = served
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o666)  # a misconfigured socket: the credential check must still refuse
    seen = _connect_as_nobody(path)
    assert seen.startswith("{"), seen
    reply = json.loads(seen)
    assert reply["error"]["code"] == "forbidden"
    assert any("uid 65534" in m for m in problems.messages)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_members_of_the_allowed_group_may_ask():
    base = tempfile.mkdtemp(prefix="qgft-group-")
    os.chmod(base, 0o755)
    path = os.path.join(base, "run", "q.sock")
    problems = Problems()
    # nobody's primary group is 65534: allow that group.
    server = Server(
        bind_listener(path, group=65534), ScriptedHandler(), problems, allowed_gid=65534
    )
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
    thread.start()
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"
        assert os.stat(path).st_gid == 65534
        reply = json.loads(_connect_as_nobody(path))
        assert reply["ok"] is True and reply["uid"] == 65534
        server.allow(None)  # as after a reload that removes the setting
        assert json.loads(_connect_as_nobody(path))["error"]["code"] == "forbidden"
    finally:
        stop.set()
        server.wake()
        thread.join(5)
        shutil.rmtree(base, ignore_errors=True)


def test_second_daemon_refuses_to_steal_a_live_socket(served):
    path, _, _ = served
    with pytest.raises(Exception, match="already listening"):
        bind_listener(path)


def test_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    bind_listener(path).close()


# -- the shim as qemu-ga runs it ---------------------------------------------------------------


@pytest.fixture
def run_shim(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    def run(path: str, *args: str) -> tuple[int, str]:
        monkeypatch.setenv("QGAFREEZE_SOCKET", path)
        code = shim.main(list(args))
        return code, capsys.readouterr().out

    return run


def test_shim_exits_zero_and_prints_each_app_on_success(served, run_shim):
    path, _, _ = served
    code, out = run_shim(path, "freeze")
    assert code == 0
    assert "qgafreeze: freeze ok" in out
    assert "qgafreeze:   a:" in out


def test_shim_exits_non_zero_when_the_daemon_reports_failure(served, run_shim):
    path, handler, _ = served
    handler.reply_ok = False
    code, out = run_shim(path, "freeze")
    assert code == 1
    assert "freeze FAILED [freeze-failed]" in out


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("config-invalid", errors.EXIT_CONFIG),
        ("forbidden", errors.EXIT_FORBIDDEN),
        ("bus-unavailable", errors.EXIT_UNREACHABLE),
        ("thaw-failed", errors.EXIT_FAILED),
        ("a-code-from-a-newer-daemon", errors.EXIT_FAILED),
    ],
)
def test_hook_and_cli_exit_with_the_status_of_the_error_the_daemon_reports(
    served, run_shim, capsys, code, status
):
    from qgafreeze import cli

    path, handler, _ = served
    handler.reply_ok = False
    handler.error_code = code
    assert run_shim(path, "freeze")[0] == status
    assert cli.main(["freeze", "--socket", path]) == status
    assert f"[{code}]" in capsys.readouterr().out


def test_every_error_class_has_a_code_and_an_exit_status_from_the_one_table():
    meanings = dict(errors.EXIT_MEANINGS)
    for cls in errors.all_errors():
        assert cls.code and cls.exit_code in meanings, cls
        if cls is not errors.QgafreezeError and cls is not errors.CycleFailed:
            assert errors.exit_status(cls.code) == cls.exit_code


def test_shim_says_clearly_when_the_daemon_is_unreachable(tmp_path, run_shim):
    code, out = run_shim(str(tmp_path / "absent.sock"), "freeze")
    assert code == errors.EXIT_UNREACHABLE
    assert "cannot reach the qgafreeze daemon" in out
    assert "systemctl status qgafreeze.socket" in out


def test_shim_rejects_unknown_arguments(run_shim, tmp_path):
    code, _ = run_shim(str(tmp_path / "x"), "unfreeze")
    assert code == errors.EXIT_USAGE


def test_shim_waits_no_longer_than_the_daemon_announced(served):
    path, handler, _ = served
    handler.release.clear()
    handler.announce_ms = 100
    with pytest.raises(ProtocolError, match="timed out"):
        shim.request("freeze", path, margin=0.1)


def test_shim_imports_only_the_standard_library():
    import subprocess
    import sys

    code = (
        "import sys; import qgafreeze.shim; "
        "bad = sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('yaml', 'gi', 'pydbus', 'systemd'));"
        "print(','.join(bad))"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": src}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_shim_loads_neither_json_nor_socket_py_before_sending_its_request():
    # The request line is written without json, so the daemon starts while the shim is still
    # loading json to read the answer; the shim uses _socket, as socket.py costs milliseconds.
    import subprocess
    import sys

    code = (
        "import sys; import qgafreeze.shim; print('json' in sys.modules, 'socket' in sys.modules)"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-IBS", "-c", f"import sys; sys.path.insert(0, {src!r}); {code}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"


@pytest.mark.parametrize("op", ["ping", "status", "freeze", "thaw"])
def test_request_line_written_without_json_is_json_the_daemon_accepts(op):
    line = protocol.encode_request(op)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"op": op}
    assert protocol.parse_request(line.rstrip(b"\n")) == {"op": op}


# -- where a daemon started by hand binds its socket --------------------------------------------


@pytest.fixture
def scratch() -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="qgft-dir-")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_an_existing_directory_keeps_its_mode_when_a_group_may_ask(scratch):
    # $QGAFREEZE_SOCKET can put the socket in a directory others use too: only one that the
    # daemon made is its to open for the group.
    bind_listener(os.path.join(scratch, "q.sock"), group=65534).close()

    assert oct(os.stat(scratch).st_mode & 0o7777) == "0o755"
    made = os.path.join(scratch, "run")
    bind_listener(os.path.join(made, "q.sock"), group=65534).close()
    assert oct(os.stat(made).st_mode & 0o777) == "0o711"


def test_a_directory_others_can_write_is_refused_and_left_as_it_was(scratch):
    shared = os.path.join(scratch, "tmp")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)  # what /tmp is: anyone could replace the socket there

    with pytest.raises(errors.QgafreezeError) as raised:
        bind_listener(os.path.join(shared, "q.sock"), group=65534)

    assert "writable by everyone" in raised.value.message
    assert raised.value.message.startswith(f"refusing to put the socket in {shared}: ")
    assert oct(os.stat(shared).st_mode & 0o7777) == "0o1777"
    assert os.listdir(shared) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_a_directory_owned_by_another_user_is_refused(scratch):
    theirs = os.path.join(scratch, "theirs")
    os.mkdir(theirs, 0o755)
    os.chown(theirs, 65534, 65534)

    with pytest.raises(errors.QgafreezeError, match="owned by uid 65534, not root"):
        bind_listener(os.path.join(theirs, "q.sock"))
    assert os.listdir(theirs) == []


# -- what the allowed group may do ---------------------------------------------------------------

GRANTED_ALL = ("ping", "status", "freeze", "thaw")


class CycleReplies(ScriptedHandler):
    """Replies as the daemon's do: each app with its output, which names commands."""

    def __call__(self, request: dict[str, Any], peer: Peer, send: Send) -> dict[str, Any]:
        app = {"app": "db", "phase": "freeze", "result": "ok", "duration_ms": 5, "message": ""}
        app["output"] = ["session 42 ready: mariadb --defaults-file=/root/.secret.cnf"]
        if request["op"] == "status":
            return {"ok": True, "op": "status", "state": "thawed", "last": {"apps": [app]}}
        reply = super().__call__(request, peer, send)
        return {**reply, "apps": [app], "rollback": [app]} if reply["ok"] else reply


class GroupServer:
    """A server whose socket (0660, group PEER_GROUP) lets that group in; not yet serving."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="qgft-rights-")
        os.chmod(self.base, 0o755)
        self.path = os.path.join(self.base, "run", "q.sock")
        self.handler, self.problems = CycleReplies(), Problems()
        listener = bind_listener(self.path, group=PEER_GROUP)
        self.server = Server(
            listener, self.handler, self.problems, allowed_gid=PEER_GROUP, request_timeout=10
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.server.serve, args=(self._stop.is_set,), daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.server.wake()
        if self._thread.is_alive():
            self._thread.join(5)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def group_server() -> Iterator[GroupServer]:
    served = GroupServer()
    yield served
    served.close()


def ask_all(path: str, ops: tuple[str, ...]) -> Any:
    def child() -> list[dict[str, Any]]:
        return [shim.request(op, path) for op in ops]

    return child


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")


@needs_root
def test_the_allowed_group_may_ping_and_ask_status_but_not_freeze_or_thaw_by_default(
    group_server,
):
    group_server.start()

    ping, status, freeze, thaw = _as_nobody(ask_all(group_server.path, GRANTED_ALL))

    assert ping["ok"] is True and status["ok"] is True
    for reply, op in ((freeze, "freeze"), (thaw, "thaw")):
        assert reply["error"]["code"] == "forbidden", reply
        assert reply["error"]["message"] == (
            f"permission denied: {op} needs root; group {PEER_GROUP} may ask for ping,"
            " status (settings.allowed_group_ops)"
        )
    assert group_server.handler.done == []  # no cycle ran
    assert [m for m in group_server.problems.messages if "refused freeze from uid 65534" in m]


@needs_root
def test_an_admin_may_grant_the_group_freeze_and_thaw(group_server):
    group_server.server.allow(PEER_GROUP, GRANTED_ALL)
    group_server.start()

    replies = _as_nobody(ask_all(group_server.path, ("freeze", "thaw")))

    assert [reply["ok"] for reply in replies] == [True, True]
    assert group_server.handler.done == ["freeze", "thaw"]


@needs_root
def test_replies_to_the_group_carry_no_command_lines_or_output(group_server):
    group_server.server.allow(PEER_GROUP, GRANTED_ALL)
    group_server.start()

    status, freeze = _as_nobody(ask_all(group_server.path, ("status", "freeze")))

    assert status["last"]["apps"] == [
        {"app": "db", "phase": "freeze", "result": "ok", "duration_ms": 5, "message": ""}
    ]
    assert "secret" not in json.dumps([status, freeze])
    assert [sorted(app) for app in freeze["apps"] + freeze["rollback"]] == 2 * [
        ["app", "duration_ms", "message", "phase", "result"]
    ]
    # Root still sees everything.
    assert "output" in shim.request("status", group_server.path)["last"]["apps"][0]


@needs_root
def test_the_group_cannot_take_the_connection_slots_root_needs(group_server):
    path = group_server.path
    group_server.start()
    release_r, release_w = os.pipe()
    ready_r, ready_w = os.pipe()

    def hog() -> int:
        """Open every slot there is and keep them silent; count the "busy" answers."""
        os.close(release_w)
        held = []
        for _ in range(MAX_CLIENTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            held.append(sock)
        busy, waiting, deadline = 0, list(held), time.monotonic() + 1
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(waiting, [], [], deadline - time.monotonic())
            for sock in readable:
                waiting.remove(sock)
                busy += b'"busy"' in sock.recv(4096)
        os.write(ready_w, str(busy).encode())
        os.read(release_r, 1)  # hold the rest until root has asked
        return busy

    holder = threading.Thread(target=lambda: hogged.append(_as_nobody(hog)))
    hogged: list[Any] = []
    holder.start()
    try:
        busy = int(os.read(ready_r, 16))
        assert busy == MAX_CLIENTS - MAX_CLIENTS // 2
        assert shim.request("ping", path)["ok"] is True
    finally:
        os.write(release_w, b"x")
        holder.join(10)
    assert hogged == [busy]


@needs_root
def test_a_peers_groups_are_those_it_connected_with_not_what_proc_says_later(group_server):
    # SO_PEERGROUPS, not /proc/PID/status: by the time a request is read the peer may have
    # exited, and its pid may be another process's, with other groups.
    path = group_server.path
    keep_r, keep_w = socket.socketpair()

    def connect_and_leave() -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)  # into the backlog: the server accepts nothing yet
        socket.send_fds(keep_w, [b"x"], [sock.fileno()])
        return True

    assert _as_nobody(connect_and_leave) is True  # the peer has exited and been reaped
    _, fds, _, _ = socket.recv_fds(keep_r, 1, 1)
    group_server.start()
    with socket.socket(fileno=fds[0]) as sock:
        sock.sendall(b'{"op": "ping"}\n')
        sock.settimeout(5)
        reply = json.loads(sock.recv(65536))
    keep_r.close()
    keep_w.close()

    assert reply["ok"] is True, reply


@needs_root
def test_a_peer_with_more_groups_than_the_kernel_hands_over_is_not_let_in_by_them(group_server):
    # SO_PEERGROUPS answers ERANGE past 256 groups: rather than guess from /proc, the peer's
    # supplementary groups then count for nothing (its primary one still would).
    group_server.start()
    many = (PEER_GROUP, *range(20000, 20300))

    seen = _as_nobody(lambda: shim.request("ping", group_server.path), groups=many)

    assert seen["error"]["code"] == "forbidden", seen
    assert _as_nobody(lambda: shim.request("ping", group_server.path))["ok"] is True


@needs_root
def test_without_so_peergroups_groups_come_from_proc_and_that_is_logged_once(group_server):
    server, problems = group_server.server, group_server.problems
    member = subprocess.Popen(["sleep", "30"], user=65534, group=65534, extra_groups=[PEER_GROUP])
    try:
        peer = Peer(pid=member.pid, uid=65534, gid=65534, groups=None)  # a kernel before 4.13
        granted = ("ping", "status")

        assert server.ops_for(peer, PEER_GROUP, granted) == granted
        assert server.ops_for(peer, PEER_GROUP, granted) == granted
        said = [m for m in problems.messages if "SO_PEERGROUPS" in m]
        assert len(said) == 1, problems.messages
        # Groups the kernel could not hand over (()) are never looked up in /proc instead.
        assert server.ops_for(Peer(member.pid, 65534, 65534, groups=()), PEER_GROUP, granted) == ()
    finally:
        member.kill()
        member.wait()
