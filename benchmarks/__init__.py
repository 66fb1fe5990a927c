"""Speed, memory, throughput and quality benchmarks: run each with ``python -m benchmarks.NAME`` from the
repository root; results go to ``benchmarks/results/`` and ``docs/benchmarks.md``."""
