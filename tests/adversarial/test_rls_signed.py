"""RowLevelSecurity(signed=True): the cases of test_rls.py again, then the attacks signing stops.

The binding is ``tenant:mac`` with the MAC over the tenant and the server process; the policy's
SECURITY DEFINER function checks it against keys the application role cannot read. Raw SQL
that rewrites the setting gets an error, never another tenant's rows.
"""

from __future__ import annotations

import asyncio
import contextvars

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from asgi_tenancy import IsolationConfigError, Tenant, tenant_scope
from asgi_tenancy.sqlalchemy import FairShares, RowLevelSecurity, TenantDatabase
from tests.adversarial.leaks import assert_no_foreign_rows
from tests.adversarial.models import ROWS_PER_TENANT, Base
from tests.adversarial.test_rls import (  # noqa: F401  (the same cases, on the signed binding)
    test_a_key_across_tenants_is_excluded_from_every_load,
    test_aggregates_joins_subqueries_ctes_and_pagination,
    test_bulk_update_and_delete_touch_only_own_rows,
    test_cancelled_task_and_killed_backend_fail_cleanly,
    test_cascaded_children_are_stamped,
    test_concurrent_tasks_across_three_tenants_see_only_their_rows,
    test_error_mid_transaction_leaves_the_next_one_clean,
    test_forged_insert_is_rejected,
    test_get_update_delete_another_tenants_key_find_nothing,
    test_going_around_the_library_inside_a_scope_reaches_nothing,
    test_identity_map_objects_never_cross_tenants,
    test_inserts_are_stamped,
    test_nested_scopes_never_reuse_the_open_transaction,
    test_no_context_raises_before_any_connection,
    test_pool_reuse_leaves_nothing_behind,
    test_raw_sql_that_changes_role_path_or_settings_never_widens,
    test_reads_see_only_own_rows,
    test_relationship_loads_stay_in_tenant,
    test_results_and_streams_used_after_the_scope_raise,
    test_savepoints_keep_the_binding,
    test_selectin_and_joined_loads_stay_in_tenant,
    test_session_state_left_by_raw_sql_is_not_inherited,
    test_session_used_in_another_scope_or_after_its_own_raises,
    test_tenant_column_cannot_change,
    test_the_setting_survives_commit_and_rollback,
    test_the_start_up_gate_locks_until_validated_and_again_on_failure,
    test_update_of_another_tenants_key_changes_nothing,
    test_upsert_and_returning_touch_only_own_rows,
    test_validate_refuses_a_superuser,
)
from tests.conftest import PgDatabase

KEY = "signing-key-for-tests-0123456789abcdef"
OLD_KEY = "an-older-signing-key-0123456789abcdef"
ACME, GLOBEX = Tenant("acme"), Tenant("globex")


@pytest.fixture(scope="module")
def rls_strategy() -> RowLevelSecurity:
    return RowLevelSecurity(
        metadata=Base.metadata, shared_tables={"currencies"}, signed=True, signing_keys=[KEY]
    )


async def _read_after(db: TenantDatabase, *statements: str) -> list[str]:
    async with tenant_scope(ACME), db.session() as s:
        for statement in statements:
            await s.execute(text(statement))
        return list((await s.execute(text("SELECT name FROM projects"))).scalars().all())


@pytest.mark.parametrize(
    "attack",
    [
        "SELECT set_config('app.tenant_id', 'globex', true)",
        "SELECT set_config('app.tenant_id', 'globex:' || repeat('0', 64), true)",
        "SELECT set_config('app.tenant_id', 'globex:' || split_part("
        "current_setting('app.tenant_id'), ':', 2), true)",
        "SET LOCAL app.tenant_id = 'globex'",
        "RESET app.tenant_id",
        "RESET ALL",
    ],
)
async def test_raw_sql_that_rewrites_the_binding_gets_an_error(
    db: TenantDatabase, attack: str
) -> None:
    with pytest.raises(DBAPIError, match="asgi-tenancy"):
        await _read_after(db, attack)


async def test_a_token_from_another_backend_is_worthless(
    db: TenantDatabase, rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> None:
    """Tokens show in pg_stat_activity; bound to their server process, they open nothing else."""
    other = TenantDatabase(rls_database.app_url, rls_strategy)
    await other.validate()
    holding, release = asyncio.Event(), asyncio.Event()
    stolen: list[str] = []

    async def globex_request() -> None:  # another request, on another backend, still running
        async with tenant_scope(GLOBEX), other.session() as s:
            stolen.append(await s.scalar(text("SELECT current_setting('app.tenant_id')")))
            holding.set()
            await release.wait()

    task = asyncio.create_task(globex_request(), context=contextvars.Context())
    await holding.wait()
    try:
        async with tenant_scope(ACME), db.session() as s:
            seen = await s.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%globex:%'")
            )
            await s.execute(text("SELECT set_config('app.tenant_id', :t, true)"), {"t": stolen[0]})
            with pytest.raises(DBAPIError, match="not signed for this connection"):
                await s.execute(text("SELECT count(*) FROM projects"))
    finally:
        release.set()
        await task
        await other.dispose()
    assert stolen[0].startswith("globex:")
    assert seen is not None


async def test_session_level_settings_do_not_outlive_into_bound_transactions(
    db: TenantDatabase,
) -> None:
    async with tenant_scope(ACME), db.session() as s:
        await s.execute(
            text("SELECT set_config('app.tenant_id', current_setting('app.tenant_id'), false)")
        )
        await s.commit()
    async with tenant_scope(GLOBEX), db.session() as s:
        names = (await s.execute(text("SELECT name FROM projects"))).scalars().all()
    assert len(names) >= ROWS_PER_TENANT
    assert_no_foreign_rows(names, "globex")


async def test_the_app_role_cannot_read_the_keys(
    app_engine: AsyncEngine, db: TenantDatabase
) -> None:
    async with app_engine.connect() as conn:
        with pytest.raises(DBAPIError, match="permission denied"):
            await conn.execute(text("SELECT secret FROM tenancy_private.binding_keys"))


async def test_validate_refuses_a_key_the_database_does_not_hold(
    rls_database: PgDatabase,
) -> None:
    other = RowLevelSecurity(
        metadata=Base.metadata,
        shared_tables={"currencies"},
        signed=True,
        signing_keys=["a-different-key-0123456789abcdefghij"],
    )
    database = TenantDatabase(rls_database.app_url, other)
    with pytest.raises(IsolationConfigError, match="R014"):
        await database.validate()
    await database.dispose()


async def test_key_rotation_accepts_old_and_new_during_the_switch(
    rls_database: PgDatabase, admin_engine: AsyncEngine
) -> None:
    old = RowLevelSecurity(
        metadata=Base.metadata, shared_tables={"currencies"}, signed=True, signing_keys=[OLD_KEY]
    )
    both = RowLevelSecurity(
        metadata=Base.metadata,
        shared_tables={"currencies"},
        signed=True,
        signing_keys=[KEY, OLD_KEY],
    )
    async with admin_engine.begin() as conn:
        await both.install_keys(conn)
    try:
        for strategy in (old, both):  # an old release and the new one, side by side
            database = TenantDatabase(rls_database.app_url, strategy)
            await database.validate()
            async with tenant_scope(ACME), database.session() as s:
                assert await s.scalar(text("SELECT count(*) FROM projects")) >= ROWS_PER_TENANT
            await database.dispose()
    finally:
        async with admin_engine.begin() as conn:
            await RowLevelSecurity(
                metadata=Base.metadata, signed=True, signing_keys=[KEY]
            ).install_keys(conn)
    retired = TenantDatabase(rls_database.app_url, old)
    with pytest.raises(IsolationConfigError, match="R014"):
        await retired.validate()
    await retired.dispose()


async def test_a_fair_share_timeout_rides_with_the_signed_binding(
    rls_database: PgDatabase, rls_strategy: RowLevelSecurity
) -> None:
    database = TenantDatabase(
        rls_database.app_url,
        rls_strategy,
        engine_options={"pool_size": 1, "max_overflow": 0},
        shares=FairShares(connections=1, statement_timeout=2500),
    )
    await database.validate()
    try:
        for tenant in (ACME, GLOBEX, ACME):
            async with tenant_scope(tenant), database.session() as s:
                for _ in range(2):  # a fresh token in each transaction, the timeout with it
                    assert await s.scalar(text("SHOW statement_timeout")) == "2500ms"
                    rows = (await s.execute(text("SELECT tenant_id FROM projects"))).scalars()
                    assert set(rows) == {tenant.id}
                    await s.commit()
    finally:
        await database.dispose()
