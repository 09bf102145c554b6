"""Benchmark machinery shared by `effnet-kernels bench` and the pytest-benchmark suites.

timing (how to time), providers (what to time: one factory per op), selfcheck (parity
before timing), e2e (whole models), report (tables, JSON, plots), cli/runner (the command).
"""
