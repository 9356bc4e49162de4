"""Starting retries: the detect function's work, whatever triggered it.

The API, the schedule sweep and a direct invoke all come here; each retry is
planned by the one judge, recorded with its claims in one transaction, and
only then sent to the queue, one message per concept.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import Engine

from content_retry import deadlines
from content_retry.database import DATABASE_ERRORS, BatchConnection
from content_retry.messages import Preferences, message_for_concept
from content_retry.observability import logger, metrics
from content_retry.plan import RetryPlan
from content_retry.plan.build import build_retry_plan
from content_retry.plan.models import Reason
from content_retry.queue import OutgoingMessage, SendResult, send_retry_messages
from content_retry.repositories import claims, tasks
from content_retry.settings import Settings
from content_retry.validation import clip_error


class DatabaseNotAnsweringError(ConnectionError):
    """The database failed, or did not answer within the invocation's deadline.

    What a direct invoke and the sweep raise (the API answers 503 instead): a
    clear error for the caller, the database's own in ``__cause__``. Nothing
    it interrupted holds an item beyond the claim lease (see :func:`start_retry`).
    """


@dataclass(frozen=True)
class RetryOutcome:
    """What one retry request did; the body of the API's 202/200 answer."""

    task_id: str | None
    retried_count: int
    items: dict[str, int]
    reasons: dict[str, int]
    unsent_count: int = 0
    messages_sent: int = 0
    # The database did not record which messages were sent: the claims of the
    # unsent items were not released, and hold until the claim lease passes.
    sends_unrecorded: bool = False
    # Items whose message was being sent when the time ran out (or the call
    # crashed): queued or not, their claims hold until the lease passes.
    unconfirmed_count: int = 0
    # Items not planned because their generated content waits in the
    # dead-letter queue: the next re-drive saves them without the LLM.
    waiting_for_redrive: int = 0

    @property
    def message(self) -> str:
        if self.task_id is None:
            return "nothing needs retry: every item has completed content or is already queued"
        text_ = f"queued {self.retried_count} item(s) in {self.messages_sent} message(s)"
        if self.unsent_count:
            when = (
                "once their claim lease has passed"
                if self.sends_unrecorded
                else "by the next request or sweep"
            )
            text_ += (
                f"; {self.unsent_count} item(s) could not be queued and will be planned "
                f"again {when}"
            )
        if self.unconfirmed_count:
            text_ += (
                f"; {self.unconfirmed_count} item(s) were being sent when the time ran out: "
                "those not queued will be planned again once their claim lease has passed"
            )
        return text_

    def as_response(self) -> dict[str, Any]:
        return {
            # Something was queued, or nothing needed to be; not when every
            # planned message was refused (the API's 503).
            "success": self.retried_count > 0
            or (self.unsent_count == 0 and self.unconfirmed_count == 0),
            "task_id": self.task_id,
            "retried_count": self.retried_count,
            "items": self.items,
            "reasons": self.reasons,
            "waiting_for_redrive": self.waiting_for_redrive,
            "message": self.message,
        }


@dataclass
class DetectDependencies:
    """What the detect function needs from the outside; tests pass their own."""

    engine: Engine
    sqs: Any
    settings: Settings
    # The backoff between resends of refused queue entries.
    sleep: Callable[[float], None] = time.sleep


def default_detect_dependencies() -> DetectDependencies:
    """The process's engine, SQS client and settings, created on first use."""
    from content_retry.aws import client
    from content_retry.database import get_engine
    from content_retry.settings import get_detect_settings

    # First, so a function missing a variable fails naming it.
    settings = get_detect_settings()
    return DetectDependencies(engine=get_engine(), sqs=client("sqs"), settings=settings)


def start_retry(
    deps: DetectDependencies,
    roadmap_id: str,
    *,
    content_types: list[str] | None = None,
    preferences: Preferences | None = None,
    owner: str | None = None,
    trigger: str,
) -> RetryOutcome:
    """Plan a roadmap's retry, record it, and enqueue one message per concept.

    The task and its claims are committed before any message is sent, so a
    crash after the commit loses nothing: the claims expire after the lease
    and the next request or sweep plans those items again. Once sent, a claim
    holds while its message waits in the queue, however long; entries that
    cannot be sent release their claims right away.

    Every statement is bounded by the deadline in force
    (:mod:`content_retry.deadlines`). A database that fails or does not answer
    in time:

    - before the commit: the error is raised and nothing is claimed (cut off
      during the COMMIT itself, the claims may have been written: they expire
      after the lease, as after a crash);
    - after the commit: the messages are sent all the same, and the outcome
      says what was queued (:class:`_SendRecorder`).

    Raises:
        UnknownContentTypeError: a content type is unknown, or the list is empty.
        RoadmapNotFoundError: no such roadmap, or it is not ``owner``'s.
        SQLAlchemyError, OSError: the database failed or ran out of time before
            the commit (``content_retry.database.DATABASE_ERRORS``).
    """
    queue_url = deps.settings.require("retry_queue_url")
    preferences = preferences or Preferences()
    with deps.engine.begin() as connection:
        plan = build_retry_plan(
            connection,
            roadmap_id,
            content_types,
            owner=owner,
            claim_lease_minutes=deps.settings.claim_lease_minutes,
            queue_retention_minutes=deps.settings.queue_retention_minutes,
        )
        task_id = None
        if plan.item_count:
            task_id = tasks.create_task(
                connection, plan, trigger=trigger, preferences=preferences.model_dump()
            )
            # One message is built before the commit: a roadmap no message can
            # name (its id, its owner's) leaves no claim behind to hold its items
            # back for a lease. The others differ by their concept only, which the
            # judge validated; they are built as they are sent (_send).
            message_for_concept(task_id, plan, plan.concepts[0], preferences)
    _log_plan(plan, task_id, trigger)
    if task_id is None:
        return RetryOutcome(
            None,
            0,
            plan.count_by_type(),
            plan.count_by_reason(),
            waiting_for_redrive=plan.waiting_for_redrive_count,
        )
    return _send(deps, queue_url, plan, task_id, preferences)


def _send(
    deps: DetectDependencies,
    queue_url: str,
    plan: RetryPlan,
    task_id: str,
    preferences: Preferences,
) -> RetryOutcome:
    """Send a committed task's messages, record what was sent, and say what was queued.

    The messages are built as they are sent, SEND_CONCURRENCY calls at once,
    and the sent ones are recorded batch by batch (:class:`_SendRecorder`), so
    a send cut short leaves exactly the sent items' claims holding while their
    messages wait in the queue: an exception records them before it goes on,
    and the deadline stops the send with time left to record them and to
    release the claims of what was not sent (the next request or sweep plans
    those again). The send goes on whatever the database does: the claims are
    committed, and only a sent message makes them worth holding.
    """
    with _SendRecorder(deps.engine, task_id) as recorder:
        try:
            sent = send_retry_messages(
                deps.sqs,
                queue_url,
                _outgoing(task_id, plan, preferences),
                sleep=deps.sleep,
                on_sent=recorder.sent,
                deadline=deadlines.current(),
            )
        except BaseException:
            recorder.flush()  # a crash mid-send: the sent ones are recorded, exactly
            raise
        unsent = _unsent(plan, sent)
        released = recorder.flush(unsent)
    _log_send(plan, task_id, sent, unsent, recorder)
    return _outcome(plan, task_id, sent, unsent, released)


def _outgoing(task_id: str, plan: RetryPlan, preferences: Preferences) -> Iterator[OutgoingMessage]:
    """The plan's messages, one per concept, built as the sender asks for them."""
    task = UUID(task_id)
    for concept in plan.concepts:
        message = message_for_concept(task, plan, concept, preferences)
        yield OutgoingMessage(concept.concept.concept_id, message.to_body().encode())


def _unsent(plan: RetryPlan, sent: SendResult) -> dict[str, str]:
    """The concepts known not to be in the queue, with why: refused, or never
    started (the time ran out); their claims are released."""
    unsent = dict(sent.failed)
    if sent.not_started is not None:
        settled = {*sent.sent, *sent.unconfirmed, *unsent}
        for concept in plan.concepts:
            if concept.concept.concept_id not in settled:
                unsent[concept.concept.concept_id] = sent.not_started
    return unsent


def _outcome(
    plan: RetryPlan, task_id: str, sent: SendResult, unsent: dict[str, str], released: int | None
) -> RetryOutcome:
    queued_concepts, unconfirmed_concepts = set(sent.sent), set(sent.unconfirmed)
    types: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    unsent_items = unconfirmed_items = 0
    for concept in plan.concepts:
        concept_id = concept.concept.concept_id
        if concept_id in queued_concepts:
            types.update(item.content_type.value for item in concept.items)
            reasons.update(item.reason.value for item in concept.items)
        elif concept_id in unconfirmed_concepts:
            unconfirmed_items += len(concept.items)
        elif concept_id in unsent:
            unsent_items += len(concept.items)
    queued = types.total()
    metrics.add_metric(name="ItemsPlanned", unit="Count", value=queued)
    return RetryOutcome(
        task_id=task_id,
        retried_count=queued,
        items={
            content_type.value: types[content_type.value] for content_type in plan.content_types
        },
        reasons={reason.value: reasons[reason.value] for reason in Reason},
        unsent_count=unsent_items if released is None else released,
        messages_sent=len(sent.sent),
        sends_unrecorded=released is None,
        unconfirmed_count=unconfirmed_items,
        waiting_for_redrive=plan.waiting_for_redrive_count,
    )


def _log_send(
    plan: RetryPlan,
    task_id: str,
    sent: SendResult,
    unsent: dict[str, str],
    recorder: _SendRecorder,
) -> None:
    if unsent or sent.unconfirmed:
        logger.error(
            "retry_messages_unsent",
            extra={
                "task_id": task_id,
                "concept_ids": sorted(unsent)[:100],
                "unconfirmed_concept_ids": sorted(sent.unconfirmed)[:100],
                "error": next(iter(unsent.values()), sent.not_started),
            },
        )
    logger.info(
        "retry_messages_sent",
        extra={
            "task_id": task_id,
            "roadmap_id": plan.roadmap_id,
            "messages_sent": len(sent.sent),
            "messages_unsent": len(unsent),
            "messages_unconfirmed": len(sent.unconfirmed),
            "sqs_calls": sent.api_calls,
            "send_records": recorder.transactions,
        },
    )


# Sent concepts are recorded in the ledger (claims.mark_sent) a group at a
# time, on the calling thread's connection while the next batches are in
# flight: once RECORD_EVERY_CONCEPTS wait, or the oldest has waited
# RECORD_EVERY_SECONDS. A crash or the deadline records the rest at once; only
# a process killed outright leaves up to a group unrecorded (those claims hold
# for the lease, then their items are planned again). A group's record waits
# at most RECORD_AT_MOST_SECONDS for the database: one that is slow or hangs
# costs the send that once, not the rest of the invocation's time, and what
# waits is recorded at the end of the send, within the deadline.
RECORD_EVERY_CONCEPTS = 1_000
RECORD_EVERY_SECONDS = 0.5
RECORD_AT_MOST_SECONDS = 2.0


class _SendRecorder:
    """Records a task's sends as their batches answer: from its record on, a
    sent item's claim holds while its message waits in the queue.

    A group the database fails to record waits for the last record, at the
    end of the send; no other group is recorded meanwhile. When the last
    record fails too, the send is not the request's failure: the messages are
    in the queue, so it answers with what was queued (the API's 202, or its
    503 when nothing was), the worker takes those messages as any other (it
    needs no record of the send), and the claims not recorded hold for the
    lease only, as after a crash between commit and send.
    """

    def __init__(self, engine: Engine, task_id: str) -> None:
        self._engine = engine
        self._database = BatchConnection(engine)
        self._task_id = task_id
        self._waiting: list[str] = []
        self._oldest = 0.0
        self._group_failed = False
        self.transactions = 0

    def sent(self, concept_ids: list[str]) -> None:
        """A batch was sent: recorded with those waiting, once a group is due."""
        if not self._waiting:
            self._oldest = time.monotonic()
        self._waiting += concept_ids
        due = len(self._waiting) >= RECORD_EVERY_CONCEPTS or (
            time.monotonic() - self._oldest >= RECORD_EVERY_SECONDS
        )
        if due and not self._group_failed:
            try:
                with deadlines.applied(_at_most(RECORD_AT_MOST_SECONDS)):
                    self._record()
            except DATABASE_ERRORS as exc:
                self._group_failed = True
                logger.warning(
                    "retry_sends_record_deferred",
                    extra={"task_id": self._task_id, "error": clip_error(repr(exc))},
                )

    def flush(self, unsent: dict[str, str] | None = None) -> int | None:
        """Record the sent concepts waiting, and release the claims of ``unsent``
        (concept id -> why), in one transaction, within the deadline in force.

        Returns the number of items released, or None when the database failed
        or ran out of time and nothing of this was recorded.
        """
        if self._database.unavailable is not None:  # a group's record tripped it
            self._database.close()
            self._database = BatchConnection(self._engine)
        try:
            return self._record(unsent)
        except DATABASE_ERRORS as exc:
            logger.error(
                "retry_sends_unrecorded",
                extra={
                    "task_id": self._task_id,
                    "messages_sent_unrecorded": len(self._waiting),
                    "messages_unsent": len(unsent or {}),
                    "error": clip_error(repr(exc)),
                },
            )
            return None

    def _record(self, unsent: dict[str, str] | None = None) -> int:
        if not self._waiting and not unsent:
            return 0
        with self._database.transaction() as connection:
            claims.mark_sent(connection, self._task_id, self._waiting)
            released = 0
            if unsent:
                first_error = next(iter(unsent.values()))
                released = tasks.release_unsent(connection, self._task_id, unsent, first_error)
        self.transactions += 1
        self._waiting = []
        return released

    def __enter__(self) -> _SendRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._database.close()


def _at_most(seconds: float) -> deadlines.Deadline:
    """The deadline in force, or ``seconds`` from now if that comes first."""
    outer = deadlines.current()
    ends = time.monotonic() + seconds
    return deadlines.Deadline(lambda: min(outer.left(), ends - time.monotonic()), reserve_seconds=0)


def _log_plan(plan: RetryPlan, task_id: str | None, trigger: str) -> None:
    reasons = plan.count_by_reason()
    logger.info(
        "retry_plan_built",
        extra={
            "roadmap_id": plan.roadmap_id,
            "task_id": task_id,
            "trigger": trigger,
            "missing_count": reasons["missing"],
            "failed_count": reasons["failed"],
            "stale_count": reasons["stale"],
            "planned_count": plan.item_count,
            "claimed_count": plan.claimed_count,
            "repaired_count": plan.repaired_count,
        },
    )
