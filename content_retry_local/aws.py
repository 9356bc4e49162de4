"""moto's server as the local AWS: in this process (the demo) or in the background
(shared by the separate commands, so a queue filled by ``invoke detect`` is
still there for ``drain``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class LocalAwsError(RuntimeError):
    """moto's server could not be started."""


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_threaded_moto() -> tuple[str, Any]:
    """moto's server on a free port of 127.0.0.1, in a thread of this process.

    Returns (endpoint URL, server); ``server.stop()`` ends it.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LocalAwsError(
            "the local AWS needs moto's server (pip install 'content-retry[local]'), "
            "or set AWS_ENDPOINT_URL / RETRY_QUEUE_URL"
        ) from exc
    import logging

    # One access-log line per AWS call would bury the demo's own output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}", server


def ensure_background_moto(state_dir: Path) -> str:
    """moto's server in a background process, started once and reused.

    Its address is kept in ``state_dir/moto.json``; ``stop_background_moto``
    ends it. Returns the endpoint URL.
    """
    state_file = state_dir / "moto.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if _alive(state["pid"]) and _answers(state["port"]):
            return f"http://127.0.0.1:{state['port']}"
    state_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = (state_dir / "moto.log").open("ab")
    process = subprocess.Popen(  # noqa: S603 - our own interpreter running moto's module
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while not _answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise LocalAwsError(f"moto's server did not start; see {state_dir / 'moto.log'}")
        time.sleep(0.1)
    state_file.write_text(json.dumps({"pid": process.pid, "port": port}))
    return f"http://127.0.0.1:{port}"


def stop_background_moto(state_dir: Path) -> bool:
    """Stop the background moto server; returns whether one was running."""
    state_file = state_dir / "moto.json"
    if not state_file.exists():
        return False
    state = json.loads(state_file.read_text())
    state_file.unlink()
    if not _alive(state["pid"]):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(state["pid"], signal.SIGTERM)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
