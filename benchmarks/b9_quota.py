"""B9: the LLM quota as a pool: a backlog drained at an account's quota, configured or learned.

What it measures: a roadmap of ``ITEMS`` lost tutorials (one item per message),
planned before the clock starts, drained by ``WORKERS`` generate workers, each
a process of its own with its own one-connection engine, as each Lambda
container is, taking batches of 5 (template.yaml's BatchSize) through the
generate handler, with ``GENERATE_PARALLELISM`` 8 (the template's; a batch of
5 one-item messages makes 5 calls at once). SQS is moto's server; the
records the handler returns stay in flight for the delay the worker set on
them (``ChangeMessageVisibility``), as Lambda's event source leaves them. The
LLM is the local Bedrock (``content_retry_local.bedrock_server``) answering in
``LATENCY`` s and enforcing an on-demand quota as Bedrock does: tokens and
requests per minute for the model, a call reserving its input tokens plus
``maxTokens`` when it starts (the unused part given back when it is done),
both buckets full at the start (a quiet account), refused at once with
``ThrottlingException`` beyond. The workers' Bedrock client is the function's
(adaptive retries, 2 attempts a call).

The quota is one fifth of the workers' unpaced demand: WORKERS x
min(GENERATE_PARALLELISM, BatchSize) calls at once / LATENCY, in requests a
minute, and times the tokens one call reserves (measured at the local Bedrock
on a short unpaced drain first, which also shows how close the workers come
to that demand on this machine), in tokens a minute. ``BEDROCK_MAX_TOKENS``
is 2048 here (the default is 4096) so that this quota, and the drain, stay
below the pace's starting guess without a quota (1,000,000 tokens a minute):
the learned run has to learn *down*.

Run twice, on fresh buckets each (a model id of its own): with the quota
configured for the workers (``LLM_QUOTA_TOKENS_PER_MINUTE`` and
``LLM_QUOTA_REQUESTS_PER_MINUTE`` set to the local Bedrock's), and learned
(both unset: the shared pace starts at its guess and learns from throttles).

The baseline, the quota's limit: ``quota_limited_seconds`` of the tokens the
calls let through reserved and their number. Both buckets start full, so the
first minute's worth goes at once: the limit of record counts it (``burst``),
the least time any caller can take from a fresh quota; the issue's plain
ratio (reserved tokens / quota, as if the buckets started empty) is printed
beside it, and is always a minute longer. Goals, per run: drain time (from the
workers' start to the last item ended in the ledger) <= 1.2x that limit;
calls the quota throttled <= 5% of the Converse requests (botocore's retries
included); 0 items failed or dead-lettered; <= 1.02 paid LLM calls per item
(``retry_items.llm_calls``). The shared bucket's pace is sampled from
``llm_quota_buckets`` every second and printed as a timeline.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from sqlalchemy import Engine, text

from benchmarks.b8_parallel_generation import _clients
from benchmarks.harness import BenchEnv, Result, quiet_powertools, say, settings_for
from content_retry.database import build_engine
from content_retry.settings import Settings
from content_retry_local.bedrock_server import BedrockStats, LocalBedrock, quota_limited_seconds

ID = "B9"
WHAT = "720 tutorials, 3 workers, a quota 1/5 of their demand: configured, then learned"
GOAL = "<=1.2x quota limit, <=5% throttled, 0 failed, <=1.02 calls/item"
DATABASE = "bench_b9"
WORKERS = 3
BATCH_SIZE = 5  # template.yaml's BatchSize
PARALLELISM = 8  # template.yaml's GENERATE_PARALLELISM
LATENCY = 0.5
MAX_TOKENS = 2048
ITEMS = 720
QUICK_ITEMS = 540
UNPACED_ITEMS = 90
DEMAND_SHARE = 5  # the quota is 1/DEMAND_SHARE of the unpaced demand
# Lambda's poller receives with the queue's visibility timeout (1800 s as
# deployed); a record the handler returns *without* a delay of its own would
# then stall the run for half an hour. Locally it comes back after this long,
# and is counted: it shows in the drain time instead of hiding it.
RETURN_VISIBILITY_SECONDS = 120
FUNCTION_TIMEOUT_SECONDS = 300  # template.yaml's GenerateFunction Timeout
SAMPLE_SECONDS = 1.0
GOAL_RATIO = 1.2
GOAL_THROTTLED = 0.05
GOAL_CALLS_PER_ITEM = 1.02

_ENDED = "('succeeded', 'failed', 'dead_lettered')"


# --------------------------------------------------------------------------- the workers


@dataclass(frozen=True)
class WorkerSetup:
    """What each worker process is given (picklable)."""

    url: str
    sqs_endpoint: str
    bedrock_endpoint: str
    queue_url: str
    dlq_url: str
    task_id: str
    items: int
    model_id: str
    max_tokens: int = MAX_TOKENS
    # The quota configured for the workers (tokens, requests a minute); None: learned.
    quota: tuple[int, int] | None = None
    settings: tuple[tuple[str, str], ...] = ()


class _SqsTally:
    """What the handler did on SQS besides answering: delays set on returned
    records, records sent back fresh (their last delivery waited for the quota)."""

    def __init__(self, sqs: Any, queue_url: str) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self.counts: Counter[str] = Counter()

    def _delay(self, http_response: Any, **_: Any) -> None:
        if http_response.status_code < 300:
            self.counts["delays_set"] += 1

    def _send(self, params: dict[str, Any], **_: Any) -> None:
        if params.get("QueueUrl") == self._queue_url:
            self.counts["requeued_fresh"] += 1
        else:
            self.counts["dead_letter_sends"] += 1

    def _hooks(self) -> list[tuple[str, Any]]:
        return [
            ("after-call.sqs.ChangeMessageVisibility", self._delay),
            ("before-parameter-build.sqs.SendMessage", self._send),
        ]

    def __enter__(self) -> _SqsTally:
        for name, hook in self._hooks():
            self._sqs.meta.events.register(name, hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, hook in self._hooks():
            self._sqs.meta.events.unregister(name, hook)


def _ended(engine: Engine, task_id: str) -> int:
    with engine.connect() as connection:
        count: int = connection.execute(
            text(f"SELECT count(*) FROM retry_items WHERE task_id = :t AND status IN {_ENDED}"),
            {"t": task_id},
        ).scalar_one()
    return count


def _worker_deps(setup: WorkerSetup, engine: Engine, sqs: Any, bedrock: Any) -> Any:
    from content_retry.generators.bedrock import BedrockGenerator
    from content_retry.worker import WorkerDependencies

    extra = dict(setup.settings)
    extra |= {
        "RETRY_QUEUE_URL": setup.queue_url,
        "RETRY_DLQ_URL": setup.dlq_url,
        "GENERATE_PARALLELISM": str(PARALLELISM),
    }
    if setup.quota is not None:
        extra["LLM_QUOTA_TOKENS_PER_MINUTE"] = str(setup.quota[0])
        extra["LLM_QUOTA_REQUESTS_PER_MINUTE"] = str(setup.quota[1])
    generator = BedrockGenerator(bedrock, setup.model_id, max_tokens=setup.max_tokens)
    return WorkerDependencies(engine, sqs, settings_for(setup.url, **extra), generator)


def _invoke(setup: WorkerSetup, deps: Any, sqs: Any, messages: list[dict[str, Any]]) -> int:
    """One invocation on a received batch, then what Lambda's event source does
    with its answer: delete the records not reported failed. Returns those failed."""
    from content_retry.worker import handle_retry_batch
    from content_retry_local.lambda_runtime import LocalLambdaContext, sqs_record

    records = [
        sqs_record(
            m["Body"],
            m["MessageId"],
            receipt_handle=m["ReceiptHandle"],
            receive_count=m.get("Attributes", {}).get("ApproximateReceiveCount", "1"),
        )
        for m in messages
    ]
    context = LocalLambdaContext(
        "content-retry-generate-b9", timeout_seconds=FUNCTION_TIMEOUT_SECONDS
    )
    response = handle_retry_batch({"Records": records}, context, deps)  # type: ignore[arg-type]
    failed = {failure["itemIdentifier"] for failure in response["batchItemFailures"]}
    done = [m for m in messages if m["MessageId"] not in failed]
    if done:
        sqs.delete_message_batch(
            QueueUrl=setup.queue_url,
            Entries=[
                {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done)
            ],
        )
    return len(failed)


def _poll(setup: WorkerSetup, deps: Any, engine: Engine, stop: Event, tally: _SqsTally) -> Any:
    """Lambda's poller loop until stopped; returns when this worker saw every item end."""
    done_at = None
    while not stop.is_set():
        messages = deps.sqs.receive_message(
            QueueUrl=setup.queue_url,
            MaxNumberOfMessages=BATCH_SIZE,
            VisibilityTimeout=RETURN_VISIBILITY_SECONDS,
            WaitTimeSeconds=1,
            AttributeNames=["ApproximateReceiveCount"],
        ).get("Messages", [])
        if not messages:
            continue
        tally.counts["returned"] += _invoke(setup, deps, deps.sqs, messages)
        tally.counts["batches"] += 1
        tally.counts["records"] += len(messages)
        if done_at is None and _ended(engine, setup.task_id) >= setup.items:
            done_at = time.monotonic()
    return done_at


def _worker(setup: WorkerSetup, ready: Any, go: Event, stop: Event, report: Queue[Any]) -> None:
    """One generate function container: warm, then Lambda's poller loop until stopped.
    An error stops every worker (the drain is then reported with it)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "testing")  # moto's and the local Bedrock's: none checked
    engine = build_engine(Settings(DATABASE_URL=setup.url))
    with engine.connect():
        pass
    sqs, bedrock = _clients(setup.sqs_endpoint, setup.bedrock_endpoint)
    deps = _worker_deps(setup, engine, sqs, bedrock)
    tally = _SqsTally(sqs, setup.queue_url)
    done_at, error = None, None
    with quiet_powertools(), tally:
        ready.release()
        go.wait()
        try:
            done_at = _poll(setup, deps, engine, stop, tally)
        except Exception as exc:  # reported, not lost in a child's stderr
            error = f"{type(exc).__name__}: {exc}"
            stop.set()
    engine.dispose()
    report.put({"done_at": done_at, "error": error, **tally.counts})


# --------------------------------------------------------------------------- one drain


@dataclass(frozen=True)
class Sample:
    """The shared pace and the account at one moment of a drain."""

    seconds: float
    tokens_per_minute: float | None
    requests_per_minute: float | None
    answered: int
    quota_throttled: int
    ended: int
    # Seconds since the shared bucket's last cut (a throttle reported), None: never cut.
    cut_seconds_ago: float | None = None


@dataclass
class DrainRun:
    """What one drain came to."""

    label: str
    items: int
    seconds: float
    stats: BedrockStats
    quota: tuple[int, int] | None
    statuses: dict[str, int]
    llm_calls: int
    saved_rows: int
    saved_concepts: int
    dead_letters: int
    # Errors that stopped a worker (the drain did not end).
    errors: list[str]
    # The tokens the shared pace takes a call (the generator's estimate), on average.
    paced_per_call: float
    workers: list[dict[str, Any]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def limit(self, *, burst: bool) -> float:
        """The quota's limit for the calls let through: reserved tokens and requests."""
        if self.quota is None:
            return 0.0
        return quota_limited_seconds(
            self.stats.reserved_tokens,
            self.stats.answered,
            tokens_per_minute=self.quota[0],
            requests_per_minute=self.quota[1],
            burst=burst,
        )

    @property
    def throttled_share(self) -> float:
        return self.stats.quota_throttled / max(self.stats.requests, 1)

    @property
    def calls_per_item(self) -> float:
        return self.llm_calls / self.items

    @property
    def failed_or_dead(self) -> int:
        return (
            self.statuses.get("failed", 0)
            + self.statuses.get("dead_lettered", 0)
            + self.dead_letters
        )

    def worker_total(self, name: str) -> int:
        return sum(int(worker.get(name, 0)) for worker in self.workers)


@dataclass(frozen=True)
class Stage:
    """Where a drain runs: the database, moto's endpoint and the local Bedrock."""

    url: str
    sqs_endpoint: str
    bedrock: LocalBedrock


def _queue_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", label)[:70]


@dataclass(frozen=True)
class Planned:
    roadmap_id: str
    task_id: str
    queue_url: str
    dlq_url: str
    bodies: list[str]


def _sent_bodies(sqs: Any) -> tuple[list[str], Any]:
    """The message bodies ``sqs`` sends in batches (a list filled as they go), and its hook."""
    bodies: list[str] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        bodies.extend(entry["MessageBody"] for entry in params.get("Entries", []))

    return bodies, hook


def _plan(stage: Stage, sqs: Any, label: str, items: int) -> Planned:
    """A roadmap of ``items`` lost tutorials, planned through detect's start_retry."""
    from benchmarks.data import add_lost_tutorials_roadmap
    from content_retry.retries import DetectDependencies, start_retry
    from content_retry_local.template import create_queues

    queue_url, dlq_url = create_queues(sqs, prefix=_queue_name(f"b9-{label}"))
    roadmap_id = _queue_name(f"b9-{label}-roadmap")
    engine = build_engine(Settings(DATABASE_URL=stage.url))
    try:
        with engine.begin() as connection:
            connection.execute(
                text("DELETE FROM roadmap_metadata WHERE roadmap_id = :r"), {"r": roadmap_id}
            )
            add_lost_tutorials_roadmap(connection, roadmap_id, items)
        settings = settings_for(stage.url, RETRY_QUEUE_URL=queue_url, RETRY_DLQ_URL=dlq_url)
        bodies, hook = _sent_bodies(sqs)
        sqs.meta.events.register("before-parameter-build.sqs.SendMessageBatch", hook)
        with quiet_powertools():
            outcome = start_retry(
                DetectDependencies(engine, sqs, settings),
                roadmap_id,
                content_types=["tutorial"],
                trigger="invoke",
            )
        sqs.meta.events.unregister("before-parameter-build.sqs.SendMessageBatch", hook)
    finally:
        engine.dispose()
    assert outcome.retried_count == items, outcome
    assert outcome.task_id is not None, outcome
    return Planned(roadmap_id, outcome.task_id, queue_url, dlq_url, bodies)


def paced_reservation(bedrock: LocalBedrock, bodies: list[str], max_tokens: int) -> float:
    """The tokens the shared pace takes for one call, on average over the planned
    messages: the generator's own estimate (``reservation``), which must not be
    below what Bedrock counts, so it is above it."""
    from content_retry.content_types import ContentType
    from content_retry.generators.bedrock import BedrockGenerator
    from content_retry.messages import RetryMessage

    generator = BedrockGenerator(bedrock.client(), "local.estimate", max_tokens=max_tokens)
    messages = [RetryMessage.model_validate_json(body) for body in bodies]
    estimates = [
        generator.reservation(m.concept, ContentType(item.content_type), m.preferences)
        for m in messages
        for item in m.items
    ]
    return sum(estimates) / len(estimates)


def _sample(engine: Engine, bedrock: LocalBedrock, setup: WorkerSetup, began: float) -> Sample:
    with engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT tokens_per_minute, requests_per_minute, "
                "extract(epoch FROM clock_timestamp() - throttled_at) "
                "FROM llm_quota_buckets WHERE model_id = :m"
            ),
            {"m": setup.model_id},
        ).one_or_none()
    stats = bedrock.stats()
    return Sample(
        time.monotonic() - began,
        None if row is None else float(row[0]),
        None if row is None else float(row[1]),
        stats.answered,
        stats.quota_throttled,
        _ended(engine, setup.task_id),
        None if row is None or row[2] is None else float(row[2]),
    )


def _watch(
    engine: Engine,
    bedrock: LocalBedrock,
    setup: WorkerSetup,
    stop: Event,
    *,
    began: float,
    timeout: float,
) -> list[Sample]:
    """Sample the pace every SAMPLE_SECONDS until every item ended, a worker
    stopped them all (an error), or ``timeout``."""
    samples = [_sample(engine, bedrock, setup, began)]
    while samples[-1].ended < setup.items and samples[-1].seconds < timeout:
        if stop.wait(SAMPLE_SECONDS):
            break
        samples.append(_sample(engine, bedrock, setup, began))
    return samples


def _ledger(engine: Engine, roadmap_id: str, task_id: str) -> tuple[dict[str, int], int, int, int]:
    """Items by status, their paid LLM calls, and the tutorial rows saved (rows, concepts)."""
    with engine.connect() as connection:
        statuses = {
            str(status): int(count)
            for status, count in connection.execute(
                text("SELECT status, count(*) FROM retry_items WHERE task_id = :t GROUP BY status"),
                {"t": task_id},
            )
        }
        llm_calls = connection.execute(
            text("SELECT coalesce(sum(llm_calls), 0) FROM retry_items WHERE task_id = :t"),
            {"t": task_id},
        ).scalar_one()
        rows, concepts = connection.execute(
            text(
                "SELECT count(*), count(DISTINCT concept_id) FROM tutorials WHERE roadmap_id = :r"
            ),
            {"r": roadmap_id},
        ).one()
    return statuses, int(llm_calls), int(rows), int(concepts)


@contextlib.contextmanager
def _workers(setup: WorkerSetup, count: int) -> Iterator[tuple[Event, Event, Queue[Any]]]:
    """``count`` warm worker processes; yields (go, stop, report) and joins them after."""
    processes = multiprocessing.get_context("spawn")
    ready, go, stop, report = (
        processes.Semaphore(0),
        processes.Event(),
        processes.Event(),
        processes.Queue(),
    )
    workers = [
        processes.Process(target=_worker, args=(setup, ready, go, stop, report))
        for _ in range(count)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:  # every container warm before the clock starts
            assert ready.acquire(timeout=120), "a worker did not start"
        yield go, stop, report
    finally:
        stop.set()
        go.set()
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.terminate()


def drain_at_quota(
    stage: Stage,
    *,
    label: str,
    items: int,
    workers: int = WORKERS,
    quota: tuple[int, int] | None,
    configured: bool,
    max_tokens: int = MAX_TOKENS,
    timeout: float = 600.0,
    settings: dict[str, str] | None = None,
) -> DrainRun:
    """Plan ``items`` tutorials and drain them with ``workers`` worker processes
    against the local Bedrock at ``quota`` (tokens, requests a minute; None: no
    quota), told to the workers when ``configured``. The model id is the label's,
    so its buckets (the local Bedrock's and the shared pace's) start fresh."""
    import boto3

    sqs = boto3.client(
        "sqs",
        endpoint_url=stage.sqs_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    planned = _plan(stage, sqs, label, items)
    setup = WorkerSetup(
        stage.url,
        stage.sqs_endpoint,
        stage.bedrock.endpoint,
        planned.queue_url,
        planned.dlq_url,
        planned.task_id,
        items,
        model_id=f"local.b9-{_queue_name(label)}",
        max_tokens=max_tokens,
        quota=quota if configured else None,
        settings=tuple((settings or {}).items()),
    )
    stage.bedrock.set_quota(*(quota or (None, None)))
    engine = build_engine(Settings(DATABASE_URL=stage.url))
    try:
        with _workers(setup, workers) as (go, stop, report):
            stage.bedrock.reset_stats()
            began = time.monotonic()
            go.set()
            samples = _watch(engine, stage.bedrock, setup, stop, began=began, timeout=timeout)
            stop.set()
            reports = [report.get(timeout=120) for _ in range(workers)]
        stats = stage.bedrock.stats()
        statuses, llm_calls, rows, concepts = _ledger(engine, planned.roadmap_id, planned.task_id)
    finally:
        engine.dispose()
    from content_retry_local.lambda_runtime import queue_depth

    done_at = [r["done_at"] for r in reports if r["done_at"] is not None]
    return DrainRun(
        label=label,
        items=items,
        seconds=(min(done_at) - began) if done_at else samples[-1].seconds,
        stats=stats,
        quota=quota,
        statuses=statuses,
        llm_calls=llm_calls,
        saved_rows=rows,
        saved_concepts=concepts,
        dead_letters=queue_depth(sqs, planned.dlq_url),
        errors=[r["error"] for r in reports if r["error"]],
        paced_per_call=paced_reservation(stage.bedrock, planned.bodies, max_tokens),
        workers=reports,
        samples=samples,
    )


# --------------------------------------------------------------------------- the benchmark


def demand_per_minute(workers: int, latency: float) -> float:
    """Calls a minute the workers ask for unpaced: each batch's calls at once."""
    return workers * min(PARALLELISM, BATCH_SIZE) / latency * 60


def quota_for(workers: int, latency: float, reserved_per_call: float) -> tuple[int, int]:
    """One DEMAND_SHARE-th of the unpaced demand: (tokens, requests) a minute."""
    calls = demand_per_minute(workers, latency) / DEMAND_SHARE
    return round(calls * reserved_per_call), round(calls)


def _timeline(run: DrainRun) -> None:
    """The shared pace every 5 s: its rate in calls a minute (the slower of its
    token rate at its estimate of a call and its request rate), when it was last
    cut, and what got through."""
    reserved_per_call = run.paced_per_call
    previous: Sample | None = None
    for sample in run.samples:
        if previous is not None and sample.seconds - previous.seconds < 4.5:
            continue
        if sample.tokens_per_minute is None or sample.requests_per_minute is None:
            pace = "no bucket yet"
        else:
            calls = min(sample.tokens_per_minute / reserved_per_call, sample.requests_per_minute)
            cut = (
                "never cut"
                if sample.cut_seconds_ago is None
                else f"cut {sample.cut_seconds_ago:.0f}s ago"
            )
            pace = (
                f"pace {calls:4.0f} calls/min ({sample.tokens_per_minute / 1000:5.0f}k TPM, "
                f"{sample.requests_per_minute:4.0f} RPM; {cut})"
            )
        rate = ""
        if previous is not None:
            window = sample.seconds - previous.seconds
            rate = f", {(sample.answered - previous.answered) / window * 60:4.0f} answered/min"
        say(
            f"    t={sample.seconds:5.1f}s {pace}{rate}; throttled so far "
            f"{sample.quota_throttled}; items ended {sample.ended}"
        )
        previous = sample


def _report(run: DrainRun) -> bool:
    burst, flat = run.limit(burst=True), run.limit(burst=False)
    ratio = run.seconds / burst
    met = (
        ratio <= GOAL_RATIO
        and run.throttled_share <= GOAL_THROTTLED
        and run.failed_or_dead == 0
        and run.calls_per_item <= GOAL_CALLS_PER_ITEM
    )
    stats = run.stats
    say(
        f"{run.label}: {run.items} items drained in {run.seconds:.1f} s = {ratio:.2f}x the "
        f"quota's limit of {burst:.1f} s (first minute's worth at once; goal <= {GOAL_RATIO}x); "
        f"{run.seconds / flat:.2f}x the plain reserved tokens / quota ({flat:.1f} s)"
    )
    say(
        f"  throttled by the quota: {stats.quota_throttled} of {stats.requests} Converse "
        f"requests = {run.throttled_share:.1%} (goal <= 5%; {stats.quota_throttled_requests} by "
        f"requests/min; botocore retries {stats.retries}); reserved {stats.reserved_tokens:,} "
        f"tokens for {stats.answered} answers ({stats.reserved_tokens / stats.answered:.0f} a "
        f"call; the pace's estimate {run.paced_per_call:.0f})"
    )
    say(
        f"  ledger: {run.statuses}; failed or dead-lettered {run.failed_or_dead} (goal 0; DLQ "
        f"{run.dead_letters}); paid LLM calls {run.llm_calls} = {run.calls_per_item:.3f} per "
        f"item (goal <= 1.02); tutorial rows {run.saved_rows} for {run.saved_concepts} concepts"
    )
    say(
        f"  workers: {run.worker_total('batches')} invocations, "
        f"{run.worker_total('returned')} records returned ({run.worker_total('delays_set')} with "
        f"a delay set, {run.worker_total('requeued_fresh')} re-sent fresh on their last delivery)"
    )
    return met


def _unpaced(stage: Stage) -> tuple[float, float]:
    """A short drain without a quota: the tokens one call reserves, and the calls
    a minute the workers made."""
    run = drain_at_quota(stage, label="unpaced", items=UNPACED_ITEMS, quota=None, configured=False)
    if run.errors:
        raise RuntimeError(f"unpaced: a worker failed: {run.errors[0]}")
    per_call = run.stats.reserved_tokens / run.stats.answered
    return per_call, run.stats.answered / run.seconds * 60


def run(env: BenchEnv) -> Result:
    from content_retry.pacing import GUESSED_TOKENS_PER_MINUTE
    from content_retry_local.aws import start_threaded_moto

    url = env.postgres.create_database(DATABASE)
    items = QUICK_ITEMS if env.quick else ITEMS
    moto_endpoint, moto = start_threaded_moto()
    runs: list[DrainRun] = []
    try:
        with LocalBedrock(latency=LATENCY) as bedrock:
            stage = Stage(url, moto_endpoint, bedrock)
            per_call, measured = _unpaced(stage)
            demand = demand_per_minute(WORKERS, LATENCY)
            quota = quota_for(WORKERS, LATENCY, per_call)
            say(
                f"demand: {WORKERS} workers x min(GENERATE_PARALLELISM {PARALLELISM}, batch "
                f"{BATCH_SIZE}) calls at once / {LATENCY} s = {demand:.0f} calls/min x "
                f"{per_call:.0f} tokens reserved a call (input + maxTokens {MAX_TOKENS}, measured "
                f"at the local Bedrock) = {demand * per_call:,.0f} tokens/min; an unpaced drain "
                f"of {UNPACED_ITEMS} items made {measured:.0f} calls/min ({measured / demand:.0%})"
            )
            say(
                f"quota (1/{DEMAND_SHARE}): {quota[0]:,} tokens/min and {quota[1]} requests/min "
                f"per model (the pace's guess without one: {GUESSED_TOKENS_PER_MINUTE:,} "
                "tokens/min)"
            )
            verdicts = []
            for label, configured in (("configured", True), ("learned", False)):
                drained = drain_at_quota(
                    stage, label=label, items=items, quota=quota, configured=configured
                )
                if drained.errors:
                    raise RuntimeError(f"{label}: a worker failed: {drained.errors[0]}")
                runs.append(drained)
                verdicts.append(_report(drained))
                _timeline(drained)
    finally:
        moto.stop()
    measured_text = "; ".join(
        f"{r.label} {r.seconds / r.limit(burst=True):.2f}x, {r.throttled_share:.1%} thr, "
        f"{r.failed_or_dead} failed, {r.calls_per_item:.2f} c/i"
        for r in runs
    )
    return Result(ID, WHAT, GOAL, measured_text, all(verdicts))
