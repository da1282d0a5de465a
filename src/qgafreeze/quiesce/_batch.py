"""The database's command-line client (mariadb, mysql) as a child, in batch mode: statements in
on its stdin, rows out of its stdout, each answer bounded in time when asked.  Its own module so
that the MariaDB helper stays readable; not a helper itself (the leading _)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Sequence
from typing import Optional

_ERROR = re.compile(r"^ERROR (\d+)")


class Failed(Exception):
    """The app fails: the message says why, and nothing is left locked."""


class ClientError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class BatchClient:
    """The database's command-line client as a child: statements in on stdin, rows out.

    Each batch ends with a marker SELECT whose row says the batch is done; rows are tab-separated
    (--raw: the values this module selects hold no tabs or newlines), errors are ERROR lines
    (--force: the client goes on after one, so the session survives a refused KILL).
    """

    def __init__(self, program: str, extra: Sequence[str] = ()) -> None:
        # The caller's own arguments first: an option file (--defaults-file) must come first.
        argv = [program, *extra, "--batch", "--raw", "--skip-column-names", "--unbuffered"]
        argv.append("--force")
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            raise Failed(f"cannot run {program}: {exc.strerror}") from exc
        assert self.process.stdout is not None and self.process.stdin is not None
        self.fd = self.process.stdout.fileno()
        self._stdin = self.process.stdin
        self._buffer = b""
        self._batches = 0
        self._last: list[str] = []  # the client's last lines, for when it exits

    def query(self, sql: str, within: Optional[float] = None) -> list[list[str]]:
        """Its rows; with ``within``, Failed unless its answer is complete by then."""
        deadline = None if within is None else time.monotonic() + within
        self._batches += 1
        mark = f"qgafreeze-mark-{self._batches}"
        try:
            self._stdin.write(f"{sql};\nSELECT '{mark}';\n".encode())
            self._stdin.flush()
        except OSError as exc:
            raise Failed(f"the client is gone: {self.ending()}") from exc
        rows: list[list[str]] = []
        error: Optional[ClientError] = None
        while True:
            line = self._line(deadline)
            if line is None:
                raise Failed(f"the client is gone: {self.ending()}")
            if line == mark:
                break
            found = _ERROR.match(line)
            if found and error is None:
                error = ClientError(int(found.group(1)), line)
            elif not found and "\t" in line:
                rows.append(line.split("\t"))
        if error is not None:
            raise error
        return rows

    def _line(self, deadline: Optional[float] = None) -> Optional[str]:
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait is not None and not select.select([self.fd], [], [], wait)[0]:
                raise Failed("the server did not answer in time")
            data = os.read(self.fd, 65536)
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode(errors="replace").rstrip("\r")
        self._last = [*self._last[-2:], text] if text.strip() else self._last
        return text

    def ending(self) -> str:
        """The client's last words (what it printed before exiting) and its status."""
        rest = (self._last + self._buffer.decode(errors="replace").strip().splitlines())[-3:]
        try:
            status: object = self.process.wait(5)
        except subprocess.TimeoutExpired:
            status = "still running"
        return f"{' | '.join(rest) or 'no output'} (status {status})"

    def kill(self) -> None:
        """End it at once: its connection holds nothing any more (or nothing it can say)."""
        self.process.kill()
        self.process.wait()

    def close(self) -> int:
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
