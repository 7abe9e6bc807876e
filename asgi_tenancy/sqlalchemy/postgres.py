"""PostgreSQL primitives every strategy and operation shares: names, quoting, grants, markers.

One way to quote an identifier (SQLAlchemy's PostgreSQL preparer: quoted where PostgreSQL
needs it), one literal quoter for values already validated, one rule for the names the library
creates (plain lower-case identifiers, nothing reserved), and one set of DML grants.
"""

from __future__ import annotations

import re
from typing import Literal

from sqlalchemy import Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import IsolationConfigError, TenancyError

__all__ = [
    "MARKER",
    "check_name",
    "comment_sql",
    "dml_grants",
    "exists",
    "marker",
    "owned_by",
    "qualified",
    "qualified_name",
    "quote_ident",
    "quote_literal",
    "superuser_fix",
]

_PREPARER = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]

# Lower-case, unquoted-style identifiers only: no case folding surprises, no quoting games.
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
_RESERVED = frozenset({"public", "information_schema", "pg_catalog", "pg_toast", "pg_temp"})

#: The comment on every schema, role and database made for a tenant: ``MARKER + tenant id``.
MARKER = "asgi-tenancy tenant "


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted by SQLAlchemy's PostgreSQL rules where it must be."""
    quoted: str = _PREPARER.quote(name)
    return quoted


def quote_literal(value: str) -> str:
    """A PostgreSQL string literal; callers pass only values already validated."""
    if "\x00" in value:
        raise ValueError("NUL cannot appear in a PostgreSQL literal")
    return "'" + value.replace("'", "''") + "'"


def qualified_name(schema: str | None, name: str) -> str:
    """``schema.name``, each part quoted where it must be."""
    return quote_ident(name) if schema is None else f"{quote_ident(schema)}.{quote_ident(name)}"


def qualified(table: Table) -> str:
    """The table's name as SQL, with its schema when it has one."""
    return qualified_name(table.schema, table.name)


def check_name(name: object, what: str, *, error: type[TenancyError] = IsolationConfigError) -> str:
    """``name`` if it is a plain lower-case identifier outside ``public`` and ``pg_*``.

    ``error`` is raised otherwise: ``IsolationConfigError`` for configuration, a request-time
    error type where the name comes from a tenant's record.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise error(
            f"the {what} name is not a plain lower-case identifier",
            hint="use 1-63 characters from a-z, 0-9 and '_', not starting with a digit",
        )
    if name in _RESERVED or name.startswith("pg_"):
        raise error(f"the {what} name is reserved", hint="choose a name outside public and pg_*")
    return name


def marker(tenant_id: str) -> str:
    """The comment naming the tenant a schema, role or database was made for."""
    return MARKER + tenant_id


def dml_grants(schema: str, grantee: str) -> list[str]:
    """What the serving role gets on a schema: usage, DML on its tables, its sequences."""
    on, to = quote_ident(schema), quote_ident(grantee)
    return [
        f"GRANT USAGE ON SCHEMA {on} TO {to}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {on} TO {to}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {on} TO {to}",
    ]


def superuser_fix(role: str, *, bootstrap: bool) -> str:
    """The fix for an application that connects as a superuser. The bootstrap superuser
    (``postgres``, oid 10) cannot lose SUPERUSER, and should not: the app needs a role of
    its own."""
    if not bootstrap:
        return f"ALTER ROLE {quote_ident(role)} NOSUPERUSER"
    return (
        "connect the application as a dedicated role, never the bootstrap superuser "
        f"{quote_ident(role)}: CREATE ROLE app LOGIN PASSWORD '...' NOSUPERUSER NOBYPASSRLS; "
        "then grant it DML on the tables (docs/getting-started.md, step 4)"
    )


Kind = Literal["schema", "role", "database"]

# The catalogue row of a schema, role or database by name, with its comment.
_CATALOG: dict[Kind, str] = {
    "schema": "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = :n",
    "role": "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = :n",
    "database": "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = :n",
}


def comment_sql(kind: Kind, name: str, tenant_id: str) -> str:
    """``COMMENT ON`` the object with the marker of the tenant it was made for."""
    return f"COMMENT ON {kind.upper()} {quote_ident(name)} IS {quote_literal(marker(tenant_id))}"


async def exists(conn: AsyncConnection, kind: Kind, name: str) -> bool:
    return (await conn.execute(text(_CATALOG[kind]), {"n": name})).first() is not None


async def owned_by(conn: AsyncConnection, kind: Kind, name: str, tenant_id: str) -> bool:
    """Whether the object exists; refuses one that does not carry this tenant's marker, so a
    tampered registry row can never point a ``DROP`` elsewhere."""
    row = (await conn.execute(text(_CATALOG[kind]), {"n": name})).first()
    if row is None:
        return False
    if row[0] != marker(tenant_id):
        raise IsolationConfigError(
            f"the tenant's {kind} was not created for this tenant: it is left in place",
            hint=f"check the tenant's attributes; remove the {kind} by hand if it is stale",
        )
    return True
