"""Powertools Logger (structured JSON), Metrics (EMF) and Tracer, shared by both functions.

Log records are events: a snake_case name and fields (DESIGN §11).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import EphemeralMetrics

if TYPE_CHECKING:
    from content_retry.content_types import ContentType
    from content_retry.costs import ItemCost

SERVICE = "content-retry"
NAMESPACE = "ContentRetry"

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
# Only botocore is patched: its calls (SQS, Bedrock) become subsegments of their
# own. The judge, the sweep, each save and each LLM call are traced by hand,
# where they are named; patching every library X-Ray knows (its default)
# imports each one at cold start and traces every SQL statement besides.
tracer = Tracer(service=SERVICE, patch_modules=("botocore",))


def record_llm_costs(costs: Mapping[ContentType, ItemCost]) -> None:
    """EMF metrics of an invocation's LLM calls, one blob per content type (its dimension).

    ``LLMCalls``, ``LLMThrottles`` (attempts the service throttled), ``InputTokens``
    and ``OutputTokens``: what the paid work cost, searchable by content type.
    """
    for content_type, cost in costs.items():
        if not (cost.llm_calls or cost.throttled_attempts):
            continue
        blob = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        blob.add_dimension(name="ContentType", value=content_type.value)
        blob.add_metric(name="LLMCalls", unit="Count", value=cost.llm_calls)
        blob.add_metric(name="LLMThrottles", unit="Count", value=cost.throttled_attempts)
        blob.add_metric(name="InputTokens", unit="Count", value=cost.input_tokens)
        blob.add_metric(name="OutputTokens", unit="Count", value=cost.output_tokens)
        blob.flush_metrics()


@contextmanager
def traced(name: str, **annotations: str) -> Iterator[None]:
    """The block as an X-Ray subsegment ``## name`` of the invocation's trace.

    ``annotations`` (task_id, roadmap_id, content_type...) are indexed: the
    console finds traces by them (``annotation.task_id = "..."``). Nothing of
    the work's inputs, results or errors is recorded: content stays out of
    traces (errors are in the logs). A no-op where tracing is off.
    """
    with tracer.provider.in_subsegment(name=f"## {name}") as subsegment:
        for key, value in annotations.items():
            subsegment.put_annotation(key, value)
        yield


def trace_entity() -> Any:
    """The current trace entity, to carry the trace into another thread."""
    from aws_xray_sdk.core import xray_recorder

    return xray_recorder.get_trace_entity()


def continue_trace(entity: Any) -> None:
    """Make this (new) thread's subsegments children of ``entity``."""
    from aws_xray_sdk.core import xray_recorder

    xray_recorder.set_trace_entity(entity)
