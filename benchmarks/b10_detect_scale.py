"""B10: detect at scale: the API's retry of 1,000, 20,000 and 50,000 concepts, SQS at 15 ms a call.

What it measures: one ``POST /roadmaps/{id}/retry`` through the detect
handler (``functions/detect/app.py``, the API's 27 s deadline), in a new
Python process per run, as a Lambda container is: the time to its answer,
the SQS calls it made, the database round trips (SQLAlchemy's statement,
BEGIN, COMMIT and checkout events) and the process's peak resident memory
(VmHWM; ru_maxrss would carry the parent's size across the fork). Each
roadmap lost every content type of every concept, so each message carries
three items (the largest plan and ledger per concept), and each concept has
a paragraph of description (about 240 characters), as the platform writes.

SQS is the real botocore client, as ``content_retry.aws.client`` configures
it for the function (retries, timeouts, its pool of 10 connections), whose
``SendMessageBatch`` requests are answered after 15 ms by a ``before-send``
hook instead of the network: serialising, signing and parsing are measured,
moto's own time is not (moto's server walks its whole queue on every message,
which would be most of the figure). The hook refuses a batch as SQS does
(more than 10 entries, more than 1 MiB in all or for one message): none is.
It counts each body once, and the run checks that every planned concept was
sent exactly once and is marked sent in the ledger.

The baselines, from the same run: the lower bound of any sender at that
concurrency, SQS calls x 15 ms / SEND_CONCURRENCY, and the sequential send
(concurrency 1, what detect did before), without the API's cap so that it
runs to the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from benchmarks.data import USER_ID, framework_of
from benchmarks.harness import REPO_ROOT, BenchEnv, Result, say
from content_retry.database import build_engine
from content_retry_local.seed import ConceptSeed, insert_roadmap

ID = "B10"
WHAT = "detect at scale: API retry of 1k/20k/50k concepts, SQS at 15 ms a call"
GOAL = "20k answers <=10 s; 50k peak RSS <=307 MiB (60% of 512)"
DATABASE = "bench_b10"
SIZES = (1_000, 20_000, 50_000)
SEQUENTIAL_SIZES = (1_000, 20_000)
QUICK_SEQUENTIAL_SIZES = (1_000,)
LATENCY = 0.015
ANSWER_GOAL_SECONDS = 10.0
ANSWER_GOAL_SIZE = 20_000
MEMORY_GOAL_MIB = 0.6 * 512
MEMORY_GOAL_SIZE = 50_000
QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/content-retry-bench"
DESCRIPTION = (
    "what it is, why it matters for the learner's project, how it is measured in "
    "practice, which mistakes beginners make with it, and how it relates to the "
    "concepts before and after it in this module of the roadmap, with examples."
)


@dataclass(frozen=True)
class Run:
    """One retry through the handler, in its own process, as the child reports it."""

    concepts: int
    concurrency: int
    status: int
    retried_count: int
    seconds: float
    send_seconds: float
    sqs_calls: int
    entries: int
    distinct_bodies: int
    largest_batch_bytes: int
    refused_batches: int
    marked_sent: int
    round_trips: int
    mark_statements: int
    rss_before_mib: float
    peak_mib: float
    # The warnings and errors detect logged (event names): none expected.
    problems: list[str]

    @property
    def lower_bound(self) -> float:
        from content_retry.queue import SEND_CONCURRENCY

        return self.sqs_calls * LATENCY / min(self.concurrency, SEND_CONCURRENCY)


def _seeds(count: int) -> list[ConceptSeed]:
    """``count`` concepts with a paragraph of description each, every content
    type's framework status null (no content row: all three lost)."""
    return [
        ConceptSeed(f"c{index:05d}", f"Concept {index}", f"Concept {index}: {DESCRIPTION}")
        for index in range(count)
    ]


def _roadmap_id(size: int) -> str:
    return f"b10-{size}"


def run(env: BenchEnv) -> Result:
    url = env.postgres.create_database(DATABASE)
    engine = build_engine(_settings(url), pool_size=1)
    try:
        with engine.begin() as connection:
            for size in SIZES:
                insert_roadmap(
                    connection,
                    _roadmap_id(size),
                    USER_ID,
                    framework_of(_seeds(size)),
                    age_minutes=24 * 60,
                )
        runs = [_measure(env, engine, url, size, concurrency=None) for size in SIZES]
        sequential_sizes = QUICK_SEQUENTIAL_SIZES if env.quick else SEQUENTIAL_SIZES
        sequential = {
            size: _measure(env, engine, url, size, concurrency=1) for size in sequential_sizes
        }
    finally:
        engine.dispose()
    return _report(runs, sequential)


def _settings(url: str) -> Any:
    from content_retry.settings import Settings

    return Settings(DATABASE_URL=url)


def _measure(env: BenchEnv, engine: Any, url: str, size: int, *, concurrency: int | None) -> Run:
    """One retry of the roadmap of ``size`` concepts, from a fresh ledger."""
    with engine.begin() as connection:
        connection.execute(
            text("DELETE FROM retry_tasks WHERE roadmap_id = :r"), {"r": _roadmap_id(size)}
        )
    raw = env.postgres.connect(DATABASE)
    try:
        raw.autocommit = True
        raw.cursor().execute("VACUUM ANALYZE retry_items")
    finally:
        raw.close()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.b10_detect_scale",
            url,
            str(size),
            str(concurrency or 0),
        ],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": f"{REPO_ROOT / 'layers' / 'common'}{os.pathsep}{REPO_ROOT}",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode:
        raise RuntimeError(f"the B10 child failed:\n{completed.stderr[-3000:]}")
    found = Run(**json.loads(completed.stdout.strip().splitlines()[-1]))
    label = "sequential" if concurrency == 1 else "concurrent"
    say(
        f"{size:>6,} concepts, {label}: {found.status} in {found.seconds:.2f} s "
        f"({found.retried_count:,} items), of which sending {found.send_seconds:.2f} s: "
        f"{found.sqs_calls:,} SQS calls, lower bound {found.lower_bound:.2f} s "
        f"({found.send_seconds / found.lower_bound:.2f}x); peak RSS {found.peak_mib:.0f} MiB "
        f"(after imports {found.rss_before_mib:.0f}); {found.round_trips} database round "
        f"trips, {found.mark_statements} of them marking sends"
    )
    if found.problems:
        say(f"  logged: {', '.join(found.problems)}")
    _check(found, size)
    return found


def _check(found: Run, size: int) -> None:
    """Every planned concept sent once, and marked sent; no batch SQS would refuse."""
    assert found.refused_batches == 0, found
    assert found.largest_batch_bytes <= 1_048_576, found
    if found.status == 202 and found.retried_count == 3 * size:
        assert found.entries == found.distinct_bodies == size, found
        assert found.marked_sent == 3 * size, found


def _report(runs: list[Run], sequential: dict[int, Run]) -> Result:
    for size, baseline in sequential.items():
        subject = next(found for found in runs if found.concepts == size)
        say(
            f"{size:,} concepts: sequential {baseline.seconds:.2f} s, concurrent "
            f"{subject.seconds:.2f} s: {baseline.seconds / subject.seconds:.1f}x faster"
        )
    answer = next(found for found in runs if found.concepts == ANSWER_GOAL_SIZE)
    memory = next(found for found in runs if found.concepts == MEMORY_GOAL_SIZE)
    answer_met = answer.status == 202 and answer.seconds <= ANSWER_GOAL_SECONDS
    memory_met = memory.status == 202 and memory.peak_mib <= MEMORY_GOAL_MIB
    say(
        f"goal 20,000 concepts answered within {ANSWER_GOAL_SECONDS:.0f} s: "
        f"{answer.seconds:.2f} s: {'met' if answer_met else 'MISSED'}"
    )
    say(
        f"goal 50,000 concepts within {MEMORY_GOAL_MIB:.0f} MiB: peak "
        f"{memory.peak_mib:.0f} MiB: {'met' if memory_met else 'MISSED'}"
    )
    ratios = ", ".join(f"{found.send_seconds / found.lower_bound:.2f}x" for found in runs)
    return Result(
        ID,
        WHAT,
        GOAL,
        f"20k in {answer.seconds:.2f} s; 50k peak {memory.peak_mib:.0f} MiB; "
        f"sending {ratios} the lower bound",
        answer_met and memory_met,
    )


# --- the child: one retry through the handler, as a Lambda container runs it ---------------


class SqsAnsweringIn:
    """SendMessageBatch answered after ``latency`` by a hook of the real client,
    checked against SQS's limits; every body is counted once."""

    def __init__(self, client: Any, latency: float) -> None:
        self.latency = latency
        self.calls = self.entries = self.largest_batch_bytes = self.refused = 0
        self._bodies: set[int] = set()
        self._lock = threading.Lock()
        client.meta.events.register("before-send.sqs.SendMessageBatch", self._answer)

    @property
    def distinct_bodies(self) -> int:
        return len(self._bodies)

    def _answer(self, request: Any, **kwargs: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        time.sleep(self.latency)
        entries = json.loads(request.body)["Entries"]
        sizes = [len(entry["MessageBody"].encode()) for entry in entries]
        with self._lock:
            self.calls += 1
            self.largest_batch_bytes = max(self.largest_batch_bytes, sum(sizes))
            if len(entries) > 10 or sum(sizes) > 1_048_576:
                self.refused += 1
                return AWSResponse(request.url, 400, _JSON, _Raw(_TOO_LONG))
            self.entries += len(entries)
            self._bodies.update(hash(entry["MessageBody"]) for entry in entries)
        answer = {
            "Successful": [
                {"Id": entry["Id"], "MessageId": f"m-{entry['Id']}", "MD5OfMessageBody": "-"}
                for entry in entries
            ],
            "Failed": [],
        }
        return AWSResponse(request.url, 200, _JSON, _Raw(json.dumps(answer).encode()))


_JSON = {"Content-Type": "application/x-amz-json-1.0"}
_TOO_LONG = json.dumps(
    {"__type": "com.amazonaws.sqs#BatchRequestTooLong", "message": "over 1 MiB"}
).encode()


class _Raw:
    def __init__(self, payload: bytes) -> None:
        self._payload = payload

    def stream(self, **kwargs: Any) -> Any:
        yield self._payload


class _Context:
    """What the Lambda runtime passes as ``context``: the time left runs down
    from the ApiFunction's Timeout (28 s) with the clock."""

    function_name = "content-retry-bench"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:content-retry-bench"
    memory_limit_in_mb = 512
    aws_request_id = "00000000-0000-4000-8000-000000000010"
    log_group_name = "/aws/lambda/content-retry-bench"
    log_stream_name = "bench"

    def __init__(self, remaining_ms: int) -> None:
        self._ends = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._ends - time.monotonic()) * 1000))


def _logged_problems() -> list[str]:
    """The event names of the warnings and errors detect logs from now on."""
    import logging

    from content_retry.observability import logger

    problems: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            problems.append(str(record.msg))

    logging.getLogger(logger.name).addHandler(Keep(level=logging.WARNING))
    return problems


def _time_calls(module: Any, name: str) -> list[float]:
    """Time each call of ``module.name`` from now on; returns the list the times go to."""
    seconds: list[float] = []
    function = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(module, name, timed)
    return seconds


def _memory_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))
    return kib / 1024


def _child(url: str, size: int, concurrency: int) -> dict[str, Any]:
    os.environ.update(
        DATABASE_URL=url,
        RETRY_QUEUE_URL=QUEUE_URL,
        RETRY_DLQ_URL=QUEUE_URL + "-dlq",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
    )
    os.environ.pop("AWS_ENDPOINT_URL", None)
    from benchmarks.harness import EngineCounter, quiet_powertools
    from content_retry import api, queue, retries
    from content_retry.retries import default_detect_dependencies
    from functions.detect.app import lambda_handler

    deps = default_detect_dependencies()
    sqs = SqsAnsweringIn(deps.sqs, LATENCY)
    context = _Context(28_000)
    if concurrency:
        queue.SEND_CONCURRENCY = concurrency
    if concurrency == 1:  # the old send, run to its end: no API cap
        api.API_AT_MOST_SECONDS = 600
        context = _Context(600_000)
    event = json.loads((REPO_ROOT / "events" / "api-retry.json").read_text())
    event["path"] = f"/roadmaps/{_roadmap_id(size)}/retry"
    event["pathParameters"] = {"roadmap_id": _roadmap_id(size)}
    event["requestContext"]["authorizer"] = {"claims": {"sub": USER_ID}}
    event["body"] = json.dumps({"preferences": {"language": "en", "level": "beginner"}})
    send_seconds = _time_calls(retries, "send_retry_messages")
    problems = _logged_problems()
    rss_before = _memory_mib("VmRSS")
    with quiet_powertools(), EngineCounter(deps.engine) as counter:
        started = time.perf_counter()
        response = lambda_handler(event, context, deps=deps)
        seconds = time.perf_counter() - started
    peak = _memory_mib("VmHWM")
    with deps.engine.connect() as connection:
        marked = connection.execute(
            text("SELECT count(*) FROM retry_items WHERE roadmap_id = :r AND sent_at IS NOT NULL"),
            {"r": _roadmap_id(size)},
        ).scalar_one()
    return {
        "concepts": size,
        "concurrency": concurrency or queue.SEND_CONCURRENCY,
        "status": response["statusCode"],
        "retried_count": json.loads(response["body"]).get("retried_count", 0),
        "seconds": seconds,
        "send_seconds": sum(send_seconds),
        "sqs_calls": sqs.calls,
        "entries": sqs.entries,
        "distinct_bodies": sqs.distinct_bodies,
        "largest_batch_bytes": sqs.largest_batch_bytes,
        "refused_batches": sqs.refused,
        "marked_sent": int(marked),
        "round_trips": counter.round_trips,
        "mark_statements": sum("SET sent_at" in s for s in counter.statements),
        "rss_before_mib": rss_before,
        "peak_mib": peak,
        "problems": problems,
    }


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
