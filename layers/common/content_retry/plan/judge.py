"""The one judge (DESIGN §4): what needs retrying, and why.

Every path that starts a retry (the API, the schedule sweep, a direct invoke)
calls :func:`build_retry_plan`; the generate function never re-decides. The
rule itself is :func:`judge_item`, a pure function of one item's state; the SQL
here only gathers that state for a whole roadmap in one round trip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache

from sqlalchemy import Connection, TextClause, text

from content_retry.claims import live_claim, waiting_for_redrive
from content_retry.concepts import Concept
from content_retry.content_types import STORAGE, ContentType, parse_content_types
from content_retry.observability import logger, traced
from content_retry.plan.models import ConceptPlan, HeldItem, PlannedItem, Reason, RetryPlan
from content_retry.roadmaps import array_or_empty, lock_roadmap, patch_concept_statuses
from content_retry.statuses import (
    ContentStatus,
    FrameworkStatus,
)


class RoadmapNotFoundError(LookupError):
    """The roadmap does not exist, or is not the caller's (the two are not told apart)."""


class Decision(StrEnum):
    RETRY = "retry"
    COMPLETED = "completed"
    CLAIMED = "claimed"


@dataclass(frozen=True)
class Judgement:
    decision: Decision
    reason: Reason | None = None
    # The framework status says null or failed while a completed latest row exists.
    repair_framework_status: bool = False


def judge_item(framework_status: str | None, latest_status: str | None, claimed: bool) -> Judgement:
    """Decide one item from its state.

    Args:
        framework_status: the concept's status for this content type in
            ``framework_data`` (``None`` when absent or null).
        latest_status: ``content_status`` of the item's ``is_latest`` row,
            ``None`` when there is no such row.
        claimed: a retry task holds a live claim on the item.

    The item needs retry exactly when it has no completed latest row and no
    live claim. Framework status alone never decides; it only names the reason.
    """
    if latest_status == ContentStatus.COMPLETED:
        if framework_status is None or framework_status == FrameworkStatus.FAILED:
            return _COMPLETED_TO_REPAIR
        return _COMPLETED
    if claimed:
        return _CLAIMED
    if framework_status == FrameworkStatus.FAILED or latest_status == ContentStatus.FAILED:
        return _RETRY[Reason.FAILED]
    if framework_status == FrameworkStatus.PROCESSING:
        return _RETRY[Reason.STALE]
    return _RETRY[Reason.MISSING]


# Judgements are immutable and few: shared rather than built for each of the
# thousands of items a large roadmap's plan decides.
_COMPLETED = Judgement(Decision.COMPLETED)
_COMPLETED_TO_REPAIR = Judgement(Decision.COMPLETED, repair_framework_status=True)
_CLAIMED = Judgement(Decision.CLAIMED)
_RETRY = {reason: Judgement(Decision.RETRY, reason) for reason in Reason}


@cache
def _state_query(content_types: tuple[ContentType, ...]) -> TextClause:
    wanted = ", ".join(
        f"('{content_type.value}', '{STORAGE[content_type].status_key}', {position})"
        for position, content_type in enumerate(content_types)
    )
    # One latest row per concept at most: the unique partial index that db init
    # creates holds the contract. Table names and keys come from STORAGE.
    latest = "\nUNION ALL\n".join(
        f"""SELECT '{content_type.value}' AS content_type, concept_id,
       content_status AS latest_status
FROM {STORAGE[content_type].table}
WHERE roadmap_id = :roadmap_id AND is_latest"""  # noqa: S608 - constants from STORAGE  # nosec B608
        for content_type in content_types
    )
    return text(
        f"""
WITH concepts AS (
  SELECT c.concept, c.concept ->> 'concept_id' AS concept_id,
         s.stage ->> 'name' AS stage_name, m.module ->> 'name' AS module_name,
         s.i, m.j, c.k
  FROM roadmap_metadata AS r
  CROSS JOIN LATERAL jsonb_array_elements({array_or_empty("r.framework_data -> 'stages'")})
       WITH ORDINALITY AS s(stage, i)
  CROSS JOIN LATERAL jsonb_array_elements({array_or_empty("s.stage -> 'modules'")})
       WITH ORDINALITY AS m(module, j)
  CROSS JOIN LATERAL jsonb_array_elements({array_or_empty("m.module -> 'concepts'")})
       WITH ORDINALITY AS c(concept, k)
  WHERE r.roadmap_id = :roadmap_id
    AND jsonb_typeof(c.concept) = 'object'
    AND c.concept ->> 'concept_id' IS NOT NULL
),
wanted(content_type, status_key, position) AS (VALUES {wanted}),
latest AS ({latest}),
claims AS (
  SELECT i.concept_id, i.content_type, bool_or({waiting_for_redrive("i")}) AS waiting
  FROM retry_items AS i
  WHERE i.roadmap_id = :roadmap_id AND {live_claim("i")}
  GROUP BY i.concept_id, i.content_type
)
SELECT w.content_type, c.concept_id,
       c.concept ->> 'name' AS name, c.concept ->> 'description' AS description,
       c.stage_name, c.module_name,
       c.concept ->> w.status_key AS framework_status,
       l.latest_status,
       cl.concept_id IS NOT NULL AS claimed, coalesce(cl.waiting, false) AS waiting
FROM concepts AS c
CROSS JOIN wanted AS w
LEFT JOIN latest AS l ON l.content_type = w.content_type AND l.concept_id = c.concept_id
LEFT JOIN claims AS cl ON cl.content_type = w.content_type AND cl.concept_id = c.concept_id
-- Only rows judge_item can act on come back: items without a completed latest
-- row, and completed ones whose framework status may need repair. A healthy
-- roadmap returns no rows however large it is.
WHERE l.latest_status IS DISTINCT FROM '{ContentStatus.COMPLETED}'
   OR c.concept ->> w.status_key IS NULL
   OR c.concept ->> w.status_key = '{FrameworkStatus.FAILED}'
ORDER BY c.i, c.j, c.k, w.position
"""  # noqa: S608 - constant fragments; values are bound  # nosec B608
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

    Runs in the caller's transaction and issues at most three statements,
    whatever the roadmap's size: lock the roadmap row, read every item's state,
    and (only when some framework status disagrees with the tables) repair
    those statuses. The roadmap stays locked until the caller's transaction
    ends, so claims written in that transaction are seen by the next planner.

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

    rows = connection.execute(
        _state_query(types),
        {"roadmap_id": roadmap_id, **claim_terms},
    )

    judged = _Judged(list_held=preview)
    # Rows unpacked by position: at 10,000 concepts, attribute access by name
    # was a third of the judge's time.
    for row in rows:
        judged.add(*row)
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


_BY_NAME = {content_type.value: content_type for content_type in ContentType}


@dataclass
class _Judged:
    """The judge's decisions over one roadmap's state rows, gathered into a plan."""

    concepts: dict[str, ConceptPlan] = field(default_factory=dict)
    # {concept_id: {status_key: status}}: framework statuses to repair.
    repairs: dict[str, dict[str, str]] = field(default_factory=dict)
    claimed: int = 0
    waiting: int = 0
    list_held: bool = False
    held: list[HeldItem] = field(default_factory=list)
    # Concepts whose ids no retry message can carry (empty, or too long).
    unplannable: set[str] = field(default_factory=set)
    _seen: set[tuple[str, str]] = field(default_factory=set)

    def add(
        self,
        content_type_name: str,
        concept_id: str,
        name: str | None,
        description: str | None,
        stage: str | None,
        module: str | None,
        framework_status: str | None,
        latest_status: str | None,
        is_claimed: bool,
        is_waiting: bool = False,
    ) -> None:
        """Judge one item's state row (the state query's columns, in order)."""
        if (concept_id, content_type_name) in self._seen:  # listed twice in framework_data
            return
        self._seen.add((concept_id, content_type_name))
        content_type = _BY_NAME[content_type_name]
        judgement = judge_item(framework_status, latest_status, is_claimed)
        if judgement.repair_framework_status:
            status_key = STORAGE[content_type].status_key
            self.repairs.setdefault(concept_id, {})[status_key] = FrameworkStatus.COMPLETED
        if judgement.decision is Decision.CLAIMED:
            self.claimed += 1
            self.waiting += is_waiting
            if self.list_held:
                self.held.append(HeldItem(concept_id, content_type, is_waiting))
        elif judgement.decision is Decision.RETRY and judgement.reason is not None:
            concept = self.concepts.get(concept_id)
            if concept is None:
                if concept_id in self.unplannable:
                    return
                try:
                    built = Concept.from_framework(concept_id, name, description, stage, module)
                except ValueError:  # no retry message can carry its id
                    self.unplannable.add(concept_id)
                    return
                concept = self.concepts[concept_id] = ConceptPlan(built)
            concept.items.append(PlannedItem(content_type, judgement.reason))
