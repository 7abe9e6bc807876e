"""Findings: one reason isolation would not hold, with a stable code and the fix.

Start-up validation (``TenantDatabase.validate()``) raises them inside ``IsolationConfigError``;
the audit (``asgi-tenancy audit``) reports them all. Every code is registered in ``CHECKS``
once, with what it catches, so a code can never mean two things (a test holds the docs to it).

    R...  row-level security          S...  schema per tenant
    Q...  query scoping               D...  database per tenant
    A...  the audit (catalog, policies, placement)   G...  the SQL guard's reader role
    C...  Citus (distributed tables, workers)    T...  the tenant store's registry
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["CHECKS", "Finding"]

CHECKS: Mapping[str, str] = MappingProxyType(
    {
        "R001": "the application connects as a superuser",
        "R002": "the application role has BYPASSRLS",
        "R003": "the application role owns a tenant table",
        "R004": "row-level security is not enabled on a tenant table",
        "R005": "row-level security is not forced on a tenant table",
        "R006": "a tenant table has no policy",
        "R007": "a policy has no WITH CHECK",
        "R008": "a tenant table does not exist",
        "R010": "the tenant function is missing",
        "R011": "a table has no tenant column and is not declared shared",
        "R012": "the application role can read the keys or rewrite spent tokens",
        "R013": "the tenant functions do not check signatures",
        "R014": "the database does not accept this application's signing key",
        "R015": "a reachable table with the tenant column has no forced row-level security",
        "R017": "the signed binding sits behind a pooling proxy",
        "R018": "the application role may create temporary tables",
        "R019": "the signing functions' owner may not create temporary objects",
        "R020": "behind transaction pooling, the app role's query text is visible",
        "R021": "the application role lacks a grant on a table it serves (or its schema)",
        "R022": "the application role cannot use a sequence a tenant table draws from",
        "R023": "the signing session's key or counter is open to the application role",
        "Q001": "a table has no tenant column and is not declared shared",
        "Q002": "a table declared shared has the tenant column",
        "Q003": "a shared table is not in the metadata",
        "Q004": "the tenant column is nullable",
        "Q005": "the application role lacks a grant on a table it serves (or its schema)",
        "Q006": "the application role cannot use a sequence a tenant table draws from",
        "S001": "the application connects as a superuser",
        "S002": "a tenant table's name exists in public",
        "S003": "a tenant table resolves through the role's default search_path",
        "S004": "a shared table is missing, or its schema is not usable",
        "S005": "the application role may create temporary tables",
        "S006": "the application role owns a tenant table",
        "S007": "the application role inherits the per-tenant roles' privileges",
        "S008": "the serving role lacks a grant on a table it serves (or its schema)",
        "S009": "the serving role cannot use a sequence a tenant table draws from",
        "D001": "a tenant's URL leads to another database than it names",
        "D002": "two tenants (or a tenant and the application) share one database",
        "D004": "a tenant's database role is a superuser",
        "D005": "a tenant has no usable PostgreSQL database URL",
        "D006": "a tenant's role lacks a grant on a table of its database (or its schema)",
        "D007": "a tenant's role cannot use a sequence of its database",
        "A001": "the application role does not exist",
        "A002": "a permissive policy admits every row",
        "A003": "a permissive policy does not read the bound tenant",
        "A004": "a policy reads the tenant once per row",
        "A005": "no index starts with the tenant column",
        "A006": "a tenant's schema does not exist",
        "A007": "a tenant's schema lacks tables",
        "A008": "a tenant is at another revision than the others",
        "A009": "two tenants map to one schema",
        "A010": "a tenant's database does not exist or cannot be reached",
        "A011": "a tenant's schema name is unusable",
        "A012": "a view reads a tenant table around its policies",
        "A013": "a table of a hardened tenant schema lacks the signed policy",
        "G001": "the SQL guard's reader role does not exist",
        "G002": "the application role cannot switch to the reader role",
        "G003": "the reader role has SUPERUSER, BYPASSRLS or another power a reader needs not",
        "G004": "the reader role is a member of other roles",
        "G005": "the reader role can call set_config",
        "G006": "the reader role may create temporary tables",
        "G007": "the reader role can write to a relation",
        "G008": "the reader role can read a relation or sequence the guard does not declare",
        "G009": "the reader role cannot read a declared table",
        "G010": "the reader role may create objects in a schema",
        "C001": "Citus mode on a database without the Citus extension",
        "C002": "tenant tables are distributed but the binding stays on the coordinator",
        "C003": "the signed binding on tables distributed by Citus",
        "T001": "the tenant store's role cannot read the tenant registry table",
        "C004": "a key of a tenant table does not contain the tenant column (Citus)",
        "C005": "a shared table is not a Citus reference table",
        "C006": "a tenant table is not distributed by the tenant column (Citus)",
        "C007": "per-tenant roles of SchemaPerTenant on Citus (the workers refuse the login)",
        "C008": "a tenant schema of SchemaPerTenant(citus=True) is not a distributed schema",
    }
)


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason isolation would not hold: a registered code, the object, and how to fix it."""

    code: str
    subject: str
    message: str
    fix: str

    def __post_init__(self) -> None:
        if self.code not in CHECKS:
            raise ValueError(f"unregistered check code {self.code!r}")

    def __str__(self) -> str:
        return f"[{self.code}] {self.subject}: {self.message} (fix: {self.fix})"
