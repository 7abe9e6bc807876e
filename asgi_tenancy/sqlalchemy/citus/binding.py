"""The row binding a Citus coordinator carries to its workers.

``set_config(name, value, true)`` stays on the coordinator, so a policy evaluated on a worker
finds no tenant. ``SET LOCAL`` is propagated to every worker the transaction touches, but only
with ``citus.propagate_set_commands = 'local'`` and only as the *whole text of the message it
came in*: Citus records that text and replays it on each worker it opens later in the
transaction. So the setting travels inside the BEGIN message (it is never propagated itself),
and the tenant's ``SET LOCAL`` follows as a message of its own: one round trip more than on
plain PostgreSQL, and workers receive exactly that one statement.
"""

from __future__ import annotations

from ..postgres import quote_literal
from ..strategy import Binding

__all__ = ["PROPAGATE_LOCAL", "citus_binding"]

#: Sent inside every BEGIN message of a Citus binding: SET LOCAL reaches the workers.
PROPAGATE_LOCAL = "SET LOCAL citus.propagate_set_commands = 'local'"


def citus_binding(setting: str, tenant_id: str) -> Binding:
    """``setting`` is already validated as ``prefix.name``; the id is quoted as a literal."""
    return Binding(PROPAGATE_LOCAL, alone=f"SET LOCAL {setting} = {quote_literal(tenant_id)}")
