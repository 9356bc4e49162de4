"""Content versions: the content tables' rows, one per saved version of a concept's content."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    CTE,
    BigInteger,
    Connection,
    Integer,
    Select,
    Text,
    Update,
    bindparam,
    cast,
    exists,
    false,
    func,
    insert,
    null,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID, array

from content_retry.content_types import STORAGE, ContentType, PayloadFormat
from content_retry.costs import NOT_CALLED, ItemCost
from content_retry.generated import ContentModel
from content_retry.repositories.claims import ItemKey
from content_retry.repositories.roadmaps import concept_listings, member_text
from content_retry.statuses import ContentStatus, FrameworkStatus, ItemStatus
from content_retry.tables import (
    completed_latest,
    constant,
    content_tables,
    payload_column,
    retry_items,
    retry_tasks,
    roadmap_metadata,
)

# The save's bound values. None is named like a column of a table the statement
# updates: SQLAlchemy adds a SET clause for a parameter named like one.
_TASK = bindparam("task", type_=Text)
_ROADMAP = bindparam("roadmap", type_=Text)
_CONCEPT = bindparam("concept", type_=Text)


@dataclass(frozen=True)
class ItemSave:
    """What one item's save statement did."""

    # The new version, None when none was inserted.
    version: int | None
    # The ledger row was marked succeeded, with the cost (saved now, or found
    # saved by another task since this one began).
    recorded: bool


def save_item(
    connection: Connection,
    key: ItemKey,
    *,
    roadmap_id: str,
    user_id: str,
    concept_name: str,
    content: ContentModel,
    cost: ItemCost = NOT_CALLED,
) -> ItemSave:
    """Save one item's content as its new latest version, in one statement, adding
    what generating it cost to its ledger row.

    Returns what it did: the new ``content_version``, None when nothing was
    inserted: the ledger says the item was already saved or never planned (then nothing
    is written, the cost included), or another task or delivery saved the
    concept since this task began (then the item ends succeeded, its cost kept).
    """
    row = connection.execute(
        save_statement(key.content_type),
        {
            "task": key.task_id,
            "concept": key.concept_id,
            "item_type": key.content_type.value,
            "roadmap": roadmap_id,
            "owner": user_id,
            "version_title": content.stored_title(concept_name),
            "payload": _stored_payload(key.content_type, content),
            "added_llm_calls": cost.llm_calls,
            "added_input_tokens": cost.input_tokens,
            "added_output_tokens": cost.output_tokens,
        },
    ).one()
    return ItemSave(row.version, row.recorded)


def _stored_payload(content_type: ContentType, content: ContentModel) -> str:
    payload = content.stored_payload()
    if STORAGE[content_type].payload_format is PayloadFormat.JSON:
        return json.dumps(payload)
    return str(payload)


@cache
def save_statement(content_type: ContentType) -> Select[Any]:
    """The statement saving one item of ``content_type`` (see :func:`save_item`).

    Data-modifying CTEs run against one snapshot; each step is gated on the one
    before (EXISTS), which also orders them: the previous version loses
    ``is_latest`` before the new one is inserted, as the unique index requires.
    """
    item = _item_succeeded(content_type).cte("item")
    table = content_tables[content_type]
    previous = (
        update(table)
        .values(is_latest=false())
        .where(
            table.c.roadmap_id == _ROADMAP,
            table.c.concept_id == _CONCEPT,
            table.c.is_latest,
            exists().where(item.c.saves),
        )
        .returning(table.c.content_version)
        .cte("previous")
    )
    # Numbered after every version the concept has (an index lookup), and after
    # the one that just lost is_latest.
    highest = func.greatest(
        select(func.coalesce(func.max(previous.c.content_version), 0)).scalar_subquery(),
        select(func.coalesce(func.max(table.c.content_version), 0))
        .where(table.c.roadmap_id == _ROADMAP, table.c.concept_id == _CONCEPT)
        .scalar_subquery(),
    )
    saved = (
        insert(table)
        .from_select(
            [
                table.c.roadmap_id,
                table.c.concept_id,
                table.c.title,
                payload_column(content_type),
                table.c.content_status,
                table.c.content_version,
                table.c.is_latest,
            ],
            select(
                _ROADMAP,
                _CONCEPT,
                bindparam("version_title", type_=Text),
                cast(bindparam("payload", type_=Text), payload_column(content_type).type),
                constant(ContentStatus.COMPLETED),
                highest + 1,
                true(),
            ).where(item.c.saves),
        )
        .returning(table.c.content_version)
        .cte("saved")
    )
    framework = _framework_completed(content_type, saved).cte("framework")
    return select(
        select(saved.c.content_version).scalar_subquery().label("version"),
        exists().select_from(item).label("recorded"),
    ).add_cte(item, previous, saved, framework)


def _item_succeeded(content_type: ContentType) -> Update:
    """Mark the ledger item succeeded, with its cost; RETURNING whether it saves.

    The ledger, not the message, says which roadmap the item is in; only the
    message's own row (task, roadmap, owner) changes. It saves only while it
    still holds the item: no completed latest row appeared since its task began
    (another task or delivery saved it first: then the item ends succeeded,
    nothing is inserted, one latest version whatever races).
    """
    task_id = cast(_TASK, UUID(as_uuid=False))
    task = retry_tasks.alias("t")
    content = content_tables[content_type].alias("c")
    items = retry_items.c
    return (
        update(retry_items)
        .values(
            status=constant(ItemStatus.SUCCEEDED),
            last_error=null(),
            updated_at=func.now(),
            llm_calls=items.llm_calls + bindparam("added_llm_calls", type_=Integer),
            input_tokens=items.input_tokens + bindparam("added_input_tokens", type_=BigInteger),
            output_tokens=items.output_tokens + bindparam("added_output_tokens", type_=BigInteger),
        )
        .where(
            items.task_id == task_id,
            items.concept_id == _CONCEPT,
            items.content_type == bindparam("item_type", type_=Text),
            items.status != constant(ItemStatus.SUCCEEDED),
            items.roadmap_id == _ROADMAP,
            exists().where(
                task.c.task_id == task_id, task.c.user_id == bindparam("owner", type_=Text)
            ),
        )
        .returning(
            items.roadmap_id,
            ~exists()
            .where(
                completed_latest(content, _ROADMAP, _CONCEPT),
                task.c.task_id == task_id,
                content.c.created_at > task.c.created_at,
            )
            .label("saves"),
        )
    )


def _framework_completed(content_type: ContentType, saved: CTE) -> Update:
    """Set the concept's status for ``content_type`` completed in ``framework_data``,
    once ``saved`` inserted a version.

    ``jsonb_set`` at the concept's first listing, not a rebuild of the tree: an
    UPDATE that waited for another writer's lock re-reads the row, so statuses
    of other concepts written meanwhile are kept; the concept_id check skips the
    status (never the content) if the roadmap was restructured meanwhile.
    """
    roadmap = roadmap_metadata.alias("r")
    stages, modules, concepts = concept_listings(roadmap.c.framework_data)
    concept_path = (
        select(
            roadmap.c.roadmap_id,
            array(
                [
                    constant("stages"),
                    cast(stages.c.i - constant(1), Text),
                    constant("modules"),
                    cast(modules.c.j - constant(1), Text),
                    constant("concepts"),
                    cast(concepts.c.k - constant(1), Text),
                ]
            ).label("path"),
        )
        .select_from(roadmap, stages, modules, concepts)
        .where(
            roadmap.c.roadmap_id == _ROADMAP,
            member_text(concepts.c.concept, "concept_id") == _CONCEPT,
        )
        .order_by(stages.c.i, modules.c.j, concepts.c.k)
        .limit(1)
        .cte("concept_path")
    )
    path = concept_path.c.path
    status_key = STORAGE[content_type].status_key
    return (
        update(roadmap_metadata)
        .values(
            framework_data=func.jsonb_set(
                roadmap_metadata.c.framework_data,
                path.op("||")(array([constant(status_key)])),
                cast(constant(json.dumps(FrameworkStatus.COMPLETED.value)), JSONB),
                true(),
            )
        )
        .where(
            roadmap_metadata.c.roadmap_id == _ROADMAP,
            roadmap_metadata.c.roadmap_id == concept_path.c.roadmap_id,
            roadmap_metadata.c.framework_data.op("#>>", return_type=Text)(
                path.op("||")(array([constant("concept_id")]))
            )
            == _CONCEPT,
            exists().select_from(saved),
        )
        .returning(roadmap_metadata.c.roadmap_id)
    )
