"""Database access from Lambda (DESIGN §7): one lazily created engine per process,
one connection, pinged before use; nothing that pins an RDS Proxy session."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError, SQLAlchemyError

from content_retry import deadlines
from content_retry.settings import Settings, SettingsError, get_settings

ConnectParams = dict[str, Any]


class DatabaseUnavailableError(ConnectionError):
    """The database failed or hung earlier in this invocation: not tried again.

    A database that hangs makes every statement wait for its timeout; one
    that fails once in an invocation usually fails the rest of it too.
    """


# Failures of the database, whatever the driver raised: pg8000 lets a reset
# socket's OSError escape unwrapped; a timed-out socket, a deadline that left
# no time for a statement and a connection given up on are OSErrors too.
DATABASE_ERRORS = (SQLAlchemyError, OSError)


def sqlstate(error: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE code of a failed statement (pg8000 carries it as ``C``)."""
    details = getattr(getattr(error, "orig", None), "args", ())
    if details and isinstance(details[0], dict):
        code = details[0].get("C")
        return code if isinstance(code, str) else None
    return None


def refused_data(error: BaseException) -> bool:
    """Whether the database refused the data itself (SQLSTATE class 22, a data
    exception): unlike a lost connection, trying again cannot help."""
    code = sqlstate(error)
    return code is not None and code.startswith("22")


_DRIVER = "postgresql+pg8000"

# pg8000's socket timeout, seconds. Without one, a connection black-holed by a
# failover waits until Lambda kills the invocation, taking with it the chance
# to dead-letter the content just generated. Every statement here takes
# milliseconds; statement_timeout on the database role bounds the server side.
SOCKET_TIMEOUT_SECONDS = 30


def normalise_database_url(database_url: str) -> URL:
    """Turn a ``postgresql://`` URL (as libpq tools write it) into one for pg8000.

    A ``host=/socket/dir`` query (libpq's way of naming a Unix socket) becomes
    pg8000's ``unix_sock``.

    Raises:
        SettingsError: the URL is not a PostgreSQL URL.
    """
    url = make_url(database_url)
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise SettingsError(f"DATABASE_URL must be a postgresql:// URL, not {url.drivername}://")
    url = url.set(drivername=_DRIVER)
    socket_dir = url.query.get("host")
    if isinstance(socket_dir, str) and socket_dir.startswith("/"):
        port = url.port or 5432
        url = url.difference_update_query(["host"]).update_query_dict(
            {"unix_sock": f"{socket_dir}/.s.PGSQL.{port}"}
        )
    return url


def _tcp_or_socket(host: str, port: int) -> ConnectParams:
    """pg8000 connect arguments for a host name, or for a socket directory."""
    if host.startswith("/"):
        return {"unix_sock": f"{host}/.s.PGSQL.{port}", "timeout": SOCKET_TIMEOUT_SECONDS}
    # RDS Proxy requires TLS; its certificates chain to Amazon's public roots,
    # which the default trust store holds.
    return {
        "host": host,
        "port": port,
        "ssl_context": ssl.create_default_context(),
        "timeout": SOCKET_TIMEOUT_SECONDS,
    }


def iam_connect_params(settings: Settings, rds_client: Any) -> ConnectParams:
    """Connect arguments with a fresh IAM auth token as the password.

    Tokens live 15 minutes, so one is generated for every new connection
    rather than once per process.
    """
    host = settings.require("db_host")
    user = settings.require("db_user")
    token = rds_client.generate_db_auth_token(
        DBHostname=host, Port=settings.db_port, DBUsername=user, Region=settings.aws_region
    )
    return {
        **_tcp_or_socket(host, settings.db_port),
        "user": user,
        "database": settings.require("db_name"),
        "password": token,
    }


def secret_connect_params(settings: Settings, secrets_client: Any) -> ConnectParams:
    """Connect arguments from the Secrets Manager secret that RDS keeps.

    Read for every new connection, so a rotated password is picked up. The
    secret's ``host``/``port`` are used only when DB_HOST is not set (the proxy
    endpoint differs from the instance the secret describes).

    Raises:
        SettingsError: the secret is not the JSON RDS writes (username, password).
    """
    arn = settings.require("db_secret_arn")
    raw = secrets_client.get_secret_value(SecretId=arn)["SecretString"]
    try:
        secret = json.loads(raw)
        username, password = secret["username"], secret["password"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SettingsError(
            f"secret {arn} must be JSON with 'username' and 'password' (as RDS writes it)"
        ) from exc
    host = settings.db_host or secret.get("host")
    if not host:
        raise SettingsError("DB_HOST is not set and the secret names no host")
    port = settings.db_port if settings.db_host else int(secret.get("port", settings.db_port))
    return {
        **_tcp_or_socket(str(host), port),
        "user": settings.db_user or username,
        "database": settings.db_name or secret.get("dbname", "postgres"),
        "password": password,
    }


def build_engine(
    settings: Settings,
    *,
    connect_params: Callable[[], ConnectParams] | None = None,
    pool_size: int = 1,
) -> Engine:
    """Create an engine for the configured database.

    Args:
        settings: ``DATABASE_URL``, or ``DB_*`` with ``DB_AUTH=iam|secret``.
        connect_params: resolves credentials for each new connection; by default
            derived from ``settings`` (IAM token or Secrets Manager).
        pool_size: connections this process may hold; 1 in Lambda (one request
            at a time per container), more only for local multi-threaded tools.

    Raises:
        SettingsError: the settings describe no database.
    """
    pool_args: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": 0,
        # Give up quickly rather than queue behind a saturated pool.
        "pool_timeout": 10,
    }
    if settings.database_url:
        engine = create_engine(
            normalise_database_url(settings.database_url),
            connect_args={"timeout": SOCKET_TIMEOUT_SECONDS},
            **pool_args,
        )
        _bound_by_deadline(engine)
        return engine
    if settings.db_auth is None:
        raise SettingsError("set DATABASE_URL, or DB_HOST/DB_NAME/DB_USER with DB_AUTH=iam|secret")

    if connect_params is None:
        connect_params = _default_connect_params(settings)
    engine = create_engine(URL.create(_DRIVER), **pool_args)
    _bound_by_deadline(engine)
    resolve = connect_params

    @event.listens_for(engine, "do_connect")
    def _credentials_per_connection(
        dialect: Any, conn_rec: Any, cargs: Any, cparams: ConnectParams
    ) -> None:
        try:
            cparams.update(resolve())
        except Exception as exc:
            # Credentials that cannot be had (Secrets Manager unreachable, no
            # IAM credentials) are a connection that could not be made, and
            # callers handle them as one.
            raise ConnectionError(f"no database credentials: {exc}") from exc

    return engine


def _bound_by_deadline(engine: Engine) -> None:
    """Bound every connect, ping and statement of ``engine`` by the deadline in
    force (:mod:`content_retry.deadlines`): the socket waits at most
    SOCKET_TIMEOUT_SECONDS, or what is left of the invocation if less. A
    database that hangs then costs the invocation a timeout, never its answer.
    """

    @event.listens_for(engine, "do_connect")
    def _connect_timeout(dialect: Any, conn_rec: Any, cargs: Any, cparams: ConnectParams) -> None:
        cparams["timeout"] = deadlines.current().stage(SOCKET_TIMEOUT_SECONDS)

    @event.listens_for(engine, "before_cursor_execute")
    def _statement_timeout(connection: Connection, cursor: Any, *_: Any) -> None:
        _bound_socket(connection.connection.dbapi_connection)

    event.listen(engine, "checkout", _ping_on_checkout)


def _bound_socket(dbapi_connection: Any) -> None:
    """Give the connection's socket the current stage's time (pg8000 keeps it as
    ``_usock``; a driver without one keeps its connect-time timeout).

    Raises:
        DeadlineExceededError: no time is left for a statement.
    """
    seconds = deadlines.current().stage(SOCKET_TIMEOUT_SECONDS)
    sock = getattr(dbapi_connection, "_usock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _timed_out(error: BaseException) -> bool:
    """Whether a driver error was its socket's timeout (pg8000 wraps it)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _ping_on_checkout(dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
    """Pre-ping: replace a pooled connection that the server or proxy dropped.

    This is SQLAlchemy's ``pool_pre_ping`` done by hand: pg8000 lets the
    ``OSError`` of a reset socket escape unwrapped from its first read, which
    ``pool_pre_ping`` does not recognise as a disconnect. Raising
    ``DisconnectionError`` makes the pool discard the connection and open a
    new one.
    """
    _bound_socket(dbapi_connection)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT 1")
    except Exception as exc:  # any failure of a trivial SELECT means the connection is unusable
        if _timed_out(exc):
            # A database that hangs, not a dropped connection: a new connection
            # (which the pool makes at once for a DisconnectionError) would only
            # wait as long again.
            raise DatabaseUnavailableError(f"the database did not answer a ping: {exc!r}") from exc
        raise DisconnectionError(f"pooled connection is unusable: {exc!r}") from exc
    finally:
        # closing a cursor of a dead connection may fail too
        with contextlib.suppress(Exception):
            cursor.close()


def _default_connect_params(settings: Settings) -> Callable[[], ConnectParams]:
    from content_retry.aws import client

    if settings.db_auth == "iam":
        return lambda: iam_connect_params(settings, client("rds"))
    return lambda: secret_connect_params(settings, client("secretsmanager"))


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    """The process's engine, created on first use from :func:`get_settings`."""
    return build_engine(get_settings())


def trips_breaker(error: BaseException) -> bool:
    """Whether a failure says the database itself is failing (lost, refused,
    hung, out of time), not that one statement or its data was wrong."""
    if isinstance(error, IntegrityError):
        return False
    return not refused_data(error)


class BatchConnection:
    """One database connection for a whole batch of work (one pre-ping, not one
    per message).

    A circuit breaker: after the first failure of the database itself
    (:func:`trips_breaker`), every later transaction of this batch raises
    :class:`DatabaseUnavailableError` at once, so a hanging database costs the
    invocation one timeout, not one per message. A statement's own failure
    (a refused value, a unique-index race) only drops the connection.

    Use as a context manager; :meth:`transaction` opens one transaction.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Connection | None = None
        # Why the database is not used again in this batch, once it failed.
        self.unavailable: str | None = None

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction on the batch's connection, committed when the block ends.

        Raises:
            Whatever the block or the database raised; the connection is then
            dropped, and the next transaction opens a new one.
        """
        if self.unavailable is not None:
            raise DatabaseUnavailableError(self.unavailable)
        try:
            if self._connection is None:
                self._connection = self._engine.connect()
            with self._connection.begin():
                yield self._connection
        except BaseException as exc:
            if isinstance(exc, DATABASE_ERRORS) and trips_breaker(exc):
                self.unavailable = f"the database failed earlier in this invocation: {exc!r}"[:500]
            self.close()
            raise

    def close(self) -> None:
        if self._connection is None:
            return
        if self.unavailable is not None:
            # Returned to the pool, the connection would be rolled back there:
            # one more wait on a database that hangs. Discarded instead.
            self._connection.invalidate()
        else:
            try:
                self._connection.close()
            except DATABASE_ERRORS:
                self._connection.invalidate()
        self._connection = None

    def __enter__(self) -> BatchConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
