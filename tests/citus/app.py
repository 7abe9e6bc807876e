"""The provisioner ``asgi-tenancy tenants move --app tests.citus.app:provisioner`` loads."""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import create_async_engine

from asgi_tenancy.operations.provisioning import TenantProvisioner
from tests.citus.conftest import APP_ROLE, row_strategy


def provisioner() -> TenantProvisioner:
    engine = create_async_engine(os.environ["TENANCY_TEST_CITUS_ADMIN_URL"])
    return TenantProvisioner(engine, row_strategy(), app_role=APP_ROLE)
