"""What a statement can do to a pooled connection's session, decided by PostgreSQL's own grammar.

Every statement a tenant's connection runs is parsed with ``pglast`` (the server's parser,
``libpg_query``); the verdict is cached by statement text, so an application's statements
pay one parse each and then a dict lookup. A text that does not parse, any statement outside
a short list of plain ones (``SELECT``, DML, transaction control, ``SHOW``, ``SET LOCAL``...),
and any call of a function outside the allow-list leaves ``SESSION``: the connection may carry
session state (settings, prepared statements, temporary objects, cursors held open, advisory
locks, listeners), so it is replaced before anyone checks it out again.

The allow-list is read from the server once (``load``): every ``pg_catalog`` function that is
immutable or stable (by PostgreSQL's contract they cannot change the database), and a few
volatile ones known to leave no session state (``random``, ``clock_timestamp``,
``gen_random_uuid``, ``pg_sleep``, the transaction-level advisory locks). ``set_config`` is
allowed only with a literal ``true`` (transaction-local) third argument. A statement that may
draw sequence values (DML, ``nextval``) leaves ``SEQUENCES``: ``currval``/``lastval`` are
session state, discarded when the connection next serves another tenant. ``nextval`` or
``setval`` of a sequence not named by a plain string, or named like the signed binding's
counter (``tenancy``), leaves ``SESSION``.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Iterator
from typing import Any

from pglast import parser

__all__ = ["CACHE_SIZE", "SESSION_LOCKS", "Effect", "Hygiene"]

#: Distinct statement texts whose verdict is kept (about 200 bytes each); FIFO past it.
CACHE_SIZE = 20_000


class Effect(enum.IntFlag):
    """What a statement may leave on the session after its transaction ends."""

    NONE = 0
    SEQUENCES = 1  # sequence values drawn: currval/lastval are session state
    SESSION = 2  # anything else: the connection is replaced


# Statements whose own kind leaves nothing on the session (what they contain is walked).
_PLAIN = frozenset(
    {
        "SelectStmt",
        "InsertStmt",
        "UpdateStmt",
        "DeleteStmt",
        "MergeStmt",
        "TransactionStmt",
        "VariableShowStmt",
        "ExplainStmt",
        "LockStmt",
        "DeclareCursorStmt",
        "FetchStmt",
        "ClosePortalStmt",
        "CopyStmt",
        "VariableSetStmt",
    }
)
_DEFAULTS = frozenset({"UpdateStmt", "MergeStmt"})  # SET col = DEFAULT may call nextval
_SEQUENCE_FUNCTIONS = frozenset({"nextval", "currval", "lastval", "setval"})
_DRAWING = frozenset({"nextval", "setval"})
# Volatile, yet leaving no session state behind.
SAFE_VOLATILE = frozenset(
    {
        "random",
        "random_normal",
        "gen_random_uuid",
        "clock_timestamp",
        "timeofday",
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
        "txid_current",
        "pg_current_xact_id",
    }
)
_HOLD = 0x0020  # CURSOR_OPT_HOLD: a cursor WITH HOLD outlives its transaction
_PREPARED_XACT = frozenset({"TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED"})

_ALLOWED_SQL = (
    "SELECT DISTINCT proname::text FROM pg_catalog.pg_proc"
    " WHERE pronamespace = 'pg_catalog'::regnamespace"
    " AND (provolatile IN ('i', 's') OR proname = ANY(:volatile))"
)


#: Whether the serving role, or a role it may ``SET ROLE`` to, can take a session-level
#: advisory lock: only then can a lock outlive a request unseen (inside a function, trigger or
#: view the statement text does not show), and a change of tenant must release them.
_SESSION_LOCKS_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_proc p, pg_catalog.pg_roles r"
    " WHERE p.pronamespace = 'pg_catalog'::regnamespace"
    " AND p.proname = ANY(:locks)"
    " AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')"
    " AND pg_catalog.has_function_privilege(r.oid, p.oid, 'EXECUTE'))"
)
SESSION_LOCKS = (
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
)


class Hygiene:
    """Verdicts for one engine's statements; ``functions`` is the allow-list (lower case).

    ``session_locks``: whether a change of tenant releases session advisory locks; true
    unless ``TenantDatabase.validate()`` found that the serving role cannot take them."""

    def __init__(self, functions: Iterable[str] = ()) -> None:
        self.functions = frozenset(name.lower() for name in functions)
        self.session_locks = True
        self._verdicts: dict[str, Effect] = {}

    @classmethod
    def allowed_sql(cls) -> tuple[str, dict[str, Any]]:
        """The catalogue query of the allow-list, and its parameters."""
        return _ALLOWED_SQL, {"volatile": sorted(SAFE_VOLATILE)}

    @classmethod
    def session_locks_sql(cls) -> tuple[str, dict[str, Any]]:
        """The catalogue query: can the serving role take a session advisory lock?"""
        return _SESSION_LOCKS_SQL, {"locks": list(SESSION_LOCKS)}

    def with_functions(self, functions: Iterable[str], *, session_locks: bool = True) -> None:
        """Take the allow-list read from the server (plus the application's own extras), and
        whether session advisory locks must be released on a change of tenant."""
        self.functions = frozenset(name.lower() for name in functions)
        self.session_locks = session_locks
        self._verdicts.clear()

    def effect(self, sql: str) -> Effect:
        verdict = self._verdicts.get(sql)
        if verdict is None:
            verdict = self._judge(sql)
            if len(self._verdicts) >= CACHE_SIZE:
                del self._verdicts[next(iter(self._verdicts))]
            self._verdicts[sql] = verdict
        return verdict

    def _judge(self, sql: str) -> Effect:
        if "\x00" in sql:
            return Effect.SESSION  # the parser would stop at the NUL; the server refuses it
        try:
            tree = json.loads(parser.parse_sql_json(sql))
        except Exception:
            return Effect.SESSION  # what PostgreSQL's grammar cannot read is never trusted
        effect = Effect.NONE
        for raw in tree.get("stmts", ()):
            (kind, node), *_ = raw["stmt"].items()
            effect |= self._statement(kind, node)
            if effect & Effect.SESSION:
                return Effect.SESSION
        return effect

    def _statement(self, kind: str, node: dict[str, Any]) -> Effect:
        if kind not in _PLAIN:
            return Effect.SESSION
        if kind == "VariableSetStmt" and not node.get("is_local"):
            return Effect.SESSION
        if kind == "SelectStmt" and _has_into(node):
            return Effect.SESSION  # SELECT ... INTO creates a table
        if kind == "DeclareCursorStmt" and int(node.get("options", 0)) & _HOLD:
            return Effect.SESSION
        if kind == "CopyStmt" and (node.get("filename") or node.get("is_program")):
            return Effect.SESSION
        if kind == "TransactionStmt" and node.get("kind") in _PREPARED_XACT:
            return Effect.SESSION  # a prepared transaction outlives the session's own
        draws = kind == "InsertStmt" or (kind in _DEFAULTS and _has(node, "SetToDefault"))
        return (Effect.SEQUENCES if draws else Effect.NONE) | self._calls(node)

    def _calls(self, node: Any) -> Effect:
        effect = Effect.NONE
        for kind, value in _nodes(node):
            if kind == "FuncCall":
                effect |= self._call(value)
            elif kind == "ColumnRef":
                effect |= self._attribute(value.get("fields", ())[1:])
            elif kind == "A_Indirection":
                effect |= self._attribute(value.get("indirection", ()))
            elif kind == "SelectStmt" and _has_into(value):
                return Effect.SESSION
            if effect & Effect.SESSION:
                return Effect.SESSION
        return effect

    def _call(self, call: dict[str, Any]) -> Effect:
        names = [_string(part) for part in call.get("funcname", ())]
        if any(name is None for name in names) or len(names) > 2:
            return Effect.SESSION
        if len(names) == 2 and names[0] != "pg_catalog":
            return Effect.SESSION  # a function of another schema: not a known builtin
        name = str(names[-1]).lower()
        if name == "set_config":
            args = call.get("args", ())
            local = len(args) == 3 and _boolean(args[2]) is True
            return Effect.NONE if local else Effect.SESSION
        if name in _DRAWING:
            return _drawn(call.get("args", ()))
        if name in _SEQUENCE_FUNCTIONS:
            return Effect.SEQUENCES
        if name in self.functions:
            return Effect.NONE
        return Effect.SESSION

    def _attribute(self, fields: Iterable[Any]) -> Effect:
        """``x.f`` and ``(x).f`` call ``f(x)`` when ``f`` is not a column (attribute notation):
        a field named like a function outside the allow-list may be one."""
        for field in fields:
            name = _string(field)
            if name is None:
                continue  # a star or a subscript
            lowered = name.lower()
            if lowered in _DRAWING:
                return Effect.SESSION  # a sequence named by an expression: see _drawn
            if lowered in _SEQUENCE_FUNCTIONS:
                return Effect.SEQUENCES
            if lowered in _KNOWN_VOLATILE and lowered not in self.functions:
                return Effect.SESSION
        return Effect.NONE


# Builtins a field name could reach in attribute notation and that change session state.
_KNOWN_VOLATILE = frozenset(
    {
        "set_config",
        "setseed",
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
        "pg_notify",
        "pg_cancel_backend",
        "pg_terminate_backend",
        "lo_open",
        "lo_close",
        "lo_creat",
        "lo_create",
        "lo_import",
        "lo_unlink",
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "ts_stat",
        "ts_rewrite",
        "pg_reload_conf",
        "pg_rotate_logfile",
    }
)


def _nodes(node: Any) -> Iterator[tuple[str, Any]]:
    """Every ``(kind, fields)`` node of a parse tree, depth first."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            for key, value in current.items():
                if key[:1].isupper() and isinstance(value, dict):
                    yield key, value
                stack.append(value)
        elif isinstance(current, list):
            stack.extend(current)


def _drawn(args: Any) -> Effect:
    """A sequence drawn by name: ``SEQUENCES``, unless the name is not a plain string (or a
    string cast to ``regclass``) or may be the signed binding's counter, which each ``BEGIN``
    draws in step with the application: a connection whose counter raw SQL moved is replaced
    before it serves anyone else."""
    first = args[0] if args else None
    if isinstance(first, dict) and "TypeCast" in first:
        first = first["TypeCast"].get("arg")
    constant = first.get("A_Const") if isinstance(first, dict) else None
    name = constant.get("sval", {}).get("sval") if isinstance(constant, dict) else None
    if not isinstance(name, str) or "tenancy" in name.casefold():
        return Effect.SESSION
    return Effect.SEQUENCES


def _string(node: Any) -> str | None:
    if isinstance(node, dict) and "String" in node:
        value = node["String"].get("sval")
        return value if isinstance(value, str) else None
    return None


def _boolean(node: Any) -> bool | None:
    constant = node.get("A_Const") if isinstance(node, dict) else None
    if isinstance(constant, dict) and "boolval" in constant:
        return bool(constant["boolval"].get("boolval", False))
    return None


def _has(node: Any, kind: str) -> bool:
    return any(found == kind for found, _ in _nodes(node))


def _has_into(select: dict[str, Any]) -> bool:
    return "intoClause" in select
