"""detect: the one judge's Lambda. API Gateway, EventBridge schedule, direct invoke."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from content_retry.detect import handle_detect_event
from content_retry.observability import logger, metrics, tracer
from content_retry.retries import DetectDependencies


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
# No response or error in the trace: they may carry content (errors are in the logs).
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)
@metrics.log_metrics
def lambda_handler(
    event: dict[str, Any], context: LambdaContext, deps: DetectDependencies | None = None
) -> dict[str, Any]:
    """Lambda calls it with ``event`` and ``context``; tests and local tools may
    pass their own ``deps`` (engine, SQS client, settings)."""
    return handle_detect_event(event, context, deps)
