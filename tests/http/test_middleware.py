from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from asgi_tenancy import (
    CachedTenantStore,
    HeaderResolver,
    InMemoryTenantStore,
    IsolationConfigError,
    JWTClaimResolver,
    PathResolver,
    Resolver,
    SubdomainResolver,
    TenancyMiddleware,
    Tenant,
    TenantNotFound,
    TenantStatus,
    TenantStoreUnavailable,
    current_tenant,
    current_tenant_or_none,
)
from asgi_tenancy.middleware import Authorize

HMAC_KEY = b"s" * 32
SECRET_ID = "secret-tenant-7"
STORE = InMemoryTenantStore(
    [Tenant("acme"), Tenant("globex"), Tenant("sleepy", TenantStatus.SUSPENDED)]
)
background_seen: list[str] = []


async def whoami(request: Request) -> JSONResponse:
    await asyncio.sleep(0)
    return JSONResponse({"tenant": current_tenant().id, "state": request.state.tenant.id})


async def stream(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(5):
            await asyncio.sleep(0)
            yield current_tenant().id.encode() + b"\n"

    return StreamingResponse(body())


async def background(request: Request) -> PlainTextResponse:
    def record() -> None:
        background_seen.append(current_tenant().id)

    return PlainTextResponse("ok", background=BackgroundTask(record))


async def health(request: Request) -> PlainTextResponse:
    tenant = current_tenant_or_none()
    return PlainTextResponse("ok" if tenant is None else "leak")


async def health_tenant(request: Request) -> PlainTextResponse:
    return PlainTextResponse(current_tenant().id)


async def url(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(request.url_for("url")))


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.receive_text()
    await websocket.send_text(current_tenant().id)
    await websocket.close()


ROUTES = [
    Route("/whoami", whoami),
    Route("/stream", stream),
    Route("/background", background),
    Route("/health", health),
    Route("/health/tenant", health_tenant),
    Route("/healthz", health),
    Route("/documents", health),
    Route("/docs", health),
    Route("/url", url, name="url"),
    WebSocketRoute("/ws", ws),
]


def make_app(
    resolvers: Sequence[Resolver] | None = None,
    *,
    store: Any = STORE,
    exempt: Sequence[str] = ("/health", "/docs"),
    authorize: Authorize | None = None,
    policy: str = "all_agree",
) -> Starlette:
    app = Starlette(routes=ROUTES)
    app.add_middleware(
        TenancyMiddleware,
        resolvers=resolvers if resolvers is not None else [HeaderResolver()],
        store=store,
        exempt=exempt,
        authorize=authorize,
        policy=policy,
    )
    return app


def client(app: Any, host: str = "testserver") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}")


async def get(
    path: str, headers: Any = None, *, app: Any = None, host: str = "testserver"
) -> httpx.Response:
    async with client(app if app is not None else make_app(), host) as c:
        return await c.get(path, headers=headers)


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "title", "status", "code", "detail"}
    assert (body["status"], body["code"]) == (status, code)
    assert SECRET_ID not in response.text
    assert "Traceback" not in response.text
    return body


async def test_header_names_the_tenant_and_scope_state_carries_it() -> None:
    response = await get("/whoami", {"x-tenant-id": "acme"})
    assert response.json() == {"tenant": "acme", "state": "acme"}


async def test_missing_identifier_is_400_never_a_default_tenant() -> None:
    assert_problem(await get("/whoami"), 400, "tenant_context")


async def test_malformed_identifier_is_400() -> None:
    assert_problem(
        await get("/whoami", {"x-tenant-id": "ac me!"}), 400, "invalid_tenant_identifier"
    )


async def test_unknown_and_suspended_tenants_get_the_same_404() -> None:
    unknown = assert_problem(
        await get("/whoami", {"x-tenant-id": SECRET_ID}), 404, "tenant_not_found"
    )
    suspended = assert_problem(
        await get("/whoami", {"x-tenant-id": "sleepy"}), 404, "tenant_not_found"
    )
    assert unknown == suspended


async def test_repeated_header_with_different_values_is_a_conflict() -> None:
    headers = [("x-tenant-id", "acme"), ("x-tenant-id", SECRET_ID)]
    assert_problem(await get("/whoami", headers), 400, "tenant_conflict")


async def test_header_and_path_disagreeing_is_a_conflict() -> None:
    app = make_app([PathResolver(strip=True), HeaderResolver()])
    response = await get("/t/acme/whoami", {"x-tenant-id": "globex"}, app=app)
    assert_problem(response, 400, "tenant_conflict")


async def test_first_match_policy_takes_the_first_resolver() -> None:
    app = make_app([PathResolver(strip=True), HeaderResolver()], policy="first_match")
    response = await get("/t/acme/whoami", {"x-tenant-id": "globex"}, app=app)
    assert response.json()["tenant"] == "acme"


async def test_first_match_never_serves_a_stripped_path_naming_another_tenant() -> None:
    app = make_app([HeaderResolver(), PathResolver(strip=True)], policy="first_match")
    response = await get("/t/acme/whoami", {"x-tenant-id": "globex"}, app=app)
    assert_problem(response, 400, "tenant_conflict")


async def test_path_prefix_is_stripped_and_urls_keep_it() -> None:
    app = make_app([PathResolver(strip=True)])
    assert (await get("/t/globex/whoami", app=app)).json()["tenant"] == "globex"
    assert (await get("/t/globex/url", app=app)).text == "http://testserver/t/globex/url"


async def test_subdomain_names_the_tenant() -> None:
    app = make_app([SubdomainResolver("example.com")])
    response = await get("/whoami", app=app, host="acme.example.com")
    assert response.json()["tenant"] == "acme"
    assert_problem(
        await get("/whoami", app=app, host="127.0.0.1"), 400, "invalid_tenant_identifier"
    )


async def test_jwt_failures_are_401_with_a_bearer_challenge() -> None:
    app = make_app([JWTClaimResolver(algorithms=["HS256"], key=HMAC_KEY, claim="org_id")])
    expired = jwt.encode({"org_id": "acme", "exp": int(time.time()) - 60}, HMAC_KEY, "HS256")
    response = await get("/whoami", {"authorization": f"Bearer {expired}"}, app=app)
    assert_problem(response, 401, "invalid_token")
    assert response.headers["www-authenticate"].startswith("Bearer")
    valid = jwt.encode({"org_id": "acme", "exp": int(time.time()) + 60}, HMAC_KEY, "HS256")
    response = await get("/whoami", {"authorization": f"Bearer {valid}"}, app=app)
    assert response.json()["tenant"] == "acme"


async def test_exempt_paths_run_without_a_tenant() -> None:
    assert (await get("/health")).text == "ok"
    assert (await get("/health", {"x-tenant-id": "acme"})).text == "ok"
    assert (await get("/docs")).text == "ok"


async def test_exempt_paths_match_whole_segments_only() -> None:
    assert_problem(await get("/healthz"), 400, "tenant_context")
    assert_problem(await get("/documents"), 400, "tenant_context")


async def test_dot_segments_are_never_exempt() -> None:
    assert_problem(await get("/health/../whoami"), 400, "tenant_context")


async def test_an_exempt_route_that_asks_for_the_tenant_gets_400() -> None:
    assert_problem(await get("/health/tenant", {"x-tenant-id": "acme"}), 400, "tenant_context")


async def test_streaming_body_is_sent_inside_the_scope() -> None:
    response = await get("/stream", {"x-tenant-id": "globex"})
    assert response.text == "globex\n" * 5
    assert current_tenant_or_none() is None


async def test_background_tasks_run_inside_the_scope() -> None:
    background_seen.clear()
    await get("/background", {"x-tenant-id": "acme"})
    assert background_seen == ["acme"]


async def test_authorize_allows_members() -> None:
    async def members_only(connection: HTTPConnection, tenant: Tenant) -> bool:
        return connection.headers.get("x-user") == "alice" and tenant.id == "acme"

    app = make_app(authorize=members_only)
    response = await get("/whoami", {"x-tenant-id": "acme", "x-user": "alice"}, app=app)
    assert response.json()["tenant"] == "acme"


async def test_non_members_get_the_same_404_as_unknown_tenants() -> None:
    app = make_app(authorize=lambda connection, tenant: False)
    denied = assert_problem(
        await get("/whoami", {"x-tenant-id": "acme"}, app=app), 404, "tenant_not_found"
    )
    unknown = assert_problem(
        await get("/whoami", {"x-tenant-id": SECRET_ID}), 404, "tenant_not_found"
    )
    assert denied == unknown


async def test_authorize_must_say_true_exactly() -> None:
    app = make_app(authorize=lambda connection, tenant: "yes")  # type: ignore[arg-type,return-value]
    assert_problem(await get("/whoami", {"x-tenant-id": "acme"}, app=app), 404, "tenant_not_found")


async def test_an_exception_in_authorize_denies_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(connection: HTTPConnection, tenant: Tenant) -> bool:
        raise RuntimeError("membership service down")

    app = make_app(authorize=broken)
    with caplog.at_level(logging.ERROR, logger="asgi_tenancy.middleware"):
        response = await get("/whoami", {"x-tenant-id": "acme"}, app=app)
    assert_problem(response, 404, "tenant_not_found")
    assert "membership service down" not in response.text
    assert any("authorize" in record.getMessage() for record in caplog.records)


class RaisingStore:
    async def get(self, tenant_id: str) -> Tenant | None:
        raise OSError("connection refused")


class OtherTenantStore:
    async def get(self, tenant_id: str) -> Tenant | None:
        return Tenant("globex")


class MalformedStore:
    async def get(self, tenant_id: str) -> Any:
        return {"id": tenant_id, "status": "active"}


class HangingStore:
    async def get(self, tenant_id: str) -> Tenant | None:
        await asyncio.Event().wait()
        return None


@pytest.mark.parametrize(
    ("store", "code"),
    [
        (RaisingStore(), "tenant_store_unavailable"),
        (OtherTenantStore(), "tenant_store_contract"),
        (MalformedStore(), "tenant_store_contract"),
        (CachedTenantStore(HangingStore(), timeout=0.01), "tenant_store_unavailable"),
    ],
)
async def test_a_buggy_store_is_503_and_nothing_is_scoped(
    store: Any, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="asgi_tenancy.middleware"):
        response = await get("/whoami", {"x-tenant-id": "acme"}, app=make_app(store=store))
    body = assert_problem(response, 503, code)
    assert body["detail"] == body["title"]
    assert [r.getMessage() for r in caplog.records] == [f"tenant request refused: {code}"]


async def test_lifespan_and_other_scopes_pass_through_untouched() -> None:
    seen: list[Scope] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    middleware = TenancyMiddleware(inner, resolvers=[HeaderResolver()], store=STORE)
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}

    async def nothing() -> Message:
        return {}

    async def ignore(message: Message) -> None:
        pass

    await middleware(scope, nothing, ignore)
    assert seen == [scope]
    assert seen[0] is scope


async def _call(app: Any, receive_messages: list[Message], fail_on_send: bool = False) -> None:
    middleware = TenancyMiddleware(app, resolvers=[HeaderResolver()], store=STORE)
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-tenant-id", b"acme")],
    }

    async def receive() -> Message:
        return receive_messages.pop(0)

    async def send(message: Message) -> None:
        if fail_on_send and message["type"] == "http.response.body":
            raise OSError("client went away")

    await middleware(scope, receive, send)


async def test_scope_is_torn_down_when_the_client_disconnects() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert current_tenant().id == "acme"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})

    with pytest.raises(OSError, match="client went away"):
        await _call(app, [], fail_on_send=True)
    assert current_tenant_or_none() is None


async def test_scope_is_torn_down_on_cancellation() -> None:
    entered = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(_call(app, []))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert current_tenant_or_none() is None


async def test_a_downstream_server_error_after_the_response_started_propagates() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await _call(app, [])
    assert current_tenant_or_none() is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resolvers": []},
        {"resolvers": [HeaderResolver()], "store": None},
        {"resolvers": [HeaderResolver()], "exempt": ["/"]},
        {"resolvers": [HeaderResolver()], "exempt": ["health"]},
        {"resolvers": [HeaderResolver()], "exempt": "/health"},
        {"resolvers": [HeaderResolver()], "exempt": ["/a/../b"]},
        {"resolvers": [HeaderResolver()], "authorize": "yes"},
        {"resolvers": [HeaderResolver()], "policy": "majority"},
    ],
)
def test_misconfiguration_is_refused_at_start_up(kwargs: dict[str, Any]) -> None:
    options = {"store": STORE, **kwargs}
    with pytest.raises(IsolationConfigError):
        TenancyMiddleware(PlainTextResponse("x"), **options)


# Websockets, driven through the ASGI interface itself


async def websocket_session(
    app: Any, headers: dict[str, str], incoming: Sequence[Message] = ()
) -> list[Message]:
    """Connect, feed ``incoming``, and return everything the application sent."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    for message in [{"type": "websocket.connect"}, *incoming]:
        inbox.put_nowait(message)
    sent: list[Message] = []
    scope: Scope = {
        "type": "websocket",
        "path": "/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "subprotocols": [],
    }

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            inbox.put_nowait({"type": "websocket.disconnect", "code": message.get("code", 1000)})

    await app(scope, inbox.get, send)
    return sent


async def test_websocket_is_held_in_the_tenant_scope_after_accept() -> None:
    incoming = [{"type": "websocket.receive", "text": "who?"}]
    sent = await websocket_session(make_app(), {"x-tenant-id": "globex"}, incoming)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "globex"


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-tenant-id": SECRET_ID}, {"x-tenant-id": "bad id"}, {"x-tenant-id": "sleepy"}],
)
async def test_websocket_failures_close_with_1008_before_accept(headers: dict[str, str]) -> None:
    sent = await websocket_session(make_app(), headers)
    assert len(sent) == 1
    assert (sent[0]["type"], sent[0]["code"]) == ("websocket.close", 1008)
    assert SECRET_ID not in sent[0]["reason"]


async def test_websocket_non_member_closes_with_1008() -> None:
    app = make_app(authorize=lambda connection, tenant: False)
    sent = await websocket_session(app, {"x-tenant-id": "acme"})
    assert [(m["type"], m.get("code")) for m in sent] == [("websocket.close", 1008)]


async def test_a_downstream_tenancy_error_before_the_response_is_a_problem() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise TenantNotFound()

    sent: list[Message] = []
    middleware = TenancyMiddleware(app, resolvers=[HeaderResolver()], store=STORE)
    scope: Scope = {"type": "http", "path": "/", "root_path": "", "query_string": b"",
                    "headers": [(b"x-tenant-id", b"acme")]}  # fmt: skip

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    assert sent[0]["status"] == 404


async def test_a_downstream_server_side_tenancy_error_is_answered_then_raised() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise TenantStoreUnavailable("pool at 10.0.0.7 exhausted")

    sent: list[Message] = []
    middleware = TenancyMiddleware(app, resolvers=[HeaderResolver()], store=STORE)
    scope: Scope = {"type": "http", "path": "/", "root_path": "", "query_string": b"",
                    "headers": [(b"x-tenant-id", b"acme")]}  # fmt: skip

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(TenantStoreUnavailable):
        await middleware(scope, receive, send)
    assert sent[0]["status"] == 503
    assert b"10.0.0.7" not in b"".join(m.get("body", b"") for m in sent)
