"""QueryScoping: shared tables on any SQLAlchemy dialect, confined by the ORM alone.

``strategy`` holds the strategy and its refusals; ``shape`` describes what a statement touches.
"""

from .strategy import ALLOW_UNSCOPED, QueryScoping, allow_unscoped

__all__ = ["ALLOW_UNSCOPED", "QueryScoping", "allow_unscoped"]
