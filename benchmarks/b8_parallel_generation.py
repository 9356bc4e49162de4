"""B8: API call to last saved item at the LLM's latency: parallelism 1 against the default.

What it measures: the demo's scenario planned in one API call for every
content type (26 items in 23 messages), then consumed by 5 concurrent
generate workers taking batches of 5 from the queue, as the SQS event source
with BatchSize 5 and MaximumConcurrency 5 would. Each worker is a process of
its own with its own one-connection engine, as each Lambda container is; they
are warm (connection open, clients made) when the API call is made, as a
backlog finds them. The LLM is the local Bedrock
(``content_retry_local.bedrock_server``, a process of its own) answering every
Converse call in 2 s, through the real botocore client configured as the
function's: tool use, usage, adaptive retries; SQS is moto's server. Timed:
from the detect handler's call (the scenario is seeded before the clock
starts) to the moment the ledger holds every item saved. The workers start
polling when detect has enqueued the plan, so they take full batches, as the
event source's batching window (5 s in template.yaml) gathers them; the window
itself is not waited out: in AWS a batch the window cannot fill (the last 3
messages here) waits up to those 5 s before its invocation, which B8 leaves
out because no setting of the function changes it. Also reported:
Lambda-billed seconds (the sum of the generate invocations' durations, by the
millisecond) per saved item.

Run alternately in one run: ``GENERATE_PARALLELISM=1`` (each batch's calls one
after another, as before) and the default (8). The baseline of the second
goal is the latency limit: the longest any worker had to wait for the model,
the sum over its batches of (the batch's items / parallelism, rounded up) x
the latency.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from sqlalchemy import Engine, text

from benchmarks.harness import BenchEnv, Result, quiet_powertools, say, settings_for
from content_retry.aws import BEDROCK_MAX_ATTEMPTS
from content_retry.database import build_engine
from content_retry.settings import Settings

ID = "B8"
WHAT = "API call to last saved item, 26 items at 2 s a call: parallelism 1 vs 8"
GOAL = ">=5x faster than parallelism 1; <=1.5x the latency limit"
DATABASE = "bench_b8"
LATENCY = 2.0
WORKERS = 5
BATCH_SIZE = 5
ITEMS = 26
MODEL = "local.b8-v1"


@dataclass
class RunResult:
    seconds: float
    detect_seconds: float
    first_batch_seconds: float
    billed_seconds: float
    latency_limit: float
    batches: list[int] = field(default_factory=list)


@contextlib.contextmanager
def _local_bedrock_process(latency: float) -> Iterator[str]:
    """The local Bedrock in a process of its own, as Bedrock is not in the function's:
    its work (answers, JSON) does not compete with the workers'. Yields its endpoint."""
    process = subprocess.Popen(
        [sys.executable, "-m", "content_retry_local.bedrock_server", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        endpoint = process.stdout.readline().strip().split("=", 1)[1]
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


def _clients(sqs_endpoint: str, bedrock_endpoint: str) -> tuple[Any, Any]:
    """An SQS client, and a Bedrock Runtime client configured as the function's
    (content_retry.aws.bedrock_runtime_client)."""
    import boto3
    from botocore.config import Config

    sqs = boto3.client("sqs", endpoint_url=sqs_endpoint, region_name="us-east-1")
    bedrock = boto3.client(
        "bedrock-runtime",
        endpoint_url=bedrock_endpoint,
        region_name="us-east-1",
        config=Config(
            retries={"mode": "adaptive", "total_max_attempts": BEDROCK_MAX_ATTEMPTS},
            max_pool_connections=16,
        ),
    )
    return sqs, bedrock


def _saved(engine: Engine) -> int:
    with engine.connect() as connection:
        count: int = connection.execute(
            text("SELECT count(*) FROM retry_items WHERE status = 'succeeded'")
        ).scalar_one()
    return count


@dataclass(frozen=True)
class _Setup:
    url: str
    sqs_endpoint: str
    bedrock_endpoint: str
    queue_url: str
    dlq_url: str
    parallelism: int


def _worker(setup: _Setup, ready: Any, go: Event, report: Queue[Any]) -> None:
    """One generate function container: warm, then Lambda's poller loop."""
    from content_retry.generators.bedrock import BedrockGenerator
    from content_retry.worker import WorkerDependencies, handle_retry_batch
    from content_retry_local.lambda_runtime import LocalLambdaContext, sqs_record

    engine = build_engine(Settings(DATABASE_URL=setup.url))
    with engine.connect():
        pass
    sqs, bedrock = _clients(setup.sqs_endpoint, setup.bedrock_endpoint)
    settings = settings_for(
        setup.url,
        RETRY_QUEUE_URL=setup.queue_url,
        RETRY_DLQ_URL=setup.dlq_url,
        GENERATE_PARALLELISM=str(setup.parallelism),
    )
    deps = WorkerDependencies(engine, sqs, settings, BedrockGenerator(bedrock, MODEL))
    batches: list[tuple[float, int]] = []
    done_at = None
    first_batch_at = None
    with quiet_powertools():
        ready.release()
        go.wait()
        while done_at is None and _saved(engine) < ITEMS:
            # Long polling, as Lambda's SQS poller does: the wait happens in the queue,
            # not in a loop of requests and ledger counts competing with the run for the CPU.
            messages = sqs.receive_message(
                QueueUrl=setup.queue_url,
                MaxNumberOfMessages=BATCH_SIZE,
                VisibilityTimeout=600,
                WaitTimeSeconds=1,
            ).get("Messages", [])
            if not messages:
                continue
            records = [sqs_record(m["Body"], m["MessageId"]) for m in messages]
            context = LocalLambdaContext("content-retry-generate-b8", timeout_seconds=300)
            began = time.perf_counter()
            first_batch_at = first_batch_at or time.monotonic()
            response = handle_retry_batch({"Records": records}, context, deps)  # type: ignore[arg-type]
            took = time.perf_counter() - began
            assert response == {"batchItemFailures": []}, response
            sqs.delete_message_batch(
                QueueUrl=setup.queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(messages)
                ],
            )
            batches.append((took, sum(len(json.loads(m["Body"])["items"]) for m in messages)))
            if _saved(engine) == ITEMS:
                done_at = time.monotonic()
    engine.dispose()
    report.put({"batches": batches, "done_at": done_at, "first_batch_at": first_batch_at})


def _seed(engine: Engine) -> None:
    """The demo's scenario, afresh: done before the clock starts."""
    from content_retry_local.seed import SEED_ROADMAP_ID, seed_scenario

    with engine.begin() as connection:
        connection.execute(
            text("DELETE FROM roadmap_metadata WHERE roadmap_id = :r"), {"r": SEED_ROADMAP_ID}
        )
        seed_scenario(connection, other_failures=True)


def _plan(setup: _Setup, engine: Engine, sqs: Any) -> None:
    """The API call: the detect handler plans and enqueues the scenario's 26 items."""
    from content_retry.retries import DetectDependencies
    from content_retry_local.lambda_runtime import LocalLambdaContext
    from content_retry_local.project import project_path
    from functions.detect.app import lambda_handler as detect_handler

    settings = settings_for(setup.url, RETRY_QUEUE_URL=setup.queue_url)
    event = json.loads(project_path("events/api-retry.json").read_text())
    event["body"] = json.dumps({"content_types": ["tutorial", "resources", "quiz"]})
    context = LocalLambdaContext("content-retry-detect-b8", timeout_seconds=60)
    response = detect_handler(event, context, deps=DetectDependencies(engine, sqs, settings))
    assert json.loads(response["body"])["retried_count"] == ITEMS, response


def _one_run(setup: _Setup) -> RunResult:
    engine = build_engine(Settings(DATABASE_URL=setup.url))
    sqs, _ = _clients(setup.sqs_endpoint, setup.bedrock_endpoint)
    processes = multiprocessing.get_context("spawn")
    ready, go, report = processes.Semaphore(0), processes.Event(), processes.Queue()
    workers = [
        processes.Process(target=_worker, args=(setup, ready, go, report)) for _ in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:  # every container warm before the clock starts
        ready.acquire()
    _seed(engine)
    with quiet_powertools():
        started = time.monotonic()
        _plan(setup, engine, sqs)
        planned = time.monotonic()
        # The pollers start on the enqueued plan, as template.yaml's batching window
        # (MaximumBatchingWindowInSeconds 5) lets them gather full batches of 5.
        go.set()
        reports = [report.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert _saved(engine) == ITEMS
    engine.dispose()
    done = min(r["done_at"] for r in reports if r["done_at"] is not None)
    first_batch = min(r["first_batch_at"] for r in reports if r["first_batch_at"] is not None)
    batches = [(took, items) for r in reports for took, items in r["batches"]]
    waits = [
        sum(math.ceil(items / setup.parallelism) * LATENCY for _, items in r["batches"])
        for r in reports
    ]
    return RunResult(
        seconds=done - started,
        detect_seconds=planned - started,
        first_batch_seconds=first_batch - started,
        billed_seconds=sum(math.ceil(took * 1000) / 1000 for took, _ in batches),
        latency_limit=max(waits),
        batches=sorted(items for _, items in batches),
    )


def run(env: BenchEnv) -> Result:
    from content_retry_local.aws import start_threaded_moto
    from content_retry_local.template import create_queues

    url = env.postgres.create_database(DATABASE)
    rounds = 1 if env.quick else 3
    results: dict[int, list[RunResult]] = {1: [], 8: []}
    moto_endpoint, moto = start_threaded_moto()
    try:
        with _local_bedrock_process(LATENCY) as bedrock_endpoint:
            for round_number in range(rounds):
                order = (1, 8) if round_number % 2 == 0 else (8, 1)
                for parallelism in order:
                    sqs, _ = _clients(moto_endpoint, bedrock_endpoint)
                    queue_url, dlq_url = create_queues(
                        sqs, prefix=f"b8-{round_number}-{parallelism}"
                    )
                    setup = _Setup(
                        url,
                        moto_endpoint,
                        bedrock_endpoint,
                        queue_url,
                        dlq_url,
                        parallelism,
                    )
                    result = _one_run(setup)
                    results[parallelism].append(result)
                    say(
                        f"parallelism {parallelism}: {result.seconds:.2f} s to the last saved item "
                        f"(latency limit {result.latency_limit:.0f} s; "
                        f"detect {result.detect_seconds:.2f} s, "
                        f"first batch at {result.first_batch_seconds:.2f} s; "
                        f"batches {result.batches}); "
                        f"billed {result.billed_seconds:.1f} s = "
                        f"{result.billed_seconds / ITEMS:.2f} s per saved item"
                    )
    finally:
        moto.stop()

    def median(parallelism: int, attribute: str) -> float:
        values: list[float] = [getattr(r, attribute) for r in results[parallelism]]
        return statistics.median(values)

    speedup = median(1, "seconds") / median(8, "seconds")
    to_limit = median(8, "seconds") / median(8, "latency_limit")
    per_item = {p: median(p, "billed_seconds") / ITEMS for p in results}
    say(
        f"default (8) {speedup:.2f}x faster than parallelism 1 (goal >= 5x); "
        f"{to_limit:.2f}x its latency limit (goal <= 1.5x); billed per saved item: "
        f"{per_item[1]:.2f} s at 1, {per_item[8]:.2f} s at 8"
    )
    return Result(
        ID,
        WHAT,
        GOAL,
        f"{speedup:.2f}x faster; {to_limit:.2f}x the latency limit; billed "
        f"{per_item[8]:.2f} s/item (parallelism 1: {per_item[1]:.2f})",
        speedup >= 5 and to_limit <= 1.5,
    )
