"""What a held session is sent, written to its stdin by a thread of its own.

A session that stops reading (its pipe full: 64 KiB on Linux) must never block a cycle's thread
past its deadline, nor leave a lock behind that the thaw then waits on.  Only the writer thread
ever waits on the pipe, with non-blocking writes woken by select(), and it ends when the session
does (the pipe's read end closes: EPIPE) or its leader has exited.
"""

from __future__ import annotations

import os
import queue
import select
import threading
import time
from typing import IO, Callable, Optional

from .errors import ActionTimeout, CommandFailed

_TICK = 0.5  # how often a writer blocked on a full pipe looks whether the session has exited


class SessionInput:
    def __init__(self, pipe: IO[bytes], exited: Callable[[], bool], name: str) -> None:
        self._pipe = pipe
        self._exited = exited
        os.set_blocking(pipe.fileno(), False)
        self._queue: queue.SimpleQueue[Optional[bytes]] = queue.SimpleQueue()
        self._taken = threading.Condition()  # guards the three below
        self._sent = 0  # bytes given to send()
        # Bytes its pipe has accepted: all but the last 64 KiB (what a pipe holds) are read.
        self._written = 0
        self._error: Optional[str] = None
        threading.Thread(target=self._write, name=name, daemon=True).start()

    def _write(self) -> None:
        fd = self._pipe.fileno()
        while True:
            data = self._queue.get()
            if data is None:
                break
            view = memoryview(data)
            while view and self._error is None:
                if self._exited():
                    self._fail("the session exited before it read all its input")
                    break
                _, ready, _ = select.select([], [fd], [], _TICK)
                if not ready:
                    continue
                try:
                    count = os.write(fd, view)
                except BlockingIOError:
                    continue
                except OSError as exc:  # EPIPE: it closed its input or exited
                    self._fail(f"session stopped reading its input: {exc.strerror or exc}")
                    break
                view = view[count:]
                with self._taken:
                    self._written += count
                    self._taken.notify_all()
        try:
            self._pipe.close()
        except OSError:
            pass

    def _fail(self, message: str) -> None:
        with self._taken:
            self._error = message
            self._taken.notify_all()

    def unread(self) -> str:
        """A clause for error messages when its pipe has not accepted all that was sent: the
        session stopped reading (the message's "taken" is by the pipe)."""
        with self._taken:
            if self._written >= self._sent:
                return ""
            taken = f"{self._written} of the {self._sent} bytes sent were taken"
            return f"; its input was not read ({taken})"

    def send(self, text: str, deadline: Optional[float] = None) -> None:
        """Queue ``text``; with ``deadline``, return once its pipe has accepted it all (the
        session may not have read the last pipeful yet), or raise ActionTimeout at the deadline
        (CommandFailed if it can no longer read).  Without, return at once: the caller's next
        wait (for output, for the exit) bounds it."""
        if not text:
            return
        data = text.encode()
        with self._taken:
            if self._error is not None:
                raise CommandFailed(self._error)
            self._sent += len(data)
            target = self._sent
        self._queue.put(data)
        if deadline is None:
            return
        with self._taken:
            while self._written < target and self._error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ActionTimeout(
                        f"session did not read its input by its deadline{self.unread()}"
                    )
                self._taken.wait(remaining)
            if self._error is not None:
                raise CommandFailed(self._error)

    def close(self) -> None:
        """End the input once what was sent before has been written."""
        self._queue.put(None)
