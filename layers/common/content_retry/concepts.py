"""A concept of a roadmap, as the plan, the retry message and the generators see it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_ID_LENGTH = 1_024
MAX_NAME_LENGTH = 1_000
MAX_TEXT_LENGTH = 10_000

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
OptionalText = Annotated[str | None, Field(max_length=MAX_TEXT_LENGTH)]


class Concept(BaseModel):
    """Everything about a concept that a generator needs, copied from ``framework_data``.

    The judge builds it (:meth:`from_framework`), the retry message carries it,
    the generators write from it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    concept_id: Identifier
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
    description: OptionalText = None
    stage: OptionalText = None
    module: OptionalText = None

    @classmethod
    def from_framework(
        cls,
        concept_id: str,
        name: str | None,
        description: str | None,
        stage: str | None,
        module: str | None,
    ) -> Concept:
        """A concept read from ``framework_data``, which has no length limits.

        Texts are clipped to the model's limits and a concept without a name
        is named by its id, so every concept the judge plans gets content.
        Validated all the same (pydantic-core does it faster than
        ``model_construct`` skips it, and the judge builds thousands): what
        no clipping can fix is refused here rather than by the worker.

        Raises:
            ValueError: the id is empty or longer than :data:`MAX_ID_LENGTH`,
                so no retry message can carry the concept.
        """
        return cls(
            concept_id=concept_id,
            name=_clip(name or concept_id, MAX_NAME_LENGTH),
            description=_clip_optional(description),
            stage=_clip_optional(stage),
            module=_clip_optional(module),
        )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clip_optional(text: str | None) -> str | None:
    return None if text is None else _clip(text, MAX_TEXT_LENGTH)
