"""``content-retry smoke --stack NAME``: a deployed stack checked, changing nothing.

Checks the API's refusal of unsigned callers, the detect functions, queues and alarms.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from content_retry_local.template import load_template, queue_attributes

# The outputs the checks read (template.yaml's Outputs).
API_URL = "ApiUrl"
QUEUE_URL, DLQ_URL = "RetryQueueUrl", "RetryDlqUrl"
DETECT_FUNCTIONS = ("ApiFunctionName", "DetectFunctionName")
# What a stack whose last deploy went through is in.
SETTLED = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "IMPORT_COMPLETE"})
# Not a Cognito sub (those are UUIDs): a caller no roadmap belongs to.
SMOKE_CALLER = "content-retry-smoke"
REFUSALS = (401, 403)


@dataclass(frozen=True)
class Check:
    """One check's outcome: what, where, and the problem (None: it passed)."""

    what: str
    where: str
    problem: str | None = None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        if self.problem is None:
            return f"ok    {self.what} {self.where}: {self.detail}"
        return f"FAIL  {self.what} {self.where}: {self.problem}"


@dataclass(frozen=True)
class Invocation:
    """A function's answer: its payload, and Lambda's FunctionError when it raised."""

    payload: Any
    function_error: str | None = None


@dataclass(frozen=True)
class SmokeTarget:
    """Where the checks look.

    Attributes:
        cloudformation, sqs, cloudwatch: boto3 clients (or clients of moto's server).
        invoke: invokes a function (its name from the stack's outputs) with an
            event, as the triggers do; raises when it cannot be invoked.
        http_status: the status an HTTP request (method, URL, no credentials) is
            answered with; raises OSError when nothing answers.
    """

    cloudformation: Any
    sqs: Any
    cloudwatch: Any
    invoke: Callable[[str, dict[str, Any]], Invocation]
    http_status: Callable[[str, str], int]


@dataclass(frozen=True)
class Stack:
    name: str
    status: str
    outputs: dict[str, str]
    parameters: dict[str, str]

    def output(self, key: str) -> str:
        """An output's value.

        Raises:
            MissingOutputError: the stack has no such output.
        """
        if key not in self.outputs:
            raise MissingOutputError(
                f"the stack has no output {key}: deployed from an older template.yaml? "
                "(sam deploy this one)"
            )
        return self.outputs[key]


class StackNotFoundError(LookupError):
    """No stack of that name in the account and Region."""


class MissingOutputError(KeyError):
    """The stack lacks an output a check reads."""

    def __str__(self) -> str:
        return str(self.args[0])


def trigger_alias() -> str:
    """The alias every trigger invokes (template.yaml's AutoPublishAlias)."""
    alias: str = load_template()["Globals"]["Function"]["AutoPublishAlias"]
    return alias


def aws_target(region: str | None = None) -> SmokeTarget:
    """The checks against AWS: the default credentials, ``region`` or the default one."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=region)
    # A cold start in a VPC, then the judge's query: seconds, not the 60 s default.
    functions = session.client(
        "lambda",
        config=Config(read_timeout=70, retries={"mode": "standard", "total_max_attempts": 2}),
    )
    alias = trigger_alias()

    def invoke(function: str, event: dict[str, Any]) -> Invocation:
        response = functions.invoke(
            FunctionName=function, Qualifier=alias, Payload=json.dumps(event).encode()
        )
        return Invocation(
            json.loads(response["Payload"].read() or b"null"), response.get("FunctionError")
        )

    return SmokeTarget(
        cloudformation=session.client("cloudformation"),
        sqs=session.client("sqs"),
        cloudwatch=session.client("cloudwatch"),
        invoke=invoke,
        http_status=http_status,
    )


def http_status(method: str, url: str) -> int:
    """The status ``url`` answers an unsigned ``method`` request with (a POST sends ``{}``).

    Raises:
        ValueError: not an http(s) URL.
        OSError: nothing answered (urllib's URLError, a timeout).
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url,
        data=b"{}" if method == "POST" else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310  # nosec B310
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def read_stack(cloudformation: Any, name: str) -> Stack:
    """The stack's status, outputs and parameters.

    Raises:
        StackNotFoundError: no such stack.
    """
    from botocore.exceptions import ClientError

    try:
        [stack] = cloudformation.describe_stacks(StackName=name)["Stacks"]
    except ClientError as exc:
        if "does not exist" in str(exc):
            raise StackNotFoundError(f"no stack {name} in this account and Region") from exc
        raise
    return Stack(
        name=name,
        status=stack["StackStatus"],
        outputs={item["OutputKey"]: item["OutputValue"] for item in stack.get("Outputs", [])},
        parameters={
            item["ParameterKey"]: item.get("ResolvedValue", item["ParameterValue"])
            for item in stack.get("Parameters", [])
        },
    )


def run_smoke(stack_name: str, target: SmokeTarget) -> list[Check]:
    """Every check of a deployed stack, in order; nothing is changed.

    Returns:
        The checks, passed and failed (one each); a stack that cannot be read
        is one failed check.

    Raises:
        NoCredentialsError, NoRegionError: no AWS credentials or Region to read
            the stack with.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    try:
        stack = read_stack(target.cloudformation, stack_name)
    except (NoCredentialsError, NoRegionError):
        raise  # the command's setup, not the stack's: the caller says so
    except (StackNotFoundError, ClientError, BotoCoreError) as exc:
        return [Check("stack", stack_name, f"cannot be read: {exc}")]
    status = Check(
        "stack",
        stack_name,
        None if stack.status in SETTLED else f"{stack.status}: its last deploy did not complete",
        detail=stack.status,
    )
    checks = [status]
    for group, where in (
        (check_api, API_URL),
        (check_detect_functions, "detect"),
        (check_queues, "queues"),
        (check_alarms, "alarms"),
    ):
        try:
            checks += group(stack, target)
        except (MissingOutputError, ClientError, BotoCoreError) as exc:
            checks.append(Check(group.__name__.removeprefix("check_"), where, str(exc)))
    return checks


def check_api(stack: Stack, target: SmokeTarget) -> list[Check]:
    """Both routes, called without a token: refused (401 or 403)."""
    base = stack.output(API_URL).rstrip("/")
    checks = []
    for method, path in (
        ("POST", f"/roadmaps/{_unknown_roadmap()}/retry"),
        ("GET", f"/retry-tasks/{uuid.uuid4()}"),
    ):
        url = base + path
        try:
            status = target.http_status(method, url)
        except (OSError, ValueError) as exc:
            checks.append(Check("api", url, f"unreachable ({exc})"))
            continue
        problem = None
        if status not in REFUSALS:
            problem = (
                f"{method} without a token answered {status}, not 401 or 403: "
                "the API does not require sign-in"
            )
        checks.append(Check("api", url, problem, f"{method} without a token refused ({status})"))
    return checks


def check_detect_functions(stack: Stack, target: SmokeTarget) -> list[Check]:
    """Each detect function answers a request for a roadmap that cannot exist with
    404 ``roadmap not found``: it reached the database, and planned nothing."""
    checks = []
    for output in DETECT_FUNCTIONS:
        function = stack.output(output)
        where = f"{output} {function}"
        try:
            invocation = target.invoke(function, plan_nothing_event())
        except Exception as exc:  # whatever stops the invoke (denied, not found) is the finding
            checks.append(Check("detect", where, f"cannot be invoked ({exc})"))
            continue
        checks.append(
            Check(
                "detect",
                where,
                judged(invocation),
                "answered a request for a roadmap that cannot exist: 404 roadmap not found "
                "(the judge ran against the database; nothing planned)",
            )
        )
    return checks


def plan_nothing_event() -> dict[str, Any]:
    """API Gateway's event for a caller that cannot exist retrying a roadmap that
    cannot exist: the judge runs, finds no such roadmap, and plans nothing."""
    from content_retry_local.http_api import api_gateway_event

    return api_gateway_event(
        "POST",
        f"/roadmaps/{_unknown_roadmap()}/retry",
        {"Content-Type": "application/json", "User-Agent": "content-retry-smoke"},
        "{}",
        SMOKE_CALLER,
    )


def judged(invocation: Invocation) -> str | None:
    """What is wrong with a detect function's answer to :func:`plan_nothing_event`
    (None: it is 404 ``roadmap not found``)."""
    payload = invocation.payload
    if invocation.function_error:
        error = payload if isinstance(payload, dict) else {}
        return (
            f"failed ({error.get('errorType', invocation.function_error)}: "
            f"{str(error.get('errorMessage', payload))[:300]})"
        )
    if not isinstance(payload, dict) or not isinstance(payload.get("statusCode"), int):
        return f"answered {str(payload)[:300]}, not an API response"
    try:
        body = json.loads(payload.get("body") or "null")
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else body
    status = payload["statusCode"]
    if status == 404 and message == "roadmap not found":
        return None
    if status == 503:
        return f"answered 503 ({message}): the database did not answer through the proxy"
    return f"answered {status} ({message}), not 404 roadmap not found"


def check_queues(stack: Stack, target: SmokeTarget) -> list[Check]:
    """The queues' attributes against template.yaml's, the redrive policy naming
    this stack's DLQ; one check per attribute that differs."""
    queue_url, dlq_url = stack.output(QUEUE_URL), stack.output(DLQ_URL)
    actual = {
        url: target.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        for url in (queue_url, dlq_url)
    }
    expected = {
        dlq_url: queue_attributes("RetryDLQ"),
        queue_url: queue_attributes("RetryQueue", dead_letter_arn=actual[dlq_url]["QueueArn"]),
    }
    checks = []
    for url, wanted in expected.items():
        differences = [
            Check(
                "queue",
                url,
                f"{name} is {actual[url].get(name)}, template.yaml says {value}",
            )
            for name, value in wanted.items()
            if not _same_attribute(name, actual[url].get(name), value)
        ]
        summary = ", ".join(f"{name} {value}" for name, value in sorted(wanted.items()))
        checks += differences or [Check("queue", url, None, f"as template.yaml says: {summary}")]
    return checks


def _same_attribute(name: str, actual: str | None, expected: str) -> bool:
    if actual is None:
        return False
    if name != "RedrivePolicy":
        return actual == expected
    try:
        have, want = json.loads(actual), json.loads(expected)
        return bool(
            have["deadLetterTargetArn"] == want["deadLetterTargetArn"]
            and int(have["maxReceiveCount"]) == int(want["maxReceiveCount"])
        )
    except (ValueError, KeyError, TypeError):
        return False


def expected_alarms(stack: Stack) -> dict[str, str]:
    """Every alarm template.yaml names, as this stack's parameters name it:
    alarm name -> logical id.

    Raises:
        ValueError: an alarm's name the smoke check cannot resolve (it reads
            ``!Sub`` strings of parameters and pseudo parameters).
    """
    values = {**stack.parameters, "AWS::StackName": stack.name}
    alarms = {}
    for logical_id, definition in load_template()["Resources"].items():
        if definition["Type"] != "AWS::CloudWatch::Alarm":
            continue
        if "Condition" in definition:
            raise ValueError(f"{logical_id} is conditional: teach the smoke check its condition")
        name = definition["Properties"]["AlarmName"]
        text = name.value if getattr(name, "tag", None) == "!Sub" else name
        if not isinstance(text, str):
            raise ValueError(f"{logical_id}'s AlarmName is not a !Sub string: {name!r}")
        alarms[_substituted(text, values, logical_id)] = logical_id
    return alarms


def _substituted(text: str, values: dict[str, str], logical_id: str) -> str:
    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise ValueError(f"{logical_id}'s AlarmName uses ${{{match.group(1)}}}")
        return values[match.group(1)]

    return re.sub(r"\$\{(?!!)([^}]+)\}", value, text)


def check_alarms(stack: Stack, target: SmokeTarget) -> list[Check]:
    """Every alarm template.yaml names exists (CloudWatch DescribeAlarms)."""
    expected = expected_alarms(stack)
    names = sorted(expected)
    found: set[str] = set()
    for start in range(0, len(names), 100):  # DescribeAlarms takes 100 names a call
        pages = target.cloudwatch.get_paginator("describe_alarms").paginate(
            AlarmNames=names[start : start + 100], AlarmTypes=["MetricAlarm", "CompositeAlarm"]
        )
        for page in pages:
            for alarm in page.get("MetricAlarms", []) + page.get("CompositeAlarms", []):
                found.add(alarm["AlarmName"])
    return [
        Check(
            "alarm",
            name,
            None if name in found else f"missing (template.yaml's {expected[name]})",
            "exists",
        )
        for name in names
    ]


def _unknown_roadmap() -> str:
    """A roadmap id no platform gives (and a new one each run)."""
    return f"content-retry-smoke-{uuid.uuid4().hex}"
