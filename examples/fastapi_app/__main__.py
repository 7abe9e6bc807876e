"""``python -m examples.fastapi_app``: the example API on an embedded PostgreSQL.

With no ``DATABASE_URL`` (a superuser URL) it starts PostgreSQL from the ``pgserver`` wheel in
``.tenancy-demo/`` (kept between runs), provisions two tenants whose ids collide, prints the
commands to try, and serves on http://127.0.0.1:8000 until Ctrl-C, which stops the server too.
``TENANCY_ISOLATION=row`` picks the strategy.
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


def _start_embedded() -> tuple[str, object]:
    import pgserver

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(DATA_DIR / "pgdata", cleanup_mode="stop")
    return server.get_uri(), server


def _instructions(secret: str) -> str:
    base = f"http://{HOST}:{PORT}"
    lines = ["", "asgi-tenancy example is up. Try:", ""]
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
        f"  curl -s {base}/projects                               # 400: no tenant",
        f"  curl -s -H 'x-tenant-id: initech' {base}/projects     # 404: unknown tenant",
        "",
        f"  API docs: {base}/docs    Ctrl-C stops the API and the embedded PostgreSQL.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    isolation = os.environ.get("TENANCY_ISOLATION", "row")
    server = None
    url = os.environ.get("DATABASE_URL")
    if not url:
        url, server = _start_embedded()
    else:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
    try:
        database, store = asyncio.run(provision(url, isolation))
        secret = _secret()
        app = create_app(database, store, jwt_secret=secret)
        print(_instructions(secret), flush=True)
        uvicorn.run(app, host=HOST, port=PORT, log_level="warning")
    finally:
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]
            print("embedded PostgreSQL stopped", flush=True)


if __name__ == "__main__":
    main()
