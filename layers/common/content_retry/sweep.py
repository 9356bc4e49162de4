"""The schedule sweep: roadmaps untouched for the grace period that need work,
planned by the one judge, as many as the invocation's time allows."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from content_retry import deadlines
from content_retry.database import DATABASE_ERRORS
from content_retry.database.engine import trips_breaker
from content_retry.observability import logger, metrics, traced
from content_retry.plan import RoadmapNotFoundError
from content_retry.redrive import redrive_content
from content_retry.repositories import claims, roadmaps
from content_retry.retries import DatabaseNotAnsweringError, DetectDependencies, start_retry
from content_retry.settings import SettingsError
from content_retry.validation import clip_error


@dataclass
class SweepOutcome:
    roadmaps_scanned: int = 0
    roadmaps_planned: int = 0
    retried_count: int = 0
    # Candidates found but left for the next run (the invocation's time ran out).
    backlog: int = 0
    # Items whose message outlived the queue's retention: failed with why, planned again.
    claims_expired: int = 0
    # Dead-letter copies with content moved back to the retry queue.
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

    Claims whose messages outlived the queue's retention are expired first (the
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
        outcome.claims_expired = claims.expire_claims_past_retention(
            connection, settings.queue_retention_minutes
        )
        rows = roadmaps.sweep_candidates(
            connection,
            grace_minutes=settings.sweep_grace_minutes,
            lease_minutes=settings.claim_lease_minutes,
            retention_minutes=settings.queue_retention_minutes,
            limit=settings.sweep_max_roadmaps,
        )
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
        roadmaps.record_swept(connection, roadmap_id)
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
