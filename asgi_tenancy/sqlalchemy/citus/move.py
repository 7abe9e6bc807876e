"""Moving one row-mode tenant to another Citus node while it keeps serving.

Two Citus calls. ``isolate_tenant_to_new_shard(table, tenant, 'CASCADE')`` gives the tenant a
shard of its own in every colocated table, splitting the shard it shared with others (skipped
when it is already alone). ``citus_move_shard_placement`` then moves that shard group to the
target node. Both copy with ``shard_transfer_mode => 'block_writes'``: reads go on throughout,
writes to the shards being copied wait until the copy ends (and then succeed). Citus's
non-blocking mode (logical replication) cannot serve tenant tables on PostgreSQL 15: its
subscription role is no superuser, and PostgreSQL refuses to replicate into a table with
row-level security ("cannot replicate into relation with row-level security enabled"), so
the copy would retry forever. Citus drops the source placement only after the switch.
The tenant's row count and checksum per table are read before and after as the admin; with no
writes meanwhile they must match, and the move reports both either way.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ...errors import IsolationConfigError, TenantPlacementError
from ...tenant import Tenant, validate_tenant_id
from ..moves import Progress, TenantMove, fingerprint, rows
from ..placement import Placement, PlacementContext
from ..postgres import qualified, quote_literal

if TYPE_CHECKING:
    from ..rls.strategy import RowLevelSecurity

__all__ = ["CitusRowPlacement", "move_tenant", "plan_tenant_move", "worker_node"]


class CitusRowPlacement(Placement):
    """Shared tables distributed by the tenant column: a tenant moves as its own shard group."""

    def __init__(self, strategy: RowLevelSecurity) -> None:
        self.strategy = strategy

    async def move(
        self,
        context: PlacementContext,
        tenant: Tenant,
        to: str,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> TenantMove:
        return await move_tenant(
            context.admin_engine,
            self.strategy,
            tenant.id,
            to,
            dry_run=dry_run,
            progress=progress,
        )


async def plan_tenant_move(
    conn: AsyncConnection, strategy: RowLevelSecurity, tenant_id: str, to: str
) -> TenantMove:
    """The move as it would run now, changing nothing (an admin connection)."""
    validate_tenant_id(tenant_id)
    if not strategy.citus:
        raise IsolationConfigError(
            "moving a tenant between nodes needs RowLevelSecurity(citus=True)",
            hint="docs/scale-out.md",
        )
    tables = strategy.tenant_tables()
    if not tables:
        raise IsolationConfigError("the strategy's metadata has no tenant table to move")
    table = qualified(tables[0])  # the others are colocated with it: they move along
    target = await worker_node(conn, to)
    shard = await conn.scalar(
        text("SELECT get_shard_id_for_distribution_column(CAST(:t AS regclass), CAST(:v AS text))"),
        {"t": table, "v": tenant_id},
    )
    bounds = (
        await conn.execute(
            text("SELECT shardminvalue, shardmaxvalue FROM pg_dist_shard WHERE shardid = :s"),
            {"s": shard},
        )
    ).one()
    isolated = bounds.shardminvalue == bounds.shardmaxvalue
    source = await conn.scalar(
        text(
            "SELECT nodename || ':' || nodeport FROM pg_dist_shard_placement"
            " WHERE shardid = :s ORDER BY placementid LIMIT 1"
        ),
        {"s": shard},
    )
    statements = []
    if not isolated:
        statements.append(_isolate_sql(table, tenant_id))
    if source != target:
        statements.append(_move_sql(int(shard) if isolated else None, str(source), target))
    return TenantMove(
        tenant_id=tenant_id,
        strategy=strategy.name,
        source=str(source),
        target=target,
        statements=tuple(statements),
        dry_run=True,
        details={"table": table, "shard_id": int(shard), "isolated_before": isolated},
    )


async def move_tenant(
    admin: AsyncEngine,
    strategy: RowLevelSecurity,
    tenant_id: str,
    to: str,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> TenantMove:
    """Move ``tenant_id``'s rows of every tenant table to node ``to`` (``host:port``, or a
    node id of ``pg_dist_node``); the tenant keeps serving throughout."""
    say = progress or (lambda _: None)
    started = time.perf_counter()
    async with admin.connect() as conn:
        plan = await plan_tenant_move(conn, strategy, tenant_id, to)
        await conn.rollback()
    if dry_run:
        return plan
    tables = [qualified(t) for t in strategy.tenant_tables()]
    where = {strategy.tenant_column: tenant_id}
    table = str(plan.details["table"])
    isolated = bool(plan.details["isolated_before"])
    async with admin.connect() as conn:
        before = await fingerprint(conn, tables, where)
        await conn.rollback()
    shard = int(str(plan.details["shard_id"]))
    # Each call in an autocommit connection: Citus runs neither inside a transaction block.
    async with admin.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if not isolated:
            say(f"isolating the tenant to a shard of its own in {len(tables)} colocated tables")
            shard = int(await auto.scalar(text(_isolate_sql(table, tenant_id))))
        if plan.source != plan.target:
            say(f"moving shard group {shard} from {plan.source} to {plan.target}")
            await auto.execute(text(_move_sql(shard, plan.source, plan.target)))
    async with admin.connect() as conn:
        after = await fingerprint(conn, tables, where)
        placed = await conn.scalar(
            text(
                "SELECT nodename || ':' || nodeport FROM pg_dist_shard_placement"
                " WHERE shardid = get_shard_id_for_distribution_column("
                "CAST(:t AS regclass), CAST(:v AS text))"
            ),
            {"t": table, "v": tenant_id},
        )
        await conn.rollback()
    if placed != plan.target:
        raise TenantPlacementError(
            "the tenant's shard is not on the target node after the move",
            hint="citus_shard_placements shows where each shard is",
        )
    say(f"done: the tenant is on {plan.target}")
    return TenantMove(
        tenant_id=tenant_id,
        strategy=strategy.name,
        source=plan.source,
        target=plan.target,
        statements=plan.statements,
        dry_run=False,
        rows_before=rows(before),
        rows_after=rows(after),
        checksums_match=before == after,
        seconds=round(time.perf_counter() - started, 3),
        details={**plan.details, "shard_id": shard},
    )


async def worker_node(conn: AsyncConnection, to: str) -> str:
    """``host:port`` of an active primary node that may hold shards, named either way."""
    rows = await conn.execute(
        text(
            "SELECT nodeid, nodename || ':' || nodeport AS address FROM pg_dist_node"
            " WHERE isactive AND noderole = 'primary' AND shouldhaveshards"
        )
    )
    for row in rows:
        if to in (row.address, str(row.nodeid)):
            return str(row.address)
    raise IsolationConfigError(
        "no active node that may hold shards has that name",
        hint="host:port or a node id: SELECT * FROM citus_get_active_worker_nodes()",
    )


def _isolate_sql(table: str, tenant_id: str) -> str:
    return (
        f"SELECT isolate_tenant_to_new_shard({quote_literal(table)}, {quote_literal(tenant_id)},"
        " 'CASCADE', shard_transfer_mode => 'block_writes')"
    )


def _move_sql(shard: int | None, source: str, target: str) -> str:
    """``shard`` None: the shard isolation creates (a dry run cannot know its id)."""
    src_host, src_port = source.rsplit(":", 1)
    dst_host, dst_port = target.rsplit(":", 1)
    return (
        f"SELECT citus_move_shard_placement({'<new shard>' if shard is None else shard},"
        f" {quote_literal(src_host)}, {int(src_port)}, {quote_literal(dst_host)}, {int(dst_port)},"
        " shard_transfer_mode => 'block_writes')"
    )
