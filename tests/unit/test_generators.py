"""The generators: Bedrock's Converse API through botocore's Stubber, and the template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generated import QuizContent, ResourcesContent, TutorialContent
from content_retry.generators import (
    MalformedOutputError,
    PermanentGenerationError,
    TransientGenerationError,
)
from content_retry.generators.bedrock import SYSTEM_PROMPT, BedrockGenerator, build_prompt
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences

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
        config=Config(retries={"mode": "standard", "max_attempts": 1}),
    )
    with Stubber(client) as stubber:
        yield BedrockGenerator(client, MODEL), stubber
        stubber.assert_no_pending_responses()


def converse_answer(text: str, stop_reason: str = "end_turn") -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": stop_reason,
        "usage": {"inputTokens": 120, "outputTokens": 340, "totalTokens": 460},
        "metrics": {"latencyMs": 900},
    }


TUTORIAL_JSON = json.dumps(
    {
        "title": "Prompt compression",
        "summary": "Say less, keep the meaning.",
        "content_markdown": "# Prompt compression\n\nMeasure tokens first.",
    }
)


def test_converse_request_carries_the_concept_and_the_json_shape(
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
    }
    stubber.add_response("converse", converse_answer(f"```json\n{TUTORIAL_JSON}\n```"), expected)

    content = generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)

    assert content == TutorialContent.model_validate_json(TUTORIAL_JSON)
    prompt = build_prompt(CONCEPT, ContentType.TUTORIAL, PREFERENCES)
    assert (
        "Prompt efficiency" in prompt and "intermediate" in prompt and "content_markdown" in prompt
    )


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


@pytest.mark.parametrize(
    ("code", "status"), [("ValidationException", 400), ("AccessDeniedException", 403)]
)
def test_validation_and_access_errors_are_permanent(
    bedrock: tuple[BedrockGenerator, Stubber], code: str, status: int
) -> None:
    generator, stubber = bedrock
    stubber.add_client_error("converse", service_error_code=code, http_status_code=status)

    with pytest.raises(PermanentGenerationError, match=code):
        generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES)


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
        ('{"title": "Prompt compression", "summary": "cut', "max_tokens"),
        (
            '{"questions": [{"question": "Q?", "options": ["a", "b"], "answer_index": 5, "explanation": "e"}]}',
            "end_turn",
        ),
    ],
)
def test_malformed_output_is_told_apart(
    bedrock: tuple[BedrockGenerator, Stubber], answer: str, stop_reason: str
) -> None:
    generator, stubber = bedrock
    stubber.add_response("converse", converse_answer(answer, stop_reason))

    with pytest.raises(MalformedOutputError):
        generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES)


def test_template_content_is_valid_readable_and_deterministic() -> None:
    generator = TemplateGenerator()

    tutorial = generator.generate(CONCEPT, ContentType.TUTORIAL, PREFERENCES)
    resources = generator.generate(CONCEPT, ContentType.RESOURCES, PREFERENCES)
    quiz = generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES)

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
    assert generator.generate(CONCEPT, ContentType.QUIZ, PREFERENCES) == quiz
