"""Schema tenancy on Citus schema-based sharding: distributed tenant schemas, their audit, and
moving one to another node while it keeps serving.

``citus_schema_distribute(schema)`` makes a tenant schema a distributed schema: each of its
tables becomes a single-shard table, all in one colocation group of their own, on one worker,
and every table created in it later (a migration's) joins that group. It runs inside the
registry row's transaction, after the tables exist and before the grants (Citus copies a
table's grants to its shard only from then on).

``citus_schema_move(schema, host, port, shard_transfer_mode => 'block_writes')`` moves that
shard group to another worker: reads go on throughout, writes to the schema wait until the copy
ends (and then succeed); Citus drops the source placement only after the switch. As for a
row-mode move, the schema's tables are counted and checksummed before and after as the owner,
and the group's placement is read back: on the target, or ``TenantPlacementError``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ...checks import Finding
from ...errors import IsolationConfigError, TenantPlacementError
from ..moves import Progress, TenantMove, fingerprint, rows
from ..postgres import quote_ident, quote_literal
from .checks import citus_version
from .move import worker_node

__all__ = [
    "audit_distributed",
    "distribute_sql",
    "move_schema",
    "plan_schema_move",
]

# The schema's colocation group, its tables (no partitions: their parent counts their rows)
# and the node that holds the group; no row: the schema is not distributed.
_GROUP = """
SELECT s.colocationid AS colocation_id,
  ARRAY(SELECT format('%I.%I', n.nspname, c.relname) FROM pg_dist_partition p
        JOIN pg_class c ON c.oid = p.logicalrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE p.colocationid = s.colocationid AND NOT c.relispartition
        ORDER BY c.relname) AS tables,
  (SELECT l.nodename || ':' || l.nodeport FROM pg_dist_partition p
   JOIN pg_dist_shard d ON d.logicalrelid = p.logicalrelid
   JOIN pg_dist_shard_placement l ON l.shardid = d.shardid
   WHERE p.colocationid = s.colocationid ORDER BY l.placementid LIMIT 1) AS node
FROM pg_dist_schema s WHERE s.schemaid = to_regnamespace(:schema)
"""


def distribute_sql(schema: str) -> str:
    """Make ``schema`` (and its tables) distributed; a notice only when it already is."""
    return f"SELECT citus_schema_distribute({quote_literal(quote_ident(schema))})"


async def audit_distributed(conn: AsyncConnection, schemas: Sequence[str]) -> list[Finding]:
    """C008: tenant schemas that exist but are not distributed (read as the owner). Without
    Citus there is nothing to read: C001 (the strategy's check) says so."""
    if not schemas or await citus_version(conn) is None:
        return []
    local = await conn.scalars(
        text(
            "SELECT n.nspname FROM pg_namespace n WHERE n.nspname = ANY(:names)"
            " AND NOT EXISTS (SELECT 1 FROM pg_dist_schema s WHERE s.schemaid = n.oid)"
            " ORDER BY n.nspname"
        ),
        {"names": list(schemas)},
    )
    return [
        Finding(
            "C008",
            schema,
            "the tenant schema is not distributed: its tables stay on the coordinator, and the"
            " tenant cannot be moved",
            distribute_sql(schema),
        )
        for schema in local
    ]


async def plan_schema_move(
    conn: AsyncConnection, tenant_id: str, strategy_name: str, schema: str, to: str
) -> TenantMove:
    """The move of ``schema`` to node ``to`` as it would run now, changing nothing."""
    if await citus_version(conn) is None:
        raise IsolationConfigError(
            "moving a tenant schema needs a Citus cluster", hint="CREATE EXTENSION citus"
        )
    target = await worker_node(conn, to)
    group = (await conn.execute(text(_GROUP), {"schema": schema})).first()
    if group is None:
        raise IsolationConfigError(
            "the tenant's schema is not a distributed schema: there is nothing to move",
            hint=f"{distribute_sql(schema)} (audit finding C008)",
        )
    if not group.tables or group.node is None:
        raise IsolationConfigError(
            "the tenant's schema has no table yet: Citus cannot move an empty schema",
            hint="create its tables first (asgi-tenancy migrate)",
        )
    statements = [] if group.node == target else [_move_sql(schema, target)]
    return TenantMove(
        tenant_id=tenant_id,
        strategy=strategy_name,
        source=str(group.node),
        target=target,
        statements=tuple(statements),
        dry_run=True,
        details={
            "schema": schema,
            "colocation_id": int(group.colocation_id),
            "tables": list(group.tables),
        },
    )


async def move_schema(
    admin: AsyncEngine,
    tenant_id: str,
    strategy_name: str,
    schema: str,
    to: str,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> TenantMove:
    """Move the distributed ``schema`` of ``tenant_id`` to node ``to`` (``host:port`` or a node
    id of ``pg_dist_node``); the tenant keeps serving reads throughout."""
    say = progress or (lambda _: None)
    started = time.perf_counter()
    async with admin.connect() as conn:
        plan = await plan_schema_move(conn, tenant_id, strategy_name, schema, to)
        await conn.rollback()
    if dry_run:
        return plan
    listed = plan.details["tables"]
    assert isinstance(listed, list)
    tables = [str(t) for t in listed]
    async with admin.connect() as conn:
        before = await fingerprint(conn, tables)
        await conn.rollback()
    if plan.statements:
        say(
            f"moving schema {schema} ({len(tables)} tables, colocation group"
            f" {plan.details['colocation_id']}) from {plan.source} to {plan.target}"
        )
        # Autocommit: the shard transfer commits its own steps.
        async with admin.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for statement in plan.statements:
                await auto.execute(text(statement))
    else:
        say(f"schema {schema} is already on {plan.target}")
    async with admin.connect() as conn:
        after = await fingerprint(conn, tables)
        group = (await conn.execute(text(_GROUP), {"schema": schema})).first()
        await conn.rollback()
    if group is None or group.node != plan.target:
        raise TenantPlacementError(
            "the tenant's schema is not on the target node after the move",
            hint="citus_shards shows where each shard of the schema is",
        )
    say(f"done: the tenant is on {plan.target}")
    return TenantMove(
        tenant_id=tenant_id,
        strategy=strategy_name,
        source=plan.source,
        target=plan.target,
        statements=plan.statements,
        dry_run=False,
        rows_before=rows(before),
        rows_after=rows(after),
        checksums_match=before == after,
        seconds=round(time.perf_counter() - started, 3),
        details=plan.details,
    )


def _move_sql(schema: str, target: str) -> str:
    host, port = target.rsplit(":", 1)
    return (
        f"SELECT citus_schema_move({quote_literal(quote_ident(schema))}, {quote_literal(host)},"
        f" {int(port)}, shard_transfer_mode => 'block_writes')"
    )
