"""Benchmarks and maintenance scripts, each run as ``python -m scripts.NAME`` from the repository root."""
