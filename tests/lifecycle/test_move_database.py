"""Moving a DatabasePerTenant tenant to a second PostgreSQL server while it serves.

Readers of the moving tenant and of its neighbour (keys colliding) run throughout through the
real request path (the registry read by ``SqlAlchemyTenantStore``, then a ``TenantDatabase``
session as the app role), and a writer commits all along: zero wrong answers, zero reader
errors, every write acknowledged is on the target afterwards (read as the admin), the
source is dropped and the registry switched. A move that fails leaves everything on the source.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from io import StringIO
from typing import Any

import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table, Text, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import (
    CachedTenantStore,
    IsolationConfigError,
    TenancyUnavailable,
    Tenant,
    tenant_scope,
)
from asgi_tenancy.cli import EXIT_OK, main
from asgi_tenancy.errors import TenantPlacementError
from asgi_tenancy.operations import TenantProvisioner
from asgi_tenancy.sqlalchemy import DatabasePerTenant, SqlAlchemyTenantStore, TenantDatabase
from asgi_tenancy.sqlalchemy.database_per_tenant import move as move_module
from asgi_tenancy.sqlalchemy.database_per_tenant.databases import url_target
from asgi_tenancy.sqlalchemy.moves import TenantMove
from tests.conftest import (
    APP_PASSWORD,
    APP_ROLE,
    PgDatabase,
    PgServer,
    _admin_execute,
    restartable_pgserver,
)
from tests.lifecycle.conftest import RUN, Provision
from tests.lifecycle.conftest import metadata as cli_metadata

ROWS = 2000

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("body", Text, nullable=False),
)
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),  # serial: its sequence must move too
    Column("note_id", Integer, ForeignKey("notes.id"), nullable=False),
    Column("body", Text, nullable=False),
)


@pytest.fixture(scope="module")
def second_server() -> Iterator[PgServer]:
    """A PostgreSQL of the module's own: where tenants move to (it has the app role)."""
    with restartable_pgserver() as (server, _):
        asyncio.run(
            _admin_execute(
                server,
                "postgres",
                "ALTER SYSTEM SET fsync = off",  # a scratch server: durability buys nothing
                "SELECT pg_reload_conf()",
            )
        )
        yield server


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def _to(server: PgServer) -> str:
    return server.admin_url.render_as_string(hide_password=False)


async def _seed(provisioner: TenantProvisioner, tenant: Tenant, owner: str) -> None:
    """Colliding keys in every tenant: notes 1..ROWS and events 1..ROWS (by the sequence)."""
    url = provisioner.placement.target(tenant, provisioner.context)
    assert url is not None
    engine = create_async_engine(url.url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO notes SELECT i, :o || '-note-' || i FROM generate_series(1, :n) i"
                ),
                {"o": owner, "n": ROWS},
            )
            await conn.execute(
                text(
                    "INSERT INTO events (note_id, body) SELECT i, :o || '-event-' || i"
                    " FROM generate_series(1, :n) i"
                ),
                {"o": owner, "n": ROWS},
            )
    finally:
        await engine.dispose()


async def _database_exists(url: str, name: str) -> bool:
    engine = create_async_engine(
        make_url(url).set(drivername="postgresql+asyncpg", database="postgres")
    )
    try:
        async with engine.connect() as conn:
            found = await conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            )
            return found is not None
    finally:
        await engine.dispose()


async def _read(url: str, sql: str) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql))).all())
    finally:
        await engine.dispose()


@pytest.fixture
async def world(
    provision: Provision, lifecycle_database: PgDatabase
) -> AsyncIterator[dict[str, Any]]:
    """Two tenants on the session's server, seeded, and the app's request path."""
    provisioner = provision(DatabasePerTenant(), metadata=metadata)
    mover = await provisioner.create_tenant(_id("mv"))
    neighbour = await provisioner.create_tenant(_id("nb"))
    await _seed(provisioner, mover, "mover")
    await _seed(provisioner, neighbour, "neighbour")
    store_engine = create_async_engine(lifecycle_database.app_url)
    db = TenantDatabase(lifecycle_database.app_url, DatabasePerTenant())
    await db.validate()
    try:
        yield {
            "provisioner": provisioner,
            "mover": mover.id,
            "neighbour": neighbour.id,
            "store": SqlAlchemyTenantStore(store_engine),
            "db": db,
        }
    finally:
        await db.dispose()
        await store_engine.dispose()


def _truth(owner: str) -> dict[int, str]:
    return {i: f"{owner}-note-{i}" for i in range(1, ROWS + 1)}


async def _notes(store: Any, db: TenantDatabase, tenant_id: str) -> dict[int, str]:
    tenant = await store.get(tenant_id)
    async with tenant_scope(tenant), db.session() as s:
        return dict((await s.execute(select(notes.c.id, notes.c.body))).all())  # type: ignore[arg-type]


async def _write(store: Any, db: TenantDatabase, tenant_id: str, body: str) -> int:
    tenant = await store.get(tenant_id)
    async with tenant_scope(tenant), db.session() as s:
        new = await s.scalar(events.insert().values(note_id=1, body=body).returning(events.c.id))
        await s.commit()
    return int(new)  # type: ignore[arg-type]


async def test_a_tenant_moves_to_another_server_while_readers_and_a_writer_run(
    world: dict[str, Any], second_server: PgServer, lifecycle_database: PgDatabase
) -> None:
    provisioner: TenantProvisioner = world["provisioner"]
    store, db = world["store"], world["db"]
    mover, neighbour = world["mover"], world["neighbour"]
    name = f"{RUN}_{mover}"
    owners = {mover: "mover", neighbour: "neighbour"}
    moving, done, wrote = asyncio.Event(), asyncio.Event(), asyncio.Event()
    reads = {"during": 0, "wrong": 0}
    reader_errors: list[BaseException] = []
    writer_errors: list[BaseException] = []
    written: dict[int, str] = {}
    steps: list[str] = []

    async def reader(tenant_id: str) -> None:
        while not done.is_set():
            try:
                got = await _notes(store, db, tenant_id)
            except Exception as exc:  # counted and asserted on below, never swallowed
                reader_errors.append(exc)
                continue
            if got != _truth(owners[tenant_id]):
                reads["wrong"] += 1
            if moving.is_set():
                reads["during"] += 1

    async def writer() -> None:
        n = 0
        while not done.is_set():
            body = f"write-{n}"
            n += 1
            try:
                written[await _write(store, db, mover, body)] = body  # acknowledged
            except Exception as exc:
                writer_errors.append(exc)
                continue
            wrote.set()

    async def move() -> TenantMove:
        await wrote.wait()  # the writer is committing before the move starts
        moving.set()
        try:
            return await provisioner.move_tenant(mover, _to(second_server), progress=steps.append)
        finally:
            done.set()

    result, *_ = await asyncio.gather(
        move(), reader(mover), reader(mover), reader(neighbour), writer()
    )
    # After the switch the request path reaches the target: its sequence went along.
    for i in range(3):
        body = f"after-{i}"
        written[await _write(store, db, mover, body)] = body

    assert reader_errors == []
    assert reads["wrong"] == 0
    assert reads["during"] > 0
    # A write waiting on the source when it was dropped fails with a 503, never acknowledged.
    assert all(isinstance(e, TenancyUnavailable) for e in writer_errors), writer_errors
    assert len(writer_errors) <= 1
    assert result.checksums_match is True
    assert result.rows_before == result.rows_after
    assert result.rows_after["notes"] == ROWS
    assert len(steps) >= 5
    # Read back as the admin: every acknowledged write is on the target, the source is gone.
    target_url = second_server.url(name)
    moved_events = dict(await _read(target_url, "SELECT id, body FROM events"))
    assert written.items() <= moved_events.items()
    assert len(moved_events) == ROWS + len(written)
    assert dict(await _read(target_url, "SELECT id, body FROM notes")) == _truth("mover")
    assert not await _database_exists(lifecycle_database.admin_url, name)
    registry = await provisioner.get(mover)
    assert registry is not None
    moved_to = url_target(make_url(registry.attributes["database_url"]))
    assert moved_to[:3] == url_target(second_server.admin_url)[:3]
    assert registry.attributes["database"] == name
    # The neighbour never moved and kept its rows.
    assert await _database_exists(lifecycle_database.admin_url, f"{RUN}_{neighbour}")
    assert await _notes(store, db, neighbour) == _truth("neighbour")
    # The moved database has the provisioning grants: the app role reads, owns nothing.
    owner = await _read(
        target_url, "SELECT tableowner FROM pg_tables WHERE tablename IN ('notes', 'events')"
    )
    assert {row[0] for row in owner} == {second_server.admin_url.username}


@pytest.mark.parametrize("failure", ["mismatch", "target_fails"])
async def test_a_failed_move_leaves_everything_on_the_source(
    world: dict[str, Any],
    second_server: PgServer,
    lifecycle_database: PgDatabase,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    provisioner: TenantProvisioner = world["provisioner"]
    store, db, mover = world["store"], world["db"], world["mover"]
    name = f"{RUN}_{mover}"
    before = await provisioner.get(mover)
    real = move_module._copy_table

    async def broken(source: Any, sink: Any, table: Any) -> None:
        if table.name != "events":
            await real(source, sink, table)
        elif failure == "target_fails":  # the target ends the copy's session mid-way
            await sink.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        # "mismatch": the events rows never arrive, and the fingerprint must see it

    monkeypatch.setattr(move_module, "_copy_table", broken)
    with pytest.raises(TenantPlacementError, match="undone"):
        await provisioner.move_tenant(mover, _to(second_server))
    assert not await _database_exists(_to(second_server), name)
    assert await _database_exists(lifecycle_database.admin_url, name)
    assert await provisioner.get(mover) == before
    # The lock is gone: the tenant reads and writes on its source as before.
    assert await _notes(store, db, mover) == _truth("mover")
    await _write(store, db, mover, "after-abort")


async def test_moves_are_refused_before_anything_is_made(
    world: dict[str, Any], second_server: PgServer, pg_server: PgServer, provision: Provision
) -> None:
    provisioner: TenantProvisioner = world["provisioner"]
    mover = world["mover"]
    name = f"{RUN}_{mover}"
    with pytest.raises(IsolationConfigError):  # the server it is on already
        await provisioner.move_tenant(mover, _to(pg_server))
    with pytest.raises(TenantPlacementError):  # nothing listens there
        await provisioner.move_tenant(mover, "postgresql://postgres@127.0.0.1:1/postgres")
    with pytest.raises(IsolationConfigError):
        await provisioner.move_tenant(mover, "not a url")
    await _admin_execute(second_server, "postgres", f'CREATE DATABASE "{name}"')
    try:
        with pytest.raises(TenantPlacementError, match="exists on the target"):
            await provisioner.move_tenant(mover, _to(second_server))
    finally:
        await _admin_execute(second_server, "postgres", f'DROP DATABASE "{name}"')
    computed = DatabasePerTenant(url_for=lambda t: "postgresql+asyncpg://x@h/db")
    with pytest.raises(IsolationConfigError, match="url_for"):
        await provision(computed, metadata=metadata).move_tenant(mover, _to(second_server))
    assert await provisioner.get(mover) is not None


async def test_a_stale_record_gets_a_503_never_the_old_database_and_the_tenant_drops_there(
    world: dict[str, Any], second_server: PgServer
) -> None:
    provisioner: TenantProvisioner = world["provisioner"]
    db, mover = world["db"], world["mover"]
    cached = CachedTenantStore(world["store"], ttl=60)
    assert await _notes(cached, db, mover) == _truth("mover")  # cached: the old URL
    await provisioner.move_tenant(mover, _to(second_server))
    with pytest.raises(TenancyUnavailable):
        await _notes(cached, db, mover)
    cached.invalidate(mover)  # what the TTL does at the latest
    assert await _notes(cached, db, mover) == _truth("mover")
    # The provisioner drops a moved tenant on the server it is on now.
    await db.dispose()
    await provisioner.drop_tenant(mover, confirm=True)
    assert not await _database_exists(_to(second_server), f"{RUN}_{mover}")
    assert await provisioner.get(mover) is None


def test_the_cli_prints_the_plan_then_moves_with_json(
    lifecycle_database: PgDatabase,
    second_server: PgServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant_id = _id("cli")
    name = f"{RUN}_{tenant_id}"

    async def create() -> None:  # an engine of this event loop's own (the CLI runs its own)
        admin = create_async_engine(lifecycle_database.admin_url)
        try:
            await TenantProvisioner(
                admin,
                DatabasePerTenant(),
                app_role=APP_ROLE,
                metadata=cli_metadata,
                app_url=lifecycle_database.app_url,
                database_naming=f"{RUN}_{{id}}",
            ).create_tenant(tenant_id)
        finally:
            await admin.dispose()

    asyncio.run(create())
    monkeypatch.setenv("LIFECYCLE_ADMIN_URL", lifecycle_database.admin_url)
    monkeypatch.setenv("LIFECYCLE_APP_URL", lifecycle_database.app_url)
    monkeypatch.setenv("LIFECYCLE_STRATEGY", "database")
    app = ("--app", "tests.lifecycle.cli_app:provisioner")
    argv = ["tenants", "move", tenant_id, "--to", _to(second_server)]

    out = StringIO()
    assert main([*argv, "--dry-run", "--json", *app], out) == EXIT_OK
    plan = json.loads(out.getvalue())["move"]
    assert plan["dry_run"] is True
    assert any("LOCK TABLE" in s for s in plan["statements"])
    assert APP_PASSWORD not in out.getvalue()  # reports name servers without passwords
    assert not asyncio.run(_database_exists(_to(second_server), name))

    out = StringIO()
    assert main([*argv, "--dry-run", *app], out) == EXIT_OK
    assert out.getvalue().startswith(f"would move {tenant_id} from ")

    out = StringIO()
    assert main([*argv, "--json", *app], out) == EXIT_OK
    body = json.loads(out.getvalue())
    assert body["ok"] is True
    assert body["move"]["checksums_match"] is True
    assert body["move"]["rows_after"] == {"notes": 0}
    assert asyncio.run(_database_exists(_to(second_server), name))
    assert not asyncio.run(_database_exists(lifecycle_database.admin_url, name))


async def test_a_move_that_cannot_pause_writes_in_time_is_undone(
    world: dict[str, Any],
    second_server: PgServer,
    lifecycle_database: PgDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provisioner: TenantProvisioner = world["provisioner"]
    store, db, mover = world["store"], world["db"], world["mover"]
    name = f"{RUN}_{mover}"
    before = await provisioner.get(mover)
    monkeypatch.setattr(move_module, "LOCK_TIMEOUT", "200ms")
    tenant = await store.get(mover)
    async with tenant_scope(tenant), db.session() as s:  # a write left open on the source
        await s.execute(text("UPDATE notes SET body = body WHERE id = 1"))
        with pytest.raises(TenantPlacementError, match="did not pause"):
            await provisioner.move_tenant(mover, _to(second_server))
        await s.rollback()
    assert not await _database_exists(_to(second_server), name)
    assert await provisioner.get(mover) == before
    assert await _notes(store, db, mover) == _truth("mover")
