"""The generate function's work: one SQS batch of retry messages (DESIGN §6).

The worker never re-decides what needs retry: it generates the items a message
names and saves them. Its failure table:

- LLM error that may pass: the record fails; SQS redelivers it (DLQ after
  maxReceiveCount).
- LLM error that will not pass: the item is marked failed (ledger and framework
  status); the record is acknowledged.
- Generated but not saved: the message, with ``generated`` filled, goes to the
  dead-letter queue and the record is acknowledged; if that send fails too,
  the record fails and SQS redelivers it.
- Not a valid message: sent to the DLQ unchanged with the reason; acknowledged.
- Already saved for this task: skipped.
- Too little time left for another LLM call: the record fails, unprocessed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.parser.models import SqsRecordModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from content_retry import ledger
from content_retry.content_store import save_item
from content_retry.content_types import STORAGE, ContentType
from content_retry.generated import ContentModel, GeneratedContent
from content_retry.generators import (
    ContentGenerator,
    MalformedOutputError,
    PermanentGenerationError,
    TransientGenerationError,
)
from content_retry.ledger import ItemKey, StartedItem
from content_retry.messages import RetryMessage
from content_retry.observability import logger, metrics
from content_retry.roadmaps import patch_concept_statuses
from content_retry.settings import Settings
from content_retry.validation import describe_errors

# Deliveries of one item whose answers were malformed before the item fails
# for good: a model that keeps answering badly is not paid forever.
MALFORMED_OUTPUT_ATTEMPTS = 3

# Failures of the database, whatever the driver raised: pg8000 lets a reset
# socket's OSError escape unwrapped.
DATABASE_ERRORS = (SQLAlchemyError, OSError)


class NotEnoughTimeError(TransientGenerationError):
    """Too little time left in the invocation for another LLM call: try again later."""


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


@dataclass
class _Prepared:
    message: RetryMessage | None = None
    invalid_reason: str | None = None
    # Every item of this message is also in an earlier record of the batch
    # (SQS delivered it twice at once): acknowledged without an LLM call.
    duplicate: bool = False
    started: dict[ContentType, StartedItem] = field(default_factory=dict)
    start_failed: str | None = None


class _BatchConnection:
    """One database connection for the whole batch (one pre-ping, not one per
    message), replaced after a failure so one lost connection fails one save."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Connection | None = None

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        if self._connection is None:
            self._connection = self._engine.connect()
        try:
            with Session(bind=self._connection) as session, session.begin():
                yield session
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except DATABASE_ERRORS:
                self._connection.invalidate()
            self._connection = None


class RetryBatch:
    """Processes one SQS event; :meth:`run` returns the partial-batch response."""

    def __init__(self, deps: WorkerDependencies, context: LambdaContext | None) -> None:
        self.deps = deps
        self.context = context
        self.database = _BatchConnection(deps.engine)
        self.prepared: dict[str, _Prepared] = {}

    def run(self, event: dict[str, Any]) -> dict[str, Any]:
        self._prepare(event.get("Records") or [])
        processor = BatchProcessor(
            event_type=EventType.SQS,
            model=SqsRecordModel,
            # Every record failing is an ordinary answer here, not an exception.
            raise_on_entire_batch_failure=False,
        )
        try:
            response = process_partial_response(
                event=event,
                record_handler=self._process_record,
                processor=processor,
                context=self.context,
            )
        finally:
            self.database.close()
        return dict(response)

    def _prepare(self, records: list[dict[str, Any]]) -> None:
        """Parse every body, then start every item of the batch in one statement."""
        keys: list[ItemKey] = []
        for record in records:
            prepared = self.prepared[record.get("messageId", "")] = _Prepared()
            try:
                prepared.message = RetryMessage.model_validate_json(record.get("body") or "")
            except ValidationError as exc:
                prepared.invalid_reason = "; ".join(describe_errors(exc.errors(), whole="body"))
                continue
            message = prepared.message
            message_keys = [
                ItemKey(str(message.task_id), message.concept.concept_id, item.content_type)
                for item in message.items
            ]
            # A copy carrying generated content is never dropped for another.
            if message.generated is None and set(message_keys) <= set(keys):
                prepared.duplicate = True
                continue
            keys += [key for key in message_keys if key not in keys]
        try:
            with self.database.transaction() as session:
                started = ledger.start_items(session, keys)
        except DATABASE_ERRORS as exc:
            logger.exception("retry_batch_start_failed", extra={"items": len(keys)})
            for prepared in self.prepared.values():
                prepared.start_failed = f"database unavailable: {exc!r}"
            return
        for prepared in self.prepared.values():
            if prepared.message is not None and not prepared.duplicate:
                for item in prepared.message.items:
                    key = ItemKey(
                        str(prepared.message.task_id),
                        prepared.message.concept.concept_id,
                        item.content_type,
                    )
                    prepared.started[item.content_type] = started[key]

    def _process_record(self, record: SqsRecordModel) -> None:
        prepared = self.prepared[record.messageId]
        if prepared.invalid_reason is not None:
            self._dead_letter(str(record.body), "invalid_message", prepared.invalid_reason)
            logger.warning(
                "retry_item_dead_lettered",
                extra={"message_id": record.messageId, "reason": "invalid_message"},
            )
            metrics.add_metric(name="ItemsDeadLettered", unit="Count", value=1)
            return
        message = prepared.message
        assert message is not None
        if prepared.duplicate:
            logger.info(
                "retry_item_skipped",
                extra={"message_id": record.messageId, "reason": "duplicate_in_batch"},
            )
            return
        if prepared.start_failed is not None:
            raise TransientGenerationError(prepared.start_failed)
        unknown = [ct.value for ct, item in prepared.started.items() if item.status_before is None]
        if unknown:
            # The ledger never planned these items: the message did not come
            # from this pipeline's judge (or its task was deleted).
            self._dead_letter(
                message.to_body(), "not_planned", f"no ledger entry for {', '.join(unknown)}"
            )
            metrics.add_metric(name="ItemsDeadLettered", unit="Count", value=len(unknown))
            return
        self._process_message(message, prepared.started, record)

    def _process_message(
        self, message: RetryMessage, started: dict[ContentType, StartedItem], record: SqsRecordModel
    ) -> None:
        base = {
            "task_id": str(message.task_id),
            "roadmap_id": message.roadmap_id,
            "concept_id": message.concept.concept_id,
            "message_id": record.messageId,
        }
        provided = message.generated
        to_save: dict[ContentType, ContentModel] = {}
        to_generate: list[ContentType] = []
        for item in message.items:
            if started[item.content_type].already_done:
                logger.info(
                    "retry_item_skipped", extra={**base, "content_type": item.content_type.value}
                )
                continue
            content = provided.get(item.content_type) if provided else None
            if content is not None:
                to_save[item.content_type] = content
            else:
                to_generate.append(item.content_type)
        if not to_save and not to_generate:
            return
        logger.info(
            "retry_item_started",
            extra={
                **base,
                "items_provided": True,
                "content_types": [ct.value for ct in to_generate + list(to_save)],
                "generated_provided": sorted(ct.value for ct in to_save),
            },
        )

        failed_for_good: dict[ContentType, str] = {}
        passing_error: TransientGenerationError | None = None
        budget = self.deps.settings.llm_call_budget_seconds
        for content_type in to_generate:
            if self._seconds_left() < budget:
                passing_error = NotEnoughTimeError(
                    f"{self._seconds_left():.0f}s left in the invocation; "
                    f"an LLM call may take {budget}s"
                )
                break
            try:
                to_save[content_type] = self.deps.generator.generate(
                    message.concept, content_type, message.preferences
                )
            except MalformedOutputError as exc:
                if started[content_type].attempts >= MALFORMED_OUTPUT_ATTEMPTS:
                    failed_for_good[content_type] = (
                        f"malformed output {started[content_type].attempts} times: {exc}"
                    )
                else:
                    passing_error = exc
                    break
            except TransientGenerationError as exc:
                passing_error = exc
                break
            except PermanentGenerationError as exc:
                failed_for_good[content_type] = str(exc)

        if to_save or failed_for_good:
            saved = self._save(message, to_save, failed_for_good, base)
            if not saved:
                return  # dead-lettered with its content, acknowledged
        if passing_error is not None:
            self._note_passing_error(message, started, passing_error)
            raise passing_error

    def _save(
        self,
        message: RetryMessage,
        to_save: dict[ContentType, ContentModel],
        failed_for_good: dict[ContentType, str],
        base: dict[str, Any],
    ) -> bool:
        """Save generated items and record permanent failures, in one transaction.

        Returns False when the save failed and the message went to the DLQ
        with its generated content.

        Raises:
            TransientGenerationError: the save failed and the DLQ refused the
                message too; SQS will redeliver it.
        """
        for attempt in (1, 2):
            try:
                versions = self._save_transaction(message, to_save, failed_for_good)
                break
            except IntegrityError as exc:
                # Another task saved this concept's new version at the same
                # moment: the retry's fresh snapshot sees it and goes on top.
                if attempt == 1 and "_one_latest_per_concept" in str(exc):
                    logger.info("retry_item_save_raced", extra={**base})
                    continue
                self._dead_letter_unsaved(message, to_save, exc, base)
                return False
            except DATABASE_ERRORS as exc:
                self._dead_letter_unsaved(message, to_save, exc, base)
                return False
        for content_type, version in versions.items():
            if version is None:
                logger.info(
                    "retry_item_skipped", extra={**base, "content_type": content_type.value}
                )
                continue
            logger.info(
                "retry_item_saved",
                extra={**base, "content_type": content_type.value, "content_version": version},
            )
            metrics.add_metric(name="ItemsSaved", unit="Count", value=1)
        for content_type, error in failed_for_good.items():
            logger.warning(
                "retry_item_failed",
                extra={**base, "content_type": content_type.value, "error": error},
            )
            metrics.add_metric(name="ItemsFailed", unit="Count", value=1)
        return True

    def _save_transaction(
        self,
        message: RetryMessage,
        to_save: dict[ContentType, ContentModel],
        failed_for_good: dict[ContentType, str],
    ) -> dict[ContentType, int | None]:
        task_id, concept_id = str(message.task_id), message.concept.concept_id
        with self.database.transaction() as session:
            versions = {
                content_type: save_item(
                    session,
                    ItemKey(task_id, concept_id, content_type),
                    roadmap_id=message.roadmap_id,
                    concept_name=message.concept.name,
                    content=content,
                )
                for content_type, content in to_save.items()
            }
            for content_type, error in failed_for_good.items():
                ledger.record_item_outcome(
                    session,
                    ItemKey(task_id, concept_id, content_type),
                    status="failed",
                    error=error,
                )
            if failed_for_good:
                patch_concept_statuses(
                    session,
                    message.roadmap_id,
                    {concept_id: {STORAGE[ct].status_key: "failed" for ct in failed_for_good}},
                )
        return versions

    def _dead_letter_unsaved(
        self,
        message: RetryMessage,
        to_save: dict[ContentType, ContentModel],
        error: BaseException,
        base: dict[str, Any],
    ) -> None:
        metrics.add_metric(name="SaveFailures", unit="Count", value=1)
        logger.error("retry_item_save_failed", extra={**base, "error": repr(error)})
        generated = (
            GeneratedContent(**{ct.value: content for ct, content in to_save.items()})
            if to_save
            else message.generated
        )
        keeping = message.model_copy(update={"generated": generated})
        # Raises (so SQS redelivers the original) when the DLQ refuses it.
        self._dead_letter(keeping.to_body(), "save_failed", repr(error))
        logger.warning(
            "retry_item_dead_lettered",
            extra={
                **base,
                "reason": "save_failed",
                "generated": sorted(ct.value for ct in to_save),
            },
        )
        metrics.add_metric(name="ItemsDeadLettered", unit="Count", value=len(to_save) or 1)
        self._record_best_effort(
            message, list(to_save), status="dead_lettered", error=f"save failed: {error!r}"
        )

    def _note_passing_error(
        self, message: RetryMessage, started: dict[ContentType, StartedItem], error: Exception
    ) -> None:
        open_items = [ct for ct, item in started.items() if not item.already_done]
        self._record_best_effort(message, open_items, status="running", error=str(error))
        logger.warning(
            "retry_item_will_retry",
            extra={
                "task_id": str(message.task_id),
                "concept_id": message.concept.concept_id,
                "error": str(error),
            },
        )

    def _record_best_effort(
        self, message: RetryMessage, content_types: list[ContentType], *, status: str, error: str
    ) -> None:
        """Note an outcome in the ledger if the database lets us; the message
        (redelivered or dead-lettered) stays the record of truth."""
        if not content_types:
            return
        try:
            with self.database.transaction() as session:
                for content_type in content_types:
                    ledger.record_item_outcome(
                        session,
                        ItemKey(str(message.task_id), message.concept.concept_id, content_type),
                        status=status,
                        error=error,
                    )
        except DATABASE_ERRORS:
            logger.warning("retry_ledger_not_updated", extra={"task_id": str(message.task_id)})

    def _dead_letter(self, body: str, reason: str, detail: str) -> None:
        """Send a body to the DLQ with the reason in message attributes.

        Raises:
            TransientGenerationError: the DLQ could not be reached.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.deps.sqs.send_message(
                QueueUrl=self.deps.settings.require("retry_dlq_url"),
                MessageBody=body,
                MessageAttributes={
                    "reason": {"DataType": "String", "StringValue": reason},
                    "error": {"DataType": "String", "StringValue": ledger.clip_error(detail)},
                },
            )
        except (BotoCoreError, ClientError) as exc:
            raise TransientGenerationError(f"dead-letter queue unavailable: {exc}") from exc

    def _seconds_left(self) -> float:
        if self.context is None:
            return float("inf")
        return self.context.get_remaining_time_in_millis() / 1000


def handle_retry_batch(
    event: dict[str, Any], context: LambdaContext | None, deps: WorkerDependencies | None = None
) -> dict[str, Any]:
    """Process one SQS event of retry messages; returns ``{"batchItemFailures": [...]}``."""
    return RetryBatch(deps or default_worker_dependencies(), context).run(event)
