"""The content generator interface (DESIGN §9) and how its failures are told apart."""

from __future__ import annotations

from typing import Protocol

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generated import ContentModel
from content_retry.messages import Preferences


class GenerationError(Exception):
    """Generation failed."""


class TransientGenerationError(GenerationError):
    """May pass if tried again later (throttling, timeout, a 5xx): SQS redelivers."""


class MalformedOutputError(TransientGenerationError):
    """The model answered, but not with valid JSON of the asked shape.

    Transient a bounded number of times (the worker counts attempts), then
    permanent: a model that keeps answering badly will not be paid forever.
    """


class PermanentGenerationError(GenerationError):
    """Will not pass by trying again (validation, content filtered): the item fails."""


class ContentGenerator(Protocol):
    """Writes one content type for one concept."""

    name: str

    def generate(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> ContentModel:
        """Generate the content.

        Raises:
            TransientGenerationError: try again later.
            PermanentGenerationError: trying again will not help.
        """
        ...
