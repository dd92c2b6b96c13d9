"""Shared test set-up.

The tests work on tiny tensors, where torch's intra-op threads cost more than they save: on a
busy 2-core CI machine two threads made some tests 25-35x slower than one. One thread keeps the
suite fast and its timing predictable; it does not change any result.
"""
import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def close_figures():
    """pyplot keeps every figure until it is closed (a test that draws 20 warned): close them after each test."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")  # only where a test drew: importing it costs a second
    if pyplot is not None:
        pyplot.close("all")


@pytest.fixture
def disk_full_midway(monkeypatch):
    """Call it to make every Path.write_text write half its text, then raise OSError("disk full")."""
    from pathlib import Path

    real_write_text = Path.write_text

    def crash(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    return lambda: monkeypatch.setattr(Path, "write_text", crash)
