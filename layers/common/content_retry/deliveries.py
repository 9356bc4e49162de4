"""The worker's parse stage: a batch's records as retry messages, deduplicated,
and what each still needs once started (generation, or saving the content it brings)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from content_retry.content_types import ContentType
from content_retry.costs import ItemCost, costs_from_text
from content_retry.generated import ContentModel
from content_retry.generation import ItemToGenerate, MessageRequest
from content_retry.messages import RetryMessage
from content_retry.queue import PAID_ATTRIBUTE
from content_retry.repositories.claims import DeliveredItem, ItemKey, StartedItem
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
    # What a dead-letter copy says its generated content cost (its ``paid`` attribute).
    provided_costs: dict[ContentType, ItemCost] = field(default_factory=dict)

    @property
    def not_planned(self) -> list[ContentType]:
        """Items the ledger has no entry for: the pipeline's judge never planned them."""
        return [ct for ct, item in self.started.items() if item.status_before is None]

    @property
    def finished_items(self) -> list[ContentType]:
        """Items finished for their task already (a redelivery, or saved by someone else)."""
        return [ct for ct, item in self.started.items() if item.already_done]

    @property
    def open_items(self) -> list[ContentType]:
        """Items this delivery still has to settle (not those another delivery holds)."""
        return [
            ct
            for ct, item in self.started.items()
            if not item.already_done and item.hold_seconds_left is None
        ]

    @property
    def hold_seconds_left(self) -> float | None:
        """How long another live delivery still holds one of the items (None: none does)."""
        held = [item.hold_seconds_left for item in self.started.values() if item.hold_seconds_left]
        return max(held) if held else None

    def items_to_generate(self) -> list[ItemToGenerate]:
        """Open items the message brings no generated content for (usable or rejected)."""
        provided = self.message.generated if self.message is not None else None
        return [
            ItemToGenerate(content_type, item.llm_calls)
            for content_type, item in self.started.items()
            if content_type in self.open_items
            and (
                provided is None
                or (provided.get(content_type) is None and content_type not in provided.unusable)
            )
        ]

    def log_keys(self, message_id: str) -> dict[str, str]:
        """What every log line about the record carries (DESIGN §11): its message
        id and, when the body is a retry message, its task, roadmap and concept."""
        keys = {"message_id": message_id}
        if self.message is not None:
            keys |= {
                "task_id": str(self.message.task_id),
                "roadmap_id": self.message.roadmap_id,
                "concept_id": self.message.concept.concept_id,
            }
        return keys

    def request(self, message_id: str) -> MessageRequest | None:
        """What to generate for this record (possibly nothing, when it only
        brings content to save); None when it has nothing left to do."""
        message = self.message
        assert message is not None
        to_generate = self.items_to_generate()
        if not to_generate and not self.provided_content() and not self.unusable_provided_content():
            return None
        return MessageRequest(
            message_id,
            str(message.task_id),
            message.roadmap_id,
            message.concept,
            message.preferences,
            to_generate,
        )

    def provided_content(self) -> dict[ContentType, ContentModel]:
        """The generated content a (re-driven) message brings for its open items: saved
        without an LLM call."""
        provided = self.message.generated if self.message is not None else None
        if provided is None:
            return {}
        return {
            content_type: content
            for content_type in self.open_items
            if (content := provided.get(content_type)) is not None
        }

    def unusable_provided_content(self) -> dict[ContentType, str]:
        """Open items whose generated content in the message cannot be used: each fails
        permanently.

        Content the database cannot store fails the same way however often it is
        tried (or re-driven); the message's other items are saved all the same.
        """
        provided = self.message.generated if self.message is not None else None
        if provided is None:
            return {}
        open_items = self.open_items
        return {
            content_type: f"the generated content in the message cannot be used: {reason}"
            for content_type, reason in provided.unusable.items()
            if content_type in open_items
        }


@dataclass
class Deliveries:
    by_message_id: dict[str, Delivery]
    # Set when the items could not be started: every record must come back.
    start_failed: str | None = None

    def record_started(self, started: Mapping[ItemKey, StartedItem]) -> None:
        """Give each delivery its items as the ledger started them."""
        for delivery in self.by_message_id.values():
            if delivery.message is not None and not delivery.duplicate:
                delivery.started = {
                    key.content_type: started[key] for key in item_keys(delivery.message)
                }


def read_message(body: str) -> RetryMessage:
    """A record's body as a retry message.

    Parsed by Python's JSON reader, which (unlike pydantic's) reads an unpaired
    surrogate escape into the string: content holding one is then rejected
    as unusable by itself, instead of making the whole message unreadable.

    Raises:
        ValueError: the body is not a retry message; the message says why.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"body: not a JSON document ({type(exc).__name__}: {exc})"[:500]) from exc
    try:
        return RetryMessage.model_validate(data)
    except ValidationError as exc:
        raise ValueError("; ".join(describe_errors(exc.errors(), whole="body"))) from exc


def _delivered_items(
    message: RetryMessage, message_id: str | None, receives: int
) -> list[DeliveredItem]:
    """A message's items as this delivery names them (key, roadmap, owner,
    generated content brought, the SQS message and its receive count)."""
    provided = message.generated
    return [
        DeliveredItem(
            key,
            message.roadmap_id,
            message.user_id,
            has_content=provided is not None and provided.get(key.content_type) is not None,
            message_id=message_id,
            receive_count=receives,
        )
        for key in item_keys(message)
    ]


def item_keys(message: RetryMessage) -> list[ItemKey]:
    """The deduplication keys of a message's items."""
    return [
        ItemKey(str(message.task_id), message.concept.concept_id, item.content_type)
        for item in message.items
    ]


def parse_deliveries(records: Sequence[dict[str, Any]]) -> tuple[Deliveries, list[DeliveredItem]]:
    """Parse every record's body; returns the batch's deliveries and the items to
    start, one entry per item (the same item in two messages is started once)."""
    deliveries = Deliveries({})
    # A dead-letter copy with content wins: it need not wait for another delivery.
    items: dict[tuple[ItemKey, str, str], DeliveredItem] = {}
    for record in records:
        delivery = deliveries.by_message_id[record.get("messageId", "")] = Delivery()
        paid = (record.get("messageAttributes") or {}).get(PAID_ATTRIBUTE) or {}
        delivery.provided_costs = costs_from_text(paid.get("stringValue"))
        try:
            delivery.message = read_message(record.get("body") or "")
        except ValueError as exc:
            delivery.invalid_reason = str(exc)
            continue
        receives = int((record.get("attributes") or {}).get("ApproximateReceiveCount") or 1)
        delivered = _delivered_items(delivery.message, record.get("messageId"), receives)
        # A dead-letter copy with content is never dropped for another.
        if delivery.message.generated is None and all(
            (item.key, item.roadmap_id, item.user_id) in items for item in delivered
        ):
            delivery.duplicate = True
            continue
        for item in delivered:
            known = items.get((item.key, item.roadmap_id, item.user_id))
            if known is None or item.has_content:
                items[(item.key, item.roadmap_id, item.user_id)] = item
    return deliveries, list(items.values())
