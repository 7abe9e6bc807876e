from __future__ import annotations

import asgi_tenancy
from asgi_tenancy import errors


def test_every_error_has_a_stable_unique_code_and_status() -> None:
    classes = [getattr(errors, name) for name in errors.__all__]
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        assert issubclass(cls, errors.TenancyError)
        assert 400 <= cls.status_code <= 599
        assert cls.__doc__


def test_documented_status_codes() -> None:
    assert errors.TenantContextError.status_code == 400
    assert errors.InvalidTenantIdentifier.status_code == 400
    assert errors.TenantConflict.status_code == 400
    assert errors.UnsafeQuery.status_code == 400
    assert errors.InvalidToken.status_code == 401
    assert errors.TenantNotFound.status_code == 404
    assert errors.TenantStoreUnavailable.status_code == 503


def test_unsafe_query_carries_a_reason() -> None:
    exc = errors.UnsafeQuery("not_a_select")
    assert exc.reason == "not_a_select"
    assert exc.code == "unsafe_query"


def test_hint_is_kept_apart_from_the_message() -> None:
    exc = errors.IsolationConfigError("role is superuser", hint="connect as a plain role")
    assert exc.message == "role is superuser"
    assert exc.hint == "connect as a plain role"


def test_every_error_is_a_tenancy_error_with_its_own_code() -> None:
    classes = [getattr(errors, name) for name in errors.__all__]
    assert all(issubclass(cls, errors.TenancyError) for cls in classes)
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))


def test_the_errors_reexported_at_the_top_are_the_same_classes() -> None:
    for name in asgi_tenancy.__all__:
        if name in errors.__all__:
            assert getattr(asgi_tenancy, name) is getattr(errors, name)
