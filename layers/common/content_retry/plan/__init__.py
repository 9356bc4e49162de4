"""The retry plan and the one judge that builds it."""

from content_retry.plan.judge import (
    Decision,
    Judgement,
    RoadmapNotFoundError,
    build_retry_plan,
    judge_item,
)
from content_retry.plan.models import ConceptPlan, PlannedItem, Reason, RetryPlan

__all__ = [
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
