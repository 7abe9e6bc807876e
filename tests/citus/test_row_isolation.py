"""Row tenancy on a real Citus cluster: two tenants whose keys collide, a powerless app role,
every outcome read back through an admin connection on the coordinator.

Each case runs for both tenants (each is the other's attacker). Writes use ids from 1000 up
and are removed after each test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import selectinload

from asgi_tenancy import Tenant, TenantContextError, tenant_scope
from asgi_tenancy.sqlalchemy import TenantDatabase
from asgi_tenancy.sqlalchemy.failures import sqlstate
from tests.citus.conftest import Cluster, row_strategy
from tests.citus.models import ORDERS_PER_TENANT, TENANTS, Currency, Item, Order

pytestmark = pytest.mark.citus

PAIRS = [(TENANTS[0], TENANTS[1]), (TENANTS[1], TENANTS[0])]
pair = pytest.mark.parametrize(("me", "other"), PAIRS, ids=["acme-vs-globex", "globex-vs-acme"])


async def admin_notes(admin: AsyncEngine, tenant: str) -> dict[int, str]:
    async with admin.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, note FROM citus_orders WHERE tenant_id = :t"), {"t": tenant}
        )
        return dict(rows.all())


@pytest.fixture(autouse=True)
async def clean(admin: AsyncEngine) -> AsyncIterator[None]:
    yield
    async with admin.begin() as conn:
        await conn.execute(text("DELETE FROM citus_items WHERE id >= 1000"))
        await conn.execute(text("DELETE FROM citus_orders WHERE id >= 1000"))
        await conn.execute(
            text(
                "UPDATE citus_orders SET note = tenant_id || '-order-' || id::text WHERE id < 1000"
            )
        )


# -- reads ----------------------------------------------------------------------------------


@pair
async def test_orm_reads_return_exactly_the_tenants_rows(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        got = {o.id: o.note for o in (await s.execute(select(Order))).scalars()}
    assert got == await admin_notes(admin, me)
    assert len(got) == ORDERS_PER_TENANT


@pair
async def test_a_get_by_the_other_tenants_key_finds_nothing(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        assert await s.get(Order, (other, 1)) is None
        mine = await s.get(Order, (me, 1))
    assert mine is not None
    assert mine.note == (await admin_notes(admin, me))[1]


@pair
async def test_an_orm_filter_on_the_other_tenant_finds_nothing(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        rows = (await s.execute(select(Order).where(Order.tenant_id == other))).all()
    assert rows == []
    assert len(await admin_notes(admin, other)) == ORDERS_PER_TENANT  # they exist


@pair
async def test_raw_sql_without_a_predicate_is_held_by_the_policy_on_the_workers(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        rows = dict((await s.execute(text("SELECT id, note FROM citus_orders"))).all())
        count = await s.scalar(text("SELECT count(*) FROM citus_items"))
        named = await s.scalar(
            text("SELECT count(*) FROM citus_orders WHERE tenant_id = :t"), {"t": other}
        )
    assert rows == await admin_notes(admin, me)
    assert (count, named) == (ORDERS_PER_TENANT, 0)


@pair
async def test_a_join_with_a_reference_table_and_a_relationship_stay_in_the_tenant(
    db: TenantDatabase, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        joined = (
            await s.execute(select(Order.note).join(Currency, Currency.code == Order.currency))
        ).scalars()
        orders = (
            await s.execute(select(Order).options(selectinload(Order.items)).where(Order.id <= 5))
        ).scalars()
        skus = {i.sku for o in orders for i in o.items}
        currencies = (await s.execute(select(Currency.code))).scalars().all()
    assert all(note.startswith(f"{me}-") for note in joined)
    assert skus
    assert all(sku.startswith(f"{me}-") for sku in skus)
    assert sorted(currencies) == ["EUR", "USD"]  # shared rows: every tenant sees them


@pair
async def test_a_streamed_result_holds_only_the_tenants_rows(
    db: TenantDatabase, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        notes = [o.note async for o in await s.stream_scalars(select(Order))]
    assert len(notes) == ORDERS_PER_TENANT
    assert all(n.startswith(f"{me}-") for n in notes)


# -- writes ---------------------------------------------------------------------------------


@pair
async def test_an_orm_update_of_every_row_changes_only_the_tenants(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    before = await admin_notes(admin, other)
    async with tenant_scope(Tenant(me)), db.session() as s:
        await s.execute(update(Order).values(note="overwritten"))
        await s.commit()
    assert set((await admin_notes(admin, me)).values()) == {"overwritten"}
    assert await admin_notes(admin, other) == before


@pair
async def test_raw_updates_and_deletes_of_the_other_tenant_touch_nothing(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    before = await admin_notes(admin, other)
    async with tenant_scope(Tenant(me)), db.session() as s:
        updated = await s.execute(
            text("UPDATE citus_orders SET note = 'x' WHERE tenant_id = :t"), {"t": other}
        )
        deleted = await s.execute(
            text("DELETE FROM citus_items WHERE tenant_id = :t"), {"t": other}
        )
        assert (updated.rowcount, deleted.rowcount) == (0, 0)
        await s.commit()
    assert await admin_notes(admin, other) == before


@pair
async def test_an_orm_delete_removes_only_the_tenants_rows(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        s.add(Order(id=1000, note="temporary"))
        await s.commit()
        await s.execute(delete(Order).where(Order.id == 1000))
        await s.commit()
    async with admin.connect() as conn:
        left = await conn.scalar(text("SELECT count(*) FROM citus_orders WHERE id = 1000"))
    assert left == 0
    assert len(await admin_notes(admin, other)) == ORDERS_PER_TENANT


@pair
async def test_a_forged_orm_insert_is_refused_before_any_sql(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        s.add(Order(tenant_id=other, id=1000, note="forged"))
        with pytest.raises(TenantContextError):
            await s.flush()
    async with tenant_scope(Tenant(me)), db.session() as s:
        with pytest.raises(TenantContextError):
            await s.execute(insert(Order).values(tenant_id=other, id=1001, note="forged"))
    assert 1000 not in await admin_notes(admin, other)
    assert 1001 not in await admin_notes(admin, other)


@pair
async def test_a_forged_raw_insert_is_refused_by_the_policy_on_the_worker(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        with pytest.raises(sa_exc.DBAPIError) as caught:
            await s.execute(
                text(
                    "INSERT INTO citus_orders (tenant_id, id, note, currency)"
                    " VALUES (:t, 1000, 'forged', 'EUR')"
                ),
                {"t": other},
            )
    assert sqlstate(caught.value) == "42501"
    assert 1000 not in await admin_notes(admin, other)


@pair
async def test_moving_a_row_to_the_other_tenant_is_refused(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        with pytest.raises(sa_exc.DBAPIError) as caught:
            await s.execute(
                text("UPDATE citus_orders SET tenant_id = :t WHERE id = 3"), {"t": other}
            )
    # Citus refuses to change the distribution column; either way nothing moved.
    assert sqlstate(caught.value) is not None
    assert (await admin_notes(admin, me))[3] == f"{me}-order-3"
    assert (await admin_notes(admin, other))[3] == f"{other}-order-3"


@pair
async def test_an_item_cannot_reference_the_other_tenants_order(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        s.add(Order(id=1000, note="mine"))
        await s.commit()
    async with tenant_scope(Tenant(me)), db.session() as s:
        # The other tenant has an order 1001; this tenant has none: the colocated key refuses.
        async with admin.begin() as conn:
            await conn.execute(
                text("INSERT INTO citus_orders VALUES (:t, 1001, 'theirs', 'EUR')"), {"t": other}
            )
        s.add(Item(id=1000, order_id=1001, sku="dangling"))
        with pytest.raises(sa_exc.IntegrityError):
            await s.flush()
    async with admin.connect() as conn:
        items = await conn.scalar(text("SELECT count(*) FROM citus_items WHERE id = 1000"))
    assert items == 0


# -- commit, rollback, pool reuse -------------------------------------------------------------


@pair
async def test_every_transaction_after_a_commit_or_a_rollback_is_bound_again(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        s.add(Order(id=1000, note="kept"))
        await s.commit()
        s.add(Order(id=1001, note="undone"))
        await s.flush()
        await s.rollback()
        notes = {o.id: o.note for o in (await s.execute(select(Order))).scalars()}
        s.add(Order(id=1002, note="kept-too"))
        await s.commit()
    mine = await admin_notes(admin, me)
    assert (mine.get(1000), mine.get(1001), mine.get(1002)) == ("kept", None, "kept-too")
    assert notes == {k: v for k, v in mine.items() if k != 1002}
    assert not {1000, 1001, 1002} & set(await admin_notes(admin, other))


async def test_one_pooled_connection_passed_between_tenants_never_carries_one_to_the_next(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    truth = {t: await admin_notes(admin, t) for t in TENANTS}
    for round_ in range(6):
        tenant = TENANTS[round_ % 2]
        async with tenant_scope(Tenant(tenant)), db.session() as s:
            got = dict((await s.execute(text("SELECT id, note FROM citus_orders"))).all())
            s.add(Order(id=1000 + round_, note=f"round-{round_}"))
            await s.commit()
        truth[tenant][1000 + round_] = f"round-{round_}"
        assert got == {k: v for k, v in truth[tenant].items() if k != 1000 + round_}
    for tenant in TENANTS:
        assert await admin_notes(admin, tenant) == truth[tenant]


async def test_500_concurrent_tasks_each_see_and_write_only_their_tenant(
    cluster: Cluster, admin: AsyncEngine
) -> None:
    db = TenantDatabase(
        cluster.app_url, row_strategy(), engine_options={"pool_size": 10, "max_overflow": 0}
    )
    await db.validate()
    truth = {t: await admin_notes(admin, t) for t in TENANTS}

    async def task(n: int) -> tuple[str, int, dict[int, str]]:
        tenant = TENANTS[n % 2]
        async with tenant_scope(Tenant(tenant)), db.session() as s:
            got = dict((await s.execute(select(Order.id, Order.note).where(Order.id < 1000))).all())
            if n % 5 == 0:
                s.add(Order(id=1000 + n, note=f"{tenant}-task-{n}"))
                await s.commit()
        return tenant, n, got

    try:
        results = await asyncio.gather(*(task(n) for n in range(500)))
    finally:
        await db.dispose()
    wrong = [n for tenant, n, got in results if got != truth[tenant]]
    assert wrong == []
    for tenant in TENANTS:
        written = {k: v for k, v in (await admin_notes(admin, tenant)).items() if k >= 1000}
        expected = {
            1000 + n: f"{tenant}-task-{n}" for n in range(0, 500, 5) if TENANTS[n % 2] == tenant
        }
        assert written == expected


async def test_a_failed_transaction_leaves_the_pooled_connection_right_for_the_next_tenant(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    """An error mid-transaction (a forged insert the policy refuses on a worker) with the one
    pooled connection: the next tenant's transaction on it is bound to that tenant alone."""
    for me, other in PAIRS:
        async with tenant_scope(Tenant(me)), db.session() as s:
            await s.execute(select(Order.id).limit(1))
            with pytest.raises(sa_exc.DBAPIError):
                await s.execute(
                    text("INSERT INTO citus_orders VALUES (:t, 1000, 'forged', 'EUR')"),
                    {"t": other},
                )
        async with tenant_scope(Tenant(other)), db.session() as s:
            got = dict((await s.execute(text("SELECT id, note FROM citus_orders"))).all())
        assert got == await admin_notes(admin, other)
        assert 1000 not in got


@pair
async def test_a_rolled_back_savepoint_keeps_the_tenant_bound(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        s.add(Order(id=1000, note="outer"))
        await s.flush()
        nested = await s.begin_nested()
        s.add(Order(id=1001, note="inner"))
        await s.flush()
        await nested.rollback()
        raw = dict((await s.execute(text("SELECT id, note FROM citus_orders"))).all())
        await s.commit()
    mine = await admin_notes(admin, me)
    assert (mine.get(1000), mine.get(1001)) == ("outer", None)
    assert raw == mine
    assert not {1000, 1001} & set(await admin_notes(admin, other))


# Tenants whose ids are neighbours of another's (case, prefix, suffix, the longest id): each
# must be a tenant of its own, on whichever shard its hash lands, with the same keys.
NEIGHBOURS = ["ACME", "Acme", "acm", "acme0", "acme.", "acme-", "acme_", "a" * 63]


@pytest.mark.parametrize("neighbour", NEIGHBOURS)
async def test_a_tenant_whose_id_neighbours_another_sees_only_its_own_rows(
    db: TenantDatabase, admin: AsyncEngine, neighbour: str
) -> None:
    async with admin.begin() as conn:
        await conn.execute(
            text("INSERT INTO citus_orders VALUES (:t, 1, :n, 'EUR'), (:t, 2, :n, 'EUR')"),
            {"t": neighbour, "n": f"{neighbour}-order"},
        )
    try:
        async with tenant_scope(Tenant(neighbour)), db.session() as s:
            orm = {o.id: o.note for o in (await s.execute(select(Order))).scalars()}
            raw = dict((await s.execute(text("SELECT id, note FROM citus_orders"))).all())
            await s.execute(update(Order).values(note="neighbour-wrote"))
            await s.commit()
        async with tenant_scope(Tenant("acme")), db.session() as s:
            acme = dict((await s.execute(text("SELECT id, note FROM citus_orders"))).all())
        assert orm == raw == {1: f"{neighbour}-order", 2: f"{neighbour}-order"}
        assert acme == await admin_notes(admin, "acme")
        assert set(acme.values()) == {f"acme-order-{i}" for i in range(1, ORDERS_PER_TENANT + 1)}
        assert set((await admin_notes(admin, neighbour)).values()) == {"neighbour-wrote"}
    finally:
        async with admin.begin() as conn:
            await conn.execute(
                text("DELETE FROM citus_orders WHERE tenant_id = :t"), {"t": neighbour}
            )


# -- no context, and sessions outside their tenant ---------------------------------------------


async def test_no_tenant_context_raises_before_a_connection_is_taken(db: TenantDatabase) -> None:
    pool = db.engine.sync_engine.pool
    with pytest.raises(TenantContextError):
        async with db.session():
            pass
    assert pool.checkedout() == 0  # type: ignore[attr-defined]


@pair
async def test_a_session_used_in_another_tenants_scope_or_after_its_own_raises(
    db: TenantDatabase, admin: AsyncEngine, me: str, other: str
) -> None:
    async with tenant_scope(Tenant(me)), db.session() as s:
        await s.execute(select(Order.id).limit(1))
        kept = s
    with pytest.raises(TenantContextError):
        await kept.execute(select(Order))
    with pytest.raises(TenantContextError):
        async with tenant_scope(Tenant(other)):
            await kept.execute(select(Order))
    assert len(await admin_notes(admin, other)) == ORDERS_PER_TENANT


@pytest.mark.parametrize(
    "binding",
    [None, "SELECT set_config('app.tenant_id', 'acme', true)"],
    ids=["nothing-bound", "set_config-stays-on-the-coordinator"],
)
async def test_an_unbound_app_role_transaction_fails_closed_on_the_workers(
    cluster: Cluster, binding: str | None
) -> None:
    url = cluster.app_url.replace("postgresql+asyncpg", "postgresql")
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            if binding is not None:
                await conn.execute(binding)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="no tenant is bound"):
                await conn.fetch("SELECT * FROM citus_orders")
    finally:
        await conn.close()


async def test_raw_sql_can_rewrite_the_unsigned_binding_on_the_cluster_too(
    db: TenantDatabase, admin: AsyncEngine
) -> None:
    """Not supported, as on plain PostgreSQL: raw SQL the app lets through may rebind the
    tenant (the signed binding that would refuse it cannot be verified on workers, C003)."""
    async with tenant_scope(Tenant("acme")), db.session() as s:
        await s.execute(select(Order.id).limit(1))  # a worker connection already in use
        await s.execute(text("SET LOCAL app.tenant_id = 'globex'"))
        rows = dict((await s.execute(text("SELECT id, note FROM citus_orders"))).all())
    assert rows == await admin_notes(admin, "globex")
