"""Load and faults through a real uvicorn: every answer has a status, none is a 500, no row is
another tenant's and no acknowledged write is lost.

For row, schema and database per tenant (``deployments.py``: acme and globex, colliding keys),
``load_app.py`` runs in uvicorn on 127.0.0.1 with a small pool; 16 clients send mixed reads,
streamed reads and writes over HTTP while one fault is injected:

- ``kill``: every app backend is terminated every 200 ms (a crash, a failover, a restart);
- ``timeout``: a share of the requests run into a 50 ms statement timeout;
- ``exhaust``: a share of the requests hold their connection for 400 ms (a full pool);
- ``restart``: PostgreSQL restarts (``pg_ctl restart -m fast``) under the load: a server of
  the test's own, so the rest of the suite's server is left alone.

Bounded by count (``REQUESTS``) and by time; afterwards a clean round must succeed entirely.
The checks read through an admin connection: every row a tenant was shown is its own, every
acknowledged write is stored, in its tenant's table only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.adversarial.deployments import Deployment, deployed
from tests.conftest import APP_ROLE, PgServer, restartable_pgserver
from tests.examples._process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("row", "schema", "database")
FAULTS = ("kill", "timeout", "exhaust")
CLIENTS, REQUESTS, DEADLINE = 16, 480, 30.0
PROBLEMS = {  # a tenant over its share of database per tenant's pool: tenant_over_share
    503: {
        "database_unavailable",
        "tenant_capacity_exceeded",
        "database_conflict",
        "tenant_over_share",
    },
    504: {"database_timeout"},
}
_ids = itertools.count(10_000)


@dataclass
class Tally:
    statuses: dict[int, int] = field(default_factory=dict)
    codes: set[str] = field(default_factory=set)
    acknowledged: dict[str, set[int]] = field(default_factory=dict)
    foreign: list[tuple[str, str]] = field(default_factory=list)
    without_status: list[str] = field(default_factory=list)
    cut: int = 0  # streams closed mid-body after their 200
    underway: asyncio.Event = field(default_factory=asyncio.Event)  # 40 answers in

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if sum(self.statuses.values()) >= 40:
            self.underway.set()


@pytest.fixture(scope="module", params=KINDS)
def deployment(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    yield from deployed(pg_server, request.param)


_PROCESSES: dict[str, ServerProcess] = {}  # base URL -> the uvicorn serving it


def _unhandled(base: str) -> str:
    """The server's tracebacks of requests that did not get a status from the library: a
    failing test shows why (cut streams, which end after their 200, left out)."""
    process = _PROCESSES.get(base)
    if process is None:
        return "(no server output)"
    blocks = process.drain().split("Exception in ASGI application")[1:]
    kept = [b[-4000:] for b in blocks if "create_collapsing_task_group" not in b]
    return "server tracebacks:\n" + ("\n----\n".join(kept[-2:]) or "(none)")


@contextlib.contextmanager
def _served(deployment: Deployment) -> Iterator[str]:
    app_url = deployment.databases[0].app_url  # the central database under database per tenant
    tenants = {t: tenant.attributes.get("database_url") for t, tenant in deployment.tenants.items()}
    spec = {"kind": deployment.kind, "app_url": app_url, "tenants": tenants}
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "tests.adversarial.load_app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "info", "--no-access-log",
    ]  # fmt: skip
    env = {**os.environ, "TENANCY_LOAD_SPEC": json.dumps(spec)}
    process = ServerProcess(command, cwd=ROOT, env=env, port=port)
    base = f"http://127.0.0.1:{port}"
    _PROCESSES[base] = process
    try:
        process.wait_for("Application startup complete", timeout=60)
        yield base
    finally:
        del _PROCESSES[base]
        code = process.stop(signal.SIGTERM)  # uvicorn re-raises it once it has shut down
        output = "".join(process.output)
        assert code in (0, -signal.SIGTERM), output
        assert "Application shutdown complete" in output, output


@pytest.fixture(scope="module")
def server(deployment: Deployment) -> Iterator[str]:
    with _served(deployment) as base:
        yield base


async def _kill_backends(admin_url: str, stop: asyncio.Event) -> int:
    """Terminate every app backend every 200 ms until ``stop``; how many were terminated."""
    killed = 0
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            while not stop.is_set():
                terminated = await conn.scalar(
                    text(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                        " FROM pg_stat_activity WHERE usename = :r"
                    ),
                    {"r": APP_ROLE},
                )
                killed += int(terminated or 0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        await engine.dispose()
    return killed


async def _stream(client: httpx.AsyncClient, tenant: str, tally: Tally) -> httpx.Response:
    """A streamed read, line by line: the rows before a cut are checked too. A cut after the
    status (the connection closed mid-body, as uvicorn does when the stream fails) is counted,
    and only faults that end connections may cause one."""
    lines: list[str] = []
    async with client.stream("GET", "/stream", headers={"x-tenant-id": tenant}) as response:
        if response.status_code != 200:
            await response.aread()
            return response
        try:
            async for line in response.aiter_lines():
                lines.append(line)
        except httpx.RemoteProtocolError:
            tally.cut += 1
        else:
            if lines[-1:] != ["end"]:
                tally.without_status.append(f"a stream ended early and cleanly: {lines[-3:]}")
    tally.foreign += [(tenant, b) for b in lines if b != "end" and not b.startswith(f"{tenant}-")]
    return response


async def _request(
    client: httpx.AsyncClient, tenant: str, n: int, fault: str, tally: Tally
) -> None:
    headers = {"x-tenant-id": tenant}
    try:
        if fault == "timeout" and n % 4 == 0:
            response = await client.get("/slow/300", params={"timeout_ms": 50}, headers=headers)
        elif fault == "exhaust" and n % 3 == 0:
            response = await client.get("/slow/400", headers=headers)
        elif n % 5 == 1:
            response = await _stream(client, tenant, tally)
        elif n % 2 == 0:
            item = next(_ids)
            response = await client.post(f"/items/{item}", headers=headers)
            if response.status_code == 201:
                tally.acknowledged.setdefault(tenant, set()).add(item)
        else:
            response = await client.get("/items", headers=headers)
            if response.status_code == 200:
                tally.foreign += [
                    (tenant, b) for b in response.json() if not b.startswith(f"{tenant}-")
                ]
    except httpx.HTTPError as exc:  # no status at all: a dropped or cut answer
        tally.without_status.append(f"{type(exc).__name__}: {exc}")
        return
    tally.count(response.status_code)
    if response.status_code >= 500:
        assert response.headers["content-type"] == "application/problem+json", response.text
        tally.codes.add(response.json()["code"])


async def _load(
    base: str, tenants: list[str], fault: str, requests: int, tally: Tally, clients: int = CLIENTS
) -> None:
    counter = itertools.count()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=20, limits=limits) as client:

        async def worker() -> None:
            while (n := next(counter)) < requests and loop.time() < deadline:
                await _request(client, tenants[n % len(tenants)], n, fault, tally)

        await asyncio.gather(*(worker() for _ in range(clients)))


async def _stored(deployment: Deployment) -> dict[str, list[str]]:
    """Every body each tenant owns, read as the admin: by its tenant column in the shared table
    (row), else from the tenant's own table."""
    found: dict[str, list[str]] = {}
    for tenant, url in deployment.admin_urls.items():
        owned = " WHERE tenant_id = :t" if deployment.kind == "row" else ""
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                sql = f"SELECT body FROM {deployment.items[tenant]}{owned}"
                found[tenant] = list((await conn.scalars(text(sql), {"t": tenant})).all())
        finally:
            await engine.dispose()
    return found


@pytest.mark.parametrize("fault", FAULTS)
async def test_under_load_and_faults_every_answer_is_a_status_and_no_row_crosses(
    deployment: Deployment, server: str, fault: str
) -> None:
    stop = asyncio.Event()
    killer = (
        asyncio.create_task(_kill_backends(next(iter(deployment.admin_urls.values())), stop))
        if fault == "kill"
        else None
    )
    tally = Tally()
    try:
        await _load(server, sorted(deployment.tenants), fault, REQUESTS, tally)
        stop.set()
        killed = await killer if killer is not None else 0
        if fault == "kill":
            assert killed > 0
        await _check(deployment, server, fault, tally)
    except AssertionError as exc:
        exc.add_note(_unhandled(server))
        raise
    finally:
        stop.set()
        if killer is not None:
            await killer


@pytest.mark.parametrize("kind", KINDS)
def test_a_restart_under_load_answers_503_and_the_pool_heals(kind: str) -> None:
    with restartable_pgserver() as (pg, restart):
        for deployment in deployed(pg, kind):
            with _served(deployment) as base:
                asyncio.run(_restart_under_load(deployment, base, restart))


async def _restart_under_load(
    deployment: Deployment, base: str, restart: Callable[[], None]
) -> None:
    tally = Tally()

    async def restart_under_load() -> None:
        async with asyncio.timeout(DEADLINE):
            await tally.underway.wait()
        await asyncio.to_thread(restart)

    restarting = asyncio.create_task(restart_under_load())
    try:
        await _load(base, sorted(deployment.tenants), "restart", REQUESTS, tally)
        await restarting
        await _check(deployment, base, "restart", tally)
    except AssertionError as exc:
        exc.add_note(_unhandled(base))
        raise


async def _check(deployment: Deployment, server: str, fault: str, tally: Tally) -> None:
    tenants = sorted(deployment.tenants)

    clean = Tally()
    # The pool has healed: no more clients than one pool's connections (load_app.POOL), so
    # none waits for another's; any 503 now is a connection broken or held, not a queue.
    await _load(server, tenants, "none", 40, clean, clients=3)

    stored = await _stored(deployment)
    assert tally.without_status == [], tally.without_status[:5]
    assert set(tally.statuses) <= {200, 201, 503, 504}, tally.statuses
    allowed = set().union(*PROBLEMS.values())
    assert tally.codes <= allowed, tally.codes
    assert tally.foreign == [], tally.foreign[:5]
    for tenant in tenants:
        owner = f"{tenant}-"
        assert all(body.startswith(owner) for body in stored[tenant]), "a write crossed tenants"
        for source in (tally, clean):
            written = {f"{tenant}-w-{i}" for i in source.acknowledged.get(tenant, ())}
            assert written <= set(stored[tenant]), "an acknowledged write was lost"
    assert set(clean.statuses) <= {200, 201}, (clean.statuses, clean.codes)
    assert clean.without_status == []
    assert clean.cut == 0
    if fault not in ("kill", "restart"):
        assert tally.cut == 0  # a full pool or a timeout is answered before the status
    # The fault did happen, and the load ran through it.
    assert tally.statuses.get(200, 0) + tally.statuses.get(201, 0) > 0
    if fault == "timeout":
        assert "database_timeout" in tally.codes
    if fault == "restart":
        assert "database_unavailable" in tally.codes
