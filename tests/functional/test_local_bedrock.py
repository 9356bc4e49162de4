"""The local Bedrock Runtime, through botocore's real bedrock-runtime client (no mocks)."""

from __future__ import annotations

import datetime
import enum
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from content_retry.content_types import ContentType
from content_retry.generated import CONTENT_MODELS
from content_retry_local.bedrock_server import (
    DEFAULT_MAX_TOKENS,
    LocalBedrock,
    quota_limited_seconds,
)
from tests.conftest import REPO_ROOT

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


# --------------------------------------------------------------------------- the account's quota

OTHER_MODEL_ID = "amazon.nova-lite-v1:0"


def short_request(max_tokens: int | None, model_id: str = MODEL_ID) -> dict[str, Any]:
    """A text request of one input token; without ``max_tokens``, no inferenceConfig at all."""
    request: dict[str, Any] = {
        "modelId": model_id,
        "messages": [{"role": "user", "content": [{"text": "hi"}]}],
    }
    if max_tokens is not None:
        request["inferenceConfig"] = {"maxTokens": max_tokens}
    return request


def attempt(client: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The response, or the error's response (its "Error" says which)."""
    try:
        response: dict[str, Any] = client.converse(**request)
    except ClientError as exc:
        error: dict[str, Any] = exc.response
        return error
    return response


def throttled(result: dict[str, Any]) -> bool:
    if "Error" not in result:
        return False
    assert result["Error"]["Code"] == "ThrottlingException"
    assert result["ResponseMetadata"]["HTTPStatusCode"] == 429
    return True


def reservation(client: Any, max_tokens: int) -> int:
    """What a short_request(max_tokens) reserves: its input tokens, as the server counts them, plus max_tokens."""
    response = client.converse(**short_request(max_tokens))
    return int(response["usage"]["inputTokens"]) + max_tokens


def test_calls_within_the_quota_pass_and_each_reserves_its_input_plus_max_tokens() -> None:
    # GIVEN a quota roomy enough for the calls below
    with LocalBedrock(tokens_per_minute=20_000, requests_per_minute=10) as bedrock:
        client = bedrock.client(max_attempts=1)

        # WHEN a tool-use call, a call with a small maxTokens and one giving none are made
        tool = client.converse(**tool_request(ContentType.TUTORIAL))
        small = client.converse(**short_request(300))
        default = client.converse(**short_request(None))

        # THEN all are answered, nothing throttled
        stats = bedrock.stats()
        assert (stats.answered, stats.throttled, stats.quota_throttled) == (3, 0, 0)
        # AND each reserved its input tokens plus its maxTokens (4096 when none is given)
        assert DEFAULT_MAX_TOKENS == 4096
        assert stats.reserved_tokens == sum(
            response["usage"]["inputTokens"] + max_tokens
            for response, max_tokens in ((tool, 4096), (small, 300), (default, DEFAULT_MAX_TOKENS))
        )
        # ... and gave back what its answer did not use
        assert stats.released_tokens == sum(
            max_tokens - response["usage"]["outputTokens"]
            for response, max_tokens in ((tool, 4096), (small, 300), (default, DEFAULT_MAX_TOKENS))
        )
        assert stats.reserved_tokens - stats.released_tokens == stats.total_tokens


def test_a_burst_beyond_the_tokens_per_minute_is_throttled_at_once() -> None:
    with LocalBedrock() as bedrock:
        # GIVEN a quota of exactly 5 calls of maxTokens 1 (each uses all it reserves:
        # nothing is given back), refilling one call's worth in 12 s
        client = bedrock.client(max_attempts=1)
        per_call = reservation(client, max_tokens=1)
        bedrock.set_quota(tokens_per_minute=5 * per_call)
        bedrock.reset_stats()

        # WHEN 8 calls are made in a row, each attempted once
        results = [attempt(client, short_request(1)) for _ in range(8)]

        # THEN the first 5 pass and the rest are refused with 429 ThrottlingException
        assert [throttled(result) for result in results] == [False] * 5 + [True] * 3
        assert (
            results[-1]["Error"]["Message"] == "Too many tokens, please wait before trying again."
        )
        stats = bedrock.stats()
        assert (stats.requests, stats.answered, stats.throttled) == (8, 5, 3)
        assert (stats.quota_throttled, stats.quota_throttled_requests) == (3, 0)
        assert stats.reserved_tokens == 5 * per_call
        # AND botocore retries a quota throttle like any other (3 attempts, all refused)
        retrying = bedrock.client(max_attempts=3, retry_mode="standard")
        assert throttled(attempt(retrying, short_request(1)))
        assert bedrock.stats().quota_throttled == 3 + 3


def test_the_reservation_counts_max_tokens_not_the_answer() -> None:
    # GIVEN a quota of 1000 tokens a minute, and answers of a few tokens
    with LocalBedrock(tokens_per_minute=1000) as bedrock:
        client = bedrock.client(max_attempts=1)

        # WHEN short calls ask for room for 2000 output tokens, for the default, and for 900
        too_much = attempt(client, short_request(2000))
        unspecified = attempt(client, short_request(None))
        fits = attempt(client, short_request(900))

        # THEN the first two cannot fit, however short their answers would be; the last passes
        assert throttled(too_much)
        assert throttled(unspecified)
        assert not throttled(fits)
        assert fits["usage"]["outputTokens"] < 100
        stats = bedrock.stats()
        assert (stats.quota_throttled, stats.answered) == (2, 1)
        # ... and only the call let through reserved anything
        assert stats.reserved_tokens == fits["usage"]["inputTokens"] + 900


def test_the_unused_reservation_is_given_back_when_the_answer_is_done() -> None:
    with LocalBedrock() as bedrock:
        # GIVEN a quota that holds two reservations of maxTokens 500 at a time
        client = bedrock.client(max_attempts=1)
        per_call = reservation(client, max_tokens=500)
        bedrock.set_quota(tokens_per_minute=2 * per_call)
        bedrock.reset_stats()

        # WHEN 10 calls are made one after another
        results = [attempt(client, short_request(500)) for _ in range(10)]

        # THEN all pass: each gave back the 500 - output tokens its answer did not use,
        # so the next one found room (without that, the third would be refused)
        assert not any(throttled(result) for result in results)
        stats = bedrock.stats()
        assert stats.quota_throttled == 0
        assert stats.reserved_tokens == 10 * per_call
        assert stats.released_tokens == sum(500 - r["usage"]["outputTokens"] for r in results)


def test_reservations_hold_while_their_calls_are_in_flight() -> None:
    with LocalBedrock(seed=7) as bedrock:
        # GIVEN a quota holding two reservations of maxTokens 500, and calls taking 2 s
        client = bedrock.client(max_attempts=1)
        per_call = reservation(client, max_tokens=500)
        bedrock.set_quota(tokens_per_minute=2 * per_call + per_call // 2)
        bedrock.reset_stats()
        bedrock.latency = 2.0

        # WHEN 4 calls are made at once
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda _: attempt(client, short_request(500)), range(4)))

        # THEN two pass and the two that came while they held their reservations are refused
        assert sorted(throttled(result) for result in results) == [False, False, True, True]
        # AND once they are done, their unused reservations are back: the next call passes
        bedrock.latency = 0.0
        assert not throttled(attempt(client, short_request(500)))
        assert bedrock.stats().quota_throttled == 2


def test_the_quota_is_per_model_and_shared_by_every_client() -> None:
    with LocalBedrock() as bedrock:
        # GIVEN a quota of 3 calls, and two clients (as two worker processes would have)
        first, second = bedrock.client(max_attempts=1), bedrock.client(max_attempts=1)
        per_call = reservation(first, max_tokens=1)
        bedrock.set_quota(tokens_per_minute=3 * per_call)
        bedrock.reset_stats()

        # WHEN they share the model's quota, then call another model
        results = [attempt(client, short_request(1)) for client in (first, second, first, second)]
        other = attempt(second, short_request(1, model_id=OTHER_MODEL_ID))

        # THEN together they get 3 calls; the other model has a quota of its own
        assert [throttled(result) for result in results] == [False, False, False, True]
        assert not throttled(other)
        assert bedrock.stats().quota_throttled == 1


def test_the_bucket_refills_with_time() -> None:
    with LocalBedrock() as bedrock:
        # GIVEN a quota of 30 calls of maxTokens 1, refilling one call's worth every 2 s
        client = bedrock.client(max_attempts=1)
        per_call = reservation(client, max_tokens=1)
        bedrock.set_quota(tokens_per_minute=30 * per_call)

        # WHEN calls are made until one is refused
        passed = 0
        while passed < 60 and not throttled(attempt(client, short_request(1))):
            passed += 1

        # THEN the quota, and about no more, passed (the refill adds one every 2 s)
        assert 30 <= passed < 60
        # AND a call made 2.5 s after the refusal passes: nothing was given back (each
        # call used all it reserved), so the room is the refill's alone
        time.sleep(2.5)
        assert not throttled(attempt(client, short_request(1)))
        stats = bedrock.stats()
        assert stats.released_tokens == 0
        assert stats.quota_throttled == 1


def test_requests_per_minute_is_enforced_on_its_own() -> None:
    # GIVEN 2 requests a minute and plenty of tokens
    with LocalBedrock(tokens_per_minute=1_000_000, requests_per_minute=2) as bedrock:
        client = bedrock.client(max_attempts=1)

        # WHEN 3 small calls are made
        results = [attempt(client, short_request(10)) for _ in range(3)]

        # THEN the third is refused for its request count, and reserved no tokens
        assert [throttled(result) for result in results] == [False, False, True]
        assert (
            results[2]["Error"]["Message"] == "Too many requests, please wait before trying again."
        )
        stats = bedrock.stats()
        assert (stats.quota_throttled, stats.quota_throttled_requests) == (1, 1)
        assert stats.reserved_tokens == sum(r["usage"]["inputTokens"] + 10 for r in results[:2])

    # AND with a requests-per-minute quota only, a call's tokens are not limited
    with LocalBedrock(requests_per_minute=1) as bedrock:
        client = bedrock.client(max_attempts=1)
        assert not throttled(attempt(client, short_request(64_000)))
        assert throttled(attempt(client, short_request(1)))
        assert bedrock.stats().quota_throttled_requests == 1


def test_the_random_throttle_stays_independent_of_the_quota() -> None:
    # GIVEN a server throttling every request at random, with a tight quota
    with LocalBedrock(throttle_rate=1.0, tokens_per_minute=10) as bedrock:
        client = bedrock.client(max_attempts=1)

        # WHEN calls are made
        results = [attempt(client, short_request(1)) for _ in range(3)]

        # THEN the random draw refused them before they reserved anything
        assert all(throttled(result) for result in results)
        stats = bedrock.stats()
        assert (stats.throttled, stats.quota_throttled, stats.reserved_tokens) == (3, 0, 0)


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "1000"])
def test_invalid_quota_parameters_are_refused_with_a_clear_error(value: Any) -> None:
    for name in ("tokens_per_minute", "requests_per_minute"):
        with pytest.raises(ValueError, match=rf"^{name} must be .*above 0"):
            LocalBedrock(**{name: value})
        with pytest.raises(ValueError, match=rf"^{name} must be"), LocalBedrock() as bedrock:
            bedrock.set_quota(**{name: value})


def test_quota_limited_seconds_is_the_slower_of_the_two_quotas() -> None:
    # 6000 tokens at 3000 a minute: 2 minutes; 10 requests at 60 a minute: 10 s
    assert quota_limited_seconds(6000, 10, tokens_per_minute=3000, requests_per_minute=60) == 120
    assert quota_limited_seconds(600, 30, tokens_per_minute=3000, requests_per_minute=60) == 30
    # a limit of None counts for nothing; full buckets let a minute's worth go at once
    assert quota_limited_seconds(6000, 10, tokens_per_minute=None, requests_per_minute=None) == 0
    assert (
        quota_limited_seconds(6000, 10, tokens_per_minute=3000, requests_per_minute=60, burst=True)
        == 60
    )
    with LocalBedrock(tokens_per_minute=3000) as bedrock:
        assert bedrock.quota_limited_seconds(6000, 10) == 120
        assert bedrock.quota_limited_seconds(1000, 10, burst=True) == 0
    with pytest.raises(ValueError, match="above 0"):
        quota_limited_seconds(1, 1, tokens_per_minute=0, requests_per_minute=None)


def test_a_server_is_found_by_its_endpoint_while_it_runs() -> None:
    server = LocalBedrock().start()
    endpoint = server.endpoint
    assert LocalBedrock.serving(endpoint) is server
    assert LocalBedrock.serving(endpoint + "/") is server
    server.stop()
    assert LocalBedrock.serving(endpoint) is None


def test_the_command_line_server_enforces_a_quota() -> None:
    # GIVEN the server as a process of its own (as benchmarks run it), 1 request a minute
    process = subprocess.Popen(
        [sys.executable, "-m", "content_retry_local.bedrock_server", "--requests-per-minute", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("AWS_ENDPOINT_URL_BEDROCK_RUNTIME=http://127.0.0.1:"), line
        client = boto3.client(
            "bedrock-runtime",
            endpoint_url=line.split("=", 1)[1],
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
            config=Config(retries={"total_max_attempts": 1}),
        )

        # WHEN two calls are made, THEN the second is throttled
        assert not throttled(attempt(client, short_request(1)))
        assert throttled(attempt(client, short_request(1)))
    finally:
        process.terminate()
        process.wait(timeout=10)

    # AND a limit that is no quota is refused before it starts
    refused = subprocess.run(
        [sys.executable, "-m", "content_retry_local.bedrock_server", "--tokens-per-minute", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "tokens_per_minute must be above 0" in refused.stderr


def run_demo(*arguments: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """``content-retry demo ARGUMENTS`` in a new process, on what it starts itself."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "DATABASE_URL", "RETRY_", "DB_", "LLM_QUOTA_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "content_retry_local.cli", "demo", *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("value", ["lots", "0", "100000,0", "1,2,3", "100000,x", "-5"])
def test_the_demo_refuses_a_quota_it_cannot_read(value: str) -> None:
    run = run_demo(f"--llm-quota={value}")

    assert run.returncode == 2
    assert f"{value!r} is not a quota: give TPM or TPM,RPM" in run.stderr


def test_the_demo_refuses_a_quota_no_call_fits() -> None:
    run = run_demo("--llm-quota", "3000")

    assert run.returncode == 2
    assert "3000 tokens a minute cannot hold a single call" in run.stderr
    assert "as TPM or TPM,RPM" in run.stderr


def test_the_demo_runs_against_a_local_bedrock_enforcing_a_quota(tmp_path: Path) -> None:
    # WHEN the demo runs with a quota holding 4 of its calls' reservations at a time
    # (its batches make 5 at once)
    run = run_demo("--llm-quota", "20000", "--llm-latency", "0.05", cwd=tmp_path)

    # THEN it generates through the local Bedrock, says what the quota did, and its
    # drain went on until the retry queue was empty (the end state is the worker's:
    # whether every throttled record was saved in time is not this test's question)
    output = run.stdout + run.stderr
    assert run.returncode in (0, 1), output
    assert "LLM: local Bedrock (0.05 s a call)" in run.stdout, output
    assert "LLM quota: 20000 tokens a minute per model" in run.stdout, output
    summary = re.search(
        r"LLM quota \(20000 tokens a minute\): (\d+) of (\d+) Converse requests throttled by it\n"
        r"     (\d+) tokens reserved, (\d+) given back; its (\d+) answers",
        run.stdout,
    )
    assert summary is not None, output
    throttled_calls, requests, reserved, released, answered = map(int, summary.groups())
    assert requests == answered + throttled_calls
    assert answered >= 26 and reserved > released > 0
    assert "retry queue depth: 0" in run.stdout, output
