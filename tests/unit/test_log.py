from __future__ import annotations

import asyncio
import io
import json
import logging

import structlog

from asgi_tenancy import Tenant, TenantLogFilter, central_scope, tenant_scope
from asgi_tenancy.log import NO_TENANT, TENANT_FIELD, add_tenant_id


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


def _structlog_lines() -> tuple[structlog.typing.FilteringBoundLogger, io.StringIO]:
    stream = io.StringIO()
    logger = structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[
            structlog.contextvars.merge_contextvars,
            add_tenant_id,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
    )
    return logger, stream


def test_structlog_lines_carry_the_same_field_as_the_stdlib_filter() -> None:
    logger, stream = _structlog_lines()
    std_logger, std_stream = _logger()
    std_logger.handlers[0].setFormatter(logging.Formatter(f"%({TENANT_FIELD})s"))
    with tenant_scope(Tenant("acme")):
        logger.info("hello")
        std_logger.info("hello")
    logger.info("outside")
    std_logger.info("outside")
    with central_scope(reason="report"):
        logger.info("central")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line[TENANT_FIELD] for line in lines] == ["acme", NO_TENANT, NO_TENANT]
    assert std_stream.getvalue().splitlines() == ["acme", NO_TENANT]


def test_a_bound_tenant_id_never_outlives_or_overrides_the_scope() -> None:
    logger, stream = _structlog_lines()
    structlog.contextvars.bind_contextvars(tenant_id="globex")  # stale, as in a reused thread
    try:
        with tenant_scope(Tenant("acme")):
            logger.info("in")
        logger.info("out")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["tenant_id"] for line in lines] == ["acme", "-"]


async def test_concurrent_tasks_log_their_own_tenant() -> None:
    logger, stream = _structlog_lines()

    async def work(tenant: str) -> None:
        async with tenant_scope(Tenant(tenant)):
            for i in range(50):
                logger.info("step", owner=tenant, i=i)
                await asyncio.sleep(0)

    await asyncio.gather(*(work(t) for t in ("acme", "globex", "initech")))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 150
    assert all(line["tenant_id"] == line["owner"] for line in lines)
