"""Benchmarks: every comparison measured side by side in one run. `python -m benchmarks --help`."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path


def run_header(device: str = "auto", threads: int | str | None = None) -> str:
    """One line saying when, on what code and with what a run measures: the date, the commit (with "+" when
    the checkout has uncommitted changes), Python and library versions, the device and threads it measures
    on, and the machine's load before it starts, so that a table copied into benchmarks/README.md carries
    what it needs to be compared with a later one. threads: those the run sets (None: the process's)."""
    import torch

    from mtlearn.utils import environment_report

    report = environment_report(device)
    report["cpu_threads"] = str(threads if threads is not None else torch.get_num_threads())
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
