"""Starting retries: the detect function's work, whatever triggered it.

The API, the schedule sweep and a direct invoke all come here; each retry is
planned by the one judge, recorded with its claims in one transaction, and
only then sent to the queue, one message per concept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from content_retry import ledger
from content_retry.database import DATABASE_ERRORS
from content_retry.messages import Preferences, RetryMessage, messages_for_plan
from content_retry.observability import logger, metrics
from content_retry.plan import RetryPlan, build_retry_plan
from content_retry.plan.models import Reason
from content_retry.queue import SendResult, send_retry_messages
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
        return text_

    def as_response(self) -> dict[str, Any]:
        return {
            # Something was queued, or nothing needed to be; not when every
            # planned message was refused (the API's 503).
            "success": self.retried_count > 0 or self.unsent_count == 0,
            "task_id": self.task_id,
            "retried_count": self.retried_count,
            "items": self.items,
            "reasons": self.reasons,
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
    from content_retry.settings import get_settings

    return DetectDependencies(engine=get_engine(), sqs=client("sqs"), settings=get_settings())


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
      says what was queued (:func:`_record_sends`).

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
            task_id = ledger.create_task(
                connection, plan, trigger=trigger, preferences=preferences.model_dump()
            )
            # Built before the commit: a message that cannot be built leaves no
            # claim behind to hold its items back for a lease.
            messages = messages_for_plan(task_id, plan, preferences)
    _log_plan(plan, task_id, trigger)
    if task_id is None:
        return RetryOutcome(None, 0, plan.count_by_type(), plan.count_by_reason())
    return _send(deps, queue_url, plan, task_id, messages)


def _send(
    deps: DetectDependencies,
    queue_url: str,
    plan: RetryPlan,
    task_id: str,
    messages: list[RetryMessage],
) -> RetryOutcome:
    """Send a committed task's messages, record what was sent, and say what was queued.

    The send is made whatever is left of the deadline: the claims are
    committed, and only a sent message makes them worth holding (left unsent,
    they would hold their items back for a whole lease for nothing). A send
    takes milliseconds, well within the reserve the deadline keeps to answer;
    the deadline bounds the database, the SQS client's own timeouts the send.
    """
    sent = send_retry_messages(deps.sqs, queue_url, messages, sleep=deps.sleep)
    released = _record_sends(deps, task_id, sent)
    if sent.failed:
        logger.error(
            "retry_messages_unsent",
            extra={
                "task_id": task_id,
                "concept_ids": sorted(sent.failed),
                "error": next(iter(sent.failed.values())),
            },
        )
    logger.info(
        "retry_messages_sent",
        extra={
            "task_id": task_id,
            "roadmap_id": plan.roadmap_id,
            "messages_sent": len(sent.sent),
            "messages_unsent": len(sent.failed),
            "sqs_calls": sent.api_calls,
        },
    )
    queued_concepts = set(sent.sent)
    queued = [
        (concept, item) for concept, item in plan.items if concept.concept_id in queued_concepts
    ]
    unsent = sum(1 for concept, _ in plan.items if concept.concept_id in sent.failed)
    metrics.add_metric(name="ItemsPlanned", unit="Count", value=len(queued))
    return RetryOutcome(
        task_id=task_id,
        retried_count=len(queued),
        items={
            content_type.value: sum(1 for _, item in queued if item.content_type is content_type)
            for content_type in plan.content_types
        },
        reasons={
            reason.value: sum(1 for _, item in queued if item.reason is reason) for reason in Reason
        },
        unsent_count=unsent if released is None else released,
        messages_sent=len(sent.sent),
        sends_unrecorded=released is None,
    )


def _record_sends(deps: DetectDependencies, task_id: str, sent: SendResult) -> int | None:
    """Record the send in one transaction: the sent items' claims now hold while
    their messages wait in the queue, and the unsent ones are released.

    Returns the number of items released, or None when the database failed or
    ran out of time and nothing was recorded. The messages are in the queue by
    then, so that failure is not the request's: it answers with what was
    queued (the API's 202, or its 503 when nothing was), and the worker takes
    those messages as any other (it needs no record of the send). Unrecorded,
    every claim of the task holds for the lease only, as after a crash between
    commit and send: the unsent items are planned again once it has passed.
    """
    try:
        with deps.engine.begin() as connection:
            ledger.mark_sent(connection, task_id, sent.sent)
            if not sent.failed:
                return 0
            first_error = next(iter(sent.failed.values()))
            return ledger.release_unsent(connection, task_id, sent.failed, first_error)
    except DATABASE_ERRORS as exc:
        logger.error(
            "retry_sends_unrecorded",
            extra={
                "task_id": task_id,
                "messages_sent": len(sent.sent),
                "messages_unsent": len(sent.failed),
                "error": clip_error(repr(exc)),
            },
        )
        return None


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
