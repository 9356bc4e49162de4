"""A retry task as its owner sees it: ``GET /retry-tasks/{task_id}`` and ``content-retry status``.

The task's status is derived from its items when read, never stored, so the
workers that finish a task's last items at the same moment cannot race to
maintain it.
"""

from __future__ import annotations

from collections import Counter
from uuid import UUID

from pydantic import BaseModel, Field
from sqlalchemy import Connection, Engine

from content_retry.content_types import ContentType
from content_retry.plan.models import Reason
from content_retry.repositories.tasks import task_rows
from content_retry.statuses import CLAIMING_STATUSES, ItemStatus, TaskStatus


class TaskCounts(BaseModel):
    """Items by state; ``queued`` includes the ones a worker is running."""

    queued: int
    succeeded: int
    failed: int
    dead_lettered: int
    waiting_for_redrive: int = Field(
        0,
        description="Of the dead-lettered items, those whose generated content waits in the "
        "dead-letter queue: still claimed, saved by the next re-drive without the LLM",
    )


class TaskUsage(BaseModel):
    """What the task's LLM calls cost, summed over its items and their attempts.

    Generated content in a re-driven message was paid for once, when it was
    generated: saving it adds nothing here.
    """

    llm_calls: int
    input_tokens: int
    output_tokens: int


class TaskItem(BaseModel):
    concept_id: str
    content_type: ContentType
    reason: Reason
    status: ItemStatus
    attempts: int
    last_error: str | None
    waiting_for_redrive: bool = Field(
        False,
        description="Dead-lettered with its generated content, which the next re-drive saves",
    )


class TaskView(BaseModel):
    """One retry task, item by item (DESIGN §6)."""

    task_id: str
    roadmap_id: str
    status: TaskStatus
    counts: TaskCounts
    items: list[TaskItem]
    usage: TaskUsage

    @classmethod
    def of(cls, task_id: str, roadmap_id: str, items: list[TaskItem], usage: TaskUsage) -> TaskView:
        """The view of a task's items, its status and counts derived from them."""
        counts = Counter(
            ItemStatus.QUEUED.value if item.status in CLAIMING_STATUSES else item.status.value
            for item in items
        )
        counts["waiting_for_redrive"] = sum(item.waiting_for_redrive for item in items)
        # An item whose content waits for its re-drive is still on its way.
        statuses = {ItemStatus.RUNNING if i.waiting_for_redrive else i.status for i in items}
        return cls(
            task_id=task_id,
            roadmap_id=roadmap_id,
            status=_task_status(statuses),
            counts=TaskCounts(**{name: counts[name] for name in TaskCounts.model_fields}),
            items=items,
            usage=usage,
        )


def _task_status(statuses: set[ItemStatus]) -> TaskStatus:
    """queued: nothing started; running: some started, some open; completed:
    every item succeeded; completed_with_failures: none open, some failed or
    dead-lettered."""
    if not statuses or statuses == {ItemStatus.QUEUED}:
        return TaskStatus.QUEUED
    if statuses & set(CLAIMING_STATUSES):
        return TaskStatus.RUNNING
    if statuses == {ItemStatus.SUCCEEDED}:
        return TaskStatus.COMPLETED
    return TaskStatus.COMPLETED_WITH_FAILURES


def read_task(connection: Connection, task_id: str) -> tuple[TaskView, str] | None:
    """A task with all its items and its owner's id, or None when there is no such task.

    Raises:
        ValueError: ``task_id`` is not a UUID.
    """
    rows = task_rows(connection, str(UUID(task_id)))
    if not rows:
        return None
    items = [
        TaskItem(
            concept_id=row.concept_id,
            content_type=ContentType(row.content_type),
            reason=Reason(row.reason),
            status=ItemStatus(row.status),
            attempts=row.attempts,
            last_error=row.last_error,
            waiting_for_redrive=row.waiting,
        )
        for row in rows
        if row.concept_id is not None
    ]
    first = rows[0]
    usage = TaskUsage(
        llm_calls=first.llm_calls or 0,
        input_tokens=first.input_tokens or 0,
        output_tokens=first.output_tokens or 0,
    )
    return TaskView.of(str(first.task_id), first.roadmap_id, items, usage), first.user_id


def task_for_owner(engine: Engine, task_id: str, owner: str) -> TaskView | None:
    """A task, or None when there is no such task or it is not ``owner``'s.

    Raises:
        SQLAlchemyError, OSError: the database failed, or did not answer within
            the deadline in force (``content_retry.database.DATABASE_ERRORS``;
            the API answers them 503).
    """
    try:
        with engine.connect() as connection:
            found = read_task(connection, task_id)
    except ValueError:  # not an id we could have issued
        return None
    if found is None or found[1] != owner:
        return None
    return found[0]
