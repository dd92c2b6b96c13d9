"""The training engine every notebook and the command line use: `fit`, `evaluate`, `History`.

    history = fit(model, train_loader, val_loader, tasks=("seg", "cls"), epochs=20, out_dir="runs/a")
    metrics = evaluate(model, test_loader)          # {"seg/dice": ..., "cls/acc": ..., ...}
    history.plot()                                  # losses, validation metrics, task weights, lr

What one training step does (`_forward`, then `_update`):
    1. move the batch to the device (non_blocking; the loader pins memory on CUDA),
    2. forward under autocast (bf16, or fp16 with a GradScaler) and one loss per task,
    3. stop with NonFiniteLossError if any task loss is NaN or inf,
    4. let the weighting strategy back-propagate (weighted sum, GradNorm, PCGrad ...),
    5. AdamW step, weighting update, polynomial learning-rate decay (per iteration).
After every epoch: a check that the weights are still finite (NonFiniteWeightsError otherwise, before
anything is saved), validation metrics, `last.pt`, and `best.pt` when the validation metric improved.
Checkpoints hold everything needed to resume bit-for-bit (on CPU): model, optimiser, scheduler,
weighting, grad scaler, every random generator (of every torchrun process) and the history. How
they are written, read and checked is mtlearn.checkpoint's (`save_checkpoint` and
`load_checkpoint` import from here too).

Under torchrun (`python -m mtlearn.train`), `fit` wraps the model in DistributedDataParallel
itself; progress bars and checkpoints then come from rank 0 only and metrics are summed over ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtlearn.checkpoint import (
    PARALLEL_WRAPPERS,
    UnreadableCheckpointError,
    check_checkpoint_keys,
    check_out_dir,
    check_resume_options,
    check_run_folder,
    check_trainable,
    is_compiled,
    load_checkpoint,
    load_weights,
    out_dir_lock,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_names,
    unwrapped_model,
)
from mtlearn.encoder import unscaled_range
from mtlearn.losses import TASK_TARGETS, LossConfig, build_losses, check_tasks, task_losses
from mtlearn.metrics import METRIC_KEYS, MetricAccumulator
from mtlearn.utils import (
    batches_from,
    check_adamw,
    check_bool,
    check_int,
    check_loader,
    check_number,
    eval_mode,
    find_class_names,
    is_distributed,
    is_main_process,
    pick_device,
    python_numbers,
    seed_everything,
    synchronize,
    user_stacklevel,
    warnings_above,
    world_and_rank,
)
from mtlearn.weighting import (
    WEIGHTINGS,
    GradNorm,
    LossWeighting,
    PCGrad,
    build_weighting,
    find_shared_parameters,
    has_trained,
    weighting_settings,
)

CHECKPOINT_FORMAT = 1
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
HEADLINE_METRICS = ("seg/dice", "seg/iou", "cls/acc", "cls/balanced_acc", "cls/auc", "recon/ssim")  # 0-1 scale
DEFAULT_MONITOR = {"seg": "seg/dice", "cls": "cls/auc", "recon": "recon/psnr"}  # first task present wins


def resolve_monitor(monitor: str, tasks: Sequence[str]) -> str:
    """The validation metric `monitor` names, without the "val/" prefix; "auto": seg/dice, else cls/auc,
    else recon/psnr (the first of the tasks present)."""
    chosen = next(DEFAULT_MONITOR[t] for t in ("seg", "cls", "recon") if t in tasks) if monitor == "auto" else monitor
    return chosen.removeprefix("val/")


def validation_metrics(tasks: Sequence[str]) -> list[str]:
    """What evaluate() returns for `tasks` (each task's METRIC_KEYS, then its loss): what a monitor may name."""
    return [k for t in tasks for k in (*METRIC_KEYS[t], f"{t}/loss")]


def validation_losses_finite(record: Mapping[str, float]) -> bool:
    """Whether every validation loss of an epoch's record is finite; a NaN or inf one (bad data, overflow)
    makes the epoch's validation numbers untrustworthy, whatever the monitored metric says."""
    return all(math.isfinite(v) for k, v in record.items() if k.startswith("val/") and k.endswith("/loss"))


class NonFiniteLossError(RuntimeError):
    """A task loss became NaN or inf; training stopped before the bad step touched the weights."""

    CAUSES = "a learning rate too high, fp16 overflow (try amp='bf16' or 'off'), or NaN in the data (check the batch)"

    def __init__(self, epoch: int, step: int, task: str | None, value: float, checkpoint: Path | None = None,
                 causes: str = CAUSES):
        """task None: the loss went bad in another torchrun process (every process stops together).

        causes: the usual causes named in the message (the default is fit's; other loops name theirs).
        """
        self.epoch, self.step, self.task, self.value = epoch, step, task, value
        self.checkpoint, self.causes = checkpoint, causes
        where = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
        what = f"the {task!r} loss is {value}" if task is not None else "a loss is not finite in another process"
        super().__init__(f"{what} at epoch {epoch}, step {step}{where}. Usual causes: {causes}.")

    def __reduce__(self):
        # Rebuilt from the arguments, not the message, so it crosses process boundaries (a process pool's result)
        return type(self), (self.epoch, self.step, self.task, self.value, self.checkpoint, self.causes)


class NonFiniteWeightsError(RuntimeError):
    """Weights became NaN or inf in an epoch whose losses were all finite (an update blew up).

    Raised before that epoch's checkpoints are written, so last.pt and best.pt keep the previous epoch.
    """

    CAUSES = "a learning rate too high (lower lr, or set grad_clip), or fp16 overflow (try amp='bf16' or 'off')"

    def __init__(self, epoch: int, names: Sequence[str], checkpoint: Path | None = None, causes: str = CAUSES):
        """causes: the usual causes named in the message (the default is fit's; other loops name theirs)."""
        self.epoch, self.names, self.checkpoint, self.causes = epoch, list(names), checkpoint, causes
        where = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
        shown = ", ".join(self.names[:3]) + (f" and {len(self.names) - 3} more" if len(self.names) > 3 else "")
        super().__init__(
            f"the weights became non-finite (NaN or inf) in epoch {epoch} ({shown}) although every loss was "
            f"finite{where}; this epoch was not saved. Usual cause: {causes}."
        )

    def __reduce__(self):
        return type(self), (self.epoch, self.names, self.checkpoint, self.causes)


class CompileError(RuntimeError):
    """torch.compile's backend could not build the model (no C++ compiler on the CPU, no Triton on the GPU...)."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"torch.compile could not build the model ({what}); train with compile=False (on the command "
                         "line: without --compile), the same training without the compiler")

    def __reduce__(self):
        return type(self), (self.what,)


@dataclass
class TrainConfig:
    """The options of `fit`, given as a TrainConfig or as keyword arguments of the same names."""

    tasks: Sequence[str] | None = None  # tasks to train; None: the model's `tasks` attribute
    epochs: int = 10  # passes over the training set
    lr: float = 1e-4  # peak learning rate (ResFormer: 1e-4; 7e-5 on ISIC)
    weight_decay: float = 3e-5  # AdamW decoupled weight decay on every weight, norms and biases too (ResFormer)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW momentum coefficients (ResFormer)
    poly_power: float = 0.9  # lr = base_lr * (1 - iteration / total_iterations) ** poly_power
    weighting: str | LossWeighting = "fixed"  # "fixed", "uncertainty", "dwa", "gradnorm", "pcgrad" or an instance
    task_weights: Mapping[str, float] | None = None  # weights of "fixed" (None: seg 1, cls 0.25, recon 1)
    weighting_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"alpha": 1.5} for GradNorm
    losses: LossConfig | None = None  # which loss per task (None: Dice+CE, CE, L1)
    grad_clip: float | None = None  # clip the gradient norm to this value (None: no clipping)
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:1", "mps"
    amp: str | bool = "auto"  # "auto" (bf16/fp16 on CUDA, off elsewhere), "bf16", "fp16", "off"
    channels_last: bool | None = None  # NHWC memory layout (None: on CUDA only)
    compile: bool = False  # torch.compile the model for training (its first steps compile: a minute or more)
    monitor: str = "auto"  # validation metric that selects best.pt ("auto": seg/dice, else cls/auc, else recon/psnr)
    data_range: float = 1.0  # max - min of the clean images, for PSNR/SSIM
    out_dir: str | os.PathLike | None = None  # where last.pt and best.pt go (None: no checkpoints)
    resume: bool = False  # continue from out_dir/last.pt when it exists
    restore_best: bool = True  # load the best-validation weights into the model at the end
    # seed_everything first: Python's, NumPy's, torch's global generators, and PCGrad's task order when it is
    # given by name (None: leave them)
    seed: int | None = None
    progress: bool = True  # one tqdm bar for the run, naming the epoch


# ----------------------------------------------------------------------------- history


@dataclass
class History:
    """Everything `fit` measured, one record per epoch.

    Record keys: "epoch", "train/<task>" and "train/total" (mean losses), "val/<metric>",
    "weight/<task>", "lr" (at the epoch's first step), "epoch_time", "data_time" (s spent waiting for
    the loader) and "data_share" (data_time / epoch_time).
    """

    records: list[dict[str, float]] = field(default_factory=list)
    monitor: str = "val/seg/dice"  # key of the record that selects the best epoch
    mode: str = "max"  # "max" or "min"
    best_epoch: int | None = None  # 1-based epoch of the best validation value
    best_value: float | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:  # the dataclass's printed every record on one line (~600 characters an epoch)
        best = (f"best {self.monitor} {self.best_value:.4g} at epoch {self.best_epoch}" if self.best_epoch is not None
                else f"no best epoch on {self.monitor}")
        epochs = "1 epoch" if len(self) == 1 else f"{len(self)} epochs"
        return f"History({epochs}, {best}, mode={self.mode!r}; .to_frame() for the table, .plot() to see it)"

    def append(self, record: dict[str, float]) -> bool:
        """Add an epoch; return True when it is the new best on the monitored key."""
        record = {k: int(v) if k == "epoch" else float(v) for k, v in record.items()}  # plain numbers only
        self.records.append(record)
        value = record.get(self.monitor)
        if value is None or math.isnan(value) or not validation_losses_finite(record):
            return False
        better = (self.best_value is None or math.isnan(self.best_value)
                  or (value > self.best_value if self.mode == "max" else value < self.best_value))
        if better:
            self.best_epoch, self.best_value = int(record["epoch"]), float(value)
        return better

    def to_frame(self):
        """pandas DataFrame, one row per epoch (index "epoch")."""
        import pandas as pd

        return pd.DataFrame(self.records).set_index("epoch") if self.records else pd.DataFrame()

    def plot(self, metrics: Sequence[str] | None = None):
        """Figure with four panels: training losses, validation metrics, task weights, learning rate.

        metrics: validation columns to draw (e.g. ["val/recon/psnr"]); default: those on a 0-1 scale.
        A task has one colour and one marker in every panel (mtlearn.plots.task_colours and task_markers:
        seg blue circles, cls orange squares, recon green triangles, total black diamonds: the markers tell
        tasks apart where colours merge for a colour-blind reader); the metrics of one task differ by line
        style (every one after the first with open markers), so cls/acc and cls/balanced_acc stay apart
        where they coincide.
        Legends sit below their panels, off the curves.
        """
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        from mtlearn.plots import task_colours, task_markers

        frame = self.to_frame()
        fig = Figure(figsize=(16, 4.4), layout="constrained")
        axes = fig.subplots(1, 4)
        panels = [
            ("Training loss", "loss", [c for c in frame if c.startswith("train/")]),
            ("Validation metrics", "value", ([metrics] if isinstance(metrics, str) else list(metrics))
             if metrics is not None
             else [f"val/{m}" for m in HEADLINE_METRICS if f"val/{m}" in frame]),
            ("Task weights", "weight", [c for c in frame if c.startswith("weight/")]),
            ("Learning rate", "learning rate", ["lr"] if "lr" in frame else []),
        ]
        # "train/seg" -> "seg", "val/seg/dice" -> "seg/dice"; its task is the part before the next "/"
        names = {column: column.split("/", 1)[-1] for _, _, columns in panels for column in columns}
        colours = task_colours([name.split("/")[0] for name in names.values()])
        markers = task_markers([name.split("/")[0] for name in names.values()])
        linestyles = ["-", "--", ":", "-."]  # 1st, 2nd, ... metric of a task
        for ax, (title, ylabel, columns) in zip(axes, panels):
            drawn: dict[str, int] = {}  # task -> lines drawn in this panel
            for column in columns:
                name = names[column]
                task = name.split("/")[0]
                k = drawn[task] = drawn.get(task, -1) + 1
                ax.plot(frame.index, frame[column], color=colours[task], linestyle=linestyles[k % len(linestyles)],
                        marker=markers[task], markersize=4,
                        markerfacecolor=colours[task] if k == 0 else "white", label=name)
            if title == "Validation metrics" and self.best_epoch is not None:
                ax.axvline(self.best_epoch, color="grey", linestyle=":", label=f"best epoch ({self.monitor})")
            if not columns:  # an empty panel must not read as a plotting failure
                empty = ("no validation\n(fit without val_loader)" if title == "Validation metrics" and metrics is None
                         else "not recorded")
                ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="dimgrey")
            ax.set(title=title, xlabel="epoch", ylabel=ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if columns and columns != ["lr"]:  # the learning rate is named by its axis label
                ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
        return fig

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping) -> History:
        return cls(**state)


# ----------------------------------------------------------------------------- devices, precision


def resolve_amp(amp: str | bool | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device`, or None for full float32."""
    if amp in (False, None, "off"):
        return None
    if amp is True:
        amp = "auto" if device.type == "cuda" else "bf16"
    if amp not in AMP_CHOICES:
        raise ValueError(f"unknown amp {amp!r}; expected one of {AMP_CHOICES} (or True/False)")
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA GPU (device is {device}); use amp='bf16' or 'off'")
    if amp == "bf16" and device.type == "cuda" and not _native_bf16(device):
        raise ValueError("this GPU has no native bfloat16 (it would be emulated, slowly); use amp='fp16' "
                         "(with loss scaling) or 'auto'")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _check_val_targets(val_loader, tasks: Sequence[str]) -> None:
    """Refuse, before any training, validation items without a task's target: else an epoch trains first.

    Reads one item of the loader's dataset (not a batch: a batch would start the loader's workers), so only
    map-style datasets of dict items are checked; the training batches are checked by the first step.
    """
    dataset = getattr(val_loader, "dataset", None)
    # a dataset may draw from the global generators: the run must draw as without the check (the CPU's
    # generators: reading an item draws from no GPU's, and asking one for its state would start CUDA)
    state = rng_state(device="cpu")
    try:
        item = dataset[0] if dataset is not None and len(dataset) else None
    except Exception:  # an IterableDataset or a dataset that cannot be read by index: the first evaluation will say
        return
    finally:
        set_rng_state(state)
    if isinstance(item, Mapping):
        missing = {task: TASK_TARGETS[task] for task in tasks if TASK_TARGETS[task] not in item}
        if missing:
            raise ValueError(f"the validation items have no {sorted(set(missing.values()))} for task(s) "
                             f"{list(missing)} (their keys: {sorted(item)}); validate on a dataset with those targets, "
                             "or train only the tasks it has (tasks=...)")


def _native_bf16(device: torch.device) -> bool:
    """Whether the GPU `device` (not the current one) computes in bfloat16 natively: Ampere (8.x) or later.

    A T4 or V100 (7.x) "supports" bf16 only by emulation, slowly: fp16 with loss scaling there.
    """
    return torch.cuda.get_device_capability(device)[0] >= 8


def _to_device(batch: Mapping[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """Tensors to `device` (asynchronously from pinned memory); the image in channels_last if asked."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"every batch must be a dict with 'image' and the task targets ('mask' for seg, 'label' "
                        f"for cls, 'clean' for recon); got a {type(batch).__name__}. Make the dataset's "
                        "__getitem__ return such a dict (a TensorDataset yields tuples)")
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if "image" not in moved:
        raise ValueError(f"every batch needs an 'image' entry (the model input); got keys {sorted(batch)}")
    if isinstance(moved["image"], Tensor) and moved["image"].dim() == 3:  # e.g. fit(model, [item, item, ...])
        raise TypeError(f"batch['image'] has shape {tuple(moved['image'].shape)}: the loader yields single items, "
                        "not batches; wrap the data in a DataLoader, e.g. torch.utils.data.DataLoader(data, "
                        "batch_size=8) (and shuffle=True for training)")
    if channels_last and moved["image"].dim() == 4:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
    return moved


# ----------------------------------------------------------------------------- distributed plumbing


def _check_plain_model(model: nn.Module) -> None:
    """fit wraps the model itself (DistributedDataParallel under torchrun, torch.compile with compile=True) and
    saves the plain model's state_dict; a model wrapped before fit saved its wrapper's names ("_orig_mod.",
    "module." before every one), which the plain model of a resume, or of load_checkpoint, did not know."""
    if isinstance(model, PARALLEL_WRAPPERS):
        raise ValueError(f"fit got a {type(model).__name__}-wrapped model; pass the model itself "
                         f"({type(model).__name__}(model).module): under torchrun fit wraps it in "
                         "DistributedDataParallel, and it saves the model's own parameter names")
    if is_compiled(model):
        raise ValueError("fit got a torch.compile'd model; pass the model itself and compile=True: fit compiles it "
                         "for training, and saves the model's own parameter names, which the plain model loads")


def _wrap_for_training(model: nn.Module, device: torch.device, compile_model: bool,
                       untrained_heads: bool = False) -> nn.Module:
    """DistributedDataParallel under torchrun, then torch.compile if asked; the plain model otherwise.

    untrained_heads: the model has heads for tasks this run does not train. Their parameters get
    no gradient, and DDP, which waits for a gradient of every parameter, must be told to look for
    such parameters at every step (find_unused_parameters, which costs a pass over the graph).
    """
    if is_distributed():
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                    find_unused_parameters=untrained_heads)
    if compile_model:
        model = torch.compile(model)
    return model


def _mean_across_processes(values: Sequence[float], device: torch.device) -> list[float]:
    """Average a list of numbers over processes (each process passes its own)."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device if device.type == "cuda" else None)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def _any_across_processes(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is True on any of them (no-op without torchrun)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([float(flag)], device=device if device.type == "cuda" else None)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _average_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Average .grad over processes for parameters DDP does not see (e.g. learned task weights)."""
    if not is_distributed():
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


# ----------------------------------------------------------------------------- training


def _make_config(config: TrainConfig | None, overrides: Mapping[str, Any]) -> TrainConfig:
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got a {type(config).__name__}; pass options as keyword "
                        "arguments (fit(model, loader, epochs=5)) or build one (TrainConfig(epochs=5))")
    # a copy, so that overrides do not change the caller's config; but a weighting instance is the
    # caller's own, as with fit(weighting=w): its learned weights (and PCGrad's last_cosine) stay readable
    if config is None:
        config = TrainConfig()
    else:
        config = copy.deepcopy(config, memo={id(config.weighting): config.weighting})
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        if key not in valid:
            raise ValueError(f"unknown fit() option {key!r}; valid options are {sorted(valid)}")
        setattr(config, key, value)
    for f in dataclasses.fields(config):
        setattr(config, f.name, python_numbers(getattr(config, f.name)))
    check_int("epochs", config.epochs, 1)
    check_adamw(config.lr, config.weight_decay, config.betas)
    if config.grad_clip is not None:
        check_number("grad_clip", config.grad_clip, 0, above=True, advice="the largest gradient norm, e.g. 1.0; "
                     "or None: no clipping")
    check_number("poly_power", config.poly_power, 0, advice="0.9 as published; 0: constant lr")  # < 0 divides by 0
    # checked here, not by the validation metrics after a whole epoch (or, without a val_loader, not at all)
    check_number("data_range", config.data_range, 0, above=True, advice="max - min of the clean images: 1.0 for "
                 "images scaled to 0..1, 255 for raw 8-bit ones")
    if not isinstance(config.monitor, str):  # None read as "no monitor" failed in removeprefix
        raise ValueError(f"monitor must be a validation metric's name, e.g. 'seg/dice' or 'cls/auc', or 'auto' (the "
                         f"first task's headline metric), got {config.monitor!r}")
    if not isinstance(config.weighting_kwargs, Mapping):
        raise ValueError(f"weighting_kwargs must map option names to values, e.g. {{'alpha': 1.5}} for GradNorm, got "
                         f"{config.weighting_kwargs!r}")
    if config.task_weights is not None and not isinstance(config.task_weights, Mapping):
        raise ValueError(f"task_weights must map task names to weights, e.g. {{'seg': 1, 'cls': 0.25}}, got "
                         f"{config.task_weights!r}")
    for name in ("compile", "restore_best", "progress"):
        check_bool(name, getattr(config, name))
    if config.channels_last is not None:
        check_bool("channels_last (or None: on CUDA only)", config.channels_last)
    check_run_folder(config.out_dir, config.resume)
    for name, kind, why in (("gradnorm", GradNorm, "GradNorm differentiates gradient norms (a double backward)"),
                            ("pcgrad", PCGrad, "PCGrad back-propagates each task's loss on its own through the "
                             "shared encoder (retain_graph)")):
        # each failed only at the first step, after minutes of compiling
        if config.compile and (config.weighting == name or isinstance(config.weighting, kind)):
            raise ValueError(f"weighting={name!r} cannot train with compile=True: {why}, which a compiled "
                             "backward does not support. Use compile=False or another weighting")
    return config


def _length(loader) -> int | None:
    """len(loader), or None for one that has no length (an IterableDataset without __len__)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _make_weighting(config: TrainConfig, tasks: tuple[str, ...]) -> LossWeighting:
    if isinstance(config.weighting, LossWeighting):
        # an instance is already built: these options would have nowhere to go, and be silently ignored
        given, fixes = [], []
        if config.task_weights:
            given.append("task_weights")
            fixes.append(f"FixedWeights(tasks, weights={dict(config.task_weights)!r})")
        if config.weighting_kwargs:
            given.append("weighting_kwargs")
            options = ", ".join(f"{k}={v!r}" for k, v in config.weighting_kwargs.items())
            fixes.append(f"{type(config.weighting).__name__}(tasks, {options})")
        if given:
            raise ValueError(f"{' and '.join(given)} only apply to a weighting given by name (e.g. weighting="
                             f"'fixed'), not to the {type(config.weighting).__name__} instance passed as weighting, "
                             f"which is already built; pass them to the constructor instead: {' or '.join(fixes)}")
        if tuple(config.weighting.tasks) != tasks:  # in order: its state (and a checkpoint's) is kept by position
            raise ValueError(f"the weighting was built for tasks {config.weighting.tasks}, training uses {tasks}; "
                             f"build it with tasks={tasks}")
        return config.weighting
    kwargs = dict(config.weighting_kwargs)
    if config.task_weights is not None:
        if config.weighting != "fixed":
            raise ValueError(f"task_weights only applies to weighting='fixed', not {config.weighting!r}")
        kwargs["weights"] = config.task_weights
    return build_weighting(config.weighting, tasks, **{**_run_seed(config), **kwargs})


def _run_seed(config: TrainConfig) -> dict:
    """{"seed": config.seed} for a weighting given by name that draws at random (PCGrad's task order), else {}:
    it follows the run's seed unless weighting_kwargs give it its own (with its default, every run of a loop
    over seeds would project in the same order)."""
    cls = WEIGHTINGS.get(config.weighting) if isinstance(config.weighting, str) else None
    if cls is None or config.seed is None or "seed" not in inspect.signature(cls).parameters:
        return {}
    return {"seed": config.seed}


def _monitor(config: TrainConfig, tasks: tuple[str, ...]) -> tuple[str, str]:
    key = resolve_monitor(config.monitor, tasks)
    return f"val/{key}", "min" if key.endswith("loss") else "max"


def _shared_parameters(model: nn.Module, train_model: nn.Module, losses: Mapping[str, Tensor]) -> list:
    """The model's own `shared_parameters()` when it has one, otherwise found by gradient reach."""
    if callable(getattr(model, "shared_parameters", None)):
        return [p for p in model.shared_parameters() if p.requires_grad]
    return find_shared_parameters(train_model.parameters(), losses)


def fit(model: nn.Module, train_loader, val_loader=None, config: TrainConfig | None = None, **overrides) -> History:
    """Train `model` in place on `train_loader`, validating on `val_loader` after every epoch.

    Options are the fields of TrainConfig, given as a config and/or keyword arguments
    (fit(model, train, val, epochs=5, weighting="pcgrad")). Returns the History.
    best.pt is selected on the validation metric only; without val_loader there is no best.pt.
    resume=True continues from out_dir/last.pt (a fresh start when there is none yet: so that it
    repeats the uninterrupted run, a run with an out_dir interrupted before its first last.pt gives the
    model, a weighting instance passed in and the loader's generators their starting state back;
    without out_dir an interrupted model keeps the weights it had reached); with another `epochs`
    than before, the learning-rate schedule is recomputed for the new length (the rate jumps, and a
    warning says from what to what: not the run that `epochs` would have trained from the start). The
    other training options, and the number of batches per epoch, must be those of that run.
    Without resume=True, an out_dir that already holds a run (last.pt, or a best.pt kept without it) is
    refused, never overwritten.
    """
    config = _make_config(config, overrides)
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():  # else torch's "element 0 of tensors
        # does not require grad" from deep in the weighting's backward, after the data had loaded
        inside = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
        raise RuntimeError(f"fit was called inside {inside}, where nothing can learn; call it outside that block "
                           "(a notebook cell decorated or wrapped for evaluation, perhaps)")
    _check_plain_model(model)
    tasks = check_tasks(config.tasks if config.tasks is not None else _model_tasks(model))
    check_loader("train_loader", train_loader, "torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)")
    check_loader("val_loader", val_loader, "torch.utils.data.DataLoader(dataset, batch_size=8)")
    steps_per_epoch = _length(train_loader)
    if steps_per_epoch is None:  # the learning-rate schedule and the progress bar need the number of steps
        dataset = getattr(train_loader, "dataset", train_loader)
        raise ValueError(f"train_loader has no length (a {type(dataset).__name__} without __len__?); fit needs "
                         "the number of batches per epoch for its learning-rate schedule: give the dataset a "
                         "__len__, or use a map-style Dataset")
    if steps_per_epoch == 0:
        shared = (f" ({world_and_rank()[0]} torchrun processes share the training set, each taking an equal part of "
                  "it: fewer processes, or a larger training set)") if is_distributed() else ""
        raise ValueError(f"train_loader yields no batches; check the dataset size and batch_size/drop_last{shared}")
    # an empty validation loader: else one epoch trains, then "monitor ... choose one of []". Not under
    # torchrun, where one process's evaluation shard may be empty (evaluate sums over all of them), and
    # not for a loader without a length (an IterableDataset)
    if val_loader is not None and not is_distributed() and _length(val_loader) == 0:
        raise ValueError("val_loader yields no batches; check the dataset size and batch_size/drop_last (or pass "
                         "val_loader=None: no validation, no best.pt)")
    _check_val_targets(val_loader, tasks)
    if val_loader is not None:
        warn_if_not_each_once(val_loader, "val_loader")
    monitor, mode = _monitor(config, tasks)
    expected = sorted(validation_metrics(tasks))
    # before any work, not after an epoch; without a val_loader too: a resume that adds one would be
    # refused for a best.pt "chosen by" the typo
    if monitor.removeprefix("val/") not in expected:
        raise ValueError(f"monitor {config.monitor!r} is not a validation metric; choose one of {expected}")
    out_dir = Path(config.out_dir).expanduser() if config.out_dir is not None else None  # "~/runs" as start() takes it
    with out_dir_lock(out_dir):  # a second run into it, while this one lives, is refused
        if out_dir is not None:
            check_out_dir(out_dir, config.resume)
            if getattr(train_loader, "persistent_workers", False):
                warnings.warn("train_loader keeps its workers between epochs (persistent_workers=True): their random "
                              "generators (augmentation) are in no checkpoint, so a resumed run will not repeat an "
                              "uninterrupted one; for resumable runs use persistent_workers=False", stacklevel=2)
        resuming = config.resume and out_dir is not None and (out_dir / "last.pt").is_file()
        if isinstance(config.weighting, LossWeighting) and not resuming and has_trained(config.weighting):
            # one instance passed to several runs (a loop over seeds): the next would start from the last one's
            # learned weights, loss history or optimiser state, and differ from the same run started alone
            name = type(config.weighting).__name__
            raise ValueError(f"the {name} passed as weighting has trained already (its state is not a new {name}'s), "
                             "so this run would start where another ended; pass a new one for every run (build it "
                             "inside the loop), or the weighting's name, e.g. weighting='dwa'")
        if config.seed is not None:
            seed_everything(config.seed)
        run = _prepare(model, config, tasks, total_steps=config.epochs * steps_per_epoch)
        if config.seed is not None and is_distributed():
            # dropout and drop-path draw from the generator of the device: one stream per rank, or every rank
            # would drop the same units (rank 0's checkpoint holds every rank's states, so a resume keeps this).
            # Only torch's generators: the data order is the sampler's, which must stay the same on every rank.
            torch.manual_seed(config.seed + dist.get_rank())  # the CPU's generator and every GPU's
        history, start_epoch, best_state = History(monitor=monitor, mode=mode), 0, None
        if config.resume and (out_dir / "last.pt").is_file():
            last = _load_run(run, out_dir / "last.pt", train_loader, config, tasks)
            history, start_epoch = History.from_state_dict(last["history"]), int(last["epoch"])
            if (history.monitor, history.mode) != (monitor, mode):  # best.pt so far was chosen by the old one
                raise ValueError(f"cannot resume from {out_dir / 'last.pt'} with monitor {monitor!r}: its best.pt was "
                                 f"chosen by {history.monitor!r} ({history.mode}). Resume with monitor="
                                 f"{history.monitor.removeprefix('val/')!r}, or start a new run in another out_dir")
            best_epoch = None
            if (out_dir / "best.pt").is_file():
                try:
                    best = load_checkpoint(out_dir / "best.pt")
                except ValueError as error:  # last.pt is fine: only the best weights are lost, which can be set aside
                    raise ValueError(f"{error}. To resume from last.pt anyway, move best.pt aside (e.g. to "
                                     "best.pt.bad): the run continues, and best.pt is written again at the next "
                                     "improvement") from None
                best_state, best_epoch = best["model"], best.get("epoch")
            if history.best_epoch is not None and history.best_epoch == start_epoch != best_epoch:
                # the run stopped between writing last.pt and best.pt (in that order): last.pt is the best epoch
                best_state = last["model"]
                if is_main_process():
                    save_checkpoint(last, out_dir / "best.pt")
            elif history.best_epoch is not None and best_state is None and is_main_process():  # once, not per process
                warnings.warn(f"{out_dir / 'best.pt'} is missing, so the weights of the best epoch so far "
                              f"({history.best_epoch}) are lost: unless a later epoch does better, the model ends with "
                              "its last epoch's weights, not those of history.best_epoch", stacklevel=2)
            if start_epoch >= config.epochs and is_main_process():  # nothing to train: say so (once, under torchrun)
                warnings.warn(f"the run in {out_dir} already has {start_epoch} epochs; pass a larger epochs "
                              f"(got {config.epochs}) to train further", stacklevel=2)
        # heads for tasks this run does not train, e.g. fit(tasks=("seg",)) of a seg+cls model
        untrained_heads = bool(set(getattr(model, "tasks", tasks)) - set(tasks))
        run.train_model = _wrap_for_training(model, run.device, config.compile, untrained_heads)

        # A fresh run with a folder to resume from: until its first last.pt, an interruption (Ctrl-C, an
        # error) gives the model its starting weights, and the loader its generators, back. resume=True then
        # starts afresh, as it does without a last.pt, and repeats the uninterrupted run instead of going on
        # from what the interrupted call had already moved (the same objects, in a notebook).
        # (Not under torchrun, whose processes all end with an error: nothing would be there to restore into.)
        loader_facts = _loader_facts(train_loader)  # what every checkpoint records of the loader, the same each epoch
        start_state = start_rng = None
        if out_dir is not None and start_epoch == 0 and not is_distributed():
            start_state = {"model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                           "weighting": copy.deepcopy(run.weighting.state_dict())}  # an instance passed in, too
            start_rng = rng_state(train_loader, run.device)
        # one bar for the whole run (a bar per epoch filled a notebook cell that trains several models with
        # screens of finished bars): its description names the epoch; its figures are the training losses while
        # an epoch runs, and the validation metrics once it has ended
        bar = tqdm(total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, leave=True,
                   desc=f"epoch {min(start_epoch + 1, config.epochs)}/{config.epochs}",
                   disable=not (config.progress and is_main_process()) or start_epoch >= config.epochs)
        if config.compile:  # else the bar stands at 0 for minutes, then reports minutes per step
            bar.set_postfix_str("compiling the model: the first steps take a minute or more")
        with warnings_above(bar):  # a warning on its own lines, not on the end of the bar's
            try:
                for epoch in range(start_epoch, config.epochs):
                    sampler = getattr(train_loader, "sampler", None)
                    if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle every epoch
                        sampler.set_epoch(epoch)
                    bar.set_description(f"epoch {epoch + 1}/{config.epochs}", refresh=False)
                    record = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"]}
                    record.update(_train_one_epoch(run, train_loader, epoch, tasks, bar, out_dir,
                                                   first=epoch == start_epoch))
                    # fixed, DWA: the weights used this epoch; learned ones (uncertainty, GradNorm): after its last step
                    record.update({f"weight/{t}": w for t, w in run.weighting.weights().items()})
                    run.weighting.end_epoch({t: record[f"train/{t}"] for t in tasks})
                    _broadcast_buffers(model)  # e.g. BatchNorm statistics: every rank keeps rank 0's, as DDP does
                    # finite losses do not guarantee finite weights (the last step's update can overflow);
                    # stop before this epoch's checkpoints would overwrite the good ones of the previous epoch
                    bad = _non_finite_tensors(model, run.weighting)
                    if _any_across_processes(bool(bad), run.device):
                        last = out_dir / "last.pt" if out_dir is not None and (out_dir / "last.pt").is_file() else None
                        raise NonFiniteWeightsError(epoch + 1, bad, last)
                    if val_loader is not None:
                        metrics = _evaluate(model, val_loader, tasks, device=run.device, amp=config.amp,
                                            channels_last=run.channels_last, losses=config.losses,
                                            data_range=config.data_range)
                        record.update({f"val/{k}": v for k, v in metrics.items()})
                        if monitor not in record:  # a typo would otherwise mean: no best.pt, silently
                            known = sorted(k.removeprefix("val/") for k in record if k.startswith("val/"))
                            raise ValueError(f"monitor {config.monitor!r} is not a validation metric; choose one of "
                                             f"{known}")
                        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if not k.endswith("loss")})
                    improved = history.append(record)  # best epoch: judged on the validation split only
                    broken = sorted(k for k, v in record.items() if k.startswith("val/") and k.endswith("/loss")
                                    and not math.isfinite(v))
                    if broken and is_main_process():  # finite training losses and weights, yet NaN on unseen images
                        warnings.warn(f"epoch {epoch + 1}: the validation loss is not finite ({', '.join(broken)}), "
                                      "so this epoch cannot be the best one; the training losses were finite, which "
                                      "points to a model that diverged on new images (overflowing activations or "
                                      f"BatchNorm statistics): lower lr (now {config.lr:g}) or check the validation "
                                      "data",
                                      stacklevel=2)
                    if improved:
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                    if out_dir is not None:
                        rng = rng_state(train_loader, run.device)  # on every rank: it gathers each GPU's random state
                        if is_main_process():
                            state = _run_state(run, epoch + 1, history, config, tasks, rng, loader_facts)
                            # last.pt first: stopped between the two, best.pt is an improvement behind, and a resume
                            # takes the best weights from last.pt (whose history says so); the other way round, best.pt
                            # would hold an epoch that the resumed history does not have
                            save_checkpoint(state, out_dir / "last.pt")
                            if improved:
                                save_checkpoint(state, out_dir / "best.pt")
                    start_state = None  # last.pt holds the run from here on
            except BaseException as error:
                if start_state is not None:
                    try:
                        model.load_state_dict(start_state["model"])
                        run.weighting.load_state_dict(start_state["weighting"])
                        set_rng_state(start_rng, train_loader, run.device)
                    except Exception as failed:  # noqa: BLE001 (the original error is the one to see)
                        warnings.warn(f"could not give the model its starting state back ({failed}); rebuild it before "
                                      "fitting again", stacklevel=2)
                if config.compile and (failure := _compile_failure(error)):  # torch's says only how to debug it
                    raise CompileError(failure) from error
                raise
            finally:
                bar.close()

        if config.restore_best and best_state is not None:
            model.load_state_dict(best_state)
        monitor = history.monitor  # (a non-finite validation loss has been named epoch by epoch above)
        validated = [r[monitor] for r in history.records if monitor in r]  # a resume may add validation to a run
        if val_loader is not None and validated and is_main_process() and not any(map(math.isfinite, validated)):
            # e.g. the AUC of a validation set holding one class: NaN every epoch, and no best.pt, without a word
            other = next((f"{t}/loss" for t in tasks if f"val/{t}/loss" != monitor), None)
            warnings.warn(f"no epoch could be the best one: {monitor} was not finite in any epoch (last: "
                          f"{validated[-1]}), so there is no best.pt and the model keeps its last epoch's weights; "
                          + (f"monitor another metric, e.g. monitor='{other}', or (an AUC or a specificity) validate "
                             "on a set with every class" if other else f"lower lr (now {config.lr:g})"), stacklevel=2)
        if is_distributed():
            dist.barrier()  # rank 0 has finished writing before anyone moves on
        return history


def _compile_failure(error: BaseException) -> str | None:
    """What went wrong, when `error` is torch.compile's backend failing to build the model; None for
    any other error."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed  # private, so looked up, not relied on
    except ImportError:
        return None
    if not isinstance(error, BackendCompilerFailed):
        return None
    inner = getattr(error, "inner_exception", error)  # e.g. InvalidCxxCompiler
    return f"{type(inner).__name__}: {inner}"


@dataclass
class _Run:
    """Everything one training run updates, bundled so that the loops below read cleanly."""

    model: nn.Module  # the plain model (state dicts, shared parameters)
    loss_fns: nn.ModuleDict  # task -> loss module
    weighting: LossWeighting
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # fp16 only
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for float32
    channels_last: bool
    grad_clip: float | None
    train_model: nn.Module | None = None  # what runs forward: the model, DDP- and/or compile-wrapped
    shared: list | None = None  # shared parameters, found at the first step when the weighting needs them
    data_range: float = 1.0  # the config's: the intensity range the images are expected in


def _prepare(model: nn.Module, config: TrainConfig, tasks: tuple[str, ...], total_steps: int) -> _Run:
    """Device, precision, losses, weighting, AdamW and the polynomial schedule."""
    device = pick_device(config.device)
    amp_dtype = resolve_amp(config.amp, device)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    weighting = _make_weighting(config, tasks).to(device)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if weighting.in_optimizer:  # e.g. the log-variances of uncertainty weighting; no weight decay on them
        groups.append({"params": list(weighting.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    power = config.poly_power

    def poly(step: int) -> float:  # lr = base_lr * (1 - step / total_steps) ** power, every iteration
        return (1 - min(step, total_steps) / total_steps) ** power

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)  # closed form: a resumed run may be longer
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return _Run(model, build_losses(tasks, config.losses).to(device), weighting, optimizer, scheduler, scaler,
                device, amp_dtype, channels_last, config.grad_clip, data_range=config.data_range)


def _warn_if_unscaled(image, data_range: float = 1.0, caller: str = "fit", name: str = "images") -> bool:
    """Warn (and return True) when a float image batch looks like raw, unscaled intensities (see
    encoder.unscaled_range): the networks run on them, but a reconstruction loss is 65,025 times larger,
    PSNR/SSIM read the wrong range and a model trained on 0..1 answers with confident nonsense, without a word.
    Called on the first batch of fit (and of evaluate), on the main process only (torchrun: one warning, not
    one per GPU); name: what the tensor is, "images" or the reconstruction target's "clean images".
    """
    found = unscaled_range(image, data_range)  # uint8 is refused by the models themselves, NaN stops training
    if found is None:
        return False
    low, high = found
    which = "training" if caller == "fit" else "evaluated"
    warnings.warn(f"the first {which} batch's {name} range from {low:g} to {high:g}, which looks like raw, "
                  f"unscaled intensities (e.g. 0..255): scale them to 0..1 in the dataset (8-bit: image / 255), "
                  f"as the course's datasets do, or, if this range is meant, pass {caller} the scale's full range "
                  f"as data_range (e.g. data_range=255; now {data_range:g})",
                  stacklevel=user_stacklevel())
    return True


def _warn_if_probabilities(outputs: Mapping[str, Tensor]) -> bool:
    """Warn (and return True) when a model's "seg" or "cls" scores look like probabilities.

    The losses take logits and apply log-softmax themselves; a model that ends in a softmax trains on
    log(softmax(probabilities)), whose gradients are small and flat, so it learns slowly or stalls,
    without an error. Scores that all lie in [0, 1] and sum to 1 over the classes for every pixel or
    image are almost surely probabilities (logits do so by chance practically never). Called on the
    first batch of fit, on the main process only.
    """
    found = []
    for task in ("seg", "cls"):
        scores = outputs.get(task)
        if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.dim() < 2 or scores.shape[1] < 2:
            continue
        # bfloat16 probabilities (a softmax under the CPU's autocast) are each off by up to ~0.4 %
        tolerance = max(1e-3, scores.shape[1] * torch.finfo(scores.dtype).eps)
        scores = scores.detach().float()
        low, high = (float(v) for v in torch.aminmax(scores))
        if low >= 0 and high <= 1 and bool(((scores.sum(dim=1) - 1).abs() < tolerance).all()):
            found.append(task)
    if found:
        warnings.warn(f"the model's {' and '.join(map(repr, found))} outputs lie in [0, 1] and sum to 1 over the "
                      "classes: probabilities, from a softmax at the end of the model? The losses take logits (raw "
                      "scores) and apply log-softmax themselves, so a model trained on probabilities learns slowly "
                      "or not at all: return the last layer's output without the softmax (apply it when predicting)",
                      stacklevel=5)  # the caller of fit (through _forward and _train_one_epoch)
    return bool(found)


def _run_state(run: _Run, epoch: int, history: History, config: TrainConfig, tasks, rng: dict,
               loader_facts: dict) -> dict:
    """A checkpoint: tensors, numbers, strings, lists and dicts only, so that weights_only=True loads it.

    loader_facts: the training loader's length, batch size and items (_loader_facts), which a resumed run must
    match (see RESUME_NOTES).
    """
    return {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, **loader_facts,
        "model": run.model.state_dict(), "trainable": trainable_names(run.model),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "weighting": run.weighting.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else {},
        "rng": rng, "history": history.state_dict(), "config": _plain_config(config, tasks),
        **_model_settings(run.model),
    }


def _model_settings(model: nn.Module) -> dict:
    """What rebuilds a MultiTaskUNet (mtlearn.load_model): its config; {} for a model of another kind."""
    from mtlearn.mtl import MultiTaskUNet

    model = unwrapped_model(model)
    return {"model_config": dataclasses.asdict(model.config)} if isinstance(model, MultiTaskUNet) else {}


# what a resumed run must share with the run that wrote the checkpoint (epochs may grow; device,
# precision and speed options may change, e.g. when a run moves from a GPU to a CPU). steps_per_epoch is
# no option but the training loader's length: the restored scheduler has counted steps of the old loader,
# while the schedule's total is recomputed as epochs * len(new loader), so with another length the
# learning rate would jump, or reach 0 long before the last epoch, without a word.
# batch_size and train_items: the same number of batches from other batches (3 of 4 images from 9, then 3 of 3)
# would resume without a word into a run that no uninterrupted one matches; so would processes, the number of
# torchrun processes among which each epoch's images are dealt (2 processes of batch 4 then 3: batches of 12).
LOADER_FACTS = ("steps_per_epoch", "batch_size", "train_items", "processes")
RESUME_FIELDS = ("tasks", "lr", "weight_decay", "betas", "poly_power", "weighting", "task_weights",
                 "weighting_kwargs", "losses", "grad_clip", *LOADER_FACTS)
_KEEP_LOADER = ("keep the batch size, the training set and the number of torchrun processes of that run (CLI: "
                "--batch-size, --limit, --nproc_per_node)")
RESUME_NOTES = {"steps_per_epoch": "steps_per_epoch is the training loader's number of batches, which the "
                                   f"learning-rate schedule counts: {_KEEP_LOADER}",
                "batch_size": f"batch_size is the training loader's: {_KEEP_LOADER}",
                "train_items": f"train_items is the size of the training loader's dataset: {_KEEP_LOADER}",
                "processes": f"processes is the number of torchrun processes that trained it (1: none): {_KEEP_LOADER}"}


def _loader_facts(loader) -> dict:
    """The training loader's number of batches, batch size and dataset size (None where it has none: a list of
    batches), and the number of processes it is dealt to (torchrun; 1 without), as a checkpoint records them;
    with the dataset's class names (None without), which a model loaded for use reports its classes by."""
    dataset = getattr(loader, "dataset", None)
    items = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    names = find_class_names(dataset)
    return {"steps_per_epoch": len(loader), "batch_size": getattr(loader, "batch_size", None), "train_items": items,
            "processes": world_and_rank()[0], "class_names": list(names) if names is not None else None}


def _best_instead(last: Path) -> str:
    """The way on when `last` (last.pt) cannot be read but its best.pt can: a whole checkpoint, of an earlier
    epoch (deleting last.pt, as the message advises, left a run folder that --resume refuses: only best.pt)."""
    best = last.with_name("best.pt")
    try:
        epoch = int(load_checkpoint(best, map_location="cpu")["epoch"])
    except Exception:  # noqa: BLE001 (no best.pt, or none readable: nothing to offer)
        return ""
    return (f". Or go on from the best epoch so far: {best} is readable and a whole checkpoint (epoch {epoch}); "
            f"copy it over last.pt (cp {best} {last}) and resume")


# what _load_run reads from a checkpoint ("scaler" may be {}, "trainable" and "config" may be absent)
FIT_KEYS = ("epoch", "model", "optimizer", "scheduler", "weighting", "rng", "history")


def _load_run(run: _Run, path: Path, train_loader, config: TrainConfig, tasks) -> dict:
    """Restore a run from a checkpoint; returns the checkpoint (its history, epochs done, weights)."""
    # map_location "cpu": the random states must stay CPU tensors (torch.set_rng_state refuses others);
    # load_state_dict below copies weights and optimiser moments onto the parameters' device
    try:
        state = load_checkpoint(path, map_location="cpu")
    except UnreadableCheckpointError as error:
        raise UnreadableCheckpointError(f"{error}{_best_instead(path)}") from None
    check_checkpoint_keys(path, state, FIT_KEYS, "fit")
    check_trainable(path, state.get("trainable"), run.model, state["model"])  # before the model is changed
    saved = dict(state.get("config", {}))
    # not in a checkpoint written before they were saved: not compared then
    saved.update({name: state[name] for name in LOADER_FACTS if name in state})
    current = {**_plain_config(config, tasks), **_loader_facts(train_loader)}
    check_resume_options(path, _as_compared(saved), _as_compared(current), RESUME_FIELDS, RESUME_NOTES)
    then, now = state.get("class_names"), current["class_names"]
    if then is not None and now is not None and list(then) != list(now):  # a checkpoint before them: not compared
        raise ValueError(f"cannot resume from {path}: it trained on the classes {list(then)}, the training data now "
                         f"has {list(now)} (the classifier's outputs follow that order); resume with the data of that "
                         "run, or start a new run in another out_dir")
    load_weights(run.model, state["model"], f"cannot resume from {path}: its weights do not fit this model (another "
                 "preset, task list, channel count or class count?). Resume with the model of that run, or start a "
                 "new run in another out_dir.")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    # the schedule's closed form knows the (possibly longer) new run: recompute this step's lr from it
    scheduler = run.scheduler
    scheduler._last_lr = [base * decay(scheduler.last_epoch)
                          for base, decay in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(run.optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr
    before, started = state["scheduler"].get("_last_lr"), saved.get("epochs")
    changed = before and not math.isclose(before[0], scheduler._last_lr[0], rel_tol=1e-6, abs_tol=1e-12)
    trains = int(state["epoch"]) < config.epochs  # else nothing is trained, and fit says so
    if started is not None and started != config.epochs and changed and trains and is_main_process():
        # the rate jumps where the schedule changes length (no warm-up): say so, with the two values
        warnings.warn(f"resuming {path} with epochs={config.epochs}, where the run was started with {started}: the "
                      f"learning-rate schedule is recomputed for the new length, so the rate goes from {before[0]:.3g} "
                      f"to {scheduler._last_lr[0]:.3g} at once and the run will not match one started with "
                      f"epochs={config.epochs}", stacklevel=user_stacklevel())
    run.weighting.load_state_dict(state["weighting"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], train_loader, run.device)
    return state


def _as_compared(plain: Mapping) -> dict:
    """`plain` (a _plain_config) as a resume compares it: its weighting as the settings it amounts to, and
    losses=None as the LossConfig() it stands for (either resumes the other; a refusal names the losses)."""
    compared = _weighting_as_settings(plain)
    if "losses" in compared and compared["losses"] is None:
        compared["losses"] = python_numbers(dataclasses.asdict(LossConfig()))
    return compared


def _weighting_as_settings(plain: Mapping) -> dict:
    """`plain` (a _plain_config) with its weighting, weighting_kwargs and task_weights as the settings
    they amount to: a run saved with weighting="gradnorm" resumes with GradNorm(tasks) (the same
    settings) and back, and GradNorm(tasks, alpha=0.0) is refused with the option that changed."""
    if "weighting" not in plain:
        return dict(plain)
    kwargs = dict(plain.get("weighting_kwargs") or {})
    if plain.get("task_weights") is not None:
        kwargs["weights"] = plain["task_weights"]
    name, settings = weighting_settings(plain["weighting"], kwargs, plain.get("tasks", ()))
    # a seed (PCGrad's) only starts the random generator whose state the checkpoint restores: no difference
    # in the resumed run, which may name it or not (by name, the weighting takes the run's seed)
    settings.pop("seed", None)
    return {**plain, "weighting": name, "weighting_kwargs": python_numbers(settings), "task_weights": None}


def _non_finite_tensors(model: nn.Module, weighting: LossWeighting) -> list[str]:
    """Names of the floating-point parameters and buffers (what a checkpoint saves) holding NaN or inf."""
    return non_finite_names([*model.state_dict().items(),
                             *((f"weighting.{k}", v) for k, v in weighting.state_dict().items())])


def non_finite_names(named: Iterable[tuple[str, Any]]) -> list[str]:
    """The names of the floating-point tensors among (name, value) pairs that hold NaN or inf."""
    named = [(name, t) for name, t in named if torch.is_tensor(t) and t.is_floating_point()]
    if not named:
        return []
    flags = [torch.isfinite(t).all() for _, t in named]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()  # one wait for the GPU, not one per tensor
    return [name for (name, _), ok in zip(named, finite) if not ok]


def _model_tasks(model: nn.Module) -> Sequence[str]:
    tasks = getattr(model, "tasks", None)
    if tasks is None:
        raise ValueError("the model has no `tasks` attribute to read its tasks from; "
                         "pass them, e.g. tasks=('seg', 'cls')")
    return tasks


def _plain_config(config: TrainConfig, tasks: tuple[str, ...]) -> dict:
    """The config as JSON-like primitives (stored in checkpoints for reference, compared on resume).

    Python numbers all the way down, the LossConfig's fields included: class weights from sklearn's
    compute_class_weight are a NumPy array, and one NumPy object makes torch.load(weights_only=True)
    refuse the whole checkpoint (best.pt, last.pt and every resume).
    """
    plain = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, LossWeighting):
            value = type(value).__name__
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif isinstance(value, (os.PathLike, torch.device)):
            value = str(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        plain[f.name] = value
    if isinstance(config.weighting, LossWeighting):  # its settings, which the instance holds
        plain["weighting_kwargs"] = dict(config.weighting.options())
    plain["tasks"] = list(tasks)
    return python_numbers(plain)


def _train_one_epoch(run: _Run, loader, epoch: int, tasks: tuple[str, ...], bar,
                     out_dir: Path | None, first: bool = False) -> dict[str, float]:
    """One pass over `loader`; returns mean losses, epoch time and time spent waiting for data.

    first: the first epoch of this fit call, whose first batch's intensities are looked at.
    """
    run.train_model.train()
    sums = np.zeros(len(tasks) + 1)  # per-task losses, then the total
    started, steps = time.perf_counter(), 0
    with batches_from(loader) as batches:  # starts the loader's workers: waiting for data as much as next() is
        data_time = time.perf_counter() - started
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            data_time += time.perf_counter() - waited
            if batch is None:
                break
            steps += 1
            look = first and steps == 1 and is_main_process()  # the first batch: common mistakes, warned once
            if look and isinstance(batch, Mapping):
                _warn_if_unscaled(batch.get("image"), run.data_range)
                if "recon" in tasks:  # the target too: trained toward 0..255 (validation's metric refuses it,
                    # but only after an epoch, and never without a val_loader)
                    _warn_if_unscaled(batch.get("clean"), run.data_range, name="clean images")
            buffers = [b.detach().clone() for b in run.model.buffers()]  # BatchNorm statistics, before this batch
            losses, values = _forward(run, batch, tasks, look=look)
            # checked before backward, so weights and checkpoints stay good; under torchrun every process
            # stops when any one sees a bad loss (the others would wait in backward's all-reduce for ever)
            if _any_across_processes(not np.isfinite(values).all(), run.device):
                with torch.no_grad():  # the forward pass already fed the bad batch into the running statistics
                    for buffer, saved in zip(run.model.buffers(), buffers):
                        buffer.copy_(saved)
                last = out_dir / "last.pt" if out_dir is not None and (out_dir / "last.pt").is_file() else None
                bad = [(task, float(value)) for task, value in zip(tasks, values) if not np.isfinite(value)]
                task, value = bad[0] if bad else (None, float("nan"))
                raise NonFiniteLossError(epoch + 1, steps, task, value, last)
            total = _update(run, losses)
            sums += np.append(values, total)
            bar.update(1)
            bar.set_postfix({t: f"{v:.3f}" for t, v in zip((*tasks, "total"), (*values, total))}, refresh=False)
    synchronize(run.device)  # the last step's backward and update may still be queued on the GPU
    epoch_time = time.perf_counter() - started
    means = _mean_across_processes(list(sums / max(steps, 1)) + [epoch_time, data_time], run.device)
    record = {f"train/{t}": v for t, v in zip((*tasks, "total"), means)}
    record.update(epoch_time=means[-2], data_time=means[-1], data_share=means[-1] / max(means[-2], 1e-12))
    return record


def _forward(run: _Run, batch: Mapping[str, Any], tasks: tuple[str, ...],
             look: bool = False) -> tuple[dict, np.ndarray]:
    """Batch to device, forward under autocast, one loss per task. Returns the losses and their values.

    look: warn if the class scores look like probabilities (fit's first batch).
    """
    batch = _to_device(batch, run.device, run.channels_last)
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        outputs = run.train_model(batch["image"])
        losses = task_losses(outputs, batch, run.loss_fns)
    if look and isinstance(outputs, Mapping):
        _warn_if_probabilities(outputs)
    values = torch.stack([losses[t].detach().float() for t in tasks]).cpu().numpy()  # (T,) one sync per step
    return losses, values


def _update(run: _Run, losses: Mapping[str, Tensor]) -> float:
    """Backward through the weighting strategy, optimiser step, schedules. Returns the total loss."""
    if run.weighting.needs_shared_parameters and run.shared is None:
        run.shared = _shared_parameters(run.model, run.train_model, losses)
    run.optimizer.zero_grad(set_to_none=True)
    scale = run.scaler.scale if run.scaler is not None else None
    total = run.weighting.backward(losses, run.shared, scale)
    if run.weighting.in_optimizer:  # DDP does not see the weighting's parameters
        _average_gradients(list(run.weighting.parameters()))
    if run.grad_clip is not None:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.grad_clip)
    skipped = False
    if run.scaler is not None:
        # get_scale() waits for the GPU: asked only for a weighting with an update of its own (GradNorm)
        ask = type(run.weighting).after_step is not LossWeighting.after_step
        loss_scale = run.scaler.get_scale() if ask else None
        run.scaler.step(run.optimizer)  # skips the step if fp16 gradients overflowed
        run.scaler.update()
        skipped = ask and run.scaler.get_scale() < loss_scale  # update() lowers the scale exactly after a skip
    else:
        run.optimizer.step()
    run.weighting.step_skipped = skipped  # an attribute, so that after_step() keeps its plain signature
    run.weighting.after_step()
    if run.scaler is not None and run.scheduler.last_epoch == 0:  # the very first step (torch checks only it)
        with warnings.catch_warnings():  # the scaler may have skipped an overflowing fp16 step, which torch
            # reports as a misordered call; the schedule is a closed form of the step count, not affected
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            run.scheduler.step()
    else:
        run.scheduler.step()
    return float(total)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, tasks: Sequence[str] | None = None, *,
             device: str | torch.device | None = None, amp: str | bool = "auto", channels_last: bool | None = None,
             losses: LossConfig | None = None, data_range: float = 1.0, accumulator: MetricAccumulator | None = None,
             progress: bool = False) -> dict[str, float]:
    """Metrics of `model` over `loader`: {"seg/dice": ..., "cls/acc": ..., "seg/loss": ...}.

    tasks: None reads the model's `tasks` attribute. device: None keeps the model where it is;
    otherwise the model is moved there. channels_last (None: on CUDA) converts the model as well as the
    images, as fit does, so that a model evaluated after loading scores exactly what fit recorded.
    Pass your own MetricAccumulator to keep the class probabilities, labels and confusion matrix
    for ROC curves and confusion-matrix plots (with class-weighted losses, give it their
    class_weights, so that cls/loss does not depend on the batch size). Under torchrun every rank
    evaluates its shard and the sums are added (all_reduce) before averaging. Images that look like raw
    0..255 intensities (with data_range 1) are warned about, as fit warns about its training batches,
    and so is a loader that leaves images out (drop_last) or counts some twice (a padding
    DistributedSampler).
    """
    warn_if_not_each_once(loader, "loader")
    return _evaluate(model, loader, tasks, device=device, amp=amp, channels_last=channels_last, losses=losses,
                     data_range=data_range, accumulator=accumulator, progress=progress, check_scale=True)


def warn_if_not_each_once(loader, name: str) -> bool:
    """Warn (and return True) when an evaluation loader would not score each image exactly once: drop_last
    leaves the last partial batch out, and torch's DistributedSampler repeats images to give every process
    as many (15 images on 4 processes: one counted twice, AUC moved by 0.03) or, with drop_last, leaves
    some out. mtlearn.train shards without either. Only what the loader says of itself is read (its batch
    sampler's batch_size and drop_last, its sampler's length): its dataset is not touched."""
    if _length(loader) == 0:  # no batch at all: its own error says so
        return False
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    batch_size, size = getattr(batch_sampler, "batch_size", None), _length(sampler)
    problem = None
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        total, dealt = _length(sampler.dataset), sampler.num_replicas * len(sampler)
        if total is not None and dealt > total:
            problem = (f"counts {dealt - total} image(s) twice (a DistributedSampler pads {total} images to a "
                       f"multiple of {sampler.num_replicas} processes)")
        elif total is not None and dealt < total:
            problem = (f"leaves {total - dealt} image(s) out (a DistributedSampler with drop_last=True, {total} "
                       f"images on {sampler.num_replicas} processes)")
    if problem is None and getattr(batch_sampler, "drop_last", False) and size and batch_size and size % batch_size:
        where = " on each process" if isinstance(sampler, torch.utils.data.DistributedSampler) else ""
        problem = (f"drops its last {size % batch_size} image(s){where} (drop_last=True, {size} images in batches "
                   f"of {batch_size})")
    if problem is None:
        return False
    warnings.warn(f"the {name} {problem}, so the metrics are not those of the whole set; evaluate on a loader "
                  "with drop_last=False and, under torchrun, mtlearn.train.make_loader's shards (no padding)",
                  stacklevel=user_stacklevel())
    return True


def _check_accumulator(accumulator: MetricAccumulator, tasks: tuple[str, ...], losses: LossConfig | None,
                       data_range: float) -> None:
    """Refuse an accumulator evaluate would not fill afresh, or would fill on other terms than its losses."""
    if not accumulator.empty:  # a second evaluate() into it averaged both passes together, without a word
        raise ValueError("the accumulator already holds an earlier pass; call accumulator.reset() first, or pass a "
                         "new MetricAccumulator")
    if set(accumulator.tasks) != set(tasks):  # its tasks decide the metrics: the others' would be missing
        raise ValueError(f"the accumulator was built for tasks {accumulator.tasks}, but evaluate runs {tasks}; "
                         f"build it with MetricAccumulator({tasks})")
    # the mean of a class-weighted loss divides by the batch's weights: other ones made cls/loss depend on
    # batch_size (1.096 at 1, 1.111 at 15); another data_range reads PSNR/SSIM on another scale. Weights that
    # differ by a factor only give the same weighted mean.
    given = losses.class_weights if losses is not None else None
    ours = None if given is None else torch.as_tensor(np.asarray(given, dtype=np.float64))
    theirs = accumulator.class_weights
    same_weights = (ours is None) == (theirs is None) and (ours is None or (
        ours.shape == theirs.shape and torch.allclose(ours / ours.sum(), theirs.double() / theirs.sum())))
    if "cls" in tasks and not same_weights:
        raise ValueError(f"the accumulator was built with class_weights="
                         f"{None if theirs is None else theirs.tolist()}, but evaluate's losses have "
                         f"{None if ours is None else ours.tolist()}; build it with the same: "
                         "MetricAccumulator(tasks, class_weights=losses.class_weights)")
    if "recon" in tasks and accumulator.data_range != data_range:
        raise ValueError(f"the accumulator was built with data_range={accumulator.data_range:g}, but evaluate runs "
                         f"with data_range={data_range:g}; build it with the same: MetricAccumulator(tasks, "
                         "data_range=...)")


def _evaluate(model: nn.Module, loader, tasks: Sequence[str] | None = None, *,
              device: str | torch.device | None = None, amp: str | bool = "auto", channels_last: bool | None = None,
              losses: LossConfig | None = None, data_range: float = 1.0, accumulator: MetricAccumulator | None = None,
              progress: bool = False, check_scale: bool = False) -> dict[str, float]:
    """evaluate(); check_scale: warn about raw intensities in the first batch (fit, which warned about its own
    training batches already, passes False for its validation passes)."""
    tasks = check_tasks(tasks if tasks is not None else _model_tasks(model))
    check_loader("loader", loader, "torch.utils.data.DataLoader(dataset, batch_size=8)", reused=False)
    if accumulator is not None:  # before the model is moved or converted: a refused call changes nothing
        _check_accumulator(accumulator, tasks, losses, data_range)
    if device is None:  # where the model is (left there); a model without parameters or buffers: "auto"
        home = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = home.device if home is not None else pick_device("auto")
    else:
        device = pick_device(device)
        model.to(device)
    amp_dtype = resolve_amp(amp, device)
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    if channels_last:  # the weights too, as fit has them: with NCHW weights the convolutions add in another order
        model.to(memory_format=torch.channels_last)
    loss_fns = build_losses(tasks, losses).to(device)
    if accumulator is None:
        accumulator = MetricAccumulator(tasks, data_range=data_range,
                                        class_weights=losses.class_weights if losses is not None else None)
    # eval_mode: each submodule gets its own mode back (a frozen BatchNorm stays frozen)
    with eval_mode(model), batches_from(loader) as batches:
        for batch in tqdm(batches, total=_length(loader), desc="evaluate", leave=False,
                          disable=not (progress and is_main_process())):
            batch = _to_device(batch, device, channels_last)
            if check_scale and is_main_process():  # the first batch only, as fit: not a min/max sync per batch
                _warn_if_unscaled(batch.get("image"), data_range, "evaluate")
            check_scale = False
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(batch["image"])
                batch_losses = task_losses(outputs, batch, loss_fns)
            accumulator.update({t: outputs[t].float() for t in tasks}, batch, batch_losses)
    accumulator.sync()
    metrics = accumulator.compute()
    if not metrics:  # after sync: every process agrees, none waits for the others
        raise ValueError("the loader yielded no batches, so there is nothing to evaluate; check the dataset size and "
                         "batch_size/drop_last")
    return metrics
