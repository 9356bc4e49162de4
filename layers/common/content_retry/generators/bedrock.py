"""The ``bedrock`` generator: Amazon Bedrock's Converse API, JSON validated with pydantic."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generated import CONTENT_MODELS, ContentModel
from content_retry.generators.base import (
    MalformedOutputError,
    PermanentGenerationError,
    TransientGenerationError,
)
from content_retry.messages import Preferences

# Error codes that may pass on a later try; botocore's standard retry mode has
# already retried them a bounded number of times before they reach us.
_TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "ServiceUnavailableException",
        "InternalServerException",
        "ModelTimeoutException",
        "ModelNotReadyException",
        "ModelErrorException",
        "RequestTimeout",
        "TooManyRequestsException",
    }
)
# Stop reasons that mean the answer was refused or cut, not merely late.
_REFUSED = frozenset({"content_filtered", "guardrail_intervened"})

_SHAPES = {
    ContentType.TUTORIAL: '{"title": str, "summary": str, "content_markdown": str (markdown)}',
    ContentType.RESOURCES: (
        '{"resources": [{"title": str, "url": str (https URL), "kind": str '
        '(article|video|course|book|docs|code|papers), "why": str}]} with 3 to 8 resources'
    ),
    ContentType.QUIZ: (
        '{"questions": [{"question": str, "options": [4 strings], "answer_index": 0-3, '
        '"explanation": str}]} with 3 to 8 questions'
    ),
}

SYSTEM_PROMPT = (
    "You write learning content for one concept of a learning roadmap. Answer with one "
    "JSON object only, of exactly the shape asked for, with no text before or after it."
)


def build_prompt(concept: Concept, content_type: ContentType, preferences: Preferences) -> str:
    """The user prompt: the concept's whole context and the JSON shape wanted."""
    context = {
        "concept": concept.name,
        "description": concept.description,
        "stage": concept.stage,
        "module": concept.module,
        "language": preferences.language,
        "level": preferences.level,
    }
    return (
        f"Write the {content_type.value} for this concept.\n"
        f"Context: {json.dumps(context, ensure_ascii=False)}\n"
        f"Answer with JSON of this shape: {_SHAPES[content_type]}"
    )


def _extract_json(text: str) -> Any:
    """The JSON object in a model's answer (tolerating a Markdown code fence)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the answer")
    return json.loads(text[start : end + 1])


class BedrockGenerator:
    """Calls one Bedrock model through the Converse API."""

    name = "bedrock"

    def __init__(self, client: Any, model_id: str, *, max_tokens: int = 4096) -> None:
        self._client = client
        self._model_id = model_id
        self._max_tokens = max_tokens

    def generate(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> ContentModel:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.converse(
                modelId=self._model_id,
                system=[{"text": SYSTEM_PROMPT}],
                messages=[
                    {
                        "role": "user",
                        "content": [{"text": build_prompt(concept, content_type, preferences)}],
                    }
                ],
                inferenceConfig={"maxTokens": self._max_tokens, "temperature": 0.3},
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _TRANSIENT_CODES or status >= 500:
                raise TransientGenerationError(f"bedrock {code or status}: {exc}") from exc
            raise PermanentGenerationError(f"bedrock {code or status}: {exc}") from exc
        except BotoCoreError as exc:  # timeouts, connection errors after botocore's retries
            raise TransientGenerationError(f"bedrock unreachable: {exc}") from exc

        stop_reason = response.get("stopReason")
        if stop_reason in _REFUSED:
            raise PermanentGenerationError(f"bedrock refused the content: stopReason={stop_reason}")
        try:
            blocks = response["output"]["message"]["content"]
            answer = "".join(block.get("text", "") for block in blocks)
            return CONTENT_MODELS[content_type].model_validate(_extract_json(answer))
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            # ValidationError is a ValueError; a cut answer (max_tokens) lands here too.
            raise MalformedOutputError(
                f"bedrock answer is not a valid {content_type.value} "
                f"(stopReason={stop_reason}): {exc}"
            ) from exc
