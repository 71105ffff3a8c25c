"""Benchmark support for benchmarks/: timing harness, methods, parameter formulas, baselines, reports."""
