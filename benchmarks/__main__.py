"""``python -m benchmarks [B1 B2 ...] [--quick]``: run the benchmarks, print the table.

Always exits 0 when the benchmarks ran, goals met or not: this is a
measurement. A benchmark that crashes is reported as such in the table (and
its traceback printed) and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Sequence

from benchmarks.harness import REPO_ROOT, BenchEnv, Result

# id -> module holding ``ID``, ``WHAT``, ``GOAL`` and ``run(env) -> Result``
BENCHMARKS: dict[str, str] = {
    "B1": "benchmarks.b1_judge",
    "B2": "benchmarks.b2_sweep",
    "B3": "benchmarks.b3_save",
    "B4": "benchmarks.b4_sqs",
    "B5": "benchmarks.b5_imports",
    "B6": "benchmarks.b6_pgbouncer",
    "B7": "benchmarks.b7_shipped_imports",
    "B8": "benchmarks.b8_parallel_generation",
    "B9": "benchmarks.b9_quota",
    "B10": "benchmarks.b10_detect_scale",
}


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="content-retry's benchmarks: ratios against baselines from the same run.",
    )
    parser.add_argument(
        "ids",
        nargs="*",
        metavar="ID",
        help=f"benchmarks to run ({', '.join(BENCHMARKS)}; default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds, fewer extras: a quick look, not the figures of record",
    )
    args = parser.parse_args(argv)
    args.ids = [name.upper() for name in args.ids] or list(BENCHMARKS)
    unknown = [name for name in args.ids if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


def _prepare_process() -> None:
    """The process as the functions expect it: the package and the repository
    importable, and moto's fake credentials (no real AWS is ever called)."""
    for path in (str(REPO_ROOT / "layers" / "common"), str(REPO_ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    os.environ.pop("AWS_ENDPOINT_URL", None)


def _table(results: list[Result], seconds: float, quick: bool) -> None:
    print()
    print(f"Summary ({'--quick, ' if quick else ''}{seconds:.0f} s):")
    print(f"  {'id':<3} {'result':<8} {'goal':<44} measured")
    for result in results:
        print(f"  {result.id:<3} {result.verdict:<8} {result.goal:<44} {result.measured}")
    missed = [result.id for result in results if result.met is False]
    print()
    print(f"  goals missed: {', '.join(missed) if missed else 'none'}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    _prepare_process()
    env = BenchEnv(quick=args.quick)
    results: list[Result] = []
    started = time.perf_counter()
    for name in args.ids:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"\n{name}: {module.WHAT}  [goal: {module.GOAL}]", flush=True)
        benchmark_started = time.perf_counter()
        try:
            result: Result = module.run(env)
        except Exception as exc:  # a crash is a finding too; the other benchmarks still run
            traceback.print_exc()
            result = Result(
                name, module.WHAT, module.GOAL, f"{exc!r}"[:120], met=None, crashed=True
            )
        print(f"  ({time.perf_counter() - benchmark_started:.1f} s)", flush=True)
        results.append(result)
    _table(results, time.perf_counter() - started, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
