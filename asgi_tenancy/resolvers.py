"""Resolvers: where a request names its tenant (header, subdomain, path, token claim).

A resolver answers an identifier or ``None`` ("this request says nothing to me"); it raises a
``TenancyError`` when the request says something malformed. ``ResolverChain`` asks them in order
and, by default, insists that every resolver that answers names the same tenant, so a header
can never override the tenant carried in a verified token.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import ipaddress
import re
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from starlette.requests import HTTPConnection
from starlette.types import Scope

from ._asgi import route_path
from ._keys import MIN_KEY_BYTES
from .errors import (
    InvalidTenantIdentifier,
    InvalidToken,
    IsolationConfigError,
    TenancyUnavailable,
    TenantConflict,
)
from .tenant import validate_tenant_id

__all__ = [
    "ChainPolicy",
    "HeaderResolver",
    "JWTClaimResolver",
    "PathResolver",
    "Resolver",
    "ResolverChain",
    "SubdomainResolver",
]

_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+\Z")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_PATH_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)+\Z")
_MAX_TOKEN_LENGTH = 8192

_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
        "ES256", "ES256K", "ES384", "ES512", "EdDSA",
    }
)  # fmt: skip


@runtime_checkable
class Resolver(Protocol):
    """Subclass (or duck-type) for a custom resolver: ``resolve`` may be sync or ``async``.

    Return the identifier the request names, ``None`` when it names none, or raise a
    ``TenancyError`` (``InvalidTenantIdentifier``, ``InvalidToken``) when it is malformed.
    """

    def resolve(self, connection: HTTPConnection) -> str | Awaitable[str | None] | None: ...


class ChainPolicy(enum.StrEnum):
    """How a chain combines answers: all that answer must agree (default), or the first wins."""

    ALL_AGREE = "all_agree"
    FIRST_MATCH = "first_match"


class ResolverChain:
    """Ask resolvers in order and return one validated identifier, or ``None``."""

    def __init__(
        self, resolvers: Iterable[Resolver], *, policy: ChainPolicy | str = ChainPolicy.ALL_AGREE
    ) -> None:
        self.resolvers: tuple[Resolver, ...] = tuple(resolvers)
        if not self.resolvers:
            raise IsolationConfigError("no resolver given", hint="pass at least one resolver")
        for resolver in self.resolvers:
            if not callable(getattr(resolver, "resolve", None)):
                raise IsolationConfigError(
                    "a resolver has no resolve() method", hint="subclass asgi_tenancy.Resolver"
                )
        # Found once here: isinstance() against a Protocol subclass is slow on every request.
        self._path_resolvers = tuple(r for r in self.resolvers if isinstance(r, PathResolver))
        #: Whether any resolver rewrites the routed scope (a stripped path prefix).
        self.rewrites_scope = bool(self._path_resolvers)
        self._single = self.resolvers[0] if len(self.resolvers) == 1 else None
        try:
            self.policy = ChainPolicy(policy)
        except ValueError:
            raise IsolationConfigError(
                "unknown resolver chain policy", hint="use ChainPolicy.ALL_AGREE or FIRST_MATCH"
            ) from None

    async def resolve(self, connection: HTTPConnection) -> str | None:
        answer = self.resolve_now(connection)
        if answer is None or isinstance(answer, str):
            return answer
        return await answer

    def resolve_now(self, connection: HTTPConnection) -> str | Awaitable[str | None] | None:
        """``resolve`` without a coroutine while every resolver answers at once (the common
        case); from the first async resolver on, an awaitable for the rest of the chain."""
        if self._single is not None:  # one resolver: nothing to agree with
            answer = self._single.resolve(connection)
            if answer is None:
                return None
            if isinstance(answer, str):
                return validate_tenant_id(answer)
            return self._resolve_rest(connection, 0, answer, None)
        found: str | None = None
        for index, resolver in enumerate(self.resolvers):
            answer = resolver.resolve(connection)
            if answer is None:
                continue
            if type(answer) is not str and inspect.isawaitable(answer):  # an async resolver
                return self._resolve_rest(connection, index, answer, found)
            found = self._accept(answer, found)
            if self.policy is ChainPolicy.FIRST_MATCH:
                return found
        return found

    async def _resolve_rest(
        self, connection: HTTPConnection, index: int, pending: Awaitable[Any], found: str | None
    ) -> str | None:
        answer = await pending
        if answer is not None:
            found = self._accept(answer, found)
            if self.policy is ChainPolicy.FIRST_MATCH:
                return found
        for resolver in self.resolvers[index + 1 :]:
            answer = resolver.resolve(connection)
            if answer is not None and type(answer) is not str and inspect.isawaitable(answer):
                answer = await answer
            if answer is None:
                continue
            found = self._accept(answer, found)
            if self.policy is ChainPolicy.FIRST_MATCH:
                return found
        return found

    @staticmethod
    def _accept(answer: object, found: str | None) -> str:
        tenant_id = validate_tenant_id(answer)
        if found is not None and found != tenant_id:
            raise TenantConflict("the request names more than one tenant")
        return tenant_id

    def route_scope(self, scope: Scope, tenant_id: str) -> Scope:
        """The scope the application sees: path prefixes of stripping resolvers removed."""
        for resolver in self._path_resolvers:
            scope = resolver.route_scope(scope, tenant_id)
        return scope


class HeaderResolver(Resolver):
    """The tenant named by a request header (default ``x-tenant-id``)."""

    def __init__(self, header: str = "x-tenant-id") -> None:
        header = header.lower() if isinstance(header, str) else header
        if not isinstance(header, str) or not _HEADER_NAME.match(header):
            raise IsolationConfigError("HeaderResolver needs a valid header name")
        self.header = header
        self._raw_name = header.encode("latin-1")

    def resolve(self, connection: HTTPConnection) -> str | None:
        # The raw ASGI header list (names arrive lower-cased): no Headers object per request.
        name = self._raw_name
        found: bytes | None = None
        for key, value in connection.scope["headers"]:
            if key == name:
                value = value.strip(b" \t")
                if found is not None and value != found:
                    raise TenantConflict("the tenant header is repeated with different values")
                found = value
        return None if found is None else found.decode("latin-1")


class SubdomainResolver(Resolver):
    """The tenant named by the one DNS label below ``base_domain`` (``acme.example.com``).

    Hosts outside the base domain, and the base domain itself, answer ``None``; IP literals,
    deeper subdomains and malformed hosts are refused.
    """

    def __init__(self, base_domain: str) -> None:
        base = base_domain.lower().rstrip(".") if isinstance(base_domain, str) else ""
        labels = base.split(".")
        if len(labels) < 2 or not all(_DNS_LABEL.match(label) for label in labels):
            raise IsolationConfigError(
                "SubdomainResolver needs a base domain such as 'example.com'",
                hint="no scheme, port, wildcard or leading dot",
            )
        self.base_domain = base
        self._suffix = "." + base

    def resolve(self, connection: HTTPConnection) -> str | None:
        hosts = connection.headers.getlist("host")
        if not hosts:
            return None
        if len(hosts) > 1:
            raise InvalidTenantIdentifier("the request carries more than one Host header")
        host = _host_without_port(hosts[0].strip(" \t").lower())
        if host == self.base_domain or not host.endswith(self._suffix):
            return None
        label = host[: -len(self._suffix)]
        if not _DNS_LABEL.match(label):
            raise InvalidTenantIdentifier("the host names no tenant: one DNS label is expected")
        return label


def _host_without_port(host: str) -> str:
    if host.startswith("["):
        raise InvalidTenantIdentifier("IP literals name no tenant")
    name, colon, port = host.partition(":")
    if colon and not (port.isascii() and port.isdigit() and len(port) <= 5):
        raise InvalidTenantIdentifier("malformed Host header")
    name = name.removesuffix(".")
    if not name or any(not _DNS_LABEL.match(label) for label in name.split(".")):
        raise InvalidTenantIdentifier("malformed Host header")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise InvalidTenantIdentifier("IP literals name no tenant")


class PathResolver(Resolver):
    """The tenant named by the path segment after ``prefix``: ``/t/{tenant}/...``.

    With ``strip=True`` the application sees ``/...``: the prefix and tenant move into
    ``root_path``, as under a Starlette ``Mount``, so routes stay tenant-agnostic and
    ``url_for`` still builds tenant URLs.
    """

    def __init__(self, prefix: str = "/t", *, strip: bool = False) -> None:
        if not isinstance(prefix, str) or not _PATH_PREFIX.match(prefix):
            raise IsolationConfigError(
                "PathResolver needs a prefix such as '/t'", hint="leading '/', no trailing '/'"
            )
        self.prefix = prefix
        self.strip = strip
        self._pattern = re.compile(re.escape(prefix) + r"/([^/]*)(?=/|\Z)")

    def resolve(self, connection: HTTPConnection) -> str | None:
        match = self._pattern.match(route_path(connection.scope))
        if match is None:
            return None
        return validate_tenant_id(match.group(1))

    def route_scope(self, scope: Scope, tenant_id: str) -> Scope:
        """With ``strip``, move ``/t/{tenant}`` into ``root_path``; it must name ``tenant_id``.

        Checked even under first-match, so a tenant URL never serves another tenant's data.
        """
        if not self.strip:
            return scope
        match = self._pattern.match(route_path(scope))
        if match is None:
            return scope
        if match.group(1) != tenant_id:
            raise TenantConflict("the path names another tenant than the request")
        return {**scope, "root_path": scope.get("root_path", "") + match.group(0)}


class JWTClaimResolver(Resolver):
    """The tenant named by a claim (e.g. ``org_id``) of a verified ``Authorization: Bearer`` JWT.

    Needs the ``jwt`` extra. Algorithms are an explicit allow-list, never ``none``, never HMAC
    mixed with public-key algorithms; give ``key`` or an https ``jwks_url`` (keys cached).
    """

    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        key: Any = None,
        jwks_url: str | None = None,
        claim: str = "tenant_id",
        audience: str | Sequence[str] | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        require: Sequence[str] = ("exp",),
        jwks_cache_seconds: int = 300,
    ) -> None:
        try:
            import jwt
        except ImportError:  # pragma: no cover - the extra is installed in the test suite
            raise IsolationConfigError(
                "JWTClaimResolver needs PyJWT", hint="pip install 'asgi-tenancy[jwt]'"
            ) from None
        self._jwt = jwt
        self.algorithms = _check_algorithms(algorithms)
        if (key is None) == (jwks_url is None):
            raise IsolationConfigError("JWTClaimResolver needs exactly one of key or jwks_url")
        if not isinstance(claim, str) or not claim:
            raise IsolationConfigError("JWTClaimResolver needs a claim name")
        if not isinstance(leeway, int | float) or not 0 <= leeway <= 300:
            raise IsolationConfigError("JWT leeway must be between 0 and 300 seconds")
        self.claim = claim
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._options = {"require": [*require, claim]}
        self._jwks: Any = None
        self._key: Any = None
        if jwks_url is not None:
            if not isinstance(jwks_url, str) or not jwks_url.startswith("https://"):
                raise IsolationConfigError("jwks_url must be an https URL")
            if set(self.algorithms) & _HMAC_ALGORITHMS:
                raise IsolationConfigError("a JWKS URL serves public keys: use RS/PS/ES/EdDSA")
            self._jwks = jwt.PyJWKClient(
                jwks_url, cache_jwk_set=True, lifespan=jwks_cache_seconds, timeout=5
            )
        else:
            self._key = _prepare_key(jwt, self.algorithms, key)

    def __repr__(self) -> str:
        return f"JWTClaimResolver(algorithms={list(self.algorithms)!r}, claim={self.claim!r})"

    async def resolve(self, connection: HTTPConnection) -> str | None:
        headers = connection.headers.getlist("authorization")
        if not headers:
            return None
        if len(headers) > 1:
            raise InvalidToken("more than one Authorization header")
        scheme, _, token = headers[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        if not token or len(token) > _MAX_TOKEN_LENGTH:
            raise InvalidToken("malformed bearer token")
        jwt = self._jwt
        try:
            key = self._key
            if self._jwks is not None:
                # PyJWKClient fetches over blocking urllib when its cache is cold.
                key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=self._options,
            )
        except jwt.PyJWKClientConnectionError as exc:
            raise TenancyUnavailable("the token signing keys cannot be fetched") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidToken() from exc
        value = claims.get(self.claim)
        if not isinstance(value, str):
            raise InvalidToken("the token carries no usable tenant claim")
        try:
            return validate_tenant_id(value)
        except InvalidTenantIdentifier:
            raise InvalidToken("the token carries no usable tenant claim") from None


def _check_algorithms(algorithms: Sequence[str]) -> tuple[str, ...]:
    if isinstance(algorithms, str) or not algorithms:
        raise IsolationConfigError(
            "JWTClaimResolver needs an explicit list of algorithms", hint="e.g. ['RS256']"
        )
    chosen = tuple(algorithms)
    for alg in chosen:
        if alg not in _HMAC_ALGORITHMS | _ASYMMETRIC_ALGORITHMS:
            raise IsolationConfigError("unsupported or unsafe JWT algorithm", hint="never 'none'")
    if set(chosen) & _HMAC_ALGORITHMS and set(chosen) & _ASYMMETRIC_ALGORITHMS:
        raise IsolationConfigError(
            "HMAC and public-key JWT algorithms mixed",
            hint="a public key would be accepted as an HMAC secret; use one family",
        )
    return chosen


def _prepare_key(jwt: Any, algorithms: tuple[str, ...], key: Any) -> Any:
    if algorithms[0] in _HMAC_ALGORITHMS:
        raw = key.encode() if isinstance(key, str) else key
        if not isinstance(raw, bytes) or len(raw) < MIN_KEY_BYTES:
            raise IsolationConfigError(f"an HMAC key needs at least {MIN_KEY_BYTES} bytes")
        if raw.lstrip().startswith(b"-----BEGIN") or raw.startswith(b"ssh-"):
            raise IsolationConfigError("a PEM or SSH key is not an HMAC secret")
        return raw
    registry = jwt.algorithms.get_default_algorithms()
    prepared = None
    for alg in algorithms:
        try:
            prepared = registry[alg].prepare_key(key)
        except Exception as exc:
            raise IsolationConfigError(
                "the JWT key does not fit every listed algorithm",
                hint="list only the algorithms of the key's family",
            ) from exc
    if hasattr(prepared, "private_bytes"):
        raise IsolationConfigError(
            "JWTClaimResolver verifies with a public key", hint="pass key.public_key()"
        )
    return prepared
