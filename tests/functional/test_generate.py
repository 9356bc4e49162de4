"""The generate function through its handler: saves, duplicates, faults, re-drive.

Real PostgreSQL, moto's SQS with the queues of template.yaml, messages built by
the detect function from the seed's plan, the event JSON of events/.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.exceptions import ClientError
from sqlalchemy import Connection, Engine, text

from content_retry.content_store import save_message
from content_retry.content_types import ContentType
from content_retry.database import BatchConnection, build_engine
from content_retry.generation import THROTTLED_DELAY_SECONDS
from content_retry.generators import (
    ConfigurationError,
    MalformedOutputError,
    PermanentGenerationError,
    ThrottledError,
    TransientGenerationError,
)
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import RetryMessage
from content_retry.retries import DetectDependencies
from content_retry.settings import Settings
from content_retry.tasks import read_task
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
    logged_events,
    redriven_event,
    sqs_event,
    worker_deps,
)


@pytest.fixture
def generator() -> CountingGenerator:
    return CountingGenerator()


@pytest.fixture
def detect(queues: Queues, db: Engine) -> DetectDependencies:
    return detect_deps(db, queues.sqs)


@pytest.fixture
def worker(queues: Queues, db: Engine, generator: CountingGenerator) -> WorkerDependencies:
    return worker_deps(db, queues.sqs, generator)


def plan_messages(
    connection: Connection,
    queues: Queues,
    detect: DetectDependencies,
    context: FakeLambdaContext,
    content_types: list[str] | None = None,
    **seed: Any,
) -> list[str]:
    """Seed, ask detect to retry tutorials (or ``content_types``) through the API,
    return the queued bodies."""
    seed_scenario(connection, **seed)
    connection.commit()
    event = load_event("api-retry.json")
    if content_types is not None:
        event["body"] = json.dumps({"content_types": content_types})
    response = detect_handler(event, context, deps=detect)
    assert response["statusCode"] == 202, response
    return [message["Body"] for message in queues.receive_all()]


def run_batches(
    bodies: list[str], worker: WorkerDependencies, context: FakeLambdaContext, size: int = 5
) -> list[str]:
    """Feed the bodies to the generate handler in batches; return the failed message ids."""
    failed: list[str] = []
    for start in range(0, len(bodies), size):
        response = generate_handler(sqs_event(bodies[start : start + size]), context, deps=worker)
        failed += [failure["itemIdentifier"] for failure in response["batchItemFailures"]]
    return failed


def latest_tutorials(engine: Engine) -> dict[str, tuple[str, int]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT concept_id, content_status, content_version FROM tutorials "
                "WHERE roadmap_id = :r AND is_latest"
            ),
            {"r": SEED_ROADMAP_ID},
        ).all()
    return {row.concept_id: (row.content_status, row.content_version) for row in rows}


def ledger_item(engine: Engine, concept_id: str) -> Any:
    """The concept's one ledger row (status, attempts, last_error)."""
    with engine.connect() as connection:
        return connection.execute(
            text("SELECT status, attempts, last_error FROM retry_items WHERE concept_id = :c"),
            {"c": concept_id},
        ).one()


def framework_statuses(engine: Engine, key: str) -> dict[str, Any]:
    with engine.connect() as connection:
        framework = connection.execute(
            text("SELECT framework_data FROM roadmap_metadata WHERE roadmap_id = :r"),
            {"r": SEED_ROADMAP_ID},
        ).scalar_one()
    return {
        concept["concept_id"]: concept[key]
        for stage in framework["stages"]
        for module in stage["modules"]
        for concept in module["concepts"]
    }


def test_seed_scenario_end_to_end_saves_the_21_lost_tutorials(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN the 21 messages detect queued for the seed's lost tutorials
    bodies = plan_messages(connection, queues, detect, lambda_context)
    assert len(bodies) == 21

    # WHEN the generate function consumes them in batches of 5
    failed = run_batches(bodies, worker, lambda_context)

    # THEN all 31 tutorials are latest and completed, the 21 new ones as version 1...
    assert failed == []
    tutorials = latest_tutorials(db)
    assert len(tutorials) == 31
    assert {status for status, _ in tutorials.values()} == {"completed"}
    # ...the framework says so, the task is completed, and the LLM was called 21 times
    assert set(framework_statuses(db, "content_status").values()) == {"completed"}
    task_id = json.loads(bodies[0])["task_id"]
    with db.connect() as check:
        found = read_task(check, task_id)
    assert found is not None
    task = found[0]
    assert task.status == "completed"
    assert task.counts.model_dump() == {
        "queued": 0,
        "succeeded": 21,
        "failed": 0,
        "dead_lettered": 0,
        "waiting_for_redrive": 0,
    }
    assert len(generator.calls) == 21
    with db.connect() as connection:
        content = connection.execute(
            text("SELECT title, content FROM tutorials WHERE concept_id = 'c11' AND is_latest")
        ).one()
    assert content.title.startswith("Prompt compression")
    assert "## What it is" in content.content


def test_the_same_record_delivered_twice_saves_one_version_and_calls_the_llm_once(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    body = plan_messages(connection, queues, detect, lambda_context)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]

    first = generate_handler(sqs_event([body]), lambda_context, deps=worker)
    second = generate_handler(sqs_event([body, body]), lambda_context, deps=worker)

    assert first["batchItemFailures"] == second["batchItemFailures"] == []
    with db.connect() as connection:
        versions = connection.execute(
            text("SELECT content_version, is_latest FROM tutorials WHERE concept_id = :c"),
            {"c": concept_id},
        ).all()
    assert [tuple(row) for row in versions] == [(1, True)]
    assert generator.calls == [(concept_id, "tutorial")]


def test_a_new_version_takes_latest_from_the_previous_one(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN a failed quiz (version 1, latest) planned for retry
    seed_scenario(connection, other_failures=True)
    connection.commit()
    event = load_event("api-retry.json")
    event["body"] = json.dumps({"content_types": ["quiz"]})
    assert detect_handler(event, lambda_context, deps=detect)["statusCode"] == 202
    bodies = [message["Body"] for message in queues.receive_all()]

    # WHEN it is regenerated
    assert run_batches(bodies, worker, lambda_context) == []

    # THEN version 2 is the one latest row; version 1 is kept, no longer latest
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT content_version, content_status, is_latest FROM quizzes "
                "WHERE concept_id = 'c14' ORDER BY content_version"
            )
        ).all()
    assert [tuple(row) for row in rows] == [(1, "failed", False), (2, "completed", True)]
    assert framework_statuses(db, "quiz_status")["c14"] == "completed"


def test_a_connection_killed_during_the_save_dead_letters_the_content_and_redrive_saves_it(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN one queued message, and a database that drops the worker's
    # connection while the LLM is answering (a proxy failover, a pool reaping it)
    body = plan_messages(connection, queues, detect, lambda_context)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]

    worker_sessions = EngineSessions(worker.engine)
    generator.before_call = lambda *_: worker_sessions.terminate()

    # WHEN the generate function processes it
    response = generate_handler(sqs_event([body]), lambda_context, deps=worker)

    # THEN the record is acknowledged, nothing was half-saved, and the DLQ holds
    # the message with the generated content and the reason
    assert response["batchItemFailures"] == []
    assert concept_id not in latest_tutorials(db)
    dead = queues.receive_all(queues.dlq_url)
    assert len(dead) == 1
    assert dead[0]["MessageAttributes"]["reason"]["StringValue"] == "save_failed"
    kept = RetryMessage.model_validate_json(dead[0]["Body"])
    assert kept.generated is not None
    assert kept.generated.tutorial is not None
    assert kept.generated.tutorial.title.startswith(kept.concept.name)
    # ... and the invocation left the database alone after its failure: the
    # item still holds its claim as running, for the re-drive to settle
    status = ledger_item(db, concept_id).status
    assert status == "running"

    # WHEN that message is re-driven (the database is back)
    generator.before_call = None
    calls_before = len(generator.calls)
    response = generate_handler(sqs_event([dead[0]["Body"]]), lambda_context, deps=worker)

    # THEN it is saved without calling the LLM again
    assert response["batchItemFailures"] == []
    assert latest_tutorials(db)[concept_id] == ("completed", 1)
    assert len(generator.calls) == calls_before
    with db.connect() as connection:
        saved = connection.execute(
            text("SELECT title FROM tutorials WHERE concept_id = :c"), {"c": concept_id}
        ).scalar_one()
    assert saved == kept.generated.tutorial.title


def test_the_redriven_event_file_saves_its_content_without_the_llm(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN the planned message for c11, re-driven as events/ shows it (content inside)
    bodies = plan_messages(connection, queues, detect, lambda_context)
    planned = next(json.loads(b) for b in bodies if json.loads(b)["concept"]["concept_id"] == "c11")
    event = load_event("sqs-redriven-with-generated.json")
    redriven = json.loads(event["Records"][0]["body"])
    redriven["task_id"] = planned["task_id"]
    event["Records"][0]["body"] = json.dumps(redriven)

    response = generate_handler(event, lambda_context, deps=worker)

    assert response["batchItemFailures"] == []
    assert generator.calls == []
    with db.connect() as connection:
        title = connection.execute(
            text("SELECT title FROM tutorials WHERE concept_id = 'c11' AND is_latest")
        ).scalar_one()
    assert title == redriven["generated"]["tutorial"]["title"]


def test_a_malformed_body_goes_to_the_dlq_with_its_reason(
    queues: Queues,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    worker: WorkerDependencies,
) -> None:
    event = load_event("sqs-malformed-body.json")

    response = generate_handler(event, lambda_context, deps=worker)

    assert response == {"batchItemFailures": []}
    dead = queues.receive_all(queues.dlq_url)
    assert [message["Body"] for message in dead] == [event["Records"][0]["body"]]
    assert dead[0]["MessageAttributes"]["reason"]["StringValue"] == "invalid_message"
    assert "task_id" in dead[0]["MessageAttributes"]["error"]["StringValue"]
    assert generator.calls == []


def test_a_message_the_judge_never_planned_is_dead_lettered(
    queues: Queues,
    connection: Connection,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # the example batch names a task id no ledger holds
    event = load_event("sqs-retry-batch.json")
    with logged_events() as lines:
        response = generate_handler(event, lambda_context, deps=worker)

    assert response == {"batchItemFailures": []}
    reasons = {
        m["MessageAttributes"]["reason"]["StringValue"] for m in queues.receive_all(queues.dlq_url)
    }
    assert reasons == {"not_planned"}
    assert generator.calls == []
    # its log lines name the task and concept it claimed, for the runbook's queries
    first = json.loads(event["Records"][0]["body"])
    dead_lettered = [line for line in lines if line["message"] == "retry_item_dead_lettered"]
    assert dead_lettered[0]["task_id"] == first["task_id"]
    assert dead_lettered[0]["concept_id"] == first["concept"]["concept_id"]
    assert dead_lettered[0]["message_id"] == event["Records"][0]["messageId"]


def test_a_transient_llm_error_fails_exactly_that_record(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    bodies = plan_messages(connection, queues, detect, lambda_context)[:3]
    throttled = json.loads(bodies[1])["concept"]["concept_id"]
    generator.failures[(throttled, "tutorial")] = TransientGenerationError("ThrottlingException")

    response = generate_handler(sqs_event(bodies), lambda_context, deps=worker)

    assert response == {"batchItemFailures": [{"itemIdentifier": "message-1"}]}
    saved = latest_tutorials(db)
    assert throttled not in saved
    assert {json.loads(b)["concept"]["concept_id"] for b in (bodies[0], bodies[2])} <= set(saved)
    item = ledger_item(db, throttled)
    assert (item.status, item.attempts) == ("running", 1)
    assert "ThrottlingException" in item.last_error


def test_a_permanent_llm_error_fails_the_item_and_acks(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    body = plan_messages(connection, queues, detect, lambda_context)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    generator.failures[(concept_id, "tutorial")] = PermanentGenerationError("content filtered")

    response = generate_handler(sqs_event([body]), lambda_context, deps=worker)

    assert response == {"batchItemFailures": []}
    item = ledger_item(db, concept_id)
    assert (item.status, item.last_error) == ("failed", "content filtered")
    assert framework_statuses(db, "content_status")[concept_id] == "failed"
    assert concept_id not in latest_tutorials(db)


def test_malformed_output_is_transient_until_its_bound_then_permanent(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    body = plan_messages(connection, queues, detect, lambda_context)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    generator.failures[(concept_id, "tutorial")] = MalformedOutputError("not JSON")

    answers = [generate_handler(sqs_event([body]), lambda_context, deps=worker) for _ in range(3)]

    assert [len(a["batchItemFailures"]) for a in answers] == [1, 1, 0]
    item = ledger_item(db, concept_id)
    assert (item.status, item.attempts) == ("failed", 3)
    assert len(generator.calls) == 3


def test_every_record_failing_is_a_valid_response(
    connection: Connection,
    queues: Queues,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    bodies = plan_messages(connection, queues, detect, lambda_context)[:4]
    for body in bodies:
        concept_id = json.loads(body)["concept"]["concept_id"]
        generator.failures[(concept_id, "tutorial")] = TransientGenerationError("timeout")

    response = generate_handler(sqs_event(bodies), lambda_context, deps=worker)

    assert response == {"batchItemFailures": [{"itemIdentifier": f"message-{n}"} for n in range(4)]}


def test_too_little_time_left_fails_the_rest_without_calling_the_llm(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN three messages, and calls made one at a time (GENERATE_PARALLELISM=1)
    bodies = plan_messages(connection, queues, detect, lambda_context)[:3]
    worker.settings = worker.settings.model_copy(update={"generate_parallelism": 1})

    def time_passes(*_: str) -> None:
        lambda_context.remaining_ms = 40_000  # after the first call, 40 s are left

    generator.before_call = time_passes

    # WHEN the first call leaves less than an LLM call's budget
    response = generate_handler(sqs_event(bodies), lambda_context, deps=worker)

    # THEN the first is saved; the others go back to SQS without a call
    assert response == {
        "batchItemFailures": [{"itemIdentifier": "message-1"}, {"itemIdentifier": "message-2"}]
    }
    assert len(generator.calls) == 1
    assert len(latest_tutorials(db)) == 11


def test_no_call_starts_without_the_budget_however_many_could_run_at_once(
    connection: Connection,
    queues: Queues,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    bodies = plan_messages(connection, queues, detect, lambda_context)[:5]
    lambda_context.remaining_ms = (worker.settings.llm_call_budget_seconds - 1) * 1000

    response = generate_handler(sqs_event(bodies), lambda_context, deps=worker)

    assert len(response["batchItemFailures"]) == 5
    assert generator.calls == []


def test_the_database_down_at_the_start_fails_every_record_without_llm_calls(
    connection: Connection,
    queues: Queues,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    bodies = plan_messages(connection, queues, detect, lambda_context)[:2]
    worker.engine = build_engine(Settings(DATABASE_URL="postgresql://nobody@127.0.0.1:9/nothing"))

    response = generate_handler(sqs_event(bodies), lambda_context, deps=worker)

    assert len(response["batchItemFailures"]) == 2
    assert generator.calls == []


def test_two_tasks_saving_one_concept_at_once_save_one_version(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import threading

    from content_retry.repositories.claims import ItemKey
    from content_retry.repositories.content_versions import save_item
    from content_retry.retries import start_retry

    # GIVEN c11's tutorial planned by two tasks (the first one's claim expired)
    first = next(
        b
        for b in plan_messages(connection, queues, detect, lambda_context)
        if json.loads(b)["concept"]["concept_id"] == "c11"
    )
    with db.begin() as connection:
        connection.execute(
            # its message was dropped from the queue, unprocessed (the queue's retention passed)
            text(
                "UPDATE retry_items SET claimed_at = claimed_at - interval '2 hours', "
                "sent_at = sent_at - interval '5 days'"
            )
        )
    start_retry(detect, SEED_ROADMAP_ID, content_types=["tutorial"], trigger="sweep")
    second = next(
        m["Body"]
        for m in queues.receive_all()
        if json.loads(m["Body"])["concept"]["concept_id"] == "c11"
    )
    planned = RetryMessage.model_validate_json(first)
    content = (
        TemplateGenerator()
        .generate(planned.concept, ContentType.TUTORIAL, planned.preferences)
        .content
    )

    # WHEN the first task's save is in flight (not yet committed) while the
    # second task's worker saves the same concept
    in_flight, done = threading.Event(), threading.Event()

    def first_save() -> None:
        with db.begin() as other:
            save_item(
                other,
                ItemKey(str(planned.task_id), "c11", ContentType.TUTORIAL),
                roadmap_id=SEED_ROADMAP_ID,
                user_id=planned.user_id,
                concept_name=planned.concept.name,
                content=content,
            )
            in_flight.set()
            # Committed only once the worker's insert waits on this transaction
            # (a lock wait), so the two saves really meet, however slow the machine.
            deadline = time.monotonic() + 20
            while not done.is_set() and time.monotonic() < deadline:
                with db.connect() as watcher:
                    waiting = watcher.execute(
                        text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                    ).scalar_one()
                if waiting:
                    break
                time.sleep(0.02)

    thread = threading.Thread(target=first_save)
    thread.start()
    assert in_flight.wait(10)
    response = generate_handler(sqs_event([second]), lambda_context, deps=worker)
    done.set()
    thread.join()

    # THEN one version is saved, the first task's; the second task's save found
    # the concept saved since it began, saved nothing, and ended its item
    # succeeded: one latest version whatever races; nothing dead-lettered
    assert response["batchItemFailures"] == []
    assert queues.depth(queues.dlq_url) == 0
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT content_version, is_latest FROM tutorials WHERE concept_id = 'c11' ORDER BY 1"
            )
        ).all()
    assert [tuple(row) for row in rows] == [(1, True)]
    assert any(record.msg == "retry_item_save_raced" for record in caplog.records)
    with db.connect() as check:
        statuses = (
            check.execute(
                text(
                    "SELECT i.status FROM retry_items AS i JOIN retry_tasks AS t USING (task_id) "
                    "WHERE i.concept_id = 'c11' ORDER BY t.created_at"
                )
            )
            .scalars()
            .all()
        )
    assert statuses == ["succeeded", "succeeded"]


@pytest.mark.parametrize(("receives", "dead_lettered"), [(4, False), (5, True)])
def test_a_record_failing_on_its_last_delivery_is_dead_lettered_with_its_reason(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
    receives: int,
    dead_lettered: bool,
) -> None:
    # GIVEN a message whose LLM call keeps being throttled, delivered for the n-th time
    body = plan_messages(connection, queues, detect, lambda_context)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    generator.failures[(concept_id, "tutorial")] = TransientGenerationError("ThrottlingException")
    event = sqs_event([body])
    event["Records"][0]["attributes"]["ApproximateReceiveCount"] = str(receives)

    # WHEN the generate function takes it
    response = generate_handler(event, lambda_context, deps=worker)

    # THEN before the last delivery it goes back to SQS; on the last one
    # (maxReceiveCount) the worker dead-letters it itself, naming why
    dead = queues.receive_all(queues.dlq_url)
    item = ledger_item(db, concept_id)
    if dead_lettered:
        assert response == {"batchItemFailures": []}
        assert [m["MessageAttributes"]["reason"]["StringValue"] for m in dead] == [
            "retries_exhausted"
        ]
        assert "5 deliveries" in dead[0]["MessageAttributes"]["error"]["StringValue"]
        assert item.status == "dead_lettered"
        assert "ThrottlingException" in item.last_error
    else:
        assert response == {"batchItemFailures": [{"itemIdentifier": "message-0"}]}
        assert dead == []
        assert item.status == "running"


def test_a_failed_save_ends_the_items_that_failed_for_good_and_the_redrive_calls_no_llm(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN a message of two items (a lost tutorial, a failed quiz): the LLM
    # refuses the quiz permanently, and the database drops the worker's connection
    bodies = plan_messages(
        connection, queues, detect, lambda_context, ["tutorial", "quiz"], other_failures=True
    )
    body = next(b for b in bodies if len(json.loads(b)["items"]) == 2)
    concept_id = json.loads(body)["concept"]["concept_id"]
    generator.failures[(concept_id, "quiz")] = PermanentGenerationError("content filtered")
    sessions = EngineSessions(worker.engine)
    generator.before_call = lambda *_: sessions.terminate()

    # WHEN the generate function takes it, and the save fails
    response = generate_handler(sqs_event([body]), lambda_context, deps=worker)

    # THEN the message is in the DLQ with the tutorial; the invocation touched
    # the database no more after its failure, so both items still hold their
    # claims as running, for the re-drive to settle
    assert response == {"batchItemFailures": []}
    dead = queues.receive_all(queues.dlq_url)
    assert [m["MessageAttributes"]["reason"]["StringValue"] for m in dead] == ["save_failed"]
    kept = RetryMessage.model_validate_json(dead[0]["Body"])
    assert kept.generated is not None and kept.generated.tutorial is not None
    with db.connect() as c:
        items = {
            row.content_type: (row.status, row.last_error)
            for row in c.execute(
                text(
                    "SELECT content_type, status, last_error FROM retry_items WHERE concept_id = :c"
                ),
                {"c": concept_id},
            )
        }
    assert items["tutorial"][0] == "running"
    assert items["quiz"][0] == "running"

    # WHEN it is re-driven, once the invocation that held its items has ended
    generator.before_call = None
    calls_before = len(generator.calls)
    holds_expire(db)
    response = generate_handler(redriven_event(dead), lambda_context, deps=worker)

    # THEN the tutorial is saved from the message without the LLM; the quiz,
    # whose permanent failure could not be noted, is asked once more and ends failed
    assert response == {"batchItemFailures": []}
    assert [call[1] for call in generator.calls[calls_before:]] == ["quiz"]
    assert latest_tutorials(db)[concept_id][0] == "completed"
    with db.connect() as c:
        quiz = c.execute(
            text(
                "SELECT status, last_error FROM retry_items WHERE concept_id = :c AND "
                "content_type = 'quiz'"
            ),
            {"c": concept_id},
        ).one()
    assert tuple(quiz) == ("failed", "content filtered")


@dataclass
class RefusingDlq:
    """SQS whose SendMessage refuses a body carrying generated content
    ``refusals`` times (-1: always, as a copy too large for SQS would be)."""

    sqs: Any
    refusals: int

    def send_message(self, **call: Any) -> Any:
        if '"generated":{' in call["MessageBody"] and self.refusals:
            self.refusals -= 1
            raise ClientError(
                {"Error": {"Code": "InvalidParameterValue", "Message": "refused"}}, "SendMessage"
            )
        return self.sqs.send_message(**call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqs, name)


@pytest.mark.parametrize(
    ("refusals", "keeps_content"), [(1, True), (-1, False)], ids=["once", "always"]
)
def test_on_the_last_delivery_a_refused_content_copy_is_sent_again_not_a_poorer_one(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    refusals: int,
    keeps_content: bool,
) -> None:
    # GIVEN a message on its last delivery whose save fails, and a DLQ that
    # refuses the copy carrying the generated content (once, or always)
    body = plan_messages(connection, queues, detect, lambda_context)[0]
    worker = worker_deps(db, RefusingDlq(queues.sqs, refusals), generator)
    sessions = EngineSessions(worker.engine)
    generator.before_call = lambda *_: sessions.terminate()
    event = sqs_event([body])
    event["Records"][0]["attributes"]["ApproximateReceiveCount"] = "5"

    # WHEN the generate function takes it
    response = generate_handler(event, lambda_context, deps=worker)

    # THEN it is dead-lettered once, as a failed save: with its content when the
    # DLQ takes it, else the original message, the reason kept either way
    assert response == {"batchItemFailures": []}
    dead = queues.receive_all(queues.dlq_url)
    assert [m["MessageAttributes"]["reason"]["StringValue"] for m in dead] == ["save_failed"]
    kept = RetryMessage.model_validate_json(dead[0]["Body"])
    assert (kept.generated is not None) is keeps_content


def test_a_failure_noted_after_another_delivery_saved_the_item_leaves_its_status_completed(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN an item saved by one delivery of its message
    body = plan_messages(connection, queues, detect, lambda_context)[0]
    message = RetryMessage.model_validate_json(body)
    concept_id = message.concept.concept_id
    assert generate_handler(sqs_event([body]), lambda_context, deps=worker) == {
        "batchItemFailures": []
    }

    # WHEN a second delivery, running at the same time, got a permanent LLM
    # refusal for it and notes the failure afterwards
    with BatchConnection(db) as database:
        save_message(database, message, {}, {ContentType.TUTORIAL: "content filtered"}, {})

    # THEN the item stays saved: ledger and framework both say so
    assert ledger_item(db, concept_id).status == "succeeded"
    assert framework_statuses(db, "content_status")[concept_id] == "completed"
    assert latest_tutorials(db)[concept_id][0] == "completed"


@dataclass
class RecordingSqs:
    """SQS that records the visibility changes the worker asks for."""

    sqs: Any
    visibility: list[int]

    def change_message_visibility(self, **call: Any) -> Any:
        self.visibility.append(call["VisibilityTimeout"])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqs, name)


def last_delivery(event: dict[str, Any], receives: int = 5) -> dict[str, Any]:
    for record in event["Records"]:
        record["attributes"]["ApproximateReceiveCount"] = str(receives)
    return event


def test_a_configuration_fault_returns_the_records_and_fails_no_item(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN three messages, and an account that may not call the model
    bodies = plan_messages(connection, queues, detect, lambda_context)[:3]
    concepts = [json.loads(body)["concept"]["concept_id"] for body in bodies]
    worker.settings = worker.settings.model_copy(update={"generate_parallelism": 1})
    generator.failures[(concepts[0], "tutorial")] = ConfigurationError(
        "bedrock AccessDeniedException: You don't have access to the model"
    )

    # WHEN the generate function takes them
    with logged_events() as events:
        response = generate_handler(sqs_event(bodies), lambda_context, deps=worker)

    # THEN every record goes back, after one refused call and no other; no item
    # and no framework status says failed: it is no item's fault
    assert len(response["batchItemFailures"]) == 3
    assert len(generator.calls) == 1
    assert {ledger_item(db, c).status for c in concepts} == {"running"}
    assert "failed" not in framework_statuses(db, "content_status").values()
    assert "retry_generate_configuration_error" in [e["message"] for e in events]

    # WHEN they come back for their last delivery, still refused
    generator.failures.update(
        {(c, "tutorial"): generator.failures[(concepts[0], "tutorial")] for c in concepts}
    )
    response = generate_handler(last_delivery(sqs_event(bodies)), lambda_context, deps=worker)

    # THEN they are dead-lettered with that reason, as waiting (not failed)
    assert response["batchItemFailures"] == []
    dead = queues.receive_all(queues.dlq_url)
    assert [m["MessageAttributes"]["reason"]["StringValue"] for m in dead] == ["configuration"] * 3
    assert {ledger_item(db, c).status for c in concepts} == {"dead_lettered"}
    assert "failed" not in framework_statuses(db, "content_status").values()


def test_a_throttled_record_comes_back_in_seconds_and_is_requeued_not_dead_lettered(
    connection: Connection,
    queues: Queues,
    db: Engine,
    lambda_context: FakeLambdaContext,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN a message whose LLM call the account's quota refuses
    body = plan_messages(connection, queues, detect, lambda_context)[0]
    concept_id = json.loads(body)["concept"]["concept_id"]
    generator.failures[(concept_id, "tutorial")] = ThrottledError("ThrottlingException")
    visibility: list[int] = []
    worker.sqs = RecordingSqs(worker.sqs, visibility)

    # WHEN the generate function takes it
    response = generate_handler(sqs_event([body]), lambda_context, deps=worker)

    # THEN the record goes back, visible again in seconds, and the item is not failed
    assert response["batchItemFailures"] == [{"itemIdentifier": "message-0"}]
    assert visibility == [THROTTLED_DELAY_SECONDS]
    item = ledger_item(db, concept_id)
    assert item.status == "running"

    # WHEN it is still throttled on its last delivery
    response = generate_handler(last_delivery(sqs_event([body])), lambda_context, deps=worker)

    # THEN it is sent back to the queue as a fresh message (delayed), never dead-lettered
    assert response["batchItemFailures"] == []
    assert queues.receive_all(queues.dlq_url) == []
    delayed = queues.sqs.get_queue_attributes(
        QueueUrl=queues.queue_url, AttributeNames=["ApproximateNumberOfMessagesDelayed"]
    )["Attributes"]["ApproximateNumberOfMessagesDelayed"]
    assert delayed == "1"
    # ... and no LLM call was counted for it: the quota refused both before the model ran
    with db.connect() as check:
        calls = check.execute(
            text("SELECT llm_calls FROM retry_items WHERE concept_id = :c"), {"c": concept_id}
        ).scalar_one()
    assert calls == 0
