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
        if _is_our_moto(state["pid"], state["port"]) and _answers(state["port"]):
            return f"http://127.0.0.1:{state['port']}"
    state_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with (state_dir / "moto.log").open("ab") as log:  # the server keeps its own copy
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
    # The file can outlive the server (a reboot), and its pid be another's since.
    if not _is_our_moto(state["pid"], state["port"]):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(state["pid"], signal.SIGTERM)
    return True


def _is_our_moto(pid: int, port: int) -> bool:
    """Whether ``pid`` is still the moto server started on ``port``: a process
    id is given to another process once its own has ended."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        command = raw.replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # no /proc (macOS), or no such process
        try:
            command = subprocess.run(  # noqa: S603
                ["ps", "-o", "args=", "-p", str(int(pid))],  # noqa: S607 - the system's ps
                capture_output=True,
                text=True,
                check=False,
                timeout=5,
            ).stdout  # nosec B603 B607
        except (OSError, subprocess.SubprocessError):
            return False
    return "moto.server" in command and f"-p {port}" in command
