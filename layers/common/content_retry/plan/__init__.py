"""The retry plan: its models and the one judge's rule (pure); the judge's
service, which reads the database, is :mod:`content_retry.plan.build`."""

from __future__ import annotations

from content_retry.plan.judge import Decision, JudgedRoadmap, Judgement, judge_item, plan_from_rows
from content_retry.plan.models import (
    ConceptPlan,
    PlannedItem,
    Reason,
    RetryPlan,
    RoadmapNotFoundError,
)

__all__ = [
    "ConceptPlan",
    "Decision",
    "JudgedRoadmap",
    "Judgement",
    "PlannedItem",
    "Reason",
    "RetryPlan",
    "RoadmapNotFoundError",
    "judge_item",
    "plan_from_rows",
]
