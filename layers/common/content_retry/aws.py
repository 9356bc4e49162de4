"""AWS clients from one cached factory, created on first use, never at import.

Creating clients lazily keeps cold starts short, keeps SnapStart snapshots free
of credentials, and lets moto (in-process or its server) stand in for AWS:
``AWS_ENDPOINT_URL`` points every client at it.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any

from content_retry.settings import get_settings

# Every call of these clients (SQS sends, Secrets Manager, RDS) is small: an
# endpoint that does not answer in seconds will not answer in time. At most
# AWS_CALL_WORST_CASE_SECONDS a call, botocore's retries included, which the
# generate function keeps in reserve to answer whatever SQS does.
AWS_MAX_ATTEMPTS = 2
AWS_CONNECT_TIMEOUT = 2
AWS_READ_TIMEOUT = 4
AWS_CALL_WORST_CASE_SECONDS = AWS_MAX_ATTEMPTS * (AWS_CONNECT_TIMEOUT + AWS_READ_TIMEOUT) + 1


@cache
def client(service: str) -> Any:
    """A boto3 client for ``service`` in the configured region and endpoint.

    Uses botocore's standard retry mode (exponential backoff with jitter and a
    bounded number of attempts) for every service, with short timeouts.
    """
    import boto3
    from botocore.config import Config

    settings = get_settings()
    return boto3.session.Session().client(
        service,
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": AWS_MAX_ATTEMPTS},
            connect_timeout=AWS_CONNECT_TIMEOUT,
            read_timeout=AWS_READ_TIMEOUT,
        ),
    )


# One Converse call, bounded: botocore makes at most BEDROCK_MAX_ATTEMPTS
# attempts in all (``total_max_attempts``: botocore's ``max_attempts`` counts
# retries only), with exponential backoff and jitter (at most 20 s between
# attempts), each waiting at most BEDROCK_CONNECT_TIMEOUT + BEDROCK_READ_TIMEOUT.
# The worker starts no call with less than LLM_CALL_BUDGET_SECONDS left, which
# must cover the worst case and then the save, or the dead-letter send that
# keeps the content (SAVE_RESERVE_SECONDS): an invocation cut off after a
# paid call would lose its answer.
BEDROCK_MAX_ATTEMPTS = 2
BEDROCK_CONNECT_TIMEOUT = 5
BEDROCK_READ_TIMEOUT = 60
BEDROCK_WORST_CASE_SECONDS = BEDROCK_MAX_ATTEMPTS * (
    BEDROCK_CONNECT_TIMEOUT + BEDROCK_READ_TIMEOUT
) + 20 * (BEDROCK_MAX_ATTEMPTS - 1)
# A save (its connection's 30 s socket timeout at worst) or a DLQ send.
SAVE_RESERVE_SECONDS = 30


@lru_cache(maxsize=1)
def bedrock_runtime_client() -> Any:
    """The Bedrock Runtime client of this process, shared by its concurrent LLM calls.

    Adaptive retry mode: on throttling, botocore's client-side rate limiter
    slows every call of this client (not only the one throttled), so
    ``GENERATE_PARALLELISM`` calls at once back off together. Its connection
    pool holds one connection per concurrent call. The read timeout bounds one
    model call, so the worker can tell whether the invocation has time left.
    """
    import boto3
    from botocore.config import Config

    settings = get_settings()
    return boto3.session.Session().client(
        "bedrock-runtime",
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url_bedrock_runtime or settings.aws_endpoint_url,
        config=Config(
            retries={"mode": "adaptive", "total_max_attempts": BEDROCK_MAX_ATTEMPTS},
            connect_timeout=BEDROCK_CONNECT_TIMEOUT,
            read_timeout=BEDROCK_READ_TIMEOUT,
            max_pool_connections=max(10, settings.generate_parallelism),
        ),
    )
