"""The generate function against a database that stops answering (DESIGN §12, issue 19).

The worker's engine reaches the test database through
:class:`~content_retry_local.faults.HangingProxy`, a real TCP proxy that can
*stop answering* (not refuse): every connection stays open, no byte moves,
new connections are accepted and never answered. The Lambda context's
remaining time runs down with the real clock (:class:`ClockContext`).

What the code promises, and each test holds it to:

- one deadline: every connect, ping and statement waits at most
  min(``SOCKET_TIMEOUT_SECONDS``, time left less ``GENERATE_RESERVE_SECONDS``),
  and the handler answers before the context's deadline;
- after the first failure or timeout of the database, the invocation does not
  touch it again: content generated goes to the DLQ at once with
  ``generated`` (reason ``save_failed``), records not yet generated go back
  without an LLM call, ledger notes are left for the re-drive.

Most tests shorten the socket cap to ``STAGE_SECONDS`` (a module constant read
on every wait), with a context long enough for several such waits: the
deadline then is not what stops the batch, so one wait, not several, is what
the breaker keeps it to. Two tests keep the real 30 s cap under a 25 s context,
where the deadline is the bound. Every time asserted is a bound the code
guarantees, not a performance figure.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from content_retry.database import build_engine
from content_retry.database import engine as database_engine
from content_retry.messages import RetryMessage
from content_retry.retries import DetectDependencies
from content_retry.settings import Settings
from content_retry.worker import GENERATE_RESERVE_SECONDS, WorkerDependencies
from content_retry_local.faults import ClockContext, HangingProxy
from content_retry_local.seed import SEED_ROADMAP_ID, seed_scenario
from functions.detect.app import lambda_handler as detect_handler
from functions.generate.app import lambda_handler as generate_handler
from tests.conftest import Queues
from tests.support import (
    CountingGenerator,
    FakeLambdaContext,
    detect_deps,
    holds_expire,
    load_event,
    logged_events,
    redriven_event,
    sqs_event,
    worker_deps,
)

# The socket cap while a test measures the breaker (the real one is 30 s).
STAGE_SECONDS = 2.0
# Contexts: long enough for many STAGE_SECONDS waits after the reserve...
LONG_CONTEXT_SECONDS = 40.0
# ...and one where the deadline, not the 30 s cap, bounds the wait.
SHORT_CONTEXT_SECONDS = 25.0
# The LLM call budget the worker keeps (the real one is 180 s): below what
# either context leaves after its wait, so time is never why a call is not made.
CALL_BUDGET_SECONDS = 2


@dataclass
class Invocation:
    response: dict[str, Any]
    elapsed: float
    context: ClockContext
    logs: list[dict[str, Any]]

    @property
    def returned(self) -> list[str]:
        return [failure["itemIdentifier"] for failure in self.response["batchItemFailures"]]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs if line.get("message") == name]


def invoke(
    bodies: list[str],
    worker: WorkerDependencies,
    seconds: float,
    event: dict[str, Any] | None = None,
) -> Invocation:
    """One generate invocation under a context of ``seconds`` running down with the clock."""
    context = ClockContext(seconds)
    with logged_events() as logs:
        response = generate_handler(event or sqs_event(bodies), context, deps=worker)
    return Invocation(response, context.elapsed(), context, logs)


def redrive(messages: list[dict[str, Any]], worker: WorkerDependencies) -> Invocation:
    """The DLQ's messages moved back as a re-drive moves them (attributes kept)."""
    return invoke([], worker, LONG_CONTEXT_SECONDS, redriven_event(messages))


@pytest.fixture
def generator() -> CountingGenerator:
    return CountingGenerator()


@pytest.fixture
def detect(queues: Queues, db: Engine) -> DetectDependencies:
    return detect_deps(db, queues.sqs)


@pytest.fixture
def proxy(database_url: str, db: Engine) -> Iterator[HangingProxy]:
    """The test database behind a proxy that can hang (closed before ``db`` is emptied,
    so a session it kept open in a transaction is ended first)."""
    with HangingProxy.to_database(database_url) as hanging:
        yield hanging


@pytest.fixture
def worker(
    queues: Queues, proxy: HangingProxy, database_url: str, generator: CountingGenerator
) -> Iterator[WorkerDependencies]:
    """The generate function's dependencies, its engine (one connection, as in
    Lambda) reaching the database through the proxy."""
    engine = build_engine(Settings(DATABASE_URL=proxy.url_through(database_url)))
    deps = worker_deps(engine, queues.sqs, generator)
    deps.settings = deps.settings.model_copy(
        update={"llm_call_budget_seconds": CALL_BUDGET_SECONDS}
    )
    yield deps
    engine.dispose()


@pytest.fixture
def short_stage(monkeypatch: pytest.MonkeyPatch) -> float:
    """The socket cap shortened to STAGE_SECONDS (every connect, ping and statement)."""
    monkeypatch.setattr(database_engine, "SOCKET_TIMEOUT_SECONDS", STAGE_SECONDS)
    return STAGE_SECONDS


def planned(
    connection: Connection, queues: Queues, detect: DetectDependencies, count: int
) -> list[str]:
    """Seed the lost tutorials, plan them through the API, return ``count`` queued bodies."""
    seed_scenario(connection)
    connection.commit()
    response = detect_handler(load_event("api-retry.json"), FakeLambdaContext(), deps=detect)
    assert response["statusCode"] == 202, response
    return [message["Body"] for message in queues.receive_all()][:count]


def concept_of(body: str) -> str:
    concept_id: str = json.loads(body)["concept"]["concept_id"]
    return concept_id


def ledger(db: Engine, concepts: list[str]) -> dict[str, tuple[str, int, int]]:
    """Each concept's tutorial ledger row: (status, attempts, llm_calls)."""
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT concept_id, status, attempts, llm_calls FROM retry_items "
                "WHERE content_type = 'tutorial' AND concept_id = ANY(:c)"
            ),
            {"c": concepts},
        ).all()
    return {row.concept_id: (row.status, row.attempts, row.llm_calls) for row in rows}


def tutorial_rows(db: Engine, concepts: list[str]) -> dict[str, list[tuple[int, bool, str]]]:
    """Each concept's tutorial rows: (version, is_latest, status), oldest first."""
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT concept_id, content_version, is_latest, content_status FROM tutorials "
                "WHERE roadmap_id = :r AND concept_id = ANY(:c) ORDER BY content_version"
            ),
            {"r": SEED_ROADMAP_ID, "c": concepts},
        ).all()
    found: dict[str, list[tuple[int, bool, str]]] = {c: [] for c in concepts}
    for row in rows:
        found[row.concept_id].append((row.content_version, row.is_latest, row.content_status))
    return found


def sessions_in_a_save(db: Engine) -> list[tuple[str, str]]:
    """Sessions still in a save: busy or in a transaction, their last statement a
    save (state, statement). Idle pooled sessions whose last statement was a
    finished save are not. pg_stat_activity keeps only the statement's first
    kilobyte (track_activity_query_size), so the save is known by its first
    step: marking the ledger item succeeded."""
    with db.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT state, query FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND state <> 'idle' "
                "AND query LIKE '%UPDATE retry_items SET status=''succeeded''%'"
            )
        ).all()
    return [(row.state, row.query) for row in rows]


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    ends = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > ends:
            return False
        time.sleep(0.05)
    return True


def dead_lettered(queues: Queues) -> dict[str, dict[str, Any]]:
    """The DLQ's messages by concept (drained)."""
    return {concept_of(message["Body"]): message for message in queues.receive_all(queues.dlq_url)}


def assert_settled_by_the_breaker(
    invocation: Invocation,
    bodies: list[str],
    generator: CountingGenerator,
    dead: dict[str, dict[str, Any]],
) -> tuple[list[str], list[str]]:
    """Every generated message is in the DLQ with its content, every other one
    was returned without an LLM call, nothing else; returns both lists of concepts."""
    called = [concept for concept, _ in generator.calls]
    by_message = {f"message-{n}": concept_of(body) for n, body in enumerate(bodies)}
    returned = [by_message[message_id] for message_id in invocation.returned]
    assert sorted(dead) == sorted(called), "generated content not (only) in the DLQ"
    assert sorted(returned) == sorted(set(by_message.values()) - set(called))
    for concept, message in dead.items():
        assert message["MessageAttributes"]["reason"]["StringValue"] == "save_failed"
        kept = RetryMessage.model_validate_json(message["Body"])
        assert kept.concept.concept_id == concept
        assert kept.generated is not None
        assert kept.generated.tutorial is not None
        assert kept.generated.tutorial.title.startswith(kept.concept.name)
    # The first save's timeout is the one wait: every later save failed at once.
    failures = [line["error"] for line in invocation.events("retry_item_save_failed")]
    assert len(failures) == len(dead)
    waits = [error for error in failures if "DatabaseUnavailableError" not in error]
    assert len(waits) == 1, failures
    return sorted(dead), sorted(returned)


def assert_recovered_exactly_once(
    db: Engine,
    worker: WorkerDependencies,
    generator: CountingGenerator,
    dead: dict[str, dict[str, Any]],
    returned_bodies: list[str],
    bodies: list[str],
    rows_before: dict[str, list[tuple[int, bool, str]]],
) -> None:
    """Re-drive the DLQ (no LLM call), deliver the returned records again (one
    call each): every item saved exactly once, every item paid exactly once."""
    generator.before_call = None
    calls_before = len(generator.calls)
    assert redrive(list(dead.values()), worker).returned == []
    assert len(generator.calls) == calls_before, "the re-drive called the LLM"
    if returned_bodies:
        # SQS redelivers them after the visibility timeout (30 min), when the
        # hung invocation's holds on its items have long passed
        holds_expire(db)
        again = invoke(returned_bodies, worker, LONG_CONTEXT_SECONDS)
        assert again.returned == []

    concepts = [concept_of(body) for body in bodies]
    assert Counter(concept for concept, _ in generator.calls) == Counter(concepts)
    after = tutorial_rows(db, concepts)
    for concept in concepts:
        new_rows = after[concept][len(rows_before[concept]) :]
        previous = max((version for version, _, _ in rows_before[concept]), default=0)
        assert new_rows == [(previous + 1, True, "completed")], (concept, after[concept])
        assert [row for row in after[concept] if row[1]] == new_rows
    items = ledger(db, concepts)
    assert {status for status, _, _ in items.values()} == {"succeeded"}
    # The ledger counts every item's one call: a dead-lettered item's through
    # the cost its copy recorded for the re-drive's save.
    assert {items[concept][2] for concept in concepts} == {1}


# --- a. hanging before the batch starts its items ------------------------------------


def test_a_database_hanging_at_the_start_returns_every_record_unpaid_before_the_deadline(
    connection: Connection,
    queues: Queues,
    db: Engine,
    proxy: HangingProxy,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN three planned messages, and a database that hangs before the worker's
    # first connection (the real 30 s cap; a context of 25 s: the deadline bounds it)
    bodies = planned(connection, queues, detect, 3)
    concepts = [concept_of(body) for body in bodies]
    ledger_before = ledger(db, concepts)
    proxy.hang()

    # WHEN the generate function is invoked
    invocation = invoke(bodies, worker, SHORT_CONTEXT_SECONDS)

    # THEN it answers before the context's deadline, having waited once, for
    # what the deadline left (the 25 s less the reserve), not for a second wait...
    stage = SHORT_CONTEXT_SECONDS - GENERATE_RESERVE_SECONDS
    assert invocation.elapsed < SHORT_CONTEXT_SECONDS
    assert invocation.elapsed < 2 * stage
    # ...every record goes back, without an LLM call, nothing dead-lettered,
    # nothing written (the items were never started)
    assert invocation.returned == [f"message-{n}" for n in range(3)]
    assert generator.calls == []
    assert queues.receive_all(queues.dlq_url) == []
    assert ledger(db, concepts) == ledger_before
    assert len(invocation.events("retry_batch_start_failed")) == 1


def test_a_hanging_start_on_a_cold_container_waits_once(
    connection: Connection,
    queues: Queues,
    proxy: HangingProxy,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
    short_stage: float,
) -> None:
    # GIVEN a container with no connection yet, and a database that hangs
    bodies = planned(connection, queues, detect, 3)
    proxy.hang()

    invocation = invoke(bodies, worker, LONG_CONTEXT_SECONDS)

    # THEN the connect waited its one stage, and nothing tried again
    assert short_stage <= invocation.elapsed < 2 * short_stage
    assert len(invocation.returned) == 3
    assert generator.calls == []
    assert proxy.connections_accepted == 1


def test_a_hanging_start_on_a_warm_container_waits_once(
    connection: Connection,
    queues: Queues,
    proxy: HangingProxy,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
    short_stage: float,
) -> None:
    # GIVEN a container whose pooled connection an earlier invocation left
    # (as Lambda keeps it between invocations), and then a database that hangs
    bodies = planned(connection, queues, detect, 3)
    with worker.engine.connect() as warm:
        warm.execute(text("SELECT 1"))
    proxy.hang()

    invocation = invoke(bodies, worker, LONG_CONTEXT_SECONDS)

    # THEN every record goes back unpaid, in time...
    assert len(invocation.returned) == 3
    assert generator.calls == []
    assert invocation.elapsed < LONG_CONTEXT_SECONDS
    # ...after one wait: the ping's timeout is the database's first, and the
    # invocation should not try it again (it reconnects, and waits again)
    assert invocation.elapsed < 2 * short_stage, (
        f"{invocation.elapsed:.1f}s: {proxy.connections_accepted} connections"
    )


# --- b. hanging after generation -----------------------------------------------------


def second_wave_is_slow(
    proxy: HangingProxy, generator: CountingGenerator, parallelism: int, seconds: float
) -> Callable[[str, str], None]:
    """A ``before_call``: the database stops answering while the LLM answers the
    first call; the calls after the first ``parallelism`` take ``seconds`` (so
    they are still running when the first save times out, and the calls queued
    behind them would start after it).

    The worker submits every call of the batch at once to a pool of
    ``parallelism`` threads, each checking the breaker as it starts: without
    slow calls, every call would have started before the first save failed.
    """

    def llm_answering(concept_id: str, content_type: str) -> None:
        number = generator.calls.index((concept_id, content_type)) + 1
        if number == 1:
            proxy.hang()
        elif number > parallelism:
            time.sleep(seconds)

    return llm_answering


@pytest.mark.parametrize("parallelism", [1, 3])
def test_hanging_after_generation_dead_letters_what_was_generated_and_returns_the_rest_unpaid(
    connection: Connection,
    queues: Queues,
    db: Engine,
    proxy: HangingProxy,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
    short_stage: float,
    parallelism: int,
) -> None:
    # GIVEN 2 x parallelism + 2 messages, and a database that stops answering
    # while the LLM answers the first call (so the first save is the first to wait)
    slow_call = short_stage + 1.5
    bodies = planned(connection, queues, detect, 2 * parallelism + 2)
    concepts = [concept_of(body) for body in bodies]
    rows_before = tutorial_rows(db, concepts)
    worker.settings = worker.settings.model_copy(update={"generate_parallelism": parallelism})
    generator.before_call = second_wave_is_slow(proxy, generator, parallelism, slow_call)

    # WHEN the generate function is invoked
    invocation = invoke(bodies, worker, LONG_CONTEXT_SECONDS)

    # THEN the answer comes long before the deadline, after one database wait
    # (the rest of the time is the slow calls')...
    assert invocation.elapsed < short_stage + slow_call + 1
    # ...the messages whose calls had started are in the DLQ with their content
    # (the first after its save's wait, the others at once), and those whose
    # calls had not went back without an LLM call
    dead = dead_lettered(queues)
    generated, returned = assert_settled_by_the_breaker(invocation, bodies, generator, dead)
    assert generated == sorted(concepts[: 2 * parallelism])
    assert returned == sorted(concepts[2 * parallelism :])
    # ...because the database failed, not for lack of time
    reasons = [line["error"] for line in invocation.events("retry_record_returned")]
    assert len(reasons) == 2
    assert all("the database failed earlier in this invocation" in r for r in reasons)
    # ...and the ledger was left alone after the failure (its notes, skipped,
    # are the re-drive's to settle)
    assert {status for status, _, _ in ledger(db, concepts).values()} == {"running"}
    assert invocation.events("retry_ledger_not_updated")

    # WHEN the database answers again, the DLQ is re-driven and the rest delivered again
    proxy.resume()
    returned_bodies = [body for body in bodies if concept_of(body) in returned]
    assert_recovered_exactly_once(db, worker, generator, dead, returned_bodies, bodies, rows_before)


# --- c. hanging in the middle of a save ----------------------------------------------


@pytest.mark.parametrize("parallelism", [1, 2])
def test_hanging_in_the_middle_of_a_save_commits_nothing_and_loses_nothing(
    connection: Connection,
    queues: Queues,
    db: Engine,
    proxy: HangingProxy,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
    short_stage: float,
    parallelism: int,
) -> None:
    # GIVEN five messages, and a database that stops answering once the first
    # save's statement (the CTE that inserts the tutorial) has gone out to run
    slow_call = short_stage + 1.5
    bodies = planned(connection, queues, detect, 5)
    concepts = [concept_of(body) for body in bodies]
    rows_before = tutorial_rows(db, concepts)
    worker.settings = worker.settings.model_copy(update={"generate_parallelism": parallelism})
    proxy.hang_on_statement(b"INSERT INTO tutorials")

    def later_calls_slow(concept_id: str, content_type: str) -> None:
        if generator.calls.index((concept_id, content_type)) >= parallelism:
            time.sleep(slow_call)

    generator.before_call = later_calls_slow

    invocation = invoke(bodies, worker, LONG_CONTEXT_SECONDS)

    # THEN the save's statement did reach the server, which ran it: its session
    # sits in the open transaction, whose answer never came back...
    assert proxy.triggered.is_set()
    assert [state for state, _ in sessions_in_a_save(db)] == ["idle in transaction"]
    # ...the invocation answered in time after one database wait; what was
    # generated is in the DLQ with its content, the rest went back unpaid
    assert invocation.elapsed < short_stage + slow_call + 1
    dead = dead_lettered(queues)
    generated, returned = assert_settled_by_the_breaker(invocation, bodies, generator, dead)
    assert generated == sorted(concepts[: 2 * parallelism])
    assert returned == sorted(concepts[2 * parallelism :])
    # ...and nothing of the save is visible: the transaction never committed
    assert tutorial_rows(db, concepts) == rows_before
    assert {status for status, _, _ in ledger(db, concepts).values()} == {"running"}

    # WHEN the database answers again, the session's goodbye reaches it: the
    # transaction is rolled back, never committed
    proxy.resume()
    assert wait_for(lambda: sessions_in_a_save(db) == [])
    assert tutorial_rows(db, concepts) == rows_before

    returned_bodies = [body for body in bodies if concept_of(body) in returned]
    assert_recovered_exactly_once(db, worker, generator, dead, returned_bodies, bodies, rows_before)


# --- d. the deadline bounds the wait, and the answer comes in time -------------------


def test_a_save_hanging_past_the_deadline_answers_before_it_with_the_content_kept(
    connection: Connection,
    queues: Queues,
    db: Engine,
    proxy: HangingProxy,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
) -> None:
    # GIVEN the real 30 s socket cap, a context of 25 s (so the cap is never
    # reached: the deadline is), three messages, one call at a time, and a
    # database that stops answering in the middle of the first save
    bodies = planned(connection, queues, detect, 3)
    concepts = [concept_of(body) for body in bodies]
    rows_before = tutorial_rows(db, concepts)
    worker.settings = worker.settings.model_copy(update={"generate_parallelism": 1})
    proxy.hang_on_statement(b"INSERT INTO tutorials")

    invocation = invoke(bodies, worker, SHORT_CONTEXT_SECONDS)

    # THEN the save waited what the deadline left (25 s less the 15 s reserve,
    # less what came before it), once, and the answer came before the deadline,
    # with the reserve mostly unspent
    stage = SHORT_CONTEXT_SECONDS - GENERATE_RESERVE_SECONDS
    assert invocation.elapsed < SHORT_CONTEXT_SECONDS
    assert stage - 1 <= invocation.elapsed < stage + 2
    # ...every call had started before the save failed (the worker submits the
    # batch's calls at once and these answer at once): all three are in the DLQ
    # with their content, the first after its wait, the others without one
    dead = dead_lettered(queues)
    generated, returned = assert_settled_by_the_breaker(invocation, bodies, generator, dead)
    assert generated == sorted(concepts)
    assert returned == []

    proxy.resume()
    assert wait_for(lambda: sessions_in_a_save(db) == [])
    assert_recovered_exactly_once(db, worker, generator, dead, [], bodies, rows_before)


def test_the_ledger_counts_the_call_paid_before_the_save_hung(
    connection: Connection,
    queues: Queues,
    db: Engine,
    proxy: HangingProxy,
    generator: CountingGenerator,
    detect: DetectDependencies,
    worker: WorkerDependencies,
    short_stage: float,
) -> None:
    # GIVEN one message whose save hangs, and its DLQ copy re-driven once the
    # database answers again
    bodies = planned(connection, queues, detect, 1)
    concept = concept_of(bodies[0])
    generator.before_call = lambda *_: proxy.hang()
    first = invoke(bodies, worker, LONG_CONTEXT_SECONDS)
    assert first.returned == []
    proxy.resume()
    dead = dead_lettered(queues)
    assert redrive([dead[concept]], worker).returned == []

    # THEN the item is saved, its one LLM call paid once...
    assert len(generator.calls) == 1
    assert ledger(db, [concept])[concept][0] == "succeeded"
    # ...and the ledger (the task's view of its cost) counts that call
    assert ledger(db, [concept])[concept][2] == 1
