"""The detect function through its handler: API, schedule and direct invoke.

Real PostgreSQL, moto's SQS with the queues of template.yaml, the event JSON
of events/ (the files `sam local invoke -e` takes).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from content_retry.detect import InvalidEventError
from content_retry.messages import RetryMessage
from content_retry.plan import RoadmapNotFoundError
from content_retry.retries import DetectDependencies, start_retry
from content_retry.sweep import sweep
from content_retry_local.seed import (
    SEED_ROADMAP_ID,
    ConceptSeed,
    insert_content_row,
    insert_roadmap,
    seed_scenario,
    single_module_framework,
)
from functions.detect.app import lambda_handler
from tests.conftest import FakeLambdaContext, Queues
from tests.support import FlakySqs, detect_deps

EventLoader = Callable[[str], dict[str, Any]]


def as_user(event: dict[str, Any], user: str | None) -> dict[str, Any]:
    event = copy.deepcopy(event)
    if user is None:
        event["requestContext"].pop("authorizer", None)
    else:
        event["requestContext"]["authorizer"] = {"claims": {"sub": user}}
    return event


def with_body(event: dict[str, Any], body: str | None) -> dict[str, Any]:
    event = copy.deepcopy(event)
    event["body"] = body
    return event


def task_event(load_event: EventLoader, task_id: str) -> dict[str, Any]:
    event = load_event("api-task-status.json")
    event["path"] = f"/retry-tasks/{task_id}"
    event["pathParameters"] = {"task_id": task_id}
    return event


@pytest.fixture
def detect(queues: Queues, db: Engine) -> DetectDependencies:
    return detect_deps(db, queues.sqs)


def respond(
    event: dict[str, Any], context: FakeLambdaContext, deps: DetectDependencies
) -> tuple[int, dict[str, Any]]:
    response = lambda_handler(event, context, deps=deps)
    return response["statusCode"], json.loads(response["body"])


def count_rows(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_seed_scenario_through_the_api_queues_21_self_contained_messages(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    caplog: pytest.LogCaptureFixture,
    detect: DetectDependencies,
) -> None:
    # GIVEN the seed's roadmap: 21 tutorials lost, none marked failed
    seed_scenario(connection)
    connection.commit()

    # WHEN its owner asks for a retry through API Gateway
    status, body = respond(load_event("api-retry.json"), lambda_context, detect)

    # THEN 21 items are queued as 21 messages, one per concept
    assert status == 202
    assert body["success"] is True
    assert body["retried_count"] == 21
    assert body["items"] == {"tutorial": 21}
    assert body["reasons"] == {"missing": 11, "failed": 0, "stale": 10}
    messages = [RetryMessage.model_validate_json(m["Body"]) for m in queues.receive_all()]
    assert len(messages) == 21
    assert {str(m.task_id) for m in messages} == {body["task_id"]}
    for message in messages:
        # each carries everything the worker needs: the concept's whole context
        assert message.roadmap_id == SEED_ROADMAP_ID
        assert message.user_id == "u-42"
        assert message.concept.name and message.concept.description
        assert message.concept.stage and message.concept.module
        assert [item.content_type.value for item in message.items] == ["tutorial"]
        assert message.generated is None
    # and the plan was logged as an event with its counts
    plan_built = next(record for record in caplog.records if record.msg == "retry_plan_built")
    counts = [
        getattr(plan_built, name) for name in ("missing_count", "stale_count", "planned_count")
    ]
    assert tuple(counts) == (
        11,
        10,
        21,
    )


def test_task_status_lists_counts_and_items(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    seed_scenario(connection)
    connection.commit()
    _, created = respond(load_event("api-retry.json"), lambda_context, detect)

    status, body = respond(task_event(load_event, created["task_id"]), lambda_context, detect)

    assert status == 200
    assert body["task_id"] == created["task_id"]
    assert body["roadmap_id"] == SEED_ROADMAP_ID
    assert body["status"] == "queued"
    assert body["counts"] == {
        "queued": 21,
        "succeeded": 0,
        "failed": 0,
        "dead_lettered": 0,
        "waiting_for_redrive": 0,
    }
    assert len(body["items"]) == 21
    assert set(body["items"][0]) == {
        "concept_id",
        "content_type",
        "reason",
        "status",
        "attempts",
        "last_error",
        "waiting_for_redrive",
    }


def test_another_users_roadmap_and_task_are_not_found(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    seed_scenario(connection)
    connection.commit()
    _, created = respond(load_event("api-retry.json"), lambda_context, detect)
    tasks_before = count_rows(detect.engine, "retry_tasks")

    # WHEN another signed-in user asks for the roadmap's retry and the task's status
    post_status, post_body = respond(
        as_user(load_event("api-retry.json"), "u-7"), lambda_context, detect
    )
    get_status, get_body = respond(
        as_user(task_event(load_event, created["task_id"]), "u-7"), lambda_context, detect
    )
    # ... and for a roadmap and a task that do not exist at all
    unknown = load_event("api-retry.json")
    unknown["pathParameters"] = {"roadmap_id": "no-such-roadmap"}
    unknown["path"] = "/roadmaps/no-such-roadmap/retry"
    unknown_status, unknown_body = respond(unknown, lambda_context, detect)
    missing_task, _ = respond(
        task_event(load_event, "6f1c7f0e-0000-4000-8000-000000000000"), lambda_context, detect
    )

    # THEN both are 404, worded alike, so existence is never revealed; nothing was written
    assert (post_status, get_status, unknown_status, missing_task) == (404, 404, 404, 404), (
        post_body,
        get_body,
        unknown_body,
    )
    assert post_body == unknown_body
    assert count_rows(detect.engine, "retry_tasks") == tasks_before


@pytest.mark.parametrize("event_name", ["api-retry.json", "api-task-status.json"])
def test_no_identity_is_401(
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    event_name: str,
    detect: DetectDependencies,
) -> None:
    status, body = respond(as_user(load_event(event_name), None), lambda_context, detect)

    assert status == 401
    assert "identity" in body["message"]


def test_identity_from_a_lambda_authorizer_principal(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    seed_scenario(connection)
    connection.commit()
    event = load_event("api-retry.json")
    event["requestContext"]["authorizer"] = {"principalId": "u-42"}

    status, body = respond(event, lambda_context, detect)

    assert (status, body["retried_count"]) == (202, 21)


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ('{"content_types": ["video"]}', 422, "'tutorial', 'resources' or 'quiz'"),
        ('{"content_types": []}', 422, "content_types"),
        ('{"content_types": ["tutorial"], "priority": 1}', 422, "priority"),
        ('{"preferences": {"level": "expert"}}', 422, "'beginner', 'intermediate' or 'advanced'"),
        ("[1, 2]", 422, "object"),
        ("content_types=tutorial", 400, "not valid JSON"),
        ('{"content_types": ["tutorial"', 400, "not valid JSON"),
    ],
)
def test_bad_bodies_get_their_contract_answer_and_write_nothing(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    body: str,
    status: int,
    expected: str,
    detect: DetectDependencies,
) -> None:
    seed_scenario(connection)
    connection.commit()

    answer, payload = respond(with_body(load_event("api-retry.json"), body), lambda_context, detect)

    assert answer == status
    assert expected in payload["message"]
    assert payload["success"] is False
    assert count_rows(detect.engine, "retry_tasks") == 0
    assert queues.depth() == 0


def test_oversize_body_is_413(
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    body = json.dumps({"content_types": ["tutorial"], "pad": "x" * 20_000})

    status, payload = respond(with_body(load_event("api-retry.json"), body), lambda_context, detect)

    assert status == 413
    assert "bytes" in payload["message"]


def test_no_body_means_every_content_type(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    seed_scenario(connection, other_failures=True)
    connection.commit()

    status, body = respond(with_body(load_event("api-retry.json"), None), lambda_context, detect)

    assert status == 202
    assert body["items"] == {"tutorial": 21, "resources": 2, "quiz": 3}
    assert body["retried_count"] == 26
    # messages count concepts (21 lost tutorials, plus c03 and c08 whose tutorials are fine)
    assert len(queues.receive_all()) == 23


def test_nothing_to_retry_is_200_with_no_task(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    concept = ConceptSeed("c1", "Done", "d", {"content_status": "completed"})
    insert_roadmap(connection, SEED_ROADMAP_ID, "u-42", single_module_framework([concept]))
    insert_content_row(connection, _tutorial(), SEED_ROADMAP_ID, "c1", "completed")
    connection.commit()

    status, body = respond(load_event("api-retry.json"), lambda_context, detect)

    assert status == 200
    assert (body["retried_count"], body["task_id"]) == (0, None)
    assert queues.depth() == 0


def _tutorial() -> Any:
    from content_retry.content_types import ContentType

    return ContentType.TUTORIAL


def test_the_same_request_twice_enqueues_nothing_twice(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    seed_scenario(connection)
    connection.commit()

    first = respond(load_event("api-retry.json"), lambda_context, detect)
    second = respond(load_event("api-retry.json"), lambda_context, detect)

    assert (first[0], first[1]["retried_count"]) == (202, 21)
    assert (second[0], second[1]["retried_count"], second[1]["task_id"]) == (200, 0, None)
    assert queues.depth() == 21


def test_a_send_failure_releases_the_claim_and_the_task_says_so(
    connection: Connection,
    queues: Queues,
    detect: DetectDependencies,
) -> None:
    # GIVEN the seed, and a queue that keeps refusing two concepts' messages
    seed_scenario(connection)
    connection.commit()
    deps = detect
    deps.sqs = FlakySqs(queues.sqs, lambda body: body["concept"]["concept_id"] in {"c11", "c12"})

    # WHEN the retry is started
    outcome = start_retry(deps, SEED_ROADMAP_ID, content_types=["tutorial"], trigger="api")

    # THEN 19 were queued, the two refused ones were retried, then released
    assert outcome.retried_count == 19
    assert outcome.unsent_count == 2
    assert "could not be queued" in outcome.message
    assert queues.depth() == 19
    with deps.engine.connect() as check:
        items: dict[str, str] = dict(
            check.execute(
                text(
                    "SELECT concept_id, status FROM retry_items WHERE concept_id IN ('c11', 'c12')"
                )
            ).all()
        )
        task_error = check.execute(text("SELECT last_error FROM retry_tasks")).scalar_one()
    assert items == {"c11": "failed", "c12": "failed"}
    assert "2 message(s) could not be sent" in task_error
    # AND the next request plans exactly those two again
    deps.sqs = queues.sqs
    again = start_retry(deps, SEED_ROADMAP_ID, content_types=["tutorial"], trigger="api")
    assert again.retried_count == 2


def test_a_queue_refusing_every_message_is_a_503_that_says_it_failed(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    seed_scenario(connection)
    connection.commit()
    detect.sqs = FlakySqs(queues.sqs, lambda body: True)

    response = lambda_handler(load_event("api-retry.json"), lambda_context, deps=detect)
    body = json.loads(response["body"])

    assert response["statusCode"] == 503
    assert body["success"] is False
    assert body["retried_count"] == 0
    assert "could not be queued" in body["message"]
    assert queues.depth() == 0
    # and, as every 503 of the API, it says when to ask again
    headers = {**response.get("headers", {}), **response.get("multiValueHeaders", {})}
    assert headers["Retry-After"] in ("30", ["30"])


def test_a_crash_between_commit_and_send_loses_nothing(
    connection: Connection,
    queues: Queues,
    detect: DetectDependencies,
) -> None:
    # GIVEN a detect run that dies after committing its claims, before sending
    seed_scenario(connection)
    connection.commit()
    deps = detect
    deps.sqs = FlakySqs(queues.sqs, crash=True)
    with pytest.raises(SystemExit):
        start_retry(deps, SEED_ROADMAP_ID, content_types=["tutorial"], trigger="api")
    assert queues.depth() == 0

    # WHEN another request comes while the claims are live, nothing is planned twice...
    deps.sqs = queues.sqs
    assert (
        start_retry(deps, SEED_ROADMAP_ID, content_types=["tutorial"], trigger="api").retried_count
        == 0
    )

    # ...and once the lease has passed, the next request plans all 21 again
    with deps.engine.begin() as age:
        age.execute(text("UPDATE retry_items SET claimed_at = claimed_at - interval '61 minutes'"))
    again = start_retry(deps, SEED_ROADMAP_ID, content_types=["tutorial"], trigger="api")
    assert again.retried_count == 21
    assert queues.depth() == 21


def test_direct_invoke_returns_the_api_body(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    seed_scenario(connection, other_failures=True)
    connection.commit()

    body = lambda_handler(load_event("direct-invoke.json"), lambda_context, deps=detect)

    assert body["success"] is True
    assert body["retried_count"] == 26
    assert body["items"] == {"tutorial": 21, "resources": 2, "quiz": 3}


def test_direct_invoke_of_an_unknown_roadmap_raises(
    queues: Queues,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    with pytest.raises(RoadmapNotFoundError):
        lambda_handler({"roadmap_id": "nope"}, lambda_context, deps=detect)


@pytest.mark.parametrize(
    ("event", "named"),
    [
        ({"roadmap_id": "r", "content_types": ["video"]}, "content_types"),
        ({"roadmap_id": "r", "force": True}, "force"),
        ({"action": "purge"}, "action"),
        ({"hello": "world"}, "accepts an API Gateway REST proxy event"),
        ([1, 2], "accepts"),
    ],
)
def test_invalid_events_are_refused_with_what_is_accepted(
    queues: Queues,
    lambda_context: FakeLambdaContext,
    event: Any,
    named: str,
    detect: DetectDependencies,
) -> None:
    with pytest.raises(InvalidEventError, match=named):
        lambda_handler(event, lambda_context, deps=detect)


def _seed_sweep_roadmaps(
    connection: Connection, *, total: int, needing_work: int, young: int
) -> None:
    """``total`` one-concept roadmaps, a day old: ``needing_work`` of them lack a
    tutorial; ``young`` more lack one but were updated a minute ago."""
    complete = {
        "content_status": "completed",
        "resources_status": "completed",
        "quiz_status": "completed",
    }
    lost = {**complete, "content_status": None}
    connection.execute(
        text(
            "INSERT INTO roadmap_metadata (roadmap_id, user_id, framework_data, updated_at) "
            "SELECT 'r' || n, 'u-' || n, jsonb_build_object('stages', jsonb_build_array("
            "  jsonb_build_object('name', 'S', 'modules', jsonb_build_array(jsonb_build_object("
            "    'name', 'M', 'concepts', jsonb_build_array("
            "      jsonb_build_object('concept_id', 'c1', 'name', 'C') || "
            "      CASE WHEN n <= :lost THEN CAST(:lost_status AS jsonb) "
            "           ELSE CAST(:complete_status AS jsonb) END)))))), "
            "  now() - CASE WHEN n > :needing AND n <= :lost THEN interval '1 minute' "
            "               ELSE interval '1 day' END "
            "FROM generate_series(1, :total) AS n"
        ),
        {
            "total": total,
            "needing": needing_work,
            "lost": needing_work + young,
            "lost_status": json.dumps(lost),
            "complete_status": json.dumps(complete),
        },
    )
    for table in ("tutorials", "resource_recommendations", "quizzes"):
        connection.execute(
            text(
                f"INSERT INTO {table} (roadmap_id, concept_id, content_status) "
                "SELECT 'r' || n, 'c1', 'completed' FROM generate_series(1, :total) AS n "
                f"WHERE n > :lost OR '{table}' <> 'tutorials'"
            ),
            {"total": total, "lost": needing_work + young},
        )
    connection.commit()


def test_sweep_plans_what_needs_work_within_its_bound_and_grace(
    connection: Connection,
    queues: Queues,
    load_event: EventLoader,
    lambda_context: FakeLambdaContext,
    detect: DetectDependencies,
) -> None:
    # GIVEN 1,000 roadmaps: 10 lost a tutorial a day ago, 3 lost one a minute
    # ago (the platform may still be working on them), the rest are complete
    _seed_sweep_roadmaps(connection, total=1000, needing_work=10, young=3)
    detect.settings = detect.settings.model_copy(update={"sweep_max_roadmaps": 4})

    # WHEN the schedule fires four times (Scheduler input, then classic events)
    runs = [
        lambda_handler(load_event("schedule-sweep.json"), lambda_context, deps=detect),
        lambda_handler(load_event("scheduled-event-classic.json"), lambda_context, deps=detect),
        lambda_handler(load_event("schedule-sweep.json"), lambda_context, deps=detect),
        lambda_handler(load_event("schedule-sweep.json"), lambda_context, deps=detect),
    ]

    # THEN each run took at most 4, until the 10 old ones were all planned; the young waited
    assert [run["roadmaps_planned"] for run in runs] == [4, 4, 2, 0]
    assert sum(run["retried_count"] for run in runs) == 10
    planned = {m["Body"] and json.loads(m["Body"])["roadmap_id"] for m in queues.receive_all()}
    assert planned == {f"r{n}" for n in range(1, 11)}


def test_sweep_finds_its_candidates_through_the_partial_index(connection: Connection) -> None:
    _seed_sweep_roadmaps(connection, total=1000, needing_work=10, young=0)
    # autovacuum keeps statistics current in production; here, right after the load
    connection.execute(text("ANALYZE"))
    from content_retry.repositories.roadmaps import sweep_candidates_statement
    from content_retry_local.explain import explain

    plan = explain(
        connection,
        sweep_candidates_statement(),
        {"grace_minutes": 30, "lease_minutes": 60, "retention_minutes": 5760, "limit": 50},
    )

    assert "roadmap_metadata_sweep_candidates" in plan, plan
    assert "Seq Scan on roadmap_metadata" not in plan, plan


def test_openapi_document_in_the_repo_is_current() -> None:
    from content_retry.api import openapi_document
    from tests.conftest import REPO_ROOT

    committed = (REPO_ROOT / "docs" / "openapi.json").read_text()

    assert committed == openapi_document(), "run: content-retry openapi > docs/openapi.json"


def test_a_roadmap_the_sweep_cannot_plan_does_not_starve_the_others(
    connection: Connection,
    queues: Queues,
    detect: DetectDependencies,
) -> None:
    # GIVEN a roadmap the judge plans nothing for although its framework looks
    # unfinished ("processing" over completed rows: the platform may be at work),
    # and one that needs work; the sweep takes one roadmap per run
    stuck = ConceptSeed(
        "c1",
        "A",
        "a",
        {
            "content_status": "processing",
            "resources_status": "completed",
            "quiz_status": "completed",
        },
    )
    insert_roadmap(connection, "stuck", "u-1", single_module_framework([stuck]), age_minutes=600)
    for content_type in ("tutorial", "resources", "quiz"):
        from content_retry.content_types import ContentType

        insert_content_row(connection, ContentType(content_type), "stuck", "c1", "completed")
    lost = ConceptSeed("c1", "B", "b", {"content_status": None})
    insert_roadmap(connection, "needs-work", "u-2", single_module_framework([lost]), age_minutes=60)
    connection.commit()
    deps = detect
    deps.settings = deps.settings.model_copy(update={"sweep_max_roadmaps": 1})

    # WHEN the sweep runs twice
    first, second = sweep(deps), sweep(deps)

    # THEN the stuck one is judged once and waits its lease; the other is planned
    assert (first.roadmaps_scanned, first.roadmaps_planned) == (1, 0)
    assert (second.roadmaps_scanned, second.roadmaps_planned) == (1, 1)
    assert {json.loads(m["Body"])["roadmap_id"] for m in queues.receive_all()} == {"needs-work"}


def test_the_sweep_finds_a_failed_latest_row_the_framework_calls_completed(
    connection: Connection,
    queues: Queues,
    detect: DetectDependencies,
) -> None:
    # GIVEN a roadmap whose framework says every item completed, but whose
    # latest quiz row failed: framework status alone never decides
    from content_retry.content_types import ContentType

    done = {
        "content_status": "completed",
        "resources_status": "completed",
        "quiz_status": "completed",
    }
    insert_roadmap(
        connection,
        "r1",
        "u-1",
        single_module_framework([ConceptSeed("c1", "A", "a", done)]),
        age_minutes=600,
    )
    insert_content_row(connection, ContentType.TUTORIAL, "r1", "c1", "completed")
    insert_content_row(connection, ContentType.RESOURCES, "r1", "c1", "completed")
    insert_content_row(connection, ContentType.QUIZ, "r1", "c1", "failed")
    connection.commit()

    outcome = sweep(detect)

    assert (outcome.roadmaps_planned, outcome.retried_count) == (1, 1)
    message = json.loads(queues.receive_all()[0]["Body"])
    assert message["items"] == [{"content_type": "quiz", "reason": "failed"}]
