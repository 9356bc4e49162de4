"""template.yaml held against the code: what the functions need, it provides."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from content_retry.settings import Settings
from content_retry_local.template import create_queues, load_template, queue_attributes, resource
from tests.conftest import REPO_ROOT

FUNCTIONS = ("ApiFunction", "DetectFunction", "GenerateFunction")

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


def test_runtime_and_alias() -> None:
    globals_ = load_template()["Globals"]["Function"]

    assert (globals_["Runtime"], globals_["Tracing"]) == ("python3.12", "Active")
    # SnapStart is the deployer's choice; events always invoke the published alias
    assert globals_["SnapStart"]["ApplyOn"].value == "SnapStart"
    assert globals_["AutoPublishAlias"] == "live"


ARCHITECTURES = {"arm64": "aarch64", "x86_64": "x86_64"}  # Lambda's name: the wheels'


def layer_for(architecture: str) -> str:
    """The logical id of the layer the functions use with this Architecture."""
    [layers] = load_template()["Globals"]["Function"]["Layers"]
    assert layers.tag == "!If", "one layer, chosen by the architecture"
    condition, when_true, when_false = layers.value
    chosen = when_true if Resolver(Architecture=architecture).condition(condition) else when_false
    assert chosen.tag == "!Ref"
    layer_id: str = chosen.value
    return layer_id


def wheel_platforms(make_arguments: list[str], cwd: Path) -> set[str]:
    """The --platform values of the pip command ``make -n ARGUMENTS`` would run."""
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", *make_arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(re.findall(r"--platform (\S+)", dry_run))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_the_functions_and_the_layer_follow_the_one_architecture_parameter(
    architecture: str, tmp_path: Path
) -> None:
    # GIVEN the template deployed with this Architecture
    template = load_template()
    assert template["Parameters"]["Architecture"]["AllowedValues"] == sorted(ARCHITECTURES)
    resolve = Resolver(Architecture=architecture)
    layer_id = layer_for(architecture)
    layer = resource(layer_id)
    others = [
        logical_id
        for logical_id, definition in template["Resources"].items()
        if definition["Type"] == "AWS::Serverless::LayerVersion" and logical_id != layer_id
    ]

    # WHEN what runs and what is built for it are read
    wheels = ARCHITECTURES[architecture]
    other = next(name for name in ARCHITECTURES.values() if name != wheels)
    # sam build runs build-<LogicalId>, with nothing else but ARTIFACTS_DIR; an ARCH
    # from elsewhere (the environment, the command line) must not change it.
    built = wheel_platforms(
        [
            f"build-{layer_id}",
            f"ARCH={other}",
            f"ARTIFACTS_DIR={tmp_path}",
            f"PYTHON312={sys.executable}",
        ],
        REPO_ROOT / layer["Properties"]["ContentUri"],
    )
    # make layer builds what sam build does for this architecture
    made = wheel_platforms([f"ARCH={architecture}", "layer"], REPO_ROOT)

    # THEN the functions run on it, the layer they use is the one CloudFormation
    # creates, declared and built for it, with wheels for it; the other is not created
    assert resolve(template["Globals"]["Function"]["Architectures"]) == [architecture]
    assert resolve.condition(layer["Condition"])
    assert layer["Properties"]["CompatibleArchitectures"] == [architecture]
    assert layer["Metadata"] == {"BuildMethod": "makefile", "BuildArchitecture": architecture}
    assert built == made == {f"manylinux2014_{wheels}", f"manylinux_2_17_{wheels}"}
    assert others and not any(resolve.condition(resource(o)["Condition"]) for o in others)
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


def events_of(logical_id: str, type_: str) -> dict[str, Any]:
    events: dict[str, Any] = resource(logical_id)["Properties"].get("Events", {})
    return {name: event for name, event in events.items() if event["Type"] == type_}


def test_api_invocations_end_within_api_gateways_29_seconds_by_construction() -> None:
    from content_retry.api import API_AT_MOST_SECONDS, API_GATEWAY_TIMEOUT_SECONDS

    # GIVEN the functions API Gateway invokes, and the others
    served = [logical_id for logical_id in FUNCTIONS if events_of(logical_id, "Api")]

    # WHEN their timeouts are read
    # THEN Lambda ends an API invocation before API Gateway gives up, and not before
    # the API path's own deadline answers (503 with Retry-After); the sweep and direct
    # invokes, which no gateway waits for, run in a function of their own
    assert served == ["ApiFunction"]
    assert API_AT_MOST_SECONDS < function_timeout("ApiFunction") < API_GATEWAY_TIMEOUT_SECONDS == 29
    assert events_of("DetectFunction", "ScheduleV2")
    assert function_timeout("DetectFunction") > API_GATEWAY_TIMEOUT_SECONDS


def statements(logical_id: str) -> list[str]:
    """A function's policies, each statement (or policy template) as text."""
    found = []
    for policy in resource(logical_id)["Properties"]["Policies"]:
        if isinstance(policy, dict) and "Statement" in policy:
            found += [repr(statement) for statement in policy["Statement"]]
        else:
            found.append(repr(policy))
    return found


def test_both_detect_functions_run_the_one_judge() -> None:
    # GIVEN the API's function and the sweep's
    api, detect = (resource(name)["Properties"] for name in ("ApiFunction", "DetectFunction"))

    # THEN they are the same handler, with the same settings and the same logs, and
    # the API may do nothing the sweep's function may not
    for key in ("CodeUri", "Handler", "LoggingConfig", "Environment"):
        assert repr(api.get(key)) == repr(detect.get(key)), key
    assert detect["Handler"] == "app.lambda_handler"
    assert detect["CodeUri"] == "functions/detect/"
    assert set(statements("ApiFunction")) <= set(statements("DetectFunction"))


def test_only_the_sweep_may_move_dead_lettered_content_back() -> None:
    # GIVEN the statements naming the dead-letter queue
    def on_the_dlq(logical_id: str) -> list[str]:
        return [text for text in statements(logical_id) if "RetryDLQ" in text]

    # THEN the sweep's function may receive and delete its messages (and send them to
    # the retry queue); the API's may not touch it; generate may only send to it
    [move] = on_the_dlq("DetectFunction")
    assert "sqs:ReceiveMessage" in move and "sqs:DeleteMessage" in move
    assert any(
        "SQSSendMessagePolicy" in text and "RetryQueue" in text
        for text in statements("DetectFunction")
    )
    assert on_the_dlq("ApiFunction") == []
    assert all("SQSSendMessagePolicy" in text for text in on_the_dlq("GenerateFunction"))


def test_no_function_reserves_concurrency() -> None:
    # An account whose concurrency limit is low refuses any reservation (it must keep
    # 100 unreserved); the connection budget is bounded by the triggers instead.
    assert "ReservedConcurrentExecutions" not in load_template()["Globals"]["Function"]
    for logical_id in FUNCTIONS:
        assert "ReservedConcurrentExecutions" not in resource(logical_id)["Properties"]
    generate = events_of("GenerateFunction", "SQS")["RetryMessages"]["Properties"]
    assert generate["ScalingConfig"]["MaximumConcurrency"].value == "GenerateMaxConcurrency"
    throttling = resource("RetryApi")["Properties"]["MethodSettings"]
    assert [(s["ThrottlingRateLimit"], s["ThrottlingBurstLimit"]) for s in throttling] == [(10, 20)]
    # No second stage (SAM's "Stage") without that throttling
    assert resource("RetryApi")["Properties"]["OpenApiVersion"] == "3.0.1"


def _seconds(rate: str) -> int:
    match = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours)\)", rate)
    assert match, rate
    return int(match.group(1)) * (60 if match.group(2).startswith("minute") else 3600)


def test_a_throttled_or_failed_sweep_is_retried_before_the_next_run() -> None:
    # GIVEN the sweep's schedule and the function's asynchronous invocation settings
    [sweep] = events_of("DetectFunction", "ScheduleV2").values()
    retry = sweep["Properties"]["RetryPolicy"]
    asynchronous = resource("DetectFunction")["Properties"]["EventInvokeConfig"]
    interval = _seconds(load_template()["Parameters"]["SweepScheduleExpression"]["Default"])

    # WHEN they are read
    # THEN the scheduler retries an invoke Lambda refuses, Lambda retries a sweep it
    # throttles (its queue) or that failed, and both give up before the next run
    assert retry["MaximumRetryAttempts"] > 0
    assert asynchronous["MaximumRetryAttempts"] > 0
    assert retry["MaximumEventAgeInSeconds"] < interval
    assert asynchronous["MaximumEventAgeInSeconds"] < interval
    assert sweep["Properties"]["Input"] == '{"action": "sweep"}'
    assert function_timeout("DetectFunction") < interval


def test_the_worker_knows_the_retry_queues_max_receive_count() -> None:
    # generate dead-letters a record on its last delivery itself: it must know which that is
    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    redrive = resource("RetryQueue")["Properties"]["RedrivePolicy"]

    assert int(variables["RETRY_MAX_RECEIVE_COUNT"]) == int(redrive["maxReceiveCount"])


def test_dead_lettered_content_stays_claimed_as_long_as_the_dlq_keeps_it() -> None:
    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    retention = int(resource("RetryDLQ")["Properties"]["MessageRetentionPeriod"])

    assert int(variables["RETRY_DLQ_RETENTION_MINUTES"]) * 60 == retention
    assert (
        Settings.from_environ(function_environment("DetectFunction")).dlq_retention_minutes * 60
        == retention
    )


def test_a_sent_claim_lasts_as_long_as_the_queue_keeps_its_message() -> None:
    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    retention = int(resource("RetryQueue")["Properties"]["MessageRetentionPeriod"])

    assert int(variables["RETRY_QUEUE_RETENTION_MINUTES"]) * 60 == retention


# --- parameters checked before anything is created -------------------------------


@pytest.mark.parametrize(
    ("instance", "cluster", "accepted"),
    [
        ("", "", False),  # the proxy's target group would get [""] and fail late
        ("roadmaps-db", "", True),
        ("", "roadmaps-aurora", True),
        ("roadmaps-db", "roadmaps-aurora", False),  # the cluster would silently win
    ],
)
def test_the_rules_admit_exactly_one_database(instance: str, cluster: str, accepted: bool) -> None:
    # GIVEN the database identifiers a deployer gives
    resolve = Resolver(DatabaseInstanceIdentifier=instance, DatabaseClusterIdentifier=cluster)
    assertions = load_template()["Rules"]["ExactlyOneDatabase"]["Assertions"]

    # WHEN CloudFormation evaluates the rules, before creating anything
    failed = [a["AssertDescription"] for a in assertions if not resolve(a["Assert"])]

    # THEN exactly one is accepted, and a refusal says what to give
    assert (failed == []) is accepted
    assert all("DatabaseInstanceIdentifier" in text for text in failed)


def parameter_accepts(name: str, value: str) -> bool:
    """Whether CloudFormation takes ``value`` for the String parameter ``name``."""
    parameter = load_template()["Parameters"][name]
    return (
        re.fullmatch(parameter.get("AllowedPattern", ".*"), value) is not None
        and parameter.get("MinLength", 0) <= len(value) <= parameter.get("MaxLength", 4096)
        and value in parameter.get("AllowedValues", [value])
    )


LONGEST_STAGES = ("a" + "-b" * 10, "x" * 21)


@pytest.mark.parametrize(
    ("stage", "accepted"),
    [
        ("dev", True),
        ("prod", True),
        ("pr-123", True),
        ("a", True),
        *((stage, True) for stage in LONGEST_STAGES),
        ("x" * 22, False),
        ("dev-", False),  # DBProxyName may not end with a hyphen
        ("dev--eu", False),  # nor hold two in a row
        ("-dev", False),
        ("1dev", False),
        ("Dev", False),
        ("dev_eu", False),
        ("", False),
    ],
)
def test_the_stage_admits_only_names_every_resource_can_take(stage: str, accepted: bool) -> None:
    assert parameter_accepts("Stage", stage) is accepted


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("DatabaseInstanceIdentifier", "", True),
        ("DatabaseInstanceIdentifier", "roadmaps-db-1", True),
        ("DatabaseInstanceIdentifier", "roadmaps-", False),
        ("DatabaseInstanceIdentifier", "1roadmaps", False),
        ("DatabaseClusterIdentifier", "aurora--x", False),
        ("DatabaseSecretKmsKeyArn", "", True),
        (
            "DatabaseSecretKmsKeyArn",
            "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            True,
        ),
        ("DatabaseSecretKmsKeyArn", "arn:aws:kms:eu-west-1:123456789012:alias/db", False),
        ("SweepScheduleExpression", "rate(15 minutes)", True),
        ("SweepScheduleExpression", "cron(0/15 * * * ? *)", True),
        ("SweepScheduleExpression", "15 minutes", False),
        ("AlarmTopicArn", "", True),
        ("AlarmTopicArn", "arn:aws:sns:eu-west-1:123456789012:on-call", True),
        ("AlarmTopicArn", "on-call", False),
        ("DatabaseName", "", False),
        ("Architecture", "arm64", True),
        ("Architecture", "aarch64", False),
        ("CreateApiGatewayAccountRole", "false", True),
        ("CreateApiGatewayAccountRole", "yes", False),
    ],
)
def test_parameters_refuse_what_would_fail_later(name: str, value: str, accepted: bool) -> None:
    assert parameter_accepts(name, value) is accepted


def test_every_constraint_says_what_to_give() -> None:
    # GIVEN the parameters CloudFormation checks against a constraint
    constrained = {
        name: parameter
        for name, parameter in load_template()["Parameters"].items()
        if {"AllowedPattern", "MinValue", "MaxValue", "MinLength", "MaxLength"} & set(parameter)
    }

    # THEN each has a ConstraintDescription (without one, the refusal quotes the
    # regular expression), and a description
    assert "Stage" in constrained
    for name, parameter in constrained.items():
        assert parameter.get("ConstraintDescription"), name
    for name, parameter in load_template()["Parameters"].items():
        assert parameter.get("Description"), name


# --- what the proxy, the network and API Gateway need -----------------------------


def proxy_statements(**parameters: str) -> list[dict[str, Any]]:
    resolve = Resolver(**parameters)
    statements = []
    for policy in resource("DatabaseProxyRole")["Properties"]["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            try:
                resolved = resolve(statement)
            except Unresolvable:
                resolved = statement  # names the secret: a parameter only a deployment has
            if resolved is not NO_VALUE:
                statements.append(resolved)
    return statements


def test_the_proxy_decrypts_the_secret_with_its_key_only_when_one_is_given() -> None:
    key = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"

    # GIVEN the secret under the AWS managed key (default), then under a customer's key
    managed = proxy_statements()
    customer = proxy_statements(DatabaseSecretKmsKeyArn=key)

    # WHEN the proxy role's statements are read
    decrypt = [s for s in customer if s["Action"] == "kms:Decrypt"]

    # THEN only the customer's key may be used, through Secrets Manager in this Region
    assert not any("kms" in str(statement["Action"]) for statement in managed)
    assert len(decrypt) == 1
    assert decrypt[0]["Resource"] == key
    assert decrypt[0]["Condition"] == {
        "StringEquals": {"kms:ViaService": f"secretsmanager.{REGION}.amazonaws.com"}
    }


def test_the_shared_security_groups_say_they_need_a_self_referencing_rule() -> None:
    description = load_template()["Parameters"]["SecurityGroupIds"]["Description"]

    assert "self-referencing" in description
    assert "5432" in description


def test_the_api_gateway_account_role_is_created_only_when_asked_and_kept() -> None:
    # GIVEN the parameter, at its default and set
    parameter = load_template()["Parameters"]["CreateApiGatewayAccountRole"]
    role, account = resource("ApiGatewayCloudWatchRole"), resource("ApiGatewayAccount")
    description = resource("RetryApi")["Properties"]["Description"]

    # WHEN the conditions are evaluated
    # THEN by default nothing of the account's is touched; asked, the role is created
    # (and kept after the stack: every API of the region logs through it), set as the
    # account's, and the API is created after it (its access log needs it)
    assert parameter["Default"] == "false"
    for definition in (role, account):
        assert not Resolver().condition(definition["Condition"])
        assert Resolver(CreateApiGatewayAccountRole="true").condition(definition["Condition"])
    assert (role["DeletionPolicy"], role["UpdateReplacePolicy"]) == ("Retain", "Retain")
    assert role["Properties"]["ManagedPolicyArns"][0].value.endswith(
        "policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs"
    )
    assert account["Properties"]["CloudWatchRoleArn"].value == "ApiGatewayCloudWatchRole.Arn"
    condition, when_created, _ = description.value
    assert condition == role["Condition"]
    assert "${ApiGatewayAccount}" in when_created.value


# --- paid content outlives the stack --------------------------------------------


def test_the_queues_holding_generated_content_are_kept_on_delete_and_replace() -> None:
    # The DLQ keeps failed saves' generated content; the retry queue holds it while
    # a re-drive's messages wait to be saved.
    for logical_id in ("RetryDLQ", "RetryQueue"):
        definition = resource(logical_id)
        assert (definition["DeletionPolicy"], definition["UpdateReplacePolicy"]) == (
            "Retain",
            "Retain",
        ), logical_id


def test_every_stateful_resource_says_what_happens_to_its_data() -> None:
    # cfn-lint's I3011 (make iac-lint runs it) for the types this template has
    stateful = {"AWS::SQS::Queue", "AWS::Logs::LogGroup", "AWS::RDS::DBInstance"}
    for logical_id, definition in load_template()["Resources"].items():
        if definition["Type"] in stateful:
            assert {"DeletionPolicy", "UpdateReplacePolicy"} <= set(definition), logical_id


# --- two stages, one account: the template as `sam deploy` translates it ----------

# A stage's required parameters (the others keep their defaults).
REQUIRED = {
    "SubnetIds": "subnet-0a1b2c3d",
    "SecurityGroupIds": "sg-0a1b2c3d",
    "DatabaseInstanceIdentifier": "roadmaps-db",
    "DatabaseSecretArn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:roadmaps-AbCdEf",
    "CognitoUserPoolArn": f"arn:aws:cognito-idp:{REGION}:{ACCOUNT}:userpool/{REGION}_AbCdEf",
}

# Names scoped to another resource, not the account and Region: two stacks may
# repeat them. And "...Name" properties that are not the resource's own name.
SCOPED = {
    ("AWS::Lambda::Alias", "Name"),  # per function
    ("AWS::ApiGateway::Stage", "StageName"),  # per API
    ("AWS::ApiGateway::Deployment", "StageName"),
    ("AWS::RDS::DBProxyTargetGroup", "TargetGroupName"),  # per proxy
}
NOT_NAMES = {("AWS::CloudWatch::Alarm", "MetricName")}

# What each service accepts as the name (its API reference's pattern and length).
NAME_RULES: dict[tuple[str, str], str] = {
    ("AWS::SQS::Queue", "QueueName"): r"[A-Za-z0-9_-]{1,80}",
    ("AWS::RDS::DBProxy", "DBProxyName"): r"(?!.*--)[A-Za-z][A-Za-z0-9-]{0,62}(?<!-)",
    ("AWS::Scheduler::Schedule", "Name"): r"[0-9a-zA-Z_.-]{1,64}",
    ("AWS::CloudWatch::Dashboard", "DashboardName"): r"[A-Za-z0-9_-]{1,255}",
    ("AWS::CloudWatch::Alarm", "AlarmName"): r"[ -~]{1,255}",
    ("AWS::Logs::LogGroup", "LogGroupName"): r"[.\-_/#A-Za-z0-9]{1,512}",
    ("AWS::Lambda::LayerVersion", "LayerName"): r"[a-zA-Z0-9_-]{1,140}",
    ("AWS::ApiGateway::RestApi", "Name"): r"[ -~]{1,1024}",
    ("AWS::ApiGateway::Stage", "StageName"): r"[a-zA-Z0-9_-]{1,128}",
    ("AWS::ApiGateway::Deployment", "StageName"): r"[a-zA-Z0-9_-]{1,128}",
    ("AWS::Lambda::Alias", "Name"): r"(?!^[0-9]+$)[a-zA-Z0-9_-]{1,128}",
    ("AWS::RDS::DBProxyTargetGroup", "TargetGroupName"): r"default",
}


def translate(stage: str, **parameters: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The template as `sam deploy` sends it to CloudFormation for this stage (the
    SAM translator, the artifacts where `sam package` puts them), and the values of
    its parameters and pseudo parameters."""
    from samtranslator.metrics.metrics import DummyMetricsPublisher, Metrics  # type: ignore[import-untyped]
    from samtranslator.parser.parser import Parser  # type: ignore[import-untyped]
    from samtranslator.translator.translator import Translator  # type: ignore[import-untyped]
    from samtranslator.yaml_helper import yaml_parse  # type: ignore[import-untyped]

    template = yaml_parse((REPO_ROOT / "template.yaml").read_text())
    for definition in template["Resources"].values():
        for uri in ("CodeUri", "ContentUri"):
            if uri in definition.get("Properties", {}):
                definition["Properties"][uri] = "s3://artifacts/content-retry.zip"
    values = {
        name: str(parameter["Default"])
        for name, parameter in template["Parameters"].items()
        if "Default" in parameter
    }
    values.update(REQUIRED, Stage=stage, **parameters)
    metrics = Metrics("ServerlessTransform", DummyMetricsPublisher())
    translated = Translator(
        managed_policy_map={},
        sam_parser=Parser(),
        boto_session=boto3.Session(region_name=REGION),
        metrics=metrics,
    ).translate(template, dict(values), get_managed_policy_map=dict)
    metrics.publish()  # to nowhere; unpublished, it complains when collected
    values.update(PSEUDO_PARAMETERS, **{"AWS::StackName": f"content-retry-{stage}"})
    return translated, values


def _resolve_name(value: Any, values: dict[str, Any]) -> str | None:
    """A name as CloudFormation resolves it, or None when it is another resource's
    (a Ref or GetAtt: a reference to a name, not a name)."""
    if isinstance(value, str):
        return value
    [(function, argument)] = value.items()
    if function == "Ref":
        return values.get(argument)
    if function == "Fn::Sub":
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        parts = []
        for literal, name in re.findall(r"([^$]*)(?:\$\{([^}!]+)\})?", text):
            parts.append(literal)
            if name:
                resolved = (
                    _resolve_name(variables[name], values)
                    if name in variables
                    else values.get(name)
                )
                if resolved is None:
                    return None
                parts.append(resolved)
        return "".join(parts)
    if function == "Fn::GetAtt":
        return None
    raise AssertionError(f"a name this test cannot read: {value!r}")


def physical_names(stage: str, **parameters: str) -> dict[tuple[str, str, str], str]:
    """(type, property, name) -> the resource's logical id, for every resource the
    translated template names itself."""
    translated, values = translate(stage, **parameters)
    names = {}
    for logical_id, definition in translated["Resources"].items():
        for key, value in definition.get("Properties", {}).items():
            if not key.endswith("Name") or (definition["Type"], key) in NOT_NAMES:
                continue
            name = _resolve_name(value, values)
            if name is not None:
                names[(definition["Type"], key, name)] = logical_id
    return names


def test_two_stages_share_no_physical_name() -> None:
    # GIVEN the template translated as sam deploy would, for dev and prod, with every
    # optional resource but the account-wide API Gateway role (one per account)
    dev = physical_names("dev", DatabaseSecretKmsKeyArn="", AlarmTopicArn="")
    prod = physical_names("prod")

    # WHEN the names each would create in the account and Region are compared
    shared = {
        f"{type_} {key} {name!r} ({dev[(type_, key, name)]})"
        for type_, key, name in dev.keys() & prod.keys()
        if (type_, key) not in SCOPED
    }

    # THEN none is the same: the second stage deploys beside the first
    assert shared == set()
    named_types = {type_ for type_, _, _ in dev}
    assert {
        "AWS::Scheduler::Schedule",
        "AWS::SQS::Queue",
        "AWS::RDS::DBProxy",
        "AWS::CloudWatch::Alarm",
        "AWS::CloudWatch::Dashboard",
        "AWS::Logs::LogGroup",
        "AWS::Lambda::LayerVersion",
        "AWS::ApiGateway::RestApi",
    } <= named_types, "the test must see the names it is about"
    assert ("AWS::Scheduler::Schedule", "Name", "content-retry-sweep-dev") in dev


@pytest.mark.parametrize("stage", LONGEST_STAGES)
def test_the_longest_stage_makes_names_every_service_accepts(stage: str) -> None:
    # GIVEN the longest stage the parameter admits
    assert parameter_accepts("Stage", stage)

    # WHEN every name of the translated template is built with it
    names = physical_names(stage, CreateApiGatewayAccountRole="true")

    # THEN each is one its service accepts
    for type_, key, name in names:
        assert (type_, key) in NAME_RULES, f"{type_} {key}: add the service's rule for it"
        assert re.fullmatch(NAME_RULES[(type_, key)], name), f"{type_} {key} {name!r}"


def test_the_translated_template_keeps_the_rules() -> None:
    translated, _ = translate("dev")

    assert set(translated["Rules"]) == set(load_template()["Rules"])


def test_api_gateway_routes_every_operation_the_api_serves() -> None:
    # Every path and method of the API's OpenAPI document (generated from the
    # code) is an Api event of the function behind API Gateway, and no other.
    document = json.loads((REPO_ROOT / "docs" / "openapi.json").read_text())
    served = {(path, method.lower()) for path, item in document["paths"].items() for method in item}
    events = resource("ApiFunction")["Properties"]["Events"].values()
    routed = {
        (event["Properties"]["Path"], event["Properties"]["Method"].lower())
        for event in events
        if event["Type"] == "Api"
    }
    assert routed == served
