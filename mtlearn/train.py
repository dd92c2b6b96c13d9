"""Train one configured experiment from the command line, on one process or several (torchrun).

    python -m mtlearn.train --preset tiny --tasks seg cls --image-size 64 --epochs 2 --out-dir runs/demo
    torchrun --nproc_per_node 2 -m mtlearn.train --preset course --epochs 20 --out-dir runs/ddp

The same command runs unchanged under torchrun: with WORLD_SIZE > 1 every process joins a
process group (NCCL on CUDA, one GPU per process; gloo on CPU), `fit` wraps the model in
DistributedDataParallel, each process trains on its share of the data (DistributedSampler) and
evaluates its share of the validation and test sets, metrics are summed over processes, and only
rank 0 shows progress and writes files. --batch-size is per process. Under torchrun each process
ends through os._exit once it has written everything (see _command_line: a torch teardown crash).

Writes to --out-dir: options.json (the data and model options, which --resume must repeat), last.pt
and best.pt (see mtlearn.engine) and metrics.json: the configuration, the best epoch's validation
metrics, the test metrics of the best-validation weights, the history, and every process's final
weight digest and task weights (all equal when the processes stayed in sync). An --out-dir that
already holds a run is refused: pass another one, or --resume to continue it. Stopped by Ctrl-C or SIGTERM (a
scheduler pre-empting the job), it says which epoch last.pt holds and exits with 130 or 143 (under torchrun
rank 0 says it, and torchrun reports the stopped processes as it does).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from mtlearn.checkpoint import out_dir_lock
from mtlearn.data import DATASETS
from mtlearn.engine import (CompileError, NonFiniteLossError, NonFiniteWeightsError, TrainConfig, evaluate, fit,
                            resolve_monitor, validation_losses_finite, validation_metrics)
from mtlearn.heads import DFE_MODES  # a few milliseconds: mtl's model classes stay unimported
from mtlearn.losses import TASKS
from mtlearn.utils import (home_expanded, is_distributed, is_main_process, pick_device, printable_stdout,
                           seed_everything, sigterm_as_interrupt, stop_status, write_json)
from mtlearn.weighting import WEIGHTINGS

PRESETS = ("tiny", "course", "paper")
# what the checkpoint cannot tell: the same weights shapes fit another image size, and other data or
# another seed (which draws the synthetic data) would train the rest of the run on other images
# --monitor: best.pt so far was chosen by it (recorded as the metric it names, "auto" resolved)
RUN_OPTIONS = ("preset", "dfe", "dataset", "image_size", "augment", "limit", "seed", "batch_size", "monitor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mtlearn.train", description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model and data")
    model.add_argument("--preset", choices=PRESETS, default="tiny",
                       help="model size, see mtlearn.mtl.PRESETS (default: tiny)")
    model.add_argument("--dfe", choices=DFE_MODES, default="none",
                       help="dilated feature enhancement on the skip connections: three (Bui et al.'s network, "
                            "with --preset paper), four (ASPP-like) or none (default: none, as build_model)")
    model.add_argument("--tasks", nargs="+", choices=TASKS, default=["seg", "cls"],
                       help="tasks to train (default: seg cls)")
    model.add_argument("--dataset", default="synthetic", choices=[d for d in DATASETS if d != "shapes"],
                       help="synthetic, or a real dataset fetched with `python -m data_fetch NAME` (busi_npz "
                            "is fetched as busi_128) (default: synthetic)")
    model.add_argument("--data-root", default=None,
                       help="folder holding one folder per real dataset, as a notebook's data_root and "
                            "$MTLEARN_DATA do (default: $MTLEARN_DATA, else the user cache)")
    model.add_argument("--image-size", type=int, default=64, help="square image size in pixels (default: 64)")
    model.add_argument("--augment", action="store_true", help="random flips and rotations on the training split")
    model.add_argument("--limit", type=int, default=None, metavar="N",
                       help="use only N training images and N // 4 validation and test images, drawn at "
                            "random with --seed")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10, help="passes over the training set (default: 10)")
    train.add_argument("--batch-size", type=int, default=8, help="images per step and process (default: 8)")
    train.add_argument("--lr", type=float, default=1e-4,
                       help="peak learning rate, polynomial decay with power 0.9 (default: 1e-4)")
    train.add_argument("--weighting", choices=tuple(WEIGHTINGS), default="fixed",
                       help="multi-task loss weighting, see mtlearn.weighting (default: fixed)")
    train.add_argument("--task-weights", nargs="+", default=None, metavar="TASK=W",
                       help="weights of --weighting fixed, e.g. seg=1 cls=0.25")
    train.add_argument("--seed", type=int, default=0, help="seeds the weights, the data and its order (default: 0)")
    train.add_argument("--num-workers", type=int, default=0,
                       help="DataLoader worker processes (default: 0); with --augment each worker draws its own "
                            "augmentations, so another count trains on other ones (the same count repeats a run). "
                            "They start afresh every epoch, which on macOS and Windows (spawned processes) takes "
                            "seconds: there 0 is often faster for small images")
    train.add_argument("--monitor", default="auto", metavar="METRIC",
                       help="validation metric that picks the best epoch, e.g. seg/dice, cls/auc or cls/loss (a loss "
                            "is minimised) (default: auto: seg/dice, else cls/auc, else recon/psnr)")
    run = parser.add_argument_group("run")
    run.add_argument("--out-dir", default=None,
                     help="default: outputs/train/<dataset>_<image-size>px_<preset>[_dfe-<dfe>]_<tasks>_<weighting>_"
                     "s<seed> (no epochs: --resume --epochs N continues a run); a folder holding a run is refused "
                     "unless --resume")
    run.add_argument("--device", default="auto",
                     help="auto, cpu, cuda or mps; under torchrun one GPU per process (default: auto)")
    run.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                     help="mixed precision; auto: bf16 or fp16 on CUDA, off elsewhere (default: auto)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="NHWC memory layout (default: on CUDA)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (its first steps compile: a "
                     "minute or more; not with --weighting gradnorm or pcgrad)")
    run.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt if it exists (with "
                     "another --epochs: the learning-rate schedule is stretched to it, and the rate jumps)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dataset == "synthetic" and args.image_size < 32:  # else refused later, without naming the option
        parser.error(f"--image-size must be >= 32 for the synthetic data (its smallest size), got {args.image_size}")
    if len(set(args.tasks)) != len(args.tasks):
        parser.error(f"--tasks lists a task twice ({' '.join(args.tasks)}); give each once")
    metrics = validation_metrics(args.tasks)
    if args.monitor != "auto" and args.monitor.removeprefix("val/") not in metrics:  # before any data loads
        parser.error(f"--monitor {args.monitor} is not a validation metric of --tasks {' '.join(args.tasks)}; "
                     f"choose one of {', '.join(metrics)} (or auto)")
    # the metric itself, as options.json records it: `auto` and `val/seg/dice` resume a `seg/dice` run
    args.monitor = resolve_monitor(args.monitor, args.tasks)
    if args.image_size % 16:  # the synthetic data is at least 32 px: never suggest a size it refuses
        parser.error(f"--image-size must be a multiple of 16 (the network's stride), got {args.image_size}; "
                     f"try {max(32 if args.dataset == 'synthetic' else 16, round(args.image_size / 16) * 16)}")
    if not (math.isfinite(args.lr) and args.lr > 0):  # "inf" parses as a float and is > 0
        parser.error(f"--lr must be positive and finite, got {args.lr}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0 (0: load in the training process), got {args.num_workers}")
    if args.augment and args.dataset == "synthetic":
        parser.error("--augment applies to real datasets; every synthetic image is already new")
    if not 0 <= args.seed < 2**32:  # numpy's seeds; else refused once running, without naming the option
        parser.error(f"--seed must be an integer from 0 to 2**32 - 1, got {args.seed}")
    try:
        device = pick_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.amp == "fp16" and device.type != "cuda":  # fit's own message names its keyword, amp='fp16'
        parser.error(f"--amp fp16 needs a CUDA GPU (device is {device}); use --amp bf16 or --amp off")
    if args.dataset == "breastmnist" and "seg" in args.tasks:  # before any data loads: it has no lesion masks
        others = [t for t in args.tasks if t != "seg"]
        parser.error("breastmnist has no lesion masks, so it cannot train seg; "
                     + (f"use --tasks {' '.join(others)}" if others else "use --tasks cls, or a dataset with masks "
                        "(busi, bus_bra, bus_uclm, synthetic)"))
    if args.limit is not None and args.limit < 4:
        parser.error(f"--limit must be >= 4 (a quarter goes to validation and test), got {args.limit}")
    args.task_weights = _parse_task_weights(parser, args.task_weights, args.tasks)
    if args.task_weights is not None and args.weighting != "fixed":
        parser.error("--task-weights only applies to --weighting fixed")
    if args.out_dir is not None and not args.out_dir.strip():  # "" is the working folder: a run's files all over it
        parser.error("--out-dir is empty; name a folder for the run, or leave the option out for the default")
    if args.data_root is not None and not args.data_root.strip():  # "" would read the working folder
        parser.error("--data-root is empty; name the data folder, or leave the option out for the default")
    try:  # "--out-dir=~/runs" reaches us unexpanded: fit's checkpoints and options.json would land in two folders
        args.out_dir = str(home_expanded(args.out_dir, "--out-dir")) if args.out_dir is not None else None
    except ValueError as error:
        parser.error(str(error))
    if args.out_dir is None:
        dfe = "" if args.dfe == "none" else f"_dfe-{args.dfe}"  # a run with DFE is another model: its own folder
        args.out_dir = (f"outputs/train/{args.dataset}_{args.image_size}px_{args.preset}{dfe}_{'+'.join(args.tasks)}_"
                        f"{args.weighting}_s{args.seed}")
    return args


def _parse_task_weights(parser, items: list[str] | None, tasks: list[str]) -> dict[str, float] | None:
    if items is None:
        return None
    weights = {}
    for item in items:
        task, _, value = item.partition("=")
        if task in weights:  # seg=1 ... seg=2: the last would win silently
            parser.error(f"--task-weights gives {task!r} twice ({weights[task]:g} and {value}); give each task once")
        try:
            weights[task] = float(value)
        except ValueError:
            parser.error(f"--task-weights takes TASK=NUMBER items such as seg=1 cls=0.25, got {item!r}")
        if not math.isfinite(weights[task]) or weights[task] < 0:  # else refused only after the data is loaded
            parser.error(f"--task-weights must be finite numbers >= 0, got {item!r}")
    if set(weights) != set(tasks):
        parser.error(f"--task-weights must give one weight per task {tasks}, got {sorted(weights)}")
    if not any(weights.values()):  # a loss of 0: nothing would train
        parser.error("--task-weights are all 0, so nothing would train; give at least one task a weight > 0")
    return weights


# ----------------------------------------------------------------------------- distributed plumbing


def _under_torchrun() -> bool:
    """Launched by torchrun with more than one process (WORLD_SIZE > 1); the process group may not exist yet."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(device: str = "auto") -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1; return this process's device."""
    if not _under_torchrun():
        return pick_device(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if pick_device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_loader(dataset, batch_size: int, train: bool, seed: int, num_workers: int, device: torch.device) -> DataLoader:
    """Training: shuffled (DistributedSampler under torchrun). Evaluation: this process's shard, in order."""
    sampler, generator = None, None
    if train and is_distributed():
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    elif train:
        generator = torch.Generator().manual_seed(seed)
    elif is_distributed():  # every rank evaluates every world_size-th image: no padding, no duplicates
        dataset = Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size()))
    # Workers are started afresh every epoch (not persistent): their random generators, which the
    # augmentation draws from, are then seeded from the loader's state, which a checkpoint saves, so a
    # resumed run draws what an uninterrupted one would. This process's share decides drop_last: the
    # whole dataset can be larger than a batch while each process's part is not.
    images = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      generator=generator, num_workers=num_workers, pin_memory=device.type == "cuda",
                      drop_last=train and images > batch_size)  # no 1-image batch for BatchNorm


def state_digest(*modules: torch.nn.Module) -> str:
    """SHA-256 of the modules' parameters and buffers: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            if torch.is_tensor(tensor):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gather(value) -> list:
    """The value of every process, in rank order (just [value] without torchrun)."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# ----------------------------------------------------------------------------- the experiment


def _datasets(args):
    from mtlearn.data import load_dataset  # imported here: `--help` stays fast
    from mtlearn.data.splits import random_subset

    root = None
    if args.dataset != "synthetic" and args.data_root is not None:
        from mtlearn.data.real import dataset_folder

        root = dataset_folder(args.dataset, args.data_root, option="--data-root")  # e.g. ~/data -> ~/data/busi
    common = dict(root=root, image_size=args.image_size, seed=args.seed)
    splits = {split: load_dataset(args.dataset, split=split, augment=args.augment and split == "train", **common)
              for split in ("train", "val", "test")}
    info = splits["train"]
    if args.limit is not None:
        if args.limit > len(splits["train"]) and is_main_process():  # else a run on less data than asked, silently
            print(f"note: --limit {args.limit} is more than the {len(splits['train'])} training images of "
                  f"{args.dataset}; all of them are used", file=sys.stderr)
        sizes = {"train": args.limit, "val": max(args.limit // 4, 1), "test": max(args.limit // 4, 1)}
        splits = {s: random_subset(d, sizes[s], args.seed) for s, d in splits.items()}  # not the first: by class
    return splits, info


def _item_facts(dataset) -> list | None:
    """(id, label, what its image and mask are) of each item of a real dataset, in order (a Subset's chosen
    ones): a file by its size (reading every file would take longer than a resume should), an array of an npz
    dataset by a checksum of its pixels (its size is every item's); None for generated data, whose seed and
    options already say what it is."""
    if isinstance(dataset, Subset):
        facts = _item_facts(dataset.dataset)
        return None if facts is None else [facts[i] for i in dataset.indices]
    records = getattr(dataset, "records", None)
    if records is None:
        return None

    def fact(source) -> int:  # a file's size, an array's checksum, 0 for no mask
        if isinstance(source, Path):
            return source.stat().st_size
        return zlib.crc32(np.ascontiguousarray(source).tobytes()) if source is not None else 0

    return [[str(r.id), int(r.label), fact(r.image),
             sum(map(fact, r.masks)) if isinstance(r.masks, tuple) else fact(r.masks)] for r in records]


def data_fingerprint(splits: dict) -> str | None:
    """A digest of what the splits hold (each item's id, label and file sizes or pixels), recorded in options.json so
    that --resume can tell another folder's data under the same options; None for generated data."""
    facts = {split: _item_facts(data) for split, data in splits.items()}
    if any(f is None for f in facts.values()):
        return None
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _check_same_data(args: argparse.Namespace, fingerprint: str | None) -> None:
    """Refuse --resume onto other images than the run's: the options match, but --data-root (or
    $MTLEARN_DATA) now names another copy of the dataset, or its files changed."""
    path = Path(args.out_dir) / "options.json"
    if not (args.resume and (Path(args.out_dir) / "last.pt").is_file() and path.is_file()):
        return
    recorded = json.loads(path.read_text()).get("data_fingerprint")  # None: a run from before it was recorded
    if recorded is not None and fingerprint is not None and recorded != fingerprint:
        raise ValueError(f"cannot resume the run in {args.out_dir}: the {args.dataset} images found now (--data-root "
                         f"{args.data_root or 'default'}) are not the ones it was trained on (other files, or files "
                         "of other sizes), so it would go on with other training images and test on others; resume "
                         "with the run's own data folder, or start again (another --out-dir, without --resume)")


CLI_WRITES = "options.json, last.pt, best.pt and metrics.json"  # what a run of the command writes in --out-dir


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate as configured; returns (and on rank 0 writes) the metrics.json record."""
    from mtlearn.mtl import build_model

    started = time.perf_counter()
    device = setup_distributed(args.device)
    held = contextlib.ExitStack()
    try:
        held.enter_context(out_dir_lock(args.out_dir, "--out-dir", writes=CLI_WRITES))  # options.json to metrics.json
        options = _check_run_options(args)  # before the data are read
        seed_everything(args.seed)
        splits, info = _datasets(args)
        fingerprint = data_fingerprint(splits)
        _check_same_data(args, fingerprint)
        class_names = getattr(info, "class_names", None)
        num_classes = len(class_names) if class_names is not None else 3
        in_channels = splits["train"][0]["image"].shape[0]
        model = build_model(args.preset, tasks=tuple(args.tasks), in_channels=in_channels,
                            num_classes=num_classes, image_size=args.image_size, dfe=args.dfe)
        if options is not None:  # once the data and the model are there: a refused run leaves no folder behind
            write_json({**options, "data_fingerprint": fingerprint}, Path(args.out_dir) / "options.json")
        loaders = {s: make_loader(d, args.batch_size, s == "train", args.seed, args.num_workers, device)
                   for s, d in splits.items()}
        config = TrainConfig(
            tasks=tuple(args.tasks), epochs=args.epochs, lr=args.lr, weighting=args.weighting,
            task_weights=args.task_weights, device=str(device), amp=args.amp, channels_last=args.channels_last,
            compile=args.compile, out_dir=args.out_dir, resume=args.resume, seed=args.seed, progress=args.progress,
            monitor=args.monitor,
        )
        history = fit(model, loaders["train"], loaders["val"], config)  # ends with the best-validation weights
        test = evaluate(model, loaders["test"], tuple(args.tasks), device=device, amp=args.amp,
                        channels_last=args.channels_last)
        best = next((r for r in history.records if r["epoch"] == history.best_epoch), history.records[-1])
        digests = _gather(state_digest(model))  # one per process: equal when DDP kept them in sync
        final_weights = _gather({k: v for k, v in history.records[-1].items() if k.startswith("weight/")})
        record = {
            "preset": args.preset, "tasks": list(args.tasks), "dataset": args.dataset, "image_size": args.image_size,
            # trained, not asked for: a --resume with fewer --epochs than the run has trains none
            "epochs": history.records[-1]["epoch"], "batch_size": args.batch_size, "lr": args.lr,
            "weighting": args.weighting, "seed": args.seed, "device": str(device), "amp": args.amp,
            "world_size": dist.get_world_size() if is_distributed() else 1,
            "wall_time_s": round(time.perf_counter() - started, 1), "best_epoch": history.best_epoch,
            "monitor": history.monitor,
            "metrics": {"val": {k.removeprefix("val/"): v for k, v in best.items() if k.startswith("val/")},
                        "test": test},
            # how many images each number rests on: a point of accuracy on 150 test images is one image or two
            "images": {split: len(data) for split, data in splits.items()},
            "history": history.records,
            "parameter_digests": digests,
            "task_weights_per_process": final_weights,
        }
        if is_main_process():
            write_json(record, Path(args.out_dir) / "metrics.json")
        if is_main_process() and history.best_epoch is not None:  # else the error below, not a finished run's line
            summary = ", ".join(f"{k} {v:.3f}" for k, v in test.items() if not k.endswith("loss"))
            print(f"best epoch {history.best_epoch} ({history.monitor}); test ({len(splits['test'])} images): "
                  f"{summary}; {record['wall_time_s']:.0f} s on {record['world_size']} x {device}; "
                  f"wrote {args.out_dir}")
        if is_distributed():
            # Leave together: a rank that tears gloo down while rank 0 is still writing can make
            # rank 0 abort ("terminate called without an active exception"). Only on success: a
            # rank that failed must not wait here for a peer stuck in a collective.
            dist.barrier()
        if history.best_epoch is None:  # every rank: the validation metrics are reduced over all of them
            raise NoGoodEpochError(_no_good_epoch(history, args))
        return record
    finally:
        held.close()
        cleanup_distributed()


class NoGoodEpochError(RuntimeError):
    """Training ended without one epoch whose validation numbers could be trusted."""


def _no_good_epoch(history, args: argparse.Namespace) -> str:
    """Why no epoch could be the best one, and what to change: a diverged run (a validation loss that was
    never finite) needs a lower --lr; a metric that is NaN on finite losses (an AUC on a validation split
    holding one class) needs another --monitor or more validation images, and no --lr would help."""
    where = (f"so there is no best epoch and the test metrics are the last epoch's (in "
             f"{Path(args.out_dir) / 'metrics.json'})")
    # (a monitored loss needs no case of its own: never finite, it fails validation_losses_finite too)
    if not any(map(validation_losses_finite, history.records)):
        return f"no epoch had a finite validation loss, {where}: the run diverged; lower --lr (now {args.lr:g})"
    metric = history.monitor.removeprefix("val/")
    more = f"a larger --limit, now {args.limit}" if args.limit is not None else "another dataset"
    return (f"{metric} was not finite in any epoch whose validation loss was, {where}: an AUC, a sensitivity or a "
            "specificity is undefined on a validation split that lacks a class; validate on more images "
            f"({more}) or choose another metric (e.g. --monitor {metric.split('/')[0]}/loss)")


def _check_run_options(args: argparse.Namespace) -> dict | None:
    """Refuse --resume with other data or model options than the run in --out-dir; for a new run, return the
    options to record in its options.json (on the main process; None when there is nothing to write)."""
    from mtlearn.checkpoint import check_out_dir, check_resume_options
    from mtlearn.data.splits import DRAW_VERSION

    out_dir = Path(args.out_dir)
    check_out_dir(out_dir, args.resume)  # as fit will: before options.json could replace an earlier run's
    path, options = out_dir / "options.json", {name: getattr(args, name) for name in RUN_OPTIONS}
    flags = {name: f"--{name.replace('_', '-')}" for name in RUN_OPTIONS}
    resuming = args.resume and (out_dir / "last.pt").is_file()
    if resuming and path.is_file():
        saved = json.loads(path.read_text())
        check_resume_options(path, {flags[k]: v for k, v in saved.items() if k in flags},
                             {flags[k]: v for k, v in options.items()}, list(flags.values()))
        drawn = saved.get("data_draw", 1)  # not recorded: drawn the first way
        # the same options now draw other images (the synthetic splits are fixed index ranges: unchanged;
        # --limit's draw, random_subset, last changed in draw 2)
        if drawn != DRAW_VERSION and (args.dataset != "synthetic" or (args.limit is not None and drawn < 2)):
            raise ValueError(f"cannot resume the run in {out_dir}: it was started when mtlearn drew a real "
                             f"dataset's splits and --limit's images another way (data draw {drawn} then, "
                             f"{DRAW_VERSION} now), so it would go on with other images, some of them its test "
                             "images; start it again: another --out-dir, without --resume")
    elif not resuming and is_main_process():  # (a run saved before options.json existed: not known, not written)
        return {**options, "data_draw": DRAW_VERSION}
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    printable_stdout()
    try:
        with sigterm_as_interrupt():
            return run(args)
    except (ValueError, FileNotFoundError, CompileError) as error:  # found once running: a message, no traceback
        print(f"python -m mtlearn.train: error: {_own_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:  # a full disk, no permission: the message names the file; what was saved is kept
        print(f"python -m mtlearn.train: error: {error}. {_how_to_go_on(args, error)}", file=sys.stderr)
        raise SystemExit(1) from None
    except (NonFiniteLossError, NonFiniteWeightsError, NoGoodEpochError) as error:  # diverged; the message says how
        print(f"python -m mtlearn.train: training stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: what is kept and how to go on, not a traceback
        what, status = stop_status(stop)
        if os.environ.get("RANK", "0") == "0":  # torchrun's; run() has already taken the process group down
            print(f"python -m mtlearn.train: {what}. {_how_to_go_on(args)}", file=sys.stderr)
        raise SystemExit(status) from None


_TRACEBACK = "Traceback (most recent call last):\n"
_CHAINED = ("\n\nThe above exception was the direct cause of the following exception:\n\n" + _TRACEBACK,
            "\n\nDuring handling of the above exception, another exception occurred:\n\n" + _TRACEBACK)


def _own_message(error: BaseException) -> str:
    """The error's message; for one raised by a dataset in a DataLoader worker (--num-workers), the message it
    was raised with, not torch's "Caught ... in DataLoader worker process 1" with the worker's traceback."""
    text = str(error)
    if not text.startswith("Caught ") or "\nOriginal " + _TRACEBACK not in text:
        return text
    # read from the start: each traceback's frames are indented, then "<module>.<Class>: <message>", then the
    # next traceback of the chain, if any; the last one's message runs to the end (whatever it quotes)
    rest = text[text.index(_TRACEBACK) + len(_TRACEBACK):]
    while True:
        lines = rest.split("\n")
        frames = list(itertools.takewhile(lambda line: line.startswith((" ", "\t")), lines))
        own = "\n".join(lines[len(frames):])
        cuts = [(own.find(chained), chained) for chained in _CHAINED if chained in own]
        if not cuts:
            break
        at, chained = min(cuts)
        rest = own[at + len(chained):]
    named = re.match(rf"(?:[\w.]+\.)?{type(error).__name__}(: |$)", own)
    message = own[named.end():].strip() if named else ""
    where = next((line.strip() for line in reversed(frames) if line.lstrip().startswith("File ")), "")
    return message or f"{type(error).__name__} without a message, raised in a DataLoader worker ({where})"


def _how_to_go_on(args: argparse.Namespace, error: OSError | None = None) -> str:
    """After Ctrl-C, SIGTERM or a full disk: the epoch last.pt holds and the --resume that continues from it, or
    that none was saved (and, refused a path, that running again will not help)."""
    import errno

    from mtlearn.checkpoint import load_checkpoint

    last = Path(args.out_dir) / "last.pt"
    if not last.is_file():
        if error is not None and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # "run it again" won't do
            return (f"No epoch had finished, so nothing was saved in {args.out_dir}; the same command would be "
                    "refused again: choose an --out-dir (or --data-root) you may write to, or change the permissions "
                    "of the path named")
        return f"No epoch had finished, so nothing was saved in {args.out_dir}: run the command again to start over"
    try:
        epoch = int(load_checkpoint(last)["epoch"])
    except (ValueError, KeyError, TypeError):  # the message must not become a traceback itself
        return f"{last} cannot be read, so there is nothing to resume: move it aside and run the command again"
    return (f"{last} holds epoch {epoch} of {args.epochs}: run the same command with --resume to continue from "
            "there")


def _command_line() -> None:
    """`python -m mtlearn.train`: main(), and under torchrun an exit that skips the interpreter's teardown.

    DistributedDataParallel keeps the gloo process group and its threads alive after
    destroy_process_group (pytorch/pytorch#107298). A process that then exits normally aborts now and
    then after its atexit handlers ("terminate called without an active exception", SIGABRT), and
    torchrun reports a finished run as failed: 7 of 115 two-process runs of a bare DDP script on a
    2-core machine, once in this project's CI (a two-process test of fit), none in 40 torchrun runs of
    this command's smoke training (rare, not impossible). Everything is written by the time main()
    returns or raises, so the process flushes its streams and leaves with main's exit status through
    os._exit (0 of 70 runs of the bare script aborted; 40 of 40 torchrun runs finished).
    """
    if not _under_torchrun():
        main()
        return
    try:
        main()
        status = 0
    except SystemExit as stop:  # argparse's and main's own exits: keep their status and message
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except Exception:  # printed as Python prints it, with the same status (Ctrl-C exits as usual)
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    _command_line()
