"""The ledger's statements on a real PostgreSQL: claims written with their task,
released when unsent, expired after the queue's retention (through the partial
index), costs and outcomes noted on the message's own rows only, and the paid
calls the retry plan's estimate reads."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, event, text

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.costs import ItemCost
from content_retry.plan.models import ConceptPlan, PlannedItem, Reason, RetryPlan
from content_retry.repositories import claims, tasks
from content_retry.statuses import ItemStatus
from content_retry_local.explain import explain
from content_retry_local.seed import insert_roadmap


def _plan(roadmap_id: str, user_id: str, concept_ids: list[str]) -> RetryPlan:
    return RetryPlan(
        roadmap_id=roadmap_id,
        user_id=user_id,
        content_types=(ContentType.TUTORIAL,),
        concepts=[
            ConceptPlan(
                Concept(concept_id=concept_id, name=concept_id),
                [PlannedItem(ContentType.TUTORIAL, Reason.MISSING)],
            )
            for concept_id in concept_ids
        ],
    )


def _items(connection: Connection, task_id: str) -> dict[str, Any]:
    rows = connection.execute(
        text(
            "SELECT concept_id, status, last_error, llm_calls, input_tokens, sent_at "
            "FROM retry_items WHERE task_id = CAST(:t AS uuid)"
        ),
        {"t": task_id},
    )
    return {row.concept_id: row for row in rows}


def test_a_task_claims_its_items_and_releases_the_unsent_in_one_statement(
    connection: Connection,
) -> None:
    # GIVEN a task of three planned items, one of them sent
    insert_roadmap(connection, "r1", "u-1", {"stages": []})
    task_id = tasks.create_task(
        connection, _plan("r1", "u-1", ["c1", "c2", "c3"]), trigger="api", preferences={"a": 1}
    )
    claims.mark_sent(connection, task_id, ["c1"])

    # WHEN the other two could not be sent (c1 named too: it is no longer queued)
    claims.record_outcomes(
        connection,
        [claims.ItemKey(task_id, "c1", ContentType.TUTORIAL)],
        status=ItemStatus.RUNNING,
        error=None,
        roadmap_id="r1",
        user_id="u-1",
    )
    released = tasks.release_unsent(connection, task_id, ["c1", "c2", "c3", "c2"], "boom")

    # THEN the queued two are failed with the send's error, and the task says so
    assert released == 2
    items = _items(connection, task_id)
    assert items["c1"].status == "running"
    assert items["c1"].sent_at is not None
    assert {items[c].status for c in ("c2", "c3")} == {"failed"}
    assert items["c2"].last_error == "message not sent: boom"
    task = connection.execute(
        text("SELECT last_error, preferences FROM retry_tasks WHERE task_id = CAST(:t AS uuid)"),
        {"t": task_id},
    ).one()
    assert task.last_error == "3 message(s) could not be sent: boom"
    assert task.preferences == {"a": 1}


def test_costs_and_outcomes_change_the_messages_own_rows_only(connection: Connection) -> None:
    # GIVEN a task of u-1's roadmap r1
    insert_roadmap(connection, "r1", "u-1", {"stages": []})
    task_id = tasks.create_task(
        connection, _plan("r1", "u-1", ["c1"]), trigger="api", preferences={}
    )
    key = claims.ItemKey(task_id, "c1", ContentType.TUTORIAL)
    cost = {key: ItemCost(llm_calls=1, input_tokens=10, output_tokens=20)}

    # WHEN messages naming another owner or roadmap note costs and outcomes
    claims.add_costs(connection, cost, roadmap_id="r1", user_id="u-2")
    claims.add_costs(connection, cost, roadmap_id="r2", user_id="u-1")
    changed = claims.record_outcomes(
        connection, [key], status=ItemStatus.FAILED, error="x", roadmap_id="r1", user_id="u-2"
    )

    # THEN nothing changed; the message's own notes do change it
    assert changed == set()
    assert (
        _items(connection, task_id)["c1"].llm_calls,
        _items(connection, task_id)["c1"].status,
    ) == (
        0,
        "queued",
    )
    claims.add_costs(connection, cost, roadmap_id="r1", user_id="u-1")
    changed = claims.record_outcomes(
        connection, [key], status=ItemStatus.FAILED, error="x", roadmap_id="r1", user_id="u-1"
    )
    assert changed == {key}
    item = _items(connection, task_id)["c1"]
    assert (item.status, item.llm_calls, item.input_tokens) == ("failed", 1, 10)
    # ...and a failed item keeps its status whatever a late note says
    assert not claims.record_outcomes(
        connection, [key], status=ItemStatus.RUNNING, error=None, roadmap_id="r1", user_id="u-1"
    )


def _seed_ledger(connection: Connection, *, total: int, waiting: int) -> None:
    """One task of ``total`` tutorial items sent five days ago: ``waiting`` of
    them still queued, the rest succeeded; the succeeded ones paid one call each."""
    insert_roadmap(connection, "r1", "u-1", {"stages": []})
    task_id = tasks.create_task(connection, _plan("r1", "u-1", []), trigger="sweep", preferences={})
    connection.execute(
        text(
            "INSERT INTO retry_items (task_id, roadmap_id, concept_id, content_type, reason, "
            "  status, sent_at, updated_at, llm_calls, input_tokens, output_tokens) "
            "SELECT CAST(:t AS uuid), 'r1', 'c' || n, 'tutorial', 'missing', "
            "  CASE WHEN n <= :waiting THEN 'queued' ELSE 'succeeded' END, "
            "  now() - interval '5 days', now() - n * interval '1 second', "
            "  CASE WHEN n <= :waiting THEN 0 ELSE 1 END, n, 2 * n "
            "FROM generate_series(1, :total) AS n"
        ),
        {"t": task_id, "waiting": waiting, "total": total},
    )
    connection.execute(text("ANALYZE retry_items"))


def test_claims_past_the_queues_retention_expire_through_the_partial_index(
    connection: Connection,
) -> None:
    # GIVEN 5,000 items sent five days ago, 10 of them still queued
    _seed_ledger(connection, total=5000, waiting=10)
    terms = {"retention_minutes": 4 * 24 * 60, "expiry_error": "x"}

    # WHEN the sweep expires the claims the queue's retention has dropped
    plan = explain(connection, claims._EXPIRE_PAST_RETENTION, terms)
    sent: list[str] = []
    event.listen(connection, "before_cursor_execute", lambda *args: sent.append(args[2]))
    expired = claims.expire_claims_past_retention(connection, retention_minutes=4 * 24 * 60)

    # THEN the 10 are failed with the reason, found through the index of claiming rows
    assert expired == 10
    assert "retry_items_waiting_since" in plan, plan
    # (the statuses written out, as the index's predicate has them, whatever plan is cached)
    assert "retry_items.status IN ('queued', 'running')" in sent[0], sent
    assert claims.expire_claims_past_retention(connection, retention_minutes=4 * 24 * 60) == 0
    errors = connection.execute(
        text("SELECT DISTINCT last_error FROM retry_items WHERE status = 'failed'")
    ).scalars()
    assert [error.startswith("its message was in the retry queue") for error in errors] == [True]


def test_the_estimate_reads_a_content_types_recent_paid_calls_through_their_index(
    connection: Connection,
) -> None:
    # GIVEN 5,000 tutorial items, all but 10 paid one call each
    _seed_ledger(connection, total=5000, waiting=10)

    # WHEN the estimate reads the 100 most recently updated paid ones
    found = claims.recent_paid_calls(connection, [ContentType.TUTORIAL, ContentType.QUIZ], 100)
    plan = explain(
        connection,
        claims._recorded_tokens_statement(),
        {"content_types": ["tutorial"], "recent": 100},
    )

    # THEN they are items 11..110 (the newest paid), read through the paid calls' index
    assert found == {
        ContentType.TUTORIAL: claims.PaidCalls(100, sum(range(11, 111)), 2 * sum(range(11, 111)))
    }
    assert "retry_items_paid_by_type" in plan, plan
