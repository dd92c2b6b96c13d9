"""Model sizes and training speed: the ResFormer presets beside MONAI's UNet and SwinUNETR.

    python -m benchmarks.bench_models            # ~2 minutes on 2 CPU cores
    python -m benchmarks.bench_models --quick    # smaller inputs, for a first look
    python -m benchmarks.bench_models --threads 1 --group paper --rounds 4   # paper vs SwinUNETR only

Every row is one model at one input size: parameters, forward GFLOPs per image (counted by
torch.utils.flop_counter) and training images per second (forward + backward + AdamW step).
Rows compared with each other share an input size and batch: the paper preset runs at 224 px
beside SwinUNETR (feature_size 48) and MONAI's UNet, at the paper's training batch (8) and at
batch 2; the course and tiny presets at 128 px beside the UNet. Timings interleave the models of
one size round by round and keep each model's best round, so a busy machine slows them alike
rather than favouring whichever ran last.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from mtlearn.mtl import build_model, monai_baseline
from mtlearn.utils import count_flops, count_parameters


def _models(image_size: int, in_channels: int, names: list[str]) -> dict[str, nn.Module]:
    builders = {
        "tiny": lambda: build_model("tiny", in_channels=in_channels, image_size=image_size),
        "course": lambda: build_model("course", in_channels=in_channels, image_size=image_size),
        "paper": lambda: build_model("paper", in_channels=in_channels, image_size=image_size),
        "monai unet": lambda: monai_baseline("unet", in_channels, 2, image_size),
        "monai swinunetr": lambda: monai_baseline("swinunetr", in_channels, 2, image_size, feature_size=48),
    }
    return {name: builders[name]() for name in names}


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> None:
    outputs = model(images)
    loss = sum(output.float().square().mean() for output in outputs.values())  # stands in for the task losses
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def measure(image_size: int, names: list[str], batch_size: int, rounds: int, in_channels: int = 3) -> list[dict]:
    """Rows for the models `names` at one input size, timed round-robin (first round = warm-up)."""
    models = _models(image_size, in_channels, names)
    images = torch.randn(batch_size, in_channels, image_size, image_size).contiguous(memory_format=torch.channels_last)
    optimizers = {}
    for name, model in models.items():
        model.to(memory_format=torch.channels_last).train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
    best = {name: float("inf") for name in models}
    bar = tqdm(total=(rounds + 1) * len(models), desc=f"{image_size} px, batch {batch_size}", leave=False)
    for round_ in range(rounds + 1):
        for name, model in models.items():
            bar.set_postfix_str(name)
            bar.update()
            started = time.perf_counter()
            _train_step(model, optimizers[name], images)
            if round_ > 0:  # round 0 warms up allocators and kernels
                best[name] = min(best[name], time.perf_counter() - started)
    bar.close()
    rows = []
    for name, model in models.items():
        flops = count_flops(model, images[:1])
        rows.append({
            "model": name,
            "input": f"{image_size}x{image_size}x{in_channels}",
            "params_M": count_parameters(model) / 1e6,
            "GFLOPs_fwd": flops / 1e9,
            "train_img_per_s": batch_size / best[name],
            "batch": batch_size,
        })
    reference = next((r["train_img_per_s"] for r in rows if r["model"] == "monai swinunetr"), None)
    for row in rows:  # the target, side by side: the paper preset at least as fast as SwinUNETR-48
        row["vs_swinunetr"] = row["train_img_per_s"] / reference if reference else ""
    return rows


GROUPS = ("paper", "course")  # the paper preset beside SwinUNETR; the course and tiny presets beside the UNet


def run(quick: bool = False, threads: int = 2, groups: tuple[str, ...] = GROUPS, rounds: int | None = None) -> list[dict]:
    """All rows. quick: 128 px for the paper comparison and fewer rounds. threads: CPU threads
    (2, the course machine; on a machine shared with other jobs 1 thread gives steadier ratios).
    groups: which comparisons to run (see GROUPS). rounds: timed rounds per group (default 2,
    quick 1 and 2); more rounds make the best-of-rounds steadier on a busy machine."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {unknown}; expected some of {GROUPS}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        if "paper" in groups:
            # batch 8 is the paper's training batch; batch 2 shows how the ratio moves with the batch
            size, batches, default_rounds = (128, (2,), 1) if quick else (224, (8, 2), 2)
            for batch_size in batches:
                rows += measure(size, ["paper", "monai swinunetr", "monai unet"], batch_size=batch_size,
                                rounds=rounds or default_rounds)
        if "course" in groups:
            size, batch_size = (64, 4) if quick else (128, 8)
            rows += measure(size, ["course", "tiny", "monai unet"], batch_size=batch_size, rounds=rounds or 2)
    finally:
        torch.set_num_threads(previous)
    return [{**row, "threads": threads} for row in rows]


def main(argv: list[str] | None = None) -> None:
    from benchmarks.__main__ import format_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer rounds")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--group", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="comparisons to run: paper (224 px, beside SwinUNETR), course (128 px); default both")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per group (default 2)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    print(format_table(run(quick=args.quick, threads=args.threads, groups=tuple(args.group), rounds=args.rounds)))


if __name__ == "__main__":
    main()
