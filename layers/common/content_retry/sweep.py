"""The schedule sweep: which roadmaps need work, planned by the one judge, a bounded number a run.

Only roadmaps untouched for the grace period are considered (the platform may
still be generating younger ones). Candidates come from partial indexes that
hold only the roadmaps with work, so a run's cost follows that number, not
the size of the tables; the judge then decides each roadmap's items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import text

from content_retry.content_types import STORAGE
from content_retry.observability import logger, traced
from content_retry.plan import RoadmapNotFoundError
from content_retry.retries import DetectDependencies, start_retry
from content_retry.settings import SettingsError
from content_retry.statuses import ContentStatus, FrameworkStatus, ItemStatus

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
      AND i.status <> '{ItemStatus.SUCCEEDED}')
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


def sweep(deps: DetectDependencies) -> SweepOutcome:
    """Plan the retry of the roadmaps that need work, a bounded number per run.

    The least recently swept go first, each at most once a claim lease, and
    the rest wait for the next run. Each roadmap is planned in its own
    transaction, so one failure does not undo the others.
    """
    with traced("sweep"):
        return _sweep(deps)


def _sweep(deps: DetectDependencies) -> SweepOutcome:
    settings = deps.settings
    with deps.engine.begin() as connection:
        candidates = list(
            connection.execute(
                _SWEEP_CANDIDATES,
                {
                    "grace_minutes": settings.sweep_grace_minutes,
                    "lease_minutes": settings.claim_lease_minutes,
                    "limit": settings.sweep_max_roadmaps,
                },
            ).scalars()
        )
        # Recorded before judging: a roadmap whose planning fails still waits
        # its turn instead of blocking every later run.
        if candidates:
            connection.execute(_RECORD_SWEPT, {"roadmap_ids": candidates})
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
