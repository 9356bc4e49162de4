"""B2: the sweep's candidate query over 10,000 and over 100,000 roadmaps, 100 needing work.

What it measures: the time of the sweep's candidates query
(``content_retry.repositories.roadmaps.sweep_candidates_statement()``, the
only part of ``sweep`` whose cost could follow the table's size: every
roadmap it returns is then planned by the judge, B1, at a cost that depends
on that roadmap alone) with the sweep's own parameters, on two databases
that differ only in how many complete roadmaps they hold: the same 100
roadmaps need work in both. The figure is median(100k) / median(10k), the two
queried in alternation.

Why the baseline is fair: the 10k database is the same query, server,
driver and data shape, with a tenth of the rows; a query whose cost follows
the work (100 candidates) and not the table gives a ratio near 1, one that
scans the table gives a ratio near 10. The same query with index scans
disabled is shown too, as what the partial index saves.

Data (loaded with ``generate_series``): roadmaps of one stage, one module,
five concepts, updated a day ago; complete ones have every status
``completed``; the 100 needing work (the first 100 ids) have one concept's
tutorial status null. One roadmap in a hundred has an old retry task whose
items succeeded, and every fifth roadmap needing work has an old task whose
item failed (older than the lease, so it no longer holds the roadmap back).
"""

from __future__ import annotations

import json
from functools import partial

from sqlalchemy import Engine, text

from benchmarks.harness import BenchEnv, Result, alternate, analyze, ms, say, settings_for
from content_retry.database import build_engine
from content_retry.repositories.roadmaps import sweep_candidates_statement
from content_retry.settings import Settings
from content_retry_local.explain import explain

ID = "B2"
WHAT = "sweep candidates: 100k roadmaps vs 10k, the same 100 needing work"
GOAL = "time(100k) / time(10k) <= 1.5"
NEEDING_WORK = 100
CONCEPTS = 5


def _framework(lost_tutorial: bool) -> str:
    concepts = [
        {
            "concept_id": f"c{number}",
            "name": f"Concept {number}",
            "description": f"Concept {number}, described.",
            "content_status": None if lost_tutorial and number == 1 else "completed",
            "resources_status": "completed",
            "quiz_status": "completed",
        }
        for number in range(1, CONCEPTS + 1)
    ]
    return json.dumps(
        {"stages": [{"name": "Stage", "modules": [{"name": "M", "concepts": concepts}]}]}
    )


def load(engine: Engine, roadmaps: int) -> None:
    """``roadmaps`` roadmaps r1..rN, the first 100 needing work, with task history."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO roadmap_metadata (roadmap_id, user_id, framework_data, created_at, "
                "updated_at) "
                "SELECT 'r' || n, 'u-' || mod(n, 997), CASE WHEN n <= :needing "
                "  THEN CAST(:lost AS jsonb) ELSE CAST(:complete AS jsonb) END, "
                "  now() - interval '2 days', now() - interval '1 day' "
                "FROM generate_series(1, :roadmaps) AS n"
            ),
            {
                "roadmaps": roadmaps,
                "needing": NEEDING_WORK,
                "lost": _framework(lost_tutorial=True),
                "complete": _framework(lost_tutorial=False),
            },
        )
        # Old tasks: every 100th roadmap succeeded once; every 5th needing work failed once.
        connection.execute(
            text(
                "WITH tasks AS ("
                "  INSERT INTO retry_tasks (roadmap_id, user_id, trigger, created_at) "
                "  SELECT 'r' || n, 'u-' || mod(n, 997), 'sweep', now() - interval '3 days' "
                "  FROM generate_series(1, :roadmaps) AS n "
                "  WHERE mod(n, 100) = 0 OR (n <= :needing AND mod(n, 5) = 0) "
                "  RETURNING task_id, roadmap_id) "
                "INSERT INTO retry_items (task_id, roadmap_id, concept_id, content_type, reason, "
                "  status, claimed_at) "
                "SELECT task_id, roadmap_id, 'c1', 'tutorial', 'missing', "
                "  CASE WHEN substr(roadmap_id, 2)::int <= :needing THEN 'failed' "
                "       ELSE 'succeeded' END, now() - interval '3 days' "
                "FROM tasks"
            ),
            {"roadmaps": roadmaps, "needing": NEEDING_WORK},
        )
    analyze(engine)


def _candidates(engine: Engine, settings: Settings, *, index_scans: bool = True) -> list[str]:
    """The sweep's candidate query, with the sweep's parameters and a limit of 100."""
    with engine.begin() as connection:
        if not index_scans:
            connection.execute(text("SET LOCAL enable_indexscan = off"))
            connection.execute(text("SET LOCAL enable_bitmapscan = off"))
        return list(
            connection.execute(
                sweep_candidates_statement(),
                {
                    "grace_minutes": settings.sweep_grace_minutes,
                    "lease_minutes": settings.claim_lease_minutes,
                    "retention_minutes": settings.queue_retention_minutes,
                    "limit": NEEDING_WORK,
                },
            ).scalars()
        )


def _uses_partial_index(engine: Engine, settings: Settings) -> bool:
    with engine.connect() as connection:
        plan = explain(
            connection,
            sweep_candidates_statement(),
            {
                "grace_minutes": settings.sweep_grace_minutes,
                "lease_minutes": settings.claim_lease_minutes,
                "retention_minutes": settings.queue_retention_minutes,
                "limit": NEEDING_WORK,
            },
        )
    return "roadmap_metadata_sweep_candidates" in plan


def run(env: BenchEnv) -> Result:
    small_size, large_size = 10_000, 100_000
    engines: dict[int, Engine] = {}
    try:
        for size in (small_size, large_size):
            url = env.postgres.create_database(f"bench_b2_{size}")
            engines[size] = build_engine(settings_for(url), pool_size=1)
            load(engines[size], size)
        settings = Settings()  # the sweep's defaults: grace, lease
        expected = {f"r{n}" for n in range(1, NEEDING_WORK + 1)}
        for size, engine in engines.items():
            found = set(_candidates(engine, settings))
            assert found == expected, f"{size}: {len(found)} candidates"
            say(
                f"{size:>7,} roadmaps: {len(found)} candidates; partial index used: "
                f"{'yes' if _uses_partial_index(engine, settings) else 'NO'}"
            )

        times = alternate(
            {str(size): partial(_candidates, engine, settings) for size, engine in engines.items()},
            rounds=15 if env.quick else 41,
        )
        ratio = times[str(large_size)] / times[str(small_size)]
        say(
            f"candidate query: {ms(times[str(small_size)])} at 10k, "
            f"{ms(times[str(large_size)])} at 100k: ratio {ratio:.2f} (goal <= 1.5)"
        )
        scan = alternate(
            {
                "scan": lambda: _candidates(engines[large_size], settings, index_scans=False),
            },
            rounds=3,
        )["scan"]
        say(
            f"for reference, without index scans at 100k: {ms(scan)} "
            f"({scan / times[str(large_size)]:.0f}x the indexed query)"
        )
    finally:
        for engine in engines.values():
            engine.dispose()
    return Result(
        ID,
        WHAT,
        GOAL,
        f"{ratio:.2f} ({ms(times[str(small_size)])} -> {ms(times[str(large_size)])}); "
        f"seq scan would be {scan / times[str(large_size)]:.0f}x",
        ratio <= 1.5,
    )
