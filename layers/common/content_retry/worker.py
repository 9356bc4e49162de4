"""The generate function's work: one SQS batch of retry messages (DESIGN §6).

The worker never re-decides what needs retry: it generates the items the
messages name, all of the batch's LLM calls at once
(:mod:`content_retry.generation`, which also sorts what went wrong), and saves
each message as soon as its items are done (:mod:`content_retry.content_store`),
on the batch's one database connection. Per record:

- not a valid message, or one the ledger never planned: dead-lettered
  unchanged with the reason, acknowledged;
- every item already ended for its task: skipped, acknowledged;
- generated but not saved: the message goes to the dead-letter queue with
  ``generated`` filled, acknowledged; if that send fails too, the record fails
  and SQS redelivers it;
- an item to try later (transient LLM error, too little time left): what was
  generated is saved, and the record fails so SQS redelivers it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from sqlalchemy import Engine

from content_retry import ledger
from content_retry.content_store import save_message
from content_retry.content_types import ContentType
from content_retry.costs import ItemCost
from content_retry.database import DATABASE_ERRORS, BatchConnection
from content_retry.deliveries import (
    Deliveries,
    Delivery,
    item_keys,
    item_types,
    prepare_deliveries,
)
from content_retry.generated import ContentModel, GeneratedContent
from content_retry.generation import BatchGeneration, MessageGeneration, MessageRequest
from content_retry.generators import ContentGenerator, TransientGenerationError
from content_retry.messages import RetryMessage
from content_retry.observability import logger, metrics, record_llm_costs, traced
from content_retry.queue import DeadLetterError, dead_letter
from content_retry.settings import Settings
from content_retry.statuses import ItemStatus


@dataclass
class WorkerDependencies:
    """What the worker needs from the outside; tests pass their own."""

    engine: Engine
    sqs: Any
    settings: Settings
    generator: ContentGenerator


def default_worker_dependencies() -> WorkerDependencies:
    """The process's engine, SQS client, settings and generator, created on first use."""
    from content_retry.aws import client
    from content_retry.database import get_engine
    from content_retry.generators import get_generator
    from content_retry.settings import get_settings

    return WorkerDependencies(
        engine=get_engine(), sqs=client("sqs"), settings=get_settings(), generator=get_generator()
    )


class RetryBatch:
    """Processes one SQS event; :meth:`run` returns the partial-batch response."""

    def __init__(self, deps: WorkerDependencies, context: LambdaContext | None) -> None:
        self.deps = deps
        self.context = context
        self.database = BatchConnection(deps.engine)
        self.deliveries = Deliveries({})
        # Per record: the error that sends it back to SQS, or None (acknowledged).
        self.outcomes: dict[str, Exception | None] = {}
        self.costs: dict[ContentType, ItemCost] = defaultdict(ItemCost)

    def run(self, event: dict[str, Any]) -> dict[str, Any]:
        records = event.get("Records") or []
        with self.database:
            self.deliveries = prepare_deliveries(self.database, records)
            requests = [self._route(record) for record in records]
            self._generate_and_save([request for request in requests if request is not None])
            for record in records:
                self._dead_letter_if_last_delivery(record)
        record_llm_costs(self.costs)
        processor = BatchProcessor(
            event_type=EventType.SQS,
            # Every record failing is an ordinary answer here, not an exception.
            raise_on_entire_batch_failure=False,
        )
        response = process_partial_response(
            event=event, record_handler=self._report, processor=processor, context=self.context
        )
        return dict(response)

    def _report(self, record: SQSRecord) -> None:
        """The record's outcome, as the batch processor takes it: raise to fail it."""
        error = self.outcomes.get(record.message_id)
        if error is not None:
            raise error

    def _route(self, record: dict[str, Any]) -> MessageRequest | None:
        """Settle a record that needs no generation; otherwise, what to generate for it."""
        message_id = record.get("messageId", "")
        delivery = self.deliveries.by_message_id[message_id]
        self.outcomes[message_id] = None
        with logger.append_context_keys(**self._log_keys(message_id)):
            try:
                return self._request(message_id, record.get("body") or "", delivery)
            except Exception as exc:  # the record goes back to SQS; the others go on
                logger.warning("retry_record_returned", extra={"error": repr(exc)})
                self.outcomes[message_id] = exc
                return None

    def _dead_letter_if_last_delivery(self, record: dict[str, Any]) -> None:
        """A record going back to SQS on its last delivery goes to the dead-letter
        queue now, with its reason: SQS's redrive would move it without one."""
        message_id = record.get("messageId", "")
        error = self.outcomes.get(message_id)
        receives = int((record.get("attributes") or {}).get("ApproximateReceiveCount") or 1)
        if error is None or receives < self.deps.settings.max_receive_count:
            return
        body, reason = record.get("body") or "", "retries_exhausted"
        detail = f"{receives} deliveries, the last one: {error}"
        if isinstance(error, DeadLetterError):
            # What this delivery could not dead-letter (a copy carrying the
            # generated content, say) is what goes, with its own reason.
            body, reason, detail = error.body, error.reason, f"{error.detail} ({detail})"
        with logger.append_context_keys(**self._log_keys(message_id)):
            if not self._dead_letter_first_of([body, record.get("body") or ""], reason, detail):
                return  # SQS moves it anyway; nothing better is left
        self.outcomes[message_id] = None
        message = self.deliveries.by_message_id[message_id].message
        if message is not None:
            note = (ItemStatus.DEAD_LETTERED, f"dead-lettered after {detail}")
            self._record_best_effort(message, dict.fromkeys(item_types(message), note), {})

    def _dead_letter_first_of(self, bodies: list[str], reason: str, detail: str) -> bool:
        """Dead-letter the first of ``bodies`` the DLQ takes (a copy carrying
        content may be refused for itself, as too large); False if none."""
        for body in dict.fromkeys(bodies):
            try:
                self._dead_letter(body, reason, detail, items=1)
            except Exception as exc:
                logger.warning("retry_record_returned", extra={"error": repr(exc)})
            else:
                return True
        return False

    def _request(self, message_id: str, body: str, delivery: Delivery) -> MessageRequest | None:
        if delivery.invalid_reason is not None:
            self._dead_letter(body, "invalid_message", delivery.invalid_reason, items=1)
            return None
        message = delivery.message
        assert message is not None
        if delivery.duplicate:
            logger.info("retry_item_skipped", extra={"reason": "duplicate_in_batch"})
            return None
        if self.deliveries.start_failed is not None:
            raise TransientGenerationError(self.deliveries.start_failed)
        if delivery.not_planned:
            # The message did not come from this pipeline's judge (or its task was deleted).
            unknown = delivery.not_planned
            detail = f"no ledger entry for {', '.join(unknown)}"
            self._dead_letter(message.to_body(), "not_planned", detail, items=len(unknown))
            return None
        for content_type in delivery.ended_items:
            logger.info("retry_item_skipped", extra={"content_type": content_type.value})
        to_generate = delivery.items_to_generate()
        if not to_generate and not delivery.carried_content() and not delivery.carried_unusable():
            return None
        return MessageRequest(
            message_id,
            str(message.task_id),
            message.roadmap_id,
            message.concept,
            message.preferences,
            to_generate,
        )

    def _generate_and_save(self, requests: list[MessageRequest]) -> None:
        generation = BatchGeneration(
            self.deps.generator,
            parallelism=self.deps.settings.generate_parallelism,
            seconds_left=self._seconds_left,
            call_budget_seconds=self.deps.settings.llm_call_budget_seconds,
        )
        for message_id, result in generation.run(requests):
            delivery = self.deliveries.by_message_id[message_id]
            message = delivery.message
            assert message is not None
            for content_type, cost in result.costs.items():
                self.costs[content_type] += cost
            with logger.append_context_keys(**self._log_keys(message_id)):
                try:
                    self._finish(message, delivery, result)
                except Exception as exc:  # the record goes back to SQS; the others go on
                    logger.warning("retry_record_returned", extra={"error": repr(exc)})
                    self.outcomes[message_id] = exc

    def _finish(self, message: RetryMessage, delivery: Delivery, result: MessageGeneration) -> None:
        """Save what one message's generation came to; raise to send the record back."""
        provided = delivery.carried_content()
        logger.info(
            "retry_item_started",
            extra={
                "items_provided": True,
                "content_types": sorted({*result.costs, *provided}),
                "generated_provided": sorted(provided),
            },
        )
        to_save = {**provided, **result.generated}
        failed_for_good = {**delivery.carried_unusable(), **result.failed_for_good}
        costs = {
            key: result.costs[key.content_type]
            for key in item_keys(message)
            if key.content_type in result.costs
        }
        saved = False
        if to_save or failed_for_good:
            saved = self._save(message, delivery, to_save, failed_for_good, costs)
            if not saved:
                return  # dead-lettered with its content, acknowledged
        if result.try_later is not None:
            self._note_try_later(message, delivery, result.try_later, {} if saved else costs)
            raise result.try_later

    def _save(
        self,
        message: RetryMessage,
        delivery: Delivery,
        to_save: dict[ContentType, ContentModel],
        failed_for_good: dict[ContentType, str],
        costs: dict[ledger.ItemKey, ItemCost],
    ) -> bool:
        """Save, or dead-letter the message with what was generated; False when dead-lettered.

        Raises:
            DeadLetterError: the save failed and the DLQ refused the message too;
                SQS will redeliver the record.
        """
        try:
            with traced(
                "save",
                task_id=str(message.task_id),
                roadmap_id=message.roadmap_id,
                concept_id=message.concept.concept_id,
            ):
                saved = save_message(self.database, message, to_save, failed_for_good, costs)
        except DATABASE_ERRORS as exc:
            self._dead_letter_unsaved(message, delivery, to_save, failed_for_good, exc, costs)
            return False
        failed_for_good = {**failed_for_good, **saved.refused}
        for content_type, version in saved.versions.items():
            if version is None:
                logger.info("retry_item_skipped", extra={"content_type": content_type.value})
                continue
            logger.info(
                "retry_item_saved",
                extra={"content_type": content_type.value, "content_version": version},
            )
            metrics.add_metric(name="ItemsSaved", unit="Count", value=1)
        for content_type, error in failed_for_good.items():
            logger.warning(
                "retry_item_failed", extra={"content_type": content_type.value, "error": error}
            )
            metrics.add_metric(name="ItemsFailed", unit="Count", value=1)
        return True

    def _dead_letter_unsaved(
        self,
        message: RetryMessage,
        delivery: Delivery,
        to_save: dict[ContentType, ContentModel],
        failed_for_good: dict[ContentType, str],
        error: BaseException,
        costs: dict[ledger.ItemKey, ItemCost],
    ) -> None:
        """The whole message to the DLQ, with what was generated; then, if the
        database lets us, each open item's state: the ones that failed for good
        end so (a re-drive skips them), the others wait in the DLQ."""
        metrics.add_metric(name="SaveFailures", unit="Count", value=1)
        logger.error("retry_item_save_failed", extra={"error": repr(error)})
        generated = GeneratedContent.of(to_save) if to_save else message.generated
        keeping = message.model_copy(update={"generated": generated})
        # Raises (so SQS redelivers the original) when the DLQ refuses it.
        self._dead_letter(
            keeping.to_body(),
            "save_failed",
            repr(error),
            items=len(to_save) or 1,
            generated=sorted(to_save),
        )
        waiting = (ItemStatus.DEAD_LETTERED, f"save failed: {error!r}")
        notes = dict.fromkeys(delivery.open_items, waiting)
        notes |= {ct: (ItemStatus.FAILED, reason) for ct, reason in failed_for_good.items()}
        self._record_best_effort(message, notes, costs)

    def _note_try_later(
        self,
        message: RetryMessage,
        delivery: Delivery,
        error: TransientGenerationError,
        costs: dict[ledger.ItemKey, ItemCost],
    ) -> None:
        note = (ItemStatus.RUNNING, str(error))
        self._record_best_effort(message, dict.fromkeys(delivery.open_items, note), costs)
        logger.warning("retry_item_will_retry", extra={"error": str(error)})

    def _record_best_effort(
        self,
        message: RetryMessage,
        notes: dict[ContentType, tuple[ItemStatus, str]],
        costs: dict[ledger.ItemKey, ItemCost],
    ) -> None:
        """Note items' outcomes (status, error) and what the calls cost in the
        ledger if the database lets us; the message (redelivered or
        dead-lettered) stays the record of truth, and the costs are in the
        metrics whatever happens here."""
        keys = {key.content_type: key for key in item_keys(message)}
        try:
            with self.database.transaction() as connection:
                for content_type, (status, error) in notes.items():
                    if content_type in keys:
                        ledger.record_outcomes(
                            connection, [keys[content_type]], status=status, error=error
                        )
                ledger.add_costs(connection, costs)
        except DATABASE_ERRORS:
            logger.warning("retry_ledger_not_updated")

    def _dead_letter(
        self, body: str, reason: str, detail: str, *, items: int, generated: list[str] | None = None
    ) -> None:
        dlq_url = self.deps.settings.require("retry_dlq_url")
        dead_letter(self.deps.sqs, dlq_url, body, reason=reason, detail=detail)
        logger.warning(
            "retry_item_dead_lettered", extra={"reason": reason, "generated": generated or []}
        )
        metrics.add_metric(name="ItemsDeadLettered", unit="Count", value=items)

    def _log_keys(self, message_id: str) -> dict[str, str]:
        """What every log line about a record carries: its message id and, when
        the body is a retry message, its task, roadmap and concept (DESIGN §11)."""
        keys = {"message_id": message_id}
        message = self.deliveries.by_message_id[message_id].message
        if message is not None:
            keys |= {
                "task_id": str(message.task_id),
                "roadmap_id": message.roadmap_id,
                "concept_id": message.concept.concept_id,
            }
        return keys

    def _seconds_left(self) -> float:
        if self.context is None:
            return float("inf")
        return self.context.get_remaining_time_in_millis() / 1000


def handle_retry_batch(
    event: dict[str, Any], context: LambdaContext | None, deps: WorkerDependencies | None = None
) -> dict[str, Any]:
    """Process one SQS event of retry messages; returns ``{"batchItemFailures": [...]}``."""
    return RetryBatch(deps or default_worker_dependencies(), context).run(event)
