"""A throwaway PgBouncer in transaction mode in front of the test server.

Debian's ``pgbouncer`` binary, on a free TCP port of 127.0.0.1, with a small server pool so many
clients share few server connections. ``trust`` authentication (the user must still be listed
in the auth file), like the test servers behind it. It refuses to run as root, so as root it
drops (``-u``) to the user owning the server's socket directory (pgserver's own user), or to
``postgres`` for a TCP server, and its files are made readable by that user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

from tests.conftest import APP_ROLE, PgServer

NOT_INSTALLED = "pgbouncer not installed: apt-get install pgbouncer"

# What the application needs behind transaction pooling with a PgBouncer older than 1.21 (no
# ``max_prepared_statements``): no statement cache in asyncpg nor in SQLAlchemy's dialect, and
# a name no other client can have chosen for each statement SQLAlchemy prepares.
CONNECT_ARGS: Mapping[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
}

# The settings the tests verify; ``server_reset_query_always`` is what keeps session-level
# state that raw SQL leaves on a server connection from reaching the next client.
SETTINGS: Mapping[str, str] = {
    "pool_mode": "transaction",
    "default_pool_size": "2",
    "min_pool_size": "0",
    "reserve_pool_size": "0",
    "max_client_conn": "200",
    "server_reset_query": "DISCARD ALL",
    "server_reset_query_always": "1",
    "ignore_startup_parameters": "extra_float_digits",
}


def binary() -> str | None:
    """The pgbouncer executable (Debian installs it in /usr/sbin), or ``None``."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")


def version(executable: str) -> tuple[int, ...]:
    out = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    if found is None:
        raise RuntimeError(f"unexpected pgbouncer --version output: {out.stdout!r}")
    return tuple(int(part) for part in found.groups() if part is not None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _target(admin_url: URL) -> tuple[str, int]:
    """Where the test server listens: a Unix socket directory (pgserver) or a TCP host."""
    socket_dir = admin_url.query.get("host")
    if isinstance(socket_dir, tuple):
        socket_dir = socket_dir[0]
    host = socket_dir or admin_url.host or "127.0.0.1"
    return str(host), int(admin_url.port or 5432)


@dataclass
class PgBouncer:
    """A running PgBouncer: ``url()`` gives the application's URL through it."""

    port: int
    version: tuple[int, ...]
    settings: Mapping[str, str]
    directory: Path
    process: subprocess.Popen[bytes]

    def url(self, database: str, *, username: str = APP_ROLE, password: str | None = None) -> str:
        url = URL.create(
            "postgresql+asyncpg",
            username=username,
            password=password,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )
        return url.render_as_string(hide_password=False)

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text() if path.exists() else ""


def _write_config(
    directory: Path, server: PgServer, port: int, settings: Mapping[str, str]
) -> Path:
    host, server_port = _target(server.admin_url)
    users = {APP_ROLE, server.admin_url.username or "postgres"}
    (directory / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in sorted(users)))
    lines = [
        "[databases]",
        f"* = host={host} port={server_port}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {directory / 'userlist.txt'}",
        f"logfile = {directory / 'pgbouncer.log'}",
        f"pidfile = {directory / 'pgbouncer.pid'}",
        *(f"{key} = {value}" for key, value in settings.items()),
    ]
    ini = directory / "pgbouncer.ini"
    ini.write_text("\n".join(lines) + "\n")
    return ini


async def _ready(port: int, database: str, deadline: float) -> None:
    """Poll a real connection through PgBouncer (to the server behind it) until it answers."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user=APP_ROLE,
                database=database,
                statement_cache_size=0,
                timeout=2,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            last = exc
            await asyncio.sleep(0.05)  # polling interval, not synchronisation: we retry
            continue
        try:
            await conn.execute("SELECT 1")
        finally:
            await conn.close()
        return
    raise RuntimeError(f"pgbouncer did not become ready: {last!r}")


def _unprivileged_user(server: PgServer) -> pwd.struct_passwd:
    """The owner of the server's socket directory (pgserver keeps it private), else postgres."""
    host, _ = _target(server.admin_url)
    if host.startswith("/"):
        owner = pwd.getpwuid(Path(host).stat().st_uid)
        if owner.pw_uid != 0:
            return owner
    return pwd.getpwnam("postgres")


@contextmanager
def running(
    server: PgServer, settings: Mapping[str, str] = SETTINGS, *, timeout: float = 20.0
) -> Iterator[PgBouncer]:
    """Start PgBouncer in front of ``server``; stop it (and remove its files) on exit."""
    executable = binary()
    if executable is None:
        raise FileNotFoundError(NOT_INSTALLED)
    directory = Path(tempfile.mkdtemp(prefix="tenancy-pgbouncer-"))
    command = [executable]
    if os.geteuid() == 0:  # pgbouncer refuses root: drop to a user who can reach the server
        user = _unprivileged_user(server)
        os.chown(directory, user.pw_uid, user.pw_gid)
        command += ["-u", user.pw_name]
    directory.chmod(0o755)
    port = _free_port()
    ini = _write_config(directory, server, port, settings)
    for path in directory.iterdir():
        path.chmod(0o644)
    with (directory / "stderr.log").open("wb") as output:  # never a pipe nobody drains
        process = subprocess.Popen([*command, str(ini)], stdout=output, stderr=subprocess.STDOUT)
    bouncer = PgBouncer(port, version(executable), dict(settings), directory, process)
    try:
        database = server.admin_url.database or "postgres"
        try:
            asyncio.run(_ready(port, database, time.monotonic() + timeout))
        except RuntimeError as exc:
            stderr = (directory / "stderr.log").read_text()
            raise RuntimeError(f"{exc}\n{stderr}\n{bouncer.log()}") from None
        yield bouncer
    finally:
        if process.poll() is None:
            # SIGINT is a safe shutdown that waits for server connections to go idle; SIGTERM
            # is immediate up to 1.22 (1.23 made it wait for clients, and none are left here).
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)
