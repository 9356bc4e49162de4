"""B5: cold import of each handler against the libraries it must load anyway; peak memory.

What it measures: in a new Python process per sample, the time of the
``import app`` statement of functions/detect/app.py and functions/generate/app.py
(what Lambda's init phase runs) followed by what its first invocation loads if
the import did not (``boto3``, ``pg8000``, detect's HTTP API), and the process's peak resident
memory after it (VmHWM: the ``ru_maxrss`` of a process started from this one
would include this process's size at the fork).

The baseline, each handler's **library floor**: the same kind of process
importing only the libraries that handler cannot do without, as it uses them:
boto3, SQLAlchemy's core and its PostgreSQL dialect for pg8000, pg8000,
pydantic and pydantic-settings, and the Powertools parts it
uses (Logger, Metrics, a Tracer patching botocore, and for detect the REST
resolver with validation, for generate the batch processor). The figure is
median(handler) / median(its floor): what the project's own code adds to
its cold start.

Each process gets the handler's Lambda layout (``sys.path`` = the function's
folder, then the layer's ``layers/common``, working directory the function's
folder) and the environment template.yaml gives the functions plus the
variables Lambda sets (``LAMBDA_TASK_ROOT`` makes Powertools' Tracer enable
itself and patch, as it does in Lambda). Interpreter start-up is left out of
both. Bytecode is cached in a temporary folder (``PYTHONPYCACHEPREFIX``),
warmed by one discarded round, so no run pays compilation and the repository
gets no ``__pycache__``. Samples are taken in alternation.

An extra ``-X importtime`` run per handler names the packages that cost most.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter

from benchmarks.harness import REPO_ROOT, BenchEnv, Result, say

ID = "B5"
WHAT = "cold import of each handler vs the libraries it must load; peak memory"
GOAL = "<=1.10x each handler's library floor; report MiB"
HANDLERS = ("detect", "generate")

_POWERTOOLS_FLOOR = (
    "from aws_lambda_powertools import Logger, Metrics, Tracer\n"
    "Logger(service='floor'); Metrics(namespace='Floor', service='floor')\n"
    "Tracer(service='floor', patch_modules=('botocore',))\n"
)
# SQLAlchemy's PostgreSQL dialect for pg8000 (the engine loads it on its first
# connection) and pydantic-settings (each function validates its settings at
# cold start) are libraries both handlers cannot do without.
_DATABASE_AND_SETTINGS = (
    "import boto3, sqlalchemy, sqlalchemy.dialects.postgresql.pg8000, pg8000, pydantic\n"
    "import pydantic_settings\n"
)
FLOORS = {
    "detect": _DATABASE_AND_SETTINGS
    + _POWERTOOLS_FLOOR
    + "from aws_lambda_powertools.event_handler import APIGatewayRestResolver\n"
    "APIGatewayRestResolver(enable_validation=True)\n",
    "generate": _DATABASE_AND_SETTINGS
    + _POWERTOOLS_FLOOR
    + "from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType\n"
    "BatchProcessor(event_type=EventType.SQS)\n",
}
# The handler's import, then what its first invocation loads if the import did
# not (detect imports its HTTP API on the first API event): measured together,
# so both sides end with the same libraries loaded.
HANDLERS_FIRST_USE = {
    "detect": "import app\nimport boto3, pg8000, sqlalchemy.dialects.postgresql.pg8000\n"
    "import content_retry.api\n",
    "generate": "import app\nimport boto3, pg8000, sqlalchemy.dialects.postgresql.pg8000\n",
}

# Peak memory is the kernel's VmHWM of this process's own address space. Its
# ru_maxrss is not usable here: Linux carries the parent's resident size at the
# fork (this benchmark's, 100+ MiB) into the child's ru_maxrss across exec.
PROBE = """
import json, resource, sys, time
code = sys.argv[1]
start = time.perf_counter()
exec(code)
seconds = time.perf_counter() - start
try:
    with open("/proc/self/status") as status:
        hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": hwm_kib / 1024, "modules": len(sys.modules)}))
"""


def _lambda_environment(function: str, pycache: str) -> dict[str, str]:
    """The environment Lambda would give the function (template.yaml's plain values)."""
    from content_retry_local.template import load_template

    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    plain = {name: value for name, value in variables.items() if isinstance(value, str)}
    function_dir = REPO_ROOT / "functions" / function
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        **plain,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_LAMBDA_FUNCTION_NAME": f"content-retry-{function}",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "LAMBDA_TASK_ROOT": str(function_dir),
        "PYTHONPATH": os.pathsep.join([str(function_dir), str(REPO_ROOT / "layers" / "common")]),
        "PYTHONPYCACHEPREFIX": pycache,
    }


def _probe(code: str, function: str, pycache: str) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, code],
        cwd=REPO_ROOT / "functions" / function,
        env=_lambda_environment(function, pycache),
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _heaviest_packages(function: str, pycache: str, top: int = 4) -> list[tuple[str, float]]:
    """Self import time summed by top-level package, from ``-X importtime``."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import app"],
        cwd=REPO_ROOT / "functions" / function,
        env=_lambda_environment(function, pycache),
        capture_output=True,
        text=True,
        check=True,
    )
    totals: Counter[str] = Counter()
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = line.removeprefix("import time:").split("|")
        totals[name.strip().split(".")[0]] += int(self_us)
    return [(name, micro / 1000) for name, micro in totals.most_common(top)]


def run(env: BenchEnv) -> Result:
    rounds = 3 if env.quick else 11
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="content-retry-pycache-") as pycache:
        for round_number in range(rounds + 1):  # round 0 fills the bytecode cache
            for function in HANDLERS:
                pair = [("floor", FLOORS[function]), ("handler", HANDLERS_FIRST_USE[function])]
                if round_number % 2:  # alternate which of the two goes first
                    pair.reverse()
                for kind, code in pair:
                    sample = _probe(code, function, pycache)
                    if round_number:
                        samples.setdefault((function, kind), []).append(sample)
        heaviest = {function: _heaviest_packages(function, pycache) for function in HANDLERS}

    def median(function: str, kind: str, key: str) -> float:
        return statistics.median(sample[key] for sample in samples[function, kind])

    ratios: dict[str, float] = {}
    mib: dict[str, float] = {}
    for function in HANDLERS:
        handler = median(function, "handler", "seconds")
        floor = median(function, "floor", "seconds")
        ratios[function] = handler / floor
        mib[function] = median(function, "handler", "peak_mib")
        say(
            f"{function:<8} import app: {handler * 1000:.0f} ms = {ratios[function]:.2f}x its "
            f"library floor ({floor * 1000:.0f} ms; goal <= 1.10x); peak {mib[function]:.0f} MiB "
            f"(floor {median(function, 'floor', 'peak_mib'):.0f} MiB); "
            f"{median(function, 'handler', 'modules'):.0f} modules "
            f"(floor {median(function, 'floor', 'modules'):.0f})"
        )
        say(
            "         heaviest packages (self time, -X importtime): "
            + ", ".join(f"{name} {ms:.0f} ms" for name, ms in heaviest[function])
        )
    return Result(
        ID,
        WHAT,
        GOAL,
        ", ".join(f"{f} {ratios[f]:.2f}x / {mib[f]:.0f} MiB" for f in HANDLERS),
        max(ratios.values()) <= 1.10,
    )
