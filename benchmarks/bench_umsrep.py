"""UMS-Rep fine-tuning strategies side by side: accuracy and compute of (a) frozen ... (e) scratch.

Reproduces the strategy table of notebook 03 on the embedded synthetic data, then checks the
project's target: joint multi-task fine-tuning (d) costs at most 35 % of the three
single-task models (e) in FLOPs and wall time, and every task metric stays within 2 points
(0.5 dB of PSNR) of them or better. The strategies train one after the other, so on a machine
shared with other jobs a wall-time share also measures the load of the moment; the CPU time of
the process (its own work, all threads; the loaders have no worker processes) is measured beside
it, and the verdict passes only when the FLOPs, the wall time and the CPU time all stay within
35 %, so neither a quiet moment for (d) nor a busy one for (e) can make it pass. The FLOPs share
itself follows from the profile's epochs (`joint_epochs` against three times `scratch_epochs`);
what the run finds out is whether the times follow it and whether the metrics hold at that budget.

    python -m benchmarks.bench_umsrep            # course profile (minutes on 2 CPU cores)
    python -m benchmarks.bench_umsrep --quick    # smoke profile (seconds; the numbers mean nothing)
"""

from __future__ import annotations

import argparse

import torch

from mtlearn.umsrep import compare_strategies, joint_vs_single_task, strategy_config

COLUMNS = ("models", "recon/psnr", "recon/ssim", "seg/dice", "cls/acc", "cls/auc", "trainable_params",
           "train_gflops", "total_gflops", "wall_time_s", "total_wall_time_s", "cpu_time_s", "total_cpu_time_s",
           "memory_est_mib", "cuda_peak_mib", "images_seen")
RENAMED = {"memory_est_mib": "memory_mib"}  # column here -> column of compare_strategies' table


def run(quick: bool = False, seed: int = 0, threads: int | None = 1) -> list[dict]:
    """One row per strategy (profile "smoke" when `quick`, else "course"); see `strategy_rows`."""
    config = strategy_config("smoke" if quick else "course", seed=seed)  # progress bars on stderr
    return strategy_rows(compare(config, threads), config)


def compare(config, threads: int | None = 1):
    """compare_strategies with torch limited to `threads` CPU threads (None: torch's default).

    Why one thread by default: the ratios of wall times are the result here, and on a machine
    shared with other jobs several intra-op threads wait for each other whenever one is descheduled,
    which makes wall (and CPU) times swing by several times from one model to the next. A single
    thread is slower but steady; every strategy runs under the same setting.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return compare_strategies(config)
    finally:
        torch.set_num_threads(previous)


def strategy_rows(table, config) -> list[dict]:
    """The table as rows, with each strategy's share of (e) and, on the (d) row, the acceptance verdict.

    flops_vs_e / time_vs_e / cpu_vs_e: the strategy's own training FLOPs, wall time and CPU time as
    a fraction of the three single-task models from scratch; *_with_pretraining adds all of the
    representation's cost. memory_est_mib: the training-memory estimate of the largest model (not
    measured); cuda_peak_mib: the measured peak on CUDA (NaN on a CPU).
    criterion: for (d), without and with the pre-training counted, joint_vs_single_task's verdict:
    "pass", or "fail (<reasons>)" naming each share above max_compute_share and "metrics" when a
    metric fell below tolerance.
    """
    scratch = table.loc["scratch"] if "scratch" in table.index else None
    check = None
    if {"joint", "scratch"} <= set(table.index):
        check = joint_vs_single_task(table, config.max_compute_share, config.tolerance)
    rows = []
    for strategy, values in table.iterrows():
        row = {"strategy": strategy, **{c: values[RENAMED.get(c, c)] for c in COLUMNS}}
        if scratch is not None:
            row["flops_vs_e"] = values["train_gflops"] / scratch["train_gflops"]
            row["time_vs_e"] = values["wall_time_s"] / scratch["wall_time_s"]
            row["cpu_vs_e"] = values["cpu_time_s"] / scratch["cpu_time_s"]
            row["flops_vs_e_with_pretraining"] = values["total_gflops"] / scratch["train_gflops"]
            row["time_vs_e_with_pretraining"] = values["total_wall_time_s"] / scratch["wall_time_s"]
            row["cpu_vs_e_with_pretraining"] = values["total_cpu_time_s"] / scratch["cpu_time_s"]
        judged = check is not None and strategy == "joint"
        for column, kind in (("criterion", "train"), ("criterion_with_pretraining", "total")):
            row[column] = verdict(check, kind, config.max_compute_share) if judged else ""
        rows.append(row)
    return rows


def verdict(check: dict, kind: str, max_share: float) -> str:
    """joint_vs_single_task's verdict on the shares of `kind` ("train", "amortised" or "total") in
    words: "pass", or "fail (...)" naming what failed (its metrics, or shares above max_share)."""
    if check[{"train": "passed", "amortised": "passed_amortised", "total": "passed_with_pretraining"}[kind]]:
        return "pass"
    failures = [] if check["metrics_ok"] else ["metrics"]
    for name in ("flops", "time", "cpu"):
        key = f"{name}_share_{kind}"
        # as joint_vs_single_task judges: an unmeasured share (NaN, a resumed run's CPU time) does not
        # count, and 1e-9 of slack for rounding
        if key not in check.get("unmeasured", ()) and not check[key] <= max_share + 1e-9:
            failures.append(f"{name} {check[key]:.2f}")
    return "fail (" + ", ".join(failures) + ")"


def main(argv: list[str] | None = None) -> None:
    from benchmarks import run_header
    from benchmarks.__main__ import format_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_umsrep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke profile: seconds, tiny data")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training (0 .. 2**32 - 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; 0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if not 0 <= args.seed < 2**32:  # refused now, not by the first training after minutes of data generation
        parser.error(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}")
    config = strategy_config("smoke" if args.quick else "course", seed=args.seed)
    print(run_header(config.device, args.threads or None))
    table = compare(config, args.threads or None)
    print(format_table(strategy_rows(table, config)))
    print("\n(d) joint vs (e) single-task from scratch:")
    for key, value in joint_vs_single_task(table, config.max_compute_share, config.tolerance).items():
        print(f"  {key:<28} {value:.3f}" if isinstance(value, float) else f"  {key:<28} {value}")


if __name__ == "__main__":
    main()
