"""Training throughput of the engine: precision, memory layout, torch.compile, data loading.

    python -m benchmarks.bench_engine            # about a minute on 2 CPU cores, plus torch.compile's
    python -m benchmarks.bench_engine --quick    # compilation (minutes on a CPU; skipped with --quick)

Every row trains the same model (preset "tiny", 64 px, batch 8) with `mtlearn.engine.fit` over the
same synthetic images, generated on the fly as in the notebooks. The first epoch warms up
(allocator, autotuning, compilation); the fastest of the later epochs is reported, which is the
most stable figure on a shared machine. The rows run one after the
other in one process, so their ratios are comparable; absolute numbers depend on the machine.

Columns: images_per_s, step_ms, speedup (vs fp32), data_wait_pct (share of the epoch spent waiting
for the next batch; the target is under 5 %), and `note` (why a row was skipped).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Subset

from mtlearn.data import load_dataset
from mtlearn.engine import fit
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
        if torch.cuda.is_bf16_supported():
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


def _measure(config: dict, dataset, device: torch.device, steps: int, epochs: int) -> dict:
    torch.manual_seed(0)
    model = build_model(PRESET, tasks=("seg", "cls"), image_size=IMAGE_SIZE)
    workers = config.get("num_workers", 0)
    if config.get("cached"):  # generate every item once; the loader then only collates
        dataset = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    history = fit(model, loader, None, epochs=epochs, device=str(device), amp=config["amp"],
                  channels_last=config.get("channels_last", False), compile=config.get("compile", False),
                  progress=False, restore_best=False)
    timed = min(history.records[1:], key=lambda r: r["epoch_time"])  # after warm-up, the fastest epoch
    return {
        "images_per_s": steps * BATCH_SIZE / timed["epoch_time"],
        "step_ms": 1000 * timed["epoch_time"] / steps,
        "data_wait_pct": 100 * timed["data_share"],
        "warmup_s": history.records[0]["epoch_time"],
    }


def run(quick: bool = False) -> list[dict]:
    """One row per configuration (see the module docstring)."""
    device = pick_device("auto")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared 2-core machine: one thread per process is the stable choice
    steps, epochs = (4, 2) if quick else (8, 3)
    dataset = Subset(load_dataset("synthetic", split="train", image_size=IMAGE_SIZE), range(steps * BATCH_SIZE))
    rows = []
    try:
        for config in _configs(device, quick):
            row = {"config": config["name"], "device": str(device), "preset": PRESET, "image_size": IMAGE_SIZE,
                   "batch": BATCH_SIZE, "threads": torch.get_num_threads()}
            if config.get("skip"):
                rows.append({**row, "note": config["skip"]})
                continue
            try:
                row.update(_measure(config, dataset, device, steps, epochs))
            except Exception as error:  # torch.compile needs a working compiler tool chain
                if not config.get("compile"):
                    raise
                rows.append({**row, "note": f"torch.compile failed: {type(error).__name__}: {str(error)[:120]}"})
                continue
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    baseline = rows[0]["images_per_s"]
    for row in rows:
        if "images_per_s" in row:
            row["speedup"] = row["images_per_s"] / baseline
            row["data_wait_ok"] = row["data_wait_pct"] < DATA_WAIT_TARGET_PCT
    return rows


def main() -> None:
    from benchmarks.__main__ import format_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, no torch.compile on a CPU")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(quick=args.quick)
    print(format_table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
