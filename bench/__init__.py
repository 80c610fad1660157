"""Benchmarks, run from the repository root as modules (`python -m bench.serving_bench`); bench.harness is
what they share with tests/."""
