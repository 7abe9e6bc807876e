"""A server started as a child process, its output read by a thread so waits have deadlines."""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """One child process; ``wait_for`` reads its output up to a line, ``stop`` signals it."""

    def __init__(
        self, command: Sequence[str], *, cwd: Path, env: Mapping[str, str], port: int = 0
    ) -> None:
        self.port = port  # where it serves, when the caller chose it
        self.process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"the process ended before {text!r}:\n{''.join(self.output)}"
            self.output.append(line)
            if text in line:
                return

    def drain(self) -> str:
        """Everything the process printed so far, without waiting for more."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)  # the end stays for stop()
                break
            self.output.append(line)
        return "".join(self.output)

    def stop(self, signum: int) -> int:
        """Send ``signum``, wait for the exit, keep the rest of the output; the exit code."""
        self.process.send_signal(signum)
        code = self.process.wait(timeout=60)
        while (line := self.lines.get(timeout=10)) is not None:
            self.output.append(line)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
