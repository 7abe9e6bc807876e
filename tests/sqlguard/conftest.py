from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import PgServer

from .oracle import Oracle


@pytest.fixture(scope="session")
def oracle_databases(pg_server: PgServer) -> Iterator[Oracle]:
    """A shared database and one per tenant, loaded once for every oracle test module."""
    instance = Oracle(pg_server)
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="module")
def oracle(oracle_databases: Oracle) -> Oracle:
    """The oracle with counters of this module's own."""
    return oracle_databases.tally()
