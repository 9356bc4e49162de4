"""PgBouncer in transaction pooling mode: the local stand-in for RDS Proxy."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


class PgBouncerError(RuntimeError):
    """PgBouncer is not installed or did not start."""


def find_pgbouncer() -> str | None:
    """The pgbouncer executable (Debian installs it in /usr/sbin), or None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None


def _service_user() -> pwd.struct_passwd | None:
    """PgBouncer refuses to run as root: as root, it runs as pgserver or postgres."""
    if os.geteuid() != 0:
        return None
    for name in ("pgserver", "postgres"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PgBouncerError("running as root, and neither a pgserver nor a postgres user exists")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PgBouncer:
    """PgBouncer in a temporary folder, in front of a PostgreSQL socket directory.

    Use as a context manager; clients connect through :meth:`url`.
    """

    def __init__(
        self,
        backend_socket_dir: str,
        backend_port: int,
        databases: list[str],
        *,
        pool_size: int = 10,
        max_client_connections: int = 500,
    ) -> None:
        executable = find_pgbouncer()
        if executable is None:
            raise PgBouncerError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        self.executable = executable
        self.backend_socket_dir = backend_socket_dir
        self.backend_port = backend_port
        self.databases = databases
        self.pool_size = pool_size
        self.max_client_connections = max_client_connections
        self.port = _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="content-retry-pgbouncer-"))
        self.user = _service_user()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def unix_sock(self) -> str:
        return str(self.folder / f".s.PGSQL.{self.port}")

    def url(self, database: str) -> str:
        """A SQLAlchemy URL reaching ``database`` through the pool."""
        return f"postgresql+pg8000://postgres@/{database}?unix_sock={self.unix_sock}"

    def _write_config(self) -> Path:
        (self.folder / "userlist.txt").write_text('"postgres" ""\n')
        config = self.folder / "pgbouncer.ini"
        config.write_text(
            "\n".join(
                [
                    "[databases]",
                    *(
                        f"{name} = host={self.backend_socket_dir} port={self.backend_port} "
                        f"dbname={name} user=postgres"
                        for name in self.databases
                    ),
                    "[pgbouncer]",
                    "listen_addr =",
                    f"listen_port = {self.port}",
                    f"unix_socket_dir = {self.folder}",
                    "auth_type = trust",
                    f"auth_file = {self.folder / 'userlist.txt'}",
                    "pool_mode = transaction",
                    f"default_pool_size = {self.pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    f"max_client_conn = {self.max_client_connections}",
                    f"logfile = {self.folder / 'pgbouncer.log'}",
                    f"pidfile = {self.folder / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        if self.user is not None:
            for path in (self.folder, *self.folder.iterdir()):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return config

    def __enter__(self) -> PgBouncer:
        config = self._write_config()
        self.process = subprocess.Popen(  # noqa: S603 - the system's pgbouncer, our own config
            [self.executable, str(config)],
            user=self.user.pw_uid if self.user else None,
            group=self.user.pw_gid if self.user else None,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not Path(self.unix_sock).exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.folder / "pgbouncer.log"
                text = log.read_text() if log.exists() else ""
                self.__exit__(None, None, None)
                raise PgBouncerError(f"pgbouncer did not start: {text}")
            time.sleep(0.05)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
