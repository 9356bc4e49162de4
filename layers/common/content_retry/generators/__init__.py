"""Content generators: ``template`` (offline, deterministic) and ``bedrock`` (Converse API)."""

from __future__ import annotations

from functools import lru_cache

from content_retry.generators.base import (
    ContentGenerator,
    GenerationError,
    MalformedOutputError,
    PermanentGenerationError,
    TransientGenerationError,
)
from content_retry.settings import get_settings

_override: ContentGenerator | None = None


def use_generator(generator: ContentGenerator | None) -> None:
    """Make ``generator`` this process's generator (None: back to the configured one).

    For the local runtime (the demo counts calls and injects a fault); Lambda
    never calls it.
    """
    global _override
    _override = generator


def get_generator() -> ContentGenerator:
    """The process's generator: the one set by :func:`use_generator`, else the
    configured one (``CONTENT_GENERATOR``), created on first use."""
    return _override if _override is not None else _configured_generator()


@lru_cache(maxsize=1)
def _configured_generator() -> ContentGenerator:
    settings = get_settings()
    if settings.content_generator == "bedrock":
        from content_retry.aws import bedrock_runtime_client
        from content_retry.generators.bedrock import BedrockGenerator

        return BedrockGenerator(bedrock_runtime_client(), settings.require("bedrock_model_id"))
    from content_retry.generators.template import TemplateGenerator

    return TemplateGenerator()


__all__ = [
    "ContentGenerator",
    "GenerationError",
    "MalformedOutputError",
    "PermanentGenerationError",
    "TransientGenerationError",
    "get_generator",
    "use_generator",
]
