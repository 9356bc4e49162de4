"""The pipeline's own records: retry tasks and their item ledger.

Every function takes the caller's connection and never commits: the unit of
work that calls it owns the transaction. Each is one SQL statement.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from content_retry.content_types import STORAGE, ContentType
from content_retry.costs import ItemCost
from content_retry.plan.models import RetryPlan
from content_retry.statuses import (
    CLAIMING_STATUSES,
    ENDED_STATUSES,
    ContentStatus,
    ItemStatus,
    sql_list,
)
from content_retry.validation import clip_error


def create_task(
    connection: Connection, plan: RetryPlan, *, trigger: str, preferences: dict[str, Any]
) -> str:
    """Record a task and claim every planned item for it; returns the task id.

    The claims are ledger rows in status ``queued``: from the commit on, the
    judge leaves these items out until they end or the claim lease expires.
    """
    task_id = connection.execute(
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
    connection.execute(
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


def mark_sent(connection: Connection, task_id: str, concept_ids: Iterable[str]) -> None:
    """Record that these concepts' messages are in the queue: their claims now
    hold until processed (or the queue's retention has passed)."""
    ids = sorted(set(concept_ids))
    if ids:
        connection.execute(
            text(
                "UPDATE retry_items SET sent_at = now() WHERE task_id = :task_id "
                "AND concept_id = ANY(CAST(:concept_ids AS text[]))"
            ),
            {"task_id": task_id, "concept_ids": ids},
        )


# The states are written out, not bound: only then does the planner use the
# partial index retry_items_waiting_since, so the cost follows the waiting items.
_EXPIRE_UNSEEN = text(
    f"""
WITH expired AS (
  UPDATE retry_items SET status = :failed, last_error = :error, updated_at = now()
  WHERE status IN ({sql_list(CLAIMING_STATUSES)})
    AND sent_at < now() - make_interval(mins => :retention_minutes)
  RETURNING 1)
SELECT count(*) FROM expired
"""  # noqa: S608 - constant states; values are bound  # nosec B608
)


def expire_unseen_claims(connection: Connection, retention_minutes: int) -> int:
    """End the claims of items whose message outlived the queue's retention unprocessed.

    SQS drops a message older than its retention without a word; its item
    would otherwise stay claimed. It is failed with the reason, so the task
    says what happened, and the next judge plans it again. Returns how many.
    """
    expired: int = connection.execute(
        _EXPIRE_UNSEEN,
        {
            "failed": ItemStatus.FAILED.value,
            "retention_minutes": retention_minutes,
            "error": clip_error(
                f"its message was in the retry queue longer than its retention "
                f"({retention_minutes} minutes) and was dropped unprocessed; planned again"
            ),
        },
    ).scalar_one()
    return expired


def release_unsent(
    connection: Connection, task_id: str, concept_ids: Iterable[str], error: str
) -> int:
    """Release the claims of concepts whose messages could not be sent.

    Their items become ``failed`` with the send error, so the next request or
    sweep plans them again, and the task records what was left unsent.
    Returns the number of items released.
    """
    ids = sorted(set(concept_ids))
    if not ids:
        return 0
    released: int = connection.execute(
        text(
            "WITH released AS ("
            "  UPDATE retry_items SET status = :failed, last_error = :error, updated_at = now() "
            "  WHERE task_id = :task_id AND concept_id = ANY(CAST(:concept_ids AS text[])) "
            "    AND status = :queued RETURNING 1) "
            "UPDATE retry_tasks SET last_error = :task_error, updated_at = now() "
            "WHERE task_id = :task_id RETURNING (SELECT count(*) FROM released)"
        ),
        {
            "task_id": task_id,
            "concept_ids": ids,
            "error": clip_error(f"message not sent: {error}"),
            "task_error": clip_error(f"{len(ids)} message(s) could not be sent: {error}"),
            "failed": ItemStatus.FAILED.value,
            "queued": ItemStatus.QUEUED.value,
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
    f"WHEN '{content_type.value}' THEN EXISTS (SELECT 1 FROM {storage.table} AS c "  # noqa: S608  # nosec B608
    "WHERE c.roadmap_id = i.roadmap_id AND c.concept_id = i.concept_id AND c.is_latest "
    f"AND c.content_status = '{ContentStatus.COMPLETED}')"
    for content_type, storage in STORAGE.items()
)

# "updated" leaves ended items (succeeded, failed) as they are: a redelivery
# (a sibling item failed transiently) neither saves nor pays the LLM for them.
_START_ITEMS = text(
    f"""
WITH current AS (
  SELECT i.task_id, i.concept_id, i.content_type, i.status, i.llm_calls,
         CASE i.content_type {_COMPLETED_NOW} ELSE false END AS completed_since_task,
         CASE WHEN NOT w.carried AND (w.message_id IS DISTINCT FROM i.delivery_message_id
                                      OR w.receive_count <= i.delivery_receive_count)
              THEN greatest(extract(epoch FROM i.delivery_until - now()), 0) END AS busy_seconds,
         w.message_id, w.receive_count
  FROM retry_items AS i
  JOIN unnest(CAST(:task_ids AS uuid[]), CAST(:concept_ids AS text[]),
              CAST(:content_types AS text[]), CAST(:roadmap_ids AS text[]),
              CAST(:user_ids AS text[]), CAST(:carried AS boolean[]),
              CAST(:message_ids AS text[]), CAST(:receive_counts AS integer[]))
       AS w(task_id, concept_id, content_type, roadmap_id, user_id, carried, message_id,
            receive_count)
    ON (w.task_id, w.concept_id, w.content_type, w.roadmap_id)
       = (i.task_id, i.concept_id, i.content_type, i.roadmap_id)
  JOIN retry_tasks AS t ON t.task_id = i.task_id AND t.user_id = w.user_id
  FOR UPDATE OF i
),
updated AS (
  UPDATE retry_items AS i SET
    status = CASE WHEN c.completed_since_task THEN '{ItemStatus.SUCCEEDED}'
                  ELSE '{ItemStatus.RUNNING}' END,
    attempts = i.attempts + CASE WHEN c.completed_since_task THEN 0 ELSE 1 END,
    claimed_at = now(), updated_at = now(),
    delivery_until = now() + make_interval(secs => CAST(:delivery_seconds AS float8)),
    delivery_message_id = c.message_id, delivery_receive_count = c.receive_count
  FROM current AS c
  WHERE (i.task_id, i.concept_id, i.content_type) = (c.task_id, c.concept_id, c.content_type)
    AND c.status NOT IN ({sql_list(ENDED_STATUSES)})
    AND NOT (c.status = '{ItemStatus.RUNNING}' AND coalesce(c.busy_seconds, 0) > 0)
  RETURNING i.task_id, i.concept_id, i.content_type, i.attempts
)
SELECT c.task_id, c.concept_id, c.content_type, c.status, c.completed_since_task,
       coalesce(u.attempts, 0) AS attempts, c.llm_calls,
       CASE WHEN u.task_id IS NULL AND c.status = '{ItemStatus.RUNNING}'
            THEN c.busy_seconds END AS busy_seconds
FROM current AS c LEFT JOIN updated AS u USING (task_id, concept_id, content_type)
"""  # noqa: S608 - table names come from STORAGE; values are bound  # nosec B608
)


@dataclass(frozen=True)
class DeliveredItem:
    """An item as a message names it: its key, and the roadmap and owner it claims."""

    key: ItemKey
    roadmap_id: str
    user_id: str
    # The message carries the item's generated content: saving it pays nothing,
    # so it need not wait for another delivery (the save itself is race-safe).
    carries_content: bool = False
    # The SQS message and its receive count: a later receive of the message
    # that holds the item is its redelivery (its holder has ended), not another.
    message_id: str | None = None
    receive_count: int = 1


@dataclass(frozen=True)
class StartedItem:
    key: ItemKey
    # None when the ledger has no such item, or holds it for another roadmap or
    # owner than the message names: a message the pipeline did not plan.
    status_before: ItemStatus | None
    attempts: int
    # The platform (or another task) saved completed content since this task began.
    completed_since_task: bool
    # LLM calls recorded for the item before this delivery.
    llm_calls: int = 0
    # Seconds another delivery still holds the running item (None: not held):
    # this delivery leaves it alone and comes back after them.
    busy_seconds: float | None = None

    @property
    def already_done(self) -> bool:
        """Ended for this task (saved, or failed for good), or finished by someone else."""
        return self.status_before in ENDED_STATUSES or self.completed_since_task


def start_items(
    connection: Connection, items: Sequence[DeliveredItem], *, delivery_seconds: float = 900
) -> dict[ItemKey, StartedItem]:
    """Mark a batch's items running, in one statement, before any LLM call.

    Counts an attempt, renews the claim, and reports items that need no
    generation: ended for this task (saved, or failed for good), or completed
    by someone else since it was planned (deduplication, not judging; marked
    succeeded). An item whose ledger row names another roadmap or owner than
    the message is left untouched and reported as never planned. A running
    item another live delivery holds is left to it (``busy_seconds``); the
    items started here are held for ``delivery_seconds`` (the invocation's time).
    """
    if not items:
        return {}
    rows = connection.execute(
        _START_ITEMS,
        {
            "task_ids": [item.key.task_id for item in items],
            "concept_ids": [item.key.concept_id for item in items],
            "content_types": [item.key.content_type.value for item in items],
            "roadmap_ids": [item.roadmap_id for item in items],
            "user_ids": [item.user_id for item in items],
            "carried": [item.carries_content for item in items],
            "message_ids": [item.message_id for item in items],
            "receive_counts": [item.receive_count for item in items],
            "delivery_seconds": delivery_seconds,
        },
    ).all()
    found: dict[ItemKey, StartedItem] = {}
    for row in rows:
        key = ItemKey(str(row.task_id), row.concept_id, ContentType(row.content_type))
        status = ItemStatus(row.status)
        found[key] = StartedItem(
            key=key,
            status_before=status,
            attempts=row.attempts,
            completed_since_task=bool(row.completed_since_task) and status not in ENDED_STATUSES,
            llm_calls=row.llm_calls,
            busy_seconds=None if row.busy_seconds is None else float(row.busy_seconds),
        )
    return {
        item.key: found.get(item.key, StartedItem(item.key, None, 0, completed_since_task=False))
        for item in items
    }


def record_outcomes(
    connection: Connection,
    keys: Sequence[ItemKey],
    *,
    status: ItemStatus,
    error: str | None,
    roadmap_id: str,
    user_id: str,
    content_kept_minutes: int | None = None,
) -> set[ItemKey]:
    """Set items' status and last error (failed, dead_lettered, or still running);
    returns the items whose row changed. The delivery that noted them ends.

    Only the rows of ``roadmap_id`` and ``user_id`` change: a message changes
    its own ledger rows only, never another roadmap's or owner's (DESIGN §12).
    An item that already ended for its task (saved, or failed permanently)
    keeps its status: a late note about an earlier delivery never undoes it.

    Args:
        content_kept_minutes: the item's generated content waits in the
            dead-letter queue for that long: it stays claimed meanwhile.
    """
    if not keys:
        return set()
    rows = connection.execute(
        _RECORD_OUTCOMES,
        {
            "status": status.value,
            "error": clip_error(error) if error else None,
            "ended": [ended.value for ended in ENDED_STATUSES],
            "task_ids": [key.task_id for key in keys],
            "concept_ids": [key.concept_id for key in keys],
            "content_types": [key.content_type.value for key in keys],
            "roadmap_id": roadmap_id,
            "user_id": user_id,
            "kept_minutes": content_kept_minutes,
        },
    )
    return {ItemKey(str(task), concept, ContentType(kind)) for task, concept, kind in rows}


_RECORD_OUTCOMES = text(
    "UPDATE retry_items AS i SET status = :status, last_error = :error, updated_at = now(), "
    "delivery_until = NULL, content_in_dlq_until = CASE "
    "WHEN CAST(:kept_minutes AS integer) IS NULL THEN i.content_in_dlq_until "
    "ELSE now() + make_interval(mins => CAST(:kept_minutes AS integer)) END "
    "FROM unnest(CAST(:task_ids AS uuid[]), CAST(:concept_ids AS text[]), "
    "CAST(:content_types AS text[])) AS k(task_id, concept_id, content_type), retry_tasks AS t "
    "WHERE (i.task_id, i.concept_id, i.content_type) = (k.task_id, k.concept_id, "
    "k.content_type) AND i.status <> ALL(CAST(:ended AS text[])) "
    "AND i.roadmap_id = :roadmap_id AND t.task_id = i.task_id AND t.user_id = :user_id "
    "RETURNING i.task_id, i.concept_id, i.content_type"
)


def add_costs(
    connection: Connection, costs: Mapping[ItemKey, ItemCost], *, roadmap_id: str, user_id: str
) -> None:
    """Add what items' LLM calls cost (calls, tokens) to their ledger rows, in one
    statement; only rows of ``roadmap_id`` and ``user_id`` (the message's own)."""
    paid = {key: cost for key, cost in costs.items() if cost.llm_calls}
    if not paid:
        return
    keys = list(paid)
    connection.execute(
        text(
            "UPDATE retry_items AS i SET llm_calls = i.llm_calls + c.calls, "
            "input_tokens = i.input_tokens + c.input_tokens, "
            "output_tokens = i.output_tokens + c.output_tokens "
            "FROM unnest(CAST(:task_ids AS uuid[]), CAST(:concept_ids AS text[]), "
            "CAST(:content_types AS text[]), CAST(:calls AS integer[]), "
            "CAST(:input_tokens AS bigint[]), CAST(:output_tokens AS bigint[])) "
            "AS c(task_id, concept_id, content_type, calls, input_tokens, output_tokens), "
            "retry_tasks AS t "
            "WHERE (i.task_id, i.concept_id, i.content_type) = (c.task_id, c.concept_id, "
            "c.content_type) AND i.roadmap_id = :roadmap_id AND t.task_id = i.task_id "
            "AND t.user_id = :user_id"
        ),
        {
            "task_ids": [key.task_id for key in keys],
            "concept_ids": [key.concept_id for key in keys],
            "content_types": [key.content_type.value for key in keys],
            "calls": [paid[key].llm_calls for key in keys],
            "input_tokens": [paid[key].input_tokens for key in keys],
            "output_tokens": [paid[key].output_tokens for key in keys],
            "roadmap_id": roadmap_id,
            "user_id": user_id,
        },
    )
