"""Disentanglement on the shapes benchmark: DisentangleNet against its two entangled baselines.

Trains the three models of mtlearn.disentangle with the same configuration and data, then reports,
side by side, the shape accuracy on the seen combinations and on the unseen circles on black, and
what linear probes can read from each encoder. Checks the project's targets:

    DisentangleNet unseen shape accuracy >= 0.90, the shared-encoder baseline >= 20 points lower;
    a linear probe reads the background from DisentangleNet's task-A features at <= 0.60 balanced
    accuracy, and clearly better (>= 0.15 higher) from the shared encoder's.

    python -m benchmarks.bench_disentangle            # course profile (about 5 min on 2 CPU cores)
    python -m benchmarks.bench_disentangle --quick    # smoke profile (seconds; the numbers mean nothing)
"""

from __future__ import annotations

import argparse

import torch

from mtlearn.disentangle import MODELS, disentangle_config, shapes_experiment
from mtlearn.utils import count_parameters

COLUMNS = ("seen_shape_acc", "unseen_shape_acc", "seen_background_acc", "probe_background_a",
           "probe_background_a_circle", "probe_background_a_bar", "probe_shape_a", "probe_shape_b", "adv_acc_a",
           "adv_acc_b", "train_seconds")
UNSEEN_MIN, UNSEEN_GAP, PROBE_MAX, PROBE_GAP = 0.90, 0.20, 0.60, 0.15
EPS = 1e-9  # rounding slack for the comparisons: a value exactly at its limit passes


def run(quick: bool = False, seed: int = 0, threads: int | None = 1, epochs: int | None = None) -> list[dict]:
    """One row per model (profile "smoke" when `quick`, else "course"), plus the criterion on the
    DisentangleNet row. `threads`: torch CPU threads (1 keeps timings steady on a shared machine;
    None: torch's default). `epochs` overrides the profile's."""
    overrides = {} if epochs is None else {"epochs": epochs}
    config = disentangle_config("smoke" if quick else "course", **overrides)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = []
        for kind in MODELS:
            model, _, metrics = shapes_experiment(kind, config, seed=seed, device="auto", progress=True)
            row = {"model": kind, "params": count_parameters(model)}
            row.update({c: metrics.get(c, "") for c in COLUMNS})
            rows.append(row)
    finally:
        torch.set_num_threads(previous)
    return add_criterion(rows)


def add_criterion(rows: list[dict]) -> list[dict]:
    """Fill "criterion" on the disentangle row: "pass" or "fail (<reasons>)"; blank elsewhere."""
    by_model = {row["model"]: row for row in rows}
    ours, shared = by_model["disentangle"], by_model["shared"]
    failures = []
    # each check says what passes, so that a NaN fails; EPS: 0.55 + 0.15 is 0.7000000000000001, and a
    # shared-encoder probe of exactly 0.70 is the 0.15 higher the target asks for
    if not ours["unseen_shape_acc"] >= UNSEEN_MIN - EPS:
        failures.append(f"unseen {ours['unseen_shape_acc']:.2f} < {UNSEEN_MIN}")
    if not shared["unseen_shape_acc"] <= ours["unseen_shape_acc"] - UNSEEN_GAP + EPS:
        failures.append(f"shared unseen {shared['unseen_shape_acc']:.2f} not {UNSEEN_GAP:.0%} lower")
    if not ours["probe_background_a"] <= PROBE_MAX + EPS:
        failures.append(f"probe {ours['probe_background_a']:.2f} > {PROBE_MAX}")
    if not shared["probe_background_a"] >= ours["probe_background_a"] + PROBE_GAP - EPS:
        failures.append(f"shared probe {shared['probe_background_a']:.2f} not clearly higher")
    for row in rows:
        row["criterion"] = ""
    ours["criterion"] = "pass" if not failures else "fail (" + "; ".join(failures) + ")"
    return rows


def main(argv: list[str] | None = None) -> None:
    from benchmarks import run_header
    from benchmarks.__main__ import format_table

    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_disentangle", description=description)
    parser.add_argument("--quick", action="store_true", help="smoke profile: seconds, tiny models")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed, 0 .. 2**32 - 1: weights and batch order (the data are fixed)")
    parser.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; 0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if not 0 <= args.seed < 2**32:  # as argparse's error, not a traceback from seed_everything
        parser.error(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    print(run_header("auto", args.threads or None))
    print(format_table(run(args.quick, args.seed, args.threads or None, args.epochs)))


if __name__ == "__main__":
    main()
