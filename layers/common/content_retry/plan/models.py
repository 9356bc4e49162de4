"""The retry plan: what the judge hands to everything downstream."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from content_retry.concepts import Concept
from content_retry.content_types import ContentType


class Reason(StrEnum):
    """Why an item was planned (DESIGN §4)."""

    MISSING = "missing"
    FAILED = "failed"
    STALE = "stale"


# Slots: a 50,000-concept roadmap's plan holds up to 150,000 items, each a
# third of the size of an object with a __dict__ (detect runs in 512 MB).
@dataclass(frozen=True, slots=True)
class PlannedItem:
    content_type: ContentType
    reason: Reason


@dataclass(slots=True)
class ConceptPlan:
    """One concept's items that need retry: one retry message."""

    concept: Concept
    items: list[PlannedItem] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HeldItem:
    """An item that needs content but is held: a live claim of another task, or
    its generated content waiting in the dead-letter queue for a re-drive."""

    concept_id: str
    content_type: ContentType
    waiting_for_redrive: bool


@dataclass
class RetryPlan:
    roadmap_id: str
    user_id: str
    content_types: tuple[ContentType, ...]
    concepts: list[ConceptPlan]
    # Items left out because another task holds a live claim on them.
    claimed_count: int = 0
    # Of those, items whose generated content waits in the dead-letter queue.
    waiting_for_redrive_count: int = 0
    # Framework statuses set to completed because a completed latest row exists.
    repaired_count: int = 0
    # The held items themselves (listed only when asked for: the retry-plan view).
    held: list[HeldItem] = field(default_factory=list)

    @property
    def items(self) -> list[tuple[Concept, PlannedItem]]:
        return [(plan.concept, item) for plan in self.concepts for item in plan.items]

    @property
    def item_count(self) -> int:
        return sum(len(plan.items) for plan in self.concepts)

    def count_by_type(self) -> dict[str, int]:
        counts = Counter(item.content_type.value for _, item in self.items)
        return {
            content_type.value: counts[content_type.value] for content_type in self.content_types
        }

    def count_by_reason(self) -> dict[str, int]:
        counts = Counter(item.reason.value for _, item in self.items)
        return {reason.value: counts[reason.value] for reason in Reason}


class RoadmapNotFoundError(LookupError):
    """The roadmap does not exist, or is not the caller's (the two are not told apart)."""
