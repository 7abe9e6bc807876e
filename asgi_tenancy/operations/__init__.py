"""Operations: the registry, provisioning, migrations, the audit and the CLI's back end.

They run as the owner role, above the request path (``asgi_tenancy.sqlalchemy``), which never
imports them; they ask each strategy's ``placement`` where a tenant lives, never its type.
``migrate_tenants`` needs the ``migrations`` extra (Alembic), imported from
``asgi_tenancy.operations.migrations``.
"""

from .audit import AuditReport, audit, audit_provisioner
from .provisioning import TenantProvisioner
from .registry import Registry

__all__ = ["AuditReport", "Registry", "TenantProvisioner", "audit", "audit_provisioner"]
