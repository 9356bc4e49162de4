"""AWS clients from one cached factory, created on first use, never at import.

Creating clients lazily keeps cold starts short, keeps SnapStart snapshots free
of credentials, and lets moto (in-process or its server) stand in for AWS:
``AWS_ENDPOINT_URL`` points every client at it.
"""

from __future__ import annotations

from functools import cache
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
