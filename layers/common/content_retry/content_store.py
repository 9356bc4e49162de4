"""Saving generated content into the platform's tables, versioned (DESIGN §3, §6).

One statement saves one item: it marks the ledger item succeeded, takes
``is_latest`` from the previous version, inserts the new version (previous
+ 1), and sets the concept's framework status. :func:`save_message` runs a
message's items and its permanent failures in one transaction: saved
together or not at all. The ledger update comes first and only succeeds once
per item, so a duplicate or re-driven delivery saves nothing twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

from sqlalchemy import Connection, TextClause, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from content_retry import ledger
from content_retry.content_types import STORAGE, ContentType, PayloadFormat
from content_retry.costs import NOT_CALLED, ItemCost
from content_retry.database import BatchConnection, refused_data
from content_retry.generated import ContentModel
from content_retry.ledger import ItemKey
from content_retry.messages import RetryMessage
from content_retry.observability import logger, metrics
from content_retry.roadmaps import array_or_empty, patch_concept_statuses
from content_retry.statuses import ContentStatus, FrameworkStatus, ItemStatus


@cache
def _save_statement(content_type: ContentType) -> TextClause:
    storage = STORAGE[content_type]
    payload_value = f"CAST(:payload AS {storage.payload_sql_type})"
    table = storage.table
    # Data-modifying CTEs run against one snapshot; each step is gated on the
    # one before (EXISTS), which also orders them: the previous version loses
    # is_latest before the new one is inserted, as the unique index requires.
    # - item: the ledger, not the message, says which roadmap the item is in;
    #   only the message's own row (task, roadmap, owner) changes. It saves only
    #   while it still holds the item: no completed latest row appeared since
    #   its task began (another task or delivery saved it first: then the item
    #   ends succeeded, nothing is inserted, one latest version whatever races).
    # - concept_path: where the concept sits in framework_data (first listing).
    # - framework: jsonb_set at that one path, not a rebuild of the tree. An
    #   UPDATE that waited for another writer's lock re-reads the row, so
    #   statuses of other concepts written meanwhile are kept; the concept_id
    #   check skips the status (never the content) if the roadmap was
    #   restructured meanwhile.
    # No SQL comments inside: pg8000 rescans the text on every execution.
    return text(
        f"""
WITH item AS (
  UPDATE retry_items
  SET status = '{ItemStatus.SUCCEEDED}', last_error = NULL, updated_at = now(),
      llm_calls = llm_calls + :llm_calls, input_tokens = input_tokens + :input_tokens,
      output_tokens = output_tokens + :output_tokens
  WHERE task_id = CAST(:task_id AS uuid) AND concept_id = :concept_id
    AND content_type = :content_type AND status <> '{ItemStatus.SUCCEEDED}'
    AND roadmap_id = :roadmap_id
    AND EXISTS (SELECT 1 FROM retry_tasks AS t
                WHERE t.task_id = CAST(:task_id AS uuid) AND t.user_id = :user_id)
  RETURNING roadmap_id,
    NOT EXISTS (SELECT 1 FROM {table} AS c, retry_tasks AS t
                WHERE c.roadmap_id = :roadmap_id AND c.concept_id = :concept_id
                  AND c.is_latest AND c.content_status = '{ContentStatus.COMPLETED}'
                  AND t.task_id = CAST(:task_id AS uuid) AND c.created_at > t.created_at)
      AS saves
),
previous AS (
  UPDATE {table} SET is_latest = false
  WHERE roadmap_id = :roadmap_id AND concept_id = :concept_id AND is_latest
    AND EXISTS (SELECT 1 FROM item WHERE saves)
  RETURNING content_version
),
saved AS (
  INSERT INTO {table}
    (roadmap_id, concept_id, title, {storage.payload_column}, content_status, content_version,
     is_latest)
  SELECT :roadmap_id, :concept_id, :title, {payload_value}, '{ContentStatus.COMPLETED}',
         greatest(
           (SELECT coalesce(max(content_version), 0) FROM previous),
           (SELECT coalesce(max(content_version), 0) FROM {table}
            WHERE roadmap_id = :roadmap_id AND concept_id = :concept_id)) + 1,
         true
  FROM item WHERE saves
  RETURNING content_version
),
concept_path AS (
  SELECT ARRAY['stages', (s.i - 1)::text, 'modules', (m.j - 1)::text,
               'concepts', (c.k - 1)::text] AS path
  FROM roadmap_metadata AS r,
       jsonb_array_elements({array_or_empty("r.framework_data -> 'stages'")})
         WITH ORDINALITY AS s(stage, i),
       jsonb_array_elements({array_or_empty("s.stage -> 'modules'")})
         WITH ORDINALITY AS m(module, j),
       jsonb_array_elements({array_or_empty("m.module -> 'concepts'")})
         WITH ORDINALITY AS c(concept, k)
  WHERE r.roadmap_id = :roadmap_id AND c.concept ->> 'concept_id' = :concept_id
  ORDER BY s.i, m.j, c.k
  LIMIT 1
),
framework AS (
  UPDATE roadmap_metadata AS r
  SET framework_data = jsonb_set(
        r.framework_data, p.path || ARRAY['{storage.status_key}'],
        '"{FrameworkStatus.COMPLETED}"'::jsonb, true)
  FROM concept_path AS p
  WHERE r.roadmap_id = :roadmap_id
    AND r.framework_data #>> (p.path || ARRAY['concept_id']) = :concept_id
    AND EXISTS (SELECT 1 FROM saved)
  RETURNING 1
)
SELECT (SELECT content_version FROM saved) AS version, EXISTS (SELECT 1 FROM item) AS recorded
"""  # noqa: S608 - table and column names come from STORAGE; values are bound  # nosec B608
    )


def _stored_payload(content_type: ContentType, content: ContentModel) -> str:
    payload = content.stored_payload()
    if STORAGE[content_type].payload_format is PayloadFormat.JSON:
        return json.dumps(payload)
    return str(payload)


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
    """Save one item's content as its new latest version, in the caller's transaction,
    adding what generating it cost to its ledger row.

    Returns the new ``content_version``, or None when nothing was inserted:
    the ledger says the item was already saved or never planned (then nothing
    is written, the cost included), or another task or delivery saved the
    concept since this task began (then the item ends succeeded, its cost kept).
    """
    row = connection.execute(
        _save_statement(key.content_type),
        {
            "task_id": key.task_id,
            "concept_id": key.concept_id,
            "content_type": key.content_type.value,
            "roadmap_id": roadmap_id,
            "user_id": user_id,
            "title": content.stored_title(concept_name),
            "payload": _stored_payload(key.content_type, content),
            "llm_calls": cost.llm_calls,
            "input_tokens": cost.input_tokens,
            "output_tokens": cost.output_tokens,
        },
    ).one()
    return ItemSave(row.version, row.recorded)


@dataclass(frozen=True)
class ItemSave:
    """What one item's save statement did."""

    # The new version, None when none was inserted.
    version: int | None
    # The ledger row was marked succeeded, with the cost (saved now, or found
    # saved by another task since this one began).
    recorded: bool


@dataclass
class SavedMessage:
    """What a message's save came to."""

    # Each saved item's new version, None for an item saved before.
    versions: dict[ContentType, int | None] = field(default_factory=dict)
    # Items whose content the database refused (then recorded failed), with why.
    refused: dict[ContentType, str] = field(default_factory=dict)

    def log_and_count(self, failed: Mapping[ContentType, str]) -> None:
        """Log and count what the save came to, with the items that failed permanently."""
        for content_type, version in self.versions.items():
            if version is None:
                logger.info("retry_item_skipped", extra={"content_type": content_type.value})
                continue
            logger.info(
                "retry_item_saved",
                extra={"content_type": content_type.value, "content_version": version},
            )
            metrics.add_metric(name="ItemsSaved", unit="Count", value=1)
        for content_type, error in {**failed, **self.refused}.items():
            logger.warning(
                "retry_item_failed", extra={"content_type": content_type.value, "error": error}
            )
            metrics.add_metric(name="ItemsFailed", unit="Count", value=1)


def save_message(
    database: BatchConnection,
    message: RetryMessage,
    to_save: Mapping[ContentType, ContentModel],
    failed_for_good: Mapping[ContentType, str],
    costs: Mapping[ItemKey, ItemCost],
) -> SavedMessage:
    """Save a message's generated items, record its permanent failures and what its
    LLM calls cost, in one transaction.

    Another task saving the same concept's new version at the same moment
    makes the unique latest-row index refuse one of the two: that save is
    tried once more, on a fresh snapshot that sees the other version and goes
    on top of it. Content the database refuses as data (which the generated
    models keep out: this is the net under them) fails only its own item:
    the items are then saved one by one.

    Raises:
        One of ``DATABASE_ERRORS``: the save failed; nothing of it was written.
    """
    try:
        return SavedMessage(_save_racing(database, message, to_save, failed_for_good, costs))
    except DBAPIError as exc:
        if not refused_data(exc):
            raise
        logger.warning("retry_item_content_refused", extra={"error": repr(exc)})
    return _save_one_by_one(database, message, to_save, failed_for_good, costs)


def _save_racing(
    database: BatchConnection,
    message: RetryMessage,
    to_save: Mapping[ContentType, ContentModel],
    failed_for_good: Mapping[ContentType, str],
    costs: Mapping[ItemKey, ItemCost],
) -> dict[ContentType, int | None]:
    try:
        return _save_transaction(database, message, to_save, failed_for_good, costs)
    except IntegrityError as exc:
        if "_one_latest_per_concept" not in str(exc):
            raise
        logger.info("retry_item_save_raced")
    return _save_transaction(database, message, to_save, failed_for_good, costs)


def _save_one_by_one(
    database: BatchConnection,
    message: RetryMessage,
    to_save: Mapping[ContentType, ContentModel],
    failed_for_good: Mapping[ContentType, str],
    costs: Mapping[ItemKey, ItemCost],
) -> SavedMessage:
    saved = SavedMessage()
    for content_type, content in to_save.items():
        try:
            saved.versions |= _save_racing(database, message, {content_type: content}, {}, {})
        except DBAPIError as exc:
            if not refused_data(exc):
                raise
            saved.refused[content_type] = f"the database refused the content: {exc.orig}"[:500]
    _save_transaction(database, message, {}, {**failed_for_good, **saved.refused}, costs)
    return saved


def _save_transaction(
    database: BatchConnection,
    message: RetryMessage,
    to_save: Mapping[ContentType, ContentModel],
    failed_for_good: Mapping[ContentType, str],
    costs: Mapping[ItemKey, ItemCost],
) -> dict[ContentType, int | None]:
    task_id, concept_id = str(message.task_id), message.concept.concept_id
    with database.transaction() as connection:
        versions: dict[ContentType, int | None] = {}
        recorded: set[ContentType] = set()
        for content_type, content in to_save.items():
            key = ItemKey(task_id, concept_id, content_type)
            item = save_item(
                connection,
                key,
                concept_name=message.concept.name,
                content=content,
                cost=costs.get(key, NOT_CALLED),
                roadmap_id=message.roadmap_id,
                user_id=message.user_id,
            )
            versions[content_type] = item.version
            if item.recorded:
                recorded.add(content_type)
        ended_now = set()
        for content_type, error in failed_for_good.items():
            key = ItemKey(task_id, concept_id, content_type)
            failed = ItemStatus.FAILED
            if ledger.record_outcomes(
                connection,
                [key],
                status=failed,
                error=error,
                roadmap_id=message.roadmap_id,
                user_id=message.user_id,
            ):
                ended_now.add(content_type)
        # Only what failed now: an item another delivery saved meanwhile keeps
        # the completed status its save wrote.
        if ended_now:
            patch_concept_statuses(
                connection,
                message.roadmap_id,
                {
                    concept_id: {
                        STORAGE[content_type].status_key: FrameworkStatus.FAILED
                        for content_type in ended_now
                    }
                },
            )
        # What the saves above did not record: the calls of items not saved now
        # (failed, or saved by another delivery meanwhile: paid all the same).
        ledger.add_costs(
            connection,
            {key: cost for key, cost in costs.items() if key.content_type not in recorded},
            roadmap_id=message.roadmap_id,
            user_id=message.user_id,
        )
    return versions
