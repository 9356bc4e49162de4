"""The retry plan before paying for it: ``GET /roadmaps/{id}/retry-plan``.

The retry's own judge, claiming, sending and writing nothing; a retry right
after plans exactly ``retry_count`` items. Real PostgreSQL, moto, the handler.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from content_retry.content_types import ContentType
from content_retry.estimates import DEFAULT_TOKENS_PER_CALL
from content_retry.generators import Usage
from content_retry.retries import DetectDependencies
from content_retry_local.seed import SEED_ROADMAP_ID, seed_scenario
from functions.detect.app import lambda_handler as detect_handler
from functions.generate.app import lambda_handler as generate_handler
from tests.conftest import FakeLambdaContext, Queues
from tests.support import CountingGenerator, detect_deps, load_event, sqs_event, worker_deps


@pytest.fixture
def detect(queues: Queues, db: Engine) -> DetectDependencies:
    return detect_deps(db, queues.sqs)


def plan_event(
    query: dict[str, str] | None = None, *, caller: str | None = "u-42"
) -> dict[str, Any]:
    event = copy.deepcopy(load_event("api-retry.json"))
    event.update(
        resource="/roadmaps/{roadmap_id}/retry-plan",
        path=f"/roadmaps/{SEED_ROADMAP_ID}/retry-plan",
        httpMethod="GET",
        body=None,
        queryStringParameters=query,
        multiValueQueryStringParameters={k: [v] for k, v in (query or {}).items()} or None,
    )
    if caller is None:
        event["requestContext"].pop("authorizer", None)
    else:
        event["requestContext"]["authorizer"] = {"claims": {"sub": caller}}
    return event


def ask(
    event: dict[str, Any], detect: DetectDependencies, context: FakeLambdaContext
) -> tuple[int, Any]:
    response = detect_handler(event, context, deps=detect)
    return response["statusCode"], json.loads(response["body"])


def nothing_written(db: Engine) -> tuple[int, int]:
    with db.connect() as connection:
        return (
            connection.execute(text("SELECT count(*) FROM retry_tasks")).scalar_one(),
            connection.execute(text("SELECT count(*) FROM retry_items")).scalar_one(),
        )


def test_the_plan_names_what_a_retry_would_plan_and_claims_nothing(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
) -> None:
    # GIVEN the seed's incident: 21 tutorials lost
    seed_scenario(connection)
    connection.commit()

    # WHEN the owner asks for the tutorials' plan
    status, view = ask(plan_event({"content_types": "tutorial"}), detect, lambda_context)

    # THEN it lists the 21 items with their reasons, estimates them at the
    # default tokens (the ledger has none yet), and claims and sends nothing
    assert status == 200
    assert view["retry_count"] == 21
    assert {item["reason"] for item in view["items"]} == {"missing", "stale"}
    assert view["held"] == []
    tokens_in, tokens_out = DEFAULT_TOKENS_PER_CALL[ContentType.TUTORIAL]
    assert view["estimate"] == {
        "llm_calls": 21,
        "input_tokens": round(21 * tokens_in),
        "output_tokens": round(21 * tokens_out),
        "cost_usd": round((21 * tokens_in * 0.8 + 21 * tokens_out * 4.0) / 1e6, 4),
    }
    assert nothing_written(db) == (0, 0)
    assert queues.receive_all() == []

    # WHEN a retry follows
    retry = detect_handler(load_event("api-retry.json"), lambda_context, deps=detect)

    # THEN it plans exactly the items the plan named
    assert json.loads(retry["body"])["retried_count"] == view["retry_count"]

    # ... and the plan now holds them apart, under the retry's live claims
    status, after = ask(plan_event({"content_types": "tutorial"}), detect, lambda_context)
    assert after["retry_count"] == 0
    assert len(after["held"]) == 21
    assert not any(item["waiting_for_redrive"] for item in after["held"])


def test_the_estimate_follows_the_tokens_the_ledger_recorded(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
) -> None:
    # GIVEN tutorials paid for at 100 input and 400 output tokens a call
    seed_scenario(connection)
    connection.commit()
    detect_handler(load_event("api-retry.json"), lambda_context, deps=detect)
    bodies = [m["Body"] for m in queues.receive_all()][:4]
    generator = CountingGenerator(usage=Usage(input_tokens=100, output_tokens=400))
    generate_handler(sqs_event(bodies), lambda_context, deps=worker_deps(db, queues.sqs, generator))

    # WHEN the plan of every content type is asked for
    status, view = ask(plan_event(), detect, lambda_context)

    # THEN the tutorials left are priced at what the ledger recorded, the
    # other types at their defaults
    assert status == 200
    counts = {t: sum(1 for i in view["items"] if i["content_type"] == t.value) for t in ContentType}
    expected_in = 100 * counts[ContentType.TUTORIAL] + sum(
        n * DEFAULT_TOKENS_PER_CALL[t][0]
        for t, n in counts.items()
        if t is not ContentType.TUTORIAL
    )
    assert view["estimate"]["input_tokens"] == round(expected_in)
    assert view["estimate"]["llm_calls"] == view["retry_count"] == sum(counts.values())


@pytest.mark.parametrize(
    ("query", "caller", "status", "names"),
    [
        ({"content_types": "tutorial,poem"}, "u-42", 422, "tutorial"),
        ({"content_types": ""}, "u-42", 422, "tutorial"),
        (None, "someone-else", 404, None),
        (None, None, 401, None),
    ],
    ids=["unknown-type", "empty-list", "not-the-owner", "no-identity"],
)
def test_the_plan_refuses_what_the_retry_refuses(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
    query: dict[str, str] | None,
    caller: str | None,
    status: int,
    names: str | None,
) -> None:
    seed_scenario(connection)
    connection.commit()

    answered, body = ask(plan_event(query, caller=caller), detect, lambda_context)

    assert answered == status
    if names is not None:
        assert names in body["message"]
    assert nothing_written(db) == (0, 0)


def test_the_command_prints_the_same_plan(
    connection: Connection,
    queues: Queues,
    db: Engine,
    detect: DetectDependencies,
    lambda_context: FakeLambdaContext,
    database_url: str,
) -> None:
    import subprocess
    import sys

    from tests.functional.test_local_runtime import cli_environment

    seed_scenario(connection)
    connection.commit()
    _, view = ask(plan_event({"content_types": "tutorial"}), detect, lambda_context)

    run = subprocess.run(
        [
            *(sys.executable, "-m", "content_retry_local.cli", "plan", SEED_ROADMAP_ID),
            *("--content-types", "tutorial"),
        ],
        env=cli_environment({"DATABASE_URL": database_url}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == view
    assert nothing_written(db) == (0, 0)
