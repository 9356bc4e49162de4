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
from content_retry.content_types import STORAGE, ContentType
from content_retry.database.schema import SWEEP_CANDIDATE_PREDICATE
from content_retry.messages import Preferences, messages_for_plan
from content_retry.observability import logger, metrics
from content_retry.plan import RetryPlan, RoadmapNotFoundError, build_retry_plan
from content_retry.plan.models import Reason
from content_retry.queue import send_retry_messages
from content_retry.settings import Settings, SettingsError


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
        task_id = None
        if plan.item_count:
            task_id = ledger.create_task(
                session, plan, trigger=trigger, preferences=preferences.model_dump()
            )
            # Built before the commit: a message that cannot be built leaves no
            # claim behind to hold its items back for a lease.
            messages = messages_for_plan(task_id, plan, preferences)
    _log_plan(plan, task_id, trigger)
    if task_id is None:
        return RetryOutcome(None, 0, plan.count_by_type(), plan.count_by_reason())

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


# Candidates come from two partial indexes, so the cost follows the roadmaps
# with work, not the tables' size: framework_data showing an item not completed
# (schema.SWEEP_CANDIDATE_PREDICATE, the same text as the index's), and a latest
# row that is not completed whatever framework_data says. The judge decides.
_UNFINISHED_LATEST = "\n  UNION\n".join(
    f"  SELECT r.roadmap_id, r.updated_at FROM {STORAGE[content_type].table} AS t "  # noqa: S608  # nosec B608
    "JOIN roadmap_metadata AS r USING (roadmap_id) "
    "WHERE t.is_latest AND t.content_status <> 'completed' "
    "AND r.updated_at < now() - make_interval(mins => :grace_minutes)"
    for content_type in ContentType
)
# Each source reads roadmap_metadata through an index (the partial one, or the
# primary key from the few unfinished rows), never the whole table.
_SWEEP_CANDIDATES = text(
    f"""
WITH candidates AS (
  SELECT roadmap_id, updated_at FROM roadmap_metadata
  WHERE {SWEEP_CANDIDATE_PREDICATE}
    AND updated_at < now() - make_interval(mins => :grace_minutes)
  UNION
{_UNFINISHED_LATEST}
)
SELECT c.roadmap_id
FROM candidates AS c
LEFT JOIN roadmap_sweeps AS s USING (roadmap_id)
  -- Judged at most once a claim lease, least recently judged first.
WHERE (s.swept_at IS NULL OR s.swept_at < now() - make_interval(mins => :lease_minutes))
  -- A roadmap whose recent task (younger than a claim lease) still has items
  -- open, or ended with failures, waits: its claims still hold, and an item
  -- that keeps failing is not paid for again on every run.
  AND NOT EXISTS (
    SELECT 1 FROM retry_tasks AS t JOIN retry_items AS i ON i.task_id = t.task_id
    WHERE t.roadmap_id = c.roadmap_id
      AND t.created_at > now() - make_interval(mins => :lease_minutes)
      AND i.status <> 'succeeded')
ORDER BY s.swept_at NULLS FIRST, c.updated_at
LIMIT :limit
"""  # noqa: S608 - constant predicates and table names; values are bound  # nosec B608
)

_RECORD_SWEPT = text(
    "INSERT INTO roadmap_sweeps (roadmap_id, swept_at) SELECT roadmap_id, now() "
    "FROM unnest(CAST(:roadmap_ids AS text[])) AS judged(roadmap_id) "
    "WHERE EXISTS (SELECT 1 FROM roadmap_metadata AS r WHERE r.roadmap_id = judged.roadmap_id) "
    "ON CONFLICT (roadmap_id) DO UPDATE SET swept_at = excluded.swept_at"
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
    may still be generating younger ones); the least recently swept go first,
    each at most once a claim lease, and the rest wait for the next run. Each
    roadmap is planned in its own transaction, so one failure does not undo
    the others.
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
    if candidates:
        # Recorded before judging: a roadmap whose planning fails still waits
        # its turn instead of blocking every later run.
        with Session(deps.engine) as session, session.begin():
            session.execute(_RECORD_SWEPT, {"roadmap_ids": candidates})
    outcome = SweepOutcome()
    for roadmap_id in candidates:
        outcome.roadmaps_scanned += 1
        try:
            result = start_retry(deps, roadmap_id, trigger="sweep")
        except RoadmapNotFoundError:  # deleted since it was selected
            continue
        except SettingsError:  # the same for every roadmap: the sweep cannot run
            raise
        except Exception:
            # One roadmap that cannot be planned must not stop the sweep; the
            # error is logged with its roadmap, and it waits for its next turn.
            logger.exception("retry_sweep_roadmap_failed", extra={"roadmap_id": roadmap_id})
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
