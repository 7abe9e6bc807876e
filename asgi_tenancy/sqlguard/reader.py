"""The reader role behind the guard: its set-up SQL and the audit check that it holds.

``SqlGuard(..., reader_role="tenancy_report")`` makes ``run()`` switch to that role inside
the tenant-bound transaction (``set_config('role', ..., true)``). A role that may read the
declared tables and nothing else, with no memberships, no writes, no temporary tables and no
``set_config`` (which would let SQL switch the role back or rewrite an unsigned RLS binding),
is a second wall that holds where the guard is wrong. Codes G001-G010 are stable.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import text

from ..checks import Finding
from .guard import SqlGuard, check_name

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["SET_CONFIG", "check_reader_role", "reader_role_ddl"]

SET_CONFIG = "pg_catalog.set_config(text, text, boolean)"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def reader_role_ddl(
    guard: SqlGuard,
    role: str,
    *,
    app_role: str,
    schema: str = "public",
    functions: Iterable[str] = (),
    revoke_set_config: bool = True,
) -> list[str]:
    """The statements (run as an owner or superuser) that make ``role`` the guard's reader.

    ``schema``: where the declared tables live (under schema per tenant, one reader role per
    tenant schema). ``functions``: signatures the policies call (``public.tenancy_current_tenant()``
    keeps PUBLIC's EXECUTE unless revoked). ``revoke_set_config`` takes ``set_config`` from
    PUBLIC and gives it back to ``app_role``: the reader can then neither leave the role nor
    rewrite a binding.
    """
    check_name("reader role", role)
    check_name("application role", app_role)
    check_name("schema", schema)
    r, app = _q(role), _q(app_role)
    statements = [
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {_lit(role)})"
        f" THEN CREATE ROLE {r} NOLOGIN; END IF; END $$",
        f"ALTER ROLE {r} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION",
        f"GRANT {r} TO {app}",
        f"GRANT USAGE ON SCHEMA {_q(schema)} TO {r}",
    ]
    for name, declared in guard.columns.items():
        relation = f"{_q(schema)}.{_q(name)}"
        if declared is None:
            statements.append(f"GRANT SELECT ON {relation} TO {r}")
        else:
            columns = ", ".join(_q(c) for c in declared)
            statements.append(f"GRANT SELECT ({columns}) ON {relation} TO {r}")
    for signature in functions:
        statements.append(f"GRANT EXECUTE ON FUNCTION {signature} TO {r}")
    if revoke_set_config:
        statements += [
            f"REVOKE EXECUTE ON FUNCTION {SET_CONFIG} FROM PUBLIC",
            f"GRANT EXECUTE ON FUNCTION {SET_CONFIG} TO {app}",
        ]
    return statements


_ROLE = text(
    "SELECT r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb, r.rolreplication,"
    " r.rolcanlogin, pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER') AS reachable,"
    " pg_catalog.has_function_privilege(r.oid, 'pg_catalog.set_config(text, text, boolean)',"
    " 'EXECUTE') AS set_config,"
    " pg_catalog.has_database_privilege(r.oid, pg_catalog.current_database(), 'TEMPORARY')"
    " AS temp, (SELECT pg_catalog.string_agg(g.rolname, ', ' ORDER BY g.rolname)"
    " FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles g ON g.oid = m.roleid"
    " WHERE m.member = r.oid) AS member_of"
    " FROM pg_catalog.pg_roles r WHERE r.rolname = :role"
)
# Every relation outside the system schemas the role can read or write, and schemas where it
# may create objects.
_RELATIONS = text(
    "SELECT n.nspname, c.relname, c.relkind,"
    " pg_catalog.has_table_privilege(:role, c.oid, 'SELECT')"
    " OR pg_catalog.has_any_column_privilege(:role, c.oid, 'SELECT') AS can_read,"
    " c.relkind <> 'S' AND pg_catalog.has_table_privilege(:role, c.oid,"
    " 'INSERT, UPDATE, DELETE, TRUNCATE') AS can_write,"
    " c.relkind = 'S' AND pg_catalog.has_sequence_privilege(:role, c.oid, 'USAGE, SELECT, UPDATE')"
    " AS can_use"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')"
    " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"
)
_CREATE = text(
    "SELECT n.nspname FROM pg_catalog.pg_namespace n"
    " WHERE pg_catalog.has_schema_privilege(:role, n.oid, 'CREATE')"
    " AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1"
)


async def check_reader_role(
    conn: AsyncConnection, guard: SqlGuard, role: str, *, schema: str = "public"
) -> list[Finding]:
    """Every reason ``role`` would not be a wall behind ``guard``; empty when it holds.

    Run on a connection of the application role (for G002) in the database the guard reads.
    """
    check_name("reader role", role)
    subject = f"reader role {role!r}"
    found = (await conn.execute(_ROLE, {"role": role})).mappings().first()
    if found is None:
        return [
            Finding(
                "G001",
                subject,
                "the role does not exist, so run() cannot switch to it",
                f"CREATE ROLE {_q(role)} NOLOGIN (see reader_role_ddl)",
            )
        ]
    findings: list[Finding] = []
    if not found["reachable"]:
        findings.append(
            Finding(
                "G002",
                subject,
                "the application role is not a member, so run() cannot switch to it",
                f"GRANT {_q(role)} TO <application role>",
            )
        )
    powers = [
        label
        for label, key in (
            ("SUPERUSER", "rolsuper"),
            ("BYPASSRLS", "rolbypassrls"),
            ("CREATEROLE", "rolcreaterole"),
            ("CREATEDB", "rolcreatedb"),
            ("REPLICATION", "rolreplication"),
            ("LOGIN", "rolcanlogin"),
        )
        if found[key]
    ]
    if powers:
        findings.append(
            Finding(
                "G003",
                subject,
                f"the role has {', '.join(powers)}; a reader needs none",
                f"ALTER ROLE {_q(role)} " + " ".join(f"NO{p}" for p in powers),
            )
        )
    if found["member_of"]:
        findings.append(
            Finding(
                "G004",
                subject,
                f"the role is a member of {found['member_of']} and has its privileges "
                "(pg_read_all_stats shows other sessions' SQL, pg_signal_backend ends them)",
                f"REVOKE <role> FROM {_q(role)} for each of: {found['member_of']}",
            )
        )
    if found["set_config"]:
        findings.append(
            Finding(
                "G005",
                subject,
                "the role can call set_config(), so SQL that bypasses the guard can switch back "
                "to the application role and rewrite an unsigned RLS binding",
                f"REVOKE EXECUTE ON FUNCTION {SET_CONFIG} FROM PUBLIC;"
                f" GRANT EXECUTE ON FUNCTION {SET_CONFIG} TO <application role>",
            )
        )
    if found["temp"]:
        findings.append(
            Finding(
                "G006",
                subject,
                "the role may create temporary tables",
                "REVOKE TEMPORARY ON DATABASE <database> FROM PUBLIC "
                "(then GRANT it to the roles that need it)",
            )
        )
    declared = {(schema, name) for name in guard.tables}
    readable: set[tuple[str, str]] = set()
    for row in (await conn.execute(_RELATIONS, {"role": role})).mappings():
        where = (row["nspname"], row["relname"])
        name = f"{_q(row['nspname'])}.{_q(row['relname'])}"
        if row["can_read"]:
            readable.add(where)
        if row["can_write"]:
            findings.append(
                Finding(
                    "G007",
                    f"{subject} on {name}",
                    "the role can write to a relation",
                    f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {name} FROM {_q(role)}",
                )
            )
        if (row["can_read"] or row["can_use"]) and where not in declared:
            kind = "sequence" if row["relkind"] == "S" else "relation"
            findings.append(
                Finding(
                    "G008",
                    f"{subject} on {name}",
                    f"the role can read a {kind} the guard does not declare",
                    f"REVOKE ALL ON {name} FROM {_q(role)} (and from PUBLIC)",
                )
            )
    for schema_name in (await conn.execute(_CREATE, {"role": role})).scalars():
        findings.append(
            Finding(
                "G010",
                f"{subject} on schema {_q(schema_name)}",
                "the role may create objects in a schema",
                f"REVOKE CREATE ON SCHEMA {_q(schema_name)} FROM {_q(role)} (and from PUBLIC)",
            )
        )
    for name in sorted(guard.tables):
        if (schema, name) not in readable:
            findings.append(
                Finding(
                    "G009",
                    f"{subject} on {_q(schema)}.{_q(name)}",
                    "the role cannot read a declared table, so guarded queries on it fail",
                    f"GRANT USAGE ON SCHEMA {_q(schema)} TO {_q(role)}; GRANT SELECT ON "
                    f"{_q(schema)}.{_q(name)} TO {_q(role)} (see reader_role_ddl)",
                )
            )
    return findings
