"""Small helpers every notebook and module needs: seeding, device choice, counting, argument
checks, torchrun process groups and atomic JSON files.

Kept free of model and data code so that anything in the package can import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import functools
import math
import os
import platform
import random
import re
import secrets
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# the command-line tools' SIGTERM, shared with data_fetch (which imports nothing of mtlearn); used from here
from data_fetch.interrupts import Terminated, sigterm_as_interrupt, stop_status  # noqa: F401

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, PyTorch (all devices) and MONAI's transform randomness.

    Results are then repeatable on the same machine and library versions; GPUs add their own
    non-determinism unless `torch.use_deterministic_algorithms(True)` is also set. cuDNN keeps the
    kernels asked for: deterministic ones after `torch.backends.cudnn.deterministic = True` (and then
    no autotuner), else the fastest its autotuner finds on CUDA (`cudnn.benchmark`, which can differ
    from run to run).
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        # 2**32: NumPy's legacy seeds stop there (torch's at 2**64, with a bare "Overflow" error)
        raise ValueError(f"seed must be a non-negative integer below 2**32, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA and MPS generators too
    try:
        from monai.utils import set_determinism
    except ImportError:  # MONAI is a dependency; this only guards odd installs
        return
    deterministic, benchmark = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    set_determinism(seed=seed % 2**32)
    # set_determinism also switches cuDNN to deterministic kernels, and had silently undone a user's own
    # choice: their flags are put back. Unless deterministic kernels were asked for, training speed matters
    # more than bit-exact GPU runs in a course, so the fast autotuner is on for CUDA.
    torch.backends.cudnn.deterministic = deterministic  # (the autotuner would choose kernels by their timings)
    torch.backends.cudnn.benchmark = not deterministic and (benchmark or torch.cuda.is_available())


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve `device`: "auto" picks CUDA, then Apple's MPS, then the CPU.

    An explicit "cuda" or "mps" that is not available raises instead of silently using the CPU,
    so a Colab runtime without a GPU is noticed at once.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'auto' or 'cuda:0', got {device!r}")
    kind, _, index = device.partition(":")
    if kind not in DEVICE_CHOICES or (":" in device and (kind == "auto" or not (index.isascii() and index.isdigit()))):
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICE_CHOICES} (or 'cuda:N', N a GPU number)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but no CUDA GPU is visible; use device='auto' or 'cpu' "
            "(on Colab: Runtime > Change runtime type > GPU)"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was requested but Apple's MPS backend is not available; use 'auto' or "
                         "'cpu'")
    if kind in ("cpu", "mps") and index and int(index) != 0:  # torch ignores the number: "cpu:7" is the CPU
        raise ValueError(f"device {device!r}: there is one {kind.upper()} device; use {kind!r} (numbers are for GPUs, "
                         "'cuda:N')")
    # a GPU number this machine lacks: torch would fail only at the first tensor moved there
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there is no GPU {index}, this machine has "
                         f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device(device)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_report(device: str | torch.device = "auto") -> dict[str, str]:
    """What the run is using: Python, library versions, CPU threads and the chosen device."""
    resolved = pick_device(device)
    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "monai": _version("monai"),
        "captum": _version("captum"),
        "numpy": np.__version__,
        "cpu_threads": str(torch.get_num_threads()),
        "device": str(resolved),
    }
    if resolved.type == "cuda":
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        report["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        report["bf16"] = str(torch.cuda.is_bf16_supported(including_emulation=False))  # as resolve_amp decides
    report["colab"] = str("COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules)
    return report


def as_array(values) -> np.ndarray:
    """`values` as a NumPy array; a tensor detached and on the CPU first, a bfloat16 or float16 one as float32
    (np.asarray refused a bf16 tensor, "unsupported ScalarType BFloat16", and one that requires grad)."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.is_floating_point() and values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        return values.cpu().numpy()
    return np.asarray(values)


def _kind(x) -> str:
    """What `x` is, for an error message: "a Tensor of shape (1, 8, 8)", "a tuple", "an int"."""
    name, shape = type(x).__name__, getattr(x, "shape", None)
    article = "an" if name[0] in "aeiouAEIOU" else "a"
    return f"{article} {name}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def _check_module(model, function: str) -> None:
    """A TypeError unless `model` is a built network: count_parameters("tiny") said "'str' object has no
    attribute 'parameters'"."""
    if not isinstance(model, nn.Module):
        example = f"build_model({model!r})" if isinstance(model, str) else "build_model('tiny')"
        raise TypeError(f"{function} takes a model (an nn.Module), got {_kind(model)}; build it first, e.g. "
                        f"{function}(mtlearn.{example})")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in `model` (only those with requires_grad when `trainable_only`)."""
    _check_module(model, "count_parameters")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Forward-pass FLOPs of `model(*inputs)`, counted by torch.utils.flop_counter.

    One multiply-add counts as two FLOPs. What is counted: matrix products, convolutions (transposed
    and grouped too) and attention (see countable_attention), which is where nearly all the work of
    these networks is; normalisation, activations and other element-wise operations count 0. The
    backward pass of a training step costs about twice the forward pass, so a training step is
    roughly 3x this number.
    """
    from torch.utils.flop_counter import FlopCounterMode

    _check_module(model, "count_flops")
    with eval_mode(model), torch.no_grad(), countable_attention(), _no_mha_fastpath(), \
            FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _no_mha_fastpath():
    """Run nn.MultiheadAttention and nn.TransformerEncoderLayer on their plain path for a block.

    In eval mode without gradients torch sends them down a fused "fast path" whose operation the
    FLOP counter has no formula for: a model built from them counted 0 FLOPs for its attention.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def eval_mode(model: nn.Module, device: torch.device | None = None):
    """Run a block with `model` in eval mode, then give every submodule back its own mode.

    device: None leaves the model where it is; a device moves it there for the block and back to
    the device of its parameters (or buffers) afterwards, so a model evaluated on the GPU can go on
    training on the CPU.
    Why not `model.train(was_training)`: that switches *every* submodule to the model's mode, so a
    part the user had put in eval mode (a frozen BatchNorm, a frozen encoder) would leave an
    evaluation in training mode, updating running statistics from then on.
    """
    modes = [(module, module.training) for module in model.modules()]
    was_on = None
    if device is not None:
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        was_on = tensor.device if tensor is not None else None
        model.to(device)
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        if was_on is not None:
            model.to(was_on)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA or Apple's MPS; the CPU runs it at once).

    A GPU runs kernels asynchronously: without waiting, a timer stopped after a training step
    measures how fast the work was queued, not how fast it ran.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def countable_attention():
    """Context manager: F.scaled_dot_product_attention in its plain matrix-product form.

    Why: torch's FLOP counter has formulas for the fused CUDA attention kernels but not for the
    fused CPU one, so on a CPU it would count attention as 0 FLOPs (QK^T and AV are 5-8 % of the
    course model's training FLOPs). The math form computes the same values with ops it counts.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def format_count(n: float) -> str:
    """Human-readable count: 33_712_000 -> '33.7M', 1.5e13 FLOPs -> '15.0T'; NaN (not measured) -> 'nan'."""
    if n != n:  # int(nan) raised
        return "nan"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale * 0.99995:  # from where one decimal rounds up to 1.0: 999_950 -> '1.0M', not '1000.0k'
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def check_options(config_class: type, options, what: str = "option(s)") -> None:
    """Raise ValueError naming every key of `options` that is not a field of the dataclass `config_class`.

    The presets and configs (models, training, UMS-Rep, disentanglement) take overrides as
    keyword arguments; a misspelt one should fail loudly with the valid names, not be ignored.
    """
    valid = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid options are {sorted(valid)}")


def python_numbers(value):
    """NumPy numbers -> Python ones, NumPy arrays and tensors -> (nested) lists, inside mappings (-> dict),
    lists and tuples too.

    fit and train_disentangle accept lr=np.float64(1e-3) (from np.logspace, say) and class weights
    as an array (sklearn's compute_class_weight returns one), but torch.load(weights_only=True)
    refuses a checkpoint that holds NumPy objects, and the options reach it through the optimiser's
    and the scheduler's state as well as the config. Not to_jsonable: NaN stays NaN and other objects
    pass through unchanged.
    """
    if isinstance(value, Mapping):
        return {k: python_numbers(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields, not one iterable
        return type(value)(*(python_numbers(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(python_numbers(v) for v in value)
    if isinstance(value, (np.ndarray, torch.Tensor)):  # a tensor compared on resume: "ambiguous truth value"
        return value.tolist()  # Python numbers all the way down (a 0-d array: one number)
    return value.item() if isinstance(value, np.generic) else value


def find_class_names(dataset):
    """The dataset's class_names, looked up through Subset-style wrappers (their `.dataset`); None if none."""
    while getattr(dataset, "class_names", None) is None and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "class_names", None)


def is_int(value) -> bool:
    """True for Python and NumPy integers; False for bools (True is not a count) and floats (128.0)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_item_index(index, length: int) -> int:
    """A dataset's item index as an int in 0..length-1, or a TypeError / IndexError that says so.

    ds[True] and ds[1.5] would otherwise read item 1, and ds[-1] a list's last item (or, for a
    generated dataset, another dataset's); a DataLoader never asks for any of them.
    """
    given = index
    if getattr(index, "ndim", None) == 0:  # torch.tensor(3) or np.array(3), as a list takes them
        index = index.item()
    if not is_int(index):
        raise TypeError(f"index must be an integer, got {given!r}")
    if not 0 <= index < length:
        valid = f"0 to {length - 1}" if length else "it is empty"
        counted = "; count from the start: len(dataset) - 1 is the last item" if index < 0 and length else ""
        raise IndexError(f"index {index} out of range for a dataset of {length} items ({valid}){counted}")
    return int(index)


def is_number(value) -> bool:
    """True for Python and NumPy ints and floats; False for bools and strings ("1e-3" from a config file)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """True for a number (see is_number) that is finite as a float; False for anything else, a string included.

    math.isfinite(10**400) raises, as it converts to a float first; a notebook parameter or a config file
    can hold such an int, and the user should get the check's message, not a traceback from inside it. An
    int beyond the float range counts as not finite: it has no float to compute with.
    """
    if not is_number(value):
        return False
    if isinstance(value, (int, np.integer)):
        return abs(int(value)) <= sys.float_info.max
    return math.isfinite(value)


def check_int(name: str, value, minimum: int) -> int:
    """`value` as an int, or a ValueError naming `name`, the bound and (for a float) the int(...) fix."""
    if not is_int(value) or value < minimum:
        fix = "; pass an int, e.g. int(...) of a computed value" if isinstance(value, (float, np.floating)) else ""
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{fix}")
    return int(value)


def check_int_sequence(name: str, value, what: str, minimum: int = 1) -> tuple[int, ...]:
    """`value` as a tuple of Python ints >= 1 (NumPy ints too, as from a sweep; not True), at least `minimum`
    of them, or a ValueError naming `name` and `what` it lists ("one rate per DFE branch, e.g. (6, 12, 18)").
    An int where a sequence is due (6 for (6,)) failed with "'int' object is not iterable", naming nothing."""
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must list {what}, got {value!r}") from None
    if len(items) < minimum:
        raise ValueError(f"{name} must list {what}, at least {minimum}, got {items!r}")
    return tuple(check_int(f"each of {name}", item, 1) for item in items)


def check_number(name: str, value, low: float, high: float = math.inf, *, above: bool = False,
                 below: bool = False, advice: str = "") -> float:
    """`value` as a Python float if it is a finite number from `low` to `high`, else a ValueError naming `name`.

        lr = check_number("lr", lr, 0, above=True, advice="e.g. 1e-4")   # a finite number > 0
        rate = check_number("artifact_rate", rate, 0, 1)                # a number in [0, 1]

    above / below: `low` / `high` itself is excluded. advice: the usual value and what it means, for the message.
    Why not a plain `value > 0`: NaN fails every comparison, so `if value <= 0: raise` lets it through;
    infinity passes `> 0` (and trains a NaN model); and "1e-3" from a config file fails the comparison as
    a bare TypeError that names neither the option nor the fix. The float returned is a Python one, as a
    NumPy one in an optimiser's state would make checkpoints unreadable under weights_only.
    """
    ok = is_finite(value)
    if ok:
        ok = (value > low if above else value >= low) and (value < high if below else value <= high)
    if not ok:
        if math.isinf(high):
            wanted = f"a finite number {'>' if above else '>='} {low:g}"
        else:
            wanted = f"a number in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"
        advice = f" ({advice})" if advice else ""
        unquote = "; pass it unquoted" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be {wanted}{advice}, got {value!r}{unquote}")
    return float(value)


def check_bool(name: str, value) -> bool:
    """`value` if it is True or False, else a ValueError naming `name`.

    A switch set from a config file, a notebook parameter or the command line can arrive as the
    string "False", which Python reads as true: without this check the run silently does the opposite.
    """
    if not isinstance(value, (bool, np.bool_)):
        hint = "; pass it unquoted" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be True or False, got {value!r}{hint}")
    return bool(value)


def check_label_pair(task_keys) -> None:
    """Two different label names, task A's first (e.g. ("shape", "background")): the disentanglement's task_keys."""
    if (not isinstance(task_keys, (tuple, list)) or len(task_keys) != 2  # a set has no first; a dict's keys...
            or not all(isinstance(k, str) for k in task_keys) or task_keys[0] == task_keys[1]):
        raise ValueError(f"task_keys must be two different label names, task A's first, e.g. ('shape', "
                         f"'background'); got {task_keys!r}")


def check_loader(name: str, loader, wrap: str, reused: bool = True) -> None:
    """Refuse a Dataset where a DataLoader is due: it would yield single, unbatched items (int labels,
    images without a batch axis) and fail later with a cryptic shape error. wrap: the call to suggest.
    reused: the loader is read more than once (every epoch), so a one-shot iterator (iter(loader), a
    generator) is refused too: it would be empty after the first pass, and later epochs train on nothing."""
    from torch.utils.data import Dataset

    if isinstance(loader, Dataset):
        raise TypeError(f"{name} is a Dataset ({type(loader).__name__}), not a DataLoader; wrap it: {wrap}")
    if reused and hasattr(loader, "__next__"):
        raise TypeError(f"{name} is a one-shot iterator ({type(loader).__name__}), empty after its first pass, and "
                        "it is read every epoch; pass the DataLoader itself (or a list of batch dicts)")
    # fit(model, train, config) took the config for val_loader: a whole epoch trained on the defaults first
    options = isinstance(loader, Mapping) or dataclasses.is_dataclass(loader)
    if loader is not None and (options or isinstance(loader, str) or not hasattr(loader, "__iter__")):
        hint = ""
        if options:  # evaluate(model, batch) has no epochs: a dict there is one batch
            hint = ("; options go by keyword, e.g. epochs=5" if reused else
                    "; one batch goes in a list, [batch]" if isinstance(loader, Mapping) else "; options go by keyword")
        raise TypeError(f"{name} must be a DataLoader (or a list of batch dicts), got {_kind(loader)}{hint}")


class FolderNotWritableError(PermissionError, ValueError):
    """A folder given for output that its user cannot write to: a PermissionError, and a ValueError like every
    other unusable option (the command lines report it in one line)."""


def home_expanded(path: str | os.PathLike, option: str) -> Path:
    """`path` with a leading ~ or ~name expanded (a command line's --out=~/x: the shell leaves a "~" after "="
    as it is), or a ValueError naming `option` when that home folder cannot be found (~name of no such user)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        home = Path(path).parts[0]
        raise ValueError(f"{option} {path}: {home} cannot be expanded (no such user, or no home folder); give the "
                         "folder's full path") from None


def check_folder(path: str | os.PathLike, option: str, receives: str, write: bool = True) -> None:
    """Raise ValueError if `path` cannot become a folder because it, or a folder above it, is a file, and
    (write=True) FolderNotWritableError if files cannot be created in it, or in the nearest folder above it
    that exists (no permission, a read-only disk).

    Checked before any work: mkdir would fail with FileExistsError or NotADirectoryError, the first
    file written with PermissionError, and only after a notebook ran or an epoch trained if the folder
    is first needed then.
    """
    path = Path(path)
    existing = None
    for folder in (path, *path.parents):
        try:
            if folder.exists():
                existing = folder
                break
        except PermissionError:  # a folder above it may not be searched (mode 700, another user's): the first
            continue             # that can be seen is that one, in which nothing can be made (os.access below)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{option} {path} cannot be a folder: {existing} is a file. Choose another {option} "
                         f"(it receives {receives})")
    if write and existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing}, the folder it would be made in)"
        raise FolderNotWritableError(
            f"{option} {path} is not writable{where}: no permission to create files there, or a read-only disk. "
            f"Choose another {option}, one you can write to (it receives {receives})")


def check_adamw(lr, weight_decay, betas) -> tuple[float, float, tuple[float, float]]:
    """AdamW's lr, weight_decay and betas as Python floats, or a ValueError naming the one that is wrong and the fix."""
    lr = check_number("lr", lr, 0, above=True, advice="e.g. 1e-4")  # inf passes `> 0` and trains a NaN model
    weight_decay = check_number("weight_decay", weight_decay, 0, advice="0: no decay")
    if lr * weight_decay >= 1:  # AdamW multiplies every weight by 1 - lr * weight_decay per step
        raise ValueError(f"lr {lr:g} with weight_decay {weight_decay:g} would shrink every weight by "
                         f"lr x weight_decay = {lr * weight_decay:g} (>= 1) each step, flipping its sign; lower lr "
                         "(usually 1e-4 to 1e-3) or weight_decay (small, e.g. 3e-5 (ResFormer) or 1e-2)")
    return lr, weight_decay, check_betas(betas)


def check_betas(betas, example: tuple[float, float] = (0.9, 0.999)) -> tuple[float, float]:
    """Adam's (beta1, beta2) as Python floats, or a ValueError naming the rule and `example`."""
    if (not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2
            or not all(is_number(b) and 0 <= b < 1 for b in betas)):  # NaN fails the comparison
        raise ValueError(f"betas must be a pair of numbers in [0, 1), e.g. {example}, got {betas!r}; they are Adam's "
                         "beta1 and beta2")
    return float(betas[0]), float(betas[1])


def check_size(image_size, minimum: int = 1) -> tuple[int, int]:
    """128 -> (128, 128); (96, 160) -> (96, 160); anything else -> ValueError naming the fix.

    Models and datasets all take an int or (H, W); a float such as 256 / 2 must not end in
    "'float' object is not iterable".
    """
    try:
        size = (image_size, image_size) if is_int(image_size) else tuple(image_size)
    except TypeError:  # a float or None: not a pair
        size = (image_size,)
    if len(size) != 2 or not all(is_int(n) and n >= minimum for n in size):
        # sizes computed by division (256 / 2) are floats
        fix = ("; pass ints: int(...) or // (e.g. 256 // 2)" if any(isinstance(n, (float, np.floating)) for n in size)
               else "")
        raise ValueError(f"image_size must be an int or (H, W) of ints >= {minimum}, got {image_size!r}{fix}")
    return int(size[0]), int(size[1])


# ----------------------------------------------------------------------------- torchrun process groups


def world_and_rank() -> tuple[int, int]:
    """(processes, this one's rank) inside a torchrun process group; (1, 0) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_distributed() -> bool:
    """True inside a torchrun process group of two or more processes."""
    return world_and_rank()[0] > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that shows progress and writes files."""
    return world_and_rank()[1] == 0


# ----------------------------------------------------------------------------- JSON files


def to_jsonable(value: Any, digits: int | None = None) -> Any:
    """Tensors, NumPy values, tuples and NaN -> plain JSON values (NaN and inf become None).

    digits: round floats to this many decimals, and smaller ones to this many significant digits
    (metrics.json of a notebook: 6, so a learning rate of 3e-7 is not written as 0.0); None keeps them.
    """
    if isinstance(value, Mapping):  # any mapping (a MappingProxyType too), as run.finish takes at the top
        keys = [str(k) for k in value]
        twice = sorted(k for k, n in Counter(keys).items() if n > 1)
        if twice:  # {1: 0.5, "1": 0.7} would keep one of them, silently
            raise ValueError(f"keys {twice} appear twice once written as text (JSON keys are strings); rename one")
        return {str(k): to_jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, digits) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist(), digits)
    if isinstance(value, np.ndarray):  # before .item(), which only takes arrays of one value
        return to_jsonable(value.tolist(), digits)
    if callable(getattr(value, "to_dict", None)):  # a pandas Series or DataFrame: by its index (and columns)
        return to_jsonable(value.to_dict(), digits)
    if isinstance(getattr(value, "records", None), list):  # fit's History: its per-epoch records
        return to_jsonable(value.records, digits)
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None  # JSON has no NaN
        if digits is None or value == 0:
            return value
        return round(value, max(digits, digits - 1 - math.floor(math.log10(abs(value)))))
    if value is None or isinstance(value, (bool, int, str)):
        return value
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."  # not a whole model's repr
    raise TypeError(f"metrics must be numbers, strings, lists or dicts; got {type(value).__name__}: {shown}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, binary: bool = False):
    """Open a temporary file beside `path` for writing; on success put it in `path`'s place.

    A reader never sees half a file, and a failure (an error, a full disk, a crash or power loss
    while writing) leaves the previous file: the data reach the disk (fsync) before the rename,
    which is atomic on POSIX and Windows. The temporary file has a unique name (two writers cannot
    trip over each other's) and is removed whatever happens; a new file gets the usual mode (0o666
    less the umask), a replaced one keeps its own. Text is written as UTF-8, whatever the locale.
    A process killed while writing (kill -9, a power cut) runs no cleanup and leaves its hidden
    temporary file; the next successful write of `path` removes it (see _remove_stale_temporaries).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name's first 200 bytes: a name near the 255 a file system allows would not take the suffix
    stem = path.name.encode()[:200].decode(errors="ignore")
    # the writer's machine and process: see _remove_stale_temporaries
    tmp = path.with_name(f".{stem}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(8)}.tmp")
    try:
        try:  # "x": created here and only here, with the mode any new file gets
            f = open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"}))
        except OSError as error:  # named after the file asked for, not the hidden temporary one
            raise _cannot_write(error, _refusal(path, error)) from None
        try:
            with f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except Exception as error:
            interrupt = _interrupt_behind(error)
            if interrupt is not None:  # Ctrl-C or SIGTERM in torch.save, which raised "unexpected pos" over it
                raise interrupt from None
            # a bare "[Errno 28] No space left on device" (or "[Errno 5] Input/output error"), for a checkpoint
            # inside torch's RuntimeError "unexpected pos", named no file; an error of the caller's own about
            # another file is left as it is
            failed = _write_error(error, tmp)
            if failed is None:
                raise
            raise _cannot_write(failed, _refusal(path, failed)) from None
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        try:
            os.replace(tmp, path)
        except PermissionError as error:  # Windows: the file is open in another program, which locks it
            raise _cannot_write(error, f"cannot replace {path} ({error.strerror}); close any program that has it "
                                       "open, or give a path in a folder you can write to") from None
    finally:
        tmp.unlink(missing_ok=True)
    _remove_stale_temporaries(path, stem)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errno of a full disk, and of a user's quota used up


def _refusal(path: Path, error: OSError) -> str:
    """What atomic_file says when `path` cannot be written for `error` (raised by its temporary file)."""
    if error.errno in DISK_FULL:
        return (f"cannot write {path}: the disk is full ({error.strerror}); free some space, or write to a folder on "
                "another disk (the previous file, if any, is kept)")
    if isinstance(error, PermissionError):
        return (f"cannot write {path}: no permission to create files in {path.parent}; give a path in a folder you "
                "can write to")
    return f"cannot write {path}: {error.strerror or error}; give a path in a folder you can write to"


def _chain(error: BaseException | None):
    """`error`, then the errors it was raised from or during, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or a command-line tool's SIGTERM) that `error` was raised during, else None."""
    return next((e for e in _chain(error) if isinstance(e, KeyboardInterrupt)), None)


def _write_error(error: BaseException, tmp: Path) -> OSError | None:
    """The OSError behind `error` (itself, or one it was raised from or during) that concerns the file `tmp` (no
    file name: a write to an open file; a full disk, a failing one), else None."""
    return next((e for e in _chain(error)
                 if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp))), None)


def _cannot_write(error: OSError, message: str) -> OSError:
    """An error of `error`'s kind and errno that says `message` (the file asked for and the way out)."""
    refused = type(error)(message)
    refused.errno = error.errno  # (given as an argument, it would start the message with "[Errno 13]")
    return refused


STALE_AFTER_S = 3600  # a temporary file nobody has written to for an hour belongs to no live write


def _remove_stale_temporaries(path: Path, stem: str) -> None:
    """Remove the temporary files that killed writes of `path` left beside it.

    One is stale when it was written on this machine by a process that is gone (POSIX), or when
    nobody has written to it for STALE_AFTER_S: another machine's (a shared folder), whose process
    this one cannot see, and any on Windows, where asking about a process by its id is no harmless
    question. Files that only look alike, and any that cannot be removed, are left as they are.
    """
    pattern = re.compile(rf"\.{re.escape(stem)}\.([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{16}}\.tmp")
    here = _host_tag()
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        found = pattern.fullmatch(name)
        if found is None:
            continue
        other = path.parent / name
        try:
            idle = time.time() - other.stat().st_mtime
            if idle > STALE_AFTER_S or (found[1] == here and not _process_alive(int(found[2]))):
                other.unlink()
        except OSError:  # gone meanwhile (its writer finished), or not ours to remove
            continue


@functools.lru_cache(maxsize=1)  # asked twice on every atomic write; the machine's name does not change
def _host_tag() -> str:
    """8 hex digits naming this machine in a temporary file's name (a hash of its host name)."""
    import hashlib
    import socket

    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (True where that cannot be asked: off POSIX, and for
    this process itself, which may be writing another temporary file of the same path right now)."""
    from data_fetch.locking import _alive  # the lock files' own question, asked the same way

    return pid == os.getpid() or os.name != "posix" or _alive(pid)


def user_stacklevel() -> int:
    """The stacklevel at which warnings.warn names the first frame outside mtlearn, torch and contextlib:
    the user's own line, however many of our functions and torch's decorators (no_grad, inference_mode)
    lie between. Call it in the function that warns."""
    # each folder with its separator: "torch" alone would take torchvision's frames for torch's
    internal = (str(Path(__file__).parent) + os.sep, str(Path(torch.__file__).parent) + os.sep, contextlib.__file__)
    frame, level = sys._getframe(1), 1  # 1: the function that warns
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def batches_from(loader):
    """iter(loader), for a `with` block; should the block end by an exception (an error, Ctrl-C), the
    iterator's worker processes are stopped at once.

    Why: Jupyter keeps the last traceback, and with it the frames that hold the iterator, so after an
    interrupted loop its DataLoader workers (and their file handles) ran on until the next error
    replaced it. A loader with persistent_workers keeps its workers by design, for its next pass.
    """
    batches = iter(loader)
    try:
        yield batches
    except BaseException:
        stop = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator (a private method)
        if stop is not None and not getattr(batches, "_persistent_workers", False):
            stop()
        raise


@contextlib.contextmanager
def warnings_above(bar):
    """While `bar` (a tqdm bar) is open, print each warning on lines of its own above it.

    A warning goes to the same stream as a terminal bar, which stands on an unfinished line: the
    warning was written onto the end of the bar's line and the bar went on below it. Here the bar is
    cleared first and drawn again after, around whatever prints warnings now (pytest's or a
    notebook's recorder too); a disabled bar changes nothing.
    """
    if getattr(bar, "disable", True):
        yield
        return
    previous = warnings.showwarning

    def show(*args, **kwargs):
        bar.clear()
        try:
            previous(*args, **kwargs)
        finally:
            bar.refresh()

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:  # not if someone replaced it meanwhile (theirs stays)
            warnings.showwarning = previous


def printable_stdout() -> None:
    """Let a command-line tool print any path: where stdout's encoding cannot spell a character (Windows writes
    cp1252 to a file or pipe, and the user folder may be "C:\\Users\\Łukasz"), it comes out as an escape
    (\\u0141) instead of a UnicodeEncodeError once the work is done. stderr does so already."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)  # absent on a stream replaced by something else
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")


def write_text(text: str, path: Path) -> None:
    """Write `text` to `path` atomically (see atomic_file), as UTF-8."""
    with atomic_file(path) as f:
        f.write(text)


def write_json(record: dict[str, Any], path: Path) -> None:
    """Write `record` to `path` as JSON, atomically (write_text). NaN and infinities, which JSON
    has no words for, are written as null (see to_jsonable); NumPy and torch numbers as plain ones."""
    write_text(json.dumps(to_jsonable(record), indent=2, allow_nan=False), path)
