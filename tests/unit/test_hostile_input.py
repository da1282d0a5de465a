"""Input nobody should send, sent anyway: generated config documents and a flood of clients."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgafreeze import schema, shim
from qgafreeze.config import parse_text
from qgafreeze.errors import ConfigError
from qgafreeze.server import Peer, Send, Server, bind_listener

# Every key the schema declares or has removed, at any level, and app names, mixed with junk, so
# that documents get deep into validation.  Taken from the schema: a key added there, or removed
# from it, is fuzzed here too, as is the value a removed key is ignored with.
REMOVED = [old for section in schema.SECTIONS for old in section.removed]
SCHEMA_KEYS = sorted(
    {key.name for section in schema.SECTIONS for key in section.keys} | {o.name for o in REMOVED}
)
APP_NAMES = ["db", "web", "mariadb", "x"]
KEYS = st.sampled_from(SCHEMA_KEYS + APP_NAMES) | st.text(min_size=1, max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(
        [
            "30s",
            "500ms",
            "2m",
            "-1s",
            "abort",
            "continue",
            "stop",
            "freeze",
            "mariadb",
            "postgresql",
            "USR1",
            "/bin/true",
            "[",
            "a.service",
            "db",
            *(old.harmless for old in REMOVED if old.harmless is not None),
        ]
    )
    | st.text(max_size=12)
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)
# Every problem starts with where it is: a path (apps.db.units[0], apps['odd key']) or a line.
PATH_OR_LINE = re.compile(
    r"^(line \d+, column \d+: |not valid YAML: |expected a mapping at the top level"
    r"|[\[A-Za-z0-9_].*?: )",
    re.S,
)


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(DOCUMENTS)
def test_generated_documents_load_or_fail_cleanly_with_a_path(document: Any) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        parse_text(text)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert isinstance(problem, str) and problem
            assert PATH_OR_LINE.match(problem), problem
    # Any other exception type fails the test: that would be a traceback for a user.


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(max_size=200))
def test_arbitrary_text_loads_or_fails_cleanly(text: str) -> None:
    try:
        parse_text(text)
    except ConfigError as exc:
        assert exc.problems


class SlowHandler:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.in_cycle = threading.Event()

    def __call__(self, request: dict[str, Any], peer: Peer, send: Send) -> dict[str, Any]:
        if request["op"] == "freeze":
            send({"accepted": True, "op": "freeze", "timeout_ms": 10000})
            self.in_cycle.set()
            self.release.wait(10)
            return {"ok": True, "op": "freeze", "state": "frozen"}
        return {"ok": True, "op": request["op"], "state": "freezing"}


class Problems:
    def problem(self, message: str, cycle: str = "", detail: str = "") -> None:
        pass


def test_a_flood_of_clients_neither_stops_the_daemon_nor_disturbs_a_cycle():
    base = tempfile.mkdtemp(prefix="qgft-flood-")
    path = os.path.join(base, "q.sock")
    handler = SlowHandler()
    server = Server(bind_listener(path), handler, Problems(), request_timeout=1.0)
    stop = threading.Event()
    serving = threading.Thread(target=server.serve, args=(stop.is_set,), daemon=True)
    serving.start()
    freeze_reply: list[dict[str, Any]] = []
    cycle = threading.Thread(target=lambda: freeze_reply.append(shim.request("freeze", path)))
    cycle.start()
    try:
        assert handler.in_cycle.wait(5)
        # 300 clients at once: silent ones, garbage, huge lines, and polite ones.
        clients = []
        for index in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            kind = index % 4
            if kind == 1:
                sock.sendall(b"\x00\xffgarbage\n")
            elif kind == 2:
                try:
                    sock.sendall(b"x" * 100_000)
                except OSError:
                    pass
            elif kind == 3:
                sock.sendall(b'{"op": "ping"}\n')
            clients.append(sock)
        answered = 0
        for sock in clients:
            sock.settimeout(10)
            try:
                if sock.recv(4096):
                    answered += 1
            except OSError:
                pass
            sock.close()
        assert answered == 300  # each got an error, a reply or "busy", none hung
        assert shim.request("ping", path)["ok"]  # still responsive afterwards
        handler.release.set()
        cycle.join(10)
        assert freeze_reply == [{"ok": True, "op": "freeze", "state": "frozen"}]
    finally:
        handler.release.set()
        stop.set()
        server.wake()
        serving.join(5)
        shutil.rmtree(base, ignore_errors=True)
