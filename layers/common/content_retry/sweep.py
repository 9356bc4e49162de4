"""The schedule sweep: which roadmaps need work, planned by the one judge, as many as time allows.

Only roadmaps untouched for the grace period are considered (the platform may
still be generating younger ones). Candidates come from partial indexes that
hold only the roadmaps with work, so a run's cost follows that number, not
the size of the tables; the judge then decides each roadmap's items.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import text

from content_retry import deadlines, ledger
from content_retry.claims import live_claim
from content_retry.content_types import STORAGE
from content_retry.database import DATABASE_ERRORS
from content_retry.database.engine import trips_breaker
from content_retry.observability import logger, metrics, traced
from content_retry.plan import RoadmapNotFoundError
from content_retry.redrive import redrive_content
from content_retry.retries import DatabaseNotAnsweringError, DetectDependencies, start_retry
from content_retry.settings import SettingsError
from content_retry.statuses import ContentStatus, FrameworkStatus, ItemStatus
from content_retry.validation import clip_error

# Roadmaps whose framework_data shows some item not completed (a missing or null
# status counts). Only the sweep's candidate filter: the judge still decides
# from the tables. It is also the predicate of the partial index
# roadmap_metadata_sweep_candidates (content-retry db upgrade creates it from
# this text), which keeps the index as small as the number of roadmaps with
# work; the query below repeats this exact text, which is what lets PostgreSQL
# use the index.
SWEEP_CANDIDATE_PREDICATE = (
    "jsonb_path_exists(framework_data, '$.stages[*].modules[*].concepts[*] ? ("
    + " || ".join(
        f'!(@.{storage.status_key} == "{FrameworkStatus.COMPLETED}")'
        for storage in STORAGE.values()
    )
    + ")')"
)

# The second source: roadmaps whose latest row is not completed, whatever
# framework_data says. Each source reads roadmap_metadata through an index (the
# partial one, or the primary key from the few unfinished rows), never the whole table.
_UNFINISHED_LATEST = "\n  UNION\n".join(
    f"  SELECT r.roadmap_id, r.updated_at FROM {storage.table} AS t "  # noqa: S608  # nosec B608
    "JOIN roadmap_metadata AS r USING (roadmap_id) "
    f"WHERE t.is_latest AND t.content_status <> '{ContentStatus.COMPLETED}' "
    "AND r.updated_at < now() - make_interval(mins => :grace_minutes)"
    for storage in STORAGE.values()
)
_SWEEP_CANDIDATES = text(
    f"""
WITH candidates AS (
  SELECT roadmap_id, updated_at FROM roadmap_metadata
  WHERE {SWEEP_CANDIDATE_PREDICATE}
    AND updated_at < now() - make_interval(mins => :grace_minutes)
  UNION
{_UNFINISHED_LATEST}
)
SELECT c.roadmap_id, count(*) OVER () AS candidates
FROM candidates AS c
LEFT JOIN roadmap_sweeps AS s USING (roadmap_id)
  -- Judged at most once a claim lease, least recently judged first.
WHERE (s.swept_at IS NULL OR s.swept_at < now() - make_interval(mins => :lease_minutes))
  -- A roadmap with items waiting in the queue waits too: however deep the
  -- backlog, its claims hold, and judging it again would find nothing to do.
  AND NOT EXISTS (
    SELECT 1 FROM retry_items AS i WHERE i.roadmap_id = c.roadmap_id AND {live_claim("i")})
  -- A roadmap whose recent task (younger than a claim lease) ended with
  -- failures waits: an item that keeps failing is not paid for again every run.
  AND NOT EXISTS (
    SELECT 1 FROM retry_tasks AS t JOIN retry_items AS i ON i.task_id = t.task_id
    WHERE t.roadmap_id = c.roadmap_id
      AND t.created_at > now() - make_interval(mins => :lease_minutes)
      AND i.status <> '{ItemStatus.SUCCEEDED}')
ORDER BY s.swept_at NULLS FIRST, c.updated_at
LIMIT :limit
"""  # noqa: S608 - constant predicates and table names; values are bound  # nosec B608
)

_RECORD_SWEPT = text(
    "INSERT INTO roadmap_sweeps (roadmap_id, swept_at) SELECT :roadmap_id, now() "
    "WHERE EXISTS (SELECT 1 FROM roadmap_metadata WHERE roadmap_id = :roadmap_id) "
    "ON CONFLICT (roadmap_id) DO UPDATE SET swept_at = excluded.swept_at"
)


@dataclass
class SweepOutcome:
    roadmaps_scanned: int = 0
    roadmaps_planned: int = 0
    retried_count: int = 0
    # Candidates found but left for the next run (the invocation's time ran out).
    backlog: int = 0
    # Items whose message outlived the queue's retention: failed with why, planned again.
    claims_expired: int = 0
    # Dead-lettered copies carrying content moved back to the retry queue.
    dead_letters_redriven: int = 0
    task_ids: list[str] = field(default_factory=list)

    def as_response(self) -> dict[str, int]:
        return {
            "roadmaps_scanned": self.roadmaps_scanned,
            "roadmaps_planned": self.roadmaps_planned,
            "retried_count": self.retried_count,
        }


# Of the invocation's time, kept to log, flush the metrics and answer: every
# statement of the sweep is bounded by what is left of the function's timeout
# less this (content_retry.deadlines). SWEEP_RESERVE_SECONDS, larger, is what a
# roadmap must have left to be started.
SWEEP_DEADLINE_RESERVE_SECONDS = 2


class _SampledClock:
    """The invocation's time left, read from ``source`` when sampled and counted
    down by the monotonic clock in between: the one clock of the sweep's loop
    and of its deadline. The context is read once per roadmap, as before the
    deadline, however many statements the deadline bounds; Lambda's context
    counts down with the same clock, so the figures are the same."""

    def __init__(self, source: Callable[[], float]) -> None:
        self._source = source
        self.sample()

    def sample(self) -> None:
        self._left, self._at = self._source(), time.monotonic()

    def __call__(self) -> float:
        return self._left - (time.monotonic() - self._at)


def sweep(
    deps: DetectDependencies, seconds_left: Callable[[], float] = lambda: float("inf")
) -> SweepOutcome:
    """Plan the retry of the roadmaps that need work, as many as the invocation's time allows.

    Claims whose messages outlived the queue's retention are ended first (the
    items are then candidates again). The least recently swept roadmaps go
    first, each at most once a claim lease; planning stops when less than
    ``SWEEP_RESERVE_SECONDS`` are left, and what is left waits for the next
    run (the ``SweepBacklog`` metric). Each roadmap is planned in its own
    transaction, so one failure does not undo the others.

    Every statement is bounded by ``seconds_left`` (the invocation's time)
    less SWEEP_DEADLINE_RESERVE_SECONDS, through the deadline the sweep
    applies (:mod:`content_retry.deadlines`).

    Raises:
        DatabaseNotAnsweringError: the database failed or did not answer in
            time; the sweep stopped there (what it planned stays planned, what
            it left waits for the next run, both reported first).
    """
    clock = _SampledClock(seconds_left)
    deadline = deadlines.Deadline(clock, reserve_seconds=SWEEP_DEADLINE_RESERVE_SECONDS)
    outcome = SweepOutcome()
    try:
        with traced("sweep"), deadlines.applied(deadline):
            _sweep(deps, clock, outcome)
    except DATABASE_ERRORS as exc:
        _report(outcome, error=exc)
        raise DatabaseNotAnsweringError(
            "the sweep stopped: the database failed or did not answer in time "
            f"({clip_error(repr(exc))}); {outcome.roadmaps_scanned} roadmap(s) judged, "
            f"{outcome.roadmaps_planned} planned, the rest wait for the next run"
        ) from exc
    _report(outcome)
    return outcome


def _report(outcome: SweepOutcome, error: BaseException | None = None) -> None:
    metrics.add_metric(name="SweepBacklog", unit="Count", value=outcome.backlog)
    if outcome.claims_expired:
        metrics.add_metric(name="ClaimsExpired", unit="Count", value=outcome.claims_expired)
    if outcome.dead_letters_redriven:
        metrics.add_metric(
            name="DeadLettersRedriven", unit="Count", value=outcome.dead_letters_redriven
        )
    details = {
        **outcome.as_response(),
        "backlog": outcome.backlog,
        "claims_expired": outcome.claims_expired,
        "dead_letters_redriven": outcome.dead_letters_redriven,
    }
    if error is None:
        logger.info("retry_sweep_finished", extra=details)
    else:
        logger.error("retry_sweep_stopped", extra={**details, "error": clip_error(repr(error))})


def _sweep(deps: DetectDependencies, clock: _SampledClock, outcome: SweepOutcome) -> None:
    settings = deps.settings
    with deps.engine.begin() as connection:
        outcome.claims_expired = ledger.expire_unseen_claims(
            connection, settings.queue_retention_minutes
        )
        rows = connection.execute(
            _SWEEP_CANDIDATES,
            {
                "grace_minutes": settings.sweep_grace_minutes,
                "lease_minutes": settings.claim_lease_minutes,
                "retention_minutes": settings.queue_retention_minutes,
                "limit": settings.sweep_max_roadmaps,
            },
        ).all()
    # The database answers: content waiting in the dead-letter queue can be saved now.
    outcome.dead_letters_redriven = _redrive_content(deps)
    candidates = [row.roadmap_id for row in rows]
    # Until the sweep stops, every candidate not yet judged is left for the next run.
    outcome.backlog = rows[0].candidates if rows else 0
    for number, roadmap_id in enumerate(candidates):
        if number:
            clock.sample()
        if clock() < settings.sweep_reserve_seconds:
            break
        _plan_one(deps, roadmap_id, outcome)
        outcome.roadmaps_scanned += 1
        outcome.backlog -= 1


def _redrive_content(deps: DetectDependencies) -> int:
    """Move the dead-letter queue's copies with content back (never fails the sweep)."""
    settings = deps.settings
    if not (settings.retry_dlq_url and settings.retry_queue_url):
        return 0
    try:
        return redrive_content(
            deps.sqs,
            settings.retry_dlq_url,
            settings.retry_queue_url,
            deadline=deadlines.current(),
        )
    except Exception:  # the queues' trouble: the copies wait for the next sweep
        logger.exception("retry_dead_letters_not_redriven")
        return 0


def _plan_one(deps: DetectDependencies, roadmap_id: str, outcome: SweepOutcome) -> None:
    # Recorded before judging: a roadmap whose planning fails still waits its
    # turn instead of blocking every later run.
    with deps.engine.begin() as connection:
        connection.execute(_RECORD_SWEPT, {"roadmap_id": roadmap_id})
    try:
        result = start_retry(deps, roadmap_id, trigger="sweep")
    except RoadmapNotFoundError:  # deleted since it was selected
        return
    except SettingsError:  # the same for every roadmap: the sweep cannot run
        raise
    except Exception as exc:
        if isinstance(exc, DATABASE_ERRORS) and trips_breaker(exc):
            # The database itself is failing (or out of time): every later
            # roadmap would wait on it again, so the sweep stops here.
            # start_retry left nothing claimed beyond the lease.
            raise
        # One roadmap that cannot be planned must not stop the sweep; the
        # error is logged with its roadmap, and it waits for its next turn.
        logger.exception("retry_sweep_roadmap_failed", extra={"roadmap_id": roadmap_id})
        return
    if result.task_id is not None:
        outcome.roadmaps_planned += 1
        outcome.retried_count += result.retried_count
        outcome.task_ids.append(result.task_id)
