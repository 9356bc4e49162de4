"""Claims and items: the ledger rows (``retry_items``) of the items a task planned."""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    CTE,
    Alias,
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    Dialect,
    FromClause,
    Integer,
    Interval,
    Select,
    Table,
    Text,
    TypeDecorator,
    Update,
    and_,
    any_,
    bindparam,
    case,
    cast,
    column,
    exists,
    extract,
    false,
    func,
    insert,
    null,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.sql.dml import ReturningUpdate
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.types import TypeEngine

from content_retry.content_types import ContentType
from content_retry.costs import ItemCost
from content_retry.plan.models import RetryPlan
from content_retry.statuses import (
    CLAIMING_STATUSES,
    TERMINAL_STATUSES,
    ItemStatus,
)
from content_retry.tables import (
    completed_latest,
    constant,
    content_tables,
    retry_items,
    retry_tasks,
)
from content_retry.validation import clip_error


@dataclass(frozen=True)
class ItemKey:
    """The deduplication key of an item: never the SQS message id."""

    task_id: str
    concept_id: str
    content_type: ContentType


@dataclass(frozen=True)
class DeliveredItem:
    """An item as a message names it: its key, and the roadmap and owner it claims."""

    key: ItemKey
    roadmap_id: str
    user_id: str
    # The message brings the item's generated content: saving it pays nothing,
    # so it need not wait for another delivery (the save itself is race-safe).
    has_content: bool = False
    # The SQS message and its receive count: a later receive of the message
    # that holds the item is its redelivery (its holder has stopped), not another.
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
    # Seconds another delivery still holds the running item's lease (None: no
    # lease held): this delivery leaves it alone and comes back after them.
    hold_seconds_left: float | None = None

    @property
    def already_done(self) -> bool:
        """Succeeded or failed permanently for this task, or completed by someone else."""
        return self.status_before in TERMINAL_STATUSES or self.completed_since_task


class Minutes(TypeDecorator[timedelta]):
    """A number of minutes bound as a PostgreSQL interval."""

    impl = Interval
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> timedelta | None:
        return None if value is None else timedelta(minutes=value)


class Seconds(TypeDecorator[timedelta]):
    """A number of seconds bound as a PostgreSQL interval."""

    impl = Interval
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> timedelta | None:
        return None if value is None else timedelta(seconds=value)


def minutes_ago(parameter: str) -> ColumnElement[Any]:
    """``now()`` less the minutes bound as ``parameter``."""
    return func.now() - bindparam(parameter, type_=Minutes())


def waiting_for_redrive(items: FromClause) -> ColumnElement[bool]:
    """Whether the ``retry_items`` row's claim is its content waiting in the dead-letter queue."""
    return and_(
        items.c.status == constant(ItemStatus.DEAD_LETTERED),
        items.c.content_in_dlq_until > func.now(),
    )


def live_claim(items: FromClause) -> ColumnElement[bool]:
    """Whether the ``retry_items`` row holds a live claim on its item (DESIGN §4).

    A queued or running item is claimed while its message may wait in the
    queue: from its send until the queue's retention (``:retention_minutes``)
    has dropped it; an item whose message was never sent only for the lease
    (``:lease_minutes``) after it was planned or started. An item dead-lettered
    with its content is claimed while that copy can be in the dead-letter queue.
    """
    return or_(
        and_(
            items.c.status.in_([constant(status) for status in CLAIMING_STATUSES]),
            or_(
                items.c.claimed_at > minutes_ago("lease_minutes"),
                items.c.sent_at > minutes_ago("retention_minutes"),
            ),
        ),
        waiting_for_redrive(items),
    )


def _aliased(table: Table, name: str) -> Alias:
    """``table AS name``, typed as the ``Alias`` it is (an UPDATE's target may be one)."""
    return typing.cast(Alias, table.alias(name))


def _unnested(name: str, *columns: tuple[str, TypeEngine[Any]]) -> FromClause:
    """``unnest(CAST(:<column>s AS type[]), ...) AS name(column, ...)``: one row per
    position of the arrays bound as each column's name plus ``s``."""
    arrays = (cast(bindparam(f"{key}s"), ARRAY(type_)) for key, type_ in columns)
    named: list[ColumnClause[Any]] = [column(key, type_) for key, type_ in columns]
    return func.unnest(*arrays).table_valued(*named).render_derived(name=name)


_UUID = UUID(as_uuid=False)
_KEY_COLUMNS: tuple[tuple[str, TypeEngine[Any]], ...] = (
    ("task_id", _UUID),
    ("concept_id", Text()),
    ("content_type", Text()),
)


def _same_item(items: FromClause, other: FromClause) -> ColumnElement[bool]:
    return tuple_(items.c.task_id, items.c.concept_id, items.c.content_type) == tuple_(
        other.c.task_id, other.c.concept_id, other.c.content_type
    )


def _statuses(statuses: Iterable[ItemStatus]) -> list[ColumnElement[str]]:
    return [constant(status) for status in statuses]


# --- A task's claims: written with the task, marked sent, released when unsent ---

_planned = _unnested("item", ("concept_id", Text()), ("content_type", Text()), ("reason", Text()))
# One statement for any number of items: arrays unnested server-side.
_CLAIM_ITEMS = insert(retry_items).from_select(
    ["task_id", "roadmap_id", "concept_id", "content_type", "reason"],
    select(
        bindparam("claiming_task_id", type_=_UUID),
        bindparam("claiming_roadmap_id", type_=Text()),
        _planned.c.concept_id,
        _planned.c.content_type,
        _planned.c.reason,
    ),
)


def claim_items(connection: Connection, task_id: str, plan: RetryPlan) -> None:
    """Claim every item ``plan`` holds for task ``task_id``: ledger rows in status ``queued``."""
    items = plan.items
    connection.execute(
        _CLAIM_ITEMS,
        {
            "claiming_task_id": task_id,
            "claiming_roadmap_id": plan.roadmap_id,
            "concept_ids": [concept.concept_id for concept, _ in items],
            "content_types": [item.content_type.value for _, item in items],
            "reasons": [item.reason.value for _, item in items],
        },
    )


_MARK_SENT = (
    update(retry_items)
    .where(
        retry_items.c.task_id == bindparam("sent_task_id", type_=_UUID),
        retry_items.c.concept_id == any_(cast(bindparam("sent_concept_ids"), ARRAY(Text))),
    )
    .values(sent_at=func.now())
)


def mark_sent(connection: Connection, task_id: str, concept_ids: Iterable[str]) -> None:
    """Record that these concepts' messages are in the queue: their claims now
    hold until processed (or the queue's retention has passed)."""
    ids = sorted(set(concept_ids))
    if ids:
        connection.execute(_MARK_SENT, {"sent_task_id": task_id, "sent_concept_ids": ids})


# The queued items of one task among some concepts, failed with the send's error;
# returns a row per item. Binds: unsent_task_id, unsent_concept_ids, unsent_error.
# The task's update (repositories/tasks.py) runs it in the same statement.
UNSENT_RELEASED: CTE = (
    update(retry_items)
    .where(
        retry_items.c.task_id == bindparam("unsent_task_id", type_=_UUID),
        retry_items.c.concept_id == any_(cast(bindparam("unsent_concept_ids"), ARRAY(Text))),
        retry_items.c.status == constant(ItemStatus.QUEUED),
    )
    .values(
        status=constant(ItemStatus.FAILED),
        last_error=bindparam("unsent_error", type_=Text()),
        updated_at=func.now(),
    )
    .returning(retry_items.c.concept_id)
    .cte("released")
)


# The statuses are written out, not bound: only then does the planner use the
# partial index retry_items_waiting_since, so the cost follows the waiting items.
_EXPIRED = (
    update(retry_items)
    .where(
        retry_items.c.status.in_(_statuses(CLAIMING_STATUSES)),
        retry_items.c.sent_at < minutes_ago("retention_minutes"),
    )
    .values(
        status=constant(ItemStatus.FAILED),
        last_error=bindparam("expiry_error", type_=Text()),
        updated_at=func.now(),
    )
    .returning(retry_items.c.concept_id)
    .cte("expired")
)
_EXPIRE_PAST_RETENTION = select(func.count()).select_from(_EXPIRED)


def expire_claims_past_retention(connection: Connection, retention_minutes: int) -> int:
    """End the claims of items whose message outlived the queue's retention unprocessed.

    SQS drops a message older than its retention without a word; its item
    would otherwise stay claimed. It is failed with the reason, so the task
    says what happened, and the next judge plans it again. Returns how many.
    """
    expired: int = connection.execute(
        _EXPIRE_PAST_RETENTION,
        {
            "retention_minutes": retention_minutes,
            "expiry_error": clip_error(
                f"its message was in the retry queue longer than its retention "
                f"({retention_minutes} minutes) and was dropped unprocessed; planned again"
            ),
        },
    ).scalar_one()
    return expired


# --- A delivery's items: started, their outcomes and costs noted ---


def _completed_since_task(items: FromClause) -> ColumnElement[bool]:
    """Per content type: does a completed latest row exist? The judge planned the
    item because none did, so one now means someone else finished it."""
    whens = {}
    for content_type, table in content_tables.items():
        content = table.alias("c")
        whens[constant(content_type)] = exists().where(
            completed_latest(content, items.c.roadmap_id, items.c.concept_id)
        )
    return case(whens, value=items.c.content_type, else_=false())


@cache
def _start_items_statement() -> Select[Any]:
    """The statement of :func:`start_items` (built on first use)."""
    i = _aliased(retry_items, "i")
    t = _aliased(retry_tasks, "t")
    w = _unnested(
        "w",
        *_KEY_COLUMNS,
        ("roadmap_id", Text()),
        ("user_id", Text()),
        ("has_content", Boolean()),
        ("message_id", Text()),
        ("receive_count", Integer()),
    )
    # Another delivery holds the item's lease: seconds it has left. A message
    # with the content, or the same message received again, holds none.
    other_delivery = and_(
        ~w.c.has_content,
        or_(
            w.c.message_id.is_distinct_from(i.c.delivery_message_id),
            w.c.receive_count <= i.c.delivery_receive_count,
        ),
    )
    hold_seconds_left = case(
        (other_delivery, func.greatest(extract("epoch", i.c.delivery_until - func.now()), 0))
    )
    current = (
        select(
            i.c.task_id,
            i.c.concept_id,
            i.c.content_type,
            i.c.status,
            i.c.llm_calls,
            _completed_since_task(i).label("completed_since_task"),
            hold_seconds_left.label("hold_seconds_left"),
            w.c.message_id,
            w.c.receive_count,
        )
        .select_from(
            i.join(
                w,
                tuple_(w.c.task_id, w.c.concept_id, w.c.content_type, w.c.roadmap_id)
                == tuple_(i.c.task_id, i.c.concept_id, i.c.content_type, i.c.roadmap_id),
            ).join(t, and_(t.c.task_id == i.c.task_id, t.c.user_id == w.c.user_id))
        )
        .with_for_update(of=i)
        .cte("current")
    )
    running = constant(ItemStatus.RUNNING)
    completed = current.c.completed_since_task
    # Items that succeeded or failed permanently stay as they are: a redelivery
    # (a sibling item failed transiently) neither saves nor pays the LLM for them.
    started = (
        update(i)
        .where(
            _same_item(i, current),
            current.c.status.not_in(_statuses(TERMINAL_STATUSES)),
            ~and_(current.c.status == running, func.coalesce(current.c.hold_seconds_left, 0) > 0),
        )
        .values(
            status=case((completed, constant(ItemStatus.SUCCEEDED)), else_=running),
            attempts=i.c.attempts + case((completed, 0), else_=1),
            claimed_at=func.now(),
            updated_at=func.now(),
            delivery_until=func.now() + bindparam("delivery_seconds", type_=Seconds()),
            delivery_message_id=current.c.message_id,
            delivery_receive_count=current.c.receive_count,
        )
        .returning(i.c.task_id, i.c.concept_id, i.c.content_type, i.c.attempts)
        .cte("started")
    )
    return select(
        current.c.task_id,
        current.c.concept_id,
        current.c.content_type,
        current.c.status,
        current.c.completed_since_task,
        func.coalesce(started.c.attempts, 0).label("attempts"),
        current.c.llm_calls,
        case(
            (
                and_(started.c.task_id.is_(None), current.c.status == running),
                current.c.hold_seconds_left,
            )
        ).label("hold_seconds_left"),
    ).select_from(current.outerjoin(started, _same_item(current, started)))


def start_items(
    connection: Connection, items: Sequence[DeliveredItem], *, delivery_seconds: float = 900
) -> dict[ItemKey, StartedItem]:
    """Mark a batch's items running, in one statement, before any LLM call.

    Counts an attempt, renews the claim, and reports items that need no
    generation: succeeded or failed permanently for this task, or completed by
    someone else since it was planned (deduplication, not judging; marked
    succeeded). An item whose ledger row names another roadmap or owner than
    the message is left untouched and reported as never planned. A running
    item whose lease another live delivery holds is left to it
    (``hold_seconds_left``); the items started here are leased for
    ``delivery_seconds`` (the invocation's time).
    """
    if not items:
        return {}
    rows = connection.execute(
        _start_items_statement(),
        {
            "task_ids": [item.key.task_id for item in items],
            "concept_ids": [item.key.concept_id for item in items],
            "content_types": [item.key.content_type.value for item in items],
            "roadmap_ids": [item.roadmap_id for item in items],
            "user_ids": [item.user_id for item in items],
            "has_contents": [item.has_content for item in items],
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
            completed_since_task=bool(row.completed_since_task) and status not in TERMINAL_STATUSES,
            llm_calls=row.llm_calls,
            hold_seconds_left=None
            if row.hold_seconds_left is None
            else float(row.hold_seconds_left),
        )
    return {
        item.key: found.get(item.key, StartedItem(item.key, None, 0, completed_since_task=False))
        for item in items
    }


def _messages_own(items: FromClause, tasks: FromClause) -> ColumnElement[bool]:
    """Rows of the message's roadmap and owner only (DESIGN §12)."""
    return and_(
        items.c.roadmap_id == bindparam("message_roadmap_id", type_=Text()),
        tasks.c.task_id == items.c.task_id,
        tasks.c.user_id == bindparam("message_user_id", type_=Text()),
    )


@cache
def _record_outcomes_statement() -> ReturningUpdate[Any]:
    i = _aliased(retry_items, "i")
    t = _aliased(retry_tasks, "t")
    k = _unnested("k", *_KEY_COLUMNS)
    kept = bindparam("dlq_retention_minutes", type_=Minutes())
    return (
        update(i)
        .where(
            _same_item(i, k),
            i.c.status.not_in(_statuses(TERMINAL_STATUSES)),
            _messages_own(i, t),
        )
        .values(
            status=bindparam("new_status", type_=Text()),
            last_error=bindparam("error", type_=Text()),
            updated_at=func.now(),
            delivery_until=null(),
            content_in_dlq_until=case(
                (kept.is_(None), i.c.content_in_dlq_until), else_=func.now() + kept
            ),
        )
        .returning(i.c.task_id, i.c.concept_id, i.c.content_type)
    )


def record_outcomes(
    connection: Connection,
    keys: Sequence[ItemKey],
    *,
    status: ItemStatus,
    error: str | None,
    roadmap_id: str,
    user_id: str,
    dlq_retention_minutes: int | None = None,
) -> set[ItemKey]:
    """Set items' status and last error (failed, dead_lettered, or still running);
    returns the items whose row changed. The lease of the delivery that noted them is released.

    Only the rows of ``roadmap_id`` and ``user_id`` change: a message changes
    its own ledger rows only, never another roadmap's or owner's (DESIGN §12).
    An item that already succeeded or failed permanently for its task keeps
    its status: a late note about an earlier delivery never undoes it.

    Args:
        dlq_retention_minutes: the item's generated content waits in the
            dead-letter queue for that long: it stays claimed meanwhile.
    """
    if not keys:
        return set()
    rows = connection.execute(
        _record_outcomes_statement(),
        {
            "new_status": status.value,
            "error": clip_error(error) if error else None,
            "task_ids": [key.task_id for key in keys],
            "concept_ids": [key.concept_id for key in keys],
            "content_types": [key.content_type.value for key in keys],
            "message_roadmap_id": roadmap_id,
            "message_user_id": user_id,
            "dlq_retention_minutes": dlq_retention_minutes,
        },
    )
    return {ItemKey(str(task), concept, ContentType(kind)) for task, concept, kind in rows}


@cache
def _add_costs_statement() -> Update:
    i = _aliased(retry_items, "i")
    t = _aliased(retry_tasks, "t")
    c = _unnested(
        "c",
        *_KEY_COLUMNS,
        ("added_llm_call", Integer()),
        ("added_input_token", BigInteger()),
        ("added_output_token", BigInteger()),
    )
    return (
        update(i)
        .where(_same_item(i, c), _messages_own(i, t))
        .values(
            llm_calls=i.c.llm_calls + c.c.added_llm_call,
            input_tokens=i.c.input_tokens + c.c.added_input_token,
            output_tokens=i.c.output_tokens + c.c.added_output_token,
        )
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
        _add_costs_statement(),
        {
            "task_ids": [key.task_id for key in keys],
            "concept_ids": [key.concept_id for key in keys],
            "content_types": [key.content_type.value for key in keys],
            "added_llm_calls": [paid[key].llm_calls for key in keys],
            "added_input_tokens": [paid[key].input_tokens for key in keys],
            "added_output_tokens": [paid[key].output_tokens for key in keys],
            "message_roadmap_id": roadmap_id,
            "message_user_id": user_id,
        },
    )


# --- What paid calls cost, per content type (the retry plan's estimate) ---


class PaidCalls(NamedTuple):
    """LLM calls and their tokens, summed over a content type's recent paid items."""

    llm_calls: int
    input_tokens: int
    output_tokens: int


@cache
def _recorded_tokens_statement() -> Select[Any]:
    w = _unnested("w", ("content_type", Text()))
    # llm_calls > 0 written out: the predicate of the partial index retry_items_paid_by_type.
    recent = (
        select(retry_items.c.llm_calls, retry_items.c.input_tokens, retry_items.c.output_tokens)
        .where(
            retry_items.c.content_type == w.c.content_type,
            retry_items.c.llm_calls > constant(0),
        )
        .order_by(retry_items.c.updated_at.desc())
        .limit(bindparam("recent", type_=Integer()))
        .lateral("r")
    )
    return (
        select(
            w.c.content_type,
            func.sum(recent.c.llm_calls).label("llm_calls"),
            func.sum(recent.c.input_tokens).label("input_tokens"),
            func.sum(recent.c.output_tokens).label("output_tokens"),
        )
        .select_from(w.join(recent, true()))
        .group_by(w.c.content_type)
    )


def recent_paid_calls(
    connection: Connection, content_types: Iterable[ContentType], recent: int
) -> dict[ContentType, PaidCalls]:
    """Per content type, the calls and tokens of its ``recent`` last paid items
    (by when they were last updated); types without any are left out."""
    rows = connection.execute(
        _recorded_tokens_statement(),
        {"content_types": [content_type.value for content_type in content_types], "recent": recent},
    )
    return {
        ContentType(row.content_type): PaidCalls(
            int(row.llm_calls), int(row.input_tokens), int(row.output_tokens)
        )
        for row in rows
        if row.llm_calls
    }
