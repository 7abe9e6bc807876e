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
    JWTClaimResolver,
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


async def test_a_forgotten_middleware_stops_start_up() -> None:
    app = FastAPI()
    setup_tenancy(app, database=FakeDatabase())
    sent: list[Message] = []
    with pytest.raises(IsolationConfigError, match="TenancyMiddleware"):
        await lifespan(app, sent)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert app.state.tenancy_database.calls == []  # refused before validating anything


async def test_a_middleware_wrapped_around_the_app_by_hand_passes_the_start_up_check() -> None:
    database = FakeDatabase()
    app = FastAPI()
    setup_tenancy(app, database=database)
    wrapped = TenancyMiddleware(app, resolvers=[HeaderResolver()], store=STORE)
    sent = await lifespan(wrapped)  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert database.calls == ["validate", "dispose"]


async def test_without_the_middleware_a_request_is_a_server_error_not_the_clients() -> None:
    app = FastAPI()  # no lifespan run (a test client that skips it): caught per request
    setup_tenancy(app)

    @app.get("/me")
    async def me(tenant: Annotated[Tenant, Depends(current_tenant)]) -> dict[str, str]:
        return {"tenant": tenant.id}

    response = await get(app, "/me", "acme")
    assert response.status_code == 500
    assert response.json()["code"] == "isolation_config"
    assert "acme" not in response.text


def openapi(app: FastAPI) -> dict[str, Any]:
    schema = app.openapi()
    assert schema == app.openapi()  # built once, the same every time
    return schema


def jwt_app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        TenancyMiddleware,
        resolvers=[
            HeaderResolver("x-org"),
            JWTClaimResolver(algorithms=["HS256"], key=b"k" * 32, claim="org_id"),
        ],
        store=STORE,
        exempt=["/health"],
    )
    setup_tenancy(app, **options)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/items/{item_id}")
    async def item(item_id: int, body: dict[str, int]) -> dict[str, int]:
        return body

    return app


def test_openapi_has_the_header_as_a_security_scheme_and_no_header_parameter() -> None:
    schema = openapi(make_app())
    assert schema["components"]["securitySchemes"] == {
        "TenantHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "x-tenant-id",
            "description": "The tenant this request acts for.",
        }
    }
    assert schema["paths"]["/me"]["get"]["security"] == [{"TenantHeader": []}]
    for item in schema["paths"].values():
        for operation in item.values():
            names = {p["name"] for p in operation.get("parameters", [])}
            assert "x-tenant-id" not in names


def test_openapi_exempt_paths_have_no_security_and_no_tenancy_responses() -> None:
    schema = openapi(make_app())
    exempt = schema["paths"]["/health/me"]["get"]
    assert "security" not in exempt
    assert set(exempt["responses"]) == {"200"}


def test_openapi_header_or_token_are_alternatives_and_a_token_can_be_refused() -> None:
    schema = openapi(jwt_app())
    schemes = schema["components"]["securitySchemes"]
    assert schemes["TenantHeader"]["name"] == "x-org"
    assert schemes["BearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A JWT whose 'org_id' claim names the tenant.",
    }
    operation = schema["paths"]["/items/{item_id}"]["post"]
    assert operation["security"] == [{"TenantHeader": []}, {"BearerToken": []}]
    assert {"400", "401", "404", "503"} <= set(operation["responses"])
    assert "security" not in schema["paths"]["/health"]["get"]


def test_openapi_documents_the_problem_responses_with_their_schema() -> None:
    schema = openapi(make_app())
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    responses = schema["paths"]["/me"]["get"]["responses"]
    for status in ("400", "404", "503"):
        assert responses[status]["content"] == problem
        assert responses[status]["description"]
    assert "401" not in responses  # no token resolver, no 401 from the library
    assert "504" not in responses  # no database, no statement timeout
    with_database = openapi(make_app(FakeDatabase()))["paths"]["/me"]["get"]["responses"]
    assert with_database["504"]["content"] == problem
    required = schema["components"]["schemas"]["Problem"]["required"]
    assert required == ["type", "title", "status", "code", "detail"]


def test_openapi_keeps_an_operations_own_security_and_description() -> None:
    app = make_app()

    @app.get("/own", openapi_extra={"security": []}, responses={404: {"description": "gone"}})
    async def own() -> None: ...

    operation = openapi(app)["paths"]["/own"]["get"]
    assert operation["security"] == []
    assert operation["responses"]["404"]["description"] == "gone"
    assert "application/problem+json" in operation["responses"]["404"]["content"]


def test_openapi_with_problem_details_documents_422_and_413_as_problems() -> None:
    schema = openapi(jwt_app(problem_details=True, max_body_size=1024))
    responses = schema["paths"]["/items/{item_id}"]["post"]["responses"]
    assert responses["422"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/ValidationProblem"}}
    }
    assert "application/problem+json" in responses["413"]["content"]
    assert "413" not in schema["paths"]["/health"]["get"]["responses"]  # no body there
    assert "ValidationProblem" in schema["components"]["schemas"]


def test_openapi_left_alone_without_a_tenant_header() -> None:
    app = FastAPI()

    @app.get("/x")
    async def x() -> None: ...

    before = app.openapi()
    app.openapi_schema = None
    setup_tenancy(app, tenant_header=None)
    assert app.openapi() == before


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
