"""Starting retries: the detect function's work, whatever triggered it.

The API, the schedule sweep and a direct invoke all come here; each retry is
planned by the one judge, recorded with its claims in one transaction, and
only then sent to the queue, one message per concept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from content_retry import ledger
from content_retry.database.schema import SWEEP_CANDIDATE_PREDICATE
from content_retry.messages import Preferences, messages_for_plan
from content_retry.observability import logger, metrics
from content_retry.plan import RetryPlan, RoadmapNotFoundError, build_retry_plan
from content_retry.plan.models import Reason
from content_retry.queue import send_retry_messages
from content_retry.settings import Settings


@dataclass(frozen=True)
class RetryOutcome:
    """What one retry request did; the body of the API's 202/200 answer."""

    task_id: str | None
    retried_count: int
    items: dict[str, int]
    reasons: dict[str, int]
    unsent_count: int = 0
    messages_sent: int = 0

    @property
    def message(self) -> str:
        if self.task_id is None:
            return "nothing needs retry: every item has completed content or is already queued"
        text_ = f"queued {self.retried_count} item(s) in {self.messages_sent} message(s)"
        if self.unsent_count:
            text_ += (
                f"; {self.unsent_count} item(s) could not be queued and will be planned "
                "again by the next request or sweep"
            )
        return text_

    def as_response(self) -> dict[str, Any]:
        return {
            "success": self.task_id is not None or self.unsent_count == 0,
            "task_id": self.task_id,
            "retried_count": self.retried_count,
            "items": self.items,
            "reasons": self.reasons,
            "message": self.message,
        }


@dataclass
class Dependencies:
    """What a retry needs from the outside; tests pass their own."""

    engine: Engine
    sqs: Any
    settings: Settings


def start_retry(
    deps: Dependencies,
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
    and the next request or sweep plans those items again. Entries that cannot
    be sent release their claims right away.

    Raises:
        UnknownContentTypeError: a content type is unknown, or the list is empty.
        RoadmapNotFoundError: no such roadmap, or it is not ``owner``'s.
    """
    queue_url = deps.settings.require("retry_queue_url")
    preferences = preferences or Preferences()
    with Session(deps.engine) as session, session.begin():
        plan = build_retry_plan(
            session,
            roadmap_id,
            content_types,
            owner=owner,
            claim_lease_minutes=deps.settings.claim_lease_minutes,
        )
        task_id = (
            ledger.create_task(session, plan, trigger=trigger, preferences=preferences.model_dump())
            if plan.item_count
            else None
        )
    _log_plan(plan, task_id, trigger)
    if task_id is None:
        return RetryOutcome(None, 0, plan.count_by_type(), plan.count_by_reason())

    messages = messages_for_plan(task_id, plan, preferences)
    sent = send_retry_messages(deps.sqs, queue_url, messages)
    unsent_items = 0
    if sent.failed:
        first_error = next(iter(sent.failed.values()))
        with Session(deps.engine) as session, session.begin():
            unsent_items = ledger.release_unsent(session, task_id, sent.failed, first_error)
        logger.error(
            "retry_messages_unsent",
            extra={"task_id": task_id, "concept_ids": sorted(sent.failed), "error": first_error},
        )
    logger.info(
        "retry_messages_sent",
        extra={
            "task_id": task_id,
            "roadmap_id": roadmap_id,
            "messages_sent": len(sent.sent),
            "messages_unsent": len(sent.failed),
            "sqs_calls": sent.api_calls,
        },
    )
    queued_concepts = set(sent.sent)
    queued = [
        (concept, item) for concept, item in plan.items if concept.concept_id in queued_concepts
    ]
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
        unsent_count=unsent_items,
        messages_sent=len(sent.sent),
    )


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


_SWEEP_CANDIDATES = text(
    f"""
SELECT r.roadmap_id
FROM roadmap_metadata AS r
WHERE {SWEEP_CANDIDATE_PREDICATE}
  AND r.updated_at < now() - make_interval(mins => :grace_minutes)
  -- A roadmap whose recent task (younger than a claim lease) still has items
  -- open, or ended with failures, waits: its claims still hold, and an item
  -- that keeps failing is not paid for again on every run.
  AND NOT EXISTS (
    SELECT 1 FROM retry_tasks AS t JOIN retry_items AS i ON i.task_id = t.task_id
    WHERE t.roadmap_id = r.roadmap_id
      AND t.created_at > now() - make_interval(mins => :lease_minutes)
      AND i.status <> 'succeeded')
ORDER BY (SELECT max(t.created_at) FROM retry_tasks AS t WHERE t.roadmap_id = r.roadmap_id)
         NULLS FIRST,
         r.updated_at
LIMIT :limit
"""  # noqa: S608 - a constant predicate; values are bound  # nosec B608
)


@dataclass
class SweepOutcome:
    roadmaps_scanned: int = 0
    roadmaps_planned: int = 0
    retried_count: int = 0
    task_ids: list[str] = field(default_factory=list)

    def as_response(self) -> dict[str, int]:
        return {
            "roadmaps_scanned": self.roadmaps_scanned,
            "roadmaps_planned": self.roadmaps_planned,
            "retried_count": self.retried_count,
        }


def sweep(deps: Dependencies) -> SweepOutcome:
    """Plan the retry of the roadmaps that need work, a bounded number per run.

    Only roadmaps untouched for the grace period are considered (the platform
    may still be generating younger ones); the least recently retried go
    first, and the rest wait for the next run. Each roadmap is planned in its
    own transaction, so one failure does not undo the others.
    """
    settings = deps.settings
    with Session(deps.engine) as session:
        candidates = list(
            session.execute(
                _SWEEP_CANDIDATES,
                {
                    "grace_minutes": settings.sweep_grace_minutes,
                    "lease_minutes": settings.claim_lease_minutes,
                    "limit": settings.sweep_max_roadmaps,
                },
            ).scalars()
        )
    outcome = SweepOutcome()
    for roadmap_id in candidates:
        outcome.roadmaps_scanned += 1
        try:
            result = start_retry(deps, roadmap_id, trigger="sweep")
        except RoadmapNotFoundError:  # deleted since it was selected
            continue
        if result.task_id is not None:
            outcome.roadmaps_planned += 1
            outcome.retried_count += result.retried_count
            outcome.task_ids.append(result.task_id)
    logger.info("retry_sweep_finished", extra=outcome.as_response())
    return outcome


def task_for_owner(engine: Engine, task_id: str, owner: str) -> ledger.TaskStatus | None:
    """A task's status, or None when there is no such task or it is not ``owner``'s."""
    try:
        task_id = str(UUID(task_id))
    except ValueError:  # not an id we could have issued
        return None
    with Session(engine) as session:
        status = ledger.task_status(session, task_id)
    if status is None or status.user_id != owner:
        return None
    return status
