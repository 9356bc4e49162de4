"""A batch's records as the worker takes them: parsed, deduplicated, started in the ledger.

Starting every item of the batch in one statement, before any LLM call,
counts an attempt and renews each claim, and tells which items need no
generation (ended for their task, or completed by someone else meanwhile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from content_retry import ledger
from content_retry.content_types import ContentType
from content_retry.database import DATABASE_ERRORS, BatchConnection
from content_retry.ledger import ItemKey, StartedItem
from content_retry.messages import RetryMessage
from content_retry.observability import logger
from content_retry.validation import describe_errors


@dataclass
class Delivery:
    """One record of the batch."""

    message: RetryMessage | None = None
    # Why the body is not a valid message (then ``message`` is None).
    invalid_reason: str | None = None
    # Every item of this message is also in an earlier record of the batch
    # (SQS delivered it twice at once): acknowledged without an LLM call.
    duplicate: bool = False
    started: dict[ContentType, StartedItem] = field(default_factory=dict)

    @property
    def not_planned(self) -> list[ContentType]:
        """Items the ledger has no entry for: the pipeline's judge never planned them."""
        return [ct for ct, item in self.started.items() if item.status_before is None]


@dataclass
class Deliveries:
    by_message_id: dict[str, Delivery]
    # Set when the items could not be started: every record must come back.
    start_failed: str | None = None


def item_keys(message: RetryMessage) -> list[ItemKey]:
    """The deduplication keys of a message's items."""
    return [
        ItemKey(str(message.task_id), message.concept.concept_id, item.content_type)
        for item in message.items
    ]


def prepare_deliveries(database: BatchConnection, records: Sequence[dict[str, Any]]) -> Deliveries:
    """Parse every record's body, then start every item of the batch in one statement."""
    deliveries = Deliveries({})
    keys: list[ItemKey] = []
    for record in records:
        delivery = deliveries.by_message_id[record.get("messageId", "")] = Delivery()
        try:
            delivery.message = RetryMessage.model_validate_json(record.get("body") or "")
        except ValidationError as exc:
            delivery.invalid_reason = "; ".join(describe_errors(exc.errors(), whole="body"))
            continue
        message_keys = item_keys(delivery.message)
        # A copy carrying generated content is never dropped for another.
        if delivery.message.generated is None and set(message_keys) <= set(keys):
            delivery.duplicate = True
            continue
        keys += [key for key in message_keys if key not in keys]
    try:
        with database.transaction() as connection:
            started = ledger.start_items(connection, keys)
    except DATABASE_ERRORS as exc:
        logger.exception("retry_batch_start_failed", extra={"items": len(keys)})
        deliveries.start_failed = f"database unavailable: {exc!r}"
        return deliveries
    for delivery in deliveries.by_message_id.values():
        if delivery.message is not None and not delivery.duplicate:
            delivery.started = {
                key.content_type: started[key] for key in item_keys(delivery.message)
            }
    return deliveries
