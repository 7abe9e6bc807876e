"""``python -m examples.fastapi_app``: the example API on an embedded PostgreSQL.

With no ``DATABASE_URL`` (a superuser URL) it starts PostgreSQL from the ``pgserver`` wheel in
``.tenancy-demo/`` (kept between runs), provisions two tenants whose ids collide, prints the
commands to try, and serves on http://127.0.0.1:8000 until Ctrl-C or SIGTERM (``kill``,
``docker stop``, an IDE's stop button), which stop the embedded server too. A start after a
crash (``kill -9``) takes the server over again, so the next stop stops it.
``TENANCY_ISOLATION=row|schema|database|query`` picks the strategy (default ``row``); each gets
a database of its own on the embedded server, so switching strategies keeps every one's data.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import time
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import jwt
import uvicorn
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import IsolationConfigError
from asgi_tenancy.sqlalchemy import isolation_from_env

from .app import create_app
from .provision import TENANTS, provision

DATA_DIR = Path(os.environ.get("TENANCY_DEMO_DIR", ".tenancy-demo")).resolve()
HOST, PORT = "127.0.0.1", int(os.environ.get("PORT", "8000"))


def _secret() -> str:
    path = DATA_DIR / "jwt-secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _start_embedded(isolation: str) -> tuple[str, Any]:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (as root, say)
        import pgserver

        pgdata = DATA_DIR / "pgdata"
        _forget_dead_users(pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    url = make_url(server.get_uri()).set(database=f"tenancy_demo_{isolation}")
    return url.render_as_string(hide_password=False), server


def _users_file(pgdata: Path) -> Path:
    return pgdata / ".handle_pids.json"  # pgserver's list of the processes using the server


def _forget_dead_users(pgdata: Path) -> None:
    """Drop the processes that died without saying so (``kill -9``) from pgserver's list.

    pgserver stops the server when its last user leaves; a dead pid left in the list would
    count as a user forever, so the server would never be stopped again.
    """
    import psutil  # type: ignore[import-untyped]
    from pgserver.postgres_server import PostgresServer

    path = _users_file(pgdata)
    with PostgresServer._lock:  # the lock pgserver itself takes to change the list
        try:
            pids = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _is_python(psutil, pid)]
        if alive != pids:
            path.write_text(json.dumps(alive))


def _is_python(psutil: Any, pid: int) -> bool:
    # A pid reused by another program since is not a user either.
    try:
        return "python" in psutil.Process(pid).name().lower()
    except psutil.Error:
        return False


def _stop_embedded(server: Any) -> None:
    server.cleanup()  # stops the server unless another process still uses it
    pgdata = Path(server.pgdata)
    if not (pgdata / "postmaster.pid").exists():
        print("embedded PostgreSQL stopped", flush=True)
        return
    try:
        others = json.loads(_users_file(pgdata).read_text())
    except (OSError, ValueError):
        others = []
    print(f"embedded PostgreSQL left running for processes {others}", flush=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # unwinds like Ctrl-C, so the embedded server is stopped


class _Server(uvicorn.Server):
    """Prints the commands to try once the socket listens, not before."""

    def __init__(self, config: uvicorn.Config, instructions: str) -> None:
        super().__init__(config)
        self.instructions = instructions

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.instructions, flush=True)


async def _create_database(url: str) -> None:
    """The strategy's own database on the embedded server, created on its first start."""
    name = make_url(url).database
    server = make_url(url).set(drivername="postgresql+asyncpg", database="postgres")
    engine = create_async_engine(server, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            found = await conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            )
            if not found:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()


def _instructions(secret: str, isolation: str) -> str:
    base = f"http://{HOST}:{PORT}"
    lines = ["", f"asgi-tenancy example is up (TENANCY_ISOLATION={isolation}). Try:", ""]
    for tenant in TENANTS:
        lines.append(f"  curl -s -H 'x-tenant-id: {tenant}' {base}/projects")
    token = jwt.encode(
        {"org_id": "acme", "aud": "demo", "exp": int(time.time()) + 86_400}, secret, "HS256"
    )
    lines += [
        f"  curl -s -H 'x-tenant-id: acme' {base}/projects/1        # same id, other tenant's row",
        f"  curl -s -H 'x-tenant-id: globex' {base}/projects/1",
        f"  curl -s -X POST -H 'x-tenant-id: acme' -H 'content-type: application/json' "
        f'-d \'{{"title": "Paint tunnel"}}\' {base}/projects/1/tasks',
        f"  curl -s -N -H 'x-tenant-id: globex' {base}/export",
        f"  curl -s -H 'authorization: Bearer {token}' {base}/me",
        f"  curl -s -H 'authorization: Bearer {token}' -H 'x-tenant-id: globex' {base}/me"
        "   # 400: token and header disagree",
        f"  curl -s -X POST -H 'x-tenant-id: acme' -H 'content-type: application/json' "
        f'-d \'{{"sql": "SELECT id, name FROM projects ORDER BY id"}}\' {base}/reports/query',
        f"  curl -s -X POST -H 'x-tenant-id: acme' -H 'content-type: application/json' "
        f'-d \'{{"sql": "SELECT relname FROM pg_catalog.pg_class"}}\' {base}/reports/query'
        "   # 400: schema_not_allowed",
        f"  curl -s {base}/projects                               # 400: no tenant",
        f"  curl -s -H 'x-tenant-id: initech' {base}/projects     # 404: unknown tenant",
        "",
        f"  API docs: {base}/docs    Ctrl-C (or SIGTERM) stops the API and PostgreSQL.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    try:
        isolation = isolation_from_env(default="row")
    except IsolationConfigError as exc:
        raise SystemExit(f"{exc.message} ({exc.hint})") from None
    # uvicorn handles SIGINT and SIGTERM while it serves, then raises the signal again: with
    # this handler SIGTERM ends in the `finally` below, as Ctrl-C does, not in an exit 143.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = None
    try:
        url = os.environ.get("DATABASE_URL")
        if not url:
            url, server = _start_embedded(isolation)
        else:
            DATA_DIR.mkdir(parents=True, exist_ok=True)
        if server is not None:
            asyncio.run(_create_database(url))
        database, store = asyncio.run(provision(url, isolation))
        secret = _secret()
        app = create_app(database, store, jwt_secret=secret)
        config = uvicorn.Config(app, host=HOST, port=PORT, log_level="warning")
        _Server(config, _instructions(secret, isolation)).run()
    except KeyboardInterrupt:
        pass  # Ctrl-C: a normal way to stop
    finally:
        if server is not None:
            # A second Ctrl-C must not cut the stop short.
            for handled in (signal.SIGINT, signal.SIGTERM):
                signal.signal(handled, signal.SIG_IGN)
            _stop_embedded(server)


if __name__ == "__main__":
    main()
