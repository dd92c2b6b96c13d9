"""The notebook contract, in one place.

Every course notebook has a `parameters` cell of literals (papermill injects new values after it):

    profile = None          # "smoke" | "course" | "paper"; None: $MTLEARN_PROFILE, else "course"
    dataset = "synthetic"
    data_root = None
    seed = 0
    device = "auto"
    out_dir = None          # None: outputs/<notebook>/<profile>

and then calls `run = start("01_resformer_mtl", profile=profile, ...)`, which checks every value
(a bad one fails at once, naming the valid choices), seeds everything, picks the device, prints
the environment and starts the clock. A notebook's own knobs that default by profile go through
`run.setting("epochs", epochs, smoke=1, course=8, paper=150)`, which checks a value that was set;
knobs that list names go through `run.names("methods", methods, A.METHODS)` and fixed-default
numbers through `run.number("tolerance", tolerance, minimum=0, integer=True)`, so that a bad value
fails in the first cell, not after the models have trained. The notebook saves figures with `run.save_figure(fig, name)`
and ends with `run.finish(metrics)`, which writes `out_dir/metrics.json` and prints device and
wall time. A run into an out_dir that holds an earlier run first moves that run's metrics.json and
figures into `out_dir/previous/`: the folder then holds one run, and a run that fails leaves no
metrics.json that looks like its own.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlearn.utils import (
    atomic_file,
    check_folder,
    environment_report,
    is_finite,
    is_int,
    is_number,
    pick_device,
    seed_everything,
    to_jsonable,
    write_json,
)

PROFILES = ("smoke", "course", "paper")
PROFILE_HELP = {
    "smoke": "seconds on a CPU; checks that the notebook runs (CI)",
    "course": "minutes on 2 CPU cores or a Colab GPU; the numbers the course discusses",
    "paper": "paper-scale settings for a GPU: the papers' models, image sizes and schedules (real data when "
             "`dataset` names it; the synthetic data stays the default)",
}
# what start() says when the paper profile runs on a CPU (the README's "The `paper` profile on a GPU")
PAPER_ON_CPU = ("the paper profile is sized for a GPU: on a CPU its trainings take days to weeks (each of notebook "
                "01's six models a day or two on 2 cores, on BUSI or the generated data alike). Run it on "
                "a GPU (on Colab: Runtime > Change runtime type), or use profile='course' on this machine")
SYNTHETIC_DATASETS = ("synthetic", "shapes")
REAL_DATASETS = ("busi", "bus_bra", "bus_uclm", "breastmnist")
MASKED_DATASETS = ("busi", "bus_bra", "bus_uclm")  # with lesion masks: what a notebook training `seg` accepts


def resolve_profile(profile: str | None = None, name: str = "profile") -> str:
    """`profile`, or $MTLEARN_PROFILE when it is None, or "course"; anything else is an error.

    name: the parameter the value came from, for the message (notebook 06's grid_profile; "--profile" for a
    command line's option).
    """
    source = f"the {name} {'option' if name.startswith('--') else 'parameter'}"
    if profile is None:
        profile = os.environ.get("MTLEARN_PROFILE") or "course"
        source = "$MTLEARN_PROFILE" if os.environ.get("MTLEARN_PROFILE") else source
    if profile not in PROFILES:
        choices = "; ".join(f"{p!r}: {PROFILE_HELP[p]}" for p in PROFILES)
        near = str(profile).strip().lower() if isinstance(profile, str) else None
        hint = f" (did you mean {near!r}? profiles are lower case, without spaces)" if near in PROFILES else ""
        raise ValueError(f"unknown profile {profile!r} (from {source}){hint}; valid profiles are {choices}")
    return profile


def check_dataset(dataset: str, data_root: str | os.PathLike | None, allowed: tuple[str, ...],
                  why: str = "") -> Path | None:
    """Fail early when `dataset` is unknown here or its files are missing (with the fetch command).

    `data_root` holds one folder per dataset (as `$MTLEARN_DATA` does); returns the dataset's own
    folder, the `root` that `mtlearn.data.load_dataset` takes, or None for the generated datasets.
    why: the reason a notebook takes only `allowed`, said when another dataset is asked for.
    """
    if dataset not in allowed:
        unmasked = dataset in REAL_DATASETS and dataset not in MASKED_DATASETS and set(MASKED_DATASETS) <= set(allowed)
        if not why and unmasked:
            why = "it has no lesion masks, and this notebook trains segmentation"
        why = f" ({why})" if why else ""
        from mtlearn.data.real import DATASETS

        if dataset not in DATASETS:  # a name of one's own: "not used by this notebook" suggested another would
            raise ValueError(f"unknown dataset {dataset!r}; this notebook takes one of {allowed} (to train on images "
                             "of your own, build an UltrasoundDataset and call mt.fit: README, \"Your own images\")")
        raise ValueError(f"dataset {dataset!r} is not used by this notebook{why}; choose one of {allowed}")
    if dataset in SYNTHETIC_DATASETS:
        return None
    from mtlearn.data.real import dataset_folder

    # load_dataset's `root` is the dataset's own folder; a notebook's data_root holds one per dataset
    folder = dataset_folder(dataset, data_root)
    if not folder.is_dir() or not any(folder.iterdir()):
        folder = folder.absolute()  # a relative data_root is read from the kernel's folder: say which that is
        raise FileNotFoundError(
            f"dataset {dataset!r} was not found in {folder}. Download it first with\n"
            f"    python -m data_fetch {dataset} --dest \"{folder}\"\n"
            f"or run with dataset='synthetic' (the embedded data, no download needed)."
        )
    return folder


@dataclass
class Run:
    """One execution of a notebook: where it writes, on what device, and since when."""

    notebook: str  # the notebook's name, e.g. "01_resformer_mtl"
    profile: str  # "smoke", "course" or "paper": what `pick` chooses by
    dataset: str  # a name of mtlearn.data.DATASETS
    data_root: Path | None  # the dataset's folder (load_dataset's `root`); None for generated data
    seed: int  # seeded into Python, NumPy and torch when the run starts
    device: torch.device  # where models and batches go ("auto" resolved)
    out_dir: Path  # metrics.json and the figures go here
    started: float = field(default_factory=time.perf_counter)  # perf_counter at the start: the wall time
    figures: list[str] = field(default_factory=list)  # file names of the figures saved so far

    def pick(self, **per_profile: Any) -> Any:
        """Choose a setting by profile: `run.pick(smoke=64, course=1200, paper=8000)`."""
        missing = [p for p in PROFILES if p not in per_profile]
        unknown = sorted(set(per_profile) - set(PROFILES))
        if missing or unknown:  # a misspelt profile (papr=) would otherwise only show up as missing, or not at all
            raise ValueError(f"run.pick needs one value per profile {PROFILES}; missing {missing}"
                             + (f", unknown {unknown}" if unknown else ""))
        return per_profile[self.profile]

    def names(self, name: str, value: Any, choices: Sequence[str]) -> list[str]:
        """A knob that lists names (methods, weightings, strategies): a non-empty list of distinct `choices`,
        or a ValueError naming the problem (None too: the parameters cell holds the list itself).

            methods = run.names("methods", methods, A.METHODS)

        Why: a bare string ("ig") would be iterated letter by letter, and an empty list or a typo
        would only fail after the models have trained, in the cell that first uses it.
        """
        choices = tuple(choices)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            hint = f", e.g. [{value!r}] for that one alone" if isinstance(value, str) else ""
            raise ValueError(f"parameter {name} must be a list of names from {choices}{hint}; got {value!r}")
        unknown = [v for v in value if v not in choices]
        repeated = sorted({v for v in value if v in choices and value.count(v) > 1})
        if not value or unknown or repeated:
            problem = "is empty" if not value else f"names unknown {unknown}" if unknown else f"repeats {repeated}"
            raise ValueError(f"parameter {name} {problem}; give a list of distinct names from {choices}")
        return list(value)

    def number(self, name: str, value: Any, *, minimum: float, maximum: float | None = None,
               integer: bool = False, above: bool = False, none: bool = False) -> Any:
        """A fixed-default knob that must be a number in [minimum, maximum] (`above`: > minimum).

            tolerance = run.number("tolerance", tolerance, minimum=0, integer=True)

        integer: a whole number (an int); none: None is allowed (it means a documented default).
        """
        if value is None and none:
            return None
        kind = "an integer" if integer else "a number"
        low = f"> {minimum}" if above else f">= {minimum}"
        wanted = f"{kind} {low}" + (f" and <= {maximum}" if maximum is not None else "") + (" or None" if none else "")
        ok = is_int(value) if integer else is_number(value)
        if ok:
            ok = is_finite(value) and (value > minimum if above else value >= minimum)
            ok = ok and (maximum is None or value <= maximum)
        if not ok:
            hint = _number_hint(value, wants_int=integer)
            raise ValueError(f"parameter {name} must be {wanted}, got {value!r}{hint}")
        return value.item() if isinstance(value, np.generic) else value  # np.int64 from a sweep: a plain int

    def setting(self, name: str, value: Any, *, positive: bool = True, **per_profile: Any) -> Any:
        """A knob of the parameters cell: `value` when it was set, else the profile's default.

            epochs = run.setting("epochs", epochs, smoke=1, course=8, paper=150)

        Why not `epochs or run.pick(...)`: that quietly turns epochs=0 into the default. A set
        value must have the default's type (an int where the default is an int; an int or a float
        where it is a float), be finite if it is a number and, with `positive`, a number > 0;
        anything else is an error naming the parameter.
        """
        default = self.pick(**per_profile)
        if value is None:
            return default
        if isinstance(value, np.generic):  # np.int64(3) from a sweep (np.arange), as seed and run.number take it
            value = value.item()
        kind = type(default)
        accepted = (int, float) if kind is float else (kind,)
        wrong_type = isinstance(value, bool) is not isinstance(default, bool) or not isinstance(value, accepted)
        countable = isinstance(value, (int, float)) and not isinstance(value, bool)  # `positive` means > 0 for these
        if not wrong_type and countable and not is_finite(value):  # inf epochs, NaN lr: never what was meant
            raise ValueError(f"parameter {name} must be finite, got {value!r}")
        if wrong_type or (positive and countable and not value > 0):
            wanted = f"a positive {kind.__name__}" if positive and kind in (int, float) else f"a {kind.__name__}"
            hint = _number_hint(value, wants_int=kind is int) if kind in (int, float) else ""
            raise ValueError(f"parameter {name} must be {wanted} (or None for the {self.profile} profile's "
                             f"{default!r}), got {value!r}{hint}")
        return value

    def seeds(self, count: int, name: str = "num_seeds") -> list[int]:
        """`count` consecutive seeds from the notebook's `seed`: `run.seeds(num_seeds)` -> [seed, seed + 1, ...].

        Why here: every seed must stay below 2**32 (NumPy's limit); a last seed past it would only
        fail once the earlier seeds had trained. `name` is the knob `count` came from, for the message.
        """
        if not is_int(count) or count < 1:
            raise ValueError(f"parameter {name} must be a positive integer, got {count!r}")
        last = self.seed + int(count) - 1
        if last >= 2**32:
            raise ValueError(f"the {count} seeds from seed={self.seed} ({name}) end at {last}, past 2**32 - 1, "
                             f"NumPy's largest seed: take seed <= {2**32 - int(count)}")
        return [self.seed + i for i in range(int(count))]

    def save_figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as `out_dir/<name>.png` (and leave it displayed inline).

        fig: a Figure (an Axes stands for its figure). name: a file name, ".png" optional ("dice_0.5"
        stays whole, not "dice_0"; "roc.pdf" is refused: figures are PNG). Saving a name again (a cell run
        twice) replaces that figure.
        """
        from matplotlib.axes import Axes
        from matplotlib.figure import Figure

        if isinstance(fig, Axes):
            fig = fig.figure
        elif hasattr(fig, "flat") and len(fig.flat) and all(isinstance(a, Axes) for a in fig.flat):
            fig = fig.flat[0].figure  # plt.subplots(1, 2)'s array of Axes stands for its figure too
        if not isinstance(fig, Figure):
            hint = " (plt.subplots() returns (fig, ax): write fig, ax = plt.subplots())" * isinstance(fig, tuple)
            raise ValueError(f"save_figure needs a matplotlib Figure, got {type(fig).__name__}{hint}")
        if not isinstance(name, str):
            raise ValueError(f"figure name must be text such as 'loss_curves', got {name!r}")
        stem = name[:-len(".png")] if name.lower().endswith(".png") else name
        other = Path(stem).suffix.lower()
        if other[1:] in fig.canvas.get_supported_filetypes():  # matplotlib's formats: "a.pdf" was saved as a.pdf.png
            raise ValueError(f"figures are saved as PNG (out_dir/<name>.png); give the name without {other}, "
                             f"e.g. {stem[:-len(other)]!r}, or call fig.savefig yourself for another format")
        # "." and ".." are folders, a name with a NUL or a line break no file: "...png", or PIL's "embedded null byte"
        if (not stem or Path(stem).name != stem or stem.startswith(".") or stem != stem.strip()
                or any(ord(c) < 32 for c in stem)):  # " x ": a file " x .png", where out_dir refuses such spaces
            raise ValueError(f"figure name must be a plain file name such as 'loss_curves', got {name!r} "
                             f"(figures go to out_dir: {self.out_dir})")
        path = self.out_dir / f"{stem}.png"
        rendered = io.BytesIO()
        fig.savefig(rendered, format="png", dpi=110, bbox_inches="tight")
        # atomic, as finish's metrics.json: a failed save (a full disk) keeps the figure saved before, where
        # savefig cut it short; out_dir deleted since start (a clean-up cell) is made again
        with atomic_file(path, binary=True) as f:
            f.write(rendered.getvalue())
        if path.name not in self.figures:
            self.figures.append(path.name)
        return path

    @property
    def wall_time(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write `out_dir/metrics.json` (headline numbers + run facts) and print device and time.

        metrics: {name: number, or a dict of them, ...}; the grid and the course runner read it as such.
        """
        if not isinstance(metrics, Mapping):  # None or a list: the runners' tables failed on it later
            raise ValueError(f"run.finish needs a dict of headline numbers, e.g. {{'dice': 0.9}}, got "
                             f"{type(metrics).__name__}")
        metrics = dict(metrics)  # any Mapping: the JSON writer takes dicts
        written = to_jsonable(metrics, digits=6)
        flatten_metrics(written)  # a name given twice: said now, not by the course's or a grid's table
        record = {
            "notebook": self.notebook,
            "profile": self.profile,
            "dataset": self.dataset,
            "seed": self.seed,
            "device": str(self.device),
            "wall_time_s": round(self.wall_time, 1),
            "figures": self.figures,
            "metrics": written,
        }
        not_finite = _not_finite_names(metrics)
        if not_finite:  # JSON has no NaN: they are written as null, which a table would silently drop
            shown = not_finite if len(not_finite) <= 6 else [*not_finite[:5], f"... {len(not_finite)} in all"]
            warnings.warn(f"metrics {shown} are NaN or inf; metrics.json records them as null", RuntimeWarning,
                          stacklevel=2)
        path = self.out_dir / "metrics.json"
        write_json(record, path)
        print(f"{self.notebook} [{self.profile}] finished on {self.device} in {self.wall_time:.0f} s; "
              f"metrics written to {path}")


def _number_hint(value: Any, wants_int: bool) -> str:
    """The likely fix for a refused number parameter: quotes around it, or a float where an int is due."""
    if isinstance(value, str):
        return "; pass it unquoted"
    if wants_int and isinstance(value, float):
        return "; pass an int, e.g. int(...) of a computed value"
    return ""


def _not_finite_names(value: Any, name: str = "") -> list[str]:
    """Where `value` (a metrics dict) holds NaN or inf: "seg/dice"; inside lists and arrays "curve[3]"."""
    if isinstance(value, dict):
        return [n for key, item in value.items()
                for n in _not_finite_names(item, f"{name}/{key}" if name else str(key))]
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 0:
        value = value.tolist()
    if callable(getattr(value, "to_dict", None)):  # a pandas Series or DataFrame
        return _not_finite_names(value.to_dict(), name)
    if isinstance(value, (list, tuple)):
        return [n for i, item in enumerate(value) for n in _not_finite_names(item, f"{name}[{i}]")]
    return [name] if _not_finite(value) else []


def _not_finite(value: Any) -> bool:
    """True for a NaN or infinite number: a float, a NumPy scalar or a one-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        value = value.item()
    return isinstance(value, float) and not math.isfinite(value)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"seg": {"dice": 0.9}} -> {"seg/dice": 0.9}; lists are left out (one row per run).

    A name reached twice ({"seg": {"dice": 0.1}, "seg/dice": 0.9}) is a ValueError: one value would
    silently replace the other.
    """
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            items = flatten_metrics(value, f"{prefix}{key}/").items()
        elif not isinstance(value, list):
            items = [(f"{prefix}{key}", value)]
        else:
            continue
        for name, number in items:
            if name in flat:
                raise ValueError(f"the metric {name!r} is given twice (nested and as one name with '/'); "
                                 "rename one of them in run.finish")
            flat[name] = number
    return flat


def _folder_parameter(name: str, value, default: str) -> Path | None:
    """A folder parameter as a Path (None stays None); else a ValueError naming it.

    Path("") is ".", the kernel's folder, silently; a stray space makes a folder named "x "; an int
    failed inside pathlib ("expected str, bytes or os.PathLike object").
    """
    if value is None:
        return None
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):  # an int, a list, a bytes path
        raise ValueError(f"{name} must be a folder (a str or a Path), or {default}; got {value!r}")
    if not text.strip() or text != text.strip():
        problem = "is empty" if not text.strip() else "starts or ends with a space"
        raise ValueError(f"{name} {problem} ({value!r}); give a folder, or {default}")
    return Path(text)


def start(
    notebook: str,
    *,
    profile: str | None,
    dataset: str,
    data_root: str | os.PathLike | None,
    seed: int,
    device: str,
    out_dir: str | os.PathLike | None,
    datasets: tuple[str, ...] = ("synthetic",) + REAL_DATASETS,
    verbose: bool = True,
    why: str = "",
) -> Run:
    """Check a notebook's parameters, seed, pick the device and create `out_dir`; see module doc.

    datasets: those the notebook takes; why: the reason, said when another one is asked for."""
    profile = resolve_profile(profile)
    data_root = _folder_parameter("data_root", data_root, "None for $MTLEARN_DATA or the user cache")
    out_dir = _folder_parameter("out_dir", out_dir, "None for outputs/<notebook>/<profile>")
    root = check_dataset(dataset, data_root, datasets, why)
    seed_everything(seed)
    resolved = pick_device(device)
    out = out_dir.expanduser() if out_dir is not None else Path("outputs") / notebook / profile
    check_folder(out, "out_dir", "metrics.json and the figures")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # no permission, a read-only disk, a place the system keeps (/proc)
        raise OSError(error.errno, f"out_dir {out} cannot be created ({error.strerror or error}); choose another "
                      "out_dir, one you can write to (it receives metrics.json and the figures)") from None
    earlier = set_aside_earlier_run(out)
    run = Run(notebook, profile, dataset, root, int(seed), resolved, out)
    if profile == "paper" and resolved.type == "cpu":  # before hours of work, not after
        warnings.warn(PAPER_ON_CPU, stacklevel=2)
    if verbose:
        env = environment_report(resolved)
        print(f"{notebook}: profile={profile} dataset={dataset} seed={seed} out_dir={out}")
        print(" | ".join(f"{k} {v}" for k, v in env.items()))
        if earlier:
            print(earlier)
    return run


def set_aside_earlier_run(out: Path) -> str:
    """Move an earlier run's metrics.json and the figures it lists from `out` into `out/previous/`, in place
    of the run set aside there before (its metrics.json and figures; other files there stay); what was
    moved, as a line to print, or "" when `out` holds no earlier run.

    Without it a run with other parameters (in Jupyter, a new seed shares the default out_dir) left the
    earlier run's figures beside its own, and a run that failed left the earlier metrics.json looking current.
    Only files the earlier run recorded as its own move; anything else in `out` stays where it is."""
    record = out / "metrics.json"
    if not record.is_file():
        return ""
    try:
        earlier = json.loads(record.read_text(encoding="utf-8"))
        facts = ", ".join(f"{k} {earlier[k]}" for k in ("profile", "dataset", "seed") if k in earlier)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        facts = "its metrics.json unreadable"
    previous = out / "previous"
    try:
        if previous.is_dir():
            for name in [*_own_figures(previous / "metrics.json"), "metrics.json"]:
                (previous / name).unlink(missing_ok=True)
        else:
            previous.mkdir()
        figures = [name for name in _own_figures(record) if (out / name).is_file()]
        for name in figures:
            os.replace(out / name, previous / name)
        os.replace(record, previous / "metrics.json")
    except OSError as error:
        raise OSError(error.errno, f"out_dir {out} holds an earlier run, which could not be moved into {previous} "
                      f"({error.strerror or error}); remove that folder, or give another out_dir") from None
    return (f"out_dir held an earlier run ({facts or 'not a run of a course notebook'}): its metrics.json and "
            f"{len(figures)} figure(s) moved to {previous}, in place of the run kept there before (give another "
            "out_dir to keep runs side by side)")


def _own_figures(record: Path) -> list[str]:
    """The figures a run's metrics.json lists as its own: plain PNG file names only, so that a hand-edited
    record cannot make files elsewhere move ([] when the record cannot be read)."""
    try:
        figures = json.loads(record.read_text(encoding="utf-8")).get("figures", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    if not isinstance(figures, list):
        return []
    return [name for name in figures if isinstance(name, str) and name == Path(name).name and name.endswith(".png")]
