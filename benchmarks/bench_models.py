"""Model sizes and training speed: the ResFormer presets beside MONAI's UNet and SwinUNETR.

    python -m benchmarks.bench_models            # several minutes on 2 CPU cores (two layouts per model)
    python -m benchmarks.bench_models --quick    # smaller inputs, for a first look
    python -m benchmarks.bench_models --threads 1 --group paper --rounds 4   # the 224 px rows only
    python -m benchmarks.bench_models --device cuda --group paper            # on a GPU
    python -m benchmarks.bench_models --device cuda --group paper --amp bf16 # as the trainer runs there

Every row is one model at one input size: parameters, forward GFLOPs per image (counted by
torch.utils.flop_counter) and training images per second (forward + backward + AdamW step).
Rows compared with each other share an input size and batch: the paper preset runs at 224 px
beside SwinUNETR (feature_size 48), MONAI's UNet and the course and tiny presets, at the paper's
training batch (8) and at batch 2; the course and tiny presets also at 128 px, their working size,
beside the UNet (--quick: 128 and 64 px).

Each model is timed in both memory layouts (contiguous NCHW and channels_last NHWC, model and
input alike), because the faster layout differs between models: channels_last helps the
ResFormer presets and slows SwinUNETR on a CPU. The row reports both rates, names the faster
layout and gives its rate as train_img_per_s; vs_swinunetr compares those best rates (each model
in its own faster layout). Timings interleave every model and layout of one size round by round
after one warm-up round, and keep each one's best round, so a busy machine slows them alike
rather than favouring whichever ran last. On CUDA the GPU is synchronised before and after each
timed step.

On a CPU, freed memory stays in the process while it runs (keep_freed_memory; --default-malloc
measures with the C library's defaults instead): glibc hands blocks above 32 MB back to the system
on every free, so a model whose activations exceed that pays page faults on every step and the
ratio would partly measure the allocator (the `malloc` column says which way a row was measured).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from mtlearn.mtl import build_model, monai_baseline
from mtlearn.utils import count_flops, count_parameters, pick_device, synchronize

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers, from glibc's malloc.h
_malloc_changed = False  # keep_freed_memory changed this process's allocator (there is no way back)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in this process, for the rest of it; True if it did.

    By default glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap
    and unmaps it on free, so the next step touches new pages again: SwinUNETR-48 at 224 px, batch 8,
    took about 1.6 million minor page faults and spent about 40 % of each training step in the kernel
    on the development machine (batch 2: almost none; the `paper` preset at batch 8: a third as many
    or fewer), which made SwinUNETR 2-2.5x slower there and flipped the ratio (benchmarks/README.md).
    With mmap off (M_MMAP_MAX 0) and trimming off (M_TRIM_THRESHOLD -1) blocks are reused, as
    PyTorch's CUDA caching allocator reuses GPU memory, or jemalloc/tcmalloc would on a CPU.
    Returns False where the C library has no working mallopt (macOS, Windows; musl's does nothing).
    The process keeps the freed memory it reached (its high-water mark) until it ends.
    """
    global _malloc_changed
    try:  # the symbols already loaded into this process: the C library's, without looking for its file
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS); Windows cannot open None
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = [bool(mallopt(M_MMAP_MAX, 0)), bool(mallopt(M_TRIM_THRESHOLD, -1))]  # each returns 1 on success
    _malloc_changed = _malloc_changed or any(done)
    return all(done)


def _models(image_size: int, in_channels: int, names: list[str]) -> dict[str, nn.Module]:
    builders = {
        "tiny": lambda: build_model("tiny", in_channels=in_channels, image_size=image_size),
        "course": lambda: build_model("course", in_channels=in_channels, image_size=image_size),
        "paper": lambda: build_model("paper", in_channels=in_channels, image_size=image_size),
        "monai unet": lambda: monai_baseline("unet", in_channels, 2, image_size),
        "monai swinunetr": lambda: monai_baseline("swinunetr", in_channels, 2, image_size, feature_size=48),
    }
    return {name: builders[name]() for name in names}


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                amp_dtype: torch.dtype | None = None) -> None:
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = model(images)
    loss = sum(output.float().square().mean() for output in outputs.values())  # stands in for the task losses
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


AMP = ("off", "bf16")  # fp16 would need a GradScaler: not timed here


def _amp_dtype(amp: str) -> torch.dtype | None:
    if amp not in AMP:
        raise ValueError(f"unknown amp {amp!r}; expected one of {AMP}")
    return torch.bfloat16 if amp == "bf16" else None


def _device(name: str | torch.device) -> torch.device:
    """The device `name` names: "auto" is CUDA if available, else the CPU (never MPS); anything else
    as mtlearn.utils.pick_device reads it (an unavailable "cuda" raises ValueError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return pick_device(name)


def _timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                amp_dtype: torch.dtype | None = None) -> float:
    """Seconds of one training step; on a GPU (CUDA, MPS), queued work is waited for before and after."""
    synchronize(images.device)
    started = time.perf_counter()
    _train_step(model, optimizer, images, amp_dtype)
    synchronize(images.device)
    return time.perf_counter() - started


def measure(image_size: int, names: list[str], batch_size: int, rounds: int, in_channels: int = 3,
            device: str | torch.device = "auto", amp: str = "off") -> list[dict]:
    """Rows for the models `names` at one input size, each timed in every layout of LAYOUTS,
    round-robin (round 0 warms up allocators and kernels and is not counted). amp: "off" (float32)
    or "bf16" (the forward pass under bfloat16 autocast, as mtlearn's trainer runs on a recent GPU)."""
    device = _device(device)
    amp_dtype = _amp_dtype(amp)
    images = torch.randn(batch_size, in_channels, image_size, image_size, device=device)
    runs = {}  # (name, layout) -> (model, optimizer, input); one copy of each model per layout
    for name, model in _models(image_size, in_channels, names).items():
        for layout, memory_format in LAYOUTS.items():
            copy_ = copy.deepcopy(model).to(device, memory_format=memory_format).train()
            runs[name, layout] = (copy_, torch.optim.AdamW(copy_.parameters(), lr=1e-4),
                                  images.contiguous(memory_format=memory_format))
    times = {key: [] for key in runs}
    bar = tqdm(total=(rounds + 1) * len(runs), desc=f"{image_size} px, batch {batch_size}", leave=False)
    for round_ in range(rounds + 1):
        for key, (model, optimizer, inputs) in runs.items():
            bar.set_postfix_str(" ".join(key))
            bar.update()
            seconds = _timed_step(model, optimizer, inputs, amp_dtype)
            if round_ > 0:  # round 0 is the warm-up
                times[key].append(seconds)
    bar.close()
    best = {key: min(values) for key, values in times.items()}
    rows = []
    for name in names:
        model = runs[name, "contiguous"][0]
        rates = {layout: batch_size / best[name, layout] for layout in LAYOUTS}  # images per second
        layout = max(rates, key=rates.get)
        rows.append({
            "model": name,
            "input": f"{image_size}x{image_size}x{in_channels}",
            "device": str(device),
            "params_M": count_parameters(model) / 1e6,
            "GFLOPs_fwd": count_flops(model, images[:1]) / 1e9,
            **{f"img_per_s_{key}": rate for key, rate in rates.items()},
            "layout": layout,  # the faster one
            "train_img_per_s": rates[layout],
            # slowest / fastest timed step of that layout: how far the best-of-rounds can be trusted
            "spread": max(times[name, layout]) / best[name, layout],
            "batch": batch_size,
            "amp": amp,
        })
    reference = next((r["train_img_per_s"] for r in rows if r["model"] == "monai swinunetr"), None)
    for row in rows:  # the target, side by side: the paper preset at least as fast as SwinUNETR-48
        row["vs_swinunetr"] = row["train_img_per_s"] / reference if reference else ""
    return rows


GROUPS = ("paper", "course")  # every model at 224 px beside SwinUNETR; the course and tiny presets at 128 px


def run(quick: bool = False, threads: int = 2, groups: tuple[str, ...] = GROUPS, rounds: int | None = None,
        device: str = "auto", default_malloc: bool = False, amp: str = "off") -> list[dict]:
    """All rows. quick: 128 px for the paper comparison (64 px for the course one) and fewer rounds.
    threads: CPU threads (2, the course machine; on a machine shared with other jobs 1 thread gives
    steadier ratios). groups: which comparisons to run (see GROUPS). rounds: timed rounds per group
    (default 2; with quick, 3 for paper and 2 for course); more rounds make the best-of-rounds
    steadier on a busy machine (the "spread" column: slowest / fastest step). device: "auto" (CUDA
    if available, else the CPU), "cpu", "cuda", "cuda:N" or "mps" (Apple silicon; timed with
    torch.mps.synchronize like CUDA).
    default_malloc: on a CPU, measure with the C library's allocator settings instead of calling
    keep_freed_memory first; refused in a process where it was already called (it cannot be undone).
    amp: "off" (float32) or "bf16" (the forward pass under bfloat16 autocast; see measure)."""
    _amp_dtype(amp)  # an unknown amp is refused before anything is measured
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {unknown}; expected some of {GROUPS}")
    device = _device(device)
    if device.type == "cpu" and default_malloc and _malloc_changed:
        raise ValueError("this process already keeps its freed memory (keep_freed_memory ran): measure "
                         "with default_malloc=True (--default-malloc) in a new process")
    malloc = "kept" if device.type == "cpu" and not default_malloc and keep_freed_memory() else "default"
    previous = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(threads)
    # as mtlearn's trainer runs on CUDA (seed_everything): cuDNN picks the fastest convolution for
    # each shape during the warm-up round
    torch.backends.cudnn.benchmark = device.type == "cuda"
    rows = []
    try:
        if "paper" in groups:
            # batch 8 is the paper's training batch; batch 2 shows how the ratio moves with the batch
            # quick: 3 rounds still (with 1 the ratio rested on one step: 2.09 and 7.51 in two runs)
            size, batches, default_rounds = (128, (2,), 3) if quick else (224, (8, 2), 2)
            for batch_size in batches:
                rows += measure(size, ["paper", "monai swinunetr", "monai unet", "course", "tiny"],
                                batch_size=batch_size, rounds=rounds or default_rounds, device=device, amp=amp)
        if "course" in groups:
            size, batch_size = (64, 4) if quick else (128, 8)
            rows += measure(size, ["course", "tiny", "monai unet"], batch_size=batch_size, rounds=rounds or 2,
                            device=device, amp=amp)
    finally:
        torch.set_num_threads(previous[0])
        torch.backends.cudnn.benchmark = previous[1]
    return [{**row, "threads": threads, "malloc": malloc if device.type == "cpu" else ""} for row in rows]


def main(argv: list[str] | None = None) -> None:
    from benchmarks import run_header
    from benchmarks.__main__ import format_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer rounds")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--group", nargs="+", choices=GROUPS, default=list(GROUPS),
                        help="comparisons to run: paper (beside SwinUNETR; 224 px, 128 px with --quick), "
                             "course (128 px, 64 px with --quick); default both")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per group after one warm-up round "
                             "(default 2; --quick: 3 for paper, 2 for course)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else the CPU), cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="on a CPU, keep the C library's allocator settings (freed memory above 32 MB "
                             "goes back to the system on every free; see keep_freed_memory)")
    parser.add_argument("--amp", choices=AMP, default="off",
                        help="off: float32 (default); bf16: the forward pass under bfloat16 autocast, as "
                             "python -m mtlearn.train runs on a recent GPU")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        _device(args.device)  # an unknown or missing device is refused before anything is measured
    except ValueError as error:
        parser.error(str(error))
    print(run_header(args.device, args.threads))
    print(format_table(run(quick=args.quick, threads=args.threads, groups=tuple(args.group), rounds=args.rounds,
                           device=args.device, default_malloc=args.default_malloc, amp=args.amp)))


if __name__ == "__main__":
    main()
