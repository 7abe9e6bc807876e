"""RowLevelSecurity: shared tables, one policy, the tenant in a transaction-local setting.

``strategy`` holds the strategy and its DDL, ``signing`` the signed binding, ``checks`` the
start-up checks (R001-R022, and A012: views that read around the policies), ``policies`` the
judge of every policy (A002-A004, also run at start-up) and ``audit`` what the isolation audit
adds from the catalog (A005).
"""

from .strategy import RowLevelSecurity

__all__ = ["RowLevelSecurity"]
