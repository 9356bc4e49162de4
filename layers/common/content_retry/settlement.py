"""How each record of a batch ends: one typed outcome (acknowledge, return later,
dead-letter with its reason and content), carried out on SQS."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from content_retry.content_types import ContentType
from content_retry.costs import ItemCost, costs_to_text
from content_retry.generated import ContentModel, GeneratedContent
from content_retry.generation import THROTTLED_DELAY_SECONDS, NotCalledError, PacedError
from content_retry.generators import ConfigurationError, ThrottledError
from content_retry.messages import RetryMessage
from content_retry.observability import logger, metrics
from content_retry.queue import DeadLetterError, dead_letter
from content_retry.redrive import has_generated_content
from content_retry.settings import Settings
from content_retry.statuses import ItemStatus

# SQS's longest DelaySeconds.
MAX_DELAY_SECONDS = 900


@dataclass(frozen=True)
class Acknowledge:
    """Done with: SQS deletes the record."""

    # Its generated content now waits in the dead-letter queue for a re-drive.
    content_in_dlq: bool = False


@dataclass(frozen=True)
class ReturnLater:
    """Back to the queue; after ``delay_seconds`` if set, else the visibility timeout."""

    error: Exception
    delay_seconds: float | None = None


@dataclass(frozen=True)
class DeadLetter:
    """To the dead-letter queue with its reason (and any generated content in ``body``)."""

    body: str
    reason: str
    detail: str
    items: int = 1
    generated: list[str] = field(default_factory=list)
    # What the content cost, for the ledger of the save that re-drives it.
    paid: str | None = None


RecordOutcome = Acknowledge | ReturnLater | DeadLetter
# What to note in the ledger for a record's items: status and error.
Notes = dict[ContentType, tuple[ItemStatus, str]]


def dead_letter_copy(
    message: RetryMessage,
    open_items: list[ContentType],
    to_save: Mapping[ContentType, ContentModel],
    failed: Mapping[ContentType, str],
    paid: Mapping[ContentType, ItemCost],
    error: BaseException,
) -> tuple[DeadLetter, Notes]:
    """The dead-letter copy of a message whose save failed, carrying what was
    generated and what it cost, and the notes for its items: the re-drive saves
    the open ones, the ones that failed permanently stay so."""
    generated = GeneratedContent.of(dict(to_save)) if to_save else message.generated
    body = message.model_copy(update={"generated": generated}).to_body()
    notes: Notes = dict.fromkeys(open_items, (ItemStatus.DEAD_LETTERED, f"save failed: {error!r}"))
    notes |= {ct: (ItemStatus.FAILED, reason) for ct, reason in failed.items()}
    dead = DeadLetter(
        body, "save_failed", repr(error), len(to_save) or 1, sorted(to_save), costs_to_text(paid)
    )
    return dead, notes


class HeldByAnotherDeliveryError(NotCalledError):
    """Another live delivery is generating the item: this one comes back after it."""


def waits_its_turn(error: Exception) -> bool:
    """The LLM quota or another live delivery, not the item, holds the record back."""
    return isinstance(error, ThrottledError | PacedError | HeldByAnotherDeliveryError)


def last_delivery_reason(error: Exception) -> str:
    """The dead-letter reason of a record returned on its last delivery."""
    if isinstance(error, DeadLetterError):
        return error.reason
    if isinstance(error, ConfigurationError):
        return "configuration"
    if isinstance(error, NotCalledError):
        return "not_processed"
    return "retries_exhausted"


class Settlement:
    """Carries out records' outcomes on SQS; what it cannot do becomes a return."""

    def __init__(self, sqs: Any, settings: Settings) -> None:
        self._sqs = sqs
        self._settings = settings

    def dead_letter(self, outcome: DeadLetter) -> RecordOutcome:
        """Send to the DLQ; a refused send returns the record, keeping its content."""
        try:
            dead_letter(
                self._sqs,
                self._settings.require("retry_dlq_url"),
                outcome.body,
                reason=outcome.reason,
                detail=outcome.detail,
                paid=outcome.paid,
            )
        except DeadLetterError as exc:
            logger.warning("retry_record_returned", extra={"error": repr(exc)})
            return ReturnLater(exc)
        logger.warning(
            "retry_item_dead_lettered",
            extra={"reason": outcome.reason, "generated": outcome.generated},
        )
        metrics.add_metric(name="ItemsDeadLettered", unit="Count", value=outcome.items)
        return Acknowledge(content_in_dlq=has_generated_content(outcome.body))

    def delay(self, record: dict[str, Any], seconds: float) -> None:
        """Make a returned record visible again after ``seconds``, not the whole
        visibility timeout (best effort: without it, the timeout applies)."""
        queue_url = self._settings.retry_queue_url
        if not queue_url or not record.get("receiptHandle"):
            return
        try:
            self._sqs.change_message_visibility(
                QueueUrl=queue_url,
                ReceiptHandle=record["receiptHandle"],
                VisibilityTimeout=min(math.ceil(seconds), 43_200),
            )
        except Exception as exc:  # the visibility timeout applies instead
            logger.warning("retry_record_delay_not_set", extra={"error": repr(exc)})

    def requeue(self, body: str, seconds: float) -> bool:
        """Send the body back to the retry queue as a fresh message (its deliveries
        counted anew), after ``seconds``; False when the queue refused it."""
        try:
            self._sqs.send_message(
                QueueUrl=self._settings.require("retry_queue_url"),
                MessageBody=body,
                DelaySeconds=min(math.ceil(seconds), MAX_DELAY_SECONDS),
            )
        except Exception as exc:
            logger.warning("retry_record_not_requeued", extra={"error": repr(exc)})
            return False
        logger.info("retry_record_requeued", extra={"delay_seconds": math.ceil(seconds)})
        return True

    def return_record(
        self,
        record: dict[str, Any],
        outcome: ReturnLater,
        message: RetryMessage | None,
        notes: Notes,
    ) -> tuple[RecordOutcome, Notes]:
        """A record going back to the queue, and the notes for its items; on its
        last delivery it is dead-lettered with its reason instead (or requeued
        fresh, when only the quota or another delivery held it back)."""
        logger.warning("retry_record_returned", extra={"error": repr(outcome.error)})
        receives = int((record.get("attributes") or {}).get("ApproximateReceiveCount") or 1)
        delay = outcome.delay_seconds
        if receives < self._settings.max_receive_count:
            if delay is not None:
                self.delay(record, delay)
            return outcome, notes
        body = record.get("body") or ""
        error = outcome.error
        if waits_its_turn(error) and self.requeue(body, delay or THROTTLED_DELAY_SECONDS):
            return Acknowledge(), notes
        detail = f"{receives} deliveries, the last one: {error}"
        # What this delivery could not dead-letter (a dead-letter copy with content) goes first.
        paid = getattr(error, "paid", None)
        for candidate in dict.fromkeys([getattr(error, "body", body), body]):
            dead = DeadLetter(candidate, last_delivery_reason(error), detail, paid=paid)
            sent = self.dead_letter(dead)
            if isinstance(sent, Acknowledge):
                kinds = [item.content_type for item in message.items] if message else []
                note = (ItemStatus.DEAD_LETTERED, f"dead-lettered after {detail}")
                return sent, dict.fromkeys(kinds, note)
        return outcome, notes  # SQS moves it anyway; nothing better is left
