"""template.yaml held against the code: what the functions need, it provides."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from moto import mock_aws

from content_retry.settings import Settings
from content_retry_local.template import create_queues, load_template, queue_attributes, resource
from tests.conftest import REPO_ROOT

FUNCTIONS = ("DetectFunction", "GenerateFunction")

# What CloudFormation gives the pseudo parameters, for the resolver below.
PSEUDO_PARAMETERS = {
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::Region": "eu-west-1",
    "AWS::StackName": "content-retry-test",
    "AWS::URLSuffix": "amazonaws.com",
}


class Unresolvable(Exception):
    """A value only a deployment knows (a resource's reference or attribute)."""


class _NoValue:
    """``AWS::NoValue``: the property or list item is left out."""


NO_VALUE = _NoValue()


class Resolver:
    """The template's intrinsic functions and conditions evaluated as CloudFormation
    would for the given parameters (their defaults otherwise): Ref, Sub, If,
    Equals, Not, And, Or, Condition, Select, Split and Join, the branch an If does
    not take left unevaluated. A resource's Ref or GetAtt is :class:`Unresolvable`."""

    def __init__(self, **parameters: str) -> None:
        template = load_template()
        unknown = set(parameters) - set(template["Parameters"])
        assert not unknown, f"not parameters of the template: {unknown}"
        self.values: dict[str, Any] = {
            name: parameter["Default"]
            for name, parameter in template["Parameters"].items()
            if "Default" in parameter
        }
        self.values.update(parameters, **PSEUDO_PARAMETERS)
        self.conditions: dict[str, Any] = template.get("Conditions", {})

    def condition(self, name: str) -> bool:
        return bool(self(self.conditions[name]))

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [item for item in map(self, value) if item is not NO_VALUE]
        if isinstance(value, dict):
            resolved = {key: self(item) for key, item in value.items()}
            return {key: item for key, item in resolved.items() if item is not NO_VALUE}
        if not hasattr(value, "tag"):
            return value
        return self._intrinsic(value.tag, value.value)

    def _intrinsic(self, tag: str, inner: Any) -> Any:
        functions: dict[str, Callable[[Any], Any]] = {
            "!Ref": lambda name: NO_VALUE if name == "AWS::NoValue" else self._value(name),
            "!Sub": self._sub,
            "!If": lambda args: self(args[1] if self.condition(args[0]) else args[2]),
            "!Condition": self.condition,
            "!Equals": lambda args: str(self(args[0])) == str(self(args[1])),
            "!Not": lambda args: not self(args[0]),
            "!And": lambda args: all(bool(self(arg)) for arg in args),
            "!Or": lambda args: any(bool(self(arg)) for arg in args),
            "!Select": lambda args: self(args[1])[int(self(args[0]))],
            "!Split": lambda args: str(self(args[1])).split(args[0]),
            "!Join": lambda args: args[0].join(str(item) for item in self(args[1])),
        }
        if tag not in functions:
            raise Unresolvable(f"{tag} {inner!r}")
        return functions[tag](inner)

    def _value(self, name: str) -> Any:
        if name not in self.values:
            raise Unresolvable(name)  # a resource: only a deployment knows it
        return self.values[name]

    def _sub(self, inner: Any) -> str:
        text, variables = (inner, {}) if isinstance(inner, str) else (inner[0], self(inner[1]))

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            return str(variables[name] if name in variables else self._value(name))

        return re.sub(r"\$\{(?!!)([^}]+)\}", replace, text)


def function_environment(logical_id: str, **parameters: str) -> dict[str, str]:
    """The function's environment as deployed with these parameters (their defaults
    otherwise); what only a deployment knows (a resource's ARN, URL, endpoint)
    becomes a placeholder."""
    template = load_template()
    resolve = Resolver(**parameters)
    variables: dict[str, Any] = {
        **template["Globals"]["Function"]["Environment"]["Variables"],
        **resource(logical_id)["Properties"].get("Environment", {}).get("Variables", {}),
    }
    environment = {}
    for name, value in variables.items():
        try:
            environment[name] = str(resolve(value))
        except Unresolvable:
            environment[name] = f"resolved-{name.lower()}"
    return environment


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


def generate_statements(**parameters: str) -> list[dict[str, Any]]:
    """The Bedrock statements of the generate function's role, resolved (the others
    name resources only a deployment knows)."""
    resolve = Resolver(**parameters)
    statements = []
    for policy in resource("GenerateFunction")["Properties"]["Policies"]:
        for statement in policy.get("Statement", []) if isinstance(policy, dict) else []:
            if "bedrock" in repr(statement):
                resolved = resolve(statement)
                if resolved is not NO_VALUE:
                    statements.append(resolved)
    return statements


def _arn_pattern(pattern: str) -> re.Pattern[str]:
    """An IAM ARN with wildcards as a regular expression (``*`` any run, ``?`` one)."""
    return re.compile(
        "".join(
            ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
        )
    )


def _arn_like(pattern: str, arn: str) -> bool:
    """IAM's ARN matching: the six parts one by one, the resource part whole."""
    pattern_parts, arn_parts = pattern.split(":", 5), arn.split(":", 5)
    return len(pattern_parts) == len(arn_parts) == 6 and all(
        _arn_pattern(part).fullmatch(value)
        for part, value in zip(pattern_parts, arn_parts, strict=True)
    )


def _conditions_hold(condition: dict[str, Any], context: dict[str, str]) -> bool:
    for operator, keys in condition.items():
        assert operator in ("ArnLike", "ArnEquals", "StringEquals"), f"{operator} unread"
        for key, expected in keys.items():
            values = expected if isinstance(expected, list) else [expected]
            if key not in context:
                return False
            if operator == "StringEquals" and context[key] not in values:
                return False
            if operator != "StringEquals" and not any(_arn_like(v, context[key]) for v in values):
                return False
    return True


def allows(
    statements: list[dict[str, Any]], resource_arn: str, context: dict[str, str] | None = None
) -> bool:
    """Whether the statements let the role call bedrock:InvokeModel on the ARN
    (``context``: the request's condition keys, as Bedrock sets them)."""
    for statement in statements:
        actions = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        resources = statement["Resource"]
        resources = resources if isinstance(resources, list) else [resources]
        if (
            statement["Effect"] == "Allow"
            and "bedrock:InvokeModel" in actions
            and any(_arn_like(pattern, resource_arn) for pattern in resources)
            and _conditions_hold(statement.get("Condition", {}), context or {})
        ):
            return True
    return False


ACCOUNT, REGION = PSEUDO_PARAMETERS["AWS::AccountId"], PSEUDO_PARAMETERS["AWS::Region"]
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"


def foundation_model(model_id: str, region: str = REGION) -> str:
    return f"arn:aws:bedrock:{region}::foundation-model/{model_id}"


def inference_profile(profile_id: str, region: str = REGION) -> str:
    return f"arn:aws:bedrock:{region}:{ACCOUNT}:inference-profile/{profile_id}"


def test_least_privilege_statements_are_scoped() -> None:
    generate = resource("GenerateFunction")["Properties"]["Policies"]
    statements = [s for policy in generate if "Statement" in policy for s in policy["Statement"]]
    connect = next(s for s in statements if isinstance(s, dict) and s["Action"] == "rds-db:connect")

    assert "${DatabaseUser}" in connect["Resource"].value[0]
    assert {"SQSSendMessagePolicy"} <= {key for policy in generate for key in policy}
    assert all(
        statement["Action"] == "bedrock:InvokeModel"
        for statement in generate_statements(BedrockModelId="us." + HAIKU)
        if "bedrock" in str(statement["Action"])
    ), "Bedrock: invoking the model only"


def test_a_foundation_model_id_allows_that_model_in_this_region_only() -> None:
    # GIVEN BedrockModelId as a foundation model id (the default)
    assert load_template()["Parameters"]["BedrockModelId"]["Default"] == HAIKU
    statements = generate_statements()

    # WHEN the role's Bedrock permissions are evaluated
    # THEN it may invoke that model, here, and nothing else
    assert allows(statements, foundation_model(HAIKU))
    assert not allows(statements, foundation_model(HAIKU, "us-east-1"))
    assert not allows(statements, foundation_model("anthropic.claude-3-5-sonnet-20241022-v2:0"))
    assert not allows(statements, inference_profile("us." + HAIKU))
    assert len([s for s in statements if "bedrock:InvokeModel" in str(s["Action"])]) == 1


# Profiles as given: an id (geography before the model id) or the profile's ARN.
PROFILES = [
    ("us." + HAIKU, HAIKU),
    ("eu.anthropic.claude-3-7-sonnet-20250219-v1:0", "anthropic.claude-3-7-sonnet-20250219-v1:0"),
    ("apac.amazon.nova-pro-v1:0", "amazon.nova-pro-v1:0"),
    (
        "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
    ),
    ("us-gov.meta.llama3-8b-instruct-v1:0", "meta.llama3-8b-instruct-v1:0"),
    (inference_profile("eu." + HAIKU), HAIKU),
]


@pytest.mark.parametrize(("model_id", "model"), PROFILES, ids=[given for given, _ in PROFILES])
def test_an_inference_profile_allows_it_and_its_model_through_it_only(
    model_id: str, model: str
) -> None:
    # GIVEN BedrockModelId as a cross-Region inference profile
    statements = generate_statements(BedrockModelId=model_id)
    profile = model_id if model_id.startswith("arn:") else inference_profile(model_id)
    through_it = {"bedrock:InferenceProfileArn": profile}

    # WHEN the role's Bedrock permissions are evaluated for the calls the profile makes
    # THEN the profile may be invoked, and its foundation model in whichever Region it
    # routes to (a global profile's model has no Region), through that profile only
    assert allows(statements, profile)
    for region in ("eu-west-1", "eu-central-1", "us-east-1", "ap-northeast-1", ""):
        assert allows(statements, foundation_model(model, region), through_it), region
    assert not allows(statements, foundation_model(model)), "the model outside the profile"
    other_profile = {"bedrock:InferenceProfileArn": inference_profile("us.amazon.nova-pro-v1:0")}
    assert not allows(statements, foundation_model(model), other_profile)
    assert not allows(statements, foundation_model("amazon.nova-lite-v1:0"), through_it)
    assert not allows(statements, inference_profile("us.amazon.nova-lite-v1:0"))


@pytest.mark.parametrize(
    ("model_id", "accepted"),
    [
        (HAIKU, True),
        ("amazon.titan-text-express-v1", True),
        ("anthropic.claude-3-haiku-20240307-v1:0:200k", True),
        *((given, True) for given, _ in PROFILES),
        ("anthropic", False),  # no model
        ("us.anthropic.claude.v1:0", False),  # a third dot: the policy would misread it
        (foundation_model(HAIKU), False),  # an ARN, but not a profile's
        (f"arn:aws:bedrock:{REGION}:{ACCOUNT}:inference-profile/{HAIKU}", False),
        (f"arn:aws:bedrock:{REGION}:{ACCOUNT}:application-inference-profile/a1b2c3", False),
    ],
)
def test_bedrock_model_id_admits_only_the_shapes_the_policy_reads(
    model_id: str, accepted: bool
) -> None:
    # GIVEN the parameter's AllowedPattern (CloudFormation matches it whole)
    pattern = load_template()["Parameters"]["BedrockModelId"]["AllowedPattern"]

    # WHEN a value is checked against it
    # THEN a model id, a profile id and a profile's ARN pass; what the policy's
    # conditions could not tell apart is refused at deploy time
    assert bool(re.fullmatch(pattern, model_id)) is accepted


def test_the_llm_quota_parameters_reach_the_generate_environment() -> None:
    # GIVEN the quota left empty (the default), then given
    unset = Settings.from_environ(function_environment("GenerateFunction"))
    given = Settings.from_environ(
        function_environment(
            "GenerateFunction", LlmQuotaTokensPerMinute="400000", LlmQuotaRequestsPerMinute="50"
        )
    )

    # WHEN the generate function reads its settings
    # THEN empty means unset (the pacing learns the quota), and a value is the quota
    assert (unset.llm_quota_tokens_per_minute, unset.llm_quota_requests_per_minute) == (None, None)
    assert (given.llm_quota_tokens_per_minute, given.llm_quota_requests_per_minute) == (400000, 50)
    assert given.bedrock_max_tokens == unset.bedrock_max_tokens == 4096
    parameters = load_template()["Parameters"]
    for name in ("LlmQuotaTokensPerMinute", "LlmQuotaRequestsPerMinute"):
        assert parameters[name]["Default"] == ""
        assert "Service Quotas" in parameters[name]["Description"]
        for value, accepted in (
            ("", True),
            ("1500", True),
            ("0", False),
            ("-1", False),
            ("1e6", False),
        ):
            assert bool(re.fullmatch(parameters[name]["AllowedPattern"], value)) is accepted


def test_the_detect_timeout_leaves_the_api_path_its_own_deadline() -> None:
    from content_retry.api import API_AT_MOST_SECONDS, API_GATEWAY_TIMEOUT_SECONDS

    # The API path answers by its own deadline, before API Gateway gives up; Lambda
    # must not cut it first (the sweep and direct invokes use the whole timeout).
    assert API_AT_MOST_SECONDS < API_GATEWAY_TIMEOUT_SECONDS == 29
    assert function_timeout("DetectFunction") > API_AT_MOST_SECONDS


def test_the_worker_knows_the_retry_queues_max_receive_count() -> None:
    # generate dead-letters a record on its last delivery itself: it must know which that is
    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    redrive = resource("RetryQueue")["Properties"]["RedrivePolicy"]

    assert int(variables["RETRY_MAX_RECEIVE_COUNT"]) == int(redrive["maxReceiveCount"])


def test_a_sent_claim_lasts_as_long_as_the_queue_keeps_its_message() -> None:
    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    retention = int(resource("RetryQueue")["Properties"]["MessageRetentionPeriod"])

    assert int(variables["RETRY_QUEUE_RETENTION_MINUTES"]) * 60 == retention
