"""``python -m examples.fastapi_app``: the example API on an embedded PostgreSQL.

With no ``DATABASE_URL`` (a superuser URL) it starts PostgreSQL from the ``pgserver`` wheel in
``.tenancy-demo/`` (kept between runs), provisions two tenants whose ids collide, prints the
commands to try, and serves on http://127.0.0.1:8000 until Ctrl-C, which stops the server too.
``TENANCY_ISOLATION=row|schema|database|query`` picks the strategy (default ``row``); each gets
a database of its own on the embedded server, so switching strategies keeps every one's data.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import warnings
from pathlib import Path

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


def _start_embedded(isolation: str) -> tuple[str, object]:
    import pgserver

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(DATA_DIR / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
    url = make_url(server.get_uri()).set(database=f"tenancy_demo_{isolation}")
    return url.render_as_string(hide_password=False), server


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
        f"  API docs: {base}/docs    Ctrl-C stops the API and the embedded PostgreSQL.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    try:
        isolation = isolation_from_env(default="row")
    except IsolationConfigError as exc:
        raise SystemExit(f"{exc.message} ({exc.hint})") from None
    server = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        url, server = _start_embedded(isolation)
    else:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
    try:
        if server is not None:
            asyncio.run(_create_database(url))
        database, store = asyncio.run(provision(url, isolation))
        secret = _secret()
        app = create_app(database, store, jwt_secret=secret)
        print(_instructions(secret, isolation), flush=True)
        uvicorn.run(app, host=HOST, port=PORT, log_level="warning")
    finally:
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]
            print("embedded PostgreSQL stopped", flush=True)


if __name__ == "__main__":
    main()
