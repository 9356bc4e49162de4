"""AWS clients from one cached factory, created on first use, never at import.

Creating clients lazily keeps cold starts short, keeps SnapStart snapshots free
of credentials, and lets moto (in-process or its server) stand in for AWS:
``AWS_ENDPOINT_URL`` points every client at it.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Any

from content_retry.settings import get_settings


@cache
def client(service: str) -> Any:
    """A boto3 client for ``service`` in the configured region and endpoint.

    Uses botocore's standard retry mode (exponential backoff with jitter and a
    bounded number of attempts) for every service.
    """
    import boto3
    from botocore.config import Config

    settings = get_settings()
    return boto3.session.Session().client(
        service,
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=Config(retries={"mode": "standard", "max_attempts": 3}),
    )


# Attempts botocore makes per Converse call (the first and two retries, with
# exponential backoff and jitter) before the error reaches the worker.
BEDROCK_MAX_ATTEMPTS = 3


@lru_cache(maxsize=1)
def bedrock_runtime_client() -> Any:
    """The Bedrock Runtime client: standard retries, bounded attempts and timeouts.

    The read timeout bounds one model call, so the worker can tell whether the
    invocation has time left for another one.
    """
    import boto3
    from botocore.config import Config

    settings = get_settings()
    return boto3.session.Session().client(
        "bedrock-runtime",
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=Config(
            retries={"mode": "standard", "max_attempts": BEDROCK_MAX_ATTEMPTS},
            connect_timeout=5,
            read_timeout=60,
        ),
    )
