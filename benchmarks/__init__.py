"""Benchmarks against named baselines, reported as ratios measured in one run: ``python -m benchmarks``."""
