"""The content generator interface (DESIGN §9), what each call cost, and how failures differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generated import ContentModel
from content_retry.messages import Preferences


@dataclass(frozen=True)
class Usage:
    """What one generator call cost: the model's tokens, and the attempts the
    LLM service refused for throttling before it answered (or gave up)."""

    input_tokens: int = 0
    output_tokens: int = 0
    throttled_attempts: int = 0


NO_USAGE = Usage()


@dataclass(frozen=True)
class Generation:
    """One item's content, and what generating it cost."""

    content: ContentModel
    usage: Usage = NO_USAGE


class GenerationError(Exception):
    """Generation failed; ``usage`` is what the failed call still cost."""

    def __init__(self, message: str, *, usage: Usage = NO_USAGE) -> None:
        super().__init__(message)
        self.usage = usage


class TransientGenerationError(GenerationError):
    """May pass if tried again later (throttling, timeout, a 5xx): SQS redelivers."""


class ThrottledError(TransientGenerationError):
    """The LLM service refused the call for the account's quota: not the item's
    fault and nothing paid; the item waits for the quota, however often."""


class ConfigurationError(GenerationError):
    """The LLM service refuses every call as configured (access denied, model
    not found or not enabled, the request rejected as a whole): no item's fault.

    Its records go back to the queue untouched, an operator fixes the cause.
    """


class MalformedOutputError(TransientGenerationError):
    """The model answered, but not with content of the asked shape (paid for all the same).

    Transient a bounded number of times (the worker counts attempts), then
    permanent: a model that keeps answering badly will not be paid forever.
    """


class PermanentGenerationError(GenerationError):
    """Will not pass by trying again (validation, content filtered): the item fails."""


class CutOffAnswerError(PermanentGenerationError):
    """The answer was cut at ``maxTokens``, also at the larger budget tried next."""


class ContentGenerator(Protocol):
    """Writes one content type for one concept."""

    name: str

    def generate(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> Generation:
        """Generate the content.

        Raises:
            TransientGenerationError: try again later.
            PermanentGenerationError: trying again will not help.
        """
        ...
