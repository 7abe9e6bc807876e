"""A throwaway Redis (Debian's ``redis-server``) on a free port of 127.0.0.1, for the job tests.

Never the system service: a server of its own in a temporary folder, no persistence, stopped
(and its folder removed) when the block ends, whatever happened inside.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NOT_INSTALLED = "redis-server not installed: apt-get install redis-server"


def binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RedisServer:
    port: int
    directory: Path

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text() if path.exists() else ""


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def running(*, timeout: float = 15.0) -> Iterator[RedisServer]:
    """Start ``redis-server``; stop it on exit (SIGTERM, then SIGKILL after 10 s)."""
    executable = binary()
    if executable is None:
        raise FileNotFoundError(NOT_INSTALLED)
    directory = Path(tempfile.mkdtemp(prefix="tenancy-redis-"))
    port = _free_port()
    command = [
        executable,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--logfile", str(directory / "redis.log"),
        "--databases", "16",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, directory)
    try:
        deadline = time.monotonic() + timeout
        while not _ping(port):  # polling for readiness, not synchronisation: we retry
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{server.log()}")
            time.sleep(0.02)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)
