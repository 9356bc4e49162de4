"""API fuzzing: schemathesis generates requests from the OpenAPI document and
sends them to ``content-retry serve`` over real HTTP. No 5xx; every response
has a documented status, content type and schema."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from moto import mock_aws
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine

from content_retry.api import openapi_document
from content_retry_local.http_api import make_server
from content_retry_local.seed import seed_scenario
from content_retry_local.template import create_queues
from tests.support import reset_process_caches

schema = schemathesis.openapi.from_dict(json.loads(openapi_document()))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def served_api(engine: Engine, database_url: str) -> Iterator[str]:
    """serve --dev-identity over the test database and moto, the seed's roadmap in it."""
    with pytest.MonkeyPatch.context() as patch, mock_aws():
        for name, value in {
            "DATABASE_URL": database_url,
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }.items():
            patch.setenv(name, value)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        queue_url, dlq_url = create_queues(boto3.client("sqs", region_name="us-east-1"))
        patch.setenv("RETRY_QUEUE_URL", queue_url)
        patch.setenv("RETRY_DLQ_URL", dlq_url)
        reset_process_caches()
        with engine.begin() as connection:
            seed_scenario(connection, other_failures=True)
        server = make_server(0, dev_identity=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            reset_process_caches()
            with engine.begin() as connection:
                connection.exec_driver_sql("TRUNCATE roadmap_metadata CASCADE")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_every_response_matches_the_schema(
    case: schemathesis.Case[Any], served_api: str
) -> None:
    case.call_and_validate(base_url=served_api, headers={"X-Dev-User": "u-42"}, checks=CHECKS)
