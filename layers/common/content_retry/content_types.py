"""The kinds of learning content and where each lives (DESIGN §3): the one
declaration the tables, the save, the judge and the sweep derive from."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class ContentType(StrEnum):
    TUTORIAL = "tutorial"
    RESOURCES = "resources"
    QUIZ = "quiz"


class PayloadFormat(StrEnum):
    """How a content row holds its payload."""

    TEXT = "text"  # markdown, as is
    JSON = "json"  # a jsonb document


@dataclass(frozen=True)
class ContentStorage:
    """Where one content type is stored in the platform's tables.

    Attributes:
        table: its table (one row per version; DESIGN §3's columns).
        id_column: the table's uuid primary key.
        payload_column: the column holding the content itself.
        payload_format: text or jsonb.
        status_key: the concept's status for this type in ``framework_data``.
    """

    table: str
    id_column: str
    payload_column: str
    payload_format: PayloadFormat
    status_key: str


STORAGE: dict[ContentType, ContentStorage] = {
    ContentType.TUTORIAL: ContentStorage(
        "tutorials", "tutorial_id", "content", PayloadFormat.TEXT, "content_status"
    ),
    ContentType.RESOURCES: ContentStorage(
        "resource_recommendations", "id", "resources", PayloadFormat.JSON, "resources_status"
    ),
    ContentType.QUIZ: ContentStorage(
        "quizzes", "id", "questions", PayloadFormat.JSON, "quiz_status"
    ),
}

ALL_CONTENT_TYPES: tuple[ContentType, ...] = tuple(ContentType)
VALID_NAMES: tuple[str, ...] = tuple(item.value for item in ContentType)


class UnknownContentTypeError(ValueError):
    """A content type list holds a name that is not a content type, or is empty."""


def parse_content_types(names: Iterable[str] | None) -> tuple[ContentType, ...]:
    """Validate a caller's content types; ``None`` means all of them.

    Duplicates are dropped and the canonical order is kept, so that equal
    requests produce equal plans.

    Raises:
        UnknownContentTypeError: a name is not a content type (the message names
            the valid ones), or the list is empty.
    """
    if names is None:
        return ALL_CONTENT_TYPES
    requested = list(names)
    if not requested:
        raise UnknownContentTypeError(
            f"content_types is empty; give one or more of: {', '.join(VALID_NAMES)}"
        )
    unknown = [name for name in requested if name not in VALID_NAMES]
    if unknown:
        raise UnknownContentTypeError(
            f"unknown content type {', '.join(repr(name) for name in unknown)}; "
            f"valid content types are: {', '.join(VALID_NAMES)}"
        )
    return tuple(item for item in ContentType if item.value in requested)
