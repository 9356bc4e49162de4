"""An embedded PostgreSQL from a pip wheel (pgserver): no system install, no Docker."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started."""


# The file in which pgserver lists the processes using a server on a data
# folder: it stops the server when the last of them exits.
_USERS_FILE = ".handle_pids.json"


def start_embedded_postgres(
    data_dir: Path,
    *,
    delete_on_exit: bool = False,
    max_connections: int | None = None,
    keep_running: bool = False,
) -> str:
    """Start (or reuse) a PostgreSQL server whose data lives in ``data_dir``.

    The server listens only on a Unix socket; it is stopped cleanly when the
    last process using it exits. A server already running on ``data_dir`` (from
    another process) is reused, and a stopped one keeps its data.

    Args:
        data_dir: the cluster's data folder; created (with its parent) if absent.
        delete_on_exit: remove the data when the server stops (tests).
        max_connections: set the server's connection limit (a restart, the
            first time): for tests of what happens when it is reached.
        keep_running: leave the server running when this process exits, and
            when any later one does (``content-retry demo --keep``), until
            :func:`stop_embedded_postgres` (``content-retry stop``).

    Returns:
        A SQLAlchemy URL for the ``postgres`` database.

    Raises:
        EmbeddedPostgresError: the wheel is not installed or the server failed.
    """
    _forget_ended_users(data_dir)
    keep = _kept(data_dir, keep_running)
    mode = "delete" if delete_on_exit else None if keep else "stop"
    server = _get_server(data_dir, "stop" if max_connections else mode)
    if max_connections is not None:
        limit = int(max_connections)
        if f" {limit}\n" not in server.psql("SHOW max_connections;"):
            server.psql(f"ALTER SYSTEM SET max_connections = {limit};")
        server.cleanup()  # max_connections takes effect at the next start
        server = _get_server(data_dir, mode)
    info = server.get_postmaster_info()
    port = info.port or 5432
    return f"postgresql+pg8000://postgres@/postgres?unix_sock={info.socket_dir}/.s.PGSQL.{port}"


@dataclass(frozen=True)
class RunningServer:
    """A server running on a data folder: its postmaster and where it listens."""

    pid: int
    socket_dir: Path
    port: int

    @property
    def psql_url(self) -> str:
        """The libpq URL ``psql`` takes (the socket folder as ``host``)."""
        return (
            f"postgresql://postgres@/postgres?host={quote(str(self.socket_dir), safe='/')}"
            f"&port={self.port}"
        )


def running_server(data_dir: Path) -> RunningServer | None:
    """The server running on ``data_dir``, or None (never starts one)."""
    with _pgserver_imported():
        from pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(data_dir.resolve()) if data_dir.exists() else None
    except (OSError, ValueError, AssertionError):  # being written: a server starting or stopping
        return None
    if info is None or not info.is_running() or info.socket_dir is None:
        return None
    return RunningServer(pid=int(info.pid), socket_dir=info.socket_dir, port=info.port or 5432)


def server_users(data_dir: Path) -> list[int]:
    """The live processes (other than this one) using the server on ``data_dir``."""
    return [pid for pid in _listed_users(data_dir) if pid != os.getpid() and _alive(pid)]


def stop_embedded_postgres(data_dir: Path) -> str:
    """Stop the server left running on ``data_dir`` unless a live process uses it.

    Returns what was done, as a sentence for the command line.
    """
    _kept_marker(data_dir).unlink(missing_ok=True)
    server = running_server(data_dir)
    if server is None:
        return f"no PostgreSQL running on {data_dir}"
    _forget_ended_users(data_dir)
    users = server_users(data_dir)
    if users:
        listed = ", ".join(str(pid) for pid in users)
        return f"PostgreSQL on {data_dir} left running: in use by process {listed}"
    # pgserver stops the server when its last user lets go: this process is
    # then the only one listed, and lets go at once.
    _get_server(data_dir, "stop").cleanup()
    return f"stopped the PostgreSQL on {data_dir}"


def psql_executable() -> Path:
    """The ``psql`` the pgserver wheel ships (so none needs installing)."""
    with _pgserver_imported():
        from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "psql"


def _kept_marker(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".kept")


def _kept(data_dir: Path, keep_running: bool) -> bool:
    """Whether the server is to outlive this process: asked now, or kept by an
    earlier process and still running (a server the machine stopped since,
    a reboot, is no longer kept)."""
    marker = _kept_marker(data_dir)
    if keep_running:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("kept running until content-retry stop\n")
        return True
    if marker.exists() and running_server(data_dir) is None:
        marker.unlink()
    return marker.exists()


def _forget_ended_users(data_dir: Path) -> None:
    """Drop from pgserver's list the processes that ended without saying so.

    pgserver stops a server when the last process using it exits, through an
    exit handler; a process killed without running its handlers (SIGKILL, a
    crash, a closed terminal) stays listed, and no later command would ever
    stop the server again. Done under pgserver's own inter-process lock.
    """
    listed = _listed_users(data_dir)
    if not listed or all(_alive(pid) for pid in listed):
        return
    with _pgserver_imported():
        from pgserver.postgres_server import PostgresServer
    lock = getattr(PostgresServer, "_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        alive = [pid for pid in _listed_users(data_dir) if _alive(pid)]
        (data_dir / _USERS_FILE).write_text(json.dumps(alive))


def _listed_users(data_dir: Path) -> list[int]:
    try:
        listed = json.loads((data_dir / _USERS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [int(pid) for pid in listed] if isinstance(listed, list) else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """An ended child not yet reaped by its parent still answers ``kill(pid, 0)``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): trust kill()
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


@contextlib.contextmanager
def _pgserver_imported() -> Any:
    """Import pgserver without platformdirs' RuntimeDirWarning.

    pgserver keeps its inter-process lock in platformdirs' user runtime
    folder, asked for when its module is imported; with ``XDG_RUNTIME_DIR``
    unset (containers, CI, ssh sessions without a login manager) platformdirs
    warns and falls back to ``/tmp/runtime-<uid>``, which is where every
    process of this user then agrees to find the lock: the fallback is the
    behaviour wanted, so the warning says nothing to act on. Only that warning
    is silenced, and only around the import.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR", category=UserWarning)
        try:
            yield
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise EmbeddedPostgresError(
                "the embedded PostgreSQL needs the 'pgserver' package "
                "(pip install 'content-retry[local]'), or set DATABASE_URL"
            ) from exc


def _get_server(data_dir: Path, cleanup_mode: str | None) -> Any:
    with _pgserver_imported():
        from pgserver import get_server  # type: ignore[attr-defined]
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        return get_server(data_dir, cleanup_mode=cleanup_mode)
    except Exception as exc:
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL did not start in {data_dir}: {exc}"
        ) from exc
