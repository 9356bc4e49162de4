"""Bad input gets its contract answer, and nothing is written."""

from __future__ import annotations

import base64
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


def base64_of(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("body", "is_base64", "named"),
    [
        ("[" * 1_000 + "]" * 1_000, False, "more than 32 levels deep"),
        ('{"content_types": [' + "[" * 40 + "]" * 40 + "]}", False, "more than 32 levels deep"),
        ('{"preferences": {"level": ' + "9" * 4_301 + "}}", False, "longer than 100 digits"),
        ('{"n": -' + "1" * 101 + "}", False, "longer than 100 digits"),
        ("not//base64!!", True, "not valid base64"),
        (base64_of(b'{"content_types": ["tutorial"]}\xff\xfe'), True, "not UTF-8"),
        ('{"content_types": ["tutorial\ud800"]}', False, "unpaired surrogate"),
        ('{"content_types": ["tutorial\\ud800"]}', False, "unpaired surrogate"),
        ('{"\\udfff": 1}', False, "unpaired surrogate"),
        ("NaN", False, "NaN is not a JSON number"),
        ('{"preferences": {"level": -Infinity}}', False, "-Infinity is not a JSON number"),
    ],
    ids=[
        "1000-nested-arrays",
        "nested-in-a-field",
        "4301-digit-integer",
        "101-digit-negative",
        "invalid-base64",
        "non-utf8-bytes",
        "lone-surrogate-in-text",
        "lone-surrogate-escape",
        "surrogate-escape-in-a-key",
        "nan",
        "negative-infinity",
    ],
)
def test_hostile_bodies_get_a_400_naming_the_problem_and_write_nothing(
    connection: Connection,
    db: Engine,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
    body: str,
    is_base64: bool,
    named: str,
) -> None:
    # GIVEN the seed's roadmap, and a request its owner's client mangled (or an attacker forged)
    scenario = seed_scenario(connection)
    connection.commit()
    before = writes(db)
    event = retry_event(load_event, scenario.roadmap_id, body)
    event["isBase64Encoded"] = is_base64

    # WHEN it reaches the detect function
    response = detect_handler(event, lambda_context)

    # THEN the answer is a 400 that says what is wrong, in valid JSON; nothing was written
    assert response["statusCode"] == 400, response["body"]
    assert named in json.loads(response["body"])["message"]
    assert writes(db) == before


def test_a_valid_base64_body_is_read_as_the_json_it_encodes(
    connection: Connection,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
) -> None:
    scenario = seed_scenario(connection)
    connection.commit()
    event = retry_event(
        load_event,
        scenario.roadmap_id,
        base64_of(json.dumps({"content_types": ["tutorial"]}).encode()),
    )
    event["isBase64Encoded"] = True

    response = detect_handler(event, lambda_context)

    assert response["statusCode"] == 202, response["body"]
    assert json.loads(response["body"])["items"] == {"tutorial": 21}


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


def ledger_rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT task_id, concept_id, content_type, status, attempts, claimed_at, "
                    "last_error FROM retry_items ORDER BY 1, 2, 3"
                )
            )
        ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("roadmap_id", "someone-elses-roadmap"),
        ("user_id", "u-7"),
        ("task_id", "6f1c7f0e-0000-4000-8000-000000000000"),
    ],
)
def test_a_message_that_does_not_match_its_ledger_is_not_planned_and_changes_nothing(
    connection: Connection,
    db: Engine,
    queues: Queues,
    load_event: Any,
    lambda_context: FakeLambdaContext,
    field: str,
    value: str,
) -> None:
    # GIVEN a planned message, and another user's roadmap with a tutorial missing too
    seed_scenario(connection)
    concept = ConceptSeed("c11", "Theirs", "Their concept.", {"content_status": None})
    insert_roadmap(connection, "someone-elses-roadmap", "u-7", single_module_framework([concept]))
    connection.commit()
    assert detect_handler(load_event("api-retry.json"), lambda_context)["statusCode"] == 202
    body = json.loads(next(m["Body"] for m in queues.receive_all() if '"c11"' in m["Body"]))
    before_ledger, before = ledger_rows(db), writes(db)

    # WHEN the message arrives with its roadmap, owner or task changed
    body[field] = value
    event = load_event("sqs-retry-batch.json")
    event["Records"] = event["Records"][:1]
    event["Records"][0]["body"] = json.dumps(body)
    response = generate_handler(event, lambda_context)

    # THEN it is dead-lettered as not planned, and no ledger row moved: no attempt
    # counted, no claim renewed, nothing written anywhere
    assert response == {"batchItemFailures": []}
    dead = queues.receive_all(queues.dlq_url)
    assert [m["MessageAttributes"]["reason"]["StringValue"] for m in dead] == ["not_planned"]
    assert ledger_rows(db) == before_ledger
    assert writes(db) == before
