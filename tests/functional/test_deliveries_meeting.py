"""When two deliveries of the same work meet (DESIGN §12): paid once, saved once.

SQS delivers at least once, a re-drive can come any day of the DLQ's 14, and
the owner and the sweep can ask again at any time. Real PostgreSQL, moto's
SQS, the handlers; races are staged inside a delivery's LLM call.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Engine, text

from content_retry.content_types import ContentType
from content_retry.generated import CONTENT_MODELS, GeneratedContent
from content_retry.messages import RetryMessage
from content_retry.retries import DetectDependencies
from content_retry.worker import WorkerDependencies
from content_retry_local.seed import SEED_ROADMAP_ID, seed_scenario
from content_retry_local.sessions import EngineSessions
from functions.detect.app import lambda_handler as detect_handler
from functions.generate.app import lambda_handler as generate_handler
from tests.conftest import FakeLambdaContext, Queues
from tests.support import (
    CountingGenerator,
    detect_deps,
    holds_expire,
    load_event,
    redriven_event,
    sqs_event,
    worker_deps,
)


def plan(
    connection: Connection, detect: DetectDependencies, context: FakeLambdaContext
) -> dict[str, Any]:
    """Seed the incident and ask detect to retry its tutorials through the API."""
    seed_scenario(connection)
    connection.commit()
    return retry(detect, context)


def retry(detect: DetectDependencies, context: FakeLambdaContext) -> dict[str, Any]:
    response = detect_handler(load_event("api-retry.json"), context, deps=detect)
    assert response["statusCode"] in (200, 202), response
    body: dict[str, Any] = json.loads(response["body"])
    return body


def versions(db: Engine, concept_id: str) -> list[tuple[int, bool]]:
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT content_version, is_latest FROM tutorials "
                "WHERE roadmap_id = :r AND concept_id = :c ORDER BY content_version"
            ),
            {"r": SEED_ROADMAP_ID, "c": concept_id},
        ).all()
    return [(row.content_version, row.is_latest) for row in rows]


def ledger_rows(db: Engine, concept_id: str) -> list[tuple[str, int]]:
    """The concept's tutorial ledger rows, oldest task first: (status, llm_calls)."""
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT i.status, i.llm_calls FROM retry_items AS i "
                "JOIN retry_tasks AS t USING (task_id) "
                "WHERE i.concept_id = :c AND i.content_type = 'tutorial' ORDER BY t.created_at"
            ),
            {"c": concept_id},
        ).all()
    return [(row.status, row.llm_calls) for row in rows]


def expire_claims(db: Engine) -> None:
    """Time passes beyond every claim of a message sent or never sent (as when
    the queue's retention dropped it): the judge may plan the items again."""
    with db.begin() as connection:
        connection.execute(
            text(
                "UPDATE retry_items SET claimed_at = claimed_at - interval '2 hours', "
                "sent_at = sent_at - interval '5 days', delivery_until = NULL"
            )
        )


def dead_letter_with_content(
    queues: Queues, db: Engine, worker: WorkerDependencies, generator: CountingGenerator, body: str
) -> list[dict[str, Any]]:
    """One delivery whose save loses its connection: the content goes to the DLQ."""
    with EngineSessions(worker.engine) as sessions:
        generator.before_call = lambda *_: sessions.terminate()
        response = generate_handler(sqs_event([body]), FakeLambdaContext(), deps=worker)
        generator.before_call = None
    assert response["batchItemFailures"] == []
    dead = queues.receive_all(queues.dlq_url)
    assert len(dead) == 1 and RetryMessage.model_validate_json(dead[0]["Body"]).generated
    holds_expire(db)  # that invocation has ended
    return dead


def test_content_waiting_in_the_dlq_keeps_its_claim_is_named_and_comes_back_by_itself(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
) -> None:
    # GIVEN a tutorial whose generated content was dead-lettered, noted as
    # waiting for its re-drive (its claim held for the DLQ's retention)
    generator = CountingGenerator()
    detect = detect_deps(db, queues.sqs)
    worker = worker_deps(db, queues.sqs, generator)
    body = sqs_body_of(plan(connection, detect, lambda_context), queues)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    dead = dead_letter_with_content(queues, db, worker, generator, body)
    with db.begin() as connection_:
        connection_.execute(
            text(
                "UPDATE retry_items SET status = 'dead_lettered', "
                "content_in_dlq_until = now() + interval '14 days' WHERE concept_id = :c"
            ),
            {"c": concept_id},
        )
    for message in dead:
        queues.sqs.send_message(
            QueueUrl=queues.dlq_url,
            MessageBody=message["Body"],
            MessageAttributes=message.get("MessageAttributes", {}),
        )
    expire_claims(db)  # every other claim has passed; this one holds by its content
    with db.begin() as connection_:
        connection_.execute(
            text("UPDATE retry_items SET status = 'succeeded' WHERE concept_id <> :c"),
            {"c": concept_id},
        )
    calls = len(generator.calls)

    # WHEN the owner asks again
    answer = retry(detect, lambda_context)

    # THEN it is not planned again, and the answer names it as waiting
    assert answer["waiting_for_redrive"] == 1
    assert concept_id not in {
        json.loads(m["Body"])["concept"]["concept_id"] for m in queues.receive_all()
    }
    task = json.loads(
        detect_handler(task_event(json.loads(body)["task_id"]), lambda_context, deps=detect)["body"]
    )
    item = next(i for i in task["items"] if i["concept_id"] == concept_id)
    assert item["waiting_for_redrive"] is True
    assert task["counts"]["waiting_for_redrive"] == 1
    assert task["status"] == "running"

    # WHEN the schedule's sweep runs (the database answers)
    detect_handler({"action": "sweep"}, lambda_context, deps=detect)

    # THEN the copy is back on the retry queue by itself, and its delivery saves
    # it without the LLM: one version, one paid call in the ledger
    moved = queues.receive_all()
    assert [json.loads(m["Body"])["concept"]["concept_id"] for m in moved] == [concept_id]
    response = generate_handler(redriven_event(moved), lambda_context, deps=worker)
    assert response["batchItemFailures"] == []
    assert len(generator.calls) == calls
    assert versions(db, concept_id) == [(1, True)]
    assert ledger_rows(db, concept_id)[0] == ("succeeded", 1)


def test_a_redrive_racing_a_new_task_saves_one_version(
    connection: Connection, queues: Queues, db: Engine, lambda_context: FakeLambdaContext
) -> None:
    # GIVEN task A's tutorial dead-lettered with its content, and its claim
    # lost (say the re-drive waited past the queue's retention): task B plans it
    generator = CountingGenerator()
    detect = detect_deps(db, queues.sqs)
    worker = worker_deps(db, queues.sqs, generator)
    body = sqs_body_of(plan(connection, detect, lambda_context), queues)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    dead = dead_letter_with_content(queues, db, worker, generator, body)
    expire_claims(db)
    retry(detect, lambda_context)
    second = next(
        m["Body"]
        for m in queues.receive_all()
        if json.loads(m["Body"])["concept"]["concept_id"] == concept_id
    )

    # WHEN A's re-drive is saved while B's LLM call is in flight
    other = worker_deps(db, queues.sqs, CountingGenerator())

    def redrive_meanwhile(*_: str) -> None:
        generator.before_call = None
        answer = generate_handler(redriven_event(dead), FakeLambdaContext(), deps=other)
        assert answer["batchItemFailures"] == []

    generator.before_call = redrive_meanwhile
    response = generate_handler(sqs_event([second]), lambda_context, deps=worker)

    # THEN one version of the concept: A's; B's save found it saved since B
    # began, saved nothing, and was acknowledged; both items ended succeeded
    assert response["batchItemFailures"] == []
    assert versions(db, concept_id) == [(1, True)]
    assert [status for status, _ in ledger_rows(db, concept_id)] == ["succeeded", "succeeded"]


def test_two_deliveries_of_one_message_generate_it_once(
    connection: Connection, queues: Queues, db: Engine, lambda_context: FakeLambdaContext
) -> None:
    # GIVEN one message delivered twice at once (SQS delivers at least once)
    generator = CountingGenerator()
    detect = detect_deps(db, queues.sqs)
    worker = worker_deps(db, queues.sqs, generator)
    body = sqs_body_of(plan(connection, detect, lambda_context), queues)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    other_generator = CountingGenerator()
    other = worker_deps(db, queues.sqs, other_generator)
    duplicate = sqs_event([body])
    duplicate["Records"][0]["messageId"] = "the-same-message-again"
    answers: list[dict[str, Any]] = []

    def second_delivery(*_: str) -> None:
        generator.before_call = None
        answers.append(generate_handler(duplicate, FakeLambdaContext(), deps=other))

    # WHEN the second delivery starts while the first one's LLM call is running
    generator.before_call = second_delivery
    first = generate_handler(sqs_event([body]), lambda_context, deps=worker)

    # THEN the second left the item to the first: back later, no LLM call; the
    # first saved it: one call, one version
    assert answers[0]["batchItemFailures"] == [{"itemIdentifier": "the-same-message-again"}]
    assert other_generator.calls == []
    assert first["batchItemFailures"] == []
    assert len(generator.calls) == 1
    assert versions(db, concept_id) == [(1, True)]

    # WHEN the second comes back later
    again = generate_handler(duplicate, FakeLambdaContext(), deps=other)

    # THEN it finds the item saved: acknowledged, nothing paid or saved again
    assert again["batchItemFailures"] == []
    assert other_generator.calls == []
    assert versions(db, concept_id) == [(1, True)]


def test_one_message_id_twice_in_an_event_is_one_delivery(
    connection: Connection, queues: Queues, db: Engine, lambda_context: FakeLambdaContext
) -> None:
    generator = CountingGenerator()
    detect = detect_deps(db, queues.sqs)
    worker = worker_deps(db, queues.sqs, generator)
    body = sqs_body_of(plan(connection, detect, lambda_context), queues)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    event = sqs_event([body])
    event["Records"].append(dict(event["Records"][0]))

    response = generate_handler(event, lambda_context, deps=worker)

    # processed once (one call, one version, the item succeeded), reported once
    assert response == {"batchItemFailures": []}
    assert len(generator.calls) == 1
    assert versions(db, concept_id) == [(1, True)]
    assert ledger_rows(db, concept_id) == [("succeeded", 1)]


def test_a_message_not_matching_its_ledger_changes_nothing_even_on_its_last_delivery(
    connection: Connection, queues: Queues, db: Engine, lambda_context: FakeLambdaContext
) -> None:
    # GIVEN a message with the right task and concept but another roadmap and
    # owner, on its last delivery, and a DLQ that refuses it once
    generator = CountingGenerator()
    detect = detect_deps(db, queues.sqs)
    body = sqs_body_of(plan(connection, detect, lambda_context), queues)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    forged = json.loads(body) | {"roadmap_id": "someone-elses", "user_id": "u-other"}
    worker = worker_deps(db, RefusingOnce(queues.sqs), generator)
    event = sqs_event([json.dumps(forged)])
    event["Records"][0]["attributes"]["ApproximateReceiveCount"] = "5"

    response = generate_handler(event, lambda_context, deps=worker)

    # THEN it is dead-lettered as not planned; the real item is untouched
    assert response["batchItemFailures"] == []
    dead = queues.receive_all(queues.dlq_url)
    assert [m["MessageAttributes"]["reason"]["StringValue"] for m in dead] == ["not_planned"]
    assert generator.calls == []
    assert ledger_rows(db, concept_id) == [("queued", 0)]


def test_the_largest_content_fits_a_dead_letter_copy() -> None:
    # Every content type at its models' limits, in characters JSON escapes as six
    # bytes (\u0001): the dead-letter copy still fits the queue's message size.
    from tests.unit.test_generators import longest_text

    escaped = sum(6 * longest_text(model.model_json_schema()) for model in CONTENT_MODELS.values())
    envelope = 4_096  # the message's other fields, at their limits
    limit = queue_message_limit()
    assert escaped + envelope <= limit, (escaped, limit)
    # and the content model's own text is what is escaped: nothing else grows
    assert set(GeneratedContent.model_fields) == {t.value for t in ContentType}


class RefusingOnce:
    """SQS whose first SendMessage fails (the DLQ unreachable for a moment)."""

    def __init__(self, sqs: Any) -> None:
        self.sqs = sqs
        self.refused = False

    def send_message(self, **call: Any) -> Any:
        if not self.refused:
            self.refused = True
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "ServiceUnavailable"}}, "SendMessage")
        return self.sqs.send_message(**call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqs, name)


def sqs_body_of(answer: dict[str, Any], queues: Queues) -> list[str]:
    assert answer["retried_count"] == 21
    return [m["Body"] for m in queues.receive_all()]


def task_event(task_id: str) -> dict[str, Any]:
    event = load_event("api-task-status.json")
    event["pathParameters"] = {"task_id": task_id}
    event["path"] = f"/retry-tasks/{task_id}"
    return event


def queue_message_limit() -> int:
    from content_retry_local.template import queue_attributes

    return int(queue_attributes("RetryDLQ")["MaximumMessageSize"])
