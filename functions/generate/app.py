"""generate: consumes retry messages in batches, generates, saves through RDS Proxy."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from content_retry.observability import logger, metrics, tracer
from content_retry.worker import handle_retry_batch


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_retry_batch(event, context)
