"""What every isolation strategy answers: on the request path, and to operations.

On the request path ``TenantDatabase`` asks a strategy for the engine a tenant's session uses,
the binding of each of its transactions, and the ORM criteria its sessions apply. Operations
(provisioning, migrations, the audit, the CLI) ask its ``placement`` where a tenant's data
lives, and ``ddl()`` what the database needs; nobody tests a strategy's type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..checks import Finding
from ..errors import IsolationConfigError
from ..tenant import Tenant
from .placement import AuditContext, Placement

if TYPE_CHECKING:
    from .criteria import TenantCriteria

__all__ = ["Binding", "IsolationStrategy", "StatementGuard"]


class Binding:
    """How the transactions of one tenant's session are bound: SQL sent with every BEGIN.

    ``sql`` is the same for every transaction; a binding signed for each transaction (and
    each connection) overrides ``for_transaction``. ``alone`` is SQL sent as a message of its
    own right after BEGIN (Citus replays the whole message of a propagated ``SET LOCAL`` on
    every worker, so that message must hold nothing else): one round trip more.
    """

    __slots__ = ("alone", "sql")

    def __init__(self, sql: str, *, alone: str | None = None) -> None:
        self.sql = sql
        self.alone = alone

    def for_transaction(self, session_key: str | None, counter: int) -> str:
        """The SQL for one transaction: ``session_key`` is what the strategy's ``connect_sql``
        answered on this connection, ``counter`` counts the connection's bound transactions."""
        return self.sql

    def with_select(self, session_key: str | None, counter: int, items: str) -> str | None:
        """``for_transaction`` with ``items`` (select-list expressions) in the binding's own
        ``SELECT``; ``None`` when it has none to carry them."""
        return None


class StatementGuard(Protocol):
    """A strategy's own rule for every statement its engine runs; ``bound`` is the tenant the
    connection's transaction is bound to, if any."""

    def scope(
        self,
        statement: Any,
        multiparams: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        options: Mapping[str, Any],
        *,
        bound: str | None,
    ) -> tuple[Any, Sequence[Mapping[str, Any]], Mapping[str, Any]]:
        """Before a Core statement is compiled on a tenant connection (where ``before_execute``
        would run): the statement and parameters to run instead (or the same)."""
        ...

    def check(self, statement: str, context: Any, *, bound: str | None) -> None:
        """Right before the driver call of every statement (``hooks.py``): raise to refuse it."""
        ...


class IsolationStrategy:
    """Base of the strategies; each overrides what it needs. The defaults bind nothing."""

    name: ClassVar[str] = "base"
    #: What the start-up error says would not hold.
    title: ClassVar[str] = "isolation"

    #: ORM criteria and insert stamping for this strategy's sessions, if it uses them.
    criteria: TenantCriteria | None = None
    #: A per-statement refusal on the engine, if the strategy has one.
    statement_guard: StatementGuard | None = None
    #: SQL run once on every new connection; its one value becomes the connection's key.
    connect_sql: str | None = None

    # -- the request path ------------------------------------------------------------------

    def attach(self, engine: AsyncEngine) -> None:
        """Called once by ``TenantDatabase.__init__`` with its engine: check, raise early."""

    def binding(self, tenant: Tenant) -> Binding | None:
        """The binding of ``tenant``'s transactions, or ``None`` when nothing is sent."""
        return None

    def engine_for(
        self, engine: AsyncEngine, tenant: Tenant
    ) -> AbstractAsyncContextManager[AsyncEngine]:
        """The engine a session of ``tenant`` uses, held for the session's lifetime (a context
        manager: a strategy may lease it; a class, not a generator, on the common path)."""
        return nullcontext(engine)

    async def dispose(self) -> None:
        """Release what the strategy holds (engines of other databases)."""

    # -- start-up --------------------------------------------------------------------------

    async def check(self, conn: AsyncConnection) -> list[Finding]:
        """Every finding on the live database, read as the application's role."""
        return []

    async def validate(self, engine: AsyncEngine) -> None:
        """Refuse to serve (``IsolationConfigError`` with the findings) when isolation would
        not hold."""
        async with engine.connect() as conn:
            findings = await self.check(conn)
        raise_findings(self.title, findings)

    # -- operations ------------------------------------------------------------------------

    async def audit(self, audit: AuditContext) -> list[Finding]:
        """The audit's part for this strategy: its own checks as the application role, then
        where the tenants live (``placement.audit``)."""
        async with audit.as_app_role():
            findings = await self.check(audit.conn)
        return findings + await self.placement.audit(audit)

    @property
    def placement(self) -> Placement:
        """Where this strategy keeps a tenant's data (shared tables by default)."""
        return Placement()

    def ddl(self) -> list[str]:
        """The statements the database needs for this strategy (policies, functions), in order."""
        return []

    async def install(self, admin: AsyncConnection) -> None:
        """Run ``ddl()`` on an admin (owner) connection."""
        for statement in self.ddl():
            await admin.execute(text(statement))


def raise_findings(what: str, findings: Sequence[Finding]) -> None:
    """Raise ``IsolationConfigError`` carrying ``findings``, if there are any."""
    if findings:
        count = len(findings)
        raise IsolationConfigError(
            f"{what} would not hold: {count} finding{'s' * (count != 1)}",
            findings=findings,
        )
