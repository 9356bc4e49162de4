"""The generate function's batch (DESIGN §6, §12): parse → start → generate → save →
settle, each record ending in one typed outcome under one deadline."""

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

from content_retry import deadlines
from content_retry.aws import AWS_CALL_WORST_CASE_SECONDS
from content_retry.content_store import save_message
from content_retry.content_types import ContentType
from content_retry.costs import ItemCost
from content_retry.database import DATABASE_ERRORS, BatchConnection
from content_retry.deliveries import Deliveries, Delivery, item_keys, parse_deliveries
from content_retry.generation import (
    BatchGeneration,
    MessageGeneration,
    MessageRequest,
    NotCalledError,
)
from content_retry.generators import ConfigurationError, ContentGenerator
from content_retry.messages import RetryMessage
from content_retry.observability import logger, metrics, record_llm_costs, traced
from content_retry.pacing import pacer_for
from content_retry.repositories import claims
from content_retry.settings import Settings
from content_retry.settlement import (
    Acknowledge,
    DeadLetter,
    HeldByAnotherDeliveryError,
    Notes,
    RecordOutcome,
    ReturnLater,
    Settlement,
    dead_letter_copy,
)
from content_retry.statuses import ItemStatus

# Kept from the deadline to answer: one SQS call at its worst (a dead-letter
# send of content in hand), then the response.
GENERATE_RESERVE_SECONDS = AWS_CALL_WORST_CASE_SECONDS + 2


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
    from content_retry.settings import get_generate_settings

    # First, so a function missing a variable fails naming it.
    settings = get_generate_settings()
    return WorkerDependencies(
        engine=get_engine(), sqs=client("sqs"), settings=settings, generator=get_generator()
    )


class RetryBatch:
    """Processes one SQS event; :meth:`run` returns the partial-batch response."""

    def __init__(self, deps: WorkerDependencies, context: LambdaContext | None) -> None:
        self.deps = deps
        self.context = context
        self.deadline = deadlines.Deadline.of_context(
            context, reserve_seconds=GENERATE_RESERVE_SECONDS
        )
        self.database = BatchConnection(deps.engine)
        self.settlement = Settlement(deps.sqs, deps.settings)
        self.records: dict[str, dict[str, Any]] = {}
        self.outcomes: dict[str, RecordOutcome] = {}
        self.costs: dict[ContentType, ItemCost] = defaultdict(ItemCost)

    def run(self, event: dict[str, Any]) -> dict[str, Any]:
        # A messageId twice in one event is one delivery: processed and reported once.
        for record in event.get("Records") or []:
            self.records.setdefault(record.get("messageId", ""), record)
        with deadlines.applied(self.deadline), self.database:
            self.deliveries = self._start()
            requests = [self._route(message_id) for message_id in self.records]
            self._generate([request for request in requests if request is not None])
        record_llm_costs(self.costs)
        processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
        unique = {**event, "Records": list(self.records.values())}
        return dict(
            process_partial_response(
                event=unique, record_handler=self._report, processor=processor, context=self.context
            )
        )

    def _start(self) -> Deliveries:
        """Parse the records, then start every item of the batch in one statement,
        before any LLM call: an attempt is counted, each claim renewed and held
        for this delivery (the invocation's time), and the items that need no
        generation are told apart (finished for their task, or completed by
        someone else meanwhile)."""
        deliveries, items = parse_deliveries(list(self.records.values()))
        hold_seconds = min(self.deadline.left() + GENERATE_RESERVE_SECONDS, 900)
        try:
            with self.database.transaction() as connection:
                started = claims.start_items(connection, items, delivery_seconds=hold_seconds)
        except DATABASE_ERRORS as exc:
            logger.exception("retry_batch_start_failed", extra={"items": len(items)})
            deliveries.start_failed = f"database unavailable: {exc!r}"
        else:
            deliveries.record_started(started)
        return deliveries

    def _report(self, record: SQSRecord) -> None:
        """The record's outcome, as the batch processor takes it: raise to return it."""
        outcome = self.outcomes.get(record.message_id)
        if isinstance(outcome, ReturnLater):
            raise outcome.error

    def _route(self, message_id: str) -> MessageRequest | None:
        """Settle a record that needs no generation; otherwise, what to generate for it."""
        delivery = self.deliveries.by_message_id[message_id]
        message = delivery.message
        body = self.records[message_id].get("body") or ""
        notes: Notes = {}
        if delivery.invalid_reason is not None:
            outcome: RecordOutcome = DeadLetter(body, "invalid_message", delivery.invalid_reason)
        elif delivery.duplicate:
            logger.info("retry_item_skipped", extra={"reason": "duplicate_in_batch"})
            outcome = Acknowledge()
        elif self.deliveries.start_failed is not None:
            outcome = ReturnLater(NotCalledError(self.deliveries.start_failed))
        elif delivery.not_planned:  # not from this pipeline's judge, or its task was deleted
            assert message is not None
            detail = f"no ledger entry for {', '.join(delivery.not_planned)}"
            outcome = DeadLetter(
                message.to_body(), "not_planned", detail, items=len(delivery.not_planned)
            )
        elif delivery.hold_seconds_left is not None:
            held = HeldByAnotherDeliveryError("another live delivery is generating it")
            outcome = ReturnLater(held, delivery.hold_seconds_left + 1)
            notes = dict.fromkeys(delivery.open_items, (ItemStatus.RUNNING, str(held)))
        else:
            for content_type in delivery.finished_items:
                logger.info("retry_item_skipped", extra={"content_type": content_type.value})
            request = delivery.request(message_id)
            if request is not None:
                return request
            outcome = Acknowledge()
        self._settle(message_id, outcome, notes, {})
        return None

    def _generate(self, requests: list[MessageRequest]) -> None:
        generator = self.deps.generator
        settings = self.deps.settings
        generation = BatchGeneration(
            generator,
            parallelism=settings.generate_parallelism,
            deadline=self.deadline,
            call_budget_seconds=settings.llm_call_budget_seconds,
            pacer=pacer_for(generator, self.database, settings),
            stop_reason=lambda: self.database.unavailable,
        )
        for message_id, result in generation.run(requests):
            delivery = self.deliveries.by_message_id[message_id]
            for content_type, cost in result.costs.items():
                self.costs[content_type] += cost
            with logger.append_context_keys(**delivery.log_keys(message_id)):
                self._save(message_id, delivery, result)
        if generation.paced_calls:
            metrics.add_metric(name="LLMCallsPaced", unit="Count", value=generation.paced_calls)

    def _save(self, message_id: str, delivery: Delivery, result: MessageGeneration) -> None:
        """Save what one message's generation came to, and settle its record."""
        message = delivery.message
        assert message is not None
        provided = delivery.provided_content()
        to_save = {**provided, **result.generated}
        failed = {**delivery.unusable_provided_content(), **result.failed_permanently}
        paid = {ct: delivery.provided_costs[ct] for ct in provided if ct in delivery.provided_costs}
        paid |= result.costs
        costs = {k: paid[k.content_type] for k in item_keys(message) if k.content_type in paid}
        logger.info(
            "retry_item_started",
            extra={
                "items_provided": True,
                "content_types": sorted({*result.costs, *provided}),
                "generated_provided": sorted(provided),
            },
        )
        if to_save or failed:
            try:
                with traced(
                    "save",
                    task_id=str(message.task_id),
                    roadmap_id=message.roadmap_id,
                    concept_id=message.concept.concept_id,
                ):
                    saved = save_message(self.database, message, to_save, failed, costs)
            except DATABASE_ERRORS as exc:
                metrics.add_metric(name="SaveFailures", unit="Count", value=1)
                logger.error("retry_item_save_failed", extra={"error": repr(exc)})
                dead, notes = dead_letter_copy(
                    message, delivery.open_items, to_save, failed, paid, exc
                )
                # The costs travel with the copy, to the ledger of the save that re-drives it.
                self._settle(message_id, dead, notes, {})
                return
            saved.log_and_count(failed)
            costs = {}
        if result.try_later is None:
            self._settle(message_id, Acknowledge(), {}, {})
            return
        if isinstance(result.try_later, ConfigurationError):
            metrics.add_metric(name="GenerateConfigurationError", unit="Count", value=1)
            logger.error(
                "retry_generate_configuration_error", extra={"error": str(result.try_later)}
            )
        waiting = dict.fromkeys(delivery.open_items, (ItemStatus.RUNNING, str(result.try_later)))
        later = ReturnLater(result.try_later, result.delay_seconds)
        self._settle(message_id, later, waiting, costs)

    def _settle(
        self, message_id: str, outcome: RecordOutcome, notes: Notes, costs: dict[Any, ItemCost]
    ) -> None:
        """Carry out a record's outcome at once (paid content is safest in the DLQ),
        then note it in the ledger if the database lets us."""
        record = self.records[message_id]
        with logger.append_context_keys(
            **self.deliveries.by_message_id[message_id].log_keys(message_id)
        ):
            if isinstance(outcome, DeadLetter):
                outcome = self.settlement.dead_letter(outcome)
            message = self.deliveries.by_message_id[message_id].message
            if isinstance(outcome, ReturnLater):
                outcome, notes = self.settlement.return_record(record, outcome, message, notes)
            self.outcomes[message_id] = outcome
            if message is not None and (notes or costs):
                kept = isinstance(outcome, Acknowledge) and outcome.content_in_dlq
                retention = self.deps.settings.dlq_retention_minutes if kept else None
                self._note(message, notes, costs, retention)

    def _note(
        self,
        message: RetryMessage,
        notes: Notes,
        costs: dict[Any, ItemCost],
        dlq_retention_minutes: int | None,
    ) -> None:
        """Note a message's items' outcomes and what their calls cost, if the database
        lets us: the message (returned or dead-lettered) stays the record of truth,
        and a note that cannot be written is left for a later delivery.

        Args:
            dlq_retention_minutes: the message's content waits in the dead-letter
                queue that long: its dead-lettered items stay claimed meanwhile.
        """
        by_type = {key.content_type: key for key in item_keys(message)}
        owner = {"roadmap_id": message.roadmap_id, "user_id": message.user_id}
        try:
            with self.database.transaction() as connection:
                for content_type, (status, error) in notes.items():
                    if content_type in by_type:
                        claims.record_outcomes(
                            connection,
                            [by_type[content_type]],
                            status=status,
                            error=error,
                            dlq_retention_minutes=dlq_retention_minutes,
                            **owner,
                        )
                claims.add_costs(connection, costs, **owner)
        except DATABASE_ERRORS:
            logger.warning("retry_ledger_not_updated")


def handle_retry_batch(
    event: dict[str, Any], context: LambdaContext | None, deps: WorkerDependencies | None = None
) -> dict[str, Any]:
    """Process one SQS event of retry messages; returns ``{"batchItemFailures": [...]}``."""
    return RetryBatch(deps or default_worker_dependencies(), context).run(event)
