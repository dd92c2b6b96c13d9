"""Benchmarks: every comparison measured side by side in one run. `python -m benchmarks --help`."""
