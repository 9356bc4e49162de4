"""template.yaml's alarms and dashboard held against AWS, the code and the runbook.

Every metric an alarm watches or the dashboard shows is one that exists: an AWS
metric with the dimensions its namespace has, pointing at this template's own
queue, function, API or proxy; or one the code emits (``add_metric`` calls in
``content_retry``, read from the source) with the dimensions the code gives it.
Every alarm notifies the topic when one is set, and its description names a
section of docs/OPERATIONS.md that exists.
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from content_retry.content_types import ContentType
from content_retry.observability import NAMESPACE, SERVICE
from content_retry_local.template import load_template, resource
from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "layers" / "common" / "content_retry"
RUNBOOK = REPO_ROOT / "docs" / "OPERATIONS.md"
DASHBOARD = "OperationsDashboard"

# The AWS metrics this template may use, and the dimension sets their namespace
# publishes them with (CloudWatch's metric references for SQS, Lambda, API
# Gateway REST APIs and RDS Proxy).
AWS_METRICS: dict[str, tuple[frozenset[str], tuple[frozenset[str], ...]]] = {
    "AWS/SQS": (
        frozenset(
            {
                "ApproximateAgeOfOldestMessage",
                "ApproximateNumberOfMessagesDelayed",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesVisible",
                "NumberOfEmptyReceives",
                "NumberOfMessagesDeleted",
                "NumberOfMessagesReceived",
                "NumberOfMessagesSent",
                "SentMessageSize",
            }
        ),
        (frozenset({"QueueName"}),),
    ),
    "AWS/Lambda": (
        frozenset(
            {
                "ConcurrentExecutions",
                "Duration",
                "Errors",
                "Invocations",
                "Throttles",
            }
        ),
        (frozenset({"FunctionName"}), frozenset({"FunctionName", "Resource"})),
    ),
    "AWS/ApiGateway": (
        frozenset({"4XXError", "5XXError", "Count", "IntegrationLatency", "Latency"}),
        (
            frozenset({"ApiName"}),
            frozenset({"ApiName", "Stage"}),
            frozenset({"ApiName", "Method", "Resource", "Stage"}),
        ),
    ),
    "AWS/RDS": (
        frozenset(
            {
                "ClientConnections",
                "DatabaseConnections",
                "DatabaseConnectionsBorrowLatency",
                "DatabaseConnectionsCurrentlySessionPinned",
                "MaxDatabaseConnectionsAllowed",
            }
        ),
        (frozenset({"ProxyName"}),),
    ),
}

# The application's metrics (DESIGN §11) and the dimensions each carries besides
# the service Powertools adds to all of them.
PER_CONTENT_TYPE = frozenset({"LLMCalls", "LLMThrottles", "InputTokens", "OutputTokens"})


@dataclass(frozen=True)
class Metric:
    """One metric as an alarm or a widget names it; values as ``<Sub variable>``."""

    namespace: str
    name: str
    dimensions: tuple[tuple[str, str], ...]
    where: str
    stat: str | None = None

    @property
    def dimension_map(self) -> dict[str, str]:
        return dict(self.dimensions)

    def __str__(self) -> str:
        return f"{self.where}: {self.namespace} {self.name} {self.dimension_map}"


# --- the template, read --------------------------------------------------------


def _placeholders(text: str) -> str:
    """A !Sub string with each ``${X}`` as ``<X>`` (``${!X}`` is a literal ``${X}``)."""
    return re.sub(r"\$\{(?!!)([^}]+)\}", r"<\1>", text)


def canonical(value: Any) -> str:
    """An intrinsic or a string as the text !Sub would have: ``!Ref X`` is ``<X>``."""
    if isinstance(value, str):
        return value
    tag, inner = value.tag, value.value
    if tag == "!Ref":
        return f"<{inner}>"
    if tag == "!GetAtt":
        return "<" + (inner if isinstance(inner, str) else ".".join(inner)) + ">"
    if tag == "!Sub" and isinstance(inner, str):
        return _placeholders(inner)
    raise AssertionError(f"an intrinsic the tests do not read: {value!r}")


def resources_of_type(type_: str) -> set[str]:
    return {
        logical_id
        for logical_id, definition in load_template()["Resources"].items()
        if definition["Type"] == type_
    }


def alarms() -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource(logical_id)["Properties"]
        for logical_id in sorted(resources_of_type("AWS::CloudWatch::Alarm"))
    }


def alarm_metrics(logical_id: str, properties: dict[str, Any]) -> list[Metric]:
    """The metrics an alarm watches: its own, or those of its metric-math queries."""
    where = f"alarm {logical_id}"
    if "MetricName" in properties:
        stat = properties.get("Statistic") or properties.get("ExtendedStatistic")
        return [_alarm_metric(properties, where, stat)]
    return [
        _alarm_metric(query["MetricStat"]["Metric"], where, query["MetricStat"]["Stat"])
        for query in properties["Metrics"]
        if "MetricStat" in query
    ]


def _alarm_metric(definition: dict[str, Any], where: str, stat: str | None) -> Metric:
    dimensions = tuple(
        (dimension["Name"], canonical(dimension["Value"]))
        for dimension in definition.get("Dimensions", [])
    )
    return Metric(definition["Namespace"], definition["MetricName"], dimensions, where, stat)


def dashboard_body() -> dict[str, Any]:
    """The DashboardBody as deployed: !Sub's variables replaced by placeholders
    (``<X>`` in strings; ``1`` for the Number parameters it puts in as numbers)."""
    body = resource(DASHBOARD)["Properties"]["DashboardBody"]
    assert body.tag == "!Sub" and isinstance(body.value, str), "one !Sub string"
    numbers = {
        name
        for name, parameter in load_template()["Parameters"].items()
        if parameter["Type"] == "Number"
    }
    text = re.sub(
        r"\$\{(?!!)([^}]+)\}",
        lambda match: "1" if match.group(1) in numbers else f"<{match.group(1)}>",
        body.value,
    )
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def widgets(type_: str) -> list[dict[str, Any]]:
    return [widget for widget in dashboard_body()["widgets"] if widget["type"] == type_]


def dashboard_metrics() -> list[Metric]:
    """Every metric a widget shows (metric-math expressions left out)."""
    found = []
    for widget in widgets("metric"):
        properties = widget["properties"]
        where = f"widget {properties.get('title')!r}"
        previous: list[Any] = []
        for entry in properties["metrics"]:
            options = entry[-1] if isinstance(entry[-1], dict) else {}
            names = [part for part in entry if not isinstance(part, dict)]
            if not names:  # an expression: [{"expression": ...}]
                continue
            # "." repeats the previous metric's part at that position.
            names = [previous[index] if part == "." else part for index, part in enumerate(names)]
            previous = names
            namespace, name, *pairs = names
            dimensions = tuple(zip(pairs[0::2], pairs[1::2], strict=True))
            stat = options.get("stat", properties.get("stat"))
            found.append(Metric(namespace, name, dimensions, where, stat))
    return found


def all_metrics() -> list[Metric]:
    alarm_watched = [
        metric
        for logical_id, properties in alarms().items()
        for metric in alarm_metrics(logical_id, properties)
    ]
    return alarm_watched + dashboard_metrics()


# --- the code, read ------------------------------------------------------------


@dataclass
class CodeMetrics:
    """What ``content_retry`` emits, read from its source (it is not run)."""

    names: set[str] = field(default_factory=set)
    dimensions: set[str] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)
    log_events: set[str] = field(default_factory=set)


def _strings(node: ast.AST | None) -> set[str]:
    """The string literals a constant expression holds (a tuple, a set, a dict's keys)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return set().union(*(_strings(element) for element in node.elts))
    if isinstance(node, ast.Dict):
        return set().union(*(_strings(key) for key in node.keys))
    if isinstance(node, ast.Call) and len(node.args) == 1:  # frozenset({...}), tuple([...])
        return _strings(node.args[0])
    return set()


def _assignments(body: list[ast.stmt]) -> Iterator[tuple[str, ast.expr | None]]:
    for statement in body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    yield target.id, statement.value
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            yield statement.target.id, statement.value


def _called(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    if isinstance(node.func, ast.Name):
        return node.func.id
    return None


def _argument(node: ast.Call, keyword: str, position: int = 0) -> ast.expr | None:
    for argument in node.keywords:
        if argument.arg == keyword:
            return argument.value
    return node.args[position] if len(node.args) > position else None


class _PackageReader:
    """Reads ``add_metric``/``single_metric`` names through literals, module- or
    class-level constants (a registry, an enum), and one function parameter."""

    def __init__(self, paths: list[Path]) -> None:
        self.trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in paths}
        self.constants: dict[str, set[str]] = defaultdict(set)
        self.registry: set[str] = set()
        for tree in self.trees.values():
            self._index(tree)

    def _index(self, tree: ast.Module) -> None:
        bodies: list[tuple[str, list[ast.stmt]]] = [("", tree.body)]
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bodies.append((node.name, node.body))
        for owner, body in bodies:
            for name, value in _assignments(body):
                strings = _strings(value)
                self.constants[name] |= strings
                # A registry of metric names: METRICS = (...), class MetricName(StrEnum).
                if "metric" in name.lower() or "metric" in owner.lower():
                    self.registry |= strings

    def resolve(self, node: ast.expr | None, function: ast.AST | None) -> set[str] | None:
        """The strings an argument can be, or None when the source does not say."""
        if node is None:
            return None
        if literal := _strings(node):
            return literal
        if isinstance(node, ast.Attribute) and node.attr == "value":  # Enum.MEMBER.value
            return self.resolve(node.value, function)
        if isinstance(node, ast.Attribute):
            return self.constants.get(node.attr) or None
        if isinstance(node, ast.Name):
            if node.id in self.constants:
                return self.constants[node.id] or None
            return self._through_parameter(node.id, function)
        return None

    def _through_parameter(self, name: str, function: ast.AST | None) -> set[str] | None:
        """A helper's parameter: the literals its callers pass for it."""
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            return None
        parameters = [argument.arg for argument in function.args.args]
        if name not in parameters:
            return None
        position = parameters.index(name) - (1 if parameters[:1] in (["self"], ["cls"]) else 0)
        found: set[str] = set()
        for tree in self.trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and _called(node) == function.name:
                    found |= _strings(_argument(node, name, position))
        return found or None


def read_code_metrics(package: Path = PACKAGE) -> CodeMetrics:
    reader = _PackageReader(sorted(package.rglob("*.py")))
    code = CodeMetrics(names=set(reader.registry))
    for path, tree in reader.trees.items():
        functions = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        enclosing = {id(inner): function for function in functions for inner in ast.walk(function)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = _called(node)
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            if called in ("add_metric", "single_metric"):
                names = reader.resolve(_argument(node, "name"), enclosing.get(id(node)))
                if names is None:
                    code.unreadable.append(where)
                else:
                    code.names |= names
            elif called == "add_dimension":
                code.dimensions |= reader.resolve(_argument(node, "name"), None) or set()
            elif called == "set_default_dimensions":
                code.dimensions |= {argument.arg for argument in node.keywords if argument.arg}
            elif called in ("Metrics", "EphemeralMetrics", "single_metric") and any(
                argument.arg == "service" for argument in node.keywords
            ):
                code.dimensions.add("service")  # Powertools adds it to every metric
            elif (
                isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
                and node.func.attr in ("debug", "info", "warning", "error", "exception", "critical")
            ):
                code.log_events |= _strings(_argument(node, "msg"))
    return code


CODE = read_code_metrics()


def _collected_metrics() -> list[Metric]:
    """all_metrics() for parametrizing: a body that does not parse fails its own
    test below instead of the collection of this whole module."""
    try:
        return all_metrics()
    except (json.JSONDecodeError, AssertionError, KeyError, TypeError, ValueError):
        return []


def _application_metric_names() -> list[str]:
    return sorted({metric.name for metric in _collected_metrics() if metric.namespace == NAMESPACE})


# --- the metrics exist ---------------------------------------------------------


def test_the_code_reader_finds_the_metrics_it_should() -> None:
    # GIVEN metrics the code is known to emit since DESIGN §11
    known = {"ItemsPlanned", "ItemsSaved", "ItemsFailed", "SaveFailures", "ItemsDeadLettered"}

    # WHEN the package is read
    code = read_code_metrics()

    # THEN the reader sees them, and every metric call it met was one it could read
    assert known <= code.names
    assert "service" in code.dimensions
    assert code.unreadable == [], "metric names the test cannot read: use a literal or a constant"


@pytest.mark.parametrize("name", _application_metric_names())
def test_every_application_metric_shown_or_alarmed_on_is_emitted_by_the_code(name: str) -> None:
    # GIVEN a ContentRetry metric the dashboard shows or an alarm watches
    # WHEN the code's metric names are read from content_retry's source
    emitted = CODE.names

    # THEN the code emits it (a name it does not emit would be an empty graph)
    assert name in emitted, f"{name} is not emitted by layers/common/content_retry"


@pytest.mark.parametrize("metric", _collected_metrics(), ids=str)
def test_every_metric_has_its_namespace_dimensions(metric: Metric) -> None:
    # GIVEN a metric an alarm watches or a widget shows
    dimensions = metric.dimension_map

    # WHEN its namespace is the application's or AWS's
    # THEN its name and dimensions are ones that namespace has, pointing at this stack
    if metric.namespace == NAMESPACE:
        expected = {"service", "ContentType"} if metric.name in PER_CONTENT_TYPE else {"service"}
        assert set(dimensions) == expected
        assert set(dimensions) <= CODE.dimensions, "a dimension the code does not add"
        assert dimensions["service"] == SERVICE
        if "ContentType" in dimensions:
            assert dimensions["ContentType"] in {content_type.value for content_type in ContentType}
        return
    assert metric.namespace in AWS_METRICS, f"unknown namespace {metric.namespace}"
    names, dimension_sets = AWS_METRICS[metric.namespace]
    assert metric.name in names
    assert frozenset(dimensions) in dimension_sets
    for name, value in dimensions.items():
        _assert_dimension_is_this_stacks(name, value)


def _assert_dimension_is_this_stacks(name: str, value: str) -> None:
    if name == "QueueName":
        match = re.fullmatch(r"<(\w+)\.QueueName>", value)
        assert match and match.group(1) in resources_of_type("AWS::SQS::Queue"), value
    elif name == "FunctionName":
        match = re.fullmatch(r"<(\w+)>", value)
        assert match and match.group(1) in resources_of_type("AWS::Serverless::Function"), value
    elif name == "ApiName":
        api_names = {
            canonical(resource(api)["Properties"]["Name"])
            for api in resources_of_type("AWS::Serverless::Api")
        }
        assert value in api_names, f"{value} is not the name of the stack's API ({api_names})"
    elif name == "Stage":
        assert value == canonical(resource("RetryApi")["Properties"]["StageName"])
    elif name == "ProxyName":
        match = re.fullmatch(r"<(\w+)>", value)
        assert match and match.group(1) in resources_of_type("AWS::RDS::DBProxy"), value


# --- the alarms ----------------------------------------------------------------


def _runbook_anchors() -> set[str]:
    """The anchors GitHub gives docs/OPERATIONS.md's headings."""
    anchors = set()
    in_code = False
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        in_code ^= line.startswith("```")
        if not in_code and (match := re.match(r"#{1,6}\s+(.*)", line)):
            heading = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(heading.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("logical_id", sorted(alarms()))
def test_every_alarm_description_names_a_runbook_section(logical_id: str) -> None:
    # GIVEN an alarm's description, as the page shows it
    description = canonical(alarms()[logical_id]["AlarmDescription"])

    # WHEN the runbook section it names is looked for
    sections = re.findall(r"docs/OPERATIONS\.md#([\w-]+)", description)

    # THEN it names one, the runbook has it, and the description fits CloudWatch's limit
    assert sections, "no docs/OPERATIONS.md#section in the description"
    assert set(sections) <= _runbook_anchors()
    assert len(description) <= 1024


@pytest.mark.parametrize("logical_id", sorted(alarms()))
def test_every_alarm_notifies_the_topic_when_one_is_set(logical_id: str) -> None:
    # GIVEN an alarm
    properties = alarms()[logical_id]

    # WHEN its actions are read
    # THEN on ALARM and on OK it notifies AlarmTopicArn when given, and nothing otherwise
    for actions in ("AlarmActions", "OKActions"):
        value = properties[actions]
        assert value.tag == "!If"
        condition, when_set, when_not = value.value
        assert condition == "HasAlarmTopic"
        assert [canonical(arn) for arn in when_set] == ["<AlarmTopicArn>"]
        assert canonical(when_not) == "<AWS::NoValue>"
    assert properties.get("ActionsEnabled", True) is True


def test_the_alarms_are_the_ones_the_on_call_engineer_needs() -> None:
    # GIVEN the alarms' metrics
    watched = {
        (metric.namespace, metric.name, metric.dimensions)
        for logical_id, properties in alarms().items()
        for metric in alarm_metrics(logical_id, properties)
    }

    # WHEN the pipeline's failure modes are listed
    needed = {
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible", (("QueueName", "<RetryDLQ.QueueName>"),)),
        ("AWS/SQS", "ApproximateAgeOfOldestMessage", (("QueueName", "<RetryQueue.QueueName>"),)),
        ("AWS/Lambda", "Errors", (("FunctionName", "<GenerateFunction>"),)),
        # the sweep's failures (the API function's show as the API's 5xx)
        ("AWS/Lambda", "Errors", (("FunctionName", "<DetectFunction>"),)),
        ("AWS/Lambda", "Throttles", (("FunctionName", "<GenerateFunction>"),)),
        (
            "AWS/ApiGateway",
            "5XXError",
            (("ApiName", "content-retry-<Stage>"), ("Stage", "<Stage>")),
        ),
        (NAMESPACE, "GenerateConfigurationError", (("service", SERVICE),)),
    }

    # THEN an alarm watches each
    assert needed <= watched


def test_the_queue_age_alarm_compares_minutes_with_the_parameter() -> None:
    # GIVEN the alarm on the retry queue's oldest message
    properties = resource("RetryQueueAgeAlarm")["Properties"]
    queries = {query["Id"]: query for query in properties["Metrics"]}

    # WHEN its returned expression and threshold are read
    returned = [query for query in queries.values() if query.get("ReturnData", True)]

    # THEN SQS's seconds become minutes, compared with OldestMessageAlarmMinutes
    assert [query["Expression"] for query in returned] == ["age / 60"]
    assert queries["age"]["MetricStat"]["Metric"]["MetricName"] == "ApproximateAgeOfOldestMessage"
    assert canonical(properties["Threshold"]) == "<OldestMessageAlarmMinutes>"
    assert load_template()["Parameters"]["OldestMessageAlarmMinutes"]["Default"] == 30
    assert properties["ComparisonOperator"] == "GreaterThanThreshold"


def test_the_dead_letter_alarm_fires_when_the_dlq_holds_a_message() -> None:
    # GIVEN the dead-letter alarm
    properties = resource("DeadLetterAlarm")["Properties"]

    # WHEN its condition is read
    condition = (
        properties["Statistic"],
        properties["Threshold"],
        properties["ComparisonOperator"],
        properties["EvaluationPeriods"],
    )

    # THEN one message, visible for one minute, is enough
    assert condition == ("Maximum", 0, "GreaterThanThreshold", 1)


def test_the_configuration_error_alarm_fires_on_any_occurrence() -> None:
    # GIVEN the alarm on the records generate returns because Bedrock refuses its
    # configuration (access denied, model not found, request rejected as a whole)
    logical_id = "GenerateConfigurationErrorAlarm"
    properties = resource(logical_id)["Properties"]
    [metric] = alarm_metrics(logical_id, properties)

    # WHEN its metric and condition are read
    condition = (
        properties["Statistic"],
        properties["Period"],
        properties["EvaluationPeriods"],
        properties["Threshold"],
        properties["ComparisonOperator"],
        properties["TreatMissingData"],
    )

    # THEN one returned record in 5 minutes pages, on the metric the worker emits, and
    # the page names the runbook's section for it and the event to read
    assert (metric.namespace, metric.name, metric.dimension_map) == (
        NAMESPACE,
        "GenerateConfigurationError",
        {"service": SERVICE},
    )
    assert condition == ("Sum", 300, 1, 1, "GreaterThanOrEqualToThreshold", "notBreaching")
    description = canonical(properties["AlarmDescription"])
    assert "docs/OPERATIONS.md#generate-configuration-error" in description
    assert "retry_generate_configuration_error" in description
    assert f"<{logical_id}.Arn>" in {
        arn for widget in widgets("alarm") for arn in widget["properties"]["alarms"]
    }


# --- the dashboard -------------------------------------------------------------


def test_the_dashboard_body_is_json_with_only_known_variables() -> None:
    # GIVEN the dashboard's !Sub body
    template = load_template()
    body = resource(DASHBOARD)["Properties"]["DashboardBody"].value
    variables = set(re.findall(r"\$\{(?!!)([^}]+)\}", body))

    # WHEN its variables are checked and it is parsed with placeholders in their place
    known = set(template["Parameters"]) | set(template["Resources"])
    unknown = {
        variable
        for variable in variables
        if not variable.startswith("AWS::") and variable.split(".")[0] not in known
    }
    parsed = dashboard_body()

    # THEN every variable is a parameter, a resource (or its attribute) or a pseudo
    # parameter, and the body is a dashboard with one dashboard per stage
    assert unknown == set()
    assert parsed["widgets"]
    assert canonical(resource(DASHBOARD)["Properties"]["DashboardName"]) == "content-retry-<Stage>"


def test_every_widget_is_titled_and_every_section_explains_healthy() -> None:
    # GIVEN the dashboard's widgets
    graphs = widgets("metric")
    notes = [widget["properties"]["markdown"] for widget in widgets("text")]

    # WHEN their titles and notes are read
    untitled = [graph for graph in graphs if not graph["properties"].get("title")]
    explained = [note for note in notes if "Healthy" in note]

    # THEN each graph has a title, and each section a note saying what healthy looks like
    assert untitled == []
    assert len(explained) >= 5
    for graph in graphs:
        assert graph["properties"]["region"] == "<AWS::Region>"


def test_every_alarm_is_on_the_dashboard() -> None:
    # GIVEN the dashboard's alarm widgets
    shown = {arn for widget in widgets("alarm") for arn in widget["properties"]["alarms"]}

    # WHEN they are compared with the template's alarms
    expected = {f"<{logical_id}.Arn>" for logical_id in alarms()}

    # THEN each alarm's state is on the page
    assert shown == expected


def _required_on_dashboard() -> list[tuple[str, str, dict[str, str], str | None]]:
    api = {"ApiName": "content-retry-<Stage>", "Stage": "<Stage>"}
    service = {"service": SERVICE}
    required: list[tuple[str, str, dict[str, str], str | None]] = [
        ("AWS/SQS", name, {"QueueName": "<RetryQueue.QueueName>"}, None)
        for name in (
            "ApproximateNumberOfMessagesVisible",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateAgeOfOldestMessage",
        )
    ]
    required.append(
        (
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            {"QueueName": "<RetryDLQ.QueueName>"},
            None,
        )
    )
    for name in ("ItemsPlanned", "ItemsSaved", "ItemsFailed", "ItemsDeadLettered", "SaveFailures"):
        required.append((NAMESPACE, name, service, None))
    required.append((NAMESPACE, "SweepBacklog", service, None))
    # The LLM quota's pacing, and the configuration errors its alarm pages on.
    required.append((NAMESPACE, "LLMCallsPaced", service, None))
    required.append((NAMESPACE, "GenerateConfigurationError", service, None))
    for name in sorted(PER_CONTENT_TYPE):
        for content_type in ContentType:
            required.append((NAMESPACE, name, {**service, "ContentType": content_type.value}, None))
    for function in sorted(f"<{name}>" for name in resources_of_type("AWS::Serverless::Function")):
        dimensions = {"FunctionName": function}
        for name in ("Errors", "Throttles", "ConcurrentExecutions"):
            required.append(("AWS/Lambda", name, dimensions, None))
        for stat in ("p50", "p99"):
            required.append(("AWS/Lambda", "Duration", dimensions, stat))
    required += [
        ("AWS/ApiGateway", "4XXError", api, None),
        ("AWS/ApiGateway", "5XXError", api, None),
        ("AWS/ApiGateway", "Latency", api, "p50"),
        ("AWS/ApiGateway", "Latency", api, "p99"),
    ]
    return required


@pytest.mark.parametrize(
    ("namespace", "name", "dimensions", "stat"),
    _required_on_dashboard(),
    ids=[
        "-".join([name, *dimensions.values(), *([stat] if stat else [])])
        for _, name, dimensions, stat in _required_on_dashboard()
    ],
)
def test_the_dashboard_shows_what_the_on_call_engineer_needs(
    namespace: str, name: str, dimensions: dict[str, str], stat: str | None
) -> None:
    # GIVEN what the dashboard shows
    shown = dashboard_metrics()

    # WHEN a metric the pipeline's health is read from is looked for
    found = [
        metric
        for metric in shown
        if (metric.namespace, metric.name, metric.dimension_map) == (namespace, name, dimensions)
        and (stat is None or metric.stat == stat)
    ]

    # THEN a widget shows it
    assert found, f"no widget shows {namespace} {name} {dimensions} {stat or ''}"


# --- the runbook ---------------------------------------------------------------


def test_the_runbooks_queries_name_events_the_code_logs() -> None:
    # GIVEN the Logs Insights queries of the runbook
    runbook = RUNBOOK.read_text(encoding="utf-8")
    queried = set(re.findall(r'message\s*=\s*"([a-z_]+)"', runbook))
    for listed in re.findall(r"message\s+in\s+\[([^\]]*)\]", runbook):
        queried |= set(re.findall(r'"([a-z_]+)"', listed))

    # WHEN they are compared with the events the code logs
    unknown = queried - CODE.log_events

    # THEN each is an event the code logs (a query for an unknown one finds nothing, silently)
    assert queried, "the runbook has no query"
    assert unknown == set()


def test_the_runbook_names_the_stacks_log_groups_and_dashboard() -> None:
    # GIVEN the runbook and the template's names
    runbook = RUNBOOK.read_text(encoding="utf-8")
    log_groups = [
        canonical(resource(group)["Properties"]["LogGroupName"]).replace("<Stage>", "$STAGE")
        for group in ("DetectLogGroup", "GenerateLogGroup")
    ]

    # WHEN they are looked for in the runbook
    # THEN the runbook uses the names the template deploys
    for log_group in log_groups:
        assert log_group in runbook
    assert "content-retry-$STAGE" in runbook


# Names the runbook may give in backticks that are neither the code's metrics nor
# template.yaml's parameters, resources or outputs: AWS's own (API actions, the
# errors Bedrock answers with), and a parameter the template no longer has, named
# for the stacks that still do.
RUNBOOK_OTHER_NAMES = frozenset(
    {
        NAMESPACE,
        "ChangeMessageVisibility",
        "StartMessageMoveTask",
        "ThrottlingException",
        "AccessDeniedException",
        "ResourceNotFoundException",
        "ValidationException",
        "UnrecognizedClientException",
        "ExpiredTokenException",
        "InvalidSignatureException",
        "DetectMaxConcurrency",
    }
)


def _runbook() -> str:
    return RUNBOOK.read_text(encoding="utf-8")


def _runbook_section(heading: str) -> str:
    """The text under a heading of the runbook, up to the next heading of its
    level or above (a ``#`` line in a code block is a comment, not a heading)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = _runbook().splitlines()
    start = lines.index(heading) + 1
    in_code = False
    for number in range(start, len(lines)):
        in_code ^= lines[number].startswith("```")
        if not in_code and re.match(rf"#{{1,{level}}}\s", lines[number]):
            return "\n".join(lines[start:number])
    return "\n".join(lines[start:])


def _backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def _sql_tables() -> set[str]:
    """The tables the code reads and writes: the schema's one declaration."""
    from content_retry.tables import metadata

    return set(metadata.tables)


def _dead_letter_reasons(package: Path = PACKAGE) -> set[str]:
    """The reasons the code dead-letters with: the literal ``reason`` of each
    ``DeadLetter(...)``, and what ``last_delivery_reason`` returns."""
    reasons: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _called(node) == "DeadLetter":
                reasons |= _strings(_argument(node, "reason", 1))
            elif isinstance(node, ast.FunctionDef) and node.name == "last_delivery_reason":
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Return):
                        reasons |= _strings(inner.value)
    return reasons


def test_the_runbooks_links_lead_to_its_sections() -> None:
    # GIVEN the runbook's links to its own sections
    links = set(re.findall(r"\]\(#([^)\s]+)\)", _runbook()))

    # WHEN they are compared with the anchors of its headings
    broken = links - _runbook_anchors()

    # THEN each leads somewhere (a renamed heading breaks no link silently)
    assert links
    assert broken == set()


def test_every_event_the_runbook_names_is_one_the_code_logs() -> None:
    # GIVEN the log events the runbook's prose and tables name (its tables left out)
    named = {
        name for name in _backticked(_runbook()) if re.fullmatch(r"(retry|api|llm)_[a-z_]+", name)
    } - _sql_tables()

    # WHEN they are compared with the events the code logs
    unknown = named - CODE.log_events

    # THEN each is logged: an operator looking for it finds it
    assert "retry_dead_letters_redriven" in named
    assert unknown == set()


def test_every_name_the_runbook_gives_exists() -> None:
    # GIVEN the CamelCase names in the runbook's backticks (metrics, parameters,
    # resources, outputs)
    names = {
        name
        for name in _backticked(_runbook())
        if re.fullmatch(r"[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)*", name)
    }
    template = load_template()

    # WHEN they are compared with the code's metrics, the template's names and AWS's
    known = (
        CODE.names
        | set(template["Parameters"])
        | set(template["Resources"])
        | set(template["Outputs"])
        | RUNBOOK_OTHER_NAMES
    )

    # THEN each exists (a metric the code does not emit would be an empty search)
    assert {"DeadLettersRedriven", "SweepBacklog", "ClaimsExpired"} <= names
    assert names - known == set()


def test_the_runbook_lists_every_alarm_by_its_name() -> None:
    # GIVEN the runbook's row of alarm names and the template's alarms
    [row] = [line for line in _runbook().splitlines() if line.startswith("| alarms |")]
    listed = set(re.findall(r"`(?:content-retry-\$STAGE)?(-[a-z0-9-]+)`", row))

    # WHEN the template's alarm names are read with the stage left out
    deployed = {
        canonical(properties["AlarmName"]).removeprefix("content-retry-<Stage>")
        for properties in alarms().values()
    }

    # THEN the runbook lists exactly the alarms the stack deploys
    assert listed == deployed


def test_the_runbooks_shell_reads_outputs_the_stack_has_and_rolls_back_every_function() -> None:
    # GIVEN the runbook's shell set-up and its rolling-back section
    shell = _runbook_section("## Set up your shell")
    rolling_back = _runbook_section("## Rolling back")
    outputs = load_template()["Outputs"]

    # WHEN the outputs it reads are compared with the template's
    read = dict(re.findall(r"(\w+)=\$\(output (\w+)\)", shell))
    used = set(re.findall(r"\boutput ([A-Z]\w+)", _runbook()))
    functions = {name for name in outputs if name.endswith("FunctionName")}

    # THEN every output it reads exists, each function's name has its variable,
    # and rolling back points every function's live alias back
    assert used <= set(outputs)
    assert functions <= set(read.values())
    for variable, output in read.items():
        if output in functions:
            assert f'"${variable}"' in rolling_back, f"{output} is not rolled back"


def test_the_runbook_explains_every_dead_letter_reason() -> None:
    # GIVEN the reasons the code dead-letters with and the runbook's table of them
    reasons = _dead_letter_reasons()
    section = _runbook_section("### Dead-letter queue holds messages")
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    explained = rows - {"reason"}  # the header's

    # WHEN they are compared
    # THEN each reason has its row, and the table has no reason the code never gives
    assert {"save_failed", "retries_exhausted", "configuration"} <= reasons
    assert explained == reasons
