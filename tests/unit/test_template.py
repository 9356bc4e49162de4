"""template.yaml held against the code: what the functions need, it provides."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import boto3
import pytest
from moto import mock_aws

from content_retry.settings import Settings
from content_retry_local.template import create_queues, load_template, queue_attributes, resource
from tests.conftest import REPO_ROOT

FUNCTIONS = ("DetectFunction", "GenerateFunction")


def function_environment(logical_id: str) -> dict[str, str]:
    """The function's environment as deployed, intrinsic values replaced by placeholders."""
    template = load_template()
    variables: dict[str, Any] = {
        **template["Globals"]["Function"]["Environment"]["Variables"],
        **resource(logical_id)["Properties"].get("Environment", {}).get("Variables", {}),
    }
    return {
        name: value if isinstance(value, str) else f"resolved-{name.lower()}"
        for name, value in variables.items()
    }


def function_timeout(logical_id: str) -> int:
    properties = resource(logical_id)["Properties"]
    return int(properties.get("Timeout", load_template()["Globals"]["Function"].get("Timeout", 3)))


@pytest.mark.parametrize("logical_id", FUNCTIONS)
def test_every_variable_the_settings_need_is_set(logical_id: str) -> None:
    environment = function_environment(logical_id)

    settings = Settings.from_environ(environment)

    assert settings.db_auth == "iam"
    for required in ("db_host", "db_name", "db_user", "retry_queue_url", "retry_dlq_url"):
        settings.require(required)
    if settings.content_generator == "bedrock":
        settings.require("bedrock_model_id")


@pytest.mark.parametrize("logical_id", FUNCTIONS)
def test_no_variable_is_unknown_to_the_settings(logical_id: str) -> None:
    known = {field.alias for field in Settings.model_fields.values()}

    unknown = {
        name
        for name in function_environment(logical_id)
        if name not in known and not name.startswith("POWERTOOLS_")
    }

    assert unknown == set(), "a typo, or a setting the code no longer reads"


def test_the_llm_budget_covers_a_whole_bedrock_call_and_its_save_and_fits_the_timeout() -> None:
    from content_retry.aws import BEDROCK_WORST_CASE_SECONDS, SAVE_RESERVE_SECONDS

    budget = Settings.from_environ(function_environment("GenerateFunction")).llm_call_budget_seconds
    needed = BEDROCK_WORST_CASE_SECONDS + SAVE_RESERVE_SECONDS

    assert budget >= needed
    assert Settings.model_fields["llm_call_budget_seconds"].default >= needed
    assert function_timeout("GenerateFunction") > budget


def test_retry_queue_visibility_is_at_least_six_times_the_generate_timeout() -> None:
    visibility = int(resource("RetryQueue")["Properties"]["VisibilityTimeout"])

    assert visibility >= 6 * function_timeout("GenerateFunction")


def test_the_sqs_event_reports_batch_item_failures_within_the_concurrency_budget() -> None:
    event = resource("GenerateFunction")["Properties"]["Events"]["RetryMessages"]["Properties"]

    assert event["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert event["ScalingConfig"]["MaximumConcurrency"].value == "GenerateMaxConcurrency"
    assert event["BatchSize"] <= 10


def test_dead_letter_queue_keeps_messages_longer_than_the_source() -> None:
    queue = resource("RetryQueue")["Properties"]
    dlq = resource("RetryDLQ")["Properties"]

    assert queue["RedrivePolicy"]["maxReceiveCount"] == 5
    assert int(dlq["MessageRetentionPeriod"]) > int(queue["MessageRetentionPeriod"])
    assert int(queue["MaximumMessageSize"]) == 1024 * 1024


@pytest.mark.parametrize("logical_id", FUNCTIONS)
def test_each_handler_resolves_to_a_function_that_imports(logical_id: str) -> None:
    properties = resource(logical_id)["Properties"]
    module_name, function_name = properties["Handler"].rsplit(".", 1)
    path = REPO_ROOT / properties["CodeUri"] / f"{module_name}.py"
    spec = importlib.util.spec_from_file_location(f"handler_{logical_id}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)

    spec.loader.exec_module(module)

    assert callable(getattr(module, function_name))


def test_runtime_architecture_and_layer_build() -> None:
    template = load_template()
    globals_ = template["Globals"]["Function"]
    layer = resource("CommonLayer")

    assert (globals_["Runtime"], globals_["Architectures"], globals_["Tracing"]) == (
        "python3.12",
        ["arm64"],
        "Active",
    )
    # The layer is built by its own Makefile (the recipe `make layer` runs), for the
    # functions' architecture by default.
    assert layer["Metadata"]["BuildMethod"] == "makefile"
    assert layer["Metadata"]["BuildArchitecture"] == "arm64"
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
    makefile = (REPO_ROOT / layer["Properties"]["ContentUri"] / "Makefile").read_text()
    assert "build-CommonLayer:" in makefile
    assert "\nARCH ?= aarch64\n" in makefile
    # SnapStart is the deployer's choice; events always invoke the published alias
    assert globals_["SnapStart"]["ApplyOn"].value == "SnapStart"
    assert globals_["AutoPublishAlias"] == "live"
    assert (
        REPO_ROOT / layer["Properties"]["ContentUri"] / "content_retry" / "__init__.py"
    ).exists()


def test_local_queues_take_their_attributes_from_the_template() -> None:
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        queue_url, dlq_url = create_queues(sqs, prefix="template-test")
        queue = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
        dlq = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["All"])["Attributes"]

    declared = resource("RetryQueue")["Properties"]
    for name in ("VisibilityTimeout", "MessageRetentionPeriod", "MaximumMessageSize"):
        assert queue[name] == str(declared[name])
    assert json.loads(queue["RedrivePolicy"]) == {
        "deadLetterTargetArn": dlq["QueueArn"],
        "maxReceiveCount": declared["RedrivePolicy"]["maxReceiveCount"],
    }
    assert dlq["MessageRetentionPeriod"] == str(
        resource("RetryDLQ")["Properties"]["MessageRetentionPeriod"]
    )
    # moto keeps RedriveAllowPolicy but does not return it; check what is sent instead
    allow = queue_attributes("RetryDLQ", source_arn=queue["QueueArn"])["RedriveAllowPolicy"]
    assert json.loads(allow) == {
        "redrivePermission": "byQueue",
        "sourceQueueArns": [queue["QueueArn"]],
    }


def test_least_privilege_statements_are_scoped() -> None:
    generate = resource("GenerateFunction")["Properties"]["Policies"]
    statements = [s for policy in generate if "Statement" in policy for s in policy["Statement"]]
    bedrock = next(s for s in statements if s["Action"] == "bedrock:InvokeModel")
    connect = next(s for s in statements if s["Action"] == "rds-db:connect")

    assert "${BedrockModelId}" in bedrock["Resource"].value
    assert "${DatabaseUser}" in connect["Resource"].value[0]
    assert {"SQSSendMessagePolicy"} <= {key for policy in generate for key in policy}


def test_the_worker_knows_the_retry_queues_max_receive_count() -> None:
    # generate dead-letters a record on its last delivery itself: it must know which that is
    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    redrive = resource("RetryQueue")["Properties"]["RedrivePolicy"]

    assert int(variables["RETRY_MAX_RECEIVE_COUNT"]) == int(redrive["maxReceiveCount"])


def test_a_sent_claim_lasts_as_long_as_the_queue_keeps_its_message() -> None:
    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    retention = int(resource("RetryQueue")["Properties"]["MessageRetentionPeriod"])

    assert int(variables["RETRY_QUEUE_RETENTION_MINUTES"]) * 60 == retention
