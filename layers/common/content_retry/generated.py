"""Generated content, per content type (DESIGN §9).

The same shapes come out of a generator, travel in a dead-lettered message's
``generated`` field, and are saved into the platform's tables: each model
says what goes in its row's ``title`` and payload column
(:class:`~content_retry.content_types.ContentStorage`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from content_retry.content_types import ContentType

Text = Annotated[str, Field(min_length=1, max_length=200_000)]
ShortText = Annotated[str, Field(min_length=1, max_length=2_000)]


class _Content(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContentModel(_Content, ABC):
    """One content type's generated content, saved as one row of its table."""

    @abstractmethod
    def stored_title(self, concept_name: str) -> str:
        """The row's ``title``."""

    @abstractmethod
    def stored_payload(self) -> Any:
        """The row's payload: a string for a text column, JSON-ready data for jsonb."""


class TutorialContent(ContentModel):
    title: ShortText
    summary: ShortText
    content_markdown: Text

    def stored_title(self, concept_name: str) -> str:
        return self.title

    def stored_payload(self) -> Any:
        return self.content_markdown


class Resource(_Content):
    title: ShortText
    url: HttpUrl
    kind: Annotated[str, Field(min_length=1, max_length=50)]
    why: ShortText


class ResourcesContent(ContentModel):
    resources: Annotated[list[Resource], Field(min_length=1, max_length=30)]

    def stored_title(self, concept_name: str) -> str:
        return f"Resources: {concept_name}"

    def stored_payload(self) -> Any:
        return self.model_dump(mode="json")["resources"]


class Question(_Content):
    question: ShortText
    options: Annotated[list[ShortText], Field(min_length=4, max_length=4)]
    answer_index: Annotated[int, Field(ge=0, le=3)]
    explanation: ShortText


class QuizContent(ContentModel):
    questions: Annotated[list[Question], Field(min_length=1, max_length=30)]

    def stored_title(self, concept_name: str) -> str:
        return f"Quiz: {concept_name}"

    def stored_payload(self) -> Any:
        return self.model_dump(mode="json")["questions"]


CONTENT_MODELS: dict[ContentType, type[ContentModel]] = {
    ContentType.TUTORIAL: TutorialContent,
    ContentType.RESOURCES: ResourcesContent,
    ContentType.QUIZ: QuizContent,
}


class GeneratedContent(_Content):
    """What was generated for one concept's items, keyed by content type."""

    tutorial: TutorialContent | None = None
    resources: ResourcesContent | None = None
    quiz: QuizContent | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> GeneratedContent:
        if all(self.get(content_type) is None for content_type in ContentType):
            raise ValueError(f"generated holds no content; give one of: {', '.join(ContentType)}")
        return self

    def get(self, content_type: ContentType) -> ContentModel | None:
        value: ContentModel | None = getattr(self, content_type.value)
        return value

    @classmethod
    def of(cls, contents: dict[ContentType, ContentModel]) -> GeneratedContent:
        """Content keyed by content type, as a message's ``generated`` field."""
        return cls.model_validate({content_type.value: c for content_type, c in contents.items()})
