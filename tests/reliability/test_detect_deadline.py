"""The detect function against a database that stops answering (DESIGN §12).

The database here *hangs*: a TCP server that accepts connections and never
replies, or a proxy to the test database that stops forwarding, either way,
while every connection stays open (a stalled RDS Proxy borrow, a network
black hole). The Lambda context's remaining time runs down with the real
clock. Every bound asserted is one the code guarantees (the deadline), not a
performance figure; the budgets are short so the suite stays quick.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, make_url, text

from content_retry import api
from content_retry.database import build_engine
from content_retry.retries import DatabaseNotAnsweringError, DetectDependencies
from content_retry.settings import Settings
from content_retry_local.faults import ClockContext
from content_retry_local.seed import (
    SEED_ROADMAP_ID,
    ConceptSeed,
    insert_roadmap,
    seed_scenario,
    single_module_framework,
)
from functions.detect.app import lambda_handler
from tests.conftest import Queues
from tests.support import FlakySqs, detect_deps, load_event

UNKNOWN_TASK = "9b2c0f4e-3d1a-4c55-9a8e-2f6d7c1b5a90"


class StallingDatabase:
    """A TCP endpoint on 127.0.0.1 that forwards to ``upstream`` until
    :meth:`hang`, then forwards nothing more, either way, and answers no new
    connection, holding every socket open. Without an upstream it hangs from
    the start: a server that accepts and never replies."""

    def __init__(self, upstream: Callable[[], socket.socket] | None = None) -> None:
        self._upstream = upstream
        self._hanging = threading.Event()
        if upstream is None:
            self._hanging.set()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def hang(self) -> None:
        self._hanging.set()

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(client)
            if self._hanging.is_set() or self._upstream is None:
                continue  # accepted, never answered
            server = self._upstream()
            self._keep(server)
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self._hanging.is_set():
                    target.sendall(data)
        except OSError:
            pass  # closed at the end of the test

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            for sock in self._sockets:
                sock.close()


def _upstream_of(database_url: str) -> Callable[[], socket.socket]:
    """How to reach the test database: its Unix socket (the embedded one) or TCP."""
    url = make_url(database_url)
    unix_sock = url.query.get("unix_sock")
    if isinstance(unix_sock, str):

        def connect_unix() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(unix_sock)
            return sock

        return connect_unix
    host, port = url.host or "127.0.0.1", url.port or 5432
    return lambda: socket.create_connection((host, port))


def _through(database_url: str, port: int) -> str:
    """The test database's URL, reached through 127.0.0.1:``port`` instead."""
    url = make_url(database_url).set(drivername="postgresql", host="127.0.0.1", port=port)
    return url.difference_update_query(["unix_sock", "host"]).render_as_string(hide_password=False)


def _refused_port() -> int:
    """A port on 127.0.0.1 with nothing listening: connecting is refused at once."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def stalling() -> Iterator[Callable[..., StallingDatabase]]:
    made: list[StallingDatabase] = []

    def make(upstream: Callable[[], socket.socket] | None = None) -> StallingDatabase:
        made.append(StallingDatabase(upstream))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def engines() -> Iterator[Callable[[str], Engine]]:
    """Engines as the detect function builds them (one connection), disposed at the end."""
    made: list[Engine] = []

    def make(database_url: str) -> Engine:
        made.append(build_engine(Settings(DATABASE_URL=database_url)))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def short_api_deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    """The API's cap shortened from 27 s to 2 s (1 s kept to answer): the same
    code path as API Gateway's 29 s, in a fraction of the time."""
    monkeypatch.setattr(api, "API_AT_MOST_SECONDS", 2.0)
    monkeypatch.setattr(api, "API_RESERVE_SECONDS", 1.0)
    return 2.0


def retry_event() -> dict[str, Any]:
    return copy.deepcopy(load_event("api-retry.json"))


def task_event(task_id: str = UNKNOWN_TASK) -> dict[str, Any]:
    event = copy.deepcopy(load_event("api-task-status.json"))
    event["path"] = f"/retry-tasks/{task_id}"
    event["pathParameters"] = {"task_id": task_id}
    return event


ROUTES = {"POST retry": retry_event, "GET task": task_event}


def call(
    event: dict[str, Any], context: ClockContext, deps: DetectDependencies
) -> tuple[dict[str, Any], float]:
    """The handler's answer (nothing may escape it) and the seconds it took."""
    started = time.monotonic()
    response = lambda_handler(event, context, deps=deps)
    return response, time.monotonic() - started


def header(response: dict[str, Any], name: str) -> str | None:
    for key, value in (response.get("headers") or {}).items():
        if key.lower() == name.lower():
            return str(value)
    for key, values in (response.get("multiValueHeaders") or {}).items():
        if key.lower() == name.lower():
            return str(values[0])
    return None


def assert_database_503(response: dict[str, Any]) -> dict[str, Any]:
    assert response["statusCode"] == 503, response
    assert header(response, "Retry-After") == str(api.DATABASE_RETRY_AFTER_SECONDS)
    assert header(response, "Content-Type") == "application/json"
    body: dict[str, Any] = json.loads(response["body"])
    assert body["success"] is False
    assert "database is not answering" in body["message"]
    assert "retry later" in body["message"]
    return body


def ledger_rows(db: Engine) -> tuple[int, int]:
    with db.connect() as connection:
        tasks = connection.execute(text("SELECT count(*) FROM retry_tasks")).scalar_one()
        items = connection.execute(text("SELECT count(*) FROM retry_items")).scalar_one()
    return int(tasks), int(items)


def test_the_api_deadline_answers_before_api_gateways_timeout() -> None:
    work = api.API_AT_MOST_SECONDS - api.API_RESERVE_SECONDS
    assert 0 < work < api.API_AT_MOST_SECONDS < api.API_GATEWAY_TIMEOUT_SECONDS == 29


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bound", ["api cap", "context"])
def test_a_hanging_database_gets_a_503_before_the_deadline(
    queues: Queues,
    stalling: Callable[..., StallingDatabase],
    engines: Callable[[str], Engine],
    monkeypatch: pytest.MonkeyPatch,
    route: str,
    bound: str,
) -> None:
    # GIVEN a database that accepts connections and never replies, and either
    # the API's own cap (shortened to 2 s) or a context with 3 s left as the
    # tighter bound
    server = stalling()
    deps = detect_deps(
        engines(f"postgresql://postgres@127.0.0.1:{server.port}/postgres"), queues.sqs
    )
    if bound == "api cap":
        monkeypatch.setattr(api, "API_AT_MOST_SECONDS", 2.0)
        monkeypatch.setattr(api, "API_RESERVE_SECONDS", 1.0)
        context, limit = ClockContext(8.0), 2.0
    else:
        context, limit = ClockContext(3.0), 3.0

    # WHEN a signed-in user calls the route
    response, elapsed = call(ROUTES[route](), context, deps)

    # THEN a 503 with Retry-After, from the handler (no exception), before the deadline
    print(f"\n{route}, {bound}: 503 after {elapsed:.2f}s (bound {limit:.0f}s)")
    assert_database_503(response)
    assert elapsed < limit
    assert context.get_remaining_time_in_millis() > 0
    assert queues.depth() == 0


@pytest.mark.parametrize("route", ROUTES)
def test_a_refused_connection_gets_a_503_at_once(
    queues: Queues, engines: Callable[[str], Engine], route: str
) -> None:
    deps = detect_deps(
        engines(f"postgresql://postgres@127.0.0.1:{_refused_port()}/postgres"), queues.sqs
    )
    context = ClockContext(8.0)

    response, elapsed = call(ROUTES[route](), context, deps)

    print(f"\n{route}, connection refused: 503 after {elapsed:.3f}s")
    assert_database_503(response)
    assert elapsed < 1.0  # no wait: the database said no


def test_a_database_that_stops_answering_before_the_commit_leaves_nothing_claimed(
    db: Engine,
    queues: Queues,
    database_url: str,
    stalling: Callable[..., StallingDatabase],
    engines: Callable[[str], Engine],
    short_api_deadline: float,
) -> None:
    # GIVEN the seed's 21 lost tutorials, and the detect function's engine
    # connected through a proxy (its first request answered: a connection pooled)
    with db.begin() as connection:
        seed_scenario(connection)
    proxy = stalling(_upstream_of(database_url))
    deps = detect_deps(engines(_through(database_url, proxy.port)), queues.sqs)
    first, _ = call(task_event(), ClockContext(8.0), deps)
    assert first["statusCode"] == 404

    # WHEN the database stops answering, and the owner asks for the retry
    proxy.hang()
    response, elapsed = call(retry_event(), ClockContext(8.0), deps)

    # THEN a 503 before the deadline, and nothing claimed or queued...
    print(f"\nhang before commit: 503 after {elapsed:.2f}s (bound {short_api_deadline:.0f}s)")
    assert_database_503(response)
    assert elapsed < short_api_deadline
    assert ledger_rows(db) == (0, 0)
    assert queues.depth() == 0
    # ...so the next request, once the database answers, plans all 21 at once
    again, _ = call(retry_event(), ClockContext(8.0), detect_deps(db, queues.sqs))
    assert (again["statusCode"], json.loads(again["body"])["retried_count"]) == (202, 21)


class HangAfterSend(FlakySqs):
    """SQS whose batches are sent, after which the database stops answering:
    the deadline runs out between the send and its record (mark_sent)."""

    proxy: StallingDatabase

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:
        response = super().send_message_batch(QueueUrl=QueueUrl, Entries=Entries)
        self.proxy.hang()
        return response


@pytest.mark.parametrize("refused", [False, True], ids=["sent", "queue refused"])
def test_a_database_that_stops_answering_after_the_send_answers_what_was_queued(
    db: Engine,
    queues: Queues,
    database_url: str,
    stalling: Callable[..., StallingDatabase],
    engines: Callable[[str], Engine],
    short_api_deadline: float,
    refused: bool,
) -> None:
    # GIVEN the seed, and a database that stops answering once the messages
    # are sent (or refused), after the task and its claims were committed
    with db.begin() as connection:
        seed_scenario(connection)
    proxy = stalling(_upstream_of(database_url))
    sqs = HangAfterSend(queues.sqs, fails=lambda body: refused)
    sqs.proxy = proxy
    deps = detect_deps(engines(_through(database_url, proxy.port)), sqs)

    # WHEN the owner asks for the retry
    response, elapsed = call(retry_event(), ClockContext(8.0), deps)
    body = json.loads(response["body"])

    # THEN the answer says what was queued, before the deadline
    print(
        f"\nhang after send ({'refused' if refused else 'sent'}): {response['statusCode']} "
        f"after {elapsed:.2f}s (bound {short_api_deadline:.0f}s)"
    )
    assert elapsed < short_api_deadline
    with db.connect() as connection:
        items = connection.execute(
            text(
                "SELECT status, sent_at IS NULL AS unrecorded, count(*) FROM retry_items "
                "GROUP BY 1, 2"
            )
        ).all()
    # Nothing recorded and nothing released: every claim holds for the lease only
    assert [tuple(row) for row in items] == [("queued", True, 21)]
    if refused:
        # nothing queued: the queue's 503, claims left to their lease
        assert response["statusCode"] == 503
        assert header(response, "Retry-After") == str(api.DATABASE_RETRY_AFTER_SECONDS)
        assert (body["retried_count"], body["success"]) == (0, False)
        assert "once their claim lease has passed" in body["message"]
        assert queues.depth() == 0
    else:
        # queued: a 202 with the task, the messages on their way to the worker
        assert response["statusCode"] == 202
        assert (body["retried_count"], body["success"]) == (21, True)
        assert body["task_id"]
        assert queues.depth() == 21
    # AND while the claims are live, nothing is planned twice
    again, _ = call(retry_event(), ClockContext(8.0), detect_deps(db, queues.sqs))
    assert (again["statusCode"], json.loads(again["body"])["retried_count"]) == (200, 0)


def test_a_direct_invoke_raises_a_clear_error_before_its_time_runs_out(
    queues: Queues,
    stalling: Callable[..., StallingDatabase],
    engines: Callable[[str], Engine],
) -> None:
    server = stalling()
    deps = detect_deps(
        engines(f"postgresql://postgres@127.0.0.1:{server.port}/postgres"), queues.sqs
    )
    context = ClockContext(3.0)
    started = time.monotonic()

    with pytest.raises(DatabaseNotAnsweringError, match="invoke again later"):
        lambda_handler({"roadmap_id": SEED_ROADMAP_ID}, context, deps=deps)

    elapsed = time.monotonic() - started
    print(f"\ndirect invoke: raised after {elapsed:.2f}s (context {context.seconds:.0f}s)")
    assert elapsed < context.seconds
    assert context.get_remaining_time_in_millis() > 0


def test_the_sweep_raises_a_clear_error_before_its_time_runs_out(
    queues: Queues,
    stalling: Callable[..., StallingDatabase],
    engines: Callable[[str], Engine],
) -> None:
    server = stalling()
    deps = detect_deps(
        engines(f"postgresql://postgres@127.0.0.1:{server.port}/postgres"), queues.sqs
    )
    context = ClockContext(3.0)
    started = time.monotonic()

    with pytest.raises(DatabaseNotAnsweringError, match="the sweep stopped"):
        lambda_handler(load_event("schedule-sweep.json"), context, deps=deps)

    elapsed = time.monotonic() - started
    print(f"\nsweep: raised after {elapsed:.2f}s (context {context.seconds:.0f}s)")
    assert elapsed < context.seconds
    assert context.get_remaining_time_in_millis() > 0


def test_a_sweep_the_database_stops_answering_midway_stops_there_in_time(
    db: Engine,
    queues: Queues,
    database_url: str,
    stalling: Callable[..., StallingDatabase],
    engines: Callable[[str], Engine],
) -> None:
    # GIVEN three roadmaps needing work, and a database that stops answering
    # once the first one's messages are sent
    with db.begin() as connection:
        for number in range(3):
            lost = ConceptSeed("c1", "A", "a", {"content_status": None})
            insert_roadmap(
                connection,
                f"r{number}",
                f"u-{number}",
                single_module_framework([lost]),
                age_minutes=600,
            )
    proxy = stalling(_upstream_of(database_url))
    sqs = HangAfterSend(queues.sqs)
    sqs.proxy = proxy
    deps = detect_deps(engines(_through(database_url, proxy.port)), sqs)
    # a roadmap is started with 1 s left (not 10): the short budget lets it start
    deps.settings = deps.settings.model_copy(update={"sweep_reserve_seconds": 1})
    context = ClockContext(4.0)
    started = time.monotonic()

    # WHEN the schedule fires
    with pytest.raises(DatabaseNotAnsweringError) as raised:
        lambda_handler(load_event("schedule-sweep.json"), context, deps=deps)

    # THEN the sweep stops at the database's first failure, saying how far it
    # got, before its time runs out; the roadmap it planned is queued
    elapsed = time.monotonic() - started
    print(f"\nsweep, hang midway: raised after {elapsed:.2f}s (context {context.seconds:.0f}s)")
    assert "the sweep stopped" in str(raised.value)
    assert "1 roadmap(s) judged, 1 planned" in str(raised.value)
    assert elapsed < context.seconds
    assert queues.depth() == 1
