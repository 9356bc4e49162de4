"""The generate function at the LLM's speed: a batch's calls at once, and every paid token counted.

Real PostgreSQL and moto's SQS; the LLM is the counting fake where the test
sets what it does, and the local Bedrock (the real botocore client: request
serialization, adaptive retries, tool-use parsing) where the wire matters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from content_retry.generators import MalformedOutputError, TransientGenerationError, Usage
from content_retry.generators.bedrock import BedrockGenerator
from content_retry.retries import DetectDependencies
from content_retry.tasks import read_task
from content_retry_local.bedrock_server import LocalBedrock
from content_retry_local.seed import seed_scenario
from content_retry_local.sessions import EngineSessions
from functions.detect.app import lambda_handler as detect_handler
from functions.generate.app import lambda_handler as generate_handler
from tests.conftest import FakeLambdaContext, Queues
from tests.support import (
    CountingGenerator,
    detect_deps,
    load_event,
    redriven_event,
    sqs_event,
    worker_deps,
)

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"


@pytest.fixture
def detect(queues: Queues, db: Engine) -> DetectDependencies:
    return detect_deps(db, queues.sqs)


def plan_everything(
    connection: Connection, queues: Queues, detect: DetectDependencies, context: FakeLambdaContext
) -> tuple[str, list[str]]:
    """The seed with its other failures, every content type planned through the API:
    26 items in 23 messages. Returns the task id and the bodies, in queue order."""
    seed_scenario(connection, other_failures=True)
    connection.commit()
    event = load_event("api-retry.json")
    event["body"] = json.dumps({"content_types": ["tutorial", "resources", "quiz"]})
    response = detect_handler(event, context, deps=detect)
    assert response["statusCode"] == 202, response
    bodies = [message["Body"] for message in queues.receive_all()]
    return json.loads(response["body"])["task_id"], bodies


def two_item_body(bodies: list[str]) -> str:
    return next(body for body in bodies if len(json.loads(body)["items"]) == 2)


def ledger_costs(db: Engine) -> dict[tuple[str, str], tuple[int, int, int]]:
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT concept_id, content_type, llm_calls, input_tokens, output_tokens "
                "FROM retry_items"
            )
        ).all()
    return {(row[0], row[1]): (row[2], row[3], row[4]) for row in rows}


@pytest.mark.parametrize("parallelism", [1, 3, 8])
def test_a_batchs_calls_run_at_once_up_to_the_parallelism(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
    parallelism: int,
) -> None:
    # GIVEN a batch of 5 messages (6 items), and a model that takes a moment to answer
    _, bodies = plan_everything(connection, queues, detect, lambda_context)
    batch = [two_item_body(bodies), *[b for b in bodies if len(json.loads(b)["items"]) == 1][:4]]
    generator = CountingGenerator(hold=0.2)
    worker = worker_deps(db, queues.sqs, generator)
    worker.settings = worker.settings.model_copy(update={"generate_parallelism": parallelism})

    # WHEN the generate function takes the batch
    response = generate_handler(sqs_event(batch), lambda_context, deps=worker)

    # THEN every item was saved, with as many calls at once as allowed and no more
    assert response == {"batchItemFailures": []}
    assert len(generator.calls) == 6
    assert generator.max_in_flight == min(parallelism, 6)
    if parallelism == 1:  # one at a time keeps the batch's order
        expected = [
            (json.loads(body)["concept"]["concept_id"], item["content_type"])
            for body in batch
            for item in json.loads(body)["items"]
        ]
        assert generator.calls == expected


def test_a_transient_item_sends_its_record_back_and_its_saved_sibling_is_not_paid_again(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
) -> None:
    # GIVEN a message of two items, whose tutorial the model throttles once
    _, bodies = plan_everything(connection, queues, detect, lambda_context)
    body = two_item_body(bodies)
    concept_id = json.loads(body)["concept"]["concept_id"]
    generator = CountingGenerator()
    generator.failures[(concept_id, "tutorial")] = TransientGenerationError("ThrottlingException")
    worker = worker_deps(db, queues.sqs, generator)

    # WHEN it is delivered, then redelivered once the model is back
    first = generate_handler(sqs_event([body]), lambda_context, deps=worker)
    generator.failures.clear()
    second = generate_handler(sqs_event([body]), lambda_context, deps=worker)

    # THEN the record came back once; the quiz was saved the first time and
    # not generated again; the tutorial was saved the second time
    assert first == {"batchItemFailures": [{"itemIdentifier": "message-0"}]}
    assert second == {"batchItemFailures": []}
    assert generator.calls.count((concept_id, "quiz")) == 1
    assert generator.calls.count((concept_id, "tutorial")) == 2
    costs = ledger_costs(db)
    assert costs[(concept_id, "quiz")][0] == 1
    assert costs[(concept_id, "tutorial")][0] == 2


def test_every_call_is_counted_in_the_ledger_and_the_task_view_even_malformed_ones(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
) -> None:
    # GIVEN a model whose answers cost 100 + 40 tokens, and one answer that is malformed
    task_id, bodies = plan_everything(connection, queues, detect, lambda_context)
    generator = CountingGenerator(usage=Usage(input_tokens=100, output_tokens=40))
    bad_body = next(b for b in bodies if json.loads(b)["items"][0]["content_type"] == "tutorial")
    bad = json.loads(bad_body)["concept"]["concept_id"], "tutorial"
    generator.failures[bad] = MalformedOutputError(
        "not a tutorial", usage=Usage(input_tokens=100, output_tokens=7)
    )
    worker = worker_deps(db, queues.sqs, generator)

    # WHEN every message is processed, and the malformed one delivered again
    for start in range(0, len(bodies), 5):
        generate_handler(sqs_event(bodies[start : start + 5]), lambda_context, deps=worker)
    generator.failures.clear()
    generate_handler(sqs_event([bad_body]), lambda_context, deps=worker)

    # THEN each item holds its calls and tokens, the malformed attempt included
    costs = ledger_costs(db)
    assert costs[bad] == (2, 200, 47)
    assert all(cost == (1, 100, 40) for item, cost in costs.items() if item != bad)
    with db.connect() as check:
        found = read_task(check, task_id)
    assert found is not None
    usage = found[0].usage
    assert (usage.llm_calls, usage.input_tokens, usage.output_tokens) == (27, 2700, 1047)


def test_a_redriven_message_with_its_content_costs_no_call(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
) -> None:
    # GIVEN a message whose save lost its connection: dead-lettered with its content
    task_id, bodies = plan_everything(connection, queues, detect, lambda_context)
    body = two_item_body(bodies)
    generator = CountingGenerator(usage=Usage(input_tokens=100, output_tokens=40))
    worker = worker_deps(db, queues.sqs, generator)
    with EngineSessions(worker.engine) as sessions:
        generator.before_call = lambda *_: sessions.terminate()
        generate_handler(sqs_event([body]), lambda_context, deps=worker)
    generator.before_call = None
    dead = queues.receive_all(queues.dlq_url)
    assert json.loads(dead[0]["Body"])["generated"] is not None
    calls = len(generator.calls)

    # WHEN it is re-driven
    response = generate_handler(redriven_event(dead), lambda_context, deps=worker)

    # THEN its items are saved without a call: what they cost is what the first
    # delivery paid (recorded from the dead-letter copy, whose invocation could not
    # note it), once
    assert response == {"batchItemFailures": []}
    assert len(generator.calls) == calls == 2
    concept_id = json.loads(body)["concept"]["concept_id"]
    costs = ledger_costs(db)
    assert costs[(concept_id, "tutorial")] == costs[(concept_id, "quiz")] == (1, 100, 40)
    with db.connect() as check:
        found = read_task(check, task_id)
    assert found is not None
    assert found[0].usage.llm_calls == 2


@pytest.fixture
def local_bedrock() -> Iterator[LocalBedrock]:
    with LocalBedrock(seed=7) as bedrock:
        yield bedrock


def emitted_metrics(captured: str) -> list[dict[str, Any]]:
    blobs = []
    for line in captured.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            blobs.append(json.loads(line))
    return blobs


def test_the_real_client_path_accounts_tokens_and_throttles_per_content_type(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
    local_bedrock: LocalBedrock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN Bedrock (local, over HTTP) that throttles a quarter of the requests
    task_id, bodies = plan_everything(connection, queues, detect, lambda_context)
    local_bedrock.throttle_rate = 0.25
    client = local_bedrock.client(retry_mode="adaptive", max_attempts=3)
    worker = worker_deps(db, queues.sqs, BedrockGenerator(client, MODEL))
    capsys.readouterr()

    # WHEN the messages are processed until none comes back
    pending = bodies
    for _ in range(10):
        failed = []
        for start in range(0, len(pending), 5):
            batch = pending[start : start + 5]
            response = generate_handler(sqs_event(batch), lambda_context, deps=worker)
            failed += [
                batch[int(f["itemIdentifier"].split("-")[1])] for f in response["batchItemFailures"]
            ]
        pending = failed
        if not pending:
            break

    # THEN every item was saved through tool use, and what Bedrock reported it
    # charged is what the ledger and the metrics hold
    stats = local_bedrock.stats()
    assert pending == []
    assert stats.throttled > 0
    with db.connect() as check:
        found = read_task(check, task_id)
    assert found is not None
    task = found[0]
    assert task.status == "completed"
    assert task.usage.llm_calls == stats.answered
    assert task.usage.input_tokens == stats.input_tokens
    assert task.usage.output_tokens == stats.output_tokens
    metrics = emitted_metrics(capsys.readouterr().out)
    by_type: dict[str, dict[str, float]] = {}
    for blob in metrics:
        if "ContentType" in blob:
            totals = by_type.setdefault(blob["ContentType"], {})
            for name in ("LLMCalls", "LLMThrottles", "InputTokens", "OutputTokens"):
                totals[name] = totals.get(name, 0) + sum(
                    blob[name] if isinstance(blob[name], list) else [blob[name]]
                )
    assert set(by_type) == {"tutorial", "resources", "quiz"}
    assert sum(t["InputTokens"] for t in by_type.values()) == stats.input_tokens
    assert sum(t["OutputTokens"] for t in by_type.values()) == stats.output_tokens
    assert sum(t["LLMThrottles"] for t in by_type.values()) == stats.throttled
    assert sum(t["LLMCalls"] for t in by_type.values()) >= stats.answered


@pytest.mark.parametrize(
    "bad_markdown",
    ['"before\\u0000after"', '"lone \\ud800 surrogate"'],
    ids=["nul", "unpaired-surrogate"],
)
def test_content_in_a_message_the_database_cannot_store_fails_its_item_alone_permanently(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
    bad_markdown: str,
) -> None:
    # GIVEN a re-driven message of two items whose generated tutorial holds what
    # PostgreSQL cannot store, beside a good quiz
    _, bodies = plan_everything(connection, queues, detect, lambda_context)
    message = json.loads(two_item_body(bodies))
    concept_id = message["concept"]["concept_id"]
    quiz = {
        "questions": [
            {
                "question": "Q?",
                "options": ["a", "b", "c", "d"],
                "answer_index": 1,
                "explanation": "e",
            }
        ]
    }
    tutorial = '{"title": "T", "summary": "S", "content_markdown": ' + bad_markdown + "}"
    body = json.dumps({**message, "generated": {"quiz": quiz, "tutorial": "TUTORIAL"}})
    body = body.replace('"TUTORIAL"', tutorial)
    generator = CountingGenerator()
    worker = worker_deps(db, queues.sqs, generator)

    # WHEN it is delivered, twice
    first = generate_handler(sqs_event([body]), lambda_context, deps=worker)
    second = generate_handler(sqs_event([body]), lambda_context, deps=worker)

    # THEN the quiz is saved, the tutorial fails permanently with its reason, without
    # a call to the LLM, and nothing comes back or goes to the dead-letter queue
    assert first == second == {"batchItemFailures": []}
    assert generator.calls == []
    assert queues.depth(queues.dlq_url) == 0
    with db.connect() as check:
        quiz_rows = check.execute(
            text(
                "SELECT count(*) FROM quizzes WHERE concept_id = :c AND is_latest AND content_status = 'completed'"
            ),
            {"c": concept_id},
        ).scalar_one()
        tutorial_item = check.execute(
            text(
                "SELECT status, last_error FROM retry_items WHERE concept_id = :c "
                "AND content_type = 'tutorial'"
            ),
            {"c": concept_id},
        ).one()
    assert quiz_rows == 1
    assert tutorial_item.status == "failed"
    assert "cannot be used" in tutorial_item.last_error


def test_content_the_database_refuses_anyway_fails_only_its_item(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
) -> None:
    # GIVEN generated content that slipped past the models (built without them),
    # which PostgreSQL refuses, beside good content for the message's other item
    from content_retry.content_store import save_message
    from content_retry.content_types import ContentType
    from content_retry.database import BatchConnection
    from content_retry.generated import QuizContent, TutorialContent
    from content_retry.messages import RetryMessage

    _, bodies = plan_everything(connection, queues, detect, lambda_context)
    message = RetryMessage.model_validate_json(two_item_body(bodies))
    bad = TutorialContent.model_construct(title="T", summary="S", content_markdown="a\x00b")
    good = QuizContent.model_validate(
        {
            "questions": [
                {
                    "question": "Q?",
                    "options": ["a", "b", "c", "d"],
                    "answer_index": 0,
                    "explanation": "e",
                }
            ]
        }
    )

    # WHEN the message is saved
    with BatchConnection(db) as database:
        saved = save_message(
            database, message, {ContentType.TUTORIAL: bad, ContentType.QUIZ: good}, {}, {}
        )

    # THEN the quiz is saved, the tutorial recorded failed with the database's reason
    assert saved.versions == {ContentType.QUIZ: 2}
    assert "refused" in saved.refused[ContentType.TUTORIAL]
    with db.connect() as check:
        statuses: dict[str, str] = dict(
            check.execute(
                text("SELECT content_type, status FROM retry_items WHERE concept_id = :c"),
                {"c": message.concept.concept_id},
            ).all()
        )
    assert statuses == {"tutorial": "failed", "quiz": "succeeded"}
