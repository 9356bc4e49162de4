"""Content generators: ``template`` (offline, deterministic) and ``bedrock`` (Converse API)."""

from __future__ import annotations

from functools import lru_cache

from content_retry.generators.base import (
    NO_USAGE,
    ConfigurationError,
    ContentGenerator,
    CutOffAnswerError,
    Generation,
    GenerationError,
    MalformedOutputError,
    PermanentGenerationError,
    ThrottledError,
    TransientGenerationError,
    Usage,
)
from content_retry.settings import get_settings


@lru_cache(maxsize=1)
def get_generator() -> ContentGenerator:
    """The process's generator (``CONTENT_GENERATOR``), created on first use."""
    settings = get_settings()
    if settings.content_generator == "bedrock":
        from content_retry.aws import bedrock_runtime_client
        from content_retry.generators.bedrock import BedrockGenerator

        return BedrockGenerator(
            bedrock_runtime_client(),
            settings.require("bedrock_model_id"),
            output=settings.bedrock_output,
            max_tokens=settings.bedrock_max_tokens,
        )
    from content_retry.generators.template import TemplateGenerator

    return TemplateGenerator()


__all__ = [
    "NO_USAGE",
    "ConfigurationError",
    "ContentGenerator",
    "CutOffAnswerError",
    "Generation",
    "GenerationError",
    "MalformedOutputError",
    "PermanentGenerationError",
    "ThrottledError",
    "TransientGenerationError",
    "Usage",
    "get_generator",
]
