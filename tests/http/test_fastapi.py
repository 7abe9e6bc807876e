from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from starlette.types import Message

from asgi_tenancy import (
    HeaderResolver,
    InMemoryTenantStore,
    IsolationConfigError,
    TenancyMiddleware,
    Tenant,
    TenantContextError,
    TenantStoreUnavailable,
    UnsafeQuery,
    current_tenant_or_none,
)
from asgi_tenancy.fastapi import TenantDatabaseLike, current_tenant, setup_tenancy, tenant_session

STORE = InMemoryTenantStore([Tenant("acme"), Tenant("globex")])


class FakeSession:
    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.closed = False


class FakeDatabase:
    """Stands in for TenantDatabase: records what the glue asks of it."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.calls: list[str] = []
        self.sessions: list[FakeSession] = []
        self.refuse = refuse

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        tenant = current_tenant_or_none()
        if tenant is None:
            raise TenantContextError()
        session = FakeSession(tenant)
        self.sessions.append(session)
        try:
            yield session
        finally:
            session.closed = True

    async def validate(self) -> None:
        self.calls.append("validate")
        if self.refuse:
            raise IsolationConfigError("the app role can bypass RLS", hint="use another role")

    async def dispose(self) -> None:
        self.calls.append("dispose")


def make_app(database: Any = None) -> FastAPI:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("app startup")
        yield
        events.append("app shutdown")

    app = FastAPI(lifespan=lifespan)
    app.state.events = events

    @app.get("/me")
    async def me(tenant: Annotated[Tenant, Depends(current_tenant)]) -> dict[str, str]:
        return {"tenant": tenant.id}

    @app.get("/health/me")
    async def health_me(tenant: Annotated[Tenant, Depends(current_tenant)]) -> dict[str, str]:
        return {"tenant": tenant.id}

    @app.get("/items")
    async def items(session: Annotated[Any, Depends(tenant_session)]) -> dict[str, str]:
        return {"session_tenant": session.tenant.id}

    @app.get("/unavailable")
    async def unavailable() -> None:
        raise TenantStoreUnavailable("store at 10.0.0.7 refused")

    @app.get("/refused")
    async def refused() -> None:
        raise UnsafeQuery("forbidden_function", "function 'set_config' is not allowed")

    @app.websocket("/health/ws")
    @app.websocket("/ws")
    async def ws(websocket: WebSocket, tenant: Annotated[Tenant, Depends(current_tenant)]) -> None:
        await websocket.accept()
        await websocket.send_text(tenant.id)
        await websocket.close()

    setup_tenancy(app, database=database)
    app.add_middleware(
        TenancyMiddleware,
        resolvers=[HeaderResolver()],
        store=STORE,
        exempt=["/health", "/openapi.json", "/docs"],
    )
    return app


async def get(app: FastAPI, path: str, tenant: str | None = None) -> httpx.Response:
    headers = {} if tenant is None else {"x-tenant-id": tenant}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(path, headers=headers)


async def lifespan(app: FastAPI, sent: list[Message] | None = None) -> list[Message]:
    """Run the ASGI lifespan protocol to the end and return what the app answered."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    inbox.put_nowait({"type": "lifespan.startup"})
    sent = [] if sent is None else sent

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            inbox.put_nowait({"type": "lifespan.shutdown"})

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await app(scope, inbox.get, send)
    return sent


async def test_current_tenant_dependency_returns_the_request_tenant() -> None:
    assert (await get(make_app(), "/me", "globex")).json() == {"tenant": "globex"}


async def test_current_tenant_on_an_exempt_route_is_a_problem_400() -> None:
    response = await get(make_app(), "/health/me", "acme")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "tenant_context"


async def test_tenant_session_yields_a_session_of_the_request_tenant() -> None:
    database = FakeDatabase()
    response = await get(make_app(database), "/items", "acme")
    assert response.json() == {"session_tenant": "acme"}
    assert [s.closed for s in database.sessions] == [True]


async def test_tenant_session_without_a_database_is_a_clear_config_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = await get(make_app(), "/items", "acme")
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "isolation_config"
    assert "setup_tenancy" not in response.text  # the hint goes to the log, not the client
    assert any("setup_tenancy" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_server_side_errors_keep_their_detail_out_of_the_response() -> None:
    response = await get(make_app(), "/unavailable", "acme")
    assert response.status_code == 503
    assert "10.0.0.7" not in response.text
    assert response.json()["code"] == "tenant_store_unavailable"


async def test_a_refused_query_carries_its_reason() -> None:
    response = await get(make_app(), "/refused", "acme")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "unsafe_query"
    assert body["reason"] == "forbidden_function"
    assert body["detail"] == "function 'set_config' is not allowed"


async def test_database_is_validated_at_startup_and_disposed_at_shutdown() -> None:
    database = FakeDatabase()
    app = make_app(database)
    sent = await lifespan(app)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert database.calls == ["validate", "dispose"]
    assert app.state.events == ["app startup", "app shutdown"]
    assert app.state.tenancy_database is database


async def test_a_database_that_fails_validation_stops_start_up() -> None:
    database = FakeDatabase(refuse=True)
    app = make_app(database)
    sent: list[Message] = []
    with pytest.raises(IsolationConfigError, match="bypass RLS"):
        await lifespan(app, sent)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert app.state.events == []


def test_setup_refuses_something_that_is_not_a_database() -> None:
    with pytest.raises(IsolationConfigError):
        setup_tenancy(FastAPI(), database=object())  # type: ignore[arg-type]
    assert isinstance(FakeDatabase(), TenantDatabaseLike)


async def test_openapi_documents_the_tenant_header() -> None:
    schema = (await get(make_app(), "/openapi.json")).json()
    parameters = schema["paths"]["/me"]["get"]["parameters"]
    assert {"name": "x-tenant-id", "in": "header"}.items() <= parameters[0].items()
    assert schema == (await get(make_app(), "/openapi.json")).json()


async def websocket(app: FastAPI, path: str, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})

    scope = {
        "type": "websocket",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "subprotocols": [],
    }
    await app(scope, inbox.get, send)
    return sent


async def test_websocket_route_gets_the_tenant() -> None:
    sent = await websocket(make_app(), "/ws", [(b"x-tenant-id", b"acme")])
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "acme"


async def test_websocket_dependency_without_a_tenant_closes_with_1008() -> None:
    sent = await websocket(make_app(), "/health/ws", [(b"x-tenant-id", b"acme")])
    assert [(m["type"], m.get("code")) for m in sent] == [("websocket.close", 1008)]
