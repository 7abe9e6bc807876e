"""Moving one DatabasePerTenant tenant to another PostgreSQL server while it keeps serving reads.

The steps, each reported to ``progress``:

1. **Check** (``move_plan.py``; a dry run stops here): the tenant's URL is its registry
   attribute (not ``url_for``, which the library cannot rewrite); its database carries the
   tenant's marker; ``to`` (the target server's admin URL) is reachable, is another server (its
   ``system_identifier`` differs), has the tenant's role and no database of that name; the
   source holds exactly the provisioner's ``metadata`` tables (plus ``alembic_version``).
2. **Create** the target database as provisioning does (``build_database``: marker, ``CONNECT``
   for the serving role only, tables from ``metadata`` owned by the admin, DML grants), and an
   ``alembic_version`` table when the source has one. Each table's columns and types, and the
   sequences, must then match the source's, or the move stops.
3. **Pause writes**: ``LOCK TABLE ... IN EXCLUSIVE MODE`` on every table of the source, in one
   transaction held until the source is gone. Reads go on; writes wait (``lock_timeout``
   bounds how long the move waits for writes already running).
4. **Copy** each table with binary ``COPY`` streamed from the source connection to the target
   (asyncpg, in dependency order, one target transaction), with explicit column lists, then
   each sequence (``setval``) and ``alembic_version``, so migrations know the revision.
   ``COPY`` over ``pg_dump``/``pg_restore``: no client binaries matched to the server's version
   on the application's machines, the copy runs under the lock this move holds (``pg_dump``
   would be another session), and the target is made exactly as provisioning makes it, with
   the same owner and grants. The price: only what ``metadata`` creates is rebuilt (triggers,
   functions or indexes that migrations added alone are not), and the check of step 2 refuses a
   source whose tables differ.
5. **Verify**: ``moves.fingerprint`` (row count and checksum per table, rows read as text under
   fixed ``TimeZone``/``DateStyle``/``extra_float_digits``) on the locked source and the
   committed target. Any difference aborts.
6. **Switch** the registry row's URL attribute to the target (the row locked; refused if it
   changed meanwhile), still under the lock.
7. **Drain and drop** the source: the writers waiting on the lock are terminated at once
   (they could only ever commit on the source; their driver error becomes the library's 503,
   ``DatabaseUnavailable``); reads in flight finish: the move waits (at most
   ``DRAIN_SECONDS``) until two polls in a row find no session of the source running anything
   but a wait on its lock. Then new connections are refused (``ALLOW_CONNECTIONS false``),
   the remaining sessions ended, and ``DROP DATABASE ... WITH (FORCE)`` ends the lock holder
   last. A failure after the switch still fences the source before the lock can go.

Fail closed: anything before the switch that fails (a mismatch, the target failing, a lock
not granted in time) removes the target database and releases the lock, and is raised as a
``TenantPlacementError``; the registry still points at the source, which is untouched. A
switch whose commit went unconfirmed is read back first: if it took, the move goes on. The
source is dropped last, only once verified and switched. A write acknowledged before the
switch committed before the lock was granted, so it was copied and verified.

After the switch, a process serving requests reaches the target as soon as it reads the
tenant again: at once with ``SqlAlchemyTenantStore``, within ``CachedTenantStore``'s ``ttl``
(or at once after ``invalidate``). ``DatabasePerTenant``'s engines and placement memo are
keyed by the URL, so the new URL gets a new engine; the old one (its connections ended by the
drop) is never leased again and leaves the LRU cache when its slot is needed. Until then a
process that still holds the old record reads the source while it drains (pre-switch data,
writes waiting), and gets a 503 once it is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ...errors import TenancyError, TenantPlacementError
from ...tenant import Tenant, TenantStatus
from ..failures import describe, sqlstate
from ..moves import Fingerprint, Progress, TenantMove, fingerprint, rows
from ..placement import PlacementContext
from ..postgres import owned_by, quote_ident, quote_literal
from .databases import build_database, drop_database
from .move_plan import (
    ALEMBIC_DDL,
    LOCK_TIMEOUT,
    CopiedTable,
    MovePlan,
    check_shape,
    plan_move,
    shown,
)

if TYPE_CHECKING:
    from .strategy import DatabasePerTenant

__all__ = ["DRAIN_SECONDS", "LOCK_TIMEOUT", "move_database"]

#: How long the source may keep serving reads after the switch before it is dropped anyway
#: (``CachedTenantStore``'s default ``ttl``: processes holding the old record read it meanwhile).
DRAIN_SECONDS = 60.0
_DRAIN_POLL = 0.05
_STABLE_TEXT = (
    "SET LOCAL TimeZone = 'UTC'",
    "SET LOCAL DateStyle = 'ISO, YMD'",
    "SET LOCAL IntervalStyle = 'postgres'",
    "SET LOCAL extra_float_digits = 3",
    "SET LOCAL bytea_output = 'hex'",
)

_BUSY_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"
    " AND pid <> :holder AND state IN ('active', 'idle in transaction', 'fastpath function call')"
    " AND NOT (CAST(:holder AS integer) = ANY (pg_blocking_pids(pid)))"
)


async def move_database(
    strategy: DatabasePerTenant,
    context: PlacementContext,
    tenant: Tenant,
    to: str,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> TenantMove:
    """Move ``tenant``'s database to the server whose admin URL is ``to`` (module doc)."""
    say = progress or (lambda _: None)
    started = time.perf_counter()
    plan = await plan_move(strategy, context, tenant, to)
    if dry_run:
        return plan.move
    say(f"creating database {plan.database} on {shown(plan.target_server)}")
    target_server = create_async_engine(plan.target_server, poolclass=NullPool)
    source = create_async_engine(plan.source_admin, poolclass=NullPool)
    source_server = create_async_engine(plan.source_server, poolclass=NullPool)
    try:
        extra = (ALEMBIC_DDL,) if plan.alembic else ()
        try:
            await build_database(
                target_server, plan.database, tenant.id, plan.grantee, context.metadata, extra=extra
            )
        except TenancyError:
            raise
        except Exception as exc:  # it removed what it made; nothing else was touched
            raise TenantPlacementError(
                "creating the tenant's database on the target failed: nothing was moved",
                hint=describe(exc),
            ) from exc
        target = create_async_engine(plan.target_server.set(database=plan.database))
        try:
            return await _copy_switch_drop(
                plan, context, strategy, source, source_server, target, target_server, say, started
            )
        finally:
            await target.dispose()
    finally:
        for engine in (target_server, source, source_server):
            await engine.dispose()


async def _copy_switch_drop(
    plan: MovePlan,
    context: PlacementContext,
    strategy: DatabasePerTenant,
    source: AsyncEngine,
    source_server: AsyncEngine,
    target: AsyncEngine,
    target_server: AsyncEngine,
    say: Progress,
    started: float,
) -> TenantMove:
    switched = False
    try:
        await check_shape(plan, target)
        async with source.connect() as held:
            say(f"pausing writes: locking {len(plan.tables)} tables on the source")
            holder = await _lock(held, plan)
            paused = time.perf_counter()
            before = await _fingerprint(held, plan)
            values = await _sequence_values(held, plan)
            say(f"copying {sum(n for n, _ in before.values())} rows in {len(plan.tables)} tables")
            await _copy(held, target, plan, values)
            async with target.connect() as conn:
                after = await _fingerprint(conn, plan)
            if after != before:
                differ = sorted(t for t in before if before[t] != after.get(t))
                raise TenantPlacementError(
                    "the copy does not match the source: the move is undone",
                    hint=f"tables that differ: {', '.join(differ)}; the tenant stays on its source",
                )
            say("verified: row counts and checksums match; switching the registry")
            try:
                await _switch(plan, context, strategy)
            except BaseException:
                # A commit sent but not confirmed may have switched: then go on, lock still held.
                if await _switched_anyway(plan, context, strategy) is not True:
                    raise
            switched = True
            paused_for = time.perf_counter() - paused
            await _after_switch(held, source_server, plan, holder, say)
    except BaseException as exc:
        if not switched:
            try:
                await drop_database(target_server, plan.database)
            except Exception as cleanup:
                exc.add_note(
                    f"asgi-tenancy: removing the target database failed ({type(cleanup).__name__})"
                )
            if isinstance(exc, Exception) and not isinstance(exc, TenancyError):
                raise TenantPlacementError(
                    "the move failed before the switch: it is undone",
                    hint=f"{describe(exc)}; the tenant stays on its source",
                ) from exc
        raise
    say(f"done: the tenant is on {shown(plan.target_server)}")
    return TenantMove(
        tenant_id=plan.tenant.id,
        strategy=strategy.name,
        source=plan.move.source,
        target=plan.move.target,
        statements=plan.move.statements,
        dry_run=False,
        rows_before=rows(before),
        rows_after=rows(after),
        checksums_match=True,
        seconds=round(time.perf_counter() - started, 3),
        details={**plan.move.details, "writes_paused_seconds": round(paused_for, 3)},
    )


# -- the plan ------------------------------------------------------------------------------


async def _lock(conn: AsyncConnection, plan: MovePlan) -> int:
    """Every table of the source locked against writes until ``conn``'s transaction ends;
    the locking backend's pid."""
    await conn.execute(text(f"SET LOCAL lock_timeout = {quote_literal(LOCK_TIMEOUT)}"))
    if not plan.tables:  # nothing to write to, nothing to pause
        return int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)
    try:
        await conn.execute(
            text(f"LOCK TABLE {', '.join(t.sql for t in plan.tables)} IN EXCLUSIVE MODE")
        )
    except Exception as exc:
        if sqlstate(exc) != "55P03":  # lock_not_available
            raise
        raise TenantPlacementError(
            f"writes to the tenant did not pause within {LOCK_TIMEOUT}: the move is undone",
            hint="a long transaction holds the tenant's tables; retry when it is done",
        ) from None
    await conn.execute(text("SET LOCAL lock_timeout = 0"))
    return int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)


async def _fingerprint(conn: AsyncConnection, plan: MovePlan) -> Fingerprint:
    """Counts and checksums keyed by table, over the copied columns in the source's order."""
    for statement in _STABLE_TEXT:
        await conn.execute(text(statement))
    found = await fingerprint(conn, [f"({t.select})" for t in plan.tables])
    return {t.label: found[f"({t.select})"] for t in plan.tables}


async def _sequence_values(conn: AsyncConnection, plan: MovePlan) -> dict[str, tuple[int, bool]]:
    values = {}
    for sequence in plan.sequences:
        row = (await conn.execute(text(f"SELECT last_value, is_called FROM {sequence}"))).one()
        values[sequence] = (int(row.last_value), bool(row.is_called))
    return values


async def _copy(
    held: AsyncConnection,
    target: AsyncEngine,
    plan: MovePlan,
    values: dict[str, tuple[int, bool]],
) -> None:
    """Every table streamed from ``held`` (the locked source transaction) into one target
    transaction, then the sequences."""
    source = await _driver(held)
    async with target.begin() as conn:
        await conn.execute(text("SELECT 1"))  # the transaction is open before raw COPY
        sink = await _driver(conn)
        for table in plan.tables:
            await _copy_table(source, sink, table)
        for sequence, (value, called) in values.items():
            await conn.execute(
                text("SELECT setval(CAST(:s AS regclass), :v, :c)"),
                {"s": sequence, "v": value, "c": called},
            )


async def _driver(conn: AsyncConnection) -> Any:
    raw = await conn.get_raw_connection()
    return raw.driver_connection


async def _copy_table(source: Any, sink: Any, table: CopiedTable) -> None:
    """Binary COPY out of ``source`` piped into ``sink`` through a small bounded queue."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)

    async def produce() -> None:
        await source.copy_from_query(table.select, output=queue.put, format="binary")
        await queue.put(None)

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    producer = asyncio.ensure_future(produce())
    try:
        consumer = asyncio.ensure_future(
            sink.copy_to_table(
                table.name,
                schema_name=table.schema,
                columns=list(table.columns),
                source=chunks(),
                format="binary",
            )
        )
        # A failed producer must not leave the consumer waiting for chunks that never come.
        done, _ = await asyncio.wait({producer, consumer}, return_when=asyncio.FIRST_EXCEPTION)
        if producer in done and producer.exception() is not None:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            producer.result()
        await consumer
        await producer
    finally:
        if not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)


# -- the switch and the drop ---------------------------------------------------------------


async def _switch(plan: MovePlan, context: PlacementContext, strategy: DatabasePerTenant) -> None:
    """The registry row's URL attribute now names the target; refused if the row changed."""
    registry = context.registry
    attribute = strategy.url_attribute
    async with context.admin_engine.begin() as conn:
        row = (
            await conn.execute(
                sa.select(registry.c.status, registry.c.attributes)
                .where(registry.c.id == plan.tenant.id)
                .with_for_update()
            )
        ).first()
        if row is None or dict(row.attributes) != dict(plan.tenant.attributes):
            raise TenantPlacementError(
                "the tenant's registry row changed during the move: the move is undone",
                hint="retry the move",
            )
        if row.status == TenantStatus.MIGRATING.value:
            raise TenantPlacementError("the tenant is being migrated: the move is undone")
        attributes = dict(row.attributes)
        attributes[attribute] = plan.target_app.render_as_string(hide_password=False)
        await conn.execute(
            sa.update(registry)
            .where(registry.c.id == plan.tenant.id)
            .values(attributes=attributes, updated_at=sa.func.now())
        )


async def _switched_anyway(
    plan: MovePlan, context: PlacementContext, strategy: DatabasePerTenant
) -> bool | None:
    """Whether the registry names the target after a failed switch (its commit may have been
    sent, then the answer lost); ``None`` when the registry cannot be read."""
    url = plan.target_app.render_as_string(hide_password=False)
    registry = context.registry
    try:
        async with context.admin_engine.connect() as conn:
            attributes = await conn.scalar(
                sa.select(registry.c.attributes).where(registry.c.id == plan.tenant.id)
            )
    except Exception:
        return None
    return isinstance(attributes, dict) and attributes.get(strategy.url_attribute) == url


async def _after_switch(
    held: AsyncConnection, server: AsyncEngine, plan: MovePlan, holder: int, say: Progress
) -> None:
    """Writers waiting on the lock are ended at once (they cannot succeed any more), reads
    drain, then the source is fenced and dropped while the lock is still held. Any failure
    fences the source before the lock can go, so no waiting writer commits there."""
    try:
        await _terminate(server, plan.database, holder, only_blocked=True)
        say("switched; draining reads from the source, then dropping it")
        await _drain(server, plan.database, holder)
        try:
            await held.execute(text("SELECT 1"))
        except Exception:
            raise TenantPlacementError(
                "the move's lock on the source was lost after the switch",
                hint="writes from processes still holding the old URL may have reached the"
                " source; compare it with the target before dropping it by hand",
            ) from None
        await _fence(server, plan.database, holder)
        await _drop_source(server, plan)
    except BaseException as exc:
        try:
            await _fence(server, plan.database, holder)
        except Exception as cleanup:
            exc.add_note(f"asgi-tenancy: fencing the source failed ({type(cleanup).__name__})")
        if isinstance(exc, TenantPlacementError):
            raise
        raise TenantPlacementError(
            "the tenant is on the target, but dropping the source failed",
            hint=f"DROP DATABASE {quote_ident(plan.database)} WITH (FORCE) on the source"
            " server (it accepts no connections)",
        ) from exc
    finally:
        await held.invalidate()  # its session is gone with the source (or fenced)


async def _drain(server: AsyncEngine, database: str, holder: int) -> None:
    """Wait (at most ``DRAIN_SECONDS``) until two polls in a row find no session of the source
    busy with anything but a wait on the move's lock: reads in flight finish on the source.
    Sessions of other roles are visible to a superuser or a member of ``pg_read_all_stats``."""
    deadline = time.monotonic() + DRAIN_SECONDS
    quiet = 0
    async with server.connect() as conn:
        while quiet < 2 and time.monotonic() < deadline:
            busy = await conn.scalar(text(_BUSY_SQL), {"db": database, "holder": holder})
            await conn.rollback()
            quiet = quiet + 1 if not busy else 0
            if quiet < 2:
                await asyncio.sleep(_DRAIN_POLL)


async def _terminate(
    server: AsyncEngine, database: str, holder: int, *, only_blocked: bool
) -> None:
    """End the source's sessions but the lock holder's (``only_blocked``: those waiting on it)."""
    blocked = " AND CAST(:holder AS integer) = ANY (pg_blocking_pids(pid))" if only_blocked else ""
    async with server.connect() as conn:
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"
                f" AND pid <> pg_backend_pid() AND pid <> :holder{blocked}"
            ),
            {"db": database, "holder": holder},
        )
        await conn.commit()


async def _fence(server: AsyncEngine, database: str, holder: int) -> None:
    """No new connection to the source, and none left but the lock holder's."""
    async with server.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await auto.execute(text(f"ALTER DATABASE {quote_ident(database)} ALLOW_CONNECTIONS false"))
    await _terminate(server, database, holder, only_blocked=False)


async def _drop_source(server: AsyncEngine, plan: MovePlan) -> None:
    """The source goes with every session on it: the move's lock holder's last."""
    async with server.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await owned_by(auto, "database", plan.database, plan.tenant.id)
        await auto.execute(text(f"DROP DATABASE {quote_ident(plan.database)} WITH (FORCE)"))
