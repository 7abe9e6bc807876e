from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import PgDatabase, PgServer

from .oracle import Oracle


@pytest.fixture(scope="module")
def oracle(pg_server: PgServer, pg_database: PgDatabase) -> Iterator[Oracle]:
    """The shared database and one database per tenant, loaded; closed after the module."""
    instance = Oracle(pg_server, pg_database)
    try:
        yield instance
    finally:
        instance.close()
