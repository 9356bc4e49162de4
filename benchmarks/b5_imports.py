"""B5: fresh-process import time and peak memory of each handler module, against boto3.

What it measures: in a new Python process per sample, the time of the
``import app`` statement of functions/detect/app.py and functions/generate/app.py
(what Lambda's init phase runs), and the process's peak resident memory
after it (VmHWM: the ``ru_maxrss`` of a process started from this one would
include this process's size at the fork); the same for ``import boto3`` as the baseline. The
figure is median(handler) / median(boto3), samples taken in alternation.

Why the baseline is fair: ``import boto3`` is the floor of any Python Lambda
function that talks to AWS, measured the same way, with the same interpreter,
environment and bytecode cache. Each process gets the handler's Lambda layout
(``sys.path`` = the function's folder, then the layer's ``layers/common``,
working directory the function's folder) and the environment template.yaml
gives the functions plus the variables Lambda sets (``LAMBDA_TASK_ROOT``
makes Powertools' Tracer enable itself and patch, as it does in Lambda).
Interpreter start-up is left out of both (it is the same for both and not
the code's doing). Bytecode is cached in a temporary folder
(``PYTHONPYCACHEPREFIX``), warmed by one discarded round, so no run pays
compilation and the repository gets no ``__pycache__``.

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
WHAT = "cold import of each handler vs `import boto3`; peak memory"
GOAL = "<=2.5x boto3 import time; report MiB"
HANDLERS = ("detect", "generate")

# Peak memory is the kernel's VmHWM of this process's own address space. Its
# ru_maxrss is not usable here: Linux carries the parent's resident size at the
# fork (this benchmark's, 100+ MiB) into the child's ru_maxrss across exec.
PROBE = """
import json, resource, sys, time
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
try:
    with open("/proc/self/status") as status:
        hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "peak_mib": hwm_kib / 1024, "modules": len(sys.modules)}}))
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


def _probe(module: str, function: str, pycache: str) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
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
    rounds = 3 if env.quick else 9
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in ("boto3", *HANDLERS)}
    with tempfile.TemporaryDirectory(prefix="content-retry-pycache-") as pycache:
        for round_number in range(rounds + 1):  # round 0 fills the bytecode cache
            for function in HANDLERS:
                baseline = _probe("boto3", function, pycache)
                handler = _probe("app", function, pycache)
                if round_number:
                    samples["boto3"].append(baseline)
                    samples[function].append(handler)
        heaviest = {function: _heaviest_packages(function, pycache) for function in HANDLERS}

    def median(name: str, key: str) -> float:
        return statistics.median(sample[key] for sample in samples[name])

    boto3_seconds, boto3_mib = median("boto3", "seconds"), median("boto3", "peak_mib")
    say(f"import boto3: {boto3_seconds * 1000:.0f} ms, peak {boto3_mib:.0f} MiB")
    ratios: dict[str, float] = {}
    mib: dict[str, float] = {}
    for function in HANDLERS:
        ratios[function] = median(function, "seconds") / boto3_seconds
        mib[function] = median(function, "peak_mib")
        say(
            f"{function:<8} import app: {median(function, 'seconds') * 1000:.0f} ms = "
            f"{ratios[function]:.2f}x boto3 (goal <= 2.5x); peak {mib[function]:.0f} MiB "
            f"({mib[function] / boto3_mib:.1f}x boto3's); {median(function, 'modules'):.0f} modules"
        )
        say(
            "         heaviest packages (self time, -X importtime): "
            + ", ".join(f"{name} {ms:.0f} ms" for name, ms in heaviest[function])
        )
    worst = max(ratios.values())
    return Result(
        ID,
        WHAT,
        GOAL,
        ", ".join(f"{f} {ratios[f]:.2f}x / {mib[f]:.0f} MiB" for f in HANDLERS)
        + f" (boto3 {boto3_seconds * 1000:.0f} ms / {boto3_mib:.0f} MiB)",
        worst <= 2.5,
    )
