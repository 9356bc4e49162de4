"""The generators: Bedrock's Converse API through botocore's Stubber, and the template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from unittest.mock import ANY

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from content_retry.aws import BEDROCK_MAX_ATTEMPTS, bedrock_runtime_client
from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generated import CONTENT_MODELS, QuizContent, ResourcesContent, TutorialContent
from content_retry.generators import (
    NO_USAGE,
    ConfigurationError,
    CutOffAnswerError,
    MalformedOutputError,
    PermanentGenerationError,
    ThrottledError,
    TransientGenerationError,
)
from content_retry.generators.bedrock import (
    CUT_OFF_RETRY_FACTOR,
    SYSTEM_PROMPT,
    BedrockGenerator,
    build_prompt,
    converse_request,
)
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences
from content_retry.settings import Settings
from tests.support import reset_process_caches

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
CONCEPT = Concept(
    concept_id="c11",
    name="Prompt compression",
    description="Shorter prompts that keep what the model needs.",
    stage="Optimising the model calls",
    module="Prompt efficiency",
)
PREFERENCES = Preferences(language="en", level="intermediate")


@pytest.fixture
def bedrock() -> Iterator[tuple[BedrockGenerator, Stubber]]:
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    with Stubber(client) as stubber:
        yield BedrockGenerator(client, MODEL), stubber
        stubber.assert_no_pending_responses()


USAGE = {"inputTokens": 120, "outputTokens": 340, "totalTokens": 460}


def converse_answer(text: str, stop_reason: str = "end_turn") -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": stop_reason,
        "usage": USAGE,
        "metrics": {"latencyMs": 900},
    }


def tool_answer(
    arguments: Any, name: str = "write_tutorial", stop_reason: str = "tool_use"
) -> dict[str, Any]:
    return {
        "output": {
            "message": {
                "role": "assistant",
                "content": [{"toolUse": {"toolUseId": "t1", "name": name, "input": arguments}}],
            }
        },
        "stopReason": stop_reason,
        "usage": USAGE,
        "metrics": {"latencyMs": 900},
    }


TUTORIAL = {
    "title": "Prompt compression",
    "summary": "Say less, keep the meaning.",
    "content_markdown": "# Prompt compression\n\nMeasure tokens first.",
}
TUTORIAL_JSON = json.dumps(TUTORIAL)


def test_the_request_offers_one_tool_with_the_contents_schema_and_makes_the_model_call_it(
    bedrock: tuple[BedrockGenerator, Stubber],
) -> None:
    generator, stubber = bedrock
    expected = {
        "modelId": MODEL,
        "system": [{"text": SYSTEM_PROMPT}],
        "messages": [
            {
                "role": "user",
                "content": [{"text": build_prompt(CONCEPT, ContentType.TUTORIAL, PREFERENCES)}],
            }
        ],
        "inferenceConfig": {"maxTokens": 4096, "temperature": 0.3},
        "toolConfig": {
            "tools": [
                {
                    "toolSpec": {
                        "name": "write_tutorial",
                        "description": "Save the tutorial written for the concept.",
                        "inputSchema": {"json": TutorialContent.model_json_schema()},
                    }
                }
            ],
            "toolChoice": {"tool": {"name": "write_tutorial"}},
        },
    }
    stubber.add_response("converse", tool_answer(TUTORIAL), expected)

    generation = generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)

    assert generation.content == TutorialContent.model_validate(TUTORIAL)
    assert (generation.usage.input_tokens, generation.usage.output_tokens) == (120, 340)
    prompt = build_prompt(CONCEPT, ContentType.TUTORIAL, PREFERENCES)
    assert "Prompt efficiency" in prompt and "intermediate" in prompt


def test_the_text_fallback_asks_for_json_of_the_schema_and_reads_it() -> None:
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    generator = BedrockGenerator(client, MODEL, output="text")
    with Stubber(client) as stubber:
        stubber.add_response("converse", converse_answer(f"```json\n{TUTORIAL_JSON}\n```"))
        generation = generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)
        request = converse_request(
            MODEL, CONCEPT, ContentType.TUTORIAL, PREFERENCES, output="text", max_tokens=4096
        )

    assert generation.content == TutorialContent.model_validate(TUTORIAL)
    assert "toolConfig" not in request
    prompt = request["messages"][0]["content"][0]["text"]
    assert json.dumps(TutorialContent.model_json_schema(), separators=(",", ":")) in prompt


@pytest.mark.parametrize(
    "answer",
    [
        {"title": "Prompt compression"},  # required fields missing
        {**TUTORIAL, "extra": "field"},  # not in the schema
        "not an object",
    ],
)
def test_a_tool_call_that_breaks_the_schema_is_malformed_and_still_paid_for(
    bedrock: tuple[BedrockGenerator, Stubber], answer: Any
) -> None:
    generator, stubber = bedrock
    stubber.add_response("converse", tool_answer(answer))

    with pytest.raises(MalformedOutputError) as raised:
        generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)

    assert (raised.value.usage.input_tokens, raised.value.usage.output_tokens) == (120, 340)


def test_an_answer_without_the_tool_call_is_malformed(
    bedrock: tuple[BedrockGenerator, Stubber],
) -> None:
    generator, stubber = bedrock
    stubber.add_response("converse", converse_answer("I would rather talk.", "end_turn"))

    with pytest.raises(MalformedOutputError):
        generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ThrottlingException", 429),
        ("ModelTimeoutException", 408),
        ("ServiceUnavailableException", 503),
        ("InternalServerException", 500),
    ],
)
def test_throttling_timeouts_and_5xx_are_transient(
    bedrock: tuple[BedrockGenerator, Stubber], code: str, status: int
) -> None:
    generator, stubber = bedrock
    stubber.add_client_error("converse", service_error_code=code, http_status_code=status)

    with pytest.raises(TransientGenerationError, match=code):
        generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES)


def test_throttling_is_told_apart_from_other_transient_errors(
    bedrock: tuple[BedrockGenerator, Stubber],
) -> None:
    generator, stubber = bedrock
    stubber.add_client_error(
        "converse", service_error_code="ThrottlingException", http_status_code=429
    )

    with pytest.raises(ThrottledError, match="ThrottlingException"):
        generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES)


@pytest.mark.parametrize(
    ("code", "status", "message"),
    [
        (
            "AccessDeniedException",
            403,
            "You don't have access to the model with the specified model ID.",
        ),
        ("ResourceNotFoundException", 404, "Model not found."),
        (
            "UnrecognizedClientException",
            403,
            "The security token included in the request is invalid.",
        ),
        (
            "ValidationException",
            400,
            "Invocation of model ID anthropic.claude-3-7 with on-demand throughput isn't supported. "
            "Retry your request with the ID or ARN of an inference profile that contains this model.",
        ),
        ("ValidationException", 400, "The provided model identifier is invalid."),
    ],
    ids=["access-denied", "model-not-found", "bad-credentials", "needs-profile", "bad-model-id"],
)
def test_a_refused_model_or_account_is_a_configuration_fault_not_the_items(
    bedrock: tuple[BedrockGenerator, Stubber], code: str, status: int, message: str
) -> None:
    generator, stubber = bedrock
    stubber.add_client_error(
        "converse", service_error_code=code, service_message=message, http_status_code=status
    )

    with pytest.raises(ConfigurationError, match=code):
        generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES)


def test_a_validation_error_about_the_request_itself_is_the_items_own(
    bedrock: tuple[BedrockGenerator, Stubber],
) -> None:
    generator, stubber = bedrock
    stubber.add_client_error(
        "converse",
        service_error_code="ValidationException",
        service_message="Input is too long for requested model.",
        http_status_code=400,
    )

    with pytest.raises(PermanentGenerationError) as raised:
        generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES)
    assert not isinstance(raised.value, ConfigurationError)


def test_an_answer_cut_at_max_tokens_is_tried_once_with_twice_the_budget(
    bedrock: tuple[BedrockGenerator, Stubber],
) -> None:
    generator, stubber = bedrock
    cut = converse_answer('{"title": "Prompt compression", "summary": "cut', "max_tokens")
    stubber.add_response("converse", cut, {**_ANY_REQUEST, "inferenceConfig": _budget(4096)})
    stubber.add_response(
        "converse", tool_answer(TUTORIAL), {**_ANY_REQUEST, "inferenceConfig": _budget(8192)}
    )

    generation = generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)

    assert generation.content.model_dump()["title"] == "Prompt compression"
    # both calls were paid, and both are counted
    assert generation.usage.output_tokens == 2 * USAGE["outputTokens"]


def test_an_answer_cut_at_both_budgets_fails_the_item_with_that_reason_never_the_same_price(
    bedrock: tuple[BedrockGenerator, Stubber],
) -> None:
    generator, stubber = bedrock
    cut = converse_answer('{"title": "Prompt compression", "summary": "cut', "max_tokens")
    stubber.add_response("converse", cut)
    stubber.add_response("converse", cut)

    with pytest.raises(CutOffAnswerError, match="cut at maxTokens twice") as raised:
        generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)
    assert raised.value.usage.input_tokens == 2 * USAGE["inputTokens"]


def test_the_content_models_fit_what_the_largest_output_budget_can_write() -> None:
    # An answer of the retry's budget holds at most this many characters of
    # text (a token is rarely more than 4.5 characters of English prose; JSON
    # quoting only adds tokens): a model allowing more could only be met by a
    # cut answer, paid and failed.
    largest_budget = Settings().bedrock_max_tokens * CUT_OFF_RETRY_FACTOR
    chars_at_most = int(largest_budget * 4.5)
    schema = TutorialContent.model_json_schema()
    assert schema["properties"]["content_markdown"]["maxLength"] <= chars_at_most
    for name, model in CONTENT_MODELS.items():
        assert longest_text(model.model_json_schema()) <= chars_at_most, name


def test_a_call_reserves_its_input_and_its_output_budget(
    bedrock: tuple[BedrockGenerator, Stubber],
) -> None:
    generator, _ = bedrock

    reserved = generator.reservation(CONCEPT, ContentType.TUTORIAL, PREFERENCES)

    request = converse_request(
        MODEL, CONCEPT, ContentType.TUTORIAL, PREFERENCES, output="tool_use", max_tokens=4096
    )
    assert 4096 + len(json.dumps(request)) // 4 < reserved < 4096 + len(json.dumps(request))


@pytest.mark.parametrize("stop_reason", ["content_filtered", "guardrail_intervened"])
def test_filtered_content_is_permanent(
    bedrock: tuple[BedrockGenerator, Stubber], stop_reason: str
) -> None:
    generator, stubber = bedrock
    stubber.add_response("converse", converse_answer("", stop_reason))

    with pytest.raises(PermanentGenerationError, match=stop_reason):
        generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)


@pytest.mark.parametrize(
    ("answer", "stop_reason"),
    [
        ("Sure! Here is your tutorial about prompt compression.", "end_turn"),
        ('{"title": "Prompt compression", "summary": "cut', "end_turn"),
        (
            '{"questions": [{"question": "Q?", "options": ["a", "b"], "answer_index": 5, "explanation": "e"}]}',
            "end_turn",
        ),
    ],
)
def test_malformed_text_output_is_told_apart(answer: str, stop_reason: str) -> None:
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    generator = BedrockGenerator(client, MODEL, output="text")
    with Stubber(client) as stubber:
        stubber.add_response("converse", converse_answer(answer, stop_reason))
        with pytest.raises(MalformedOutputError):
            generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES)


_ANY_REQUEST = {
    "modelId": ANY,
    "system": ANY,
    "messages": ANY,
    "toolConfig": ANY,
}


def _budget(max_tokens: int) -> dict[str, Any]:
    return {"maxTokens": max_tokens, "temperature": ANY}


def longest_text(schema: dict[str, Any]) -> int:
    """The most characters the schema's strings allow, summed over one instance."""
    definitions = schema.get("$defs", {})

    def size(node: dict[str, Any]) -> int:
        if "$ref" in node:
            return size(definitions[node["$ref"].split("/")[-1]])
        if node.get("type") == "string":
            return int(node.get("maxLength", 10**9))
        if node.get("type") == "array":
            return int(node.get("maxItems", 10**9)) * size(node["items"])
        if node.get("type") == "object":
            return sum(size(child) for child in node.get("properties", {}).values())
        if "anyOf" in node:
            return max(size(child) for child in node["anyOf"])
        return 20  # a number or a boolean

    return size(schema)


def test_template_content_is_valid_readable_and_deterministic() -> None:
    generator = TemplateGenerator()

    tutorial = generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES).content
    resources = generator.generate(CONCEPT, ContentType.RESOURCES, PREFERENCES).content
    quiz = generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES).content

    assert isinstance(tutorial, TutorialContent)
    assert "# Prompt compression" in tutorial.content_markdown
    assert CONCEPT.description is not None
    assert CONCEPT.description in tutorial.content_markdown
    assert isinstance(resources, ResourcesContent)
    assert all("Prompt+compression" in str(r.url) for r in resources.resources)
    assert isinstance(quiz, QuizContent)
    for question in quiz.questions:
        assert len(question.options) == 4
        assert len(set(question.options)) == 4
    assert quiz.questions[0].options[quiz.questions[0].answer_index] == CONCEPT.description
    assert generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES).content == quiz
    assert generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES).usage == NO_USAGE


def test_the_deployed_bedrock_client_retries_adaptively_in_two_attempts_pooled_for_the_parallelism(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN the function configured for 24 calls at once
    monkeypatch.setenv("GENERATE_PARALLELISM", "24")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    reset_process_caches()
    try:
        # WHEN its Bedrock client is made
        config = bedrock_runtime_client().meta.config
    finally:
        reset_process_caches()

    # THEN throttling slows every call of the client, a call is two attempts in all
    # (what LLM_CALL_BUDGET_SECONDS covers), and each concurrent call has a connection
    assert config.retries == {"mode": "adaptive", "total_max_attempts": BEDROCK_MAX_ATTEMPTS}
    assert BEDROCK_MAX_ATTEMPTS == 2
    assert config.max_pool_connections == 24


@pytest.mark.parametrize(
    "text", ["before\x00after", "lone \ud800 surrogate", "trailing \udfff"], ids=repr
)
def test_content_postgresql_cannot_store_is_malformed_output(
    bedrock: tuple[BedrockGenerator, Stubber], text: str
) -> None:
    # GIVEN a model answering with a character no PostgreSQL text or jsonb can hold
    generator, stubber = bedrock
    stubber.add_response("converse", tool_answer({**TUTORIAL, "content_markdown": text}))

    # WHEN / THEN it is malformed output (retried a bounded number of times), never saved
    with pytest.raises(MalformedOutputError, match="content_markdown") as raised:
        generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)
    assert "cannot store" in str(raised.value) or "unicode string" in str(raised.value)
