"""The LLM quota as a pool (DESIGN §12, issue 19): generate workers as processes
against one account quota, enforced as Bedrock enforces it.

Each drain plans ``ITEMS`` lost tutorials and runs ``WORKERS`` generate
workers, each a process of its own with a one-connection engine (as Lambda
containers), through moto's server and the local Bedrock
(``content_retry_local.bedrock_server``) holding a quota of one fifth of the
workers' unpaced demand, per model id: tokens and requests a minute, a call
reserving its input plus ``maxTokens`` when it starts, refused with
``ThrottlingException`` beyond. The machinery is benchmark B9's
(:func:`benchmarks.b9_quota.drain_at_quota`), at a size that drains in well
under a minute.

What the code promises, and each test holds it to, in counts (never in
durations: a slow machine drains later, not differently):

- no item is failed or dead-lettered because of the quota, every item is saved
  exactly once, and no item's LLM call is paid twice (at most 1.02 paid calls
  an item), whether the quota is configured for the workers or learned;
- with the quota configured, the shared pace keeps every container together
  within it: the local Bedrock throttles nothing;
- the local poller (``drain``) leaves a record the worker returned with a
  delay of its own in flight, instead of making it visible at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine

from benchmarks.b9_quota import DrainRun, Stage, drain_at_quota, quota_for
from content_retry.generators import ThrottledError
from content_retry_local.bedrock_server import LocalBedrock
from content_retry_local.lambda_runtime import drain, invoke, queue_depth
from content_retry_local.seed import seed_scenario
from tests.conftest import Queues
from tests.support import CountingGenerator, worker_deps

ITEMS = 60
WORKERS = 3
# Each call takes this long: 3 workers x 5 calls at once / 4 s = 225 calls a
# minute unpaced; the quota, one fifth, is 45 calls a minute (and their tokens).
# Both buckets start full (a minute's worth), so 15 of the 60 calls wait for it.
LATENCY = 4.0
# Reserved tokens per call, as the local Bedrock counts a tutorial at maxTokens
# 2048 (input about 250 tokens): the quota's tokens a minute follow from it.
RESERVED_PER_CALL = 2_300
# Learning a quota takes throttles: at most this share of the calls made.
LEARNING_THROTTLED_SHARE = 0.25


@pytest.fixture(scope="module")
def stage(database_url: str, engine: Engine) -> Iterator[Stage]:
    """moto's server and a local Bedrock answering in LATENCY s, for worker processes."""
    from content_retry_local.aws import start_threaded_moto

    endpoint, moto = start_threaded_moto()
    try:
        with LocalBedrock(latency=LATENCY) as bedrock:
            yield Stage(database_url, endpoint, bedrock)
    finally:
        moto.stop()


def drained(stage: Stage, label: str, *, configured: bool) -> DrainRun:
    quota = quota_for(WORKERS, LATENCY, RESERVED_PER_CALL)
    assert quota[1] < ITEMS  # more calls than the quota's first minute lets through at once
    return drain_at_quota(
        stage,
        label=label,
        items=ITEMS,
        workers=WORKERS,
        quota=quota,
        configured=configured,
        timeout=150,
    )


def assert_every_item_saved_once_and_paid_once(run: DrainRun) -> None:
    assert run.errors == []
    assert run.statuses == {"succeeded": ITEMS}
    assert run.failed_or_dead == 0
    assert (run.saved_rows, run.saved_concepts) == (ITEMS, ITEMS)
    assert run.llm_calls <= ITEMS * 1.02
    assert run.stats.answered == run.llm_calls


def test_a_backlog_at_a_learned_quota_is_saved_once_and_nothing_fails(
    db: Engine, stage: Stage
) -> None:
    # GIVEN 60 tutorials and 3 worker processes that do not know the quota,
    # one fifth of their demand (the pace starts at its guess, far above it)
    # WHEN they drain the queue
    run = drained(stage, "test-learned", configured=False)

    # THEN the quota was met: the local Bedrock throttled calls
    assert run.stats.quota_throttled > 0
    # AND yet no item failed or was dead-lettered, each was saved once, paid once
    assert_every_item_saved_once_and_paid_once(run)
    # AND the throttles a learning pace costs stay a small share of the calls
    assert run.stats.quota_throttled <= LEARNING_THROTTLED_SHARE * run.stats.requests


def test_a_configured_quota_is_never_exceeded_by_the_shared_pace(db: Engine, stage: Stage) -> None:
    # GIVEN the same backlog and workers, told the account's quota
    # WHEN they drain the queue
    run = drained(stage, "test-configured", configured=True)

    # THEN all three containers together stayed within the quota: nothing throttled
    assert run.stats.quota_throttled == 0
    assert run.stats.requests == run.stats.answered == ITEMS
    assert_every_item_saved_once_and_paid_once(run)
    # AND no record was returned: each waited for the pace within its invocation
    assert run.worker_total("returned") == 0


def test_drain_leaves_a_record_the_worker_delayed_in_flight(
    connection: Connection, queues: Queues, db: Engine, load_event: Any
) -> None:
    # GIVEN the seed's 21 tutorials queued, and an LLM throttling c15's every time
    seed_scenario(connection)
    connection.commit()
    invoke("detect", load_event("api-retry.json"))
    generator = CountingGenerator()
    generator.failures[("c15", "tutorial")] = ThrottledError("bedrock ThrottlingException")

    # WHEN the local poller drains the queue
    report = drain(queues.sqs, queues.queue_url, deps=worker_deps(db, queues.sqs, generator))

    # THEN the throttled record was returned once, with the worker's own short
    # delay, which drain left alone: it waits in flight, not received again at
    # once to be throttled again until its deliveries ran out
    assert (report.succeeded, report.failed, report.delayed) == (20, 1, 1)
    assert generator.calls.count(("c15", "tutorial")) == 1
    assert queue_depth(queues.sqs, queues.queue_url) == 1
    assert queue_depth(queues.sqs, queues.dlq_url) == 0
