"""DatabasePerTenant: every tenant's data in a database of its own, possibly on its own server.

``strategy`` holds the strategy (URLs, placement claims, engine creation and checks),
``engines`` the bounded cache of per-tenant engines, ``placement`` what operations ask of it.
"""

from .engines import EngineCache
from .strategy import DatabasePerTenant

__all__ = ["DatabasePerTenant", "EngineCache"]
