"""The example API over HTTP, under every strategy: two tenants whose ids collide."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.types import Message

from examples.fastapi_app.app import create_app
from examples.fastapi_app.provision import TENANTS, open_database, tenant_database
from tests.examples.conftest import SECRET, Demo


@pytest.fixture
async def app(demo: Demo) -> AsyncIterator[FastAPI]:
    database, store = open_database(demo.db.admin_url, demo.isolation)
    application = create_app(database, store, jwt_secret=SECRET)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def stored(demo: Demo, table: str, column: str, value: object) -> set[tuple[str, str]]:
    """Where a row really is: (tenant whose storage holds it, tenant_id stamped on it)."""
    where = f"WHERE {column} = :v"
    places: list[tuple[str | None, str, str]] = []  # (storage tenant, URL, table)
    if demo.isolation in ("row", "query"):
        places.append((None, demo.db.admin_url, f"public.{table}"))
    for tenant in TENANTS:
        if demo.isolation == "schema":
            places.append((tenant, demo.db.admin_url, f"tenant_{tenant}.{table}"))
        if demo.isolation == "database":
            own = make_url(demo.db.admin_url).set(
                database=tenant_database(demo.db.admin_url, tenant)
            )
            places.append((tenant, own.render_as_string(hide_password=False), table))
    found: set[tuple[str, str]] = set()
    for storage, url, name in places:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                rows = await conn.scalars(
                    text(f"SELECT tenant_id FROM {name} {where}"), {"v": value}
                )
                found |= {(storage or stamped, stamped) for stamped in rows}
        finally:
            await engine.dispose()
    return found


def _token(org: str, **claims: object) -> str:
    payload = {"org_id": org, "aud": "demo", "exp": int(time.time()) + 60, **claims}
    return jwt.encode(payload, SECRET, "HS256")


async def test_same_id_returns_each_tenants_own_project(client: httpx.AsyncClient) -> None:
    acme = (await client.get("/projects/1", headers={"x-tenant-id": "acme"})).json()
    globex = (await client.get("/projects/1", headers={"x-tenant-id": "globex"})).json()
    assert acme["name"] == "Rocket skates"
    assert globex["name"] == "Doomsday device"
    assert {t["title"] for t in acme["tasks"]}.isdisjoint({t["title"] for t in globex["tasks"]})


async def test_create_update_delete_stay_in_tenant(client: httpx.AsyncClient, demo: Demo) -> None:
    acme = {"x-tenant-id": "acme"}
    created = await client.post("/projects", json={"name": "Tunnel paint"}, headers=acme)
    assert created.status_code == 201
    pid = created.json()["id"]
    assert (
        await client.get(f"/projects/{pid}", headers={"x-tenant-id": "globex"})
    ).status_code == 404
    renamed = await client.patch(f"/projects/{pid}", json={"name": "Tunnel"}, headers=acme)
    assert renamed.json()["name"] == "Tunnel"
    assert await stored(demo, "projects", "name", "Tunnel") == {("acme", "acme")}
    assert (
        await client.delete(f"/projects/{pid}", headers={"x-tenant-id": "globex"})
    ).status_code == 404
    assert (await client.delete(f"/projects/{pid}", headers=acme)).status_code == 204
    assert await stored(demo, "projects", "name", "Tunnel") == set()


async def test_pagination_counts_only_own_rows(client: httpx.AsyncClient) -> None:
    page = (
        await client.get("/projects?limit=1&offset=1", headers={"x-tenant-id": "globex"})
    ).json()
    assert page["total"] == 2
    assert [p["name"] for p in page["items"]] == ["Volcano lair"]


async def test_streaming_export_carries_only_own_rows(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/export", headers={"x-tenant-id": "acme"}) as response:
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    titles = {line["title"] for line in lines}
    assert "Order parts" in titles
    assert not titles & {"Hire henchmen", "Buy lava", "Scheme"}


async def test_background_task_runs_in_the_tenant(client: httpx.AsyncClient, demo: Demo) -> None:
    created = await client.post(
        "/projects/1/tasks", json={"title": "Feed sharks"}, headers={"x-tenant-id": "globex"}
    )
    assert created.status_code == 201
    message = f"task {created.json()['id']} created: Feed sharks"
    assert await stored(demo, "audit_events", "message", message) == {("globex", "globex")}


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


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert (body["status"], body["code"]) == (status, code)
    assert "acme" not in response.text
    return body


INT64 = 2**63
# Each of these is refused before any SQL (pydantic reads "1.0", " 1", "+1" as 1: in range).
BAD_IDS = ["0", "-1", str(2**31), str(INT64), str(2**64), "1e3", "1.5", "0x10", "%00", "\uff11"]
BAD_PAGES = [
    *(f"limit={v}" for v in ("0", "101", "-1", str(INT64), "x")),
    *(f"offset={v}" for v in ("-1", str(2**31), str(INT64), str(10**40), "1e9")),
]
BAD_TEXT = ["", "a\x00b", "\x00", "x" * 201]


@pytest.mark.parametrize("project_id", BAD_IDS)
async def test_an_id_out_of_range_or_malformed_is_a_422_never_a_query(
    client: httpx.AsyncClient, project_id: str
) -> None:
    acme = {"x-tenant-id": "acme"}
    for method, path, body in [
        ("GET", f"/projects/{project_id}", None),
        ("PATCH", f"/projects/{project_id}", {"name": "x"}),
        ("DELETE", f"/projects/{project_id}", None),
        ("POST", f"/projects/{project_id}/tasks", {"title": "x"}),
    ]:
        response = await client.request(method, path, json=body, headers=acme)
        problem(response, 422, "request_validation")


@pytest.mark.parametrize("query", BAD_PAGES)
async def test_a_page_out_of_range_is_a_422(client: httpx.AsyncClient, query: str) -> None:
    response = await client.get(f"/projects?{query}", headers={"x-tenant-id": "acme"})
    problem(response, 422, "request_validation")


@pytest.mark.parametrize("text", BAD_TEXT)
async def test_text_postgresql_cannot_store_is_a_422(
    client: httpx.AsyncClient, demo: Demo, text: str
) -> None:
    acme = {"x-tenant-id": "acme"}
    for method, path, body in [
        ("POST", "/projects", {"name": text}),
        ("PATCH", "/projects/1", {"name": text}),
        ("POST", "/projects/1/tasks", {"title": text}),
    ]:
        problem(
            await client.request(method, path, json=body, headers=acme), 422, "request_validation"
        )
    if text:
        response = await client.post("/reports/query", json={"sql": text}, headers=acme)
        assert response.status_code in (400, 422)
        assert response.headers["content-type"] == "application/problem+json"
    assert await stored(demo, "projects", "name", text.replace("\x00", "")) == set()


async def test_an_unpaired_surrogate_is_a_422(client: httpx.AsyncClient) -> None:
    body = b'{"name": "a\\ud800b"}'
    response = await client.post(
        "/projects",
        content=body,
        headers={"x-tenant-id": "acme", "content-type": "application/json"},
    )
    problem(response, 422, "request_validation")


async def test_a_body_over_the_limit_is_a_413(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/projects", json={"name": "x" * 300_000}, headers={"x-tenant-id": "acme"}
    )
    problem(response, 413, "content_too_large")
    assert len(response.content) < 500


async def test_fastapis_own_errors_are_problems_too(client: httpx.AsyncClient) -> None:
    acme = {"x-tenant-id": "acme"}
    problem(await client.get("/nowhere", headers=acme), 404, "not_found")
    missing = problem(await client.get("/projects/999999", headers=acme), 404, "not_found")
    assert missing["detail"] == "project not found"
    wrong = await client.put("/projects/1", headers=acme)
    problem(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "DELETE, GET, PATCH"
    problem(await client.get("/me", headers=acme), 401, "unauthorized")


async def test_every_tenant_operation_refuses_a_request_that_names_no_tenant(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    schema = app.openapi()
    checked = 0
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            url = path.replace("{project_id}", "1")
            body = (
                {"name": "x", "title": "x", "sql": "SELECT 1"}
                if "requestBody" in operation
                else None
            )
            response = await client.request(method.upper(), url, json=body)
            if "security" not in operation:
                assert path == "/health"
                assert response.status_code == 200
                continue
            problem(response, 400, "tenant_context")
            forged = await client.request(
                method.upper(),
                url,
                json=body,
                headers={"authorization": f"Bearer {_token('acme')}x"},
            )
            problem(forged, 401, "invalid_token")
            checked += 1
    assert checked == 10


@pytest.mark.parametrize(
    ("sql", "detail"),
    [
        ("SELECT 1 / 0", "division by zero"),
        ("SELECT 'x'::int", 'invalid input syntax for type integer: "x"'),
        ("SELECT 2147483647 + 1", "integer out of range"),
        ("SELECT (SELECT id FROM projects)", "more than one row returned by a subquery"),
        ("SELECT name::int FROM projects", "invalid input syntax for type integer"),
    ],
)
async def test_a_report_the_database_rejects_is_a_400_with_its_message(
    client: httpx.AsyncClient, sql: str, detail: str
) -> None:
    body = problem(await report(client, "acme", sql), 400, "guarded_query_failed")
    assert body["detail"].startswith(detail)
    again = await report(client, "acme", "SELECT count(*) AS n FROM projects")
    assert again.status_code == 200  # the session and its connection are fine afterwards


async def test_a_report_over_its_time_limit_is_a_504(client: httpx.AsyncClient) -> None:
    endless = (
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t"
    )
    response = await report(client, "acme", endless)
    problem(response, 504, "guarded_query_timeout")
    assert response.headers["retry-after"] == "1"


async def test_concurrent_requests_never_cross(client: httpx.AsyncClient) -> None:
    expected = {"acme": "Rocket skates", "globex": "Doomsday device"}

    async def one(i: int) -> bool:
        tenant = ("acme", "globex")[i % 2]
        body = (await client.get("/projects/1", headers={"x-tenant-id": tenant})).json()
        return bool(body["name"] == expected[tenant])

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert all(results)


async def report(client: httpx.AsyncClient, tenant: str, sql: str) -> httpx.Response:
    return await client.post("/reports/query", json={"sql": sql}, headers={"x-tenant-id": tenant})


async def test_a_report_returns_only_own_rows(client: httpx.AsyncClient) -> None:
    response = await report(
        client,
        "globex",
        "SELECT p.name, t.id, t.title FROM projects p JOIN tasks t ON t.project_id = p.id "
        "WHERE t.id <= 3 ORDER BY t.id",
    )
    assert response.status_code == 200
    assert response.json()["rows"] == [
        {"name": "Doomsday device", "id": 1, "title": "Hire henchmen"},
        {"name": "Doomsday device", "id": 2, "title": "Buy lava"},
        {"name": "Doomsday device", "id": 3, "title": "Scheme"},
    ]


async def test_a_union_into_another_tenant_by_its_id_stays_confined(
    client: httpx.AsyncClient,
) -> None:
    response = await report(
        client,
        "acme",
        "SELECT name FROM projects WHERE id = 1 "
        "UNION ALL SELECT name FROM projects WHERE tenant_id = 'globex' OR 1 = 1",
    )
    assert response.status_code == 200
    names = {row["name"] for row in response.json()["rows"]}
    assert "Rocket skates" in names
    assert not names & {"Doomsday device", "Volcano lair"}


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (
            "SELECT name FROM projects UNION SELECT name FROM tenant_globex.projects",
            "schema_not_allowed",
        ),
        ("SELECT relname FROM pg_catalog.pg_class", "schema_not_allowed"),
        ("SELECT usename, passwd FROM pg_shadow", "unknown_table"),
        (
            "SELECT set_config('app.tenant_id', 'globex', true), name FROM projects",
            "forbidden_function",
        ),
        ("SELECT 1; DELETE FROM projects", "multiple_statements"),
        ("DELETE FROM projects", "not_a_select"),
        ("SELECT * FROM projects FOR UPDATE", "locking_clause"),
    ],
)
async def test_an_injected_report_is_refused_with_its_reason(
    client: httpx.AsyncClient, sql: str, reason: str
) -> None:
    response = await report(client, "acme", sql)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "unsafe_query"
    assert body["reason"] == reason
    assert body["detail"]


class _Socket:
    """One websocket client driven in-process through the ASGI interface."""

    def __init__(self, app: FastAPI, tenant: str) -> None:
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: asyncio.Queue[Message] = asyncio.Queue()
        scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": "/ws/tasks",
            "raw_path": b"/ws/tasks",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test"), (b"x-tenant-id", tenant.encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("test", 80),
            "subprotocols": [],
        }
        self._inbox.put_nowait({"type": "websocket.connect"})
        self._task = asyncio.create_task(app(scope, self._inbox.get, self.sent.put))

    async def receive(self) -> Message:
        return await asyncio.wait_for(self.sent.get(), timeout=10)

    async def close(self) -> None:
        # The handler waits on its event queue, not on the client: cancel it like a server would.
        self._inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_the_websocket_pushes_task_events_only_to_its_own_tenant(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    acme, globex = _Socket(app, "acme"), _Socket(app, "globex")
    try:
        assert (await acme.receive())["type"] == "websocket.accept"
        assert (await globex.receive())["type"] == "websocket.accept"
        titles = [("acme", "Buy anvil"), ("globex", "Polish laser"), ("acme", "Drop anvil")]
        for tenant, title in titles:
            response = await client.post(
                "/projects/1/tasks", json={"title": title}, headers={"x-tenant-id": tenant}
            )
            assert response.status_code == 201
        # Events are published in order, so a leaked event would come before the tenant's own.
        got_acme = [json.loads((await acme.receive())["text"]) for _ in range(2)]
        got_globex = json.loads((await globex.receive())["text"])
    finally:
        await acme.close()
        await globex.close()
    assert [e["task"]["title"] for e in got_acme] == ["Buy anvil", "Drop anvil"]
    assert got_globex["task"]["title"] == "Polish laser"
    assert acme.sent.empty()
    assert globex.sent.empty()
