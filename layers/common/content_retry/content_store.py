"""The worker's save stage: a message's generated content and permanent failures,
saved in one transaction (retried once on a race, item by item if content is refused)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError, IntegrityError

from content_retry.content_types import STORAGE, ContentType
from content_retry.costs import NOT_CALLED, ItemCost
from content_retry.database import BatchConnection, refused_data
from content_retry.generated import ContentModel
from content_retry.messages import RetryMessage
from content_retry.observability import logger, metrics
from content_retry.repositories import claims
from content_retry.repositories.claims import ItemKey
from content_retry.repositories.content_versions import save_item
from content_retry.repositories.roadmaps import patch_concept_statuses
from content_retry.statuses import FrameworkStatus, ItemStatus


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
    permanent_failures: Mapping[ContentType, str],
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
        return SavedMessage(_save_racing(database, message, to_save, permanent_failures, costs))
    except DBAPIError as exc:
        if not refused_data(exc):
            raise
        logger.warning("retry_item_content_refused", extra={"error": repr(exc)})
    return _save_one_by_one(database, message, to_save, permanent_failures, costs)


def _save_racing(
    database: BatchConnection,
    message: RetryMessage,
    to_save: Mapping[ContentType, ContentModel],
    permanent_failures: Mapping[ContentType, str],
    costs: Mapping[ItemKey, ItemCost],
) -> dict[ContentType, int | None]:
    try:
        return _save_transaction(database, message, to_save, permanent_failures, costs)
    except IntegrityError as exc:
        if "_one_latest_per_concept" not in str(exc):
            raise
        logger.info("retry_item_save_raced")
    return _save_transaction(database, message, to_save, permanent_failures, costs)


def _save_one_by_one(
    database: BatchConnection,
    message: RetryMessage,
    to_save: Mapping[ContentType, ContentModel],
    permanent_failures: Mapping[ContentType, str],
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
    _save_transaction(database, message, {}, {**permanent_failures, **saved.refused}, costs)
    return saved


def _save_transaction(
    database: BatchConnection,
    message: RetryMessage,
    to_save: Mapping[ContentType, ContentModel],
    permanent_failures: Mapping[ContentType, str],
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
        failed_now = set()
        for content_type, error in permanent_failures.items():
            key = ItemKey(task_id, concept_id, content_type)
            if claims.record_outcomes(
                connection,
                [key],
                status=ItemStatus.FAILED,
                error=error,
                roadmap_id=message.roadmap_id,
                user_id=message.user_id,
            ):
                failed_now.add(content_type)
        # Only what failed now: an item another delivery saved meanwhile keeps
        # the completed status its save wrote.
        if failed_now:
            patch_concept_statuses(
                connection,
                message.roadmap_id,
                {
                    concept_id: {
                        STORAGE[content_type].status_key: FrameworkStatus.FAILED
                        for content_type in failed_now
                    }
                },
            )
        # What the saves above did not record: the calls of items not saved now
        # (failed, or saved by another delivery meanwhile: paid all the same).
        claims.add_costs(
            connection,
            {key: cost for key, cost in costs.items() if key.content_type not in recorded},
            roadmap_id=message.roadmap_id,
            user_id=message.user_id,
        )
    return versions
