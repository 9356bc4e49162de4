"""The one judge, on a real PostgreSQL: every item state, the seed's scenario, scale."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from sqlalchemy import Connection, text

from content_retry.content_types import STORAGE, ContentType, UnknownContentTypeError
from content_retry.plan import RoadmapNotFoundError
from content_retry.plan.build import build_retry_plan
from content_retry_local.seed import (
    ConceptSeed,
    insert_content_row,
    insert_roadmap,
    old_status_only_rule,
    seed_scenario,
    single_module_framework,
)
from tests.rule_table import RULE

LEASE_MINUTES = 60
FRAMEWORK_STATUSES = (None, "pending", "processing", "completed", "failed")
TABLE_STATES = (
    "no_row",
    "latest_completed",
    "latest_failed",
    "older_completed_under_newer_failed",
    "only_non_latest_completed",
)
CLAIMS = ("none", "live", "expired")


# What each table state shows the judge as the item's latest row (tests/rule_table.py).
LATEST_ROW = {
    "no_row": "none",
    "latest_completed": "completed",
    "latest_failed": "failed",
    "older_completed_under_newer_failed": "failed",
    "only_non_latest_completed": "none",
}


def insert_table_state(
    connection: Connection, content_type: ContentType, roadmap_id: str, concept_id: str, state: str
) -> None:
    rows: dict[str, list[tuple[str, int, bool]]] = {
        "no_row": [],
        "latest_completed": [("completed", 1, True)],
        "latest_failed": [("failed", 1, True)],
        "older_completed_under_newer_failed": [("completed", 1, False), ("failed", 2, True)],
        "only_non_latest_completed": [("completed", 1, False)],
    }
    for status, version, is_latest in rows[state]:
        insert_content_row(
            connection,
            content_type,
            roadmap_id,
            concept_id,
            status,
            version=version,
            is_latest=is_latest,
        )


def insert_claim(
    connection: Connection,
    roadmap_id: str,
    concept_id: str,
    content_type: ContentType,
    *,
    age_minutes: int,
    status: str = "queued",
) -> None:
    task_id = connection.execute(
        text(
            "INSERT INTO retry_tasks (roadmap_id, user_id, trigger) "
            "VALUES (:roadmap_id, 'u-1', 'api') RETURNING task_id"
        ),
        {"roadmap_id": roadmap_id},
    ).scalar_one()
    connection.execute(
        text(
            "INSERT INTO retry_items (task_id, concept_id, content_type, roadmap_id, reason, "
            "status, claimed_at) VALUES (:task_id, :concept_id, :content_type, :roadmap_id, "
            "'missing', :status, now() - make_interval(mins => :age))"
        ),
        {
            "task_id": task_id,
            "concept_id": concept_id,
            "content_type": content_type.value,
            "roadmap_id": roadmap_id,
            "status": status,
            "age": age_minutes,
        },
    )


def framework_status_of(connection: Connection, roadmap_id: str, concept_id: str, key: str) -> Any:
    framework = connection.execute(
        text("SELECT framework_data FROM roadmap_metadata WHERE roadmap_id = :r"), {"r": roadmap_id}
    ).scalar_one()
    for stage in framework["stages"]:
        for module in stage["modules"]:
            for concept in module["concepts"]:
                if concept["concept_id"] == concept_id:
                    return concept.get(key)
    raise AssertionError(f"{concept_id} not in framework_data")


@pytest.mark.parametrize("content_type", list(ContentType), ids=str)
@pytest.mark.parametrize(
    ("framework_status", "table_state", "claim"),
    list(itertools.product(FRAMEWORK_STATUSES, TABLE_STATES, CLAIMS)),
    ids=lambda value: str(value),
)
def test_every_item_state_gets_the_contract_decision(
    connection: Connection,
    content_type: ContentType,
    framework_status: str | None,
    table_state: str,
    claim: str,
) -> None:
    # GIVEN one concept in this state, beside one whose other content types are
    # untouched (only the content type under test is asked for)
    status_key = STORAGE[content_type].status_key
    concept = ConceptSeed("c1", "Caching", "Cache what repeats.", {status_key: framework_status})
    insert_roadmap(connection, "r1", "u-1", single_module_framework([concept]))
    insert_table_state(connection, content_type, "r1", "c1", table_state)
    if claim != "none":
        age = 1 if claim == "live" else LEASE_MINUTES + 1
        insert_claim(connection, "r1", "c1", content_type, age_minutes=age)
    connection.commit()

    # WHEN the judge plans this content type
    plan = build_retry_plan(
        connection, "r1", [content_type.value], claim_lease_minutes=LEASE_MINUTES
    )
    connection.commit()

    # THEN the item is planned with the contract's reason, or left out, and a
    # framework status that contradicts a completed latest row is repaired
    reason, status_after = RULE[(framework_status, LATEST_ROW[table_state], claim)]
    planned = [(c.concept_id, i.content_type.value, i.reason.value) for c, i in plan.items]
    assert planned == ([("c1", content_type.value, reason)] if reason else [])
    assert framework_status_of(connection, "r1", "c1", status_key) == status_after


def test_a_finished_claim_does_not_hold_the_item_back(connection: Connection) -> None:
    # GIVEN a tutorial whose last task ended in failure a minute ago
    insert_roadmap(connection, "r1", "u-1", single_module_framework([ConceptSeed("c1", "A", "a")]))
    insert_claim(connection, "r1", "c1", ContentType.TUTORIAL, age_minutes=1, status="failed")
    connection.commit()

    # WHEN / THEN it is planned again: only queued or running items hold claims
    plan = build_retry_plan(connection, "r1", ["tutorial"])
    assert [(c.concept_id, i.reason.value) for c, i in plan.items] == [("c1", "missing")]


def test_seed_scenario_plans_the_21_lost_tutorials_the_old_rule_missed(
    connection: Connection,
) -> None:
    # GIVEN the seed: 31 concepts, 10 tutorials completed, 21 never saved with
    # framework statuses null or processing, none "failed"
    scenario = seed_scenario(connection, other_failures=True)
    connection.commit()
    framework = connection.execute(
        text("SELECT framework_data FROM roadmap_metadata WHERE roadmap_id = :r"),
        {"r": scenario.roadmap_id},
    ).scalar_one()

    # WHEN the judge plans tutorials
    plan = build_retry_plan(connection, scenario.roadmap_id, ["tutorial"], owner=scenario.user_id)

    # THEN exactly the 21 lost tutorials are planned, as missing or stale...
    assert sorted(c.concept_id for c, _ in plan.items) == sorted(scenario.lost_tutorials)
    assert plan.item_count == 21
    assert plan.count_by_reason() == {"missing": 11, "failed": 0, "stale": 10}
    assert {c.stage for c, _ in plan.items} >= {"Optimising the model calls"}
    assert all(c.name and c.description and c.module for c, _ in plan.items)
    # ...while the old worker's status-only rule finds none of them
    assert old_status_only_rule(framework, "content_status") == []


def test_seed_scenario_with_every_content_type(connection: Connection) -> None:
    scenario = seed_scenario(connection, other_failures=True)
    connection.commit()

    plan = build_retry_plan(connection, scenario.roadmap_id)

    assert plan.count_by_type() == {"tutorial": 21, "resources": 2, "quiz": 3}
    assert plan.count_by_reason() == {"missing": 11, "failed": 5, "stale": 10}
    # one message per concept: a concept with a lost tutorial and a failed quiz is one plan entry
    assert len(plan.concepts) == len({c.concept_id for c, _ in plan.items})
    c14 = next(p for p in plan.concepts if p.concept.concept_id == "c14")
    assert [(i.content_type.value, i.reason.value) for i in c14.items] == [
        ("tutorial", "stale"),
        ("quiz", "failed"),
    ]


@pytest.mark.parametrize(
    ("content_types", "message_parts"),
    [
        (["video"], ["'video'", "tutorial, resources, quiz"]),
        (["tutorial", "Quiz"], ["'Quiz'", "tutorial, resources, quiz"]),
        ([], ["empty", "tutorial, resources, quiz"]),
        ([""], ["''"]),
    ],
)
def test_bad_content_types_are_named_with_the_valid_ones(
    connection: Connection, content_types: list[str], message_parts: list[str]
) -> None:
    seed_scenario(connection)
    connection.commit()

    with pytest.raises(UnknownContentTypeError) as raised:
        build_retry_plan(connection, "agent-performance-optimization-x5y9z2q8", content_types)
    for part in message_parts:
        assert part in str(raised.value)


def test_content_type_filter_plans_only_the_types_asked_for(connection: Connection) -> None:
    scenario = seed_scenario(connection, other_failures=True)
    connection.commit()

    quizzes = build_retry_plan(connection, scenario.roadmap_id, ["quiz"])
    both = build_retry_plan(connection, scenario.roadmap_id, ["quiz", "resources", "quiz"])

    assert {i.content_type.value for _, i in quizzes.items} == {"quiz"}
    assert sorted(c.concept_id for c, _ in quizzes.items) == sorted(scenario.failed_quizzes)
    assert both.count_by_type() == {"resources": 2, "quiz": 3}


def test_unknown_roadmap_and_another_users_roadmap_are_both_not_found(
    connection: Connection,
) -> None:
    seed_scenario(connection)
    connection.commit()

    with pytest.raises(RoadmapNotFoundError):
        build_retry_plan(connection, "no-such-roadmap")
    with pytest.raises(RoadmapNotFoundError):
        build_retry_plan(
            connection, "agent-performance-optimization-x5y9z2q8", owner="someone-else"
        )


def test_malformed_framework_parts_are_skipped_not_fatal(connection: Connection) -> None:
    framework = {
        "stages": [
            {"name": "broken", "modules": "not a list"},
            {"name": "ok", "modules": [{"name": "m", "concepts": [{"concept_id": "c1"}, 7, {}]}]},
        ]
    }
    insert_roadmap(connection, "r1", "u-1", framework)
    connection.commit()

    plan = build_retry_plan(connection, "r1", ["tutorial"])

    assert [(c.concept_id, c.stage, c.module) for c, _ in plan.items] == [("c1", "ok", "m")]


def test_concepts_whose_ids_no_message_can_carry_are_left_out(connection: Connection) -> None:
    # An empty id or one over MAX_ID_LENGTH would make a message the worker
    # refuses: the judge leaves the concept out and plans the others.
    concepts = [{"concept_id": ""}, {"concept_id": "x" * 1_025}, {"concept_id": "c1"}]
    framework = {"stages": [{"name": "s", "modules": [{"name": "m", "concepts": concepts}]}]}
    insert_roadmap(connection, "r1", "u-1", framework)
    connection.commit()

    plan = build_retry_plan(connection, "r1")

    assert {concept.concept_id for concept, _ in plan.items} == {"c1"}
    assert plan.item_count == 3


def test_a_2000_concept_roadmap_is_planned_in_at_most_3_queries(
    connection: Connection, count_statements: Any
) -> None:
    # GIVEN 2,000 concepts: half with completed tutorials whose status drifted
    # to "failed" (so the repair runs too), half never saved
    concepts = [
        ConceptSeed(f"c{n}", f"Concept {n}", "d", {"content_status": "failed" if n % 2 else None})
        for n in range(2000)
    ]
    insert_roadmap(connection, "big", "u-1", single_module_framework(concepts))
    connection.execute(
        text(
            "INSERT INTO tutorials (roadmap_id, concept_id, content_status) "
            "SELECT 'big', 'c' || n, 'completed' FROM generate_series(1, 1999, 2) AS n"
        )
    )
    connection.commit()

    # WHEN the judge plans every content type
    with count_statements:
        plan = build_retry_plan(connection, "big")
    connection.commit()

    # THEN three statements did it all, and the repair happened
    assert count_statements.count <= 3, count_statements.statements
    assert plan.count_by_type() == {"tutorial": 1000, "resources": 2000, "quiz": 2000}
    assert plan.repaired_count == 1000
    assert framework_status_of(connection, "big", "c1", "content_status") == "completed"
    assert framework_status_of(connection, "big", "c0", "content_status") is None


def test_repair_keeps_every_other_field_of_framework_data(connection: Connection) -> None:
    concept = ConceptSeed("c1", "A", "a", {"content_status": "failed", "quiz_status": "processing"})
    framework = single_module_framework([concept, ConceptSeed("c2", "B", "b")])
    framework["stages"][0]["extra"] = {"kept": True}
    insert_roadmap(connection, "r1", "u-1", framework)
    insert_content_row(connection, ContentType.TUTORIAL, "r1", "c1", "completed")
    connection.commit()

    build_retry_plan(connection, "r1", ["tutorial"])
    connection.commit()

    after = connection.execute(
        text("SELECT framework_data FROM roadmap_metadata WHERE roadmap_id = 'r1'")
    ).scalar_one()
    framework["stages"][0]["modules"][0]["concepts"][0]["content_status"] = "completed"
    assert json.dumps(after, sort_keys=True) == json.dumps(framework, sort_keys=True)
