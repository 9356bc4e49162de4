"""``content-retry smoke``: its checks run against the local runtime's resources.

A stack record in moto's CloudFormation names them as a deployed stack's outputs
would: the queues the local runtime creates from template.yaml (on moto's
server), the local HTTP API (``content-retry serve``), the detect handler run in
this process on the test's PostgreSQL, and the alarms template.yaml names (in
moto's CloudWatch). Only the transport of an invoke differs from AWS: the checks
themselves, and the clients and HTTP they use, are the ones run against AWS.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
from sqlalchemy import Connection, Engine, text

from content_retry_local import cli, smoke
from content_retry_local.aws import start_threaded_moto
from content_retry_local.http_api import make_server
from content_retry_local.lambda_runtime import invoke as invoke_handler
from content_retry_local.seed import seed_scenario
from content_retry_local.smoke import Check, Invocation, SmokeTarget, run_smoke
from content_retry_local.template import create_queues, load_template
from tests import support

STAGE = "smoke"
REGION = "us-east-1"
API_FUNCTION = "content-retry-smoke-ApiFunction-AbC123"
DETECT_FUNCTION = "content-retry-smoke-DetectFunction-DeF456"


def template_alarm_names(stage: str) -> list[str]:
    """The alarms template.yaml creates for ``stage``, read from it here (not by
    the code under test)."""
    return sorted(
        definition["Properties"]["AlarmName"].value.replace("${Stage}", stage)
        for definition in load_template()["Resources"].values()
        if definition["Type"] == "AWS::CloudWatch::Alarm"
    )


def local_invoker(functions: dict[str, str]) -> Callable[[str, dict[str, Any]], Invocation]:
    """Lambda's Invoke for the local runtime: the function names the stack's outputs
    give, run by the local runtime's handler; an exception is Lambda's FunctionError."""

    def invoke(function: str, event: dict[str, Any]) -> Invocation:
        if function not in functions:
            raise LookupError(f"Function not found: {function}")
        try:
            return Invocation(invoke_handler(functions[function], event))
        except Exception as exc:
            return Invocation(
                {"errorType": type(exc).__name__, "errorMessage": str(exc)}, "Unhandled"
            )

    return invoke


@dataclass
class LocalDeployment:
    """The local runtime's resources, and a stack record naming them."""

    endpoint: str
    api_url: str
    queue_url: str
    dlq_url: str
    target: SmokeTarget
    stacks: list[str] = field(default_factory=list)

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION)

    def outputs(self, **changed: str) -> dict[str, str]:
        return {
            "ApiUrl": self.api_url,
            "RetryQueueUrl": self.queue_url,
            "RetryDlqUrl": self.dlq_url,
            "ApiFunctionName": API_FUNCTION,
            "DetectFunctionName": DETECT_FUNCTION,
            **changed,
        }

    def register_stack(self, name: str, outputs: dict[str, str]) -> str:
        """A stack record in moto's CloudFormation with these outputs and the Stage."""
        parameters = {"Stage": STAGE, **outputs}
        record = {
            "Parameters": {key: {"Type": "String"} for key in parameters},
            # A stack needs a resource; the record's is a marker, nothing the checks read.
            "Resources": {
                "Record": {
                    "Type": "AWS::SSM::Parameter",
                    "Properties": {"Name": f"/{name}/record", "Type": "String", "Value": name},
                }
            },
            "Outputs": {key: {"Value": {"Ref": key}} for key in outputs},
        }
        self.client("cloudformation").create_stack(
            StackName=name,
            TemplateBody=json.dumps(record),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        )
        self.stacks.append(name)
        return name


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler] | ThreadingHTTPServer) -> Iterator[str]:
    server = (
        handler
        if isinstance(handler, ThreadingHTTPServer)
        else ThreadingHTTPServer(("127.0.0.1", 0), handler)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def reset_moto(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    endpoint, moto = start_threaded_moto()
    yield endpoint
    moto.stop()


@pytest.fixture
def deployment(
    moto_endpoint: str, env: pytest.MonkeyPatch, db: Engine
) -> Iterator[LocalDeployment]:
    """moto's server with the local runtime's queues and template.yaml's alarms, the
    local API without identity, and the handlers' environment pointing at them."""
    endpoint = moto_endpoint
    # moto's backends are the process's: start from none of another test's stacks,
    # queues or alarms, and leave none behind.
    reset_moto(endpoint)
    env.setenv("AWS_ENDPOINT_URL", endpoint)
    support.reset_process_caches()
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name=REGION)
    queue_url, dlq_url = create_queues(sqs, prefix=f"content-retry-{STAGE}")
    env.setenv("RETRY_QUEUE_URL", queue_url)
    env.setenv("RETRY_DLQ_URL", dlq_url)
    support.reset_process_caches()
    cloudwatch = boto3.client("cloudwatch", endpoint_url=endpoint, region_name=REGION)
    for name in template_alarm_names(STAGE):
        cloudwatch.put_metric_alarm(
            AlarmName=name,
            Namespace="AWS/Lambda",
            MetricName="Errors",
            Statistic="Sum",
            Period=300,
            EvaluationPeriods=1,
            Threshold=0,
            ComparisonOperator="GreaterThanThreshold",
        )
    target = SmokeTarget(
        cloudformation=boto3.client("cloudformation", endpoint_url=endpoint, region_name=REGION),
        sqs=sqs,
        cloudwatch=cloudwatch,
        invoke=local_invoker({API_FUNCTION: "detect", DETECT_FUNCTION: "detect"}),
        http_status=smoke.http_status,
    )
    with http_server(make_server(0, dev_identity=False)) as api_url:
        yield LocalDeployment(endpoint, api_url, queue_url, dlq_url, target)
    reset_moto(endpoint)
    support.reset_process_caches()


def failed(checks: list[Check]) -> list[str]:
    return [str(check) for check in checks if not check.passed]


def test_a_healthy_deployment_passes_every_check_and_nothing_is_planned(
    deployment: LocalDeployment, connection: Connection
) -> None:
    # GIVEN a deployment whose database holds roadmaps that need work
    seed_scenario(connection)
    connection.commit()
    stack = deployment.register_stack("content-retry-smoke", deployment.outputs())

    # WHEN the smoke check runs against it
    checks = run_smoke(stack, deployment.target)

    # THEN every check passes: the stack, both API routes, both detect functions
    # (each reached the database), both queues, and each of the template's alarms
    assert failed(checks) == []
    assert [check.what for check in checks] == [
        "stack",
        *["api"] * 2,
        *["detect"] * 2,
        *["queue"] * 2,
        *["alarm"] * len(template_alarm_names(STAGE)),
    ]
    assert {check.where for check in checks if check.what == "alarm"} == set(
        template_alarm_names(STAGE)
    )
    assert "content-retry-smoke-dead-letters" in template_alarm_names(STAGE)
    # AND it changed nothing: no task, no claim, no message
    for table in ("retry_tasks", "retry_items"):
        assert connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0
    sqs = deployment.client("sqs")
    for url in (deployment.queue_url, deployment.dlq_url):
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attributes["ApproximateNumberOfMessages"] == "0"


class AcceptsAnyone(BaseHTTPRequestHandler):
    """An API that forgot its authorizer: 200 to anyone."""

    def _ok(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _ok

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _dlq_keeps_messages_4_days(deployment: LocalDeployment) -> tuple[str, str]:
    deployment.client("sqs").set_queue_attributes(
        QueueUrl=deployment.dlq_url, Attributes={"MessageRetentionPeriod": "345600"}
    )
    return deployment.dlq_url, "MessageRetentionPeriod is 345600, template.yaml says 1209600"


def _redrive_after_3_receives(deployment: LocalDeployment) -> tuple[str, str]:
    sqs = deployment.client("sqs")
    dlq_arn = sqs.get_queue_attributes(QueueUrl=deployment.dlq_url, AttributeNames=["QueueArn"])
    policy = {"deadLetterTargetArn": dlq_arn["Attributes"]["QueueArn"], "maxReceiveCount": 3}
    sqs.set_queue_attributes(
        QueueUrl=deployment.queue_url, Attributes={"RedrivePolicy": json.dumps(policy)}
    )
    return deployment.queue_url, "RedrivePolicy"


def _an_alarm_deleted(deployment: LocalDeployment) -> tuple[str, str]:
    name = f"content-retry-{STAGE}-detect-errors"
    deployment.client("cloudwatch").delete_alarms(AlarmNames=[name])
    return name, "missing (template.yaml's DetectErrorsAlarm)"


FAULTS: dict[str, Callable[[LocalDeployment], tuple[str, str]]] = {
    "dlq-retention": _dlq_keeps_messages_4_days,
    "redrive-policy": _redrive_after_3_receives,
    "alarm-missing": _an_alarm_deleted,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_fails_its_check_in_one_line_naming_what_and_where(
    deployment: LocalDeployment, fault: str
) -> None:
    # GIVEN a deployment with one fault
    stack = deployment.register_stack("content-retry-smoke", deployment.outputs())
    where, problem = FAULTS[fault](deployment)

    # WHEN the smoke check runs
    lines = failed(run_smoke(stack, deployment.target))

    # THEN exactly that check fails, its line naming where and what
    assert len(lines) == 1, lines
    assert lines[0].startswith("FAIL")
    assert where in lines[0]
    assert problem in lines[0]


def test_an_api_without_sign_in_fails_both_route_checks(deployment: LocalDeployment) -> None:
    # GIVEN an API that answers anyone
    with http_server(AcceptsAnyone) as open_api:
        stack = deployment.register_stack(
            "content-retry-smoke", deployment.outputs(ApiUrl=open_api)
        )

        # WHEN the smoke check runs
        lines = failed(run_smoke(stack, deployment.target))

    # THEN each route's check fails, naming its URL
    assert len(lines) == 2, lines
    assert all(re.match(rf"FAIL  api {re.escape(open_api)}/", line) for line in lines)
    assert all("answered 200, not 401 or 403" in line for line in lines)


def test_a_detect_function_that_cannot_reach_the_database_fails_its_check(
    deployment: LocalDeployment, env: pytest.MonkeyPatch
) -> None:
    # GIVEN the functions' database refusing connections (nothing listens there)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env.setenv("DATABASE_URL", f"postgresql://nobody:secret@127.0.0.1:{port}/roadmaps")
    support.reset_process_caches()
    stack = deployment.register_stack("content-retry-smoke", deployment.outputs())

    # WHEN the smoke check runs
    lines = failed(run_smoke(stack, deployment.target))

    # THEN both detect functions' checks fail: they answered 503, not the judge's 404
    assert [line.split(" ", 4)[2:4] for line in lines] == [
        ["detect", "ApiFunctionName"],
        ["detect", "DetectFunctionName"],
    ]
    assert all("answered 503" in line for line in lines)


def test_a_missing_function_or_output_fails_in_one_line(deployment: LocalDeployment) -> None:
    # GIVEN a stack whose sweep function the account lacks, and one from an older template
    missing = deployment.register_stack(
        "content-retry-smoke", deployment.outputs(DetectFunctionName="no-such-function")
    )
    outputs = deployment.outputs()
    del outputs["ApiFunctionName"]
    older = deployment.register_stack("content-retry-older", outputs)

    # WHEN the smoke check runs on each
    # THEN the one check fails, saying why
    [line] = failed(run_smoke(missing, deployment.target))
    assert line.startswith("FAIL  detect DetectFunctionName no-such-function: cannot be invoked")
    [line] = failed(run_smoke(older, deployment.target))
    assert "no output ApiFunctionName" in line


def run_command(*arguments: str) -> tuple[int, str]:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = cli.main(["smoke", *arguments])
    return status, output.getvalue()


def test_the_command_exits_0_when_all_pass_and_1_with_a_line_per_failure(
    deployment: LocalDeployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the stack record, and the command's AWS pointed at moto's server
    stack = deployment.register_stack("content-retry-smoke", deployment.outputs())

    # WHEN the command runs with the local runtime's functions
    aws_target = smoke.aws_target
    monkeypatch.setattr(smoke, "aws_target", lambda region: deployment.target)
    passed, report = run_command("--stack", stack)
    monkeypatch.setattr(smoke, "aws_target", aws_target)
    # AND with AWS's own Lambda (moto's, which has no such functions)
    functions_missing, lines = run_command("--stack", stack, "--region", REGION)
    # AND for a stack that does not exist
    absent, nothing = run_command("--stack", "content-retry-nowhere", "--region", REGION)

    # THEN 0 when every check passes; 1 with one FAIL line per failed check
    assert passed == 0
    assert "FAIL" not in report
    checks = 1 + 2 + 2 + 2 + len(template_alarm_names(STAGE))  # stack, api, detect, queues, alarms
    assert report.splitlines()[-1] == f"smoke {stack}: {checks} passed, 0 failed"
    assert functions_missing == 1
    fails = [line for line in lines.splitlines() if line.startswith("FAIL")]
    assert [line.split()[2] for line in fails] == ["ApiFunctionName", "DetectFunctionName"]
    assert absent == 1
    assert [line for line in nothing.splitlines() if line.startswith("FAIL")] == [
        "FAIL  stack content-retry-nowhere: cannot be read: no stack content-retry-nowhere "
        "in this account and Region"
    ]


def test_the_stack_outputs_the_checks_read_are_the_templates() -> None:
    outputs = load_template()["Outputs"]

    for key in (smoke.API_URL, smoke.QUEUE_URL, smoke.DLQ_URL, *smoke.DETECT_FUNCTIONS):
        assert key in outputs, key
    assert outputs["ApiFunctionName"]["Value"].value == "ApiFunction"
    assert outputs["DetectFunctionName"]["Value"].value == "DetectFunction"
    assert smoke.trigger_alias() == "live"
