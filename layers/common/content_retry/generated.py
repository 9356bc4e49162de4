"""Generated content, per content type (DESIGN §9).

The same shapes come out of a generator, travel in a dead-lettered message's
``generated`` field, and are saved into the platform's tables.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from content_retry.content_types import ContentType

Text = Annotated[str, Field(min_length=1, max_length=200_000)]
ShortText = Annotated[str, Field(min_length=1, max_length=2_000)]


class _Content(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TutorialContent(_Content):
    title: ShortText
    summary: ShortText
    content_markdown: Text


class Resource(_Content):
    title: ShortText
    url: HttpUrl
    kind: Annotated[str, Field(min_length=1, max_length=50)]
    why: ShortText


class ResourcesContent(_Content):
    resources: Annotated[list[Resource], Field(min_length=1, max_length=30)]


class Question(_Content):
    question: ShortText
    options: Annotated[list[ShortText], Field(min_length=4, max_length=4)]
    answer_index: Annotated[int, Field(ge=0, le=3)]
    explanation: ShortText


class QuizContent(_Content):
    questions: Annotated[list[Question], Field(min_length=1, max_length=30)]


ContentModel = TutorialContent | ResourcesContent | QuizContent

CONTENT_MODELS: dict[ContentType, type[TutorialContent | ResourcesContent | QuizContent]] = {
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
        if self.tutorial is None and self.resources is None and self.quiz is None:
            raise ValueError("generated holds no content; give tutorial, resources or quiz")
        return self

    def get(self, content_type: ContentType) -> ContentModel | None:
        value: ContentModel | None = getattr(self, content_type.value)
        return value
