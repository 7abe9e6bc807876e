"""The plan of a database-per-tenant move, and what it checks before anything is made.

Everything a dry run answers: where the tenant is and where it would go, that the target is
another reachable server with the tenant's role and no database of its name, and that the
source holds exactly the provisioner's tables (``move.py`` runs the plan).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ...errors import IsolationConfigError, TenantPlacementError
from ...tenant import Tenant, TenantStatus
from ..moves import TenantMove
from ..placement import PlacementContext
from ..postgres import check_name, owned_by, qualified_name, quote_ident, quote_literal
from .databases import IDENTITY_SQL, url_target

if TYPE_CHECKING:
    from .strategy import DatabasePerTenant

__all__ = [
    "ALEMBIC_DDL",
    "LOCK_TIMEOUT",
    "CopiedTable",
    "MovePlan",
    "check_shape",
    "plan_move",
    "shown",
]

#: How long the move waits for the writes already running on the source to finish.
LOCK_TIMEOUT = "10s"

_ALEMBIC = ("public", "alembic_version")
ALEMBIC_DDL = (
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL,"
    " CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)
#: Rows as text the same way on both servers, whatever their defaults.
_TABLES_SQL = (
    "SELECT n.nspname AS schema, c.relname AS name FROM pg_class c"
    " JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
    " AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
)
_COLUMNS_SQL = (
    "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,"
    " a.attgenerated <> '' AS generated FROM pg_attribute a"
    " WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0 AND NOT a.attisdropped"
    " ORDER BY a.attnum"
)
_SEQUENCES_SQL = (
    "SELECT n.nspname AS schema, c.relname AS name FROM pg_class c"
    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S'"
    " AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' ORDER BY 1, 2"
)


@dataclass(frozen=True)
class CopiedTable:
    """One table of the tenant's database: its name as SQL, and the columns ``COPY`` carries."""

    schema: str
    name: str
    columns: tuple[str, ...]
    shape: tuple[tuple[str, str], ...]

    @property
    def sql(self) -> str:
        return qualified_name(self.schema, self.name)

    @property
    def label(self) -> str:
        """The name in reports: ``public`` left out."""
        return qualified_name(None if self.schema == "public" else self.schema, self.name)

    @property
    def select(self) -> str:
        return f"SELECT {', '.join(quote_ident(c) for c in self.columns)} FROM {self.sql}"


@dataclass(frozen=True)
class MovePlan:
    tenant: Tenant
    database: str
    grantee: str
    source_admin: URL  # the tenant's database, as the owner
    source_server: URL  # a maintenance database on the source's server, as the owner
    target_server: URL
    target_app: URL  # what the registry will hold
    tables: tuple[CopiedTable, ...]  # in dependency order
    sequences: tuple[str, ...]
    alembic: bool
    move: TenantMove


async def plan_move(
    strategy: DatabasePerTenant, context: PlacementContext, tenant: Tenant, to: str
) -> MovePlan:
    """The move as it would run now, or a refusal; reads both servers, changes nothing."""
    if strategy.url_for is not None:
        raise IsolationConfigError(
            "the tenant's URL comes from url_for: a move cannot point it at another server",
            hint="store the URL in the tenant attribute (url_attribute), or move it by hand",
        )
    if context.metadata is None:
        raise IsolationConfigError(
            "a move creates the tenant's tables on the target from the provisioner's metadata",
            hint="TenantProvisioner(..., metadata=<the tenant tables' MetaData>)",
        )
    if tenant.status is TenantStatus.MIGRATING:
        raise TenantPlacementError(
            "the tenant is being migrated", hint="move it when its migration is done"
        )
    url = strategy.url_of(tenant)
    database = check_name(url.database, "database", error=TenantPlacementError)
    admin = context.admin_engine.url
    source_admin = url.set(
        drivername=admin.drivername, username=admin.username, password=admin.password
    )
    same_as_admin = url_target(url)[:3] == url_target(admin)[:3]
    source_server = admin if same_as_admin else source_admin.set(database="postgres")
    target_server = _target_url(to, admin)
    if url_target(target_server)[:3] == url_target(url)[:3]:
        raise IsolationConfigError(
            "the target is the server the tenant is on already", hint="--to <another server>"
        )
    grantee = url.username or context.app_role
    source_id, tables, sequences = await _read_source(source_admin, tenant, database)
    target_id = await _read_target(target_server, database, grantee)
    if target_id == source_id:
        raise IsolationConfigError(
            "the target is the server the tenant is on already (same system identifier)",
            hint="--to <another server>",
        )
    ordered = _in_order(tables, context.metadata)
    alembic = _ALEMBIC in tables
    target_app = _on_server(url, target_server)
    statements = _statements(database, grantee, ordered, sequences)
    move = TenantMove(
        tenant_id=tenant.id,
        strategy=strategy.name,
        source=shown(url),
        target=shown(target_app),
        statements=tuple(statements),
        dry_run=True,
        details={"database": database, "tables": len(ordered), "sequences": len(sequences)},
    )
    return MovePlan(
        tenant=tenant,
        database=database,
        grantee=grantee,
        source_admin=source_admin,
        source_server=source_server,
        target_server=target_server,
        target_app=target_app,
        tables=ordered,
        sequences=sequences,
        alembic=alembic,
        move=move,
    )


def _target_url(to: str, admin: URL) -> URL:
    try:
        url = make_url(to)
    except ArgumentError:
        raise IsolationConfigError(
            "--to must be the target server's admin URL",
            hint="postgresql://owner:password@host:5432/postgres",
        ) from None
    if url.get_backend_name() != "postgresql":
        raise IsolationConfigError(
            "the target must be a PostgreSQL server",
            hint="postgresql://owner:password@host:5432/postgres",
        )
    if url.drivername == "postgresql":  # no driver named: the admin engine's (async) one
        url = url.set(drivername=admin.drivername)
    return url.set(database=url.database or "postgres")


def _on_server(url: URL, server: URL) -> URL:
    """``url`` (the tenant's, its role and database) on ``server``'s host and port."""
    query = {k: v for k, v in url.query.items() if k not in ("host", "port")}
    query.update({k: v for k, v in server.query.items() if k in ("host", "port")})
    # URL.create, not URL.set: set() cannot clear a host (a Unix socket target has none).
    return URL.create(
        url.drivername,
        username=url.username,
        password=url.password,
        host=server.host,
        port=server.port,
        database=url.database,
        query=query,
    )


def shown(url: URL) -> str:
    """A URL for reports: no password, no driver."""
    return url.set(password=None, drivername=url.get_backend_name()).render_as_string()


async def _read_source(
    url: URL, tenant: Tenant, database: str
) -> tuple[str, dict[tuple[str, str], CopiedTable], tuple[str, ...]]:
    """The source server's identity, the tables (with columns) and sequences of the tenant's
    database; refuses a database that does not carry the tenant's marker."""
    async with _connected(url, "the tenant's database cannot be reached as the admin") as conn:
        identity = (await conn.execute(text(IDENTITY_SQL))).one()
        if not await owned_by(conn, "database", database, tenant.id):
            raise TenantPlacementError("the tenant's database does not exist", check="A010")
        tables = {}
        for row in (await conn.execute(text(_TABLES_SQL))).all():
            table = await _table(conn, str(row.schema), str(row.name))
            tables[(table.schema, table.name)] = table
        sequences = tuple(
            qualified_name(str(r.schema), str(r.name))
            for r in (await conn.execute(text(_SEQUENCES_SQL))).all()
        )
        await conn.rollback()
    return str(identity.server), tables, sequences


async def _table(conn: AsyncConnection, schema: str, name: str) -> CopiedTable:
    columns = (await conn.execute(text(_COLUMNS_SQL), {"t": qualified_name(schema, name)})).all()
    return CopiedTable(
        schema=schema,
        name=name,
        columns=tuple(str(c.name) for c in columns if not c.generated),
        shape=tuple((str(c.name), str(c.type)) for c in columns),
    )


async def _read_target(server: URL, database: str, grantee: str) -> str:
    async with _connected(server, "the target server cannot be reached") as conn:
        identity = (await conn.execute(text(IDENTITY_SQL))).one()
        if not identity.superuser:
            can = await conn.scalar(
                text("SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user")
            )
            if not can:
                raise IsolationConfigError(
                    "the target URL's role may not create databases",
                    hint="connect --to as the owner role (CREATEDB) of the target server",
                )
        found = await conn.scalar(
            text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": database}
        )
        if found is not None:
            raise TenantPlacementError(
                "a database of the tenant's name exists on the target server already",
                hint=f"drop it there (DROP DATABASE {quote_ident(database)}) or move elsewhere",
            )
        role = await conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": grantee})
        if role is None:
            raise IsolationConfigError(
                "the tenant's database role does not exist on the target server",
                hint=f"CREATE ROLE {quote_ident(grantee)} LOGIN PASSWORD '...' NOSUPERUSER"
                " NOBYPASSRLS on the target, with the same password",
            )
        await conn.rollback()
    return str(identity.server)


@asynccontextmanager
async def _connected(url: URL, refusal: str) -> AsyncIterator[AsyncConnection]:
    engine = create_async_engine(url, poolclass=NullPool, connect_args={"timeout": 10})
    try:
        try:
            conn = await engine.connect()
        except Exception:
            # The driver's message may carry the URL: it stays out of the error and its chain.
            raise TenantPlacementError(
                refusal, hint="check the host, port and credentials of the URL"
            ) from None
        try:
            yield conn
        finally:
            await conn.close()
    finally:
        await engine.dispose()


def _in_order(
    tables: dict[tuple[str, str], CopiedTable], metadata: sa.MetaData
) -> tuple[CopiedTable, ...]:
    """The source's tables in foreign-key order; they must be exactly ``metadata``'s (and
    ``alembic_version``), or the copy could not be complete."""
    expected = [(t.schema or "public", t.name) for t in metadata.sorted_tables]
    found = set(tables) - {_ALEMBIC}
    missing, unknown = set(expected) - found, found - set(expected)
    if missing or unknown:
        names = sorted(qualified_name(*n) for n in missing | unknown)
        raise IsolationConfigError(
            "the tenant's database does not hold exactly the provisioner's metadata tables",
            hint=f"differing tables: {', '.join(names)}; migrate the tenant and update the"
            " metadata first",
        )
    ordered = [tables[_ALEMBIC]] if _ALEMBIC in tables else []
    return tuple(ordered + [tables[n] for n in expected])


def _statements(
    database: str, grantee: str, tables: Sequence[CopiedTable], sequences: Sequence[str]
) -> list[str]:
    name, role = quote_ident(database), quote_ident(grantee)
    listed = ", ".join(t.sql for t in tables)
    return [
        f"-- target: CREATE DATABASE {name}",
        f"-- target: COMMENT ON DATABASE {name}; REVOKE CONNECT, TEMPORARY ... FROM PUBLIC;"
        f" GRANT CONNECT ON DATABASE {name} TO {role}",
        f"-- target: metadata.create_all ({len(tables)} tables); DML grants to {role}",
        f"-- source: BEGIN; SET LOCAL lock_timeout = {quote_literal(LOCK_TIMEOUT)};"
        f" LOCK TABLE {listed} IN EXCLUSIVE MODE",
        *(
            f"COPY ({t.select}) TO STDOUT (FORMAT binary) -> COPY {t.sql} FROM STDIN"
            for t in tables
        ),
        *(f"-- target: SELECT setval({quote_literal(s)}, <source value>)" for s in sequences),
        "-- both: fingerprint (count, checksum) of every table; any difference aborts",
        "-- registry: UPDATE the tenant's URL attribute to the target",
        f"-- source: ALTER DATABASE {name} ALLOW_CONNECTIONS false (after draining reads);"
        f" DROP DATABASE {name} WITH (FORCE)",
    ]


async def check_shape(plan: MovePlan, target: AsyncEngine) -> None:
    """The target's tables (made from metadata) must carry the source's columns and types,
    and its sequences must be the source's."""
    async with target.connect() as conn:
        differ = []
        for table in plan.tables:
            made = await _table(conn, table.schema, table.name)
            if sorted(made.shape) != sorted(table.shape):
                differ.append(table.sql)
        sequences = tuple(
            qualified_name(str(r.schema), str(r.name))
            for r in (await conn.execute(text(_SEQUENCES_SQL))).all()
        )
        await conn.rollback()
    if differ or sorted(sequences) != sorted(plan.sequences):
        raise IsolationConfigError(
            "the tenant's tables differ from the provisioner's metadata: the move is undone",
            hint=f"differing: {', '.join(differ) or 'sequences'}; migrate the tenant and"
            " update the metadata first",
        )


# -- the copy ------------------------------------------------------------------------------
