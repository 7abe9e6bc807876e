"""FastAPI's own errors as problem+json (``problem_details=True``) and the body-size limit."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from starlette.types import Message, Receive, Scope, Send

from asgi_tenancy import (
    HeaderResolver,
    InMemoryTenantStore,
    IsolationConfigError,
    TenancyMiddleware,
    Tenant,
)
from asgi_tenancy.fastapi import setup_tenancy

STORE = InMemoryTenantStore([Tenant("acme")])
LIMIT = 1000
PROBLEM = "application/problem+json"


class Item(BaseModel):
    count: int
    name: str


def make_app(*, problem_details: bool = True, max_body_size: int | None = None) -> FastAPI:
    app = FastAPI()
    app.state.bodies = []
    app.add_middleware(TenancyMiddleware, resolvers=[HeaderResolver()], store=STORE)
    setup_tenancy(app, problem_details=problem_details, max_body_size=max_body_size)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, int]:
        if item_id == 7:
            raise HTTPException(404, "no item 7 here")
        if item_id == 8:
            raise HTTPException(409, {"reason": "locked"})
        if item_id == 9:
            raise HTTPException(503, "database at 10.0.0.7 is down")
        if item_id == 10:
            raise RuntimeError("bug with secret 10.0.0.7")
        return {"id": item_id}

    @app.delete("/items/{item_id}")
    async def delete(item_id: int) -> None: ...

    @app.post("/items")
    async def create(item: Item) -> Item:
        app.state.bodies.append(item)
        return item

    return app


async def call(
    app: FastAPI, method: str, path: str, *, content: Any = None, json_body: Any = None
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        headers = {"x-tenant-id": "acme", "content-type": "application/json"}
        return await client.request(method, path, headers=headers, content=content, json=json_body)


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"urn:asgi-tenancy:error:{code}"
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    return body


async def test_an_unknown_path_is_a_problem_404() -> None:
    problem(await call(make_app(), "GET", "/nowhere"), 404, "not_found")


async def test_an_http_exception_keeps_its_detail() -> None:
    body = problem(await call(make_app(), "GET", "/items/7"), 404, "not_found")
    assert body["detail"] == "no item 7 here"
    conflict = problem(await call(make_app(), "GET", "/items/8"), 409, "conflict")
    assert conflict["data"] == {"reason": "locked"}


async def test_server_side_errors_say_only_their_title() -> None:
    unavailable = await call(make_app(), "GET", "/items/9")
    assert problem(unavailable, 503, "service_unavailable")["detail"] == "Service unavailable"
    crashed = await call(make_app(), "GET", "/items/10")
    assert problem(crashed, 500, "internal_error")["detail"] == "Internal server error"
    assert "10.0.0.7" not in unavailable.text + crashed.text


async def test_a_wrong_method_lists_every_method_of_the_path() -> None:
    response = await call(make_app(), "PUT", "/items/3")
    problem(response, 405, "method_not_allowed")
    assert response.headers.get_list("allow") == ["DELETE, GET"]


async def test_a_validation_error_says_where_and_why_but_never_echoes_the_input() -> None:
    response = await call(
        make_app(), "POST", "/items", json_body={"count": "seven", "name": "x" * 10_000_000}
    )
    body = problem(response, 422, "request_validation")
    assert body["errors"] == [
        {
            "loc": ["body", "count"],
            "type": "int_parsing",
            "msg": "Input should be a valid integer, unable to parse string as an integer",
        }
    ]
    assert "seven" not in response.text
    assert len(response.content) < 1000


async def test_a_validation_error_lists_at_most_twenty_bounded_problems() -> None:
    app = make_app()

    @app.post("/many")
    async def many(body: dict[str, int]) -> None: ...

    keys = {f"{i:04d}-" + "k" * 5000: "not a number" for i in range(500)}
    body = problem(await call(app, "POST", "/many", json_body=keys), 422, "request_validation")
    assert body["detail"] == "500 problems with the request"
    assert len(body["errors"]) == 20
    assert all(
        len(part) <= 64 for e in body["errors"] for part in e["loc"] if isinstance(part, str)
    )


async def test_malformed_json_is_a_validation_problem() -> None:
    response = await call(make_app(), "POST", "/items", content=b'{"count": ')
    assert problem(response, 422, "request_validation")["errors"][0]["type"] == "json_invalid"


async def test_without_problem_details_fastapi_answers_as_before() -> None:
    response = await call(make_app(problem_details=False), "GET", "/nowhere")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"


async def test_a_declared_body_over_the_limit_is_refused_before_the_app_runs() -> None:
    app = make_app(max_body_size=LIMIT)
    body = json.dumps({"count": 1, "name": "x" * LIMIT}).encode()
    response = await call(app, "POST", "/items", content=body)
    assert (
        problem(response, 413, "content_too_large")["detail"]
        == f"the request body is over {LIMIT} bytes"
    )
    assert app.state.bodies == []


async def test_the_limit_answers_a_problem_even_without_problem_details() -> None:
    app = make_app(problem_details=False, max_body_size=LIMIT)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"count": 1, "name": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    problem(await call(app, "POST", "/items", content=chunks()), 413, "content_too_large")
    assert app.state.bodies == []


async def test_a_body_within_the_limit_goes_through() -> None:
    app = make_app(max_body_size=LIMIT)
    response = await call(app, "POST", "/items", json_body={"count": 2, "name": "ok"})
    assert response.status_code == 200
    assert response.json() == {"count": 2, "name": "ok"}


def test_the_limit_must_be_a_number_of_bytes() -> None:
    for bad in (-1, 1.5, "1000", True):
        app = FastAPI()
        setup_tenancy(app, max_body_size=bad)  # type: ignore[arg-type]
        with pytest.raises(IsolationConfigError):
            app.build_middleware_stack()


async def raw_post(app: FastAPI, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> int:
    """Drive the app through ASGI: the body in ``chunks``, exactly the headers given."""
    inbox: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/items",
        "raw_path": b"/items",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-tenant-id", b"acme"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }
    await app(scope, receive, send)
    status: int = sent[0]["status"]
    return status


@pytest.mark.parametrize(
    "declared",
    [b"5", b"+5", b" 5", b"0x10", b"1e9", b"-1", b"\xb2", b"9" * 5000, b"", b"10, 10"],
)
async def test_a_lying_or_malformed_content_length_never_lets_more_through(
    declared: bytes,
) -> None:
    app = make_app(max_body_size=LIMIT)
    body = json.dumps({"count": 1, "name": "x" * (2 * LIMIT)}).encode()
    status = await raw_post(app, [(b"content-length", declared)], [body[:700], body[700:]])
    assert status in (400, 413, 422)  # refused, whatever the header claims
    assert app.state.bodies == []


@given(
    size=st.integers(min_value=LIMIT - 40, max_value=LIMIT + 40),
    cuts=st.lists(st.integers(min_value=0, max_value=LIMIT + 40), max_size=6),
)
async def test_a_streamed_body_is_accepted_exactly_when_it_fits(size: int, cuts: list[int]) -> None:
    app = make_app(max_body_size=LIMIT)
    prefix, suffix = b'{"count": 1, "name": "', b'"}'
    body = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix
    bounds = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    chunks = [body[a:b] for a, b in itertools.pairwise(bounds)]
    status = await raw_post(app, [], chunks)
    assert (status == 200) == (size <= LIMIT)
    assert len(app.state.bodies) == (1 if size <= LIMIT else 0)


async def test_a_websocket_passes_the_limit_untouched() -> None:
    from asgi_tenancy._asgi import BodySizeLimit

    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def nothing() -> Message:
        return {}

    async def ignore(message: Message) -> None: ...

    await BodySizeLimit(inner, max_bytes=0)({"type": "websocket", "headers": []}, nothing, ignore)
    assert seen == ["websocket"]
