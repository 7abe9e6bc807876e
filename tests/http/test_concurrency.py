"""2,000 concurrent requests across 10 tenants through a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_tenancy import (
    CachedTenantStore,
    HeaderResolver,
    InMemoryTenantStore,
    PathResolver,
    TenancyMiddleware,
    Tenant,
    current_tenant,
    current_tenant_or_none,
)

TENANTS = [Tenant(f"tenant-{i}") for i in range(10)]
REQUESTS = 2000
IN_FLIGHT = 200  # requests open at once (2,000 sockets would exceed the fd limit)
ABANDONED = 100  # clients that hang up mid-stream


@dataclass
class ScopeGauge:
    """Sits inside TenancyMiddleware: counts requests in flight and checks each one's scope."""

    app: ASGIApp
    open: int = 0
    seen: int = 0
    mismatches: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        expected = scope.get("state", {}).get("tenant")
        self.open += 1
        self.seen += 1
        try:
            if current_tenant_or_none() is not expected:
                self.mismatches.append(scope["path"])
            await self.app(scope, receive, send)
        finally:
            self.open -= 1


async def stream(request: Request) -> StreamingResponse:
    tenant = current_tenant().id
    number = request.query_params["n"]

    async def body() -> AsyncIterator[bytes]:
        for chunk in range(4):
            await asyncio.sleep(random.random() / 1000)  # let other requests interleave
            yield f"{current_tenant().id} {number} {chunk}\n".encode()

    return StreamingResponse(body(), headers={"x-tenant": tenant})


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("none" if current_tenant_or_none() is None else "leak")


@dataclass
class Served:
    port: int
    gauge: ScopeGauge
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """Ask uvicorn to exit and wait: it finishes every request in flight first."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture
def served() -> Iterator[Served]:
    app = Starlette(routes=[Route("/t/{tenant}/stream", stream), Route("/health", health)])
    gauge = ScopeGauge(app)
    store = CachedTenantStore(InMemoryTenantStore(TENANTS))
    tenancy = TenancyMiddleware(
        gauge, resolvers=[PathResolver(), HeaderResolver()], store=store, exempt=["/health"]
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # clients queue in the backlog until uvicorn accepts: no start-up race
    config = uvicorn.Config(
        tenancy, lifespan="off", log_level="warning", http="h11", loop="asyncio"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    handle = Served(sock.getsockname()[1], gauge, server, thread)
    try:
        yield handle
    finally:
        handle.stop()
        sock.close()


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def _one(port: int, gate: asyncio.Semaphore, number: int) -> tuple[str, str, list[str]]:
    """One request over a raw socket (an HTTP client's own overhead would dominate the run)."""
    tenant = TENANTS[number % len(TENANTS)].id
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET /t/{tenant}/stream?n={number} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                f"x-tenant-id: {tenant}\r\nconnection: close\r\n\r\n".encode()
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            assert head[0] == "HTTP/1.1 200 OK"
            headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
            assert headers["transfer-encoding"] == "chunked"
            lines: list[str] = []
            while chunk := await _read_chunk(reader):
                lines.extend(chunk.decode().splitlines())
                if number < ABANDONED:
                    break  # hang up mid-stream: the server must tear the scope down
        finally:
            writer.close()
        return tenant, headers["x-tenant"], lines


async def test_concurrent_requests_each_see_only_their_own_tenant(served: Served) -> None:
    gate = asyncio.Semaphore(IN_FLIGHT)
    results = await asyncio.gather(*(_one(served.port, gate, n) for n in range(REQUESTS)))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as client:
        assert (await client.get("/health")).text == "none"
    for number, (tenant, header, lines) in enumerate(results):
        assert header == tenant
        assert len(lines) == (1 if number < ABANDONED else 4)
        assert all(line.split()[:2] == [tenant, str(number)] for line in lines)
    served.stop()  # waits for requests still winding down after a hang-up
    assert served.gauge.mismatches == []
    assert served.gauge.seen == REQUESTS + 1
    assert served.gauge.open == 0
    assert current_tenant_or_none() is None
