"""The retry plan and the one judge that builds it."""

from content_retry.plan.judge import (
    Decision,
    Judgement,
    RoadmapNotFoundError,
    build_retry_plan,
    judge_item,
)
from content_retry.plan.models import ConceptContext, ConceptPlan, PlannedItem, Reason, RetryPlan

__all__ = [
    "ConceptContext",
    "ConceptPlan",
    "Decision",
    "Judgement",
    "PlannedItem",
    "Reason",
    "RetryPlan",
    "RoadmapNotFoundError",
    "build_retry_plan",
    "judge_item",
]
