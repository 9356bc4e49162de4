"""Faults to stage against PostgreSQL: a database that stops answering (:class:`HangingProxy`).

Also :class:`ClockContext`, a Lambda context whose remaining time runs with the real clock.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from aws_lambda_powertools.utilities.typing import LambdaContext
from sqlalchemy.engine import URL, make_url

# How often a blocked thread looks up to see whether the proxy is closing.
_POLL_SECONDS = 0.05
_CHUNK = 65_536
# Untyped startup messages after which another untyped one follows (the server
# answers SSLRequest and GSSENCRequest with one byte, then the startup comes).
_NEGOTIATION_CODES = {80_877_103, 80_877_104}
# A frontend message longer than this is not PostgreSQL's protocol (or it is
# encrypted): the connection's messages are no longer read for triggers.
_MAX_MESSAGE_BYTES = 1 << 30


class ProxyError(RuntimeError):
    """The proxy was given an upstream it must not reach, or could not start."""


Upstream = str | tuple[str, int]


def _loopback_address(host: str, port: int) -> tuple[str, int]:
    """The first address of ``host`` if every address it resolves to is loopback.

    Raises:
        ProxyError: the host resolves to anything but loopback.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProxyError(f"cannot resolve {host!r}: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise ProxyError(f"{host!r} is not a loopback address: the proxy only forwards locally")
    return addresses[0], port


def upstream_of(database_url: str) -> Upstream:
    """Where a database URL's server listens: a Unix socket path, or (host, port).

    Understands pg8000's ``unix_sock`` query, libpq's ``host=/socket/dir`` query,
    and a TCP host (which must be loopback for :class:`HangingProxy`).
    """
    url = make_url(database_url)
    unix_sock = url.query.get("unix_sock")
    if isinstance(unix_sock, str):
        return unix_sock
    socket_dir = url.query.get("host")
    if isinstance(socket_dir, str) and socket_dir.startswith("/"):
        return f"{socket_dir}/.s.PGSQL.{url.port or 5432}"
    return (url.host or "127.0.0.1", url.port or 5432)


class _FrontendMessages:
    """Splits what a PostgreSQL client sends into its protocol messages.

    The first message (and the one after an SSL or GSS negotiation request)
    has no type byte; every later one is a type byte, a length, a body.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._startup = True
        self.readable = True

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The messages ``data`` completes, as (type, body); b"" for an untyped one."""
        if not self.readable:
            return []
        self._buffer += data
        messages: list[tuple[bytes, bytes]] = []
        while (message := self._next()) is not None:
            messages.append(message)
        return messages

    def _next(self) -> tuple[bytes, bytes] | None:
        buffer = self._buffer
        header = 4 if self._startup else 5
        if len(buffer) < header:
            return None
        length = int.from_bytes(buffer[header - 4 : header], "big")
        if not 4 <= length <= _MAX_MESSAGE_BYTES:
            self.readable = False  # not the protocol (TLS, say): stop reading it
            self._buffer.clear()
            return None
        total = header - 4 + length
        if len(buffer) < total:
            return None
        kind = b"" if self._startup else bytes(buffer[:1])
        body = bytes(buffer[header:total])
        del buffer[:total]
        if self._startup and int.from_bytes(body[:4], "big") not in _NEGOTIATION_CODES:
            self._startup = False
        return kind, body


@dataclass
class _Trigger:
    """When to hang: ``kind`` is ``bytes`` (the pattern in the client's bytes),
    ``statement`` (the execution of a statement whose text holds the pattern)
    or ``query`` (any statement's execution); fires on the ``remaining``-th."""

    kind: str
    pattern: bytes
    remaining: int


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.messages = _FrontendMessages()
        # The last statement the client parsed (extended protocol) holds the pattern.
        self.parsed_match = False
        self.tail = b""
        self.threads: list[threading.Thread] = []

    def close(self) -> None:
        for sock in (self.client, self.server):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class HangingProxy:
    """A TCP proxy on 127.0.0.1 in front of a local PostgreSQL that can stop answering.

    While it hangs, no byte is forwarded in either direction on any connection
    (bytes already read are held, not dropped, and go on after
    :meth:`resume`), nothing is closed, and a new connection is accepted but
    never answered (nor connected upstream). So a client waits for its socket's
    timeout, as it would on a stalled RDS Proxy or a network black hole, and
    the server keeps whatever transaction the client had open until the
    client's bytes (its goodbye included) flow again, or the proxy closes.

    Args:
        upstream: the server's Unix socket path, or (host, port) on loopback.
        max_connections: connections held at once; one more is closed at once.

    Raises:
        ProxyError: the upstream host is not a loopback address.

    Use as a context manager (or call :meth:`close`); clients connect to
    :meth:`url_for`.
    """

    def __init__(self, upstream: Upstream, *, max_connections: int = 16) -> None:
        self._upstream: Upstream = (
            upstream if isinstance(upstream, str) else _loopback_address(*upstream)
        )
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closing = threading.Event()
        self._links: list[_Link] = []
        self._trigger: _Trigger | None = None
        # Set once a trigger fired (the chosen statement went out).
        self.triggered = threading.Event()
        # time.monotonic() of the latest hang(), and how often it began.
        self.hung_at: float | None = None
        self.hangs = 0
        self.connections_accepted = 0
        self.connections_refused = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept, name="hanging-proxy-accept", daemon=True
        )
        self._acceptor.start()

    @classmethod
    def to_database(cls, database_url: str, *, max_connections: int = 16) -> HangingProxy:
        """A proxy in front of the server ``database_url`` names (see :func:`upstream_of`)."""
        return cls(upstream_of(database_url), max_connections=max_connections)

    # -- addresses ---------------------------------------------------------------

    def url_for(self, database_name: str, user: str, password: str | None = None) -> str:
        """A ``postgresql://`` URL reaching ``database_name`` as ``user`` through the proxy."""
        url = URL.create(
            "postgresql",
            username=user,
            password=password,
            host="127.0.0.1",
            port=self.port,
            database=database_name,
        )
        return url.render_as_string(hide_password=False)

    def url_through(self, database_url: str) -> str:
        """``database_url``'s database and user, reached through the proxy."""
        url = make_url(database_url)
        return self.url_for(url.database or "postgres", url.username or "postgres", url.password)

    # -- faults ------------------------------------------------------------------

    @property
    def hanging(self) -> bool:
        return not self._flowing.is_set()

    def hang(self) -> None:
        """Stop answering: forward nothing more, either way, on any connection."""
        with self._lock:
            if self._flowing.is_set():
                self.hung_at = time.monotonic()
                self.hangs += 1
            self._flowing.clear()

    def resume(self) -> None:
        """Forward again, held bytes first; connections accepted meanwhile are served."""
        self._flowing.set()

    def hang_when_client_sends(self, pattern: bytes, *, occurrence: int = 1) -> None:
        """Hang once a client has sent ``pattern`` (its ``occurrence``-th time, on
        any connection): the bytes that carry it still go out, nothing after."""
        self._arm(_Trigger("bytes", pattern, occurrence))

    def hang_on_statement(self, pattern: bytes, *, occurrence: int = 1) -> None:
        """Hang once a client has asked the server to run a statement whose text
        holds ``pattern`` (its ``occurrence``-th run): the request to run it goes
        out, so the server runs it; its answer, and everything after, does not
        come back. A simple query counts when sent, an extended-protocol one
        (pg8000's) when its Execute is sent."""
        self._arm(_Trigger("statement", pattern, occurrence))

    def hang_on_query(self, number: int) -> None:
        """Hang once the ``number``-th statement from now has gone out to run
        (every one counts: a pool's ping, pg8000's ``begin transaction``, a commit)."""
        self._arm(_Trigger("query", b"", number))

    def disarm(self) -> None:
        """Forget a trigger that has not fired."""
        with self._lock:
            self._trigger = None

    def wait_until_hanging(self, timeout: float) -> bool:
        """Whether the proxy hangs (a trigger fired) within ``timeout`` seconds."""
        ends = time.monotonic() + timeout
        while not self.hanging:
            if time.monotonic() >= ends:
                return False
            time.sleep(_POLL_SECONDS / 5)
        return True

    def _arm(self, trigger: _Trigger) -> None:
        if trigger.remaining < 1:
            raise ValueError("the occurrence to hang on counts from 1")
        with self._lock:
            self._trigger = trigger
            self.triggered.clear()

    # -- connections -------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            with self._lock:
                if len(self._links) >= self._max_connections:
                    self.connections_refused += 1
                    client.close()
                    continue
                client.settimeout(None)
                link = _Link(client)
                self._links.append(link)
                self.connections_accepted += 1
            thread = threading.Thread(
                target=self._serve, args=(link,), name="hanging-proxy-link", daemon=True
            )
            link.threads.append(thread)
            thread.start()

    def _wait_flowing(self) -> bool:
        """Block while the proxy hangs; False when it is closing instead."""
        while not self._flowing.wait(_POLL_SECONDS):
            if self._closing.is_set():
                return False
        return not self._closing.is_set()

    def _serve(self, link: _Link) -> None:
        try:
            # Silent until the database answers again: not even connected upstream.
            if not self._wait_flowing():
                return
            link.server = self._connect_upstream()
            back = threading.Thread(
                target=self._pump,
                args=(link, link.server, link.client, False),
                name="hanging-proxy-from-server",
                daemon=True,
            )
            link.threads.append(back)
            back.start()
            self._pump(link, link.client, link.server, True)
            back.join()
        except OSError:
            pass  # the upstream refused, or the proxy is closing
        finally:
            link.close()
            with self._lock:
                if link in self._links:
                    self._links.remove(link)

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self._upstream, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self._upstream)
            except OSError:
                sock.close()
                raise
            return sock
        sock = socket.create_connection(self._upstream, timeout=10)
        sock.settimeout(None)
        return sock

    def _pump(
        self, link: _Link, source: socket.socket, target: socket.socket, from_client: bool
    ) -> None:
        """Forward ``source`` to ``target`` while the proxy flows, until either ends."""
        try:
            while not self._closing.is_set():
                # Blocking sockets (a send waits for its reader, however slow);
                # the poll only lets a closing proxy stop its threads.
                readable, _, _ = select.select([source], [], [], _POLL_SECONDS)
                if not readable:
                    continue
                data = source.recv(_CHUNK)
                fires = from_client and bool(data) and self._fires(link, data)
                if fires:
                    self.hang()  # before the bytes go: their answer must not come back
                    self.triggered.set()
                elif not self._wait_flowing():
                    return
                if not data:
                    target.shutdown(socket.SHUT_WR)  # the client's goodbye goes on too
                    return
                target.sendall(data)
        except (OSError, ValueError):  # ValueError: select on a socket closed meanwhile
            link.close()  # a reset on either side ends both

    def _fires(self, link: _Link, data: bytes) -> bool:
        """Whether the client's ``data`` completes what the armed trigger waits for."""
        messages = link.messages.feed(data)
        with self._lock:
            trigger = self._trigger
            if trigger is None:
                return False
            if trigger.kind == "bytes":
                seen = (link.tail + data).count(trigger.pattern)
                link.tail = (link.tail + data)[-max(len(trigger.pattern) - 1, 0) :]
            else:
                seen = self._executions(link, messages, trigger)
            if seen < trigger.remaining:
                trigger.remaining -= seen
                return False
            self._trigger = None
            return True

    @staticmethod
    def _executions(link: _Link, messages: list[tuple[bytes, bytes]], trigger: _Trigger) -> int:
        """How many statements the trigger counts among ``messages`` (simple
        queries, and executions of the last parsed statement)."""
        seen = 0
        for kind, body in messages:
            if kind == b"Q":
                seen += trigger.pattern in body
            elif kind == b"P":
                link.parsed_match = trigger.pattern in body
            elif kind == b"E":
                seen += link.parsed_match
        return seen

    # -- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, close every connection (the server then ends their
        sessions, rolling back what they left open), and stop every thread."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        for link in links:
            for thread in link.threads:
                thread.join(timeout=5)

    def __enter__(self) -> HangingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class ClockContext(LambdaContext):
    """A Lambda context whose remaining time runs down with the real clock.

    ``get_remaining_time_in_millis()`` is the deadline less ``time.monotonic()``,
    as Lambda's own is: a handler that waits spends its invocation's time.

    Args:
        seconds: the invocation's timeout, counted from now.
    """

    def __init__(self, seconds: float, *, function_name: str = "content-retry-local") -> None:
        self._function_name = function_name
        self._function_version = "$LATEST"
        self._invoked_function_arn = (
            f"arn:aws:lambda:us-east-1:000000000000:function:{function_name}"
        )
        self._memory_limit_in_mb = 512
        self._aws_request_id = "00000000-0000-4000-8000-000000000001"
        self._log_group_name = f"/aws/lambda/{function_name}"
        self._log_stream_name = "local/[$LATEST]clock"
        self.seconds = seconds
        self.started = time.monotonic()
        self.deadline = self.started + seconds

    def get_remaining_time_in_millis(self) -> int:  # type: ignore[override]
        return max(0, int((self.deadline - time.monotonic()) * 1000))

    def elapsed(self) -> float:
        """Seconds since the context was made."""
        return time.monotonic() - self.started
