"""The test kit (asgi_tenancy.testing) on the example app's models, under four strategies."""

from __future__ import annotations

from functools import partial

import pytest

from asgi_tenancy.testing import TenancyKit, leak_tests
from examples.fastapi_app.models import Base
from examples.fastapi_app.provision import strategy_for
from tests.conftest import PgServer

pytest_plugins = ["asgi_tenancy.testing"]

KITS = {
    isolation: TenancyKit(
        models=Base, strategy=partial(strategy_for, isolation), name=f"example_{isolation}"
    )
    for isolation in ("row", "query", "schema", "database")
}


@pytest.fixture(scope="session")
def tenancy_database_url(pg_server: PgServer) -> str:
    return pg_server.admin_url.render_as_string(hide_password=False)


test_example_app_under_rls = leak_tests(KITS["row"])
test_example_app_under_query_scoping = leak_tests(KITS["query"])
test_example_app_under_schema_isolation = leak_tests(KITS["schema"])
test_example_app_under_database_isolation = leak_tests(KITS["database"])
