"""The job tests' table: rows that jobs write, under row-level security, with no unique job key.

``job`` and ``step`` repeat across tenants (colliding keys) and nothing stops a row from being
written twice: a job run twice, or as another tenant, shows up in the admin's count.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Identity, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asgi_tenancy.sqlalchemy import RowLevelSecurity

TENANTS = ("acme", "globex", "initech")
SUSPENDED_LATER = "umbrella"  # suspended by a test after its job was enqueued
SNAPSHOT_KEYS = ("job-snapshot-key-for-the-tests-0123456789",)


class JobBase(DeclarativeBase):
    metadata = MetaData()


class JobRow(JobBase):
    __tablename__ = "job_rows"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(63), index=True)
    job: Mapped[int]
    step: Mapped[int]
    expected: Mapped[str] = mapped_column(String(63))  # the tenant the producer meant


def strategy() -> RowLevelSecurity:
    return RowLevelSecurity(metadata=JobBase.metadata)
