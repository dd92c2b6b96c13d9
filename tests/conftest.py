"""Shared test set-up.

The tests work on tiny tensors, where torch's intra-op threads cost more than they save: on a
busy 2-core CI machine two threads made some tests 25-35x slower than one. One thread keeps the
suite fast and its timing predictable; it does not change any result.
"""
import torch

torch.set_num_threads(1)
