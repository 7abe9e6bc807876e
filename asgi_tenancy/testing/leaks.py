"""The generated leak tests: each tenant model attacked by the other tenant, five ways.

Each probe runs both ways (a against b, the seeded rows put back, then b against a) through
the application's own ``TenantDatabase`` and session, as the app role; the verdict comes from
the admin connection, which reads the victim's rows before and after. An attack may be refused
(any exception) or do nothing; it may never change, reveal or add a victim's row. Each probe
also has a control on the attacker's own rows, so a set-up where everything fails does not
pass by doing nothing.

The read also runs plain SQL (``SELECT * FROM <table>``), which no ORM criteria rewrite: with
row-level security it is the policy alone that answers. The move uses a fresh row, whose key
is free at the victim, so a key that includes the tenant column cannot hide a move.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import Column, Table, delete, select, text, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper

from ..context import tenant_scope
from ..sqlalchemy import TenantDatabase
from ..sqlalchemy.postgres import quote_ident
from ..tenant import Tenant
from .harness import TwoTenants
from .kit import TenancyKit
from .rows import ROWS_PER_TENANT, Row, sentinel_for

__all__ = ["PROBES", "LeakFound", "leak_tests", "run_probe"]


class LeakFound(AssertionError):
    """A tenant read, changed or added a row of the other tenant (or a control failed)."""


class _Target:
    """One model under attack: its table, key and attributes."""

    def __init__(self, harness: TwoTenants, model: type[Any]) -> None:
        self.harness = harness
        self.model = model
        self.mapper: Mapper[Any] = sa_inspect(model)
        table = self.mapper.local_table
        assert isinstance(table, Table)
        self.table = table
        self.key = list(self.mapper.primary_key)
        self.label = f"{model.__name__} ({table.name})"

    def attr(self, column: Column[Any]) -> str:
        return self.mapper.get_property_by_column(column).key

    def where_key(self, row: Row) -> list[Any]:
        return [getattr(self.model, self.attr(c)) == row[c.name] for c in self.key]

    def identity(self, row: Row) -> tuple[Any, ...]:
        return tuple(row[c.name] for c in self.key)

    def as_row(self, obj: Any) -> Row:
        return {c.name: getattr(obj, self.attr(c)) for c in self.table.columns}

    def new(self, row: Row) -> Any:
        return self.model(**{self.attr(self.table.c[name]): v for name, v in row.items()})

    async def rows(self, tenant: Tenant) -> list[Row]:
        return await self.harness.rows(self.table, tenant)

    def fail(self, probe: str, message: str) -> LeakFound:
        return LeakFound(f"LEAK {self.label}, {probe}: {message}")

    def control(self, probe: str, message: str) -> LeakFound:
        return LeakFound(f"CONTROL {self.label}, {probe}: {message} (the set-up is broken)")


async def _attempt(
    database: TenantDatabase, harness: TwoTenants, tenant: Tenant, work: Callable[..., Any]
) -> BaseException | None:
    """Run ``work(session)`` in ``tenant``'s scope and commit; the exception, if refused."""
    try:
        async with tenant_scope(tenant), harness.session(database) as session:
            await work(session)
            await session.commit()
    except Exception as exc:
        return exc
    return None


async def _unchanged(
    t: _Target, probe: str, how: str, victim: Tenant, before: list[Row], by: str
) -> None:
    after = await t.rows(victim)
    if after != before:
        gone = [r for r in before if r not in after]
        new = [r for r in after if r not in before]
        raise t.fail(
            f"{probe} ({how})",
            f"tenant {by!r} changed tenant {victim.id!r}'s rows: {len(before)} before, "
            f"{len(after)} after; removed or changed {gone}, added or changed to {new}",
        )


async def _read(t: _Target, db: TenantDatabase, attacker: Tenant, victim: Tenant) -> None:
    own, theirs = await t.rows(attacker), await t.rows(victim)
    target = theirs[-1]
    try:
        async with tenant_scope(attacker), t.harness.session(db) as session:
            every = [t.as_row(o) for o in (await session.scalars(select(t.model))).all()]
            keyed = select(t.model).where(*t.where_key(target))
            by_key = [t.as_row(o) for o in (await session.scalars(keyed)).all()]
            got = await session.get(t.model, t.identity(target))
    except Exception as exc:
        # A read refused outright is no leak, but an application that cannot read its own
        # rows is not what the other probes should be trusted on.
        raise t.control("read", f"tenant {attacker.id!r} could not read: {exc!r}") from exc
    raw = await _raw_read(t, db, attacker)
    seen = every + by_key + ([] if got is None else [t.as_row(got)]) + raw
    leaked = [r for r in seen if r in theirs and r not in own]
    if leaked or len(every) > len(own) or len(raw) > len(own):
        raise t.fail(
            "read",
            f"tenant {attacker.id!r} read {len(every)} rows where it owns {len(own)}, "
            f"{len(leaked)} of them tenant {victim.id!r}'s: {leaked[:3]}",
        )
    if sorted(map(repr, every)) != sorted(map(repr, own)):
        raise t.control("read", f"tenant {attacker.id!r} does not read back its own rows")


async def _raw_read(t: _Target, db: TenantDatabase, attacker: Tenant) -> list[Row]:
    """The table read in SQL no ORM criteria rewrite: what the database itself lets through
    (a strategy may refuse such SQL in a tenant scope: then nothing was revealed)."""
    name = quote_ident(t.table.name)
    if t.table.schema is not None:
        name = f"{quote_ident(t.table.schema)}.{name}"
    try:
        async with tenant_scope(attacker), t.harness.session(db) as session:
            result = await session.execute(text(f"SELECT * FROM {name}"))
            return [dict(r._mapping) for r in result]
    except Exception:
        return []


async def _update(t: _Target, db: TenantDatabase, attacker: Tenant, victim: Tenant) -> None:
    column = t.harness.kit.rows.update_column(t.table)
    assert column is not None
    values = {t.attr(column): sentinel_for(column)}
    before = await t.rows(victim)
    target = before[-1]
    await _attempt(
        db,
        t.harness,
        attacker,
        lambda s: s.execute(update(t.model).where(*t.where_key(target)).values(values)),
    )
    await _unchanged(t, "update", "by key", victim, before, attacker.id)
    refused = await _attempt(
        db, t.harness, attacker, lambda s: s.execute(update(t.model).values(values))
    )
    await _unchanged(t, "update", "of every row", victim, before, attacker.id)
    own = await t.rows(attacker)
    if refused is not None or any(r[column.name] != sentinel_for(column) for r in own):
        raise t.control("update", f"tenant {attacker.id!r} could not update its rows: {refused!r}")


async def _delete(t: _Target, db: TenantDatabase, attacker: Tenant, victim: Tenant) -> None:
    before = await t.rows(victim)
    target = before[-1]
    await _attempt(
        db, t.harness, attacker, lambda s: s.execute(delete(t.model).where(*t.where_key(target)))
    )
    await _unchanged(t, "delete", "by key", victim, before, attacker.id)
    own = await t.rows(attacker)  # after the attack: with schemas, the key was its own too
    mine = own[-1]
    refused = await _attempt(
        db, t.harness, attacker, lambda s: s.execute(delete(t.model).where(*t.where_key(mine)))
    )
    after = await t.rows(attacker)
    if refused is not None or mine in after or len(after) != len(own) - 1:
        raise t.control("delete", f"tenant {attacker.id!r} could not delete its row: {refused!r}")


async def _insert(t: _Target, db: TenantDatabase, attacker: Tenant, victim: Tenant) -> None:
    kit = t.harness.kit
    before, own = await t.rows(victim), await t.rows(attacker)
    forged = kit.rows.row(t.table, t.harness.index(victim), ROWS_PER_TENANT + 2)
    await _attempt(db, t.harness, attacker, lambda s: _add(s, t.new(forged)))
    await _unchanged(t, "insert", "forged", victim, before, attacker.id)
    fresh = kit.rows.row(t.table, t.harness.index(attacker), ROWS_PER_TENANT + 1)
    refused = await _attempt(db, t.harness, attacker, lambda s: _add(s, t.new(fresh)))
    after = await t.rows(attacker)
    if refused is not None or fresh not in after or not all(r in after for r in own):
        raise t.control("insert", f"tenant {attacker.id!r} could not insert a row: {refused!r}")


async def _add(session: Any, obj: Any) -> None:
    session.add(obj)
    await session.flush()


async def _move(t: _Target, db: TenantDatabase, attacker: Tenant, victim: Tenant) -> None:
    kit = t.harness.kit
    column = kit.layout.tenant_column
    assert column is not None
    key = t.attr(t.table.c[column])
    before = await t.rows(victim)
    mine = kit.rows.row(t.table, t.harness.index(attacker), ROWS_PER_TENANT + 1)
    refused = await _attempt(db, t.harness, attacker, lambda s: _add(s, t.new(mine)))
    own = await t.rows(attacker)
    if refused is not None or mine not in own:
        raise t.control("move", f"tenant {attacker.id!r} could not insert a row: {refused!r}")

    async def by_unit_of_work(session: Any) -> None:
        obj = await session.get(t.model, t.identity(mine))
        if obj is not None:
            setattr(obj, key, victim.id)

    await _attempt(
        db,
        t.harness,
        attacker,
        lambda s: s.execute(update(t.model).where(*t.where_key(mine)).values({key: victim.id})),
    )
    await _unchanged(t, "move", "by UPDATE", victim, before, attacker.id)
    await _attempt(db, t.harness, attacker, by_unit_of_work)
    await _unchanged(t, "move", "on a loaded object", victim, before, attacker.id)
    if await t.rows(attacker) != own:
        raise t.control("move", f"tenant {attacker.id!r}'s own rows changed")


Probe = Callable[[_Target, TenantDatabase, Tenant, Tenant], Awaitable[None]]
PROBES: dict[str, Probe] = {
    "read": _read,
    "update": _update,
    "delete": _delete,
    "insert": _insert,
    "move": _move,
}


def skip_reason(kit: TenancyKit, model: type[Any], probe: str) -> str | None:
    """Why a probe cannot apply to a model, if it cannot."""
    table = sa_inspect(model).local_table
    if probe == "update" and kit.rows.update_column(table) is None:
        return "no plain text or integer column to overwrite"
    if probe == "move" and kit.layout.tenant_column is None:
        return "no tenant column: each tenant's rows live in its own schema"
    return None


async def run_probe(harness: TwoTenants, model: type[Any], probe: str) -> None:
    """Run one probe both ways on the loop's ``TenantDatabase`` (``TwoTenants.database``);
    raise ``LeakFound`` on a leak or a failed control."""
    target = _Target(harness, model)
    async with harness.database() as database:
        await PROBES[probe](target, database, harness.a, harness.b)
        # The seeded rows again: what the first attack did to the attacker's own rows must not
        # mask the second (a misrouted tenant writing where the first already wrote).
        await harness.reset()
        await PROBES[probe](target, database, harness.b, harness.a)


def leak_tests(kit: TenancyKit) -> Callable[..., None]:
    """A test parametrized over ``kit``'s tenant models and the probes; assign it to a
    ``test_*`` name in a test module (needs the ``asgi_tenancy.testing`` plugin)."""
    # A probe that cannot apply to a model is not generated at all (rather than skipped): an
    # isolation suite with skips reads as if something was not checked.
    cases = [
        pytest.param(model, probe, id=f"{model.__name__}-{probe}")
        for model in kit.tenant_models()
        for probe in PROBES
        if skip_reason(kit, model, probe) is None
    ]

    @pytest.mark.parametrize(("model", "probe"), cases)
    def test_tenant_isolation(model: type[Any], probe: str, tenancy_databases: Any) -> None:
        with tenancy_databases.use(kit) as harness:
            asyncio.run(run_probe(harness, model, probe))

    generated: Callable[..., None] = test_tenant_isolation
    return generated
