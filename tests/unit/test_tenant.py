from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_tenancy import InvalidTenantIdentifier, Tenant, TenantStatus
from asgi_tenancy.tenant import validate_tenant_id

_FIRST = string.ascii_letters + string.digits
_REST = _FIRST + "._-"
_REJECTION = str(
    InvalidTenantIdentifier(
        "tenant identifier must be 1-63 characters: ASCII letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )
)
valid_ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_FIRST),
    st.text(alphabet=_REST, max_size=62),
)


@given(valid_ids)
def test_valid_identifiers_pass_unchanged(value: str) -> None:
    assert validate_tenant_id(value) == value


@given(st.text(min_size=1, max_size=80))
def test_any_text_is_either_valid_or_rejected_cleanly(value: str) -> None:
    ok = len(value) <= 63 and value[0] in _FIRST and all(ch in _REST for ch in value)
    if ok:
        assert validate_tenant_id(value) == value
    else:
        with pytest.raises(InvalidTenantIdentifier) as info:
            validate_tenant_id(value)
        # One fixed message whatever the input: a request's value is never echoed back.
        assert str(info.value) == _REJECTION


_BAD_CHARS = [" ", "\n", "\t", "\x00", "\x7f", "/", "'", '"', ";", "é", "\u200b"]


@given(valid_ids, st.sampled_from(_BAD_CHARS))
def test_whitespace_control_and_foreign_characters_are_rejected(value: str, bad: str) -> None:
    for candidate in (value + bad, bad + value, value[:1] + bad + value[1:]):
        with pytest.raises(InvalidTenantIdentifier):
            validate_tenant_id(candidate)


@pytest.mark.parametrize("value", ["", "a" * 64, "-abc", ".abc", "_abc", "abc\n", None, 1, b"abc"])
def test_edge_cases_are_rejected(value: object) -> None:
    with pytest.raises(InvalidTenantIdentifier):
        validate_tenant_id(value)


def test_longest_identifier_is_accepted() -> None:
    assert validate_tenant_id("a" * 63) == "a" * 63


def test_tenant_is_frozen_with_read_only_copied_attributes() -> None:
    attrs = {"schema": "tenant_acme"}
    tenant = Tenant("acme", attributes=attrs)
    attrs["schema"] = "changed"
    assert tenant.attributes["schema"] == "tenant_acme"
    with pytest.raises(TypeError):
        tenant.attributes["schema"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        tenant.id = "other"  # type: ignore[misc]


def test_tenant_status_is_normalised_and_checked() -> None:
    assert Tenant("acme", status="suspended").status is TenantStatus.SUSPENDED  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status"):
        Tenant("acme", status="deleted")  # type: ignore[arg-type]


def test_tenant_rejects_invalid_identifier() -> None:
    with pytest.raises(InvalidTenantIdentifier):
        Tenant("bad id")


def test_repr_hides_attributes() -> None:
    tenant = Tenant("acme", attributes={"database_url": "postgresql://u:secret@h/db"})
    assert "secret" not in repr(tenant)


def test_tenants_hash_and_compare_by_value() -> None:
    assert Tenant("acme") == Tenant("acme")
    assert len({Tenant("acme"), Tenant("acme")}) == 1
    assert Tenant("acme") != Tenant("acme", status=TenantStatus.SUSPENDED)
