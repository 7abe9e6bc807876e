"""Names shared by the data layer and the SQL guard, so neither imports the other for them."""

__all__ = ["ALLOW_UNSCOPED", "OWN_STATEMENT"]

#: Execution option: the statement confines itself (the SQL guard's output, or one its author
#: checked); QueryScoping lets it run inside a tenant scope.
ALLOW_UNSCOPED = "asgi_tenancy_allow_unscoped"

#: Execution option of the library's own statements (bindings, the guard's prelude and clean-up):
#: session hygiene does not judge them.
OWN_STATEMENT = "asgi_tenancy_own"
