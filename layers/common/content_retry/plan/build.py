"""Building a roadmap's retry plan: its items' states read, judged, framework statuses repaired."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection

from content_retry.content_types import ContentType, parse_content_types
from content_retry.observability import logger, traced
from content_retry.plan.judge import plan_from_rows
from content_retry.plan.models import RetryPlan, RoadmapNotFoundError
from content_retry.repositories.roadmaps import (
    item_states_query,
    lock_roadmap,
    patch_concept_statuses,
)


def build_retry_plan(
    connection: Connection,
    roadmap_id: str,
    content_types: Iterable[str] | None = None,
    *,
    owner: str | None = None,
    claim_lease_minutes: int = 60,
    queue_retention_minutes: int = 5_760,
    preview: bool = False,
) -> RetryPlan:
    """Plan the retry of one roadmap: every item that needs it, with its reason.

    Every path that starts a retry (the API, the schedule sweep, a direct
    invoke) calls this; the generate function never re-decides. Runs in the
    caller's transaction and issues at most three statements, whatever the
    roadmap's size: lock the roadmap row, read every item's state, and (only
    when some framework status disagrees with the tables) repair those
    statuses. The roadmap stays locked until the caller's transaction ends, so
    claims written in that transaction are seen by the next planner.

    Args:
        roadmap_id: the roadmap to plan.
        content_types: names of the content types to consider; ``None`` for all.
        owner: when given, the roadmap must belong to this user.
        claim_lease_minutes: a claim whose message was never sent holds its item
            back this long after it was planned or started.
        queue_retention_minutes: a claim whose message was sent holds its item
            back while the message can still be in the queue.
        preview: the plan only shown (the retry-plan view): the held items are
            listed, and nothing is written (no framework status repaired).

    Raises:
        UnknownContentTypeError: a content type is unknown, or the list is empty.
        RoadmapNotFoundError: no such roadmap, or it is not ``owner``'s.
    """
    with traced("judge", roadmap_id=roadmap_id):
        return _plan(
            connection,
            roadmap_id,
            parse_content_types(content_types),
            owner,
            {"lease_minutes": claim_lease_minutes, "retention_minutes": queue_retention_minutes},
            preview,
        )


def _plan(
    connection: Connection,
    roadmap_id: str,
    types: tuple[ContentType, ...],
    owner: str | None,
    claim_terms: dict[str, int],
    preview: bool,
) -> RetryPlan:
    roadmap = lock_roadmap(connection, roadmap_id)
    if roadmap is None or (owner is not None and roadmap.user_id != owner):
        raise RoadmapNotFoundError(roadmap_id)

    # A statement of its own, after the lock: its snapshot then holds the
    # claims a planner that held the lock before committed.
    rows = connection.execute(item_states_query(types), {"roadmap_id": roadmap_id, **claim_terms})
    judged = plan_from_rows(rows, list_held=preview)
    if judged.repairs and not preview:
        patch_concept_statuses(connection, roadmap_id, judged.repairs)
    if judged.unplannable:
        # No retry message can carry such an id; the platform's data needs fixing.
        logger.warning(
            "retry_concepts_unplannable",
            extra={"roadmap_id": roadmap_id, "concept_ids": sorted(judged.unplannable)[:10]},
        )

    return RetryPlan(
        roadmap_id=roadmap_id,
        user_id=roadmap.user_id,
        content_types=types,
        concepts=list(judged.concepts.values()),
        claimed_count=judged.claimed,
        waiting_for_redrive_count=judged.waiting,
        held=judged.held,
        repaired_count=sum(len(keys) for keys in judged.repairs.values()),
    )
