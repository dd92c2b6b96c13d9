"""Training throughput of the engine: precision, memory layout, torch.compile, data loading.

    python -m benchmarks.bench_engine             # a few minutes on 2 CPU cores, plus torch.compile's
    python -m benchmarks.bench_engine --quick     # compilation (minutes on a CPU; skipped with --quick)
    python -m benchmarks.bench_engine --rounds 9  # more rounds: a steadier median on a busy machine

Every row trains the same model (preset "tiny", 64 px, batch 8) with `mtlearn.engine.fit` over the
same synthetic images, generated on the fly as in the notebooks. Every configuration is built
first (its own model and loader); then the configurations take turns, one epoch each
(`fit(..., epochs=1)` on the same model and loader), for one warm-up round (allocator,
autotuning, compilation; not counted) and `rounds` timed rounds. (Each call starts a fresh AdamW
state and wraps the model in torch.compile again; dynamo reuses the warm-up round's graphs, since
its inductor backends compare equal.) A busy machine thus slows all
configurations alike, and the median over the rounds is reported with its spread (min-max),
so a ratio can be read against the noise. Absolute numbers depend on the machine.

Columns: images_per_s (median), images_per_s_min / _max, step_ms (median), speedup (ratio of
the medians, vs fp32), data_wait_pct (median share of the epoch spent waiting for the next batch;
the target is under 5 %; an epoch of 8 steps includes its loader workers' start-up, which a real
epoch of hundreds of steps spreads thinner: see benchmarks/README.md), warmup_s, rounds, and
`note` (why a row was skipped).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset

from mtlearn.data import load_dataset
from mtlearn.engine import fit, resolve_amp
from mtlearn.mtl import build_model
from mtlearn.utils import pick_device

PRESET, IMAGE_SIZE, BATCH_SIZE = "tiny", 64, 8
DATA_WAIT_TARGET_PCT = 5.0


def _configs(device: torch.device, quick: bool) -> list[dict]:
    """name, amp and the optional channels_last, num_workers, cached, compile, skip of every row."""
    rows = [dict(name="fp32", amp="off")]
    rows.append(dict(name="fp32 + channels_last", amp="off", channels_last=True))
    if device.type == "cuda":
        rows.append(dict(name="fp16 autocast + GradScaler", amp="fp16"))
        if resolve_amp("auto", device) == torch.bfloat16:  # native bf16 only, as fit decides (T4/V100: fp16)
            rows.append(dict(name="bf16 autocast", amp="bf16"))
            rows.append(dict(name="bf16 autocast + channels_last", amp="bf16", channels_last=True))
    else:
        rows.append(dict(name="bf16 autocast", amp="bf16"))
        rows.append(dict(name="bf16 autocast + channels_last", amp="bf16", channels_last=True))
    rows.append(dict(name="fp32, 2 loader workers", amp="off", num_workers=2))
    rows.append(dict(name="fp32, images cached in memory", amp="off", cached=True))
    rows.append(dict(name="fp32 + torch.compile", amp="off", compile=True,
                     skip="skipped with --quick: compiling takes minutes on a CPU"
                     if quick and device.type == "cpu" else None))
    return rows


def _build(config: dict, dataset, device: torch.device) -> tuple[torch.nn.Module, DataLoader]:
    """The model and loader of one configuration, built once and trained for every round."""
    torch.manual_seed(0)
    model = build_model(PRESET, tasks=("seg", "cls"), image_size=IMAGE_SIZE)
    workers = config.get("num_workers", 0)
    if config.get("cached"):  # generate every item once; the loader then only collates
        dataset = [dataset[i] for i in range(len(dataset))]
    # not persistent_workers: as fit advises for a resumable run, each epoch starts its workers afresh
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda")
    return model, loader


def _epoch(config: dict, model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """One epoch of `fit` (the engine times it: epoch_time, data_share); returns its record."""
    history = fit(model, loader, None, epochs=1, device=str(device), amp=config["amp"],
                  channels_last=config.get("channels_last", False), compile=config.get("compile", False),
                  progress=False, restore_best=False)
    return history.records[-1]


def _summary(records: list[dict], steps: int) -> dict:
    """Median and spread over the timed rounds (records[0], the warm-up, is left out)."""
    rates = [steps * BATCH_SIZE / r["epoch_time"] for r in records[1:]]  # images per second
    median = statistics.median(rates)
    return {
        "images_per_s": median, "images_per_s_min": min(rates), "images_per_s_max": max(rates),
        "step_ms": 1000 * BATCH_SIZE / median,
        "data_wait_pct": 100 * statistics.median(r["data_share"] for r in records[1:]),
        "warmup_s": records[0]["epoch_time"], "rounds": len(rates),
    }


def run(quick: bool = False, rounds: int | None = None) -> list[dict]:
    """One row per configuration (see the module docstring). rounds: timed rounds after the
    warm-up round (default 5; quick 2)."""
    device = pick_device("auto")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared 2-core machine: one thread per process is the stable choice
    steps = 4 if quick else 8
    rounds = rounds or (2 if quick else 5)
    dataset = Subset(load_dataset("synthetic", split="train", image_size=IMAGE_SIZE), range(steps * BATCH_SIZE))
    rows = []
    jobs, records, notes = {}, {}, {}  # by name: (config, model, loader) to time; epoch records; why it stopped
    try:
        for config in _configs(device, quick):
            rows.append({"config": config["name"], "device": str(device), "preset": PRESET,
                         "image_size": IMAGE_SIZE, "batch": BATCH_SIZE, "threads": torch.get_num_threads()})
            if config.get("skip"):
                notes[config["name"]] = config["skip"]
            else:
                jobs[config["name"]] = (config, *_build(config, dataset, device))
                records[config["name"]] = []
        for _ in range(rounds + 1):  # round 0 warms up; then one epoch per configuration, in turn
            for name, (config, model, loader) in list(jobs.items()):
                try:
                    records[name].append(_epoch(config, model, loader, device))
                except Exception as error:  # torch.compile needs a working compiler tool chain
                    if not config.get("compile"):
                        raise
                    del jobs[name]
                    notes[name] = f"torch.compile failed: {type(error).__name__}: {str(error)[:120]}"
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        if row["config"] in notes:
            row["note"] = notes[row["config"]]
        else:
            row.update(_summary(records[row["config"]], steps))
    baseline = rows[0]["images_per_s"]
    for row in rows:
        if "images_per_s" in row:
            row["speedup"] = row["images_per_s"] / baseline  # ratio of the medians
            row["data_wait_ok"] = row["data_wait_pct"] < DATA_WAIT_TARGET_PCT
    return rows


def main(argv: list[str] | None = None) -> None:
    from benchmarks import run_header
    from benchmarks.__main__ import format_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds, no torch.compile on a CPU")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (one epoch per configuration each) after one warm-up round "
                             "(default 5; --quick: 2)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    on_cpu = pick_device("auto").type == "cpu"
    print(run_header("auto", 1 if on_cpu else None))  # run() measures with one thread on a CPU
    started = time.perf_counter()
    rows = run(quick=args.quick, rounds=args.rounds)
    print(format_table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
