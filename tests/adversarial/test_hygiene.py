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
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy import tenant_scope
from asgi_tenancy.sqlalchemy import TenantDatabase, hooks
from asgi_tenancy.sqlalchemy.hygiene import SESSION_LOCKS
from tests.adversarial.deployments import KINDS, Deployment, deployed
from tests.conftest import APP_ROLE, PgServer, admin_run


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


# -- a role that cannot take session advisory locks -------------------------------------------

#: Every overload of every session-level lock function, in several notations; also from a view,
#: which the statement's text does not show.
_LOCK_SPELLINGS = [
    spelling
    for name in SESSION_LOCKS
    for spelling in (
        f"SELECT {name}(4646)",
        f"SELECT pg_catalog.{name}(46, 46)",
        f'SELECT "{name}"(4646::bigint)',
        f"SELECT (4646::bigint).{name}",
        f"WITH x AS (SELECT {name}(4646) AS l) SELECT * FROM x",
        f"SELECT * FROM {name}(4646)",
        f"VALUES ({name}(4646))",
    )
] + ["SELECT * FROM public.lock_view"]
_HELD = (
    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
    " WHERE l.locktype = 'advisory' AND a.usename = :role"
)
_SHARED = ("row", "row-signed", "schema", "schema-hardened")


async def _revoke_session_locks(deployment: Deployment, *, grant: bool = False) -> None:
    verb, direction = ("GRANT", "TO") if grant else ("REVOKE", "FROM")
    loop = (
        "DO $$DECLARE f regprocedure; BEGIN FOR f IN SELECT oid FROM pg_proc WHERE proname IN"
        f" ({', '.join(repr(n) for n in SESSION_LOCKS)}) LOOP"
        f" EXECUTE format('{verb} EXECUTE ON FUNCTION %s {direction} PUBLIC', f); END LOOP; END$$"
    )
    view = "CREATE OR REPLACE VIEW public.lock_view AS SELECT count(pg_advisory_lock(4747)) AS l"
    for db in deployment.databases:
        await admin_run(db.admin_url, loop, view, f"GRANT SELECT ON public.lock_view TO {APP_ROLE}")


async def _releases_locks(db: TenantDatabase) -> bool:
    """Validate ``db``: whether a change of tenant will release session advisory locks."""
    await db.validate()
    hygiene = hooks.hygiene_of(db.engine)
    assert hygiene is not None
    return hygiene.session_locks


async def _locks_held(deployment: Deployment) -> int:
    """Advisory locks the serving role's backends hold, anywhere on the server (as the admin)."""
    engine = create_async_engine(deployment.databases[0].admin_url)
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(text(_HELD), {"role": APP_ROLE}) or 0)
    finally:
        await engine.dispose()


async def test_a_role_that_cannot_take_session_locks_is_spared_the_release(
    deployment: Deployment,
) -> None:
    """With every session-level lock function revoked from PUBLIC, validate() finds the role
    cannot take one (a change of tenant then sends no release: a statement less per request),
    and no spelling takes one: each is refused by the server, and the admin sees none held."""
    await _revoke_session_locks(deployment)
    db = deployment.make()
    try:
        assert await _releases_locks(db) is False
        for spelling in _LOCK_SPELLINGS:
            async with tenant_scope(deployment.tenants["acme"]), db.session() as s:
                with pytest.raises(Exception, match="permission denied for function"):
                    await s.execute(text(spelling))
            assert await _locks_held(deployment) == 0, spelling
        async with tenant_scope(deployment.tenants["globex"]), db.session() as s:
            bodies = list((await s.execute(text("SELECT body FROM items ORDER BY id"))).scalars())
        assert bodies == await _admin_items(deployment, "globex")
    finally:
        await db.dispose()
        await _revoke_session_locks(deployment, grant=True)


#: How the serving role reaches the role that may lock: a plain membership (its privileges are
#: inherited), or through a NOINHERIT role (only ``SET ROLE`` reaches them).
_MEMBERSHIPS = {
    "inherited": [f"GRANT tenancy_locker TO {APP_ROLE}"],
    "set role only": [
        "CREATE ROLE tenancy_hop NOLOGIN NOINHERIT",
        "GRANT tenancy_locker TO tenancy_hop",
        f"GRANT tenancy_hop TO {APP_ROLE}",
    ],
}
_LEAVE = [
    f"REVOKE tenancy_locker FROM {APP_ROLE}",
    "DROP ROLE IF EXISTS tenancy_hop",
    "DROP ROLE tenancy_locker",
]


@pytest.mark.parametrize("membership", sorted(_MEMBERSHIPS))
@pytest.mark.parametrize("deployment", _SHARED, indirect=True)  # tenants share connections
async def test_a_role_that_may_become_one_that_locks_keeps_the_release(
    deployment: Deployment, membership: str
) -> None:
    """Revoked from PUBLIC but granted to a role the serving role may become: ``SET LOCAL
    ROLE`` and a view take a lock no statement text shows. validate() counts that role, and
    the next tenant's BEGIN releases the lock (the admin sees it held, then gone)."""
    await _revoke_session_locks(deployment)
    urls = set(deployment.admin_urls.values())
    grant = "GRANT EXECUTE ON FUNCTION pg_advisory_lock(bigint) TO tenancy_locker"
    first = next(iter(urls))
    await admin_run(first, "CREATE ROLE tenancy_locker NOLOGIN", *_MEMBERSHIPS[membership])
    db = deployment.make()
    try:
        for url in urls:
            await admin_run(url, grant, "GRANT SELECT ON public.lock_view TO tenancy_locker")
        assert await _releases_locks(db) is True
        async with tenant_scope(deployment.tenants["acme"]), db.session() as s:
            pid = await s.scalar(text("SELECT pg_backend_pid()"))
            await s.execute(text("SET LOCAL ROLE tenancy_locker"))
            await s.execute(text("SELECT * FROM public.lock_view"))
            await s.commit()
        assert await _locks_held(deployment) == 1  # kept across the commit: a session lock
        async with tenant_scope(deployment.tenants["globex"]), db.session() as s:
            assert await s.scalar(text("SELECT pg_backend_pid()")) == pid  # the same connection
            assert await _locks_held(deployment) == 0  # released by globex's BEGIN
            bodies = list((await s.execute(text("SELECT body FROM items ORDER BY id"))).scalars())
        assert bodies == await _admin_items(deployment, "globex")
    finally:
        await db.dispose()
        for url in urls:
            await admin_run(
                url,
                "REVOKE ALL ON public.lock_view FROM tenancy_locker",
                "REVOKE EXECUTE ON FUNCTION pg_advisory_lock(bigint) FROM tenancy_locker",
            )
        await admin_run(first, *_LEAVE)
        await _revoke_session_locks(deployment, grant=True)


async def test_functions_the_application_vouches_for_keep_the_release(
    deployment: Deployment,
) -> None:
    """``safe_functions`` are not judged, so they may lock unseen: with any declared, a change
    of tenant releases locks even where the role itself cannot take them."""
    await _revoke_session_locks(deployment)
    db = deployment.make()
    try:
        db._safe_functions = ("app_function",)
        assert await _releases_locks(db) is True
    finally:
        await db.dispose()
        await _revoke_session_locks(deployment, grant=True)


@pytest.mark.parametrize("deployment", ["row", "schema"], indirect=True)
async def test_validation_connects_once(deployment: Deployment) -> None:
    """validate()'s catalog reads (the allow-list, who may lock) are not judged, so they leave
    their connection reusable: the strategy's checks run on it, no second connection is made
    (behind PgBouncer a replacement may land on a server connection another client's session
    used). The signed modes' checks open a signing session and draw its counter, and
    DatabasePerTenant's call a volatile catalog function: those connections are replaced after,
    as any that may carry session state."""
    db = deployment.make()
    connects: list[object] = []
    event.listen(db.engine.sync_engine.pool, "connect", lambda *_: connects.append(1))
    try:
        await db.validate()
    finally:
        await db.dispose()
    assert len(connects) == 1
