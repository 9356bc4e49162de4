"""``content-retry demo``: the seed's failure and its repair, end to end, on this machine.

It seeds, detects, retries and repairs through the handlers, then checks the end state.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, TextIO

from sqlalchemy import Engine, bindparam, delete, func, select

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generators import ContentGenerator, Generation
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences, RetryMessage
from content_retry.tables import content_tables, roadmap_metadata
from content_retry_local.bedrock_server import LocalBedrock
from content_retry_local.environment import LocalEnvironment
from content_retry_local.lambda_runtime import (
    DrainReport,
    drain,
    invoke,
    queue_depth,
    redrive,
)
from content_retry_local.project import project_path
from content_retry_local.seed import (
    SEED_ROADMAP_ID,
    SEED_USER_ID,
    old_status_only_rule,
    seed_scenario,
)
from content_retry_local.sessions import EngineSessions

CONTENT_TABLES = tuple(table.name for table in content_tables.values())
# Each content table's latest rows of the demo's roadmap, counted by status.
_LATEST_BY_STATUS = {
    table.name: select(table.c.content_status, func.count().label("n"))
    .where(table.c.roadmap_id == bindparam("r"), table.c.is_latest)
    .group_by(table.c.content_status)
    for table in content_tables.values()
}
_FRAMEWORK = select(roadmap_metadata.c.framework_data).where(
    roadmap_metadata.c.roadmap_id == bindparam("r")
)
_DELETE_ROADMAP = delete(roadmap_metadata).where(roadmap_metadata.c.roadmap_id == bindparam("r"))

# The query a user would run to see the repair (printed, not executed), with
# `content-retry sql --demo` (the demo's database) or psql.
CHECK_SQL = (
    "SELECT content_status, count(*) FROM tutorials "
    "WHERE roadmap_id = 'agent-performance-optimization-x5y9z2q8' AND is_latest "
    "GROUP BY content_status"
)
# The step 4 story, as the README tells it ("What the demo shows", 4).
CUT_STORY = "the 8th save loses its database connection"

# A drain pass ends at the first empty receive; records the worker returned with
# a delay (a throttled LLM) are then in flight, so the demo polls for them this
# often, and gives up when the queue has not moved for STALL_SECONDS.
POLL_SECONDS = 0.5
STALL_SECONDS = 120.0

# An LLM quota: tokens, and requests or None, a minute.
Quota = tuple[int, int | None]


class DemoGenerator:
    """The template generator, counting its calls (the demo's "LLM calls"), and
    cutting the worker's database connection once, just before one save."""

    def __init__(
        self,
        cut_connection: Callable[[], object],
        fail_on_call: int,
        inner: ContentGenerator | None = None,
    ) -> None:
        self.calls = 0
        self._inner = inner or TemplateGenerator()
        self.name = self._inner.name
        self._fail_on_call = fail_on_call
        self._cut_connection = cut_connection
        self._lock = threading.Lock()

    def generate(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> Generation:
        generation = self._inner.generate(concept, content_type, preferences)
        with self._lock:  # the worker makes its calls from several threads
            self.calls += 1
            cut = self.calls == self._fail_on_call
        if cut:
            self._cut_connection()
        return generation


@dataclass
class Demo:
    engine: Engine
    sqs: Any
    queue_url: str
    dlq_url: str
    out: TextIO = sys.stdout
    problems: list[str] = field(default_factory=list)
    stall_seconds: float = STALL_SECONDS

    def say(self, line: str = "") -> None:
        print(line, file=self.out, flush=True)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)
            self.say(f"   !! {problem}")

    def rows_by_status(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        with self.engine.connect() as connection:
            for table in CONTENT_TABLES:
                rows = connection.execute(_LATEST_BY_STATUS[table], {"r": SEED_ROADMAP_ID}).all()
                counts[table] = {row.content_status: row.n for row in rows}
        return counts

    def framework(self) -> dict[str, Any]:
        with self.engine.connect() as connection:
            framework: dict[str, Any] = connection.execute(
                _FRAMEWORK, {"r": SEED_ROADMAP_ID}
            ).scalar_one()
        return framework

    def progress(self, label: str, total: int) -> Any:
        def show(report: DrainReport, size: int, failed: int) -> None:
            done = min(report.succeeded, total) if total else report.succeeded
            width = 30
            filled = int(width * done / total) if total else width
            self.say(
                f"   {label} batch {report.batches:>2}: {size} record(s), {size - failed} done, "
                f"{failed} failed  [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
            )

        return show

    def drain_all(self, label: str, total: int, deps: Any) -> DrainReport:
        """Drain the retry queue until it holds no message, in flight included.

        One ``drain`` pass stops when a receive finds nothing visible, while
        records the worker returned with a delay (waiting for the LLM quota) may
        still be in flight: the demo waits for them and drains again, until the
        queue is empty or has not moved for ``stall_seconds`` (a problem).
        """
        show = self.progress(label, total)
        so_far = DrainReport()

        def on_batch(report: DrainReport, size: int, failed: int) -> None:
            show(_added(so_far, report), size, failed)

        left = queue_depth(self.sqs, self.queue_url)
        moved_at = time.monotonic()
        while left:
            report = drain(self.sqs, self.queue_url, on_batch=on_batch, deps=deps)
            so_far = _added(so_far, report)
            before, left = left, queue_depth(self.sqs, self.queue_url)
            if report.succeeded or left < before:
                moved_at = time.monotonic()
            elif left and time.monotonic() - moved_at > self.stall_seconds:
                self.check(
                    False,
                    f"{left} message(s) still on the retry queue, none done for "
                    f"{self.stall_seconds:.0f} s",
                )
                break
            if left:
                time.sleep(POLL_SECONDS)
        return so_far


def _added(first: DrainReport, second: DrainReport) -> DrainReport:
    return DrainReport(
        **{f.name: getattr(first, f.name) + getattr(second, f.name) for f in fields(DrainReport)}
    )


def _local_bedrock() -> LocalBedrock:
    """The local Bedrock this process started for the demo (--llm-latency)."""
    from content_retry.settings import get_settings

    endpoint = get_settings().aws_endpoint_url_bedrock_runtime
    bedrock = LocalBedrock.serving(endpoint) if endpoint else None
    if bedrock is None:
        raise ValueError("an LLM quota needs the local Bedrock the demo starts (--llm-latency)")
    return bedrock


@contextmanager
def _worker_told_quota(quota: Quota) -> Iterator[None]:
    """The worker is given the account's quota, as a deployment configures it."""
    from content_retry.settings import get_settings

    values = {"LLM_QUOTA_TOKENS_PER_MINUTE": str(quota[0])}
    if quota[1] is not None:
        values["LLM_QUOTA_REQUESTS_PER_MINUTE"] = str(quota[1])
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def _describe_quota(quota: Quota) -> str:
    tokens, requests = quota
    return f"{tokens} tokens" + (f" and {requests} requests" if requests else "") + " a minute"


def _quota_summary(bedrock: LocalBedrock, quota: Quota) -> str:
    """What the quota did: calls it throttled, tokens reserved and given back."""
    stats = bedrock.stats()
    by_requests = (
        f" ({stats.quota_throttled_requests} for requests a minute)"
        if stats.quota_throttled_requests
        else ""
    )
    least = bedrock.quota_limited_seconds(stats.total_tokens, stats.answered, burst=True)
    return (
        f"   LLM quota ({_describe_quota(quota)}): {stats.quota_throttled} of "
        f"{stats.requests} Converse requests throttled by it{by_requests}\n"
        f"     {stats.reserved_tokens} tokens reserved, {stats.released_tokens} given back; "
        f"its {stats.answered} answers need at least {least:.1f} s of it"
    )


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "none"


@dataclass(frozen=True)
class LookInside:
    """How the summary tells a person to look at the demo's database."""

    command: str = "content-retry"  # as the person ran it (.venv/bin/content-retry)
    kept: bool = False  # --keep: the database is left running for psql

    def lines(self, environment: LocalEnvironment) -> list[str]:
        lines = [
            f"   check it yourself (the demo's database, kept in {environment.data_dir}):",
            f'     {self.command} sql --demo "{CHECK_SQL}"',
        ]
        if self.kept and environment.data_dir is not None:
            from content_retry_local.postgres import running_server

            server = running_server(environment.data_dir)
            if server is not None:
                lines += [
                    f"     or, while it runs (--keep): psql '{server.psql_url}'",
                    f"     ({self.command} sql --demo opens one; {self.command} stop stops it)",
                ]
        return lines


def _usage_note(generator_name: str) -> str:
    """What the task's token counts mean for the generator that ran."""
    if generator_name == "template":
        return (
            "\n     (0 tokens: the template generator writes the content itself and calls no "
            "model,\n      so it has calls to count but no tokens; with --llm-latency the demo "
            "calls\n      Bedrock's Converse API, whose usage is counted here)"
        )
    return " (as the Converse API reported them)"


def run_demo(
    environment: LocalEnvironment,
    out: TextIO = sys.stdout,
    *,
    llm_quota: Quota | None = None,
    look_inside: LookInside | None = None,
) -> int:
    """Run the demo in its own local environment; returns the exit status.

    Args:
        llm_quota: tokens, and requests or None, a minute: the local Bedrock
            (started by the environment, ``llm_latency``) enforces this quota
            per model as Bedrock does, and the worker is told it.
        look_inside: how the summary says to query the demo's database.

    Raises:
        ValueError: the database or the queues are not ones this process
            started (the demo stages a fault; it never touches what it did not create),
            or a quota was given without the local Bedrock.
    """
    if not environment.all_its_own:
        raise ValueError(f"the demo runs only on what it started itself, not on {environment}")
    look_inside = look_inside or LookInside()
    if llm_quota is None:
        return _run_demo(environment, out, None, None, look_inside)
    bedrock = _local_bedrock()
    bedrock.set_quota(*llm_quota)
    with _worker_told_quota(llm_quota):
        return _run_demo(environment, out, bedrock, llm_quota, look_inside)


def _run_demo(
    environment: LocalEnvironment,
    out: TextIO,
    bedrock: LocalBedrock | None,
    llm_quota: Quota | None,
    look_inside: LookInside,
) -> int:
    from content_retry.aws import client
    from content_retry.database import get_engine
    from content_retry.settings import get_settings
    from content_retry.worker import default_worker_dependencies

    started = time.monotonic()
    settings = get_settings()
    engine = get_engine()
    worker_sessions = EngineSessions(engine)
    demo = Demo(
        engine=engine,
        sqs=client("sqs"),
        queue_url=settings.require("retry_queue_url"),
        dlq_url=settings.require("retry_dlq_url"),
        out=out,
    )
    say = demo.say
    if bedrock is not None and llm_quota is not None:
        # A throttled record may wait for a call's worth of quota; a few such waits
        # without progress, not one, mean the demo is stuck.
        demo.stall_seconds = max(
            STALL_SECONDS, 3 * 60 * 2 * settings.bedrock_max_tokens / llm_quota[0]
        )
        say(
            f"   LLM quota: {_describe_quota(llm_quota)} per model, enforced by the local "
            "Bedrock as Bedrock does\n   (a call reserves its input tokens plus maxTokens); "
            "the worker is told it, as a deployment is (LLM_QUOTA_*)"
        )
        say()

    # 1. The seed, fresh each run (the demo's roadmap only: nothing else is touched).
    with engine.begin() as connection:
        connection.execute(_DELETE_ROADMAP, {"r": SEED_ROADMAP_ID})
        scenario = seed_scenario(connection, other_failures=True)
    # Its own moto server, started empty: nothing to purge, nothing anyone else's.
    demo.check(
        queue_depth(demo.sqs, demo.queue_url) == 0 and queue_depth(demo.sqs, demo.dlq_url) == 0,
        "the demo's new queues should start empty",
    )
    before = demo.rows_by_status()
    framework = demo.framework()
    statuses = Counter(
        str(concept.get("content_status"))
        for stage in framework["stages"]
        for module in stage["modules"]
        for concept in module["concepts"]
        if concept["concept_id"] in scenario.lost_tutorials
    )
    say(f"1. The seed: roadmap {SEED_ROADMAP_ID}, 31 concepts, owner {SEED_USER_ID}")
    say(
        f"   tutorials: {len(scenario.completed_tutorials)} completed, "
        f"{len(scenario.lost_tutorials)} generated but never saved (no row; framework status "
        f"null {statuses['None']}, processing {statuses['processing']}, failed 0)"
    )
    say(
        f"   also: {len(scenario.failed_quizzes)} failed quizzes, "
        f"{len(scenario.failed_resources)} failed resource lists"
    )
    say()

    # 2. The old rule against the judge (planned in a transaction that is rolled back).
    from content_retry.plan.build import build_retry_plan

    old = old_status_only_rule(framework, "content_status")
    with engine.connect() as connection:
        plan = build_retry_plan(connection, SEED_ROADMAP_ID, ["tutorial"])
        connection.rollback()
    reasons = plan.count_by_reason()
    say("2. Which tutorials need a retry?")
    say(f'   the old worker\'s rule (content_status == "failed"):  {len(old)}')
    say(
        f"   the judge (no completed latest row):                 {plan.item_count} "
        f"(missing {reasons['missing']}, stale {reasons['stale']}, failed {reasons['failed']})"
    )
    demo.check(len(old) == 0, "the old rule should find 0")
    demo.check(plan.item_count == 21, f"the judge should find 21, found {plan.item_count}")
    say()

    # 3. The retry request, as API Gateway delivers it for the signed-in owner.
    event = json.loads(project_path("events/api-retry.json").read_text())
    say(f"3. POST /roadmaps/{SEED_ROADMAP_ID}/retry as {SEED_USER_ID} (events/api-retry.json)")
    response = invoke("detect", event)
    body = json.loads(response["body"])
    say(
        f"   -> {response['statusCode']} retried_count={body['retried_count']} "
        f"items={body['items']} reasons={body['reasons']}"
    )
    retried_count = body["retried_count"]
    task_id = body["task_id"]
    queued = queue_depth(demo.sqs, demo.queue_url)
    say(f"   {queued} messages on the retry queue (one per concept), task {task_id}")
    demo.check(response["statusCode"] == 202 and retried_count == 21, "expected 202, 21 items")
    say()

    # 4. Drain through the generate handler; one save loses its connection.
    configured = default_worker_dependencies()  # the template, or Bedrock (--llm-latency)
    generator = DemoGenerator(worker_sessions.terminate, fail_on_call=8, inner=configured.generator)
    worker = replace(configured, generator=generator)
    try:
        say(f"4. The generate function drains the queue ({CUT_STORY})")
        demo.drain_all("generate", queued, worker)
        dead = demo.sqs.receive_message(
            QueueUrl=demo.dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            VisibilityTimeout=0,
        ).get("Messages", [])
        say(f"   dead-letter queue: {len(dead)} message(s)")
        for message in dead:
            kept = RetryMessage.model_validate_json(message["Body"])
            reason = message["MessageAttributes"]["reason"]["StringValue"]
            title = (
                kept.generated.tutorial.title if kept.generated and kept.generated.tutorial else "-"
            )
            say(f'   - {kept.concept.concept_id} ({reason}), generated content kept: "{title}"')
        say(
            "   (the message whose save lost the connection, with the content it paid for; the "
            "invocation\n   then touched the database no more: any other message of its batch "
            "already generated\n   went there with its content too)"
        )
        # The invocation whose save lost its connection touches the database no
        # more (DESIGN §12): its other messages already generated are
        # dead-lettered with their content too, as many as finished after the cut.
        demo.check(
            bool(dead) and all(RetryMessage.model_validate_json(m["Body"]).generated for m in dead),
            "the messages whose save lost the connection should be dead-lettered "
            "with their content",
        )
        calls_before_redrive = generator.calls
        say()

        # 5. Re-drive: the content is saved without calling the LLM again.
        moved = redrive(demo.sqs, demo.dlq_url, demo.queue_url, use_move_task=False)
        say(f"5. Re-drive: {moved.moved} message(s) moved back ({moved.method}); draining again")
        demo.drain_all("re-drive", moved.moved, worker)
        say(
            f"   LLM calls before the re-drive: {calls_before_redrive}, after: {generator.calls} "
            f"(the saved content came from the message)"
        )
        demo.check(generator.calls == calls_before_redrive, "the re-drive must not call the LLM")
        say()

        # 6. The schedule sweep takes the failed quizzes and resource lists.
        sweep_event = json.loads(project_path("events/schedule-sweep.json").read_text())
        sweep = invoke("detect", sweep_event)
        say(f"6. The schedule sweep (events/schedule-sweep.json) -> {json.dumps(sweep)}")
        swept = queue_depth(demo.sqs, demo.queue_url)
        demo.drain_all("sweep", swept, worker)
        demo.check(sweep.get("retried_count") == 5, "the sweep should plan the 5 failed items")
        say()
    finally:
        worker_sessions.close()

    # The end state.
    after = demo.rows_by_status()
    from content_retry.tasks import read_task

    with engine.connect() as connection:
        found = read_task(connection, task_id)
    task = found[0] if found else None
    framework = demo.framework()
    concept_statuses = Counter(
        (key, concept.get(key))
        for stage in framework["stages"]
        for module in stage["modules"]
        for concept in module["concepts"]
        for key in ("content_status", "resources_status", "quiz_status")
    )
    dlq_depth = queue_depth(demo.sqs, demo.dlq_url)
    queue_left = queue_depth(demo.sqs, demo.queue_url)
    for table in CONTENT_TABLES:
        demo.check(after[table] == {"completed": 31}, f"{table}: expected 31 completed latest rows")
    demo.check(
        all(status == "completed" for (_, status) in concept_statuses.elements()),
        "every framework status should say completed",
    )
    demo.check(dlq_depth == 0 and queue_left == 0, "both queues should be empty")
    demo.check(task is not None and task.status == "completed", "the task should be completed")

    say("Summary")
    say(f"   retried_count={retried_count}")
    say(f"   {'latest rows by status':<28}{'before':<28}after")
    for table in CONTENT_TABLES:
        say(f"   {table:<28}{_format_counts(before[table]):<28}{_format_counts(after[table])}")
    say(
        f"   LLM calls: {generator.calls} ({calls_before_redrive} for the 21 tutorials, "
        f"0 for the re-drive, {generator.calls - calls_before_redrive} for the sweep)"
    )
    if bedrock is not None and llm_quota is not None:
        say(_quota_summary(bedrock, llm_quota))
    say(f"   DLQ depth: {dlq_depth}   retry queue depth: {queue_left}")
    if task is not None:
        say(f"   task {task.task_id}: {task.status} {task.counts.model_dump()}")
        say(
            f"   the task's LLM usage: {task.usage.llm_calls} calls, "
            f"{task.usage.input_tokens} input and {task.usage.output_tokens} output tokens"
            + _usage_note(generator.name)
        )
    for line in look_inside.lines(environment):
        say(line)
    say(f"   the steps above took {time.monotonic() - started:.1f} s (start-up not included)")
    if demo.problems:
        say(f"end state: WRONG ({len(demo.problems)} problem(s))")
        return 1
    say("end state: OK")
    return 0
