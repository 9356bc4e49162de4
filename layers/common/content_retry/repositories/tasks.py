"""Retry tasks: ``retry_tasks``, one row per accepted retry, read with its items."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    Select,
    Text,
    bindparam,
    cast,
    false,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from content_retry.content_types import ContentType
from content_retry.plan.models import RetryPlan
from content_retry.repositories.claims import UNSENT_RELEASED, claim_items, waiting_for_redrive
from content_retry.tables import retry_items, retry_tasks
from content_retry.validation import clip_error

_UUID = UUID(as_uuid=False)

_INSERT_TASK = (
    insert(retry_tasks)
    .values(
        roadmap_id=bindparam("new_roadmap_id", type_=Text()),
        user_id=bindparam("new_user_id", type_=Text()),
        trigger=bindparam("new_trigger", type_=Text()),
        preferences=bindparam("new_preferences", type_=JSONB()),
    )
    .returning(retry_tasks.c.task_id)
)


def insert_task(
    connection: Connection,
    *,
    roadmap_id: str,
    user_id: str,
    trigger: str,
    preferences: dict[str, Any],
) -> str:
    """Record a task (no items yet); returns its id."""
    task_id: str = connection.execute(
        _INSERT_TASK,
        {
            "new_roadmap_id": roadmap_id,
            "new_user_id": user_id,
            "new_trigger": trigger,
            "new_preferences": preferences,
        },
    ).scalar_one()
    return task_id


def create_task(
    connection: Connection, plan: RetryPlan, *, trigger: str, preferences: dict[str, Any]
) -> str:
    """Record a task and claim every planned item for it, in two statements;
    returns the task id.

    The claims are ledger rows in status ``queued``: from the commit on, the
    judge leaves these items out until they succeed or fail permanently, or
    the claim lease expires.
    """
    task_id = insert_task(
        connection,
        roadmap_id=plan.roadmap_id,
        user_id=plan.user_id,
        trigger=trigger,
        preferences=preferences,
    )
    claim_items(connection, task_id, plan)
    return task_id


# The items' release and the task's error in one statement.
_RELEASE_UNSENT = (
    update(retry_tasks)
    .add_cte(UNSENT_RELEASED)
    .where(retry_tasks.c.task_id == bindparam("unsent_task_id", type_=_UUID))
    .values(last_error=bindparam("task_error", type_=Text()), updated_at=func.now())
    .returning(select(func.count()).select_from(UNSENT_RELEASED).scalar_subquery())
)


def release_unsent(
    connection: Connection, task_id: str, concept_ids: Iterable[str], error: str
) -> int:
    """Release the claims of concepts whose messages could not be sent.

    Their queued items become ``failed`` with the send error, so the next
    request or sweep plans them again, and the task records what was left
    unsent. Returns the number of items released.
    """
    ids = sorted(set(concept_ids))
    if not ids:
        return 0
    released: int = connection.execute(
        _RELEASE_UNSENT,
        {
            "unsent_task_id": task_id,
            "unsent_concept_ids": ids,
            "unsent_error": clip_error(f"message not sent: {error}"),
            "task_error": clip_error(f"{len(ids)} message(s) could not be sent: {error}"),
        },
    ).scalar_one()
    return released


@cache
def _read_task_statement() -> Select[Any]:
    t = retry_tasks.alias("t")
    i = retry_items.alias("i")
    return (
        select(
            t.c.task_id,
            t.c.roadmap_id,
            t.c.user_id,
            i.c.concept_id,
            i.c.content_type,
            i.c.reason,
            i.c.status,
            i.c.attempts,
            i.c.last_error,
            func.coalesce(waiting_for_redrive(i), false()).label("waiting"),
            func.sum(i.c.llm_calls).over().label("llm_calls"),
            func.sum(i.c.input_tokens).over().label("input_tokens"),
            func.sum(i.c.output_tokens).over().label("output_tokens"),
        )
        .select_from(t.outerjoin(i, i.c.task_id == t.c.task_id))
        .where(t.c.task_id == bindparam("read_task_id", type_=_UUID))
        .order_by(
            i.c.concept_id,
            func.array_position(cast(bindparam("type_order"), ARRAY(Text)), i.c.content_type),
        )
    )


def task_rows(connection: Connection, task_id: str) -> Sequence[Row[Any]]:
    """A task's rows, one per item (concept, then content type, in order), each
    with the task's id, roadmap, owner and the cost summed over its items
    (``llm_calls``, ``input_tokens``, ``output_tokens``); a task without items
    has one row whose item columns are null. No rows: no such task.

    ``task_id`` must be a UUID's text.
    """
    return connection.execute(
        _read_task_statement(),
        {"read_task_id": task_id, "type_order": [member.value for member in ContentType]},
    ).all()
