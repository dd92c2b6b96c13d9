"""Checkpoint plumbing every training loop shares: safe files, random states, folder and option checks.

    save_checkpoint(state, "runs/a/last.pt")             # temp file + rename: never half a file
    state = load_checkpoint("runs/a/last.pt")             # torch.load(weights_only=True): runs no code
    state["rng"] = rng_state(train_loader)                # torch, NumPy, Python, CUDA, loader shuffling
    set_rng_state(state["rng"], train_loader)             # ... and back: the next epoch draws the same
    check_out_dir("runs/a", resume=False)                 # refuses a folder that already holds a run
    with out_dir_lock("runs/a"): ...                      # refuses a second run into it while this one lives
    check_resume_options(path, state["config"], now, ("lr", "tasks"))  # refuses a resume with other options

Why a module of its own: `engine.fit` and `disentangle.train_disentangle` each write their own
checkpoint (their own keys), and `umsrep.run_comparison` keeps each finished run's record beside
fit's, but the rules that make resuming safe are the same for all of them: a crash while writing
keeps the previous file, a checkpoint is read without unpickling code, every random generator is
saved so that a resumed run draws what an uninterrupted one would have, and a folder holding a
finished run is never silently overwritten, nor written by two runs at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import random
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from data_fetch.locking import make_and_lock
from mtlearn.utils import atomic_file, check_bool, check_folder, is_main_process, world_and_rank

# ----------------------------------------------------------------------------- files


def save_checkpoint(state: Mapping, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file.

    state: tensors, numbers, strings, lists and dicts only, so that `load_checkpoint` (weights_only)
    reads it back. The rename is atomic, so `path` holds either the previous file or the new one;
    the temporary file is removed whatever happens. Returns `path`. What load_checkpoint could not read
    back (a module, a NumPy number) raises TypeError naming it, and `path` keeps its previous file.
    A compiled model's state_dict names every weight "_orig_mod.<name>": `load_checkpoint(path, model)`
    takes that off, a bare `model.load_state_dict(torch.load(path)["model"])` does not;
    save `unwrapped_model(model).state_dict()` for a file any loader reads.
    """
    path = Path(path).expanduser()
    if isinstance(state, nn.Module):
        raise TypeError(f"save_checkpoint takes a dict, not a {type(state).__name__}; pass e.g. "
                        "{'model': model.state_dict()}")
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint takes a dict of tensors, numbers and strings, got a {type(state).__name__}")
    if path.is_dir():  # the rename would fail with the temporary file's name in the message
        raise IsADirectoryError(f"{path} is a folder; give the checkpoint's file name, e.g. {path / 'last.pt'}")
    with atomic_file(path, binary=True) as f:
        torch.save(dict(state), f)
        # torch.save takes any object, and only load_checkpoint would refuse it, calling the file corrupt: asked
        # now, of torch's own rules (from 2.5; torch 2.4 cannot tell), while the previous file is still in place
        unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        if unsafe is not None:
            f.flush()
            refused = unsafe(f.name)
            if refused:
                raise TypeError(f"state holds {', '.join(refused)}, which load_checkpoint (torch.load with "
                                "weights_only=True, which runs no code) cannot read back; nothing was written. Save "
                                "state_dict()s, tensors, Python numbers and strings (utils.python_numbers turns "
                                "NumPy numbers into Python ones)")
    return path


class UnreadableCheckpointError(ValueError):
    """A file load_checkpoint cannot read: corrupt, truncated, or not a checkpoint at all."""


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with torch.load(weights_only=True); load its weights into `model` if given.

    Why weights_only: a .pt file is a pickle, and unpickling may run any code the file names;
    weights_only builds tensors and plain containers only, so a foreign or tampered file raises
    a ValueError instead. Returns the whole dict; fit's holds "model", "optimizer", "scheduler",
    "weighting", "scaler", "rng", "history" (a dict; `History.from_state_dict` turns it back),
    "epoch" (epochs completed), "steps_per_epoch", "batch_size", "train_items" and "processes" (the training
    loader's batches per epoch, batch size, dataset size and torchrun processes), "class_names" (the training
    data's, or None), "trainable" (the names of the parameters it trained), "config" (fit's options) and, for a
    build_model network, "model_config" (what mt.load_model builds it from). Given `model`, its weights are
    loaded into it, with a warning when fit recorded other settings for it (image size, window size, heads).
    """
    path = Path(path).expanduser()
    if path.is_dir():  # the run's folder rather than a file in it
        inside = sorted(p.name for p in path.glob("*.pt"))
        raise FileNotFoundError(f"{path} is a folder, not a checkpoint; load one in it, e.g. {path / 'best.pt'} "
                                f"(it holds {inside or 'no .pt file'})")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train with fit(..., out_dir=...) first "
                                "(it writes last.pt every epoch and best.pt on validation improvement)")
    not_ours = (f"cannot read {path}: it is not an mtlearn checkpoint (as fit, train_disentangle and a UMS-Rep "
                "comparison write into their out_dir), or it is corrupt or truncated (an interrupted copy?). Use "
                "another checkpoint, or delete it and retrain that run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        if isinstance(error, RuntimeError) and "CUDA" in str(error) and not torch.cuda.is_available():
            raise ValueError(f"cannot load {path} onto {map_location!r}: this machine has no CUDA GPU; use "
                             "map_location='cpu' (the default) and move the model afterwards") from None
        # a damaged file fails in many ways (OSError, IndexError, RuntimeErrors from the zip reader...),
        # so the archive itself is checked: an intact one that fails otherwise is not the file's fault
        refused = isinstance(error, (pickle.UnpicklingError, EOFError, KeyError))  # e.g. weights_only's refusal
        reader = "PytorchStreamReader" in str(error)  # torch's zip reader: a header Python's zipfile accepts
        if not (refused or reader) and _intact_archive(path):
            raise
        pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error)) if refused else None
        if pickled and _intact_archive(path):  # torch.save(model): readable, but only by running the code it names
            fix = _save_instead(pickled[1])
            raise ValueError(f"{path} holds a pickled Python object ({pickled[1]}), which load_checkpoint does not "
                             f"unpickle, as that runs code from the file. Where it was made, {fix}") from None
        # `from None`: torch's text advises weights_only=False, i.e. running code from an unknown file
        raise UnreadableCheckpointError(not_ours) from None
    if zipfile.is_zipfile(path) and not _intact_archive(path):  # torch checks no CRC: a byte changed inside a
        raise UnreadableCheckpointError(not_ours)                 # tensor loaded as a wrong weight, silently
    if not isinstance(state, Mapping) or (model is not None and "model" not in state):
        if isinstance(state, Mapping) and state and all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{path} holds a plain state_dict (torch.save(model.state_dict())), not an mtlearn "
                             "checkpoint; load it with model.load_state_dict(torch.load(path, weights_only=True))")
        raise UnreadableCheckpointError(not_ours)
    if model is not None:
        rebuild = " (mt.load_model(path) builds it from the settings the checkpoint records)" if isinstance(
            state.get("model_config"), Mapping) else ""
        load_weights(model, state["model"], f"cannot load {path} into this model: the checkpoint was written for "
                     "another model (another preset, task list, channel or class count, DFE, classifier head or "
                     f"attention path?). Build the model with the options of that run{rebuild}.")
        _warn_if_built_otherwise(model, state.get("model_config"), path)
    return state


TRAINING_ONLY = ("dropout", "attn_dropout", "drop_path")  # rates that change nothing in eval mode


def _warn_if_built_otherwise(model: nn.Module, recorded, path: Path) -> None:
    """Warn when weights that fit were loaded into a model built with other settings that hold no weights and change
    what it computes: the image size (the attention windows), the window size, the heads, the DFE dilations."""
    config = getattr(unwrapped_model(model), "config", None)
    if not isinstance(recorded, Mapping) or not dataclasses.is_dataclass(config):
        return
    now = dataclasses.asdict(config)
    differ = [f"{k} {_plain(recorded[k])} then, {_plain(now[k])} now" for k in recorded
              if k in now and k not in TRAINING_ONLY and _plain(recorded[k]) != _plain(now[k])]
    if differ:
        warnings.warn(f"{path} was trained in a model built with other settings ({'; '.join(differ)}): its weights "
                      "load, but the network does not compute what it computed in training (the image size sets the "
                      "attention windows). mt.load_model(path) builds it as trained", stacklevel=3)


def _plain(value):
    """A setting as compared: tuples and lists alike."""
    return list(value) if isinstance(value, (tuple, list)) else value


def _save_instead(name: str) -> str:
    """What to save in place of the pickled object `name` (a dotted class name from torch's refusal)."""
    module, _, attribute = name.rpartition(".")
    found = getattr(sys.modules.get(module), attribute, None)  # only modules already imported: no import runs
    if isinstance(found, type) and issubclass(found, nn.Module):
        return "save model.state_dict() instead of the model (a whole model saved with torch.save(model))"
    if module.split(".")[0] == "numpy":
        return "turn NumPy numbers and arrays into Python ones first (mtlearn.utils.python_numbers)"
    return "save only tensors, numbers, strings, lists and dicts (e.g. model.state_dict())"


# what wrappers put before every parameter name: torch.compile's module, and DistributedDataParallel's
# (or DataParallel's) "module."; wrapped in each other, both ("module._orig_mod.")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
PARALLEL_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)  # the model is their .module


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DistributedDataParallel's (or DataParallel's) wrappers."""
    while True:
        if isinstance(model, PARALLEL_WRAPPERS):
            model = model.module
        elif is_compiled(model):
            model = model._orig_mod
        else:
            return model


def is_compiled(model) -> bool:
    """Whether `model` is what torch.compile(module) returns (a model that merely has an `_orig_mod` is not)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def wrapper_prefix(names, own) -> str:
    """What wrappers put before every one of `names` (e.g. "module._orig_mod.") and the `own` names lack;
    "" when nothing is to be taken off."""
    names, own = list(names), list(own)
    prefix = ""
    while names and all(isinstance(n, str) for n in names):
        step = next((p for p in WRAPPER_PREFIXES if all(n.startswith(prefix + p) for n in names)), None)
        if step is None or any(n.startswith(prefix + step) for n in own):  # the model's own names have it too
            break
        prefix += step
    return prefix


def load_weights(model: nn.Module, weights: Mapping, message: str) -> None:
    """model.load_state_dict(weights), or a ValueError: `message` (what went wrong, and the fix) and what
    does not match, a few names of each kind (load_state_dict lists every one, hundreds for a ResFormer).
    The names of a torch.compile'd or DistributedDataParallel-wrapped model load as the plain model's."""
    if not isinstance(weights, Mapping):  # a foreign file with a "model" entry of its own
        raise ValueError(f"{message} (its weights are a {type(weights).__name__}, not a state_dict)")
    model = unwrapped_model(model)  # the same parameters, under their own names
    own = model.state_dict().keys()
    prefix = wrapper_prefix(weights, own)  # the weights of a wrapped model, under their wrapper's names
    weights = {k.removeprefix(prefix): v for k, v in weights.items()} if prefix else weights
    differences = [(what, sorted(names)) for what, names in (("missing", set(own) - set(weights)),
                                                             ("unexpected", set(weights) - set(own))) if names]
    if differences:  # another architecture wrote it
        raise ValueError(f"{message} (" + "; ".join(
            f"{len(names)} {what} key(s), e.g. {', '.join(names[:3])}" for what, names in differences)
            + ")")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # the same names with other sizes: another width, channel or class count
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        mismatches = lines[1:] or lines
        more = f"; and {len(mismatches) - 2} more" if len(mismatches) > 2 else ""
        raise ValueError(f"{message} ({'; '.join(mismatches[:2])}{more})") from None


# ----------------------------------------------------------------------------- random states


def rng_state(loader=None, device: str | torch.device | None = None) -> dict:
    """Every random generator a training epoch draws from, as tensors and numbers only (weights_only-safe).

    Keys: "torch" (CPU generator, uint8 tensor), "numpy" ({"keys": (624,) int64 tensor, "pos",
    "has_gauss", "cached_gaussian"}), "python" ([version, list of 625 ints, gauss_next]), "cuda"
    (one uint8 tensor per torchrun process, [] without CUDA), under torchrun "ranks" (the first
    three of every process, rank k's at k: each draws its own dropout masks on the CPU, and only
    rank 0 writes the checkpoint), and "loader_generator" / "sampler_generator" /
    "batch_sampler_generator" when `loader` (a DataLoader) shuffles with its own generator.
    device: the GPU training runs on, whose generator dropout draws from (None: the current one;
    fit(device="cuda:1") does not make GPU 1 the current one); a CPU device saves no GPU's state.
    Collective under torchrun (it gathers every process's state): every rank must call it.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "cuda": _cuda_rng_states(device),
    }
    world, _ = world_and_rank()
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, {key: state[key] for key in ("torch", "numpy", "python")})
        state["ranks"] = ranks
    for name, generator in _loader_generators(loader).items():
        state[name] = generator.get_state()
    return state


def set_rng_state(state: Mapping, loader=None, device: str | torch.device | None = None) -> None:
    """Put back the generators `rng_state` saved, so the next draws are those of the saved moment.

    state: as `rng_state` returns it, loaded with map_location="cpu" (torch.set_rng_state takes CPU
    tensors only). Each torchrun rank restores its own states; with another number of processes
    than the run that saved it, a warning says dropout will differ. device: as for `rng_state`.
    """
    world, rank = world_and_rank()
    saved_world = len(state.get("ranks", [None]))
    if saved_world != world:
        if rank == 0:  # once, not once per process
            warnings.warn(f"the checkpoint holds the random states of {saved_world} process(es), this run has {world}: "
                          "dropout and drop-path will differ from an uninterrupted run", stacklevel=3)
    elif world > 1:
        state = {**state, **state["ranks"][rank]}  # this process's own CPU, NumPy and Python generators
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state["cuda"] and _draws_from_a_gpu(device) and len(state["cuda"]) == world:
        torch.cuda.set_rng_state(state["cuda"][rank], _cuda_device(device))
    for name, generator in _loader_generators(loader).items():
        if name in state:
            generator.set_state(state[name])


def _draws_from_a_gpu(device: str | torch.device | None) -> bool:
    """Whether a run on `device` draws from a GPU's generator (None: the current GPU, if there is one).
    A run on the CPU does not, and reading or setting GPU 0's state would start CUDA there (a context
    per process under torchrun)."""
    return torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")


def _cuda_device(device: str | torch.device | None) -> str | torch.device:
    """`device` when it is a GPU, else "cuda" (torch's name for the current GPU)."""
    return device if device is not None and torch.device(device).type == "cuda" else "cuda"


def _cuda_rng_states(device: str | torch.device | None = None) -> list[Tensor]:
    """The random state of the GPU `device` (None: the current one), one per process under torchrun
    (rank k restores its own); [] for a run that draws from none (_draws_from_a_gpu).

    Collective under torchrun: every rank must call it, so it runs before the rank-0-only save.
    """
    if not _draws_from_a_gpu(device):
        return []
    state = torch.cuda.get_rng_state(_cuda_device(device))
    world, _ = world_and_rank()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return [s.cpu() for s in states]


def _loader_generators(loader) -> dict[str, torch.Generator]:
    """The DataLoader's own generator and its sampler's, when they are set (shuffling order); the sampler
    inside a `batch_sampler=` too (the loader's `sampler` is then a SequentialSampler it does not use)."""
    found = {}
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (("loader_generator", loader), ("sampler_generator", getattr(loader, "sampler", None)),
              ("batch_sampler_generator", getattr(batch_sampler, "sampler", None)))
    for name, owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found.values()):
            found[name] = generator
    return found


# ----------------------------------------------------------------------------- checks before training


def _intact_archive(path: Path) -> bool:
    """Whether `path` is a zip archive (torch.save's format) whose every member matches its CRC. An archive
    written without CRCs (torch's serialization config save.compute_crc32 = False: every CRC 0) is taken as
    intact: there is nothing to check it against."""
    try:
        with zipfile.ZipFile(path) as archive:
            if all(member.CRC == 0 for member in archive.infolist()):
                return True
            return archive.testzip() is None
    except Exception:  # BadZipFile, OSError, or a damaged header (NotImplementedError: "compression method")
        return False


def check_run_folder(out_dir: str | os.PathLike | None, resume: bool, holding: str = "last.pt") -> None:
    """Refuse, before any work, an out_dir that is no path and a resume that is not True or False.

    A resume read from a config or the command line as the string "no" is true, and resumed an old
    run; out_dir=5 failed in Path() without naming the option. holding: what out_dir holds, for the
    message of resume=True without it.
    """
    check_bool("resume", resume)
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"out_dir must be a folder path (or None: no checkpoints), got {out_dir!r}")
    if resume and out_dir is None:
        raise ValueError(f"resume=True needs out_dir (the folder holding {holding})")


def check_out_dir(out_dir: str | os.PathLike, resume: bool, writes: str = "last.pt and best.pt", cli: bool = True,
                  also_kept: Sequence[str] = ("best.pt",)) -> None:
    """Refuse, before any training, an out_dir that cannot hold checkpoints or would lose a finished run.

    writes: the checkpoints the caller writes there; cli: name the command line's flags too (fit's
    run through python -m mtlearn.train; train_disentangle has no command line); also_kept: the
    other files a new run would overwrite, refused too when last.pt is gone (e.g. deleted to save
    space while best.pt was kept).
    """
    out_dir = Path(out_dir).expanduser()
    check_folder(out_dir, "out_dir", writes)  # else a whole epoch trains, then FileExistsError
    last = out_dir / "last.pt"
    if not resume and last.is_file():  # training on would overwrite last.pt and mix best.pt of two runs
        try:
            state = load_checkpoint(last)
            done = f", epoch {state.get('epoch', '?')} of {state.get('config', {}).get('epochs', '?')}"
        except ValueError:  # unreadable: still somebody's file, and the advice below still holds
            done = ", unreadable"
        # a new run (other data, other options) most often wants a new folder; resume only continues that run
        raise ValueError(f"out_dir {out_dir} already holds a run (last.pt{done}): for a new run choose another "
                         f"out_dir{' (CLI: --out-dir)' if cli else ''} or delete this one; to continue that run "
                         f"pass resume=True{' (CLI: --resume)' if cli else ''}")
    kept = " and ".join(name for name in also_kept if (out_dir / name).is_file())
    if not last.is_file() and kept:  # resuming too: without last.pt it would start over and overwrite them
        problem = "has no last.pt to resume from, and holds" if resume else "already holds"
        raise ValueError(f"out_dir {out_dir} {problem} {kept} of an earlier run (without its last.pt), which a new "
                         f"run would overwrite: choose another out_dir{' (CLI: --out-dir)' if cli else ''} or move "
                         f"{kept} away first")


class OutDirInUseError(ValueError):
    """Another run, still alive, is writing to the out_dir given."""


_HELD: set[Path] = set()  # the out_dirs this process holds: the command line's run holds it, then fit inside it


@contextlib.contextmanager
def out_dir_lock(out_dir: str | os.PathLike | None, option: str = "out_dir", writes: str = "last.pt and best.pt"):
    """Hold `out_dir` for one run: a second run into it while this one lives is refused (OutDirInUseError
    naming the first), as `python -m mtlearn.course` refuses a second run into its folder.

    Without it, two runs into one folder (two notebooks, two terminals, a --resume in a second one) both
    passed check_out_dir before either had written last.pt, trained side by side, and left a mix of their
    checkpoints. The lock is the file out_dir/.lock holding this process's id and machine; one left by a run
    killed on this machine is taken over (on POSIX: Windows cannot ask whether a process lives, and another
    machine's processes are not seen, so such a lock stays until deleted, as the refusal says). Held once
    per process (the command line's run, then fit inside it), and by the main process alone under
    torchrun (the others do not write; a refused main process ends them all).
    out_dir None, or not a path (refused by the caller's own checks): nothing is held. A folder made here
    for a run that ended without writing anything is removed again. option, writes: how the caller names
    out_dir, and what the run writes there (for the message on a folder that cannot be one).
    """
    if out_dir is None or not isinstance(out_dir, (str, os.PathLike)) or not is_main_process():
        yield
        return
    folder = Path(out_dir).expanduser()
    if folder.resolve() in _HELD:
        yield
        return
    check_folder(folder, option, writes)  # a file in the way, no permission: named, before mkdir
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # the folder first, then those above it
    lock = folder / ".lock"
    holder = make_and_lock(folder, lock)
    folder = folder.resolve()
    if holder is not None:
        raise OutDirInUseError(f"another run is writing to {option} {out_dir} ({holder}): wait for it to end, or "
                               f"choose another {option}. If no run is writing there (one stopped on another "
                               f"machine, or on Windows), delete {lock}")
    _HELD.add(folder)
    try:
        yield
    finally:
        _HELD.discard(folder)
        lock.unlink(missing_ok=True)
        for path in made:  # refused before it wrote anything: no empty folder left behind
            try:
                path.rmdir()
            except OSError:  # not empty
                break


def check_resume_options(path: str | os.PathLike, saved: Mapping, current: Mapping, names: Sequence[str],
                         notes: Mapping[str, str] | None = None) -> None:
    """Refuse to resume the run saved at `path` with options (of `names`) other than it was saved with.

    saved, current: option name -> plain value (the checkpoint's "config", and this run's). Names
    missing from `saved` are not compared: a checkpoint written before an option existed still resumes.
    notes: name -> a sentence saying what it is and how to keep it, added for a changed name that does
    not say so itself (fit's "steps_per_epoch" follows from the batch size, the data and the processes).
    """
    notes = notes or {}
    changed = [name for name in names if name in saved and saved[name] != current[name]]
    if changed:
        details = "; ".join(f"{name}: {saved[name]!r} then, {current[name]!r} now" for name in changed)
        explained = "".join(f" {notes[name]}." for name in changed if name in notes)
        raise ValueError(f"cannot resume from {path} with other options ({details}).{explained} Resume with the "
                         "options of that run, or start a new run in another out_dir")


def check_checkpoint_keys(path: str | os.PathLike, state: Mapping, keys: Sequence[str], writer: str) -> None:
    """Refuse to resume from a readable checkpoint that lacks what `writer` (e.g. "fit") saves, by name.

    A last.pt of another writer (a hand-saved {"model": ...}, another training loop's) otherwise
    stops at the first missing key with a bare KeyError.
    """
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"cannot resume from {path}: it is not a checkpoint written by {writer} (it has no "
                         f"{', '.join(map(repr, missing))}). Move it out of the folder, or start the run in "
                         "another out_dir")


def trainable_names(model: nn.Module) -> list[str]:
    """The names of the parameters that train (requires_grad), in the order the optimiser holds them."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def check_trainable(path: str | os.PathLike, saved: Sequence[str] | None, model: nn.Module,
                    weights: Mapping) -> None:
    """Refuse to resume when other parameters of `model` train now than in the run saved at `path`.

    saved: that run's `trainable_names` (None: a checkpoint written before they were saved; not
    compared); weights: its state_dict (a wrapped model's names, "_orig_mod." or "module." before each,
    are compared as the plain model's, as load_weights loads them). Why: the optimiser's state is a
    list in parameter order, so with another part frozen the saved moments fail to load, or worse,
    load onto the wrong parameters when the counts agree. Another architecture (parameters the
    weights do not name) is left to load_weights, whose message says so.
    """
    if saved is None or not isinstance(weights, Mapping):
        return
    prefix = wrapper_prefix(weights, model.state_dict())  # saved by a wrapped model: compared by its own names
    if prefix:
        weights = {k.removeprefix(prefix): v for k, v in weights.items()}
        saved = [n.removeprefix(prefix) if isinstance(n, str) else n for n in saved]
    now = trainable_names(model)
    if list(saved) == now:
        return
    own = dict(model.named_parameters())
    if any(name not in weights for name in own) or any(name not in own for name in saved):
        return

    def few(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "") if names else "none"

    training_now, training_then = set(now), set(saved)
    frozen = [name for name in saved if name not in training_now]
    thawed = [name for name in now if name not in training_then]
    if not frozen and not thawed:  # the same names in another order: the moments would load crosswise
        raise ValueError(f"cannot resume from {path}: the same parameters train, but the model lists them in "
                         "another order (its modules are built in another order), and the optimiser's saved state "
                         "is a list in that run's order; build the model as that run did, or start a new run in "
                         "another out_dir")
    raise ValueError(f"cannot resume from {path}: other parameters train now than in that run (frozen now: "
                     f"{few(frozen)}; training now: {few(thawed)}), and its optimiser state belongs to those that "
                     "trained then. Freeze (requires_grad=False) the same parameters as that run, or start a new run "
                     "in another out_dir")
