"""Fuzzed requests through the whole application: only 200/400/401/404, never another tenant."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
from hypothesis import event, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Message

from asgi_tenancy import (
    HeaderResolver,
    InMemoryTenantStore,
    JWTClaimResolver,
    PathResolver,
    Resolver,
    SubdomainResolver,
    TenancyMiddleware,
    Tenant,
    TenantStatus,
    current_tenant,
)

KEY = b"f" * 32
STORE = InMemoryTenantStore(
    [
        Tenant("acme"),
        Tenant("globex"),
        Tenant("a.b-c_9"),
        Tenant("sleepy", TenantStatus.SUSPENDED),
        *(Tenant(f"t{i}") for i in range(100)),
    ]
)
ALLOWED = {200, 400, 401, 404}


async def whoami(request: Request) -> PlainTextResponse:
    assert request.state.tenant is current_tenant()
    return PlainTextResponse(current_tenant().id)


def app_with(*resolvers: Resolver) -> Starlette:
    app = Starlette(routes=[Route("/whoami", whoami), Route("/{rest:path}", whoami)])
    app.add_middleware(TenancyMiddleware, resolvers=list(resolvers), store=STORE)
    return app


HEADER_APP = app_with(HeaderResolver())
HOST_APP = app_with(SubdomainResolver("example.com"))
PATH_APP = app_with(PathResolver(strip=True))
TOKEN_APP = app_with(JWTClaimResolver(algorithms=["HS256"], key=KEY, claim="org_id"))
CHAIN_APP = app_with(HeaderResolver(), SubdomainResolver("example.com"), PathResolver())

KNOWN = st.one_of(
    st.sampled_from(["acme", "globex", "a.b-c_9", "sleepy", "ACME", "Acme", "acme.", "", "-"]),
    st.integers(min_value=0, max_value=130).map("t{}".format),  # t100..t130 are unknown
)
PRINTABLE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=24)
LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=24)
VALUES = st.one_of(KNOWN, PRINTABLE, LATIN1, st.builds("{}{}".format, KNOWN, PRINTABLE))


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    text: str


async def fetch(app: Any, path: str, headers: dict[str, str]) -> Answer:
    """One GET straight through the ASGI interface: any bytes a server could pass, reach it."""
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "root_path": "",
        "query_string": query.encode("latin-1", "replace"),
        "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers.items()],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 5000),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    event(f"status {start['status']}")
    body = b"".join(m.get("body", b"") for m in sent[1:])
    decoded = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    return Answer(start["status"], decoded, body.decode())


@settings(max_examples=2000)
@given(value=VALUES)
async def test_fuzz_header_values(value: str) -> None:
    response = await fetch(HEADER_APP, "/whoami", {"x-tenant-id": value})
    assert response.status_code in ALLOWED
    if response.status_code == 200:
        assert response.text == value.strip(" \t")


@settings(max_examples=2000)
@given(
    label=VALUES,
    suffix=st.sampled_from(
        [".example.com", ".EXAMPLE.com.", ".example.com:8000", ".x.example.com"]
    ),
)
async def test_fuzz_hosts(label: str, suffix: str) -> None:
    host = label + suffix
    response = await fetch(HOST_APP, "/whoami", {"host": host})
    assert response.status_code in ALLOWED
    if response.status_code == 200:
        assert host.lower().startswith(response.text + ".")
        assert response.text in {"acme", "globex"} or response.text.startswith("t")


@settings(max_examples=2000)
@given(
    segment=st.one_of(VALUES, st.builds("{}/{}".format, KNOWN, PRINTABLE)),
    rest=st.sampled_from(["", "/", "/whoami", "/x/y", "?q=1"]),
)
async def test_fuzz_paths(segment: str, rest: str) -> None:
    full = f"/t/{segment}{rest}"
    path = full.partition("?")[0]
    named = path.split("/")[2]
    response = await fetch(PATH_APP, full, {})
    if response.status_code == 307:  # '/t/acme' is redirected to '/t/acme/', as under a Mount
        assert path == f"/t/{named}"
        assert response.headers["location"].startswith(f"http://testserver/t/{named}/")
        return
    assert response.status_code in ALLOWED
    if response.status_code == 200:
        assert response.text == named


@settings(max_examples=2000)
@given(
    claim=st.one_of(VALUES, st.integers(), st.none()),
    key=st.sampled_from([KEY, KEY, b"g" * 32]),
    expired=st.booleans(),
    cut=st.one_of(st.just(0), st.integers(min_value=0, max_value=400)),
    noise=st.one_of(st.none(), PRINTABLE),
)
async def test_fuzz_tokens(
    claim: Any, key: bytes, expired: bool, cut: int, noise: str | None
) -> None:
    exp = int(time.time()) + (-60 if expired else 60)
    token = jwt.encode({"org_id": claim, "exp": exp}, key, "HS256")
    token = token[: len(token) - cut] if noise is None else noise
    response = await fetch(TOKEN_APP, "/whoami", {"authorization": f"Bearer {token}"})
    assert response.status_code in ALLOWED
    if response.status_code == 200:
        assert (cut, noise, key, expired) == (0, None, KEY, False)
        assert response.text == claim


@settings(max_examples=500)
@given(header=st.one_of(st.none(), VALUES), label=st.one_of(st.none(), VALUES))
async def test_fuzz_the_chain(header: str | None, label: str | None) -> None:
    headers = {} if header is None else {"x-tenant-id": header}
    if label is not None:
        headers["host"] = f"{label}.example.com"
    response = await fetch(CHAIN_APP, "/whoami", headers)
    assert response.status_code in ALLOWED
    if response.status_code == 200:
        named = {
            header.strip(" \t") if header is not None else None,
            label.lower() if label else None,
        }
        assert named - {None} == {response.text}
