"""content-retry's benchmark suite: ``python -m benchmarks [B1 ...] [--quick]``.

Each benchmark measures one of the design's performance promises against a
baseline measured in the same run, on the same machine, in the same process
(or the same kind of fresh process), and reports ratios rather than absolute
times: the machines these run on are shared and noisy, and a ratio of two
medians taken in alternation survives that noise far better than a raw time.

The suite is a measurement, not a test: it always exits 0 and prints a final
table saying which goals were met. See docs/PERFORMANCE.md for the goals, the
method of each benchmark and the figures of a recorded run.

Modules:
    harness     timing, counting, the embedded PostgreSQL, quiet logging, results
    data        bulk builders of roadmaps, content rows and claims
    b1_judge ... b6_pgbouncer   one benchmark each, each with ``run(env, quick)``
"""
