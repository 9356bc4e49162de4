"""The pipeline's own records: retry tasks and their item ledger.

Every function takes the caller's session and never commits: the unit of work
that calls it owns the transaction. Each is one SQL statement.

A task's status is derived from its items when read, never stored, so the
workers that finish a task's last items at the same moment cannot race to
maintain it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from content_retry.content_types import STORAGE, ContentType
from content_retry.plan.models import RetryPlan

# Longest error text kept on an item or task; the full error goes to the logs.
ERROR_TEXT_LIMIT = 2_000


def clip_error(error: str) -> str:
    return error if len(error) <= ERROR_TEXT_LIMIT else error[: ERROR_TEXT_LIMIT - 1] + "…"


def create_task(
    session: Session, plan: RetryPlan, *, trigger: str, preferences: dict[str, Any]
) -> str:
    """Record a task and claim every planned item for it; returns the task id.

    The claims are ledger rows in status ``queued``: from the commit on, the
    judge leaves these items out until they end or the claim lease expires.
    """
    task_id = session.execute(
        text(
            "INSERT INTO retry_tasks (roadmap_id, user_id, trigger, preferences) "
            "VALUES (:roadmap_id, :user_id, :trigger, CAST(:preferences AS jsonb)) "
            "RETURNING task_id"
        ),
        {
            "roadmap_id": plan.roadmap_id,
            "user_id": plan.user_id,
            "trigger": trigger,
            "preferences": json.dumps(preferences),
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
            "WITH released AS ("
            "  UPDATE retry_items SET status = 'failed', last_error = :error, updated_at = now() "
            "  WHERE task_id = :task_id AND concept_id = ANY(CAST(:concept_ids AS text[])) "
            "    AND status = 'queued' RETURNING 1) "
            "UPDATE retry_tasks SET last_error = :task_error, updated_at = now() "
            "WHERE task_id = :task_id RETURNING (SELECT count(*) FROM released)"
        ),
        {
            "task_id": task_id,
            "concept_ids": ids,
            "error": clip_error(f"message not sent: {error}"),
            "task_error": clip_error(f"{len(ids)} message(s) could not be sent: {error}"),
        },
    ).scalar_one()
    return released


@dataclass(frozen=True)
class ItemKey:
    """The deduplication key of an item: never the SQS message id."""

    task_id: str
    concept_id: str
    content_type: ContentType


# Per content type: does a completed latest row exist? The judge planned the
# item because none did, so one now means someone else finished it.
_COMPLETED_NOW = " ".join(
    f"WHEN '{content_type.value}' THEN EXISTS (SELECT 1 FROM {STORAGE[content_type].table} AS c "  # noqa: S608  # nosec B608
    "WHERE c.roadmap_id = i.roadmap_id AND c.concept_id = i.concept_id AND c.is_latest "
    "AND c.content_status = 'completed')"
    for content_type in ContentType
)

# "updated" leaves ended items (succeeded, failed) as they are: a redelivery
# (a sibling item failed transiently) neither saves nor pays the LLM for them.
_START_ITEMS = text(
    f"""
WITH current AS (
  SELECT i.task_id, i.concept_id, i.content_type, i.status,
         CASE i.content_type {_COMPLETED_NOW} ELSE false END AS completed_since_task
  FROM retry_items AS i
  JOIN unnest(CAST(:task_ids AS uuid[]), CAST(:concept_ids AS text[]),
              CAST(:content_types AS text[])) AS w(task_id, concept_id, content_type)
    ON (w.task_id, w.concept_id, w.content_type) = (i.task_id, i.concept_id, i.content_type)
  FOR UPDATE OF i
),
updated AS (
  UPDATE retry_items AS i SET
    status = CASE WHEN c.completed_since_task THEN 'succeeded' ELSE 'running' END,
    attempts = i.attempts + CASE WHEN c.completed_since_task THEN 0 ELSE 1 END,
    claimed_at = now(), updated_at = now()
  FROM current AS c
  WHERE (i.task_id, i.concept_id, i.content_type) = (c.task_id, c.concept_id, c.content_type)
    AND c.status NOT IN ('succeeded', 'failed')
  RETURNING i.task_id, i.concept_id, i.content_type, i.attempts
)
SELECT c.task_id, c.concept_id, c.content_type, c.status, c.completed_since_task,
       coalesce(u.attempts, 0) AS attempts
FROM current AS c LEFT JOIN updated AS u USING (task_id, concept_id, content_type)
"""  # noqa: S608 - table names come from STORAGE; values are bound  # nosec B608
)


@dataclass(frozen=True)
class StartedItem:
    key: ItemKey
    # None when the ledger has no such item (a message the pipeline did not plan).
    status_before: str | None
    attempts: int
    # The platform (or another task) saved completed content since this task began.
    completed_since_task: bool

    @property
    def already_done(self) -> bool:
        """Ended for this task (saved, or failed for good), or finished by someone else."""
        return self.status_before in ("succeeded", "failed") or self.completed_since_task


def start_items(session: Session, keys: Sequence[ItemKey]) -> dict[ItemKey, StartedItem]:
    """Mark a batch's items running, in one statement, before any LLM call.

    Counts an attempt, renews the claim (so a long queue wait does not let the
    judge plan the item twice), and reports items that need no generation:
    ended for this task (saved, or failed for good), or completed by someone
    else since it was planned (deduplication, not judging; marked succeeded).
    """
    if not keys:
        return {}
    rows = session.execute(
        _START_ITEMS,
        {
            "task_ids": [key.task_id for key in keys],
            "concept_ids": [key.concept_id for key in keys],
            "content_types": [key.content_type.value for key in keys],
        },
    ).all()
    found: dict[ItemKey, StartedItem] = {}
    for row in rows:
        key = ItemKey(str(row.task_id), row.concept_id, ContentType(row.content_type))
        found[key] = StartedItem(
            key=key,
            status_before=row.status,
            attempts=row.attempts,
            completed_since_task=bool(row.completed_since_task)
            and row.status not in ("succeeded", "failed"),
        )
    return {
        key: found.get(key, StartedItem(key, None, 0, completed_since_task=False)) for key in keys
    }


def record_item_outcome(session: Session, key: ItemKey, *, status: str, error: str | None) -> None:
    """Set one item's status and last error (failed, dead_lettered, or still running)."""
    session.execute(
        text(
            "UPDATE retry_items SET status = :status, last_error = :error, updated_at = now() "
            "WHERE task_id = CAST(:task_id AS uuid) AND concept_id = :concept_id "
            "AND content_type = :content_type AND status <> 'succeeded'"
        ),
        {
            "status": status,
            "error": clip_error(error) if error else None,
            "task_id": key.task_id,
            "concept_id": key.concept_id,
            "content_type": key.content_type.value,
        },
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
    items: list[ItemStatus]
    last_error: str | None = None

    def counts(self) -> dict[str, int]:
        """Items by state: queued (includes running), succeeded, failed, dead_lettered."""
        counts = {"queued": 0, "succeeded": 0, "failed": 0, "dead_lettered": 0}
        for item in self.items:
            counts["queued" if item.status == "running" else item.status] += 1
        return counts

    @property
    def status(self) -> str:
        """queued: nothing started; running: some started, some open;
        completed: every item succeeded; completed_with_failures: all ended, not all well."""
        statuses = {item.status for item in self.items}
        if not statuses or statuses == {"queued"}:
            return "queued"
        if statuses & {"queued", "running"}:
            return "running"
        return "completed" if statuses == {"succeeded"} else "completed_with_failures"


def task_status(session: Session, task_id: str) -> TaskStatus | None:
    """A task with all its items, or None when there is no such task."""
    rows = session.execute(
        text(
            "SELECT t.task_id, t.roadmap_id, t.user_id, t.last_error AS task_error, i.concept_id, "
            "i.content_type, i.reason, i.status, i.attempts, i.last_error "
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
        last_error=first.task_error,
        items=[
            ItemStatus(
                concept_id=row.concept_id,
                content_type=row.content_type,
                reason=row.reason,
                status=row.status,
                attempts=row.attempts,
                last_error=row.last_error,
            )
            for row in rows
            if row.concept_id is not None
        ],
    )
