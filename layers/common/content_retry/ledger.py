"""The pipeline's own records: retry tasks and their item ledger.

Every function takes the caller's session and never commits: the unit of work
that calls it owns the transaction. Each is one SQL statement.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from content_retry.plan.models import RetryPlan

# Longest error text kept on an item or task; the full error goes to the logs.
ERROR_TEXT_LIMIT = 2_000


def _clip(error: str) -> str:
    return error if len(error) <= ERROR_TEXT_LIMIT else error[: ERROR_TEXT_LIMIT - 1] + "…"


def create_task(
    session: Session, plan: RetryPlan, *, trigger: str, preferences: dict[str, Any]
) -> str:
    """Record a task and claim every planned item for it; returns the task id.

    The claims are ledger rows in status ``queued``: from the commit on, the
    judge leaves these items out until they end or the claim lease expires.
    """
    task_id: str = session.execute(
        text(
            "INSERT INTO retry_tasks (roadmap_id, user_id, trigger, preferences, planned_count) "
            "VALUES (:roadmap_id, :user_id, :trigger, CAST(:preferences AS jsonb), :planned) "
            "RETURNING task_id"
        ),
        {
            "roadmap_id": plan.roadmap_id,
            "user_id": plan.user_id,
            "trigger": trigger,
            "preferences": json.dumps(preferences),
            "planned": plan.item_count,
        },
    ).scalar_one()
    items = plan.items
    # One statement for any number of items: arrays unnested server-side.
    session.execute(
        text(
            "INSERT INTO retry_items (task_id, roadmap_id, concept_id, content_type, reason) "
            "SELECT :task_id, :roadmap_id, item.concept_id, item.content_type, item.reason "
            "FROM unnest(CAST(:concept_ids AS text[]), CAST(:content_types AS text[]), "
            "CAST(:reasons AS text[])) AS item(concept_id, content_type, reason)"
        ),
        {
            "task_id": task_id,
            "roadmap_id": plan.roadmap_id,
            "concept_ids": [concept.concept_id for concept, _ in items],
            "content_types": [item.content_type.value for _, item in items],
            "reasons": [item.reason.value for _, item in items],
        },
    )
    return str(task_id)


def release_unsent(session: Session, task_id: str, concept_ids: Iterable[str], error: str) -> int:
    """Release the claims of concepts whose messages could not be sent.

    Their items become ``failed`` with the send error, so the next request or
    sweep plans them again, and the task records what was left unsent.
    Returns the number of items released.
    """
    ids = sorted(set(concept_ids))
    if not ids:
        return 0
    released: int = session.execute(
        text(
            f"WITH {_LOCK_TASK} UPDATE retry_items "  # noqa: S608 - constant fragment
            "SET status = 'failed', last_error = :error, updated_at = now() "
            "WHERE task_id = :task_id AND concept_id = ANY(CAST(:concept_ids AS text[])) "
            "AND status = 'queued' AND EXISTS (SELECT 1 FROM task)"
        ),
        {"task_id": task_id, "concept_ids": ids, "error": _clip(f"message not sent: {error}")},
    ).rowcount  # type: ignore[attr-defined]
    session.execute(
        text("UPDATE retry_tasks SET last_error = :error WHERE task_id = :task_id"),
        {"task_id": task_id, "error": _clip(f"{len(ids)} message(s) could not be sent: {error}")},
    )
    refresh_task_status(session, task_id)
    return released


# Taken by every statement that changes a task's items, before the task's
# status is recomputed: writers of one task's items then run one after the
# other, and each recomputation (a new statement, so a new snapshot) sees every
# item the others changed. Without it two workers finishing a task's last two
# items at once would each see the other's item still running.
_LOCK_TASK = "task AS (SELECT 1 FROM retry_tasks WHERE task_id = :task_id FOR UPDATE)"


def refresh_task_status(session: Session, task_id: str) -> None:
    """Derive a task's status from its items; call after changing them.

    queued: no item started; running: some started, some still open;
    completed: every item succeeded; completed_with_failures: all ended, some not well.
    """
    session.execute(
        text(
            "UPDATE retry_tasks AS t SET status = derived.status, updated_at = now() "
            "FROM (SELECT CASE "
            "  WHEN bool_and(status = 'queued') THEN 'queued' "
            "  WHEN bool_or(status IN ('queued', 'running')) THEN 'running' "
            "  WHEN bool_and(status = 'succeeded') THEN 'completed' "
            "  ELSE 'completed_with_failures' END AS status "
            "  FROM retry_items WHERE task_id = :task_id) AS derived "
            "WHERE t.task_id = :task_id AND derived.status IS NOT NULL "
            "AND t.status <> derived.status"
        ),
        {"task_id": task_id},
    )


@dataclass(frozen=True)
class ItemStatus:
    concept_id: str
    content_type: str
    reason: str
    status: str
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class TaskStatus:
    task_id: str
    roadmap_id: str
    user_id: str
    status: str
    items: list[ItemStatus]

    def counts(self) -> dict[str, int]:
        """Items by state: queued (includes running), succeeded, failed, dead_lettered."""
        counts = {"queued": 0, "succeeded": 0, "failed": 0, "dead_lettered": 0}
        for item in self.items:
            counts["queued" if item.status == "running" else item.status] += 1
        return counts


def task_status(session: Session, task_id: str) -> TaskStatus | None:
    """A task with all its items, or None when there is no such task."""
    rows = session.execute(
        text(
            "SELECT t.task_id, t.roadmap_id, t.user_id, t.status, i.concept_id, i.content_type, "
            "i.reason, i.status AS item_status, i.attempts, i.last_error "
            "FROM retry_tasks AS t LEFT JOIN retry_items AS i ON i.task_id = t.task_id "
            "WHERE t.task_id = CAST(:task_id AS uuid) "
            "ORDER BY i.concept_id, array_position(ARRAY['tutorial', 'resources', 'quiz'], "
            "i.content_type)"
        ),
        {"task_id": task_id},
    ).all()
    if not rows:
        return None
    first = rows[0]
    return TaskStatus(
        task_id=str(first.task_id),
        roadmap_id=first.roadmap_id,
        user_id=first.user_id,
        status=first.status,
        items=[
            ItemStatus(
                concept_id=row.concept_id,
                content_type=row.content_type,
                reason=row.reason,
                status=row.item_status,
                attempts=row.attempts,
                last_error=row.last_error,
            )
            for row in rows
            if row.concept_id is not None
        ],
    )
