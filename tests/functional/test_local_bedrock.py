"""The local Bedrock Runtime, through botocore's real bedrock-runtime client (no mocks)."""

from __future__ import annotations

import datetime
import enum
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from content_retry.content_types import ContentType
from content_retry.generated import CONTENT_MODELS
from content_retry_local.bedrock_server import LocalBedrock

MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
CONCEPT = "Vector databases"


@pytest.fixture
def bedrock() -> Iterator[LocalBedrock]:
    with LocalBedrock(seed=7) as server:
        yield server


def prompt(concept: str = CONCEPT, extra: str = "") -> str:
    context = {"concept": concept, "stage": "Foundations", "level": "beginner"}
    return f"Write the content for this concept.\nContext: {json.dumps(context)}\n{extra}"


def tool_request(content_type: ContentType, concept: str = CONCEPT) -> dict[str, Any]:
    """A Converse request forcing the content type's tool, its schema from the pydantic model."""
    schema = CONTENT_MODELS[content_type].model_json_schema()
    return {
        "modelId": MODEL_ID,
        "system": [{"text": "You write learning content for one concept of a roadmap."}],
        "messages": [{"role": "user", "content": [{"text": prompt(concept)}]}],
        "inferenceConfig": {"maxTokens": 4096, "temperature": 0.3},
        "toolConfig": {
            "tools": [
                {
                    "toolSpec": {
                        "name": content_type.value,
                        "description": f"Save the {content_type.value}.",
                        "inputSchema": {"json": schema},
                    }
                }
            ],
            "toolChoice": {"tool": {"name": content_type.value}},
        },
    }


def tool_input(response: dict[str, Any]) -> Any:
    [block] = response["output"]["message"]["content"]
    return block["toolUse"]["input"]


def test_tool_use_answers_validate_with_every_content_model_and_report_tokens(
    bedrock: LocalBedrock,
) -> None:
    # GIVEN a real bedrock-runtime client pointed at the local server
    client = bedrock.client()

    # WHEN each content type is asked for through its pydantic model's tool
    responses = {ct: client.converse(**tool_request(ct)) for ct in CONTENT_MODELS}

    # THEN every answer is a tool use whose input validates with that model
    for content_type, response in responses.items():
        assert response["stopReason"] == "tool_use"
        [block] = response["output"]["message"]["content"]
        assert block["toolUse"]["name"] == content_type.value
        assert block["toolUse"]["toolUseId"].startswith("tooluse_")
        CONTENT_MODELS[content_type].model_validate(block["toolUse"]["input"])
        # ... written about the concept named in the prompt, not lorem ipsum
        assert CONCEPT in json.dumps(block["toolUse"]["input"])
        usage = response["usage"]
        assert usage["inputTokens"] > 0
        assert usage["outputTokens"] > 0
        assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
        assert response["metrics"]["latencyMs"] >= 0
    # AND the tokens the client saw are the tokens the server counted
    stats = bedrock.stats()
    assert stats.input_tokens == sum(r["usage"]["inputTokens"] for r in responses.values())
    assert stats.output_tokens == sum(r["usage"]["outputTokens"] for r in responses.values())
    assert stats.total_tokens == sum(r["usage"]["totalTokens"] for r in responses.values())
    assert stats.tool_uses == {ct.value: 1 for ct in CONTENT_MODELS}
    assert (stats.requests, stats.answered, stats.malformed) == (3, 3, 0)


class Level(enum.StrEnum):
    BEGINNER = "beginner"
    EXPERT = "expert"


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=3, max_length=12)]
    minutes: Annotated[int, Field(gt=0, le=90, multiple_of=5)]
    weight: Annotated[float, Field(ge=0, lt=1)]


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    children: list[Node] = []


class Plan(BaseModel):
    """A schema using what pydantic v2 emits beyond the project's models."""

    model_config = ConfigDict(extra="forbid")
    level: Level
    mode: Literal["self-paced", "guided"]
    steps: Annotated[list[Step], Field(min_length=5, max_length=5)]
    optional_step: Step | None = None
    counts: dict[str, int]
    link: HttpUrl
    starts: datetime.datetime
    pair: tuple[int, str]
    either: int | str
    tree: Node


def test_any_pydantic_schema_gets_a_valid_instance(bedrock: LocalBedrock) -> None:
    # GIVEN a tool whose schema has enums, literals, nullable and recursive $refs,
    # bounded numbers, dicts, tuples and formats
    request = tool_request(ContentType.TUTORIAL)
    request["toolConfig"] = {
        "tools": [
            {"toolSpec": {"name": "plan", "inputSchema": {"json": Plan.model_json_schema()}}}
        ],
        "toolChoice": {"any": {}},
    }

    # WHEN it is asked for
    response = bedrock.client().converse(**request)

    # THEN the input validates
    plan = Plan.model_validate(tool_input(response))
    assert len(plan.steps) == 5
    assert bedrock.stats().tool_uses == {"plan": 1}


def test_the_same_seed_and_request_give_the_same_answer(bedrock: LocalBedrock) -> None:
    # GIVEN a request answered once
    client = bedrock.client()
    request = tool_request(ContentType.QUIZ)
    first = tool_input(client.converse(**request))

    # WHEN it is sent again, and another concept is asked for
    again = tool_input(client.converse(**request))
    other = tool_input(client.converse(**tool_request(ContentType.QUIZ, concept="Caching")))

    # THEN the same request gets the same answer; another gets its own
    assert again == first
    assert other != first
    assert "Caching" in json.dumps(other)


def test_concurrent_calls_sleep_their_latency_in_parallel(bedrock: LocalBedrock) -> None:
    # GIVEN a model taking half a second per answer
    bedrock.latency = 0.5
    client = bedrock.client()
    requests = [tool_request(ContentType.TUTORIAL, concept=f"Concept {i}") for i in range(8)]

    # WHEN 8 calls are made at once
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda request: client.converse(**request), requests))
    elapsed = time.monotonic() - started

    # THEN they overlap: far less than 8 x 0.5 s, and each took its latency
    assert elapsed < 2.5
    assert all(r["metrics"]["latencyMs"] >= 500 for r in responses)
    assert bedrock.stats().max_in_flight > 1


def throttled_client(server: LocalBedrock, retries: dict[str, Any]) -> Any:
    return boto3.client(
        "bedrock-runtime",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(retries=retries),
    )


def test_always_throttled_calls_are_retried_then_raise_throttling() -> None:
    # GIVEN two servers throttling every request; botocore's standard retry mode
    # with 3 attempts in all, and with Config's "max_attempts": 2 (as content_retry.aws)
    with LocalBedrock(throttle_rate=1.0) as total, LocalBedrock(throttle_rate=1.0) as legacy:
        clients = {
            total: throttled_client(total, {"mode": "standard", "total_max_attempts": 3}),
            legacy: throttled_client(legacy, {"mode": "standard", "max_attempts": 2}),
        }

        def call(server: LocalBedrock) -> dict[str, Any]:
            with pytest.raises(ClientError) as raised:
                clients[server].converse(**tool_request(ContentType.TUTORIAL))
            response: dict[str, Any] = raised.value.response
            return response

        # WHEN each makes a call (at once, so their backoffs overlap)
        with ThreadPoolExecutor(max_workers=2) as pool:
            errors = dict(zip(clients, pool.map(call, clients), strict=True))

        # THEN botocore read a 429 ThrottlingException, retried it, and gave up
        for error in errors.values():
            assert error["Error"]["Code"] == "ThrottlingException"
            assert error["Error"]["Message"]
            assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
        # ... after exactly 3 requests reached the server
        stats = total.stats()
        assert (stats.requests, stats.throttled, stats.retries, stats.answered) == (3, 3, 2, 0)
        assert errors[total]["ResponseMetadata"]["RetryAttempts"] == 2
        # ... and Config's "max_attempts" counts retries, not attempts: 2 means 3 requests
        assert legacy.stats().requests == 3
        assert errors[legacy]["ResponseMetadata"]["RetryAttempts"] == 2


def test_half_throttled_calls_succeed_after_retries(bedrock: LocalBedrock) -> None:
    # GIVEN a server that throttles half the requests, with a fixed seed
    bedrock.throttle_rate = 0.5
    bedrock.seed = 3
    client = bedrock.client(max_attempts=3, retry_mode="standard")
    requests = [tool_request(ContentType.RESOURCES, concept=f"Concept {i}") for i in range(8)]

    def call(request: dict[str, Any]) -> dict[str, Any]:
        try:
            response: dict[str, Any] = client.converse(**request)
        except ClientError as exc:
            return {"failed": True, **exc.response}
        return response

    # WHEN 8 calls are made (at once, so their backoffs overlap)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, requests))

    # THEN some succeeded only thanks to botocore's retries
    succeeded = [r for r in results if "failed" not in r]
    failed = [r for r in results if "failed" in r]
    assert all(r["Error"]["Code"] == "ThrottlingException" for r in failed)
    assert any(r["ResponseMetadata"]["RetryAttempts"] > 0 for r in succeeded)
    for response in succeeded:
        CONTENT_MODELS[ContentType.RESOURCES].model_validate(tool_input(response))
    # AND every attempt botocore made reached the server, each throttled or answered
    stats = bedrock.stats()
    attempts = sum(r["ResponseMetadata"]["RetryAttempts"] + 1 for r in results)
    assert stats.requests == attempts == stats.throttled + stats.answered
    assert stats.answered == len(succeeded)
    assert stats.retries == attempts - len(results)


def test_malformed_tool_input_fails_validation(bedrock: LocalBedrock) -> None:
    # GIVEN a server whose every answer is malformed
    bedrock.malformed_rate = 1.0
    client = bedrock.client()

    for content_type, model in CONTENT_MODELS.items():
        # WHEN the content type is asked for
        response = client.converse(**tool_request(content_type))

        # THEN the answer is a well-formed tool use whose input breaks the schema
        assert response["stopReason"] == "tool_use"
        with pytest.raises(ValidationError):
            model.model_validate(tool_input(response))
    assert bedrock.stats().malformed == len(CONTENT_MODELS)


def test_a_request_without_tools_gets_json_in_a_text_answer(bedrock: LocalBedrock) -> None:
    # GIVEN prompts without toolConfig: one giving a JSON Schema, one not
    client = bedrock.client()
    schema = json.dumps(CONTENT_MODELS[ContentType.QUIZ].model_json_schema())

    def ask(text: str) -> dict[str, Any]:
        response: dict[str, Any] = client.converse(
            modelId=MODEL_ID, messages=[{"role": "user", "content": [{"text": text}]}]
        )
        return response

    # WHEN they are sent
    with_schema = ask(prompt(extra=f"Answer with JSON valid against: {schema}"))
    plain = ask("Tell me about caching.")

    # THEN each gets one text block holding a JSON object, shaped by the schema when given
    for response in (with_schema, plain):
        assert response["stopReason"] == "end_turn"
        assert response["output"]["message"]["role"] == "assistant"
    text = with_schema["output"]["message"]["content"][0]["text"]
    CONTENT_MODELS[ContentType.QUIZ].model_validate_json(text)
    assert set(json.loads(plain["output"]["message"]["content"][0]["text"])) == {"answer"}
    assert bedrock.stats().text_answers == 2

    # AND a malformed text answer holds no JSON at all
    bedrock.malformed_rate = 1.0
    broken = ask(prompt(extra=f"Answer with JSON valid against: {schema}"))
    assert "{" not in broken["output"]["message"]["content"][0]["text"]


def test_unknown_operations_are_client_errors_and_the_server_stays_up(
    bedrock: LocalBedrock,
) -> None:
    client = bedrock.client(max_attempts=1)

    # WHEN an operation it does not serve is called, and an unknown path is requested
    with pytest.raises(ClientError) as raised:
        client.invoke_model(modelId=MODEL_ID, body=b"{}")
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(f"{bedrock.endpoint}/nothing/here", timeout=5)

    # THEN both are 404 UnknownOperationException
    assert raised.value.response["Error"]["Code"] == "UnknownOperationException"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert http_error.value.code == 404
    assert http_error.value.headers["x-amzn-ErrorType"] == "UnknownOperationException"
    # AND Converse still answers
    assert client.converse(**tool_request(ContentType.TUTORIAL))["stopReason"] == "tool_use"
    assert bedrock.stats().unknown_operations == 2


def test_invalid_requests_are_validation_exceptions(bedrock: LocalBedrock) -> None:
    # GIVEN a toolChoice naming a tool not offered, and a body that is not JSON
    client = bedrock.client(max_attempts=1)
    request = tool_request(ContentType.QUIZ)
    request["toolConfig"]["toolChoice"] = {"tool": {"name": "not_offered"}}
    not_json = urllib.request.Request(
        f"{bedrock.endpoint}/model/{MODEL_ID}/converse", data=b"{not json", method="POST"
    )

    # WHEN they are sent
    with pytest.raises(ClientError) as raised:
        client.converse(**request)
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(not_json, timeout=5)

    # THEN both are 400 ValidationException, not retried
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    assert "not_offered" in raised.value.response["Error"]["Message"]
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert http_error.value.code == 400
    assert http_error.value.headers["x-amzn-ErrorType"] == "ValidationException"
    assert bedrock.stats().rejected == 2


def test_the_endpoint_environment_variable_reaches_it_and_stop_ends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a client configured only by AWS_ENDPOINT_URL_BEDROCK_RUNTIME
    server = LocalBedrock().start()
    for name, value in server.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )

    # WHEN it calls Converse, then the server stops and it calls again on its pooled connection
    answered = client.converse(**tool_request(ContentType.TUTORIAL))
    stats = server.stats()
    server.stop()

    # THEN the first call reached the server, and the second cannot
    assert answered["stopReason"] == "tool_use"
    assert stats.answered == 1
    with pytest.raises(Exception, match=r"(?i)endpoint|connection"):
        client.converse(**tool_request(ContentType.TUTORIAL))
    # AND reset_stats zeroes what was counted
    server.reset_stats()
    assert server.stats().requests == 0
