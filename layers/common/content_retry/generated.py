"""Generated content per content type (DESIGN §9): what a generator returns, a
dead-letter copy holds in ``generated``, and the save writes into the tables."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)

from content_retry.content_types import ContentType
from content_retry.validation import describe_errors


def _storable(text: str) -> str:
    """PostgreSQL stores no NUL character, in text or in jsonb: content holding one
    could never be saved, however often tried. (An unpaired surrogate, which it
    cannot store either, pydantic refuses in any ``str`` already.)"""
    position = text.find("\x00")
    if position >= 0:
        raise ValueError(f"holds a NUL character (at {position}), which PostgreSQL cannot store")
    return text


# The limits agree with what one answer can hold: every model's largest
# instance fits the output budget of a retried cut answer (2 x BEDROCK_MAX_TOKENS
# = 8,192 tokens, about 36,000 characters; a test holds them together), so a
# limit is never met only by an answer that was cut and paid for.
Text = Annotated[str, Field(min_length=1, max_length=32_000), AfterValidator(_storable)]
ShortText = Annotated[str, Field(min_length=1, max_length=1_000), AfterValidator(_storable)]
Sentence = Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_storable)]
Title = Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_storable)]
Label = Annotated[str, Field(min_length=1, max_length=50), AfterValidator(_storable)]


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
    title: Title
    summary: ShortText
    content_markdown: Text

    def stored_title(self, concept_name: str) -> str:
        return self.title

    def stored_payload(self) -> Any:
        return self.content_markdown


class Resource(_Content):
    title: Title
    url: HttpUrl
    kind: Label
    why: Sentence


class ResourcesContent(ContentModel):
    resources: Annotated[list[Resource], Field(min_length=1, max_length=12)]

    def stored_title(self, concept_name: str) -> str:
        return f"Resources: {concept_name}"

    def stored_payload(self) -> Any:
        return self.model_dump(mode="json")["resources"]


class Question(_Content):
    question: Sentence
    options: Annotated[list[Title], Field(min_length=4, max_length=4)]
    answer_index: Annotated[int, Field(ge=0, le=3)]
    explanation: Sentence


class QuizContent(ContentModel):
    questions: Annotated[list[Question], Field(min_length=1, max_length=15)]

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
    """What was generated for one concept's items, keyed by content type.

    Content that is not valid (say it holds what PostgreSQL cannot store) does
    not make the whole message unreadable: it is rejected into :attr:`unusable`
    with the reason, so only its own item fails and the others are saved.
    """

    tutorial: TutorialContent | None = None
    resources: ResourcesContent | None = None
    quiz: QuizContent | None = None
    _unusable: dict[ContentType, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _set_aside_what_cannot_be_used(
        cls, data: Any, handler: ValidatorFunctionWrapHandler
    ) -> GeneratedContent:
        unusable: dict[ContentType, str] = {}
        if isinstance(data, dict):
            data = dict(data)
            for content_type in ContentType:
                value = data.get(content_type.value)
                if value is None or isinstance(value, CONTENT_MODELS[content_type]):
                    continue
                try:
                    CONTENT_MODELS[content_type].model_validate(value)
                except ValidationError as exc:
                    del data[content_type.value]
                    unusable[content_type] = "; ".join(describe_errors(exc.errors(), whole="it"))
        generated: GeneratedContent = handler(data)
        if not unusable and all(generated.get(ct) is None for ct in ContentType):
            raise ValueError(f"generated holds no content; give one of: {', '.join(ContentType)}")
        generated._unusable = unusable
        return generated

    @property
    def unusable(self) -> dict[ContentType, str]:
        """Content types whose content could not be used, with why."""
        return dict(self._unusable)

    def get(self, content_type: ContentType) -> ContentModel | None:
        value: ContentModel | None = getattr(self, content_type.value)
        return value

    @classmethod
    def of(cls, contents: dict[ContentType, ContentModel]) -> GeneratedContent:
        """Content keyed by content type, as a message's ``generated`` field."""
        return cls.model_validate({content_type.value: c for content_type, c in contents.items()})
