"""Nothing one tenant's SQL leaves on a pooled connection reaches the next checkout.

In every deployment (RLS, RLS signed, schema, hardened schema, database per tenant), acme's
session runs raw SQL that leaves session state behind, in several spellings each; then the
next checkout of the same pool (one connection) serves globex (acme again under database per
tenant, whose connections never change tenant). Outcome per cell: the state is gone, the next
request succeeds with exactly its own rows (read back as the admin), nothing of acme's reached
it. What is read back comes from the server: the session's own catalog views, the pid.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import tenant_scope
from asgi_tenancy.sqlalchemy import TenantDatabase, hooks
from tests.adversarial.deployments import KINDS, Deployment, deployed
from tests.conftest import PgServer


@dataclass(frozen=True)
class Leftover:
    """Raw SQL acme runs, and a probe the next session runs: it must answer ``clean``."""

    name: str
    attacks: tuple[str, ...]
    probe: str
    clean: object


LEFTOVERS = [
    Leftover(
        "setting",
        (
            "SET app.leak = 'acme'",
            "/* hidden */ SET SESSION app.leak TO 'acme'",
            "SELECT set_config('app.leak', 'acme', false)",
            "SELECT \"set_config\"('app.leak', 'acme', false)",
            "SELECT pg_catalog.set_config('app.leak', 'acme', 1 = 0)",
            "WITH x AS (SELECT set_config('app.leak', 'acme', false)) SELECT * FROM x",
        ),
        "SELECT coalesce(current_setting('app.leak', true), '')",
        "",
    ),
    Leftover(
        "row_security",
        ("SET row_security = off", "SELECT set_config('row_security', 'off', false)"),
        "SELECT current_setting('row_security')",
        "on",
    ),
    Leftover(
        "advisory lock",
        (
            "SELECT pg_advisory_lock(4242)",
            "SELECT (4242::bigint).pg_advisory_lock",
            "SELECT x FROM (SELECT pg_try_advisory_lock(4242) AS x) s",
            "SELECT pg_advisory_lock_shared(4242)",
        ),
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        0,
    ),
    Leftover(
        "prepared statement",
        ("PREPARE leak AS SELECT 1", "/**/prepare leak(int) AS SELECT $1"),
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leak'",
        0,
    ),
    Leftover(
        "listener",
        ("LISTEN leak", 'listen "leak"'),
        "SELECT count(*) FROM pg_listening_channels()",
        0,
    ),
    Leftover(
        "held cursor",
        ("DECLARE leak CURSOR WITH HOLD FOR SELECT 1",),
        "SELECT count(*) FROM pg_cursors WHERE name = 'leak'",
        0,
    ),
    Leftover(
        "random seed",
        ("SELECT setseed(0.25)", "SELECT (0.25::float8).setseed"),
        "SELECT 0",
        0,  # the session's generator is not reseeded: it is another session (pid below)
    ),
    Leftover(
        "sequence state",
        ("SELECT nextval('public.leak_seq')",),
        "SELECT 0",
        0,  # not a reason to replace: reset when the connection changes tenant (below)
    ),
]
CASES = [(leftover, attack) for leftover in LEFTOVERS for attack in leftover.attacks]


@pytest.fixture(scope="module", params=KINDS)
def deployment(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    yield from deployed(pg_server, request.param)


@pytest.fixture
async def database(deployment: Deployment) -> AsyncIterator[TenantDatabase]:
    db = deployment.make()
    await db.validate()
    yield db
    await db.dispose()


async def _admin_items(deployment: Deployment, tenant: str) -> list[str]:
    engine = create_async_engine(deployment.admin_urls[tenant])
    try:
        async with engine.connect() as conn:
            table = deployment.items[tenant]
            where = " WHERE tenant_id = :t" if deployment.kind.startswith("row") else ""
            rows = await conn.execute(
                text(f"SELECT body FROM {table}{where} ORDER BY id"), {"t": tenant}
            )
            return list(rows.scalars())
    finally:
        await engine.dispose()


async def _attack(db: TenantDatabase, deployment: Deployment, attack: str) -> int:
    """acme runs the attack (and commits if it can); the pid it ran on."""
    async with tenant_scope(deployment.tenants["acme"]), db.session() as s:
        pid = int(await s.scalar(text("SELECT pg_backend_pid()")) or 0)
        try:
            await s.execute(text(attack))
            await s.commit()
        except Exception:  # refused by the server (a privilege): nothing was left
            await s.rollback()
    return pid


@pytest.mark.parametrize(("leftover", "attack"), CASES, ids=lambda c: getattr(c, "name", c))
async def test_nothing_left_on_a_connection_reaches_the_next_checkout(
    deployment: Deployment, database: TenantDatabase, leftover: Leftover, attack: str
) -> None:
    if leftover.name == "sequence state":
        await _grant_sequence(deployment)
    pid = await _attack(database, deployment, attack)
    following = "acme" if deployment.kind == "database" else "globex"
    async with tenant_scope(deployment.tenants[following]), database.session() as s:
        probed = await s.scalar(text(leftover.probe))
        next_pid = await s.scalar(text("SELECT pg_backend_pid()"))
        if leftover.name == "sequence state" and deployment.kind != "database":
            assert next_pid == pid  # drawing a sequence value does not cost a reconnect
            if deployment.kind in ("row-signed", "schema-hardened"):
                # Each signed BEGIN draws the signing session's counter: lastval() is that.
                with pytest.raises(Exception, match=r"currval of sequence .leak_seq."):
                    await s.execute(text("SELECT currval('public.leak_seq')"))
            else:
                with pytest.raises(Exception, match="lastval is not yet defined"):
                    await s.execute(text("SELECT lastval()"))
            await s.rollback()
        bodies = list((await s.execute(text("SELECT body FROM items ORDER BY id"))).scalars())
    if leftover.clean is not None:
        assert probed == leftover.clean
    assert bodies == await _admin_items(deployment, following)
    if leftover.name not in ("sequence state",):
        assert next_pid != pid  # a connection that may carry state was replaced, not reused


async def _grant_sequence(deployment: Deployment) -> None:
    for tenant in ("acme", "globex"):
        engine = create_async_engine(deployment.admin_urls[tenant])
        try:
            async with engine.begin() as conn:
                await conn.execute(text("CREATE SEQUENCE IF NOT EXISTS public.leak_seq"))
                await conn.execute(text("GRANT USAGE ON SEQUENCE public.leak_seq TO PUBLIC"))
        finally:
            await engine.dispose()


async def test_an_advisory_lock_taken_inside_an_allowed_function_is_released_for_the_next_tenant(
    deployment: Deployment, database: TenantDatabase
) -> None:
    """The application vouches for its function (``safe_functions``), which takes a session
    advisory lock anyway: the connection is kept, and the next tenant's BEGIN releases it
    (under the signed binding, in the same SELECT as the counter). A database per tenant
    serves globex on another database: nothing of acme's is there."""
    for tenant in ("acme", "globex"):
        schema = deployment.items[tenant].rpartition(".")[0] or "public"
        engine = create_async_engine(deployment.admin_urls[tenant])
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        f"CREATE OR REPLACE FUNCTION {schema}.app_lock() RETURNS bigint"
                        " LANGUAGE sql AS 'SELECT count(pg_advisory_lock(4343))'"
                    )
                )
        finally:
            await engine.dispose()
    hygiene = hooks.hygiene_of(database.engine)
    assert hygiene is not None
    hygiene.with_functions([*hygiene.functions, "app_lock"])
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    async with tenant_scope(deployment.tenants["acme"]), database.session() as s:
        await s.execute(text("SELECT app_lock()"))
        pid = await s.scalar(text("SELECT pg_backend_pid()"))
        assert await s.scalar(text(held)) == 1
    async with tenant_scope(deployment.tenants["globex"]), database.session() as s:
        next_pid = await s.scalar(text("SELECT pg_backend_pid()"))
        assert await s.scalar(text(held)) == 0
        bodies = list((await s.execute(text("SELECT body FROM items ORDER BY id"))).scalars())
    assert bodies == await _admin_items(deployment, "globex")
    assert (next_pid == pid) is (deployment.kind != "database")  # kept, not replaced
