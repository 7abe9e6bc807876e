"""Each tenant's ORM statement on a distributed table is routed to one shard: the tenant's.

The SQL the library's session really sends (caught at the cursor) is EXPLAINed on the same
bound connection, with the same parameters, and Citus must plan it as one task on the shard
that holds the tenant. The unfiltered raw statement is the control: it fans out to every shard,
so the test can tell routed from not.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import delete, event, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from asgi_tenancy import Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import TenantDatabase
from tests.citus.models import TENANTS, Item, Order

pytestmark = pytest.mark.citus

_TASKS = re.compile(r"Task Count: (\d+)")
_SHARD = re.compile(r"\bcitus_(?:orders|items)_(\d+)\b")

Statement = tuple[str, Sequence[Any]]


@contextmanager
def sent(engine: AsyncEngine) -> Iterator[list[Statement]]:
    """Every statement (text and parameters) the engine's cursors execute meanwhile."""
    caught: list[Statement] = []

    def before(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        caught.append((statement, tuple(params or ())))

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield caught
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)


async def explain(session: AsyncSession, statement: Statement) -> str:
    """EXPLAIN on the session's own (bound) connection, parameters as the driver sent them."""
    conn = await session.connection()
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    rows = await driver.fetch("EXPLAIN " + statement[0], *statement[1])
    return "\n".join(row[0] for row in rows)


def plan(text_: str) -> tuple[int, set[int]]:
    """(task count, shard ids named) of a Citus plan."""
    counts = [int(n) for n in _TASKS.findall(text_)]
    assert counts, f"not a distributed plan:\n{text_}"
    return sum(counts), {int(s) for s in _SHARD.findall(text_)}


async def tenant_shards(admin: AsyncEngine, tenant: str) -> set[int]:
    async with admin.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT get_shard_id_for_distribution_column(t::regclass, CAST(:t AS text))"
                " FROM unnest(ARRAY['citus_orders', 'citus_items']) t"
            ),
            {"t": tenant},
        )
        return {int(r[0]) for r in rows}


async def _select(s: AsyncSession) -> None:
    (await s.execute(select(Order).where(Order.id <= 5))).all()


async def _select_join(s: AsyncSession) -> None:
    (await s.execute(select(Item.sku).join(Order, Order.id == Item.order_id))).all()


async def _get(s: AsyncSession) -> None:
    await s.get(Order, (s.info["tenant"], 3))


async def _bulk_update(s: AsyncSession) -> None:
    await s.execute(update(Order).where(Order.id == 3).values(note="routed"))


async def _bulk_delete(s: AsyncSession) -> None:
    await s.execute(delete(Item).where(Item.id == 4))


async def _flush_update(s: AsyncSession) -> None:
    order = await s.get(Order, (s.info["tenant"], 2))
    assert order is not None
    order.note = "routed"
    await s.flush()


async def _flush_delete(s: AsyncSession) -> None:
    item = await s.get(Item, (s.info["tenant"], 6))
    assert item is not None
    await s.delete(item)
    await s.flush()


CASES: dict[str, tuple[str, Callable[[AsyncSession], Awaitable[None]]]] = {
    "select": ("SELECT", _select),
    "select-join": ("SELECT", _select_join),
    "get": ("SELECT", _get),
    "bulk-update": ("UPDATE", _bulk_update),
    "bulk-delete": ("DELETE", _bulk_delete),
    "flush-update": ("UPDATE", _flush_update),
    "flush-delete": ("DELETE", _flush_delete),
}


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("case", list(CASES))
async def test_a_tenants_orm_statement_is_one_task_on_the_tenants_shard(
    db: TenantDatabase, admin: AsyncEngine, tenant: str, case: str
) -> None:
    verb, run = CASES[case]
    shards = await tenant_shards(admin, tenant)
    async with tenant_scope(Tenant(tenant)), db.session() as s:
        s.info["tenant"] = tenant
        await s.execute(text("SELECT 1"))  # the binding is sent before anything is caught
        with sent(db.engine) as caught:
            await run(s)
        statements = [c for c in caught if c[0].lstrip().upper().startswith(verb)]
        assert statements, f"{case}: the ORM sent no {verb}"
        plans = [plan(await explain(s, c)) for c in statements]
        await s.rollback()
    for tasks, named in plans:
        assert tasks == 1
        assert named
        assert named <= shards  # the tenant's shard, not merely some one shard


async def test_the_control_an_unfiltered_raw_select_fans_out_to_every_shard(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    async with admin.connect() as conn:
        shard_count = await conn.scalar(
            text("SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'citus_orders'::regclass")
        )
    async with tenant_scope(Tenant(TENANTS[0])), db.session() as s:
        tasks, _ = plan(await explain(s, ("SELECT * FROM citus_orders", ())))
    assert shard_count is not None
    assert shard_count > 1
    assert tasks == shard_count
