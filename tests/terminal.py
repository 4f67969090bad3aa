"""A command under a pseudo-terminal, as a user runs it: its output read as it comes, signals sent to
its whole process group as a terminal's Ctrl-C does."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class Terminal:
    def __init__(self, process: subprocess.Popen[bytes], controller: int) -> None:
        self.process = process
        self.controller = controller
        self.output = b""

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def read_until(self, text: bytes, seconds: float) -> bool:
        """Read until ``text`` shows (True), the terminal closes or ``seconds`` pass (False)."""
        deadline = time.monotonic() + seconds
        while text not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.controller], [], [], left)[0]:
                return False
            try:
                chunk = os.read(self.controller, 65536)
            except OSError:  # the process closed the terminal
                return False
            if not chunk:
                return False
            self.output += chunk
        return True

    def read_to_end(self, seconds: float) -> None:
        self.read_until(b"\x00never printed", seconds)

    def ctrl_c(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)


@contextmanager
def terminal(command: Sequence[str], env: dict[str, str] | None = None) -> Iterator[Terminal]:
    controller, child_side = pty.openpty()
    process = subprocess.Popen(
        list(command),
        stdin=child_side,
        stdout=child_side,
        stderr=child_side,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    os.close(child_side)
    try:
        yield Terminal(process, controller)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        os.close(controller)
