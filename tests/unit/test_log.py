from __future__ import annotations

import io
import logging

from asgi_tenancy import Tenant, TenantLogFilter, central_scope, tenant_scope


def _logger() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TenantLogFilter())
    handler.setFormatter(logging.Formatter("%(tenant_id)s %(message)s"))
    logger = logging.getLogger("tests.log_filter")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def test_records_inside_a_scope_carry_the_tenant_id() -> None:
    logger, stream = _logger()
    with tenant_scope(Tenant("acme")):
        logger.info("hello")
    assert stream.getvalue() == "acme hello\n"


def test_records_outside_a_scope_carry_a_dash() -> None:
    logger, stream = _logger()
    logger.info("hello")
    with central_scope(reason="report"):
        logger.info("central")
    assert stream.getvalue() == "- hello\n- central\n"


def test_the_filter_never_drops_a_record() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert TenantLogFilter().filter(record) is True
    assert record.__dict__["tenant_id"] == "-"
