"""B7: cold import of each handler as shipped, with and without precompiled bytecode.

What it measures: the ``import app`` of functions/detect and functions/generate
in Python 3.12 started as Lambda starts it (``-I -S -B``, ``sys.path`` = the
function's folder + the layer's ``python/`` + the standard library, Lambda's
variables set so Powertools' Tracer patches as it does there), from three
copies of the same tree, built by the layer's deployed recipe (x86_64, so
this machine can run it):

- **shipped**: what ``make layer`` / ``sam build`` ships: every module
  precompiled with ``--invalidation-mode unchecked-hash``, every file dated
  1980-01-01 (SAM's zip entries) and the tree read-only (Lambda's /opt);
- **no bytecode**: the same without any ``.pyc``, as SAM's Python builder
  ships a layer: every cold start compiles every module it imports;
- **floor** (the baseline): the same tree, writable, with a bytecode cache
  Python itself wrote on a first, discarded run (timestamp-checked), imported
  without ``-B``: the fastest an import of these modules gets.

Figures are medians over rounds in which the three run in alternation (order
rotated each round, a warm-up round discarded); the goal is shipped / floor.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.harness import BenchEnv, Result, say
from content_retry_local.shipped import (
    FUNCTIONS,
    ShippedTree,
    build_shipped_tree,
    find_python312,
    freeze,
    lambda_environment,
    run_handler,
    thaw,
)

ID = "B7"
WHAT = "cold import of each handler as shipped (1980 mtimes, read-only, -I -S -B)"
GOAL = "shipped <= 1.15x a warm bytecode cache"
VARIANTS = ("shipped", "no bytecode", "floor")


def _without_bytecode(tree: ShippedTree, root: Path) -> ShippedTree:
    shutil.copytree(tree.root, root, symlinks=True)
    for cache in list(root.rglob("__pycache__")):
        shutil.rmtree(cache)
    return ShippedTree(root, tree.python312)


def _import_seconds(tree: ShippedTree, function: str, variant: str) -> float:
    environment = lambda_environment(function, tree, POWERTOOLS_SERVICE_NAME="content-retry")
    # The floor's tree is writable and its cache warm: Python reads (and would
    # refresh) its own timestamp-checked bytecode there, so no -B.
    flags = ("-I", "-S") if variant == "floor" else ("-I", "-S", "-B")
    return run_handler(tree, function, None, environment, flags=flags).import_seconds


def run(env: BenchEnv) -> Result:
    python312 = find_python312()
    if python312 is None:
        return Result(ID, WHAT, GOAL, "skipped: no Python 3.12 on this machine", met=None)
    rounds = 3 if env.quick else 9
    with tempfile.TemporaryDirectory(prefix="content-retry-b7-") as scratch:
        shipped = build_shipped_tree(Path(scratch, "shipped"), python312=python312)
        trees = {
            "no bytecode": _without_bytecode(shipped, Path(scratch, "no-bytecode")),
            "floor": _without_bytecode(shipped, Path(scratch, "floor")),
            "shipped": shipped,
        }
        for function in FUNCTIONS:  # the floor's own cache, written once and discarded
            _import_seconds(trees["floor"], function, "floor")
        freeze(trees["shipped"].root)
        freeze(trees["no bytecode"].root)
        try:
            samples = _measure(trees, rounds)
        finally:
            thaw(trees["shipped"].root)
            thaw(trees["no bytecode"].root)
    return _report(samples)


def _measure(trees: dict[str, ShippedTree], rounds: int) -> dict[tuple[str, str], list[float]]:
    samples: dict[tuple[str, str], list[float]] = {}
    for round_number in range(rounds + 1):  # round 0 is the warm-up, discarded
        shift = round_number % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            for function in FUNCTIONS:
                seconds = _import_seconds(trees[variant], function, variant)
                if round_number:
                    samples.setdefault((function, variant), []).append(seconds)
    return samples


def _report(samples: dict[tuple[str, str], list[float]]) -> Result:
    ratios: dict[str, float] = {}
    for function in FUNCTIONS:
        median = {variant: statistics.median(samples[function, variant]) for variant in VARIANTS}
        ratios[function] = median["shipped"] / median["floor"]
        say(
            f"{function:<8} floor {median['floor'] * 1000:.0f} ms; shipped "
            f"{median['shipped'] * 1000:.0f} ms = {ratios[function]:.2f}x; without bytecode "
            f"{median['no bytecode'] * 1000:.0f} ms = "
            f"{median['no bytecode'] / median['floor']:.2f}x "
            f"({median['no bytecode'] / median['shipped']:.1f}x the shipped import)"
        )
    worst = max(ratios.values())
    return Result(
        ID,
        WHAT,
        GOAL,
        ", ".join(f"{function} {ratio:.2f}x" for function, ratio in ratios.items()) + " the floor",
        worst <= 1.15,
    )
