"""The start-up checks of a signed binding (R012-R014, R017, R019, R020, R023), as the app
role."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ...checks import Finding
from .. import hooks
from ..postgres import quote_ident
from .signing import KEY_SCHEMA, KEY_TABLE, _SignedBinding

if TYPE_CHECKING:
    from .signing import Signer

__all__ = ["check_signer"]

_PROBE = "tenancy-validate-probe"


async def check_signer(signer: Signer, conn: AsyncConnection) -> list[Finding]:
    findings = await _private(conn)
    findings += await _functions(signer, conn)
    if findings:
        return findings
    if signer.pooling == "none":
        findings += await _direct(signer, conn)
    else:
        findings += await _hidden_activity(conn)
    if not findings:
        findings += await _accepted(signer, conn)
    return findings


async def _private(conn: AsyncConnection) -> list[Finding]:
    """R012: the app role can read no key and rewrite no spent nonce."""
    # Catalog joins, not to_regclass(): that needs the schema USAGE the app must not have.
    exposed = await conn.scalar(
        text(
            "SELECT bool_or(has_schema_privilege(n.oid, 'USAGE') AND"
            " (has_table_privilege(c.oid, 'SELECT') OR has_table_privilege(c.oid,"
            " 'INSERT, UPDATE, DELETE, TRUNCATE')))"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = :schema AND c.relname IN ('binding_keys', 'spent_nonces')"
        ),
        {"schema": KEY_SCHEMA},
    )
    if not exposed:
        return []
    return [
        Finding(
            "R012",
            KEY_TABLE,
            "the application role can read the keys or rewrite the spent tokens",
            f"REVOKE ALL ON SCHEMA {KEY_SCHEMA} FROM PUBLIC; REVOKE ALL ON ALL TABLES IN"
            f" SCHEMA {KEY_SCHEMA} FROM PUBLIC",
        )
    ]


async def _functions(signer: Signer, conn: AsyncConnection) -> list[Finding]:
    """R013: the verifying and binding functions exist, run as their owner, and the app role
    may call them. Read from the catalog by name: ``to_regprocedure`` needs schema USAGE."""
    second = signer.session_function if signer.pooling == "none" else signer.bind_function
    wanted = [signer.function, second]
    names = [name.split(".", 1)[1] for name in wanted]
    schema = signer.function.split(".", 1)[0].strip('"')
    usable = {
        row.proname
        for row in await conn.execute(
            text(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = :schema AND p.proname = ANY(:names) AND p.prosecdef"
                " AND has_schema_privilege(n.oid, 'USAGE')"
                " AND has_function_privilege(p.oid, 'EXECUTE')"
            ),
            {"schema": schema, "names": names},
        )
    }
    missing = [full for full, name in zip(wanted, names, strict=True) if name not in usable]
    if not missing:
        return []
    return [
        Finding(
            "R013",
            signer.function,
            "the signed binding's functions are missing, not SECURITY DEFINER, or not callable "
            "by the app role (USAGE on their schema): " + ", ".join(missing),
            "install the signed binding as the owner (strategy.install()), and GRANT USAGE ON"
            f" SCHEMA {quote_ident(schema)} TO the app role",
        )
    ]


async def _direct(signer: Signer, conn: AsyncConnection) -> list[Finding]:
    """R017 (a pooling proxy in between) and R019 (the owner cannot keep a signing session)."""
    findings = []
    pid = int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)
    raw = await conn.get_raw_connection()
    get_pid = getattr(raw.driver_connection, "get_server_pid", None)
    if get_pid is not None and int(get_pid()) != pid:
        # The process the driver started with is not the one answering: PgBouncer or another
        # proxy sits in between, and the signing session would be on another server process.
        findings.append(
            Finding(
                "R017",
                "connection",
                "the driver's server process id is not the backend's (a pooling proxy?)",
                "connect directly or through session pooling, or use signed=True with"
                " pooling='transaction' behind transaction pooling",
            )
        )
    findings += await _session_closed(conn)
    owner = await conn.scalar(
        text("SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE oid = to_regprocedure(:s)"),
        {"s": f"{signer.session_function}(text)"},
    )
    may = await conn.scalar(
        text("SELECT has_database_privilege(:owner, current_database(), 'TEMPORARY')"),
        {"owner": owner},
    )
    if not may:
        database = await conn.scalar(text("SELECT current_database()"))
        findings.append(
            Finding(
                "R019",
                str(owner),
                "the signing functions' owner may not create temporary objects, so no "
                "connection can open its signing session",
                f"GRANT TEMPORARY ON DATABASE {quote_ident(str(database))}"
                f" TO {quote_ident(str(owner))}",
            )
        )
    return findings


async def _session_closed(conn: AsyncConnection) -> list[Finding]:
    """R023: on this connection's signing session, the app role may draw the counter and do
    nothing else: no read of the key, no rewind of the counter, no write of the session id
    (the owner's default privileges reach temporary objects; ``tenancy_open_session`` takes
    their grants back)."""
    opened = await conn.scalar(
        text(
            "SELECT has_sequence_privilege('pg_temp.tenancy_key_1', 'SELECT, USAGE, UPDATE')"
            " OR has_sequence_privilege('pg_temp.tenancy_key_2', 'SELECT, USAGE, UPDATE')"
            " OR has_sequence_privilege('pg_temp.tenancy_counter', 'UPDATE')"
            " OR has_table_privilege('pg_temp.tenancy_session', 'INSERT, UPDATE, DELETE, TRUNCATE')"
            " FROM (SELECT to_regclass('pg_temp.tenancy_key_1') IS NOT NULL AS made) s"
            " WHERE s.made"
        )
    )
    if not opened:
        return []
    return [
        Finding(
            "R023",
            "tenancy_open_session",
            "the application role can read the signing session's key or move its counter back",
            "install the signed binding again (strategy.install() or its ddl()) as the owner, and"
            " check the owner's ALTER DEFAULT PRIVILEGES",
        )
    ]


async def _hidden_activity(conn: AsyncConnection) -> list[Finding]:
    """R020: behind transaction pooling a token is single-use, not bound to a connection: no
    session of the app role may read another's query text while it is in flight."""
    shown = await conn.scalar(text("SELECT current_setting('track_activities')"))
    if shown == "off":
        return []
    role = await conn.scalar(text("SELECT current_user"))
    return [
        Finding(
            "R020",
            str(role),
            "the app role's sessions show their query text (and binding tokens) to each other "
            "in pg_stat_activity",
            f"ALTER ROLE {quote_ident(str(role))} SET track_activities = off  (as a superuser)",
        )
    ]


async def _accepted(signer: Signer, conn: AsyncConnection) -> list[Finding]:
    """R014: the database accepts a binding signed with this application's first key."""
    state = hooks.connection_state(conn.sync_connection.info)  # type: ignore[union-attr]
    if signer.connect_sql is not None:  # the connection's signing session (idempotent)
        state.session_key = str(await conn.scalar(text(signer.connect_sql)))
    state.counter += 1
    binding = signer.binding(_PROBE)
    assert isinstance(binding, _SignedBinding)
    try:
        async with conn.begin_nested() as savepoint:
            for statement in binding.statements(state.session_key, state.counter):
                await conn.execute(text(statement))
            accepted = await conn.scalar(text(f"SELECT {signer.function}()"))
            await savepoint.rollback()
    except Exception:
        accepted = None
    if accepted == _PROBE:
        return []
    return [
        Finding(
            "R014",
            KEY_TABLE,
            "the database does not accept this application's signing key",
            "run install_keys() with it (as the owner)",
        )
    ]
