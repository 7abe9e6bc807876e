"""What the job examples share: the invoices table, the database and the tenant store.

``DATABASE_URL`` connects as the application role; ``ADMIN_DATABASE_URL`` is for central work.
"""

from __future__ import annotations

import os

from sqlalchemy import String
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_tenancy.sqlalchemy import RowLevelSecurity, SqlAlchemyTenantStore, TenantDatabase


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "invoices"

    tenant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[int]


strategy = RowLevelSecurity(metadata=Base.metadata)
db = TenantDatabase(
    os.environ["DATABASE_URL"],
    strategy,
    admin_engine=create_async_engine(os.environ["ADMIN_DATABASE_URL"]),
)
# Jobs load their tenant again when they run: a suspended tenant's jobs fail, never run.
store = SqlAlchemyTenantStore(create_async_engine(os.environ["DATABASE_URL"]))


async def ready() -> TenantDatabase:
    """The database, validated once per worker process (no engine connects before a job)."""
    if not db.validated:
        await db.validate()
    return db
