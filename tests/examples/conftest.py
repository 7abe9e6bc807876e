"""The example app's databases: one per strategy, provisioned as the demo's first start does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from examples.fastapi_app.provision import TENANTS, provision, tenant_database
from tests.conftest import PgDatabase, PgServer, create_database, drop_database

SECRET = "example-test-secret-with-enough-bytes"
STRATEGIES = ["row", "schema", "database", "query"]


@dataclass(frozen=True)
class Demo:
    isolation: str
    db: PgDatabase


@pytest.fixture(scope="module", params=STRATEGIES)
def demo(pg_server: PgServer, request: pytest.FixtureRequest) -> Iterator[Demo]:
    """A database of this strategy's own, provisioned once (as a second start would find it)."""
    isolation: str = request.param
    db = create_database(pg_server, f"example_{isolation}")
    asyncio.run(provision(db.admin_url, isolation))
    try:
        yield Demo(isolation, db)
    finally:
        drop_database(pg_server, db)
        if isolation == "database":
            for tenant in TENANTS:
                name = tenant_database(db.admin_url, tenant)
                drop_database(pg_server, PgDatabase(name, "", ""))
