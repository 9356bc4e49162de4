"""The retry message (DESIGN §5, a contract): one per concept, self-contained."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from content_retry.concepts import Concept, Identifier
from content_retry.content_types import ContentType
from content_retry.generated import GeneratedContent
from content_retry.plan.models import Reason, RetryPlan

MESSAGE_VERSION = 1


class Preferences(BaseModel):
    """How the learner wants content written; passed to the generator as given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")] = "en"
    level: Literal["beginner", "intermediate", "advanced"] = "beginner"


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    content_type: ContentType
    reason: Reason


class RetryMessage(BaseModel):
    """Everything the generate function needs for one concept; it never re-decides.

    The deduplication key of each item is ``(task_id, concept.concept_id,
    content_type)``, never the SQS message id.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    task_id: UUID
    roadmap_id: Identifier
    user_id: Identifier
    concept: Concept
    items: Annotated[list[MessageItem], Field(min_length=1, max_length=len(ContentType))]
    preferences: Preferences = Preferences()
    generated: GeneratedContent | None = None

    @field_validator("items")
    @classmethod
    def _one_item_per_content_type(cls, items: list[MessageItem]) -> list[MessageItem]:
        types = [item.content_type for item in items]
        if len(set(types)) != len(types):
            raise ValueError("items name a content type more than once")
        return items

    def to_body(self) -> str:
        return self.model_dump_json()


def messages_for_plan(
    task_id: UUID | str, plan: RetryPlan, preferences: Preferences
) -> list[RetryMessage]:
    """One message per planned concept, carrying the concept's full context."""
    task = UUID(str(task_id))
    return [
        RetryMessage(
            version=MESSAGE_VERSION,
            task_id=task,
            roadmap_id=plan.roadmap_id,
            user_id=plan.user_id,
            concept=concept_plan.concept,
            items=[
                MessageItem(content_type=item.content_type, reason=item.reason)
                for item in concept_plan.items
            ],
            preferences=preferences,
        )
        for concept_plan in plan.concepts
    ]
