"""The retry message (DESIGN §5, a contract): one per concept, self-contained."""

from __future__ import annotations

from functools import cache
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from content_retry.concepts import Concept, Identifier
from content_retry.content_types import ContentType
from content_retry.generated import GeneratedContent
from content_retry.plan.models import ConceptPlan, Reason, RetryPlan

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
    return [message_for_concept(task, plan, concept, preferences) for concept in plan.concepts]


def message_for_concept(
    task_id: UUID | str, plan: RetryPlan, concept: ConceptPlan, preferences: Preferences
) -> RetryMessage:
    """The message of one planned concept. Detect builds them one at a time as
    it sends, so a large plan's messages are never all in memory at once."""
    return RetryMessage(
        version=MESSAGE_VERSION,
        task_id=task_id if isinstance(task_id, UUID) else UUID(task_id),
        roadmap_id=plan.roadmap_id,
        user_id=plan.user_id,
        concept=concept.concept,
        items=[_message_item(item.content_type, item.reason) for item in concept.items],
        preferences=preferences,
    )


@cache
def _message_item(content_type: ContentType, reason: Reason) -> MessageItem:
    # Frozen, and at most one per content type and reason: shared by every message.
    return MessageItem(content_type=content_type, reason=reason)
