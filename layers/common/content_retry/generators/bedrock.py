"""The ``bedrock`` generator: Amazon Bedrock's Converse API (tool use, or JSON in the
answer's text), the content checked against its model, each call's cost reported."""

from __future__ import annotations

import json
import threading
from functools import cache
from typing import Any, Literal

from pydantic import ValidationError

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generated import CONTENT_MODELS
from content_retry.generators.base import (
    ConfigurationError,
    CutOffAnswerError,
    Generation,
    GenerationError,
    MalformedOutputError,
    PermanentGenerationError,
    ThrottledError,
    TransientGenerationError,
    Usage,
)
from content_retry.messages import Preferences

# Error codes that may pass on a later try; botocore's retry mode has already
# retried them a bounded number of times before they reach us.
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
_THROTTLING_CODES = frozenset({"ThrottlingException", "TooManyRequestsException"})
# Error codes that refuse every call as configured: the account, the role or
# the model id is wrong, not the item. Nothing an item can change fixes them.
_CONFIGURATION_CODES = frozenset(
    {
        "AccessDeniedException",
        "ResourceNotFoundException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "UnauthorizedException",
    }
)
# A ValidationException is the item's own (its input) unless it is about the
# model: an invalid model identifier, a model not enabled or not offered
# on demand (it needs an inference profile).
_CONFIGURATION_WORDS = ("model identifier", "model id", "inference profile", "on-demand", "access")
# Characters of the prompt per input token, at the fewest: the reservation
# must not be below what Bedrock counts.
_PROMPT_CHARS_PER_TOKEN = 3
# An answer cut at maxTokens is tried once more with this many times the budget.
CUT_OFF_RETRY_FACTOR = 2
# Stop reasons that mean the answer was refused, not merely late or cut.
_REFUSED = frozenset({"content_filtered", "guardrail_intervened"})

SYSTEM_PROMPT = (
    "You write learning content for one concept of a learning roadmap, for the learner's "
    "language and level. Write real, accurate, useful content; links must be real URLs."
)
_TEXT_INSTRUCTION = (
    "Answer with one JSON object only, valid against this JSON schema, with no text "
    "before or after it: "
)

BedrockOutput = Literal["tool_use", "text"]


def tool_name(content_type: ContentType) -> str:
    return f"write_{content_type.value}"


@cache
def content_schema(content_type: ContentType) -> dict[str, Any]:
    """The JSON schema of a content type's generated model (what the tool takes)."""
    return CONTENT_MODELS[content_type].model_json_schema()


def build_prompt(concept: Concept, content_type: ContentType, preferences: Preferences) -> str:
    """The user prompt: the concept's whole context and what to write."""
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
        f"Context: {json.dumps(context, ensure_ascii=False)}"
    )


def converse_request(
    model_id: str,
    concept: Concept,
    content_type: ContentType,
    preferences: Preferences,
    *,
    output: BedrockOutput,
    max_tokens: int,
) -> dict[str, Any]:
    """The Converse request for one item."""
    prompt = build_prompt(concept, content_type, preferences)
    request: dict[str, Any] = {
        "modelId": model_id,
        "system": [{"text": SYSTEM_PROMPT}],
        "inferenceConfig": {"maxTokens": max_tokens, "temperature": 0.3},
    }
    if output == "text":
        schema = json.dumps(content_schema(content_type), separators=(",", ":"))
        prompt += f"\n{_TEXT_INSTRUCTION}{schema}"
    else:
        name = tool_name(content_type)
        request["toolConfig"] = {
            "tools": [
                {
                    "toolSpec": {
                        "name": name,
                        "description": f"Save the {content_type.value} written for the concept.",
                        "inputSchema": {"json": content_schema(content_type)},
                    }
                }
            ],
            "toolChoice": {"tool": {"name": name}},
        }
    request["messages"] = [{"role": "user", "content": [{"text": prompt}]}]
    return request


def _extract_json(text: str) -> Any:
    """The JSON object in a model's text answer (tolerating a Markdown code fence)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the answer")
    return json.loads(text[start : end + 1])


def _answer(response: dict[str, Any], content_type: ContentType, output: BedrockOutput) -> Any:
    """The content the model gave: the tool call's input, or the JSON in its text.

    Raises:
        KeyError, TypeError, ValueError: the answer holds no such content.
    """
    blocks = response["output"]["message"]["content"]
    if output == "text":
        return _extract_json("".join(block.get("text", "") for block in blocks))
    name = tool_name(content_type)
    calls = [block["toolUse"] for block in blocks if "toolUse" in block]
    return next(call["input"] for call in calls if call.get("name") == name)


def _classified(exc: Any, usage: Usage) -> GenerationError:
    """A Bedrock error as the worker tells them apart: the quota, a fault that
    may pass, the configuration, or the item's own."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    detail = f"bedrock {code or status}: {exc}"
    if code in _THROTTLING_CODES:
        return ThrottledError(detail, usage=usage)
    if code in _TRANSIENT_CODES or status >= 500:
        return TransientGenerationError(detail, usage=usage)
    if code in _CONFIGURATION_CODES or status in (401, 403) or _about_the_model(code, str(exc)):
        return ConfigurationError(detail, usage=usage)
    return PermanentGenerationError(detail, usage=usage)


def _about_the_model(code: str, message: str) -> bool:
    """A ValidationException that rejects the model, not this item's request."""
    lowered = message.lower()
    return code == "ValidationException" and any(word in lowered for word in _CONFIGURATION_WORDS)


def _sum(first: Usage, second: Usage) -> Usage:
    return Usage(
        first.input_tokens + second.input_tokens,
        first.output_tokens + second.output_tokens,
        first.throttled_attempts + second.throttled_attempts,
    )


class _ThrottleCounter:
    """Counts the attempts botocore sees throttled, per calling thread.

    botocore retries throttled attempts inside one ``converse`` call; its
    ``needs-retry`` event sees each attempt's error code, and runs on the
    thread that made the call, so each of the concurrent calls counts its own.
    """

    def __init__(self, client: Any) -> None:
        self._local = threading.local()
        client.meta.events.register("needs-retry.bedrock-runtime.Converse", self._attempt)

    def _attempt(self, response: Any = None, **_: Any) -> None:
        if response is None:
            return
        code = (response[1] or {}).get("Error", {}).get("Code")
        if code in _THROTTLING_CODES:
            self._local.count = getattr(self._local, "count", 0) + 1

    def take(self) -> int:
        """This thread's throttled attempts since the last take."""
        count: int = getattr(self._local, "count", 0)
        self._local.count = 0
        return count


class BedrockGenerator:
    """Calls one Bedrock model through the Converse API; safe to call from several threads."""

    name = "bedrock"

    def __init__(
        self,
        client: Any,
        model_id: str,
        *,
        output: BedrockOutput = "tool_use",
        max_tokens: int = 4096,
    ) -> None:
        self._client = client
        self._model_id = model_id
        self._output: BedrockOutput = output
        self._max_tokens = max_tokens
        self._throttles = _ThrottleCounter(client)

    @property
    def model_id(self) -> str:
        """The model (or inference profile) called: the quota's key."""
        return self._model_id

    def reservation(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> int:
        """The tokens Bedrock reserves against the quota when this call starts:
        its input tokens (estimated from the request's text, generously) plus
        ``maxTokens``."""
        request = self._request(concept, content_type, preferences, self._max_tokens)
        chars = len(json.dumps(request, ensure_ascii=False))
        return chars // _PROMPT_CHARS_PER_TOKEN + self._max_tokens

    def generate(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> Generation:
        self._throttles.take()  # nothing left over from an earlier call of this thread
        response, usage = self._call(concept, content_type, preferences, self._max_tokens)
        stop_reason = response.get("stopReason")
        if stop_reason == "max_tokens":
            # Cut, not malformed: the same budget would be cut the same way, so
            # it is tried once more with a larger one, then failed with why.
            larger = self._max_tokens * CUT_OFF_RETRY_FACTOR
            try:
                response, more = self._call(concept, content_type, preferences, larger)
            except GenerationError as exc:
                exc.usage = _sum(usage, exc.usage)
                raise
            usage, stop_reason = _sum(usage, more), response.get("stopReason")
            if stop_reason == "max_tokens":
                raise CutOffAnswerError(
                    f"bedrock answer cut at maxTokens twice ({self._max_tokens}, then {larger}): "
                    "the content does not fit the output budget",
                    usage=usage,
                )
        if stop_reason in _REFUSED:
            raise PermanentGenerationError(
                f"bedrock refused the content: stopReason={stop_reason}", usage=usage
            )
        try:
            content = CONTENT_MODELS[content_type].model_validate(
                _answer(response, content_type, self._output)
            )
        except (KeyError, TypeError, ValueError, StopIteration, ValidationError) as exc:
            # ValidationError is a ValueError.
            raise MalformedOutputError(
                f"bedrock answer is not a valid {content_type.value} "
                f"(stopReason={stop_reason}): {exc}",
                usage=usage,
            ) from exc
        return Generation(content, usage)

    def _call(
        self,
        concept: Concept,
        content_type: ContentType,
        preferences: Preferences,
        max_tokens: int,
    ) -> tuple[dict[str, Any], Usage]:
        """One Converse call with this output budget: the answer and what it cost."""
        response = self._converse(self._request(concept, content_type, preferences, max_tokens))
        usage = Usage(
            input_tokens=int(response.get("usage", {}).get("inputTokens", 0)),
            output_tokens=int(response.get("usage", {}).get("outputTokens", 0)),
            throttled_attempts=self._throttles.take(),
        )
        return response, usage

    def _request(
        self,
        concept: Concept,
        content_type: ContentType,
        preferences: Preferences,
        max_tokens: int,
    ) -> dict[str, Any]:
        return converse_request(
            self._model_id,
            concept,
            content_type,
            preferences,
            output=self._output,
            max_tokens=max_tokens,
        )

    def _converse(self, request: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response: dict[str, Any] = self._client.converse(**request)
        except ClientError as exc:
            usage = Usage(throttled_attempts=self._throttles.take())
            raise _classified(exc, usage) from exc
        except BotoCoreError as exc:  # timeouts, connection errors after botocore's retries
            usage = Usage(throttled_attempts=self._throttles.take())
            raise TransientGenerationError(f"bedrock unreachable: {exc}", usage=usage) from exc
        return response
