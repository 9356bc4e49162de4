"""Powertools Logger (structured JSON), Metrics (EMF) and Tracer, shared by both functions.

Log records are events: a snake_case name and fields (DESIGN §11).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

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
        if not cost.llm_calls:
            continue
        blob = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        blob.add_dimension(name="ContentType", value=content_type.value)
        blob.add_metric(name="LLMCalls", unit="Count", value=cost.llm_calls)
        blob.add_metric(name="LLMThrottles", unit="Count", value=cost.throttled_attempts)
        blob.add_metric(name="InputTokens", unit="Count", value=cost.input_tokens)
        blob.add_metric(name="OutputTokens", unit="Count", value=cost.output_tokens)
        blob.flush_metrics()
