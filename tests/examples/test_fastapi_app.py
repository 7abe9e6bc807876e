"""The example API over HTTP: two tenants whose ids collide, each sees only its own rows."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from examples.fastapi_app.app import create_app
from examples.fastapi_app.provision import provision
from tests.conftest import PgDatabase

SECRET = "example-test-secret-with-enough-bytes"


@pytest.fixture(params=["row"])
async def client(
    pg_database: PgDatabase, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    database, store = await provision(pg_database.admin_url, request.param)
    app = create_app(database, store, jwt_secret=SECRET)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


def _token(org: str, **claims: object) -> str:
    payload = {"org_id": org, "aud": "demo", "exp": int(time.time()) + 60, **claims}
    return jwt.encode(payload, SECRET, "HS256")


async def test_same_id_returns_each_tenants_own_project(client: httpx.AsyncClient) -> None:
    acme = (await client.get("/projects/1", headers={"x-tenant-id": "acme"})).json()
    globex = (await client.get("/projects/1", headers={"x-tenant-id": "globex"})).json()
    assert acme["name"] == "Rocket skates"
    assert globex["name"] == "Doomsday device"
    assert {t["title"] for t in acme["tasks"]}.isdisjoint({t["title"] for t in globex["tasks"]})


async def test_create_update_delete_stay_in_tenant(
    client: httpx.AsyncClient, admin_engine: AsyncEngine
) -> None:
    acme = {"x-tenant-id": "acme"}
    created = await client.post("/projects", json={"name": "Tunnel paint"}, headers=acme)
    assert created.status_code == 201
    pid = created.json()["id"]
    assert (
        await client.get(f"/projects/{pid}", headers={"x-tenant-id": "globex"})
    ).status_code == 404
    renamed = await client.patch(f"/projects/{pid}", json={"name": "Tunnel"}, headers=acme)
    assert renamed.json()["name"] == "Tunnel"
    async with admin_engine.connect() as conn:
        owner = await conn.scalar(
            text("SELECT tenant_id FROM projects WHERE id = :id"), {"id": pid}
        )
    assert owner == "acme"
    assert (
        await client.delete(f"/projects/{pid}", headers={"x-tenant-id": "globex"})
    ).status_code == 404
    assert (await client.delete(f"/projects/{pid}", headers=acme)).status_code == 204


async def test_pagination_counts_only_own_rows(client: httpx.AsyncClient) -> None:
    page = (
        await client.get("/projects?limit=1&offset=1", headers={"x-tenant-id": "globex"})
    ).json()
    assert page["total"] >= 2
    assert [p["name"] for p in page["items"]] == ["Volcano lair"]


async def test_streaming_export_carries_only_own_rows(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/export", headers={"x-tenant-id": "acme"}) as response:
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    titles = {line["title"] for line in lines}
    assert "Order parts" in titles
    assert not titles & {"Hire henchmen", "Buy lava", "Scheme"}


async def test_background_task_runs_in_the_tenant(
    client: httpx.AsyncClient, admin_engine: AsyncEngine
) -> None:
    created = await client.post(
        "/projects/1/tasks", json={"title": "Paint tunnel"}, headers={"x-tenant-id": "globex"}
    )
    assert created.status_code == 201
    task_id = created.json()["id"]
    async with admin_engine.connect() as conn:
        owner = await conn.scalar(
            text("SELECT tenant_id FROM audit_events WHERE message = :m"),
            {"m": f"task {task_id} created"},
        )
    assert owner == "globex"


async def test_token_route_and_header_must_agree(client: httpx.AsyncClient) -> None:
    bearer = {"authorization": f"Bearer {_token('acme')}"}
    assert (await client.get("/me", headers=bearer)).json() == {"tenant": "acme"}
    conflict = await client.get("/me", headers={**bearer, "x-tenant-id": "globex"})
    assert conflict.status_code == 400
    assert conflict.headers["content-type"].startswith("application/problem+json")
    forged = jwt.encode(
        {"org_id": "globex", "aud": "demo", "exp": int(time.time()) + 60},
        "another-secret-of-enough-length-123",
        "HS256",
    )
    assert (
        await client.get("/me", headers={"authorization": f"Bearer {forged}"})
    ).status_code == 401


async def test_refusals(client: httpx.AsyncClient) -> None:
    assert (await client.get("/projects")).status_code == 400
    unknown = await client.get("/projects", headers={"x-tenant-id": "initech"})
    assert unknown.status_code == 404
    assert "initech" not in unknown.text
    assert (await client.get("/projects", headers={"x-tenant-id": "bad id!"})).status_code == 400
    assert (await client.get("/health")).status_code == 200


async def test_concurrent_requests_never_cross(client: httpx.AsyncClient) -> None:
    expected = {"acme": "Rocket skates", "globex": "Doomsday device"}

    async def one(i: int) -> bool:
        tenant = ("acme", "globex")[i % 2]
        body = (await client.get("/projects/1", headers={"x-tenant-id": tenant})).json()
        return bool(body["name"] == expected[tenant])

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert all(results)
