"""The signed binding: a tenant raw or injected SQL can neither forge nor replay.

Every transaction's ``BEGIN`` message carries a token the application signed for that
transaction. The policies' ``tenancy_current_tenant()`` is a ``SECURITY DEFINER`` function
owned by a role that can read what the application role cannot (a private key table, the
signing session's sequences); it admits the token's tenant only while the token is this
transaction's, and raises otherwise. MACs are ``sha256(k || sha256(k || message))`` with
PostgreSQL's built-in ``sha256()`` (no pgcrypto): the outer hash over a secret prefix closes
length extension.

Two ways to make a token single-use (``pooling``):

- ``"none"`` (direct connections, the default): each new connection opens a *signing session*
  (``connect_sql``). The owner's temporary sequences hold a session key, derived from the
  signing key and a random session id (``sha256(k || 'asgi-tenancy session key:' || sid)``,
  16 bytes in two sequences the app role cannot read), and a counter. A token is
  ``tenant:counter:mac``, MACed with the session key: it binds only on that connection. The
  ``BEGIN`` message sets it (``SET LOCAL``) and draws the counter's next value (``nextval``);
  the application counts in step, so a token is valid only while the counter shows its number,
  that is in its own transaction, until the next ``BEGIN``. ``tenancy_current_tenant()``
  checks the MAC and the counter on every statement, with plain function calls (no table is
  read: a read costs the server an executor run). Seen in ``pg_stat_activity`` or captured, a
  token is worthless: another connection has another session key, this one a higher counter.
  A counter out of step (drawn by raw SQL, or a ``BEGIN`` that did not finish) or a missing
  signing session (``DISCARD``) is SQLSTATE ``08T01``: the connection is replaced. A removed
  key opens no new signing session; connections opened under it keep their session key until
  they close.
- ``"transaction"`` (behind PgBouncer in transaction mode, where a client never knows which
  server process runs its transaction): a token is ``tenant:issued_us:nonce:mac``; the nonce is
  recorded in an unlogged table of spent nonces (a write per transaction, so transactions must
  be read-write) and a token older than ``window`` seconds is refused. The app role's sessions
  must not show their query text (``track_activities = off`` for the role, R020). The bound
  setting is ``tenant:mac`` where that MAC covers the tenant, the server process and the
  transaction's start; ``tenancy_current_tenant()`` recomputes it on every statement.

Both rest on the app role creating no temporary object (R018): a role that could would drop
the owner's with ``DISCARD TEMP`` and make its own.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..._keys import secret_keys
from ...errors import IsolationConfigError
from ..postgres import quote_ident, quote_literal
from ..strategy import Binding

__all__ = ["COUNTER", "KEY_SCHEMA", "KEY_TABLE", "NONCE_TABLE", "Pooling", "Signer", "mac"]

KEY_SCHEMA = "tenancy_private"
KEY_TABLE = f"{KEY_SCHEMA}.binding_keys"
NONCE_TABLE = f"{KEY_SCHEMA}.spent_nonces"
Pooling = Literal["none", "transaction"]
_REFUSE = re.compile(r"PERFORM REFUSE\('([^']*)'\);")
#: The signing session's counter (the owner's temporary sequence; the BEGIN message draws it).
COUNTER = "pg_temp.tenancy_counter"
#: The SQLSTATE of a connection that cannot bind any more (no signing session, counter out of
#: step): class 08, a connection exception, so the connection is replaced (``failures.py``).
UNUSABLE = "08T01"
_SESSION_KEYS = 4096  # session keys kept (one per live connection); cleared past it


def mac(key: bytes, message: str) -> str:
    """``sha256(k || sha256(k || message))``, hex: what the database recomputes."""
    inner = hashlib.sha256(key + message.encode()).digest()
    return hashlib.sha256(key + inner).hexdigest()


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"asgi-tenancy key id:" + key).hexdigest()[:16]


class _SignedBinding(Binding):
    """A token made for each transaction: signed for its connection and counter, or a nonce."""

    __slots__ = ("_signer", "_tenant_id")

    def __init__(self, signer: Signer, tenant_id: str, extra: str) -> None:
        super().__init__(extra)
        self._signer = signer
        self._tenant_id = tenant_id

    def for_transaction(self, session_key: str | None, counter: int) -> str:
        return ";".join(self.statements(session_key, counter))

    def with_select(self, session_key: str | None, counter: int, items: str) -> str | None:
        return ";".join(self.statements(session_key, counter, f"{items}, "))

    def statements(self, session_key: str | None, counter: int, items: str = "") -> list[str]:
        """The transaction's statements, in order (one message, or one by one); ``items``
        open the select list of its ``SELECT``."""
        signer = self._signer
        token = quote_literal(signer.token(self._tenant_id, session_key, counter))
        if signer.pooling == "transaction":
            return [f"SELECT {items}{signer.bind_function}({token}){self.sql}"]
        # No counter (no signing session): the BEGIN message fails and the connection is
        # replaced (``TenancyConnection.execute``).
        return [
            f"SET LOCAL {signer.setting} = {token}",
            f"SELECT {items}pg_catalog.nextval({quote_literal(COUNTER)}){self.sql}",
        ]


class Signer:
    """The keys (the first signs, every one verifies), the tokens, and the SQL that checks them."""

    def __init__(
        self,
        setting: str,
        keys: Sequence[str | bytes],
        *,
        function_schema: str,
        pooling: Pooling = "none",
        window: float = 10.0,
    ) -> None:
        if not keys:
            raise IsolationConfigError(
                "signed bindings need signing_keys",
                hint="e.g. signing_keys=[os.environ['TENANCY_BINDING_KEY']]",
            )
        if pooling not in ("none", "transaction"):
            raise IsolationConfigError("pooling must be 'none' or 'transaction'")
        if not 1 <= window <= 3600:
            raise IsolationConfigError("the token window must be 1 to 3600 seconds")
        self.setting = setting
        self.keys = secret_keys(keys, what="signing")
        self.pooling: Pooling = pooling
        self.window_us = int(window * 1_000_000)
        schema = quote_ident(function_schema)
        self.function = f"{schema}.tenancy_current_tenant"
        self.bind_function = f"{schema}.tenancy_bind"
        self.session_function = f"{schema}.tenancy_open_session"
        self._session_keys: dict[str, bytes] = {}

    @property
    def connect_sql(self) -> str | None:
        """Once per connection (direct connections only): open the signing session, whose
        session key derives from this application's first key; it answers the session id."""
        if self.pooling == "transaction":
            return None
        return f"SELECT {self.session_function}({quote_literal(key_id(self.keys[0]))})"

    def binding(self, tenant_id: str, extra: str = "") -> Binding:
        """The binding of ``tenant_id``; ``extra`` follows the bind call in the same SELECT."""
        return _SignedBinding(self, tenant_id, extra)

    def token(self, tenant_id: str, session_key: str | None, counter: int) -> str:
        if self.pooling == "transaction":
            issued = time.time_ns() // 1000
            message = f"{tenant_id}:{issued}:{secrets.token_hex(12)}"
            return f"{message}:{mac(self.keys[0], message)}"
        message = f"{tenant_id}:{counter}"
        return f"{message}:{mac(self._session_key(session_key), message)}"

    def _session_key(self, session_id: str | None) -> bytes:
        """What the signing session derived from the first key (no session: a key that
        verifies nothing, so the server refuses every token)."""
        if session_id is None:
            return b""
        derived = self._session_keys.get(session_id)
        if derived is None:
            seed = self.keys[0] + b"asgi-tenancy session key:" + session_id.encode()
            derived = hashlib.sha256(seed).digest()[:16]
            if len(self._session_keys) >= _SESSION_KEYS:
                self._session_keys.clear()
            self._session_keys[session_id] = derived
        return derived

    # -- DDL -------------------------------------------------------------------------------

    def ddl(self) -> list[str]:
        """The private schema and tables, then the functions, in order (as the owner)."""
        statements = [
            f"CREATE SCHEMA IF NOT EXISTS {KEY_SCHEMA}",
            f"REVOKE ALL ON SCHEMA {KEY_SCHEMA} FROM PUBLIC",
            f"CREATE TABLE IF NOT EXISTS {KEY_TABLE} (key_id text PRIMARY KEY,"
            " secret bytea NOT NULL, installed_at timestamptz NOT NULL DEFAULT now())",
            f"REVOKE ALL ON {KEY_TABLE} FROM PUBLIC",
        ]
        if self.pooling == "transaction":
            statements += [
                f"CREATE UNLOGGED TABLE IF NOT EXISTS {NONCE_TABLE} (nonce text PRIMARY KEY,"
                " issued_at timestamptz NOT NULL)",
                f"CREATE INDEX IF NOT EXISTS spent_nonces_issued_at ON {NONCE_TABLE} (issued_at)",
                f"REVOKE ALL ON {NONCE_TABLE} FROM PUBLIC",
            ]
            return [*statements, self._verify_ddl(), self._bind_ddl()]
        return [
            *statements,
            # The signing session's first form (a session table, a bind call per transaction).
            f"DROP FUNCTION IF EXISTS {self.bind_function}(text)",
            f"DROP FUNCTION IF EXISTS {self.session_function}()",
            self._session_verify_ddl(),
            self._session_ddl(),
        ]

    def _transaction_message(self) -> str:
        """What the bound setting's MAC covers: this server process, this transaction's start."""
        return (
            "tenant || ':' || pg_backend_pid()::text || ':' ||"
            " (extract(epoch FROM transaction_timestamp()) * 1000000)::bigint::text"
        )

    def _verify_ddl(self) -> str:
        # Behind transaction pooling. Read once per statement (an InitPlan); RESTRICTED: it
        # reads the session's own state.
        return f"""CREATE OR REPLACE FUNCTION {self.function}() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp AS $tenancy$
DECLARE
  bound text := current_setting({quote_literal(self.setting)}, true);
  tenant text;
  k bytea;
BEGIN
  IF bound IS NULL OR bound = '' THEN
    RAISE EXCEPTION 'asgi-tenancy: no tenant is bound to this transaction'
      USING ERRCODE = '42501', HINT = 'open sessions through TenantDatabase.session()';
  END IF;
  IF left(bound, 1) = '!' THEN  -- the binding of this transaction was refused, and why
    RAISE EXCEPTION 'asgi-tenancy: %', substr(bound, 2) USING ERRCODE = '42501';
  END IF;
  tenant := split_part(bound, ':', 1);
  FOR k IN SELECT secret FROM {KEY_TABLE} LOOP
    IF encode(sha256(k || sha256(k || convert_to({self._transaction_message()}, 'UTF8'))),
              'hex') = split_part(bound, ':', 2) THEN
      RETURN tenant;
    END IF;
  END LOOP;
  RAISE EXCEPTION 'asgi-tenancy: the tenant binding is not signed for this transaction'
    USING ERRCODE = '42501';
END
$tenancy$"""

    def _bind_ddl(self) -> str:
        # Behind transaction pooling only. It never raises: it runs inside the BEGIN message,
        # where an error would leave the server in a transaction the driver does not know it
        # opened. A refused token binds '!reason' instead; the first statement fails with it.
        setting = quote_literal(self.setting)
        window, keep = self.window_us, self.window_us * 2 / 1e6
        single_use = f"""  IF current_setting('transaction_read_only') = 'on' THEN
    PERFORM REFUSE('a signed binding behind transaction pooling needs a read-write transaction');
  END IF;
  IF part2 !~ '^[0-9]{{1,18}}$' OR parts[3] !~ '^[0-9a-f]{{24}}$' THEN
    PERFORM REFUSE('malformed binding token');
  END IF;
  IF abs((extract(epoch FROM now()) * 1000000)::bigint - part2::bigint) > {window} THEN
    PERFORM REFUSE('the binding token has expired');
  END IF;
  INSERT INTO {NONCE_TABLE} (nonce, issued_at)
    VALUES (parts[3], to_timestamp(part2::bigint / 1000000.0)) ON CONFLICT DO NOTHING;
  IF NOT FOUND THEN
    PERFORM REFUSE('the binding token was used before');
  END IF;
  IF random() < 0.001 THEN  -- spent nonces past twice the window can never bind again
    DELETE FROM {NONCE_TABLE} WHERE issued_at < now() - make_interval(secs => {keep});
  END IF;"""
        ddl = f"""CREATE OR REPLACE FUNCTION {self.bind_function}(token text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp AS $tenancy$
DECLARE
  parts text[] := string_to_array(token, ':');
  tenant text;
  part2 text;
  signer bytea;
  k bytea;
BEGIN
  -- Until it succeeds, the transaction is bound to nothing.
  PERFORM set_config({setting}, '!no tenant is bound to this transaction', true);
  IF token IS NULL OR array_length(parts, 1) IS DISTINCT FROM 4 THEN
    PERFORM REFUSE('malformed binding token');
  END IF;
  tenant := parts[1];
  part2 := parts[2];
  FOR k IN SELECT secret FROM {KEY_TABLE} LOOP
    IF encode(sha256(k || sha256(k || convert_to(parts[1] || ':' || parts[2] || ':' || parts[3],
              'UTF8'))), 'hex') = parts[4] THEN
      signer := k;
      EXIT;
    END IF;
  END LOOP;
  IF signer IS NULL THEN
    PERFORM REFUSE('the binding token is not signed by a known key');
  END IF;
{single_use}
  PERFORM set_config({setting}, tenant || ':' || encode(sha256(signer ||
    sha256(signer || convert_to({self._transaction_message()}, 'UTF8'))), 'hex'), true);
END
$tenancy$"""
        return _REFUSE.sub(
            lambda m: f"PERFORM set_config({setting}, '!{m[1]}', true); RETURN;", ddl
        )

    def _session_verify_ddl(self) -> str:
        # Direct connections. Once per statement (an InitPlan): a few function calls and two
        # hashes, no table read; the reasons are worked out only for a refusal.
        setting = quote_literal(self.setting)
        counter = quote_literal(COUNTER)
        return f"""CREATE OR REPLACE FUNCTION {self.function}() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp AS $tenancy$
DECLARE
  token text := current_setting({setting}, true);
  parts text[] := string_to_array(token, ':');
  counter bigint := pg_sequence_last_value(to_regclass({counter}));
  k bytea;
BEGIN
  IF counter IS NOT NULL THEN  -- the session's objects exist (made together, dropped together)
    k := int8send(pg_sequence_last_value('pg_temp.tenancy_key_1'::regclass))
      || int8send(pg_sequence_last_value('pg_temp.tenancy_key_2'::regclass));
  END IF;
  IF parts[2] IS DISTINCT FROM counter::text
     OR encode(sha256(k || sha256(k || convert_to(parts[1] || ':' || parts[2], 'UTF8'))), 'hex')
        IS DISTINCT FROM parts[3]
     OR array_length(parts, 1) IS DISTINCT FROM 3 THEN
    IF token IS NULL OR token = '' THEN
      RAISE EXCEPTION 'asgi-tenancy: no tenant is bound to this transaction'
        USING ERRCODE = '42501', HINT = 'open sessions through TenantDatabase.session()';
    END IF;
    IF to_regclass({counter}) IS NULL THEN
      RAISE EXCEPTION 'asgi-tenancy: this connection has no signing session'
        USING ERRCODE = '{UNUSABLE}', HINT = 'a pooling proxy, or DISCARD';
    END IF;
    IF array_length(parts, 1) IS DISTINCT FROM 3 OR parts[2] !~ '^[0-9]{{1,18}}$' THEN
      RAISE EXCEPTION 'asgi-tenancy: malformed binding token' USING ERRCODE = '42501';
    END IF;
    IF k IS NULL THEN
      RAISE EXCEPTION 'asgi-tenancy: the binding token is not signed by a known key'
        USING ERRCODE = '42501', HINT = 'install_keys() with the application''s first key';
    END IF;
    IF encode(sha256(k || sha256(k || convert_to(parts[1] || ':' || parts[2], 'UTF8'))), 'hex')
       IS DISTINCT FROM parts[3] THEN
      RAISE EXCEPTION 'asgi-tenancy: the binding token is not signed for this connection'
        USING ERRCODE = '42501';
    END IF;
    IF parts[2]::bigint < counter THEN
      RAISE EXCEPTION 'asgi-tenancy: the binding token was used before'
        USING ERRCODE = '{UNUSABLE}';
    END IF;
    RAISE EXCEPTION 'asgi-tenancy: the binding token is ahead of this connection''s counter'
      USING ERRCODE = '{UNUSABLE}';
  END IF;
  RETURN parts[1];
END
$tenancy$"""

    def _session_ddl(self) -> str:
        # The session key is set in sequences after their creation: a sequence's START is in
        # the catalog (pg_sequence), readable by anyone; its value is not.
        return f"""CREATE OR REPLACE FUNCTION {self.session_function}(signing_key_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp AS $tenancy$
DECLARE
  sid text;
  k bytea;
  derived bytea;
  grantee oid;
  who text;
BEGIN
  IF to_regclass('pg_temp.tenancy_session') IS NOT NULL THEN
    RETURN (SELECT session_id FROM pg_temp.tenancy_session);
  END IF;
  IF pg_my_temp_schema() <> 0 THEN
    RAISE EXCEPTION 'asgi-tenancy: the signing session of this connection was discarded'
      USING ERRCODE = '{UNUSABLE}', HINT = 'the connection must be replaced';
  END IF;
  sid := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
  CREATE TEMPORARY TABLE tenancy_session (session_id text NOT NULL);
  INSERT INTO pg_temp.tenancy_session VALUES (sid);
  CREATE TEMPORARY SEQUENCE tenancy_counter MINVALUE 1 START 1;
  CREATE TEMPORARY SEQUENCE tenancy_key_1 MINVALUE -9223372036854775808;
  CREATE TEMPORARY SEQUENCE tenancy_key_2 MINVALUE -9223372036854775808;
  -- The owner's default privileges (ALTER DEFAULT PRIVILEGES ... ON SEQUENCES, ON TABLES)
  -- reach temporary objects too: take back every grant they made, to anyone.
  FOR grantee IN
    SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
    WHERE c.relnamespace = pg_my_temp_schema() AND a.grantee <> c.relowner
      AND c.relname IN ('tenancy_session', 'tenancy_counter', 'tenancy_key_1', 'tenancy_key_2')
  LOOP
    who := CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(grantee)) END;
    EXECUTE format('REVOKE ALL ON TABLE pg_temp.tenancy_session FROM %s', who);
    EXECUTE format('REVOKE ALL ON SEQUENCE pg_temp.tenancy_counter, pg_temp.tenancy_key_1,'
                   ' pg_temp.tenancy_key_2 FROM %s', who);
  END LOOP;
  GRANT USAGE ON SEQUENCE {COUNTER} TO PUBLIC;  -- each BEGIN draws it; nothing can rewind it
  SELECT secret INTO k FROM {KEY_TABLE} WHERE key_id = signing_key_id;
  IF k IS NOT NULL THEN  -- an unknown key leaves the session key unset: every token is refused
    derived := sha256(k || convert_to('asgi-tenancy session key:' || sid, 'UTF8'));
    PERFORM setval('pg_temp.tenancy_key_1',
                   ('x' || encode(substr(derived, 1, 8), 'hex'))::bit(64)::bigint),
            setval('pg_temp.tenancy_key_2',
                   ('x' || encode(substr(derived, 9, 8), 'hex'))::bit(64)::bigint);
  END IF;
  RETURN sid;
END
$tenancy$"""

    async def install_keys(self, admin: AsyncConnection) -> None:
        """Make the database accept exactly these keys (rotation: pass new and old)."""
        ids = [key_id(k) for k in self.keys]
        await admin.execute(
            text(f"DELETE FROM {KEY_TABLE} WHERE NOT (key_id = ANY(:ids))"), {"ids": ids}
        )
        for identifier, secret in zip(ids, self.keys, strict=True):
            await admin.execute(
                text(
                    f"INSERT INTO {KEY_TABLE} (key_id, secret) VALUES (:id, :secret)"
                    " ON CONFLICT (key_id) DO NOTHING"
                ),
                {"id": identifier, "secret": secret},
            )
