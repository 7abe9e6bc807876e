"""The cluster harness itself: the role is powerless, the tenants collide, Citus is real."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.citus.conftest import Cluster
from tests.citus.models import TENANTS

pytestmark = pytest.mark.citus


async def test_the_app_role_is_not_superuser_bypassrls_or_owner(
    cluster: Cluster, admin: AsyncEngine
) -> None:
    async with admin.connect() as conn:
        role = (
            await conn.execute(
                text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :r"),
                {"r": cluster.app_role},
            )
        ).one()
        owned = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_class WHERE relowner = "
                "(SELECT oid FROM pg_roles WHERE rolname = :r)"
            ),
            {"r": cluster.app_role},
        )
    assert (role.rolsuper, role.rolbypassrls, owned) == (False, False, 0)


async def test_the_tables_are_distributed_and_the_tenants_keys_collide(admin: AsyncEngine) -> None:
    async with admin.connect() as conn:
        layout = dict(
            (
                await conn.execute(
                    text(
                        "SELECT logicalrelid::text, partmethod::text FROM pg_dist_partition"
                        " WHERE logicalrelid::text LIKE 'citus\\_%'"
                    )
                )
            ).all()
        )
        nodes = await conn.scalar(
            text("SELECT count(*) FROM pg_dist_node WHERE noderole = 'primary' AND groupid > 0")
        )
        shared_keys = await conn.scalar(
            text(
                "SELECT count(*) FROM (SELECT id FROM citus_orders WHERE tenant_id = :a"
                " INTERSECT SELECT id FROM citus_orders WHERE tenant_id = :b) k"
            ),
            {"a": TENANTS[0], "b": TENANTS[1]},
        )
    assert layout == {"citus_orders": "h", "citus_items": "h", "citus_currencies": "n"}
    assert nodes == 2
    assert shared_keys == 20
