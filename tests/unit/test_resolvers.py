from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import HTTPConnection

from asgi_tenancy import (
    ChainPolicy,
    HeaderResolver,
    InvalidTenantIdentifier,
    InvalidToken,
    IsolationConfigError,
    JWTClaimResolver,
    PathResolver,
    Resolver,
    SubdomainResolver,
    TenancyError,
    TenancyUnavailable,
    TenantConflict,
)
from asgi_tenancy.resolvers import ResolverChain
from asgi_tenancy.tenant import validate_tenant_id

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
HMAC_KEY = b"k" * 32
AUDIENCE = "https://api.example.com"
ISSUER = "https://issuer.example.com"


def conn(
    headers: Iterable[tuple[str, str]] = (),
    *,
    path: str = "/",
    root_path: str = "",
    scope_type: str = "http",
) -> HTTPConnection:
    return HTTPConnection(
        {
            "type": scope_type,
            "path": path,
            "root_path": root_path,
            "query_string": b"",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        }
    )


def rs_token(claims: dict[str, Any], key: Any = RSA_KEY, alg: str = "RS256") -> str:
    base = {"exp": int(time.time()) + 300, "aud": AUDIENCE, "iss": ISSUER}
    return jwt.encode({**base, **claims}, key, algorithm=alg)


def rs_resolver(**kwargs: Any) -> JWTClaimResolver:
    options: dict[str, Any] = {
        "algorithms": ["RS256"],
        "key": RSA_PUBLIC_PEM,
        "claim": "org_id",
        "audience": AUDIENCE,
        "issuer": ISSUER,
    }
    return JWTClaimResolver(**{**options, **kwargs})


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# Header


def test_header_resolver_reads_the_default_header() -> None:
    assert HeaderResolver().resolve(conn([("x-tenant-id", "acme")])) == "acme"


def test_header_resolver_without_the_header_answers_none() -> None:
    assert HeaderResolver().resolve(conn([("x-other", "acme")])) is None


def test_header_resolver_custom_header_is_case_insensitive() -> None:
    assert HeaderResolver("X-Org").resolve(conn([("x-org", "acme")])) == "acme"


def test_header_repeated_with_different_values_is_a_conflict() -> None:
    with pytest.raises(TenantConflict):
        HeaderResolver().resolve(conn([("x-tenant-id", "acme"), ("x-tenant-id", "globex")]))


def test_header_repeated_with_the_same_value_is_fine() -> None:
    assert HeaderResolver().resolve(conn([("x-tenant-id", "acme"), ("x-tenant-id", "acme")]))


def test_header_resolver_refuses_a_bad_header_name() -> None:
    with pytest.raises(IsolationConfigError):
        HeaderResolver("x tenant")


# Subdomain


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("acme.example.com", "acme"),
        ("ACME.Example.COM", "acme"),
        ("acme.example.com:8443", "acme"),
        ("acme.example.com.", "acme"),
        ("acme.example.com.:80", "acme"),
        ("example.com", None),
        ("other.org", None),
        ("acme.notexample.com", None),
    ],
)
def test_subdomain_resolver_reads_one_label(host: str, expected: str | None) -> None:
    assert SubdomainResolver("example.com").resolve(conn([("host", host)])) == expected


@pytest.mark.parametrize(
    "host",
    [
        "a.b.example.com",
        "127.0.0.1",
        "127.0.0.1:8000",
        "[::1]:8000",
        "[::1]",
        "-acme.example.com",
        "ac_me.example.com",
        "acme..example.com",
        "acme.example.com:http",
        ".example.com",
        "",
        "ac me.example.com",
    ],
)
def test_subdomain_resolver_refuses_malformed_hosts(host: str) -> None:
    with pytest.raises(InvalidTenantIdentifier):
        SubdomainResolver("example.com").resolve(conn([("host", host)]))


def test_subdomain_resolver_refuses_two_host_headers() -> None:
    with pytest.raises(InvalidTenantIdentifier):
        SubdomainResolver("example.com").resolve(
            conn([("host", "acme.example.com"), ("host", "globex.example.com")])
        )


def test_subdomain_resolver_without_host_answers_none() -> None:
    assert SubdomainResolver("example.com").resolve(conn()) is None


@pytest.mark.parametrize(
    "base", ["com", "*.example.com", "https://example.com", "", ".example.com"]
)
def test_subdomain_resolver_refuses_a_bad_base_domain(base: str) -> None:
    with pytest.raises(IsolationConfigError):
        SubdomainResolver(base)


# Path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/t/acme", "acme"),
        ("/t/acme/", "acme"),
        ("/t/acme/items/1", "acme"),
        ("/items", None),
        ("/tx/acme", None),
        ("/t", None),
    ],
)
def test_path_resolver_reads_the_segment_after_the_prefix(path: str, expected: str | None) -> None:
    assert PathResolver().resolve(conn(path=path)) == expected


@pytest.mark.parametrize("path", ["/t/", "/t//items", "/t/ac me/x", "/t/..", "/t/-acme"])
def test_path_resolver_refuses_a_malformed_segment(path: str) -> None:
    with pytest.raises(InvalidTenantIdentifier):
        PathResolver().resolve(conn(path=path))


def test_path_resolver_reads_below_the_mount_point() -> None:
    assert PathResolver().resolve(conn(path="/api/t/acme/x", root_path="/api")) == "acme"


def test_path_resolver_strip_moves_the_prefix_into_root_path() -> None:
    resolver = PathResolver("/tenants", strip=True)
    scope = {"type": "http", "path": "/api/tenants/acme/items", "root_path": "/api"}
    assert resolver.route_scope(scope, "acme")["root_path"] == "/api/tenants/acme"
    assert resolver.route_scope(scope, "acme")["path"] == "/api/tenants/acme/items"


def test_path_resolver_strip_refuses_a_path_naming_another_tenant() -> None:
    scope = {"type": "http", "path": "/t/globex/items", "root_path": ""}
    with pytest.raises(TenantConflict):
        PathResolver(strip=True).route_scope(scope, "acme")


def test_path_resolver_without_strip_leaves_the_scope_alone() -> None:
    scope = {"type": "http", "path": "/t/acme/items", "root_path": ""}
    assert PathResolver().route_scope(scope, "globex") is scope


@pytest.mark.parametrize("prefix", ["t", "/t/", "/", "", "/t/{x}"])
def test_path_resolver_refuses_a_bad_prefix(prefix: str) -> None:
    with pytest.raises(IsolationConfigError):
        PathResolver(prefix)


# Chain


class AsyncResolver(Resolver):
    def __init__(self, answer: str | None) -> None:
        self.answer = answer

    async def resolve(self, connection: HTTPConnection) -> str | None:
        return self.answer


class Fixed:
    def __init__(self, answer: str | None) -> None:
        self.answer = answer

    def resolve(self, connection: HTTPConnection) -> str | None:
        return self.answer


async def test_chain_accepts_async_and_duck_typed_resolvers() -> None:
    chain = ResolverChain([Fixed(None), AsyncResolver("acme"), Fixed("acme")])
    assert await chain.resolve(conn()) == "acme"


async def test_chain_where_answers_disagree_is_a_conflict() -> None:
    with pytest.raises(TenantConflict):
        await ResolverChain([Fixed("acme"), AsyncResolver("globex")]).resolve(conn())


async def test_chain_first_match_takes_the_first_answer() -> None:
    chain = ResolverChain([Fixed(None), Fixed("acme"), Fixed("globex")], policy="first_match")
    assert chain.policy is ChainPolicy.FIRST_MATCH
    assert await chain.resolve(conn()) == "acme"


async def test_chain_where_nobody_answers_gives_none() -> None:
    assert await ResolverChain([Fixed(None)]).resolve(conn()) is None


async def test_chain_validates_what_a_custom_resolver_returns() -> None:
    with pytest.raises(InvalidTenantIdentifier):
        await ResolverChain([Fixed("../etc")]).resolve(conn())


def test_chain_config_errors() -> None:
    with pytest.raises(IsolationConfigError):
        ResolverChain([])
    with pytest.raises(IsolationConfigError):
        ResolverChain([object()])  # type: ignore[list-item]
    with pytest.raises(IsolationConfigError):
        ResolverChain([Fixed("a")], policy="last_match")


# JWT


async def test_jwt_resolver_reads_the_claim_of_a_valid_token() -> None:
    assert await rs_resolver().resolve(conn(bearer(rs_token({"org_id": "acme"})))) == "acme"


async def test_jwt_resolver_without_authorization_answers_none() -> None:
    assert await rs_resolver().resolve(conn()) is None
    assert await rs_resolver().resolve(conn([("authorization", "Basic dTpw")])) is None


@pytest.mark.parametrize(
    "claims",
    [
        {"org_id": "acme", "exp": -10},  # times are relative to now, made inside the test
        {"org_id": "acme", "nbf": 600},
        {"org_id": "acme", "aud": "https://elsewhere.example.com"},
        {"org_id": "acme", "iss": "https://evil.example.com"},
        {"tenant": "acme"},
        {"org_id": 7},
        {"org_id": ["acme"]},
        {"org_id": "../acme"},
        {"org_id": "acme", "exp": None},
    ],
)
async def test_jwt_resolver_refuses_bad_claims(claims: dict[str, Any]) -> None:
    now = int(time.time())
    claims = {
        k: now + v if k in ("exp", "nbf") and isinstance(v, int) else v for k, v in claims.items()
    }
    with pytest.raises(InvalidToken):
        await rs_resolver().resolve(conn(bearer(rs_token(claims))))


async def test_jwt_without_exp_is_refused() -> None:
    token = jwt.encode({"org_id": "acme", "aud": AUDIENCE, "iss": ISSUER}, RSA_KEY, "RS256")
    with pytest.raises(InvalidToken):
        await rs_resolver().resolve(conn(bearer(token)))


async def test_jwt_leeway_accepts_a_just_expired_token() -> None:
    token = rs_token({"org_id": "acme", "exp": int(time.time()) - 5})
    assert await rs_resolver(leeway=60).resolve(conn(bearer(token))) == "acme"


async def test_jwt_alg_none_is_refused() -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64(json.dumps({"org_id": "acme", "aud": AUDIENCE, "iss": ISSUER}).encode())
    with pytest.raises(InvalidToken):
        await rs_resolver().resolve(conn(bearer(f"{header}.{body}.")))


async def test_jwt_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"org_id": "acme", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 60}
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(RSA_PUBLIC_PEM, f"{header}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken):
        await rs_resolver().resolve(conn(bearer(f"{header}.{body}.{b64(signature)}")))


async def test_jwt_signed_by_another_key_is_refused() -> None:
    token = rs_token({"org_id": "acme"}, key=OTHER_RSA_KEY)
    with pytest.raises(InvalidToken):
        await rs_resolver().resolve(conn(bearer(token)))


async def test_jwt_claim_swapped_in_the_payload_is_refused() -> None:
    header, _, signature = rs_token({"org_id": "acme"}).split(".")
    claims = {"org_id": "globex", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 60}
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(InvalidToken):
        await rs_resolver().resolve(conn(bearer(forged)))


async def test_jwt_claim_and_header_naming_different_tenants_conflict() -> None:
    chain = ResolverChain([rs_resolver(), HeaderResolver()])
    request = conn([*bearer(rs_token({"org_id": "acme"})), ("x-tenant-id", "globex")])
    with pytest.raises(TenantConflict):
        await chain.resolve(request)


@pytest.mark.parametrize(
    "value", ["Bearer", "Bearer ", "Bearer a.b", "Bearer " + "a" * 9000, "Bearer ....."]
)
async def test_jwt_malformed_bearer_is_refused(value: str) -> None:
    with pytest.raises(InvalidToken):
        await rs_resolver().resolve(conn([("authorization", value)]))


async def test_jwt_two_authorization_headers_are_refused() -> None:
    token = rs_token({"org_id": "acme"})
    with pytest.raises(InvalidToken):
        await rs_resolver().resolve(conn([*bearer(token), *bearer(token)]))


async def test_jwt_hmac_resolver_works_with_a_long_secret() -> None:
    resolver = JWTClaimResolver(algorithms=["HS256"], key=HMAC_KEY, claim="org_id")
    token = jwt.encode({"org_id": "acme", "exp": int(time.time()) + 60}, HMAC_KEY, "HS256")
    assert await resolver.resolve(conn(bearer(token))) == "acme"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithms": ["none"], "key": RSA_PUBLIC_PEM},
        {"algorithms": ["None"], "key": RSA_PUBLIC_PEM},
        {"algorithms": [], "key": RSA_PUBLIC_PEM},
        {"algorithms": "RS256", "key": RSA_PUBLIC_PEM},
        {"algorithms": ["HS256", "RS256"], "key": RSA_PUBLIC_PEM},
        {"algorithms": ["RS256", "ES256"], "key": RSA_PUBLIC_PEM},
        {"algorithms": ["RS256"]},
        {"algorithms": ["RS256"], "key": RSA_PUBLIC_PEM, "jwks_url": "https://x/jwks"},
        {"algorithms": ["RS256"], "jwks_url": "http://issuer.example.com/jwks"},
        {"algorithms": ["HS256"], "jwks_url": "https://issuer.example.com/jwks"},
        {"algorithms": ["HS256"], "key": b"short"},
        {"algorithms": ["HS256"], "key": RSA_PUBLIC_PEM},
        {"algorithms": ["RS256"], "key": b"not a pem key at all"},
        {"algorithms": ["RS256"], "key": RSA_KEY},
        {"algorithms": ["RS256"], "key": RSA_PUBLIC_PEM, "claim": ""},
        {"algorithms": ["RS256"], "key": RSA_PUBLIC_PEM, "leeway": -1},
    ],
)
def test_jwt_resolver_refuses_unsafe_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(IsolationConfigError):
        JWTClaimResolver(**kwargs)


def test_jwt_resolver_repr_shows_no_key() -> None:
    assert "BEGIN" not in repr(rs_resolver())


def jwks_for(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**jwk, "kid": kid, "alg": "RS256", "use": "sig"}]}


async def test_jwt_jwks_keys_are_fetched_once_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    fetches: list[str] = []

    def fetch_data(self: jwt.PyJWKClient) -> Any:
        fetches.append(self.uri)
        return jwks_for(RSA_KEY, "k1")

    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", fetch_data)
    resolver = rs_resolver(key=None, jwks_url="https://issuer.example.com/jwks")
    for _ in range(5):
        token = jwt.encode(
            {"org_id": "acme", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 60},
            RSA_KEY,
            "RS256",
            headers={"kid": "k1"},
        )
        assert await resolver.resolve(conn(bearer(token))) == "acme"
    assert fetches == ["https://issuer.example.com/jwks"]


async def test_jwt_jwks_unknown_kid_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", lambda self: jwks_for(RSA_KEY, "k1"))
    resolver = rs_resolver(key=None, jwks_url="https://issuer.example.com/jwks")
    claims = {"org_id": "acme", "aud": AUDIENCE, "iss": ISSUER, "exp": int(time.time()) + 60}
    for kid in ("k2", "k1"):  # unknown key id; known id but signed by another key
        token = jwt.encode(claims, OTHER_RSA_KEY, "RS256", headers={"kid": kid})
        with pytest.raises(InvalidToken):
            await resolver.resolve(conn(bearer(token)))


async def test_jwt_jwks_unreachable_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def fetch_data(self: jwt.PyJWKClient) -> Any:
        raise jwt.PyJWKClientConnectionError("down")

    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", fetch_data)
    resolver = rs_resolver(key=None, jwks_url="https://issuer.example.com/jwks")
    token = jwt.encode(
        {"org_id": "acme", "exp": int(time.time()) + 60}, RSA_KEY, "RS256", headers={"kid": "k1"}
    )
    with pytest.raises(TenancyUnavailable):
        await resolver.resolve(conn(bearer(token)))


async def test_jwt_es256_key_works() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    resolver = JWTClaimResolver(algorithms=["ES256"], key=key.public_key(), claim="org_id")
    token = jwt.encode({"org_id": "acme", "exp": int(time.time()) + 60}, key, "ES256")
    assert await resolver.resolve(conn(bearer(token))) == "acme"


# Fuzzing the resolvers directly, raw inputs included (tests/http/test_fuzz.py runs 2,000 per
# resolver through the application): an answer is the id the request named, or a 400/401.

_ID_ALPHABET = st.characters(min_codepoint=0, max_codepoint=255)
_NEAR_IDS = st.sampled_from(["acme", "ACME", "acme ", " acme", "acme\t", "a", "a" * 63, "a" * 64])
_TEXT = st.text(_ID_ALPHABET, max_size=80)


def _assert_client_error(exc: TenancyError) -> None:
    assert exc.status_code in (400, 401)


@settings(max_examples=300)
@given(values=st.lists(st.one_of(_NEAR_IDS, _TEXT), min_size=1, max_size=3))
def test_fuzz_header_resolver(values: list[str]) -> None:
    try:
        answer = HeaderResolver().resolve(conn([("x-tenant-id", v) for v in values]))
        if answer is not None:
            answer = validate_tenant_id(answer)
    except TenancyError as exc:
        _assert_client_error(exc)
        return
    assert answer in {v.strip(" \t") for v in values}


_LABEL = st.text(st.sampled_from("abcxyzABC019-_"), max_size=12)
_HOSTS = st.one_of(
    _TEXT,
    st.builds(
        lambda labels, port, dot: ".".join(labels) + ".example.com" + dot + port,
        st.lists(_LABEL, min_size=1, max_size=3),
        st.sampled_from(["", ":80", ":8443", ":x", ":", ":999999"]),
        st.sampled_from(["", "."]),
    ),
    st.builds(
        lambda parts, ipv6: f"[{':'.join(map(str, parts))}]" if ipv6 else ".".join(map(str, parts)),
        st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=5),
        st.booleans(),
    ),
)


@settings(max_examples=300)
@given(host=_HOSTS)
def test_fuzz_subdomain_resolver(host: str) -> None:
    try:
        answer = SubdomainResolver("example.com").resolve(conn([("host", host)]))
        if answer is not None:
            answer = validate_tenant_id(answer)
    except TenancyError as exc:
        _assert_client_error(exc)
        return
    if answer is not None:
        assert host.lower().startswith(answer + ".example.com")


_SEGMENT = st.one_of(_NEAR_IDS, _LABEL, st.text(_ID_ALPHABET, max_size=12))
_PATHS = st.one_of(
    _TEXT.map(lambda t: "/" + t),
    st.builds(lambda segments: "/" + "/".join(segments), st.lists(_SEGMENT, max_size=4)),
    st.builds(lambda seg, rest: f"/t/{seg}{rest}", _SEGMENT, st.sampled_from(["", "/", "/x/y"])),
)


@settings(max_examples=300)
@given(path=_PATHS)
def test_fuzz_path_resolver(path: str) -> None:
    try:
        answer = PathResolver().resolve(conn(path=path))
    except TenancyError as exc:
        _assert_client_error(exc)
        return
    if answer is not None:
        assert validate_tenant_id(answer) == path.split("/")[2]


_HS_RESOLVER = JWTClaimResolver(algorithms=["HS256"], key=HMAC_KEY, claim="org_id")
_CLAIM_VALUES = st.one_of(_NEAR_IDS, _TEXT, st.integers(), st.none(), st.lists(_NEAR_IDS))


def _mangle(token: str, how: str, position: int) -> str:
    if how == "keep":
        return token
    if how == "truncate":
        return token[: position % max(len(token), 1)]
    index = position % len(token)
    flipped = "A" if token[index] != "A" else "B"
    return token[:index] + flipped + token[index + 1 :]


@settings(max_examples=300)
@given(
    claim=_CLAIM_VALUES,
    exp_offset=st.integers(min_value=-600, max_value=600),
    key=st.sampled_from([HMAC_KEY, b"x" * 32]),
    how=st.sampled_from(["keep", "keep", "truncate", "flip"]),
    position=st.integers(min_value=0, max_value=10_000),
    raw=st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126))),
)
async def test_fuzz_jwt_resolver(
    claim: Any, exp_offset: int, key: bytes, how: str, position: int, raw: str | None
) -> None:
    token = jwt.encode({"org_id": claim, "exp": int(time.time()) + exp_offset}, key, "HS256")
    token = raw if raw is not None else _mangle(token, how, position)
    try:
        answer = await _HS_RESOLVER.resolve(conn(bearer(token)))
    except TenancyError as exc:
        _assert_client_error(exc)
        return
    # Only an untouched token signed with the right key, unexpired, with a valid id passes.
    assert raw is None
    assert how == "keep" or _still_same_token(token, claim)
    assert key == HMAC_KEY
    assert answer == claim
    assert exp_offset > -1


def _still_same_token(token: str, claim: Any) -> bool:
    # A flip inside base64 padding bits can leave the decoded token unchanged.
    payload = jwt.decode(token, HMAC_KEY, algorithms=["HS256"])
    return bool(payload["org_id"] == claim)
