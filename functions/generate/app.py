"""generate: consumes retry messages in batches, generates, saves through RDS Proxy."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from content_retry.observability import logger, metrics, tracer
from content_retry.worker import WorkerDependencies, handle_retry_batch


@logger.inject_lambda_context
# No response or error in the trace: they may carry content (errors are in the logs).
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)
@metrics.log_metrics
def lambda_handler(
    event: dict[str, Any], context: LambdaContext, deps: WorkerDependencies | None = None
) -> dict[str, Any]:
    """Lambda calls it with ``event`` and ``context``; tests and local tools may
    pass their own ``deps`` (engine, SQS client, settings, generator)."""
    return handle_retry_batch(event, context, deps)
