"""The harness itself: the role every isolation test runs as can bypass nothing."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import APP_ROLE


async def test_app_role_is_neither_superuser_nor_bypassrls(app_engine: AsyncEngine) -> None:
    async with app_engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT current_user, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb "
                    "FROM pg_roles WHERE rolname = current_user"
                )
            )
        ).one()
    assert row.current_user == APP_ROLE
    assert (row.rolsuper, row.rolbypassrls, row.rolcreaterole, row.rolcreatedb) == (
        False,
        False,
        False,
        False,
    )


async def test_tables_made_by_the_admin_are_not_owned_by_the_app_role(
    admin_engine: AsyncEngine, app_engine: AsyncEngine
) -> None:
    async with admin_engine.begin() as conn:
        await conn.execute(text("CREATE TABLE harness_probe (id int primary key)"))
    async with app_engine.begin() as conn:
        await conn.execute(text("INSERT INTO harness_probe VALUES (1)"))
        owner = await conn.scalar(
            text("SELECT tableowner FROM pg_tables WHERE tablename = 'harness_probe'")
        )
    assert owner != APP_ROLE
    async with admin_engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM harness_probe")) == 1


async def test_each_module_gets_its_own_database(app_engine: AsyncEngine) -> None:
    async with app_engine.connect() as conn:
        name = await conn.scalar(text("SELECT current_database()"))
    assert name is not None
    assert name.startswith("t_test_harness_")
