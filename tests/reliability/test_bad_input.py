"""Bad input gets its contract answer, and nothing is written."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import Connection, Engine, text

from content_retry_local.seed import (
    ConceptSeed,
    insert_roadmap,
    seed_scenario,
    single_module_framework,
)
from functions.detect.app import lambda_handler as detect_handler
from functions.generate.app import lambda_handler as generate_handler
from tests.conftest import FakeLambdaContext, Queues

HOSTILE_IDS = [
    "x'; DROP TABLE roadmap_metadata; --",
    'quoted "roadmap"',
    "semi;colon",
    "ロードマップ-1",
    "emoji-🚀-roadmap",
    "../../etc/passwd",
    "%27%3B",
]


def retry_event(
    load_event: Callable[[str], dict[str, Any]], roadmap_id: str, body: str | None = None
) -> dict[str, Any]:
    event = copy.deepcopy(load_event("api-retry.json"))
    event["path"] = f"/roadmaps/{roadmap_id}/retry"
    event["pathParameters"] = {"roadmap_id": roadmap_id}
    if body is not None:
        event["body"] = body
    return event


def writes(engine: Engine) -> tuple[int, ...]:
    with engine.connect() as connection:
        return tuple(
            connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("roadmap_metadata", "tutorials", "quizzes", "retry_tasks", "retry_items")
        )


@pytest.mark.parametrize("roadmap_id", HOSTILE_IDS, ids=lambda value: quote(value[:20]))
def test_hostile_roadmap_ids_are_unknown_roadmaps_and_write_nothing(
    connection: Connection,
    db: Engine,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
    roadmap_id: str,
) -> None:
    seed_scenario(connection)
    connection.commit()
    before = writes(db)

    response = detect_handler(retry_event(load_event, roadmap_id), lambda_context)

    assert response["statusCode"] == 404
    assert json.loads(response["body"])["success"] is False
    assert writes(db) == before
    assert queues.depth() == 0


@pytest.mark.parametrize("length", [600, 1_025, 5_000])
def test_over_long_ids_are_unknown(
    db: Engine, queues: Queues, load_event: Any, lambda_context: FakeLambdaContext, length: int
) -> None:
    roadmap = detect_handler(retry_event(load_event, "a" * length), lambda_context)
    task_event = load_event("api-task-status.json")
    task_event["pathParameters"] = {"task_id": "b" * length}
    task_event["path"] = f"/retry-tasks/{'b' * length}"
    task = detect_handler(task_event, lambda_context)

    assert (roadmap["statusCode"], task["statusCode"]) == (404, 404)
    assert writes(db) == (0, 0, 0, 0, 0)


@pytest.mark.parametrize("roadmap_id", ["semi;colon", "ロードマップ-1", "x'; DROP TABLE t; --"])
def test_unusual_but_real_roadmap_ids_are_data_not_sql(
    connection: Connection,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
    roadmap_id: str,
) -> None:
    insert_roadmap(
        connection, roadmap_id, "u-42", single_module_framework([ConceptSeed("c1", "A", "a")])
    )
    connection.commit()

    response = detect_handler(retry_event(load_event, roadmap_id), lambda_context)

    assert response["statusCode"] == 202
    message = json.loads(queues.receive_all()[0]["Body"])
    assert message["roadmap_id"] == roadmap_id


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("{", 400),
        ("\x00\x01", 400),
        (json.dumps({"content_types": "tutorial"}), 422),
        (json.dumps({"content_types": ["tutorial"] * 11}), 422),
        (json.dumps({"content_types": [None]}), 422),
        (json.dumps({"preferences": {"language": "english!!"}}), 422),
        (json.dumps({"content_types": ["tutorial"], "user_id": "u-7"}), 422),
        (json.dumps({"x": "y" * 20_000}), 413),
    ],
)
def test_bad_bodies_get_their_answer_and_write_nothing(
    connection: Connection,
    db: Engine,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
    body: str,
    status: int,
) -> None:
    scenario = seed_scenario(connection)
    connection.commit()
    before = writes(db)

    response = detect_handler(retry_event(load_event, scenario.roadmap_id, body), lambda_context)

    assert response["statusCode"] == status, response["body"]
    assert writes(db) == before


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("multipart/form-data", "content_types=tutorial", 400),
        ("application/x-www-form-urlencoded", "content_types=tutorial", 400),
        ("text/plain; charset=utf-8", "not json", 400),
        # a browser's fetch sends a JSON string as text/plain: it is still JSON
        ("text/plain;charset=UTF-8", json.dumps({"content_types": ["tutorial"]}), 202),
    ],
)
def test_the_body_is_read_as_json_whatever_its_declared_type(
    connection: Connection,
    db: Engine,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
    content_type: str,
    body: str,
    status: int,
) -> None:
    scenario = seed_scenario(connection)
    connection.commit()
    event = retry_event(load_event, scenario.roadmap_id, body)
    event["headers"] = {"content-type": content_type}
    before = writes(db)

    response = detect_handler(event, lambda_context)

    assert response["statusCode"] == status, response["body"]
    if status == 400:
        assert "not valid JSON" in json.loads(response["body"])["message"]
        assert writes(db) == before


def test_identity_cannot_come_from_the_body_or_headers(
    connection: Connection,
    db: Engine,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
) -> None:
    scenario = seed_scenario(connection)
    connection.commit()
    event = retry_event(load_event, scenario.roadmap_id)
    event["requestContext"].pop("authorizer")
    event["headers"]["X-User-Id"] = "u-42"
    event["headers"]["Authorization"] = "Bearer u-42"

    response = detect_handler(event, lambda_context)

    assert response["statusCode"] == 401
    assert writes(db)[3] == 0


def test_a_message_from_a_future_version_is_dead_lettered_untouched(
    connection: Connection,
    db: Engine,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
) -> None:
    seed_scenario(connection)
    connection.commit()
    assert detect_handler(load_event("api-retry.json"), lambda_context)["statusCode"] == 202
    body = json.loads(queues.receive_all()[0]["Body"])
    body["version"] = 2
    body["priority"] = "high"
    event = load_event("sqs-retry-batch.json")
    event["Records"] = event["Records"][:1]
    event["Records"][0]["body"] = json.dumps(body)
    before = writes(db)

    response = generate_handler(event, lambda_context)

    assert response == {"batchItemFailures": []}
    dead = queues.receive_all(queues.dlq_url)
    assert [m["Body"] for m in dead] == [json.dumps(body)]
    assert "version" in dead[0]["MessageAttributes"]["error"]["StringValue"]
    assert writes(db) == before
