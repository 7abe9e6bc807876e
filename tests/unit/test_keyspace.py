from __future__ import annotations

import string
import unicodedata
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_tenancy import (
    IsolationConfigError,
    TenancyError,
    Tenant,
    TenantContextError,
    central_scope,
    tenant_scope,
)
from asgi_tenancy.keyspace import MAX_KEY_BYTES, SEPARATORS, InvalidKeyPart, KeySpace

CACHE = KeySpace("cache")
UPLOADS = KeySpace("uploads", separator="/")

tenant_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
good_parts = st.one_of(
    st.from_regex(r"[A-Za-z0-9_@+=,-][A-Za-z0-9._@+=,-]{0,12}", fullmatch=True),
    st.integers(),
)


def _decode(segment: str) -> str:
    out, upper = [], False
    for c in segment:
        if c == "~":
            upper = True
            continue
        out.append(c.upper() if upper else c)
        upper = False
    return "".join(out)


def _parse(space: KeySpace, key: str) -> tuple[str, list[str]]:
    namespace, tenant, *parts = key.split(space.separator)
    assert namespace == space.namespace
    return _decode(tenant), parts


def test_a_key_names_the_namespace_the_tenant_and_the_parts() -> None:
    with tenant_scope(Tenant("acme")):
        assert CACHE.key("user", 42) == "cache:acme:user:42"
        assert UPLOADS.prefix("invoices") == "uploads/acme/invoices/"
        assert UPLOADS.prefix() == "uploads/acme/"
        assert CACHE.pattern("user") == "cache:acme:user:*"


@pytest.mark.parametrize("call", [CACHE.key, CACHE.prefix, CACHE.pattern])
def test_outside_a_tenant_scope_every_call_raises(call: object) -> None:
    assert callable(call)
    with pytest.raises(TenantContextError):
        call("user")
    with central_scope(reason="test"), pytest.raises(TenantContextError):
        call("user")


def test_a_key_needs_a_part() -> None:
    with tenant_scope(Tenant("acme")), pytest.raises(InvalidKeyPart):
        CACHE.key()


@given(
    a=tenant_ids,
    b=tenant_ids,
    parts_a=st.lists(good_parts, max_size=3),
    parts_b=st.lists(good_parts, min_size=1, max_size=3),
)
def test_no_key_of_one_tenant_is_under_another_tenants_prefix(
    a: str, b: str, parts_a: list[str | int], parts_b: list[str | int]
) -> None:
    for space in (CACHE, UPLOADS):
        with tenant_scope(Tenant(a)):
            prefix = space.prefix(*parts_a)
        with tenant_scope(Tenant(b)):
            key = space.key(*parts_b)
        if a != b:
            # Also on storage that folds case: Acme and acme are two tenants.
            assert not key.startswith(prefix)
            assert not key.lower().startswith(prefix.lower())


@given(tenant=tenant_ids, parts=st.lists(good_parts, min_size=1, max_size=4))
def test_a_key_reads_back_as_exactly_its_tenant_and_parts(
    tenant: str, parts: list[str | int]
) -> None:
    for space in (CACHE, UPLOADS):
        with tenant_scope(Tenant(tenant)):
            key = space.key(*parts)
        assert _parse(space, key) == (tenant, [str(p) for p in parts])


def test_a_tenant_id_that_prefixes_another_gets_a_disjoint_prefix() -> None:
    with tenant_scope(Tenant("acme")):
        acme = UPLOADS.prefix()
    with tenant_scope(Tenant("acme-corp")):
        corp = UPLOADS.key("x")
    with tenant_scope(Tenant("Acme")):
        upper = UPLOADS.prefix()
    assert not corp.startswith(acme)
    assert upper == "uploads/~acme/"
    assert upper.lower() != acme.lower()


# Every way we know of to climb out of a prefix, or to look like another key after decoding,
# normalising, case folding or glob matching; then every single character outside the grammar.
CRAFTED = [
    "",
    ".",
    "..",
    ".hidden",
    "a/b",
    "../globex",
    "a\\b",
    "..\\globex",
    "a:b",
    ":globex:",
    "a|b",
    "%2e%2e",
    "%2F",
    "a%00",
    "a\x00",
    "a\n",
    "a b",
    "\t",
    "*",
    "a*",
    "?",
    "[ab]",
    "~",
    "~root",
    "\uff0f",  # fullwidth solidus: NFKC folds it to '/'
    "\u2024\u2024",  # one dot leader, twice: NFKC folds it to '..'
    "caf\u00e9",
    "\u0430cme",  # Cyrillic a
    "a" * 256,
    *(
        c
        for c in map(chr, range(0, 0x80))
        if c not in string.ascii_letters + string.digits + "_@+=,-"
    ),
]


@pytest.mark.parametrize("part", CRAFTED, ids=repr)
def test_crafted_parts_are_refused(part: str) -> None:
    with tenant_scope(Tenant("acme")):
        for space in (CACHE, UPLOADS):
            with pytest.raises(InvalidKeyPart):
                space.key("user", part)
            with pytest.raises(InvalidKeyPart):
                space.prefix(part)


@given(tenant=tenant_ids, part=st.text(max_size=12))
def test_any_part_is_refused_or_stays_one_inert_segment(tenant: str, part: str) -> None:
    with tenant_scope(Tenant(tenant)):
        try:
            key = UPLOADS.key(part, "tail")
        except InvalidKeyPart:
            return
    assert _parse(UPLOADS, key) == (tenant, [part, "tail"])
    # Storage that URL-decodes or normalises sees the very same key; no dot segment to resolve.
    assert key.isascii()
    assert urllib.parse.unquote(key) == key == unicodedata.normalize("NFKC", key)
    assert not any(segment in (".", "..") for segment in key.split("/"))


@pytest.mark.parametrize("bad", [True, 1.5, b"bytes", None, ["x"]], ids=repr)
def test_parts_are_strings_or_integers(bad: object) -> None:
    with tenant_scope(Tenant("acme")), pytest.raises(InvalidKeyPart):
        CACHE.key(bad)  # type: ignore[arg-type]


def test_keys_longer_than_the_storage_limit_are_refused() -> None:
    with tenant_scope(Tenant("acme")):
        parts = ["p" * 255] * 4
        with pytest.raises(InvalidKeyPart):
            CACHE.key(*parts)
        assert len(CACHE.key(*parts[:3])) <= MAX_KEY_BYTES


def test_invalid_key_parts_are_a_client_error() -> None:
    assert issubclass(InvalidKeyPart, TenancyError)
    assert (InvalidKeyPart.status_code, InvalidKeyPart.code) == (400, "invalid_key_part")


@pytest.mark.parametrize("separator", ["", ".", "-", "_", "::", "a", "~", " "])
def test_a_separator_that_could_occur_in_an_id_or_part_is_refused(separator: str) -> None:
    assert separator not in SEPARATORS
    with pytest.raises(IsolationConfigError):
        KeySpace("cache", separator=separator)


@pytest.mark.parametrize("namespace", ["", "a:b", "a/b", "..", "caf\u00e9", 5])
def test_a_namespace_outside_the_grammar_is_refused(namespace: object) -> None:
    with pytest.raises(IsolationConfigError):
        KeySpace(namespace)  # type: ignore[arg-type]


def test_central_prefix_only_in_the_central_scope() -> None:
    with central_scope(reason="purge a deleted tenant's cache"):
        assert CACHE.central_prefix("globex") == "cache:globex:"
        assert UPLOADS.central_prefix("Globex", "invoices") == "uploads/~globex/invoices/"
    with pytest.raises(TenantContextError):
        CACHE.central_prefix("globex")
    with tenant_scope(Tenant("acme")), pytest.raises(TenantContextError):
        CACHE.central_prefix("globex")
