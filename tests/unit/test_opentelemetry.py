"""The OpenTelemetry pieces without a database (tests/adversarial has the database cases)."""

from __future__ import annotations

import re
import threading
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.types import Message, Receive, Scope, Send

from asgi_tenancy import IsolationConfigError, Tenant, central_scope, tenant_scope
from asgi_tenancy.opentelemetry import (
    OVERFLOW_TENANT,
    TENANT_ATTRIBUTE,
    TenantSpanProcessor,
    TenantTelemetryMiddleware,
    _TenantLabels,
    sql_comment,
)
from asgi_tenancy.tenant import TENANT_ID_PATTERN

COMMENT = re.compile(r"/\*tenant='([^'*\\/\s]*)'\*/")


@given(st.text())
def test_any_value_becomes_one_closed_comment_that_reads_back(value: str) -> None:
    comment = sql_comment(value)
    found = COMMENT.fullmatch(comment)
    assert found is not None, comment
    assert comment.count("*/") == 1
    assert urllib.parse.unquote(found.group(1)) == value


def test_a_tenant_id_appears_as_it_is() -> None:
    assert sql_comment("acme") == "/*tenant='acme'*/"
    assert sql_comment("a.b_c-D9") == "/*tenant='a.b_c-D9'*/"
    assert TENANT_ID_PATTERN.match("a.b_c-D9")


def test_spans_started_in_a_scope_carry_its_tenant_and_no_other() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(TenantSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("outside"):
        with tenant_scope(Tenant("acme")), tracer.start_as_current_span("acme"):
            pass
        with central_scope(reason="test"), tracer.start_as_current_span("central"):
            pass
        with tenant_scope(Tenant("globex")), tracer.start_as_current_span("globex"):
            pass
    tenants = {
        s.name: (s.attributes or {}).get(TENANT_ATTRIBUTE) for s in exporter.get_finished_spans()
    }
    assert tenants == {"outside": None, "acme": "acme", "central": None, "globex": "globex"}
    provider.shutdown()


def test_labels_stay_within_the_cap_under_concurrency() -> None:
    labels = _TenantLabels(10)
    seen: list[str] = []
    lock = threading.Lock()

    def work(offset: int) -> None:
        for i in range(200):
            label = labels(f"t{(i + offset) % 50}")
            with lock:
                seen.append(label)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    distinct = set(seen) - {OVERFLOW_TENANT}
    assert len(distinct) == 10
    assert OVERFLOW_TENANT in seen
    # A tenant keeps the label it was given first, for good.
    assert all(labels(t) == t for t in distinct)


@pytest.mark.parametrize("cap", [-1, 1.5, True, "10"])
def test_max_tenants_is_a_non_negative_integer(cap: object) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    with pytest.raises(IsolationConfigError):
        TenantTelemetryMiddleware(app, max_tenants=cap)  # type: ignore[arg-type]


async def test_lifespan_passes_through_untouched() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        return None

    scope: Scope = {"type": "lifespan"}
    await TenantTelemetryMiddleware(app)(scope, receive, send)
    assert seen == [scope]
