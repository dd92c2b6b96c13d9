"""Benchmarks: every comparison measured side by side in one run. `python -m benchmarks --help`."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path


def run_header() -> str:
    """One line saying when, on what code and with what a run measured: the date, the commit (with "+" when
    the checkout has uncommitted changes), Python and library versions, threads and the machine's load, so
    that a table copied into benchmarks/README.md carries what it needs to be compared with a later one."""
    from mtlearn.utils import environment_report

    report = environment_report("auto")
    commit = "unknown"
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        commit += "+" if dirty else ""
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an unpacked copy)
        pass
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"  # Windows has none
    shown = ("python", "torch", "monai", "device", "gpu", "cpu_threads")  # "gpu" only where there is one
    parts = [datetime.date.today().isoformat(), f"commit {commit}", *(f"{k} {report[k]}" for k in shown if k in report),
             f"load {load} on {os.cpu_count()} CPUs"]
    return " | ".join(parts)
