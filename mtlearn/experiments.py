r"""Grids of notebook runs through papermill: notebooks x parameters x seeds, resumable.

    python -m mtlearn.experiments --notebooks 01 02 --seeds 0 1 --profile smoke --out outputs/grid
    python -m mtlearn.experiments --notebooks 02 --seeds 0 1 2 --set "weightings=['fixed'],['pcgrad']" \
        --set num_seeds=1

`--set NAME=V1,V2` sweeps a parameter of the notebook's `parameters` cell (a name the notebook does
not have is an error, not a silently ignored value); the values are Python literals, and text where
the notebook has a list, a number or a switch is refused before the first run (a parameter whose
default is None, "the profile's value", is checked by the notebook itself, in each run).

Each run gets its own folder, named after its parameters. A run whose folder holds the `done`
marker of a successful run with the same parameters (those papermill recorded in its executed
notebook) is skipped, so an interrupted grid picks up where it stopped and a finished grid does no
work; a run whose notebook's code cells have been edited since (its parameters cell included) is
done again, as a run of the new code. A failing run is recorded (`error.txt` beside the executed
notebook, in the run's `.partial` folder; an earlier successful run stays as it was) and the grid
goes on. `collect(out_root, specs)` reads the grid's finished runs into one table.
"""

from __future__ import annotations

import argparse
import ast
import io
import itertools
import json
import os
import sys
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtlearn.course import (CELL_TIMEOUT_S, DONE, check_staging_fits, course_notebooks, injected_parameters,
                            resolve_cell_timeout, run_notebook, select_notebooks)
from mtlearn.notebook import flatten_metrics, resolve_profile
from mtlearn.utils import (check_folder, check_number, home_expanded, is_finite, is_int, printable_stdout,
                           sigterm_as_interrupt, stop_status, write_text)


UNSAFE_IN_NAMES = str.maketrans({c: "_" for c in '/\\:*?"<>|'})  # separators, and what Windows refuses


def _label(name: str, value: Any) -> str:
    """`name=value` as it appears in a run's folder name: a value holding a path must not nest folders,
    and ':' '*' '?' ... cannot be in a folder's name on Windows."""
    return f"{name}={value}".translate(UNSAFE_IN_NAMES)


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a notebook and the parameters papermill injects."""

    notebook: Path
    parameters: tuple[tuple[str, Any], ...]  # sorted (name, value) pairs, hashable

    @property
    def name(self) -> str:
        """Folder name: every injected parameter, sorted, e.g. `profile=course,seed=1,weightings=['pcgrad']`."""
        return ",".join(_label(k, v) for k, v in self.parameters) or "default"

    def folder(self, out_root: Path) -> Path:
        return Path(out_root) / self.notebook.stem / self.name

    def is_complete(self, out_root: Path) -> bool:
        """True when the folder holds a finished run (see `_finished`) with these parameters: the ones papermill
        recorded in the executed notebook. The folder name alone does not tell: "a/b" and "a_b" share one, and
        so do "PCGrad" and "pcgrad" on a file system blind to case (two grids run into one out_root)."""
        return self.record(out_root) is not None

    def record(self, out_root: Path) -> dict | None:
        """The metrics.json record of this spec's finished run (see `is_complete`), None when there is none."""
        folder = self.folder(out_root)
        recorded = _recorded(folder)
        if recorded is None or any(recorded.get(k, v) != v for k, v in self.parameters
                                   if k in ("profile", "seed", "dataset")):  # what the notebook says it ran
            return None
        try:
            executed = json.loads((folder / self.notebook.name).read_text(encoding="utf-8"))
            injected = executed["metadata"]["papermill"]["parameters"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            return None  # no executed notebook, or not papermill's: not known to be this run
        given = dict(self.parameters)
        if not isinstance(injected, dict) or any(k not in injected for k in given):
            return None
        for k, v in injected_parameters(given).items():
            if k == "data_root" and _same_relative_path(given[k], injected[k]):
                continue  # made absolute where the grid ran: the same folder seen from another one
            if _as_json(injected[k]) != _as_json(v):
                return None
        return recorded

    def code_changed(self, out_root: Path) -> bool:
        """True when the notebook's code cells (its parameters cell included; comments and blank lines aside)
        differ from those of the run executed in this spec's folder: the run is of older code. False when
        either cannot be read."""
        try:
            executed = json.loads((self.folder(out_root) / self.notebook.name).read_text(encoding="utf-8"))
            current = json.loads(self.notebook.read_text(encoding="utf-8"))
            return _code_cells(executed) != _code_cells(current)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return False


def _code_cells(notebook: dict) -> list[list[str]]:
    """The code of each code cell, comments and blank lines left out (an added comment is no reason to run a grid
    again), leaving out the cell papermill injects (tag injected-parameters)."""
    return [_code(cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"]))
            for cell in notebook["cells"] if cell["cell_type"] == "code"
            and "injected-parameters" not in cell.get("metadata", {}).get("tags", [])]


def _code(source: str) -> list[str]:
    """Python's tokens of `source` without comments and line breaks that end no statement; a cell Python cannot
    tokenize (IPython's `!pip` or `%magic` lines) as its lines, stripped, without blank ones."""
    try:
        # a statement's end is "\n", or "" at the end of a cell without a final line break: the same end
        return ["\n" if token.type == tokenize.NEWLINE else token.string
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING)]
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        return [line.strip() for line in source.splitlines() if line.strip()]


def _as_json(value: Any) -> str:
    """`value` as JSON text, as papermill recorded it: a tuple as a list, a NumPy number as a Python one, a path
    as its text; NaN equals itself there."""
    return json.dumps(value, sort_keys=True, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))


def _same_relative_path(given: Any, recorded: Any) -> bool:
    """True when `given` is a relative path, the `recorded` absolute one ends with it, and `given` does not
    name another existing folder from here: `data` seen from a sub-folder is the run's data, but from
    another course folder that has its own `data` it is other data, and the run is not this one."""
    if not isinstance(given, (str, Path)) or not isinstance(recorded, str) or not str(given):
        return False
    relative = Path(given).expanduser()
    parts = relative.parts
    if relative.is_absolute() or Path(recorded).parts[-len(parts):] != parts:
        return False
    here = relative.absolute()
    return not here.exists() or here == Path(recorded)


def _recorded(folder: Path) -> dict | None:
    """A finished run's metrics.json record; None when the run is not finished or its file is damaged
    (a `done` beside a half-written or hand-edited metrics.json: the run is done again)."""
    if not _finished(folder):
        return None
    try:
        record = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    # "metrics": null or a list (edited by hand): damaged too, or every later collect() would fail on it
    return record if isinstance(record, dict) and isinstance(record.get("metrics", {}), dict) else None


def _finished(folder: Path) -> bool:
    """A run that succeeded: its `done` marker, which run_notebook writes into the staging folder
    after the notebook's last save and metrics.json, just before moving it into place (a failed
    run stays in `<folder>.partial` with its error.txt).

    Why not just metrics.json: a notebook writes it in run.finish, so a run that failed or was
    interrupted after that has one too. Runs from before the marker existed rerun once.
    """
    return (folder / DONE).exists()


# Parameters the grid sets itself: a swept value would be silently replaced (or nest folders).
GRID_PARAMETERS = {"seed": "give the seeds as seeds=[...] (--seeds)", "profile": "give it as profile= (--profile)",
                   "out_dir": "the grid chooses each run's folder under its out_root (--out)"}


def _injectable(value: Any, where: str) -> Any:
    """`value` as papermill can write it into a notebook: None, bools, numbers, strings, lists, dicts.

    Why: papermill writes any other value as its text, so a tuple (64, 64) would reach the notebook as
    the string "(64, 64)", a NumPy seed np.int64(3) as "3" and a set as "{1, 2}". Tuples become lists
    and NumPy numbers and arrays Python ones (what the notebook would get from a literal); anything
    else is refused here, before the first run, not in every run's kernel.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_injectable(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _injectable(v, where) for k, v in value.items()}
    raise ValueError(f"{where}: {value!r} ({type(value).__name__}) cannot be passed to a notebook, which takes "
                     "None, True/False, numbers, strings, lists and dicts with string keys (papermill would write "
                     "it as text); give it as one of those, e.g. a list for a set")


def grid(notebooks: list[str | Path] | str | Path, parameters: dict[str, list[Any]], seeds: list[int],
         profile: str) -> list[RunSpec]:
    """Every combination of notebook, parameter values and seed, in a stable order: notebook by notebook;
    within one, the parameters' values with the names sorted (the first name changes slowest), then the seeds.

    notebooks: the notebooks' paths, e.g. [Path("notebooks/02_loss_weighting.ipynb")]; one path is one notebook.
    parameters: name -> a list of the values to sweep, e.g. {"lr": [1e-3, 1e-4]}; one value is [1e-3].
    The notebooks receive tuples as lists and NumPy numbers as Python ones (see _injectable).
    """
    if isinstance(notebooks, (str, os.PathLike)):  # one notebook: iterated, a path would be its letters
        notebooks = [notebooks]
    if not notebooks:
        raise ValueError("the grid needs at least one notebook")
    _check_notebook_paths(notebooks)
    stems = [Path(nb).stem.casefold() for nb in notebooks]  # its runs' folders are out_root/<stem>/...
    if len(set(stems)) != len(stems):
        twice = sorted({str(nb) for nb, stem in zip(notebooks, stems) if stems.count(stem) > 1})
        raise ValueError(f"notebooks {twice} share a name, so their runs would share folders (out_root/<name>/...) "
                         "and one would be taken for the other; give each notebook once")
    profile = resolve_profile(profile)  # now: in every run's kernel a wrong one would fail without a cell timeout
    if isinstance(seeds, np.ndarray):  # np.arange(3): a one-item array's truth would be its value
        seeds = seeds.tolist()
    if not isinstance(seeds, (list, tuple, range)):
        raise ValueError(f"seeds must be a list of integers, e.g. seeds=[0, 1], got {seeds!r}")
    if not seeds:
        raise ValueError("the grid needs at least one seed, e.g. seeds=[0]")
    bad = [s for s in seeds if not is_int(s) or not 0 <= s < 2**32]
    if bad:  # now, not in every run's kernel (seed_everything's range: NumPy's seeds are 32-bit)
        raise ValueError(f"seeds must be integers in 0..2**32 - 1, got {bad}")
    seeds = [int(s) for s in seeds]  # np.int64 would reach the notebook as the text "3"
    if len(set(seeds)) != len(seeds):  # one run counted twice: a mean of n, a std of 0 for nothing
        raise ValueError(f"seeds repeat: {sorted(s for s in set(seeds) if list(seeds).count(s) > 1)}; give each once")
    parameters = dict(parameters)  # the values made injectable below; the caller's dict stays as it was
    for name, values in list(parameters.items()):
        if name in GRID_PARAMETERS:
            raise ValueError(f"parameter {name!r} is set by the grid, not swept: {GRID_PARAMETERS[name]}")
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"parameter {name!r} needs a list of values to sweep, got {values!r}; "
                             f"write {{{name!r}: [{values!r}]}} for one value")
        if not values:
            raise ValueError(f"parameter {name!r} has no values, so the grid would have no runs; "
                             f"give at least one, e.g. {{{name!r}: [value]}}")
        parameters[name] = values = [_injectable(v, f"a value of parameter {name!r}") for v in values]
        # values may be lists, which do not hash; 1 and 1.0 (or 0.0 and -0.0) are equal, printed apart
        repeated = [v for i, v in enumerate(values) if any(_same(v, w) for w in values[:i])]
        if repeated:
            raise ValueError(f"parameter {name!r} repeats a value ({repeated}); give each once: the same run "
                             "would count twice")
        # 1 and "1", "a/b" and "a_b", or (on macOS and Windows) "PCGrad" and "pcgrad" would share a folder
        labels = [_label(name, v).casefold() for v in values]
        if len(set(labels)) != len(labels):
            clash = [v for v, label in zip(values, labels) if labels.count(label) > 1]
            raise ValueError(f"values {clash} of parameter {name!r} would share one run folder "
                             f"({_label(name, clash[0])}), so one run would be taken for the other; give values "
                             "that print differently")
    names = sorted(parameters)
    for nb in notebooks:
        _check_parameters(Path(nb), parameters)
    specs = []
    for nb in notebooks:
        for values in itertools.product(*(parameters[n] for n in names)):
            for seed in seeds:
                params = dict(zip(names, values), seed=seed, profile=profile)
                specs.append(RunSpec(Path(nb), tuple(sorted(params.items()))))
    for spec in specs:  # the folder and its staging twin must be names the file system takes
        if spec.name.endswith((".partial", ".old", ".lock")):  # another run's staging, set-aside or lock folder
            last = spec.parameters[-1][0]  # the folder name lists the parameters sorted by name
            raise ValueError(f"the run folder {spec.name!r} would end like another run's staging, set-aside or lock "
                             f"folder (.partial, .old, .lock), and that run would delete or block it; give {last!r} "
                             "a value that does not end so")
        check_staging_fits(spec.name, "the run folder", "sweep fewer or shorter values per parameter (e.g. one run "
                           "per weighting, not lists of five)")
    folders = [str(spec.folder(Path("."))).casefold() for spec in specs]  # as case-blind file systems see them
    shared = sorted({f for f in folders if folders.count(f) > 1})
    if shared:  # values that print like ",name=...": two runs of one name, one taken for the other
        raise ValueError(f"two runs of the grid would share the folder {shared[0]!r}; give values that do not "
                         "hold ',' or '=' in their text")
    return specs


def _check_notebook_paths(notebooks: list) -> None:
    """Raise ValueError unless every notebook is the path of a file.

    Why: a missing one failed only in papermill, as FileNotFoundError '02' after a warning about its extension,
    and "02" is how the command line names a notebook (--notebooks 02), not how grid() does.
    """
    not_paths = [nb for nb in notebooks if not isinstance(nb, (str, os.PathLike))]
    if not_paths:  # Path(2) is a TypeError deep inside pathlib
        raise ValueError(f"notebooks must be paths of notebooks, e.g. [Path('notebooks/02_loss_weighting.ipynb')], "
                         f"got {not_paths}; mtlearn.course.course_notebooks() lists the course's")
    missing = [str(nb) for nb in notebooks if not Path(nb).is_file()]
    if not missing:
        return
    try:  # the course notebook a number or a name stands for, as --notebooks 02 finds it
        available = course_notebooks()
    except FileNotFoundError:
        available = []
    first = Path(missing[0])
    matches, _ = select_notebooks(available, [first.stem]) if first.stem else ([], [])
    example = str(matches[0]) if len(matches) == 1 else "notebooks/02_loss_weighting.ipynb"
    raise ValueError(f"notebooks {missing} are not notebook files (no such file, or a folder); give each one's "
                     f"path, e.g. {example!r}; mtlearn.course.course_notebooks() lists the course's")


def _same(a: Any, b: Any) -> bool:
    """Whether two injectable values are one value to a notebook: equal (1 == 1.0, [1] == [1.0]) and
    not merely True == 1 (a switch and a count)."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return type(a) is type(b) and a == b if isinstance(a, (list, dict)) else a == b


def _check_parameters(notebook: Path, parameters: dict[str, list[Any]]) -> None:
    """Raise ValueError if `notebook`'s parameters cell lacks a swept name, or a value has the wrong kind.

    Why: papermill only logs a warning for an unknown parameter and runs the notebook with its
    defaults, so a misspelt name would give a grid of identical runs with different labels. And a
    string where the notebook has a list ("pcgrad" for ["pcgrad"]) would fail in every run, after
    the first had already started; a number or a switch given as text, too, and NaN or inf for a number.
    """
    import papermill

    try:
        known = papermill.inspect_notebook(str(notebook))
    except Exception as error:  # nbformat's NotJSONError named no file: with --notebooks 0, which one?
        raise ValueError(f"cannot read the notebook {notebook}: {type(error).__name__}: {str(error)[:200]}; is it a "
                         "notebook (.ipynb), and whole (a merge conflict, a half-written copy)?") from None
    unknown = [name for name in parameters if name not in known]
    if unknown:
        raise ValueError(f"{notebook.stem} has no parameter {unknown}; its parameters: {sorted(known)}")
    for name, values in parameters.items():
        try:
            default = ast.literal_eval(known[name]["default"])
        except (ValueError, SyntaxError):
            continue  # an expression, not a literal: nothing to compare with
        # only what cannot be meant: text where the notebook has a list or a number/switch (None, a
        # tuple for an int image size, numpy numbers: all may be fine, the notebook checks them itself)
        if isinstance(default, (list, tuple)):
            kind, example = "a list", "['a'],['b']"
        elif isinstance(default, (bool, int, float)):
            kind, example = ("True or False", "True,False") if isinstance(default, bool) else ("a number", "1,2")
        else:
            continue
        wrong = [v for v in values if isinstance(v, str)]
        if not isinstance(default, (list, tuple, bool)):  # a number: NaN or inf (1e400 as typed) sets nothing
            wrong += [v for v in values if isinstance(v, (float, np.floating)) and not is_finite(v)]
        if wrong:
            got = f"{wrong[0]!r} is text" if isinstance(wrong[0], str) else f"got {wrong[0]!r}"
            raise ValueError(f"{notebook.stem}'s parameter {name!r} takes {kind} (its default: {default!r}); "
                             f"{got}. Give one such value per run, e.g. --set \"{name}={example}\"")


def run_grid(specs: list[RunSpec], out_root: str | Path, *, progress: bool = True,
             cell_timeout: float | None | str = "auto") -> pd.DataFrame:
    """Run every spec not yet complete; return a status table (one row per run): "ok", "skipped (done)",
    "ok (again: the notebook's code had changed)" for a finished run whose notebook was edited since
    (an edited default in its parameters cell included), "failed: <error>" (error.txt beside it), or
    "running elsewhere: <holder>" for a run another grid is writing at that moment (the same grid
    started twice): not run here, and not a failure.

    cell_timeout: seconds one cell may run before its run is stopped as failed (a kernel whose reply
    was lost would otherwise hang the whole grid); "auto": the course runner's default for each
    run's profile (CELL_TIMEOUT_S: an hour, none for paper); None: no limit.
    """
    from tqdm.auto import tqdm

    if cell_timeout != "auto" and cell_timeout is not None:  # once, before the first run (a finished grid too)
        if isinstance(cell_timeout, str):
            raise ValueError(f"cell_timeout must be 'auto', None (no limit) or seconds > 0, got {cell_timeout!r}")
        check_number("cell_timeout", cell_timeout, 0, above=True, advice="seconds; None: no limit, 'auto': the "
                     "profile's default")
    out_root = Path(out_root).expanduser()  # as run_notebook takes it: else "~/exp" never counted as done
    rows = []
    for spec in tqdm(specs, desc="experiment grid", unit="run", disable=not progress):
        folder = spec.folder(out_root)
        done = spec.is_complete(out_root)
        if done and not spec.code_changed(out_root):
            rows.append({"notebook": spec.notebook.stem, "run": spec.name, "status": "skipped (done)", "seconds": 0.0})
            continue
        timeout = CELL_TIMEOUT_S.get(dict(spec.parameters)["profile"]) if cell_timeout == "auto" else cell_timeout
        result = run_notebook(spec.notebook, folder, dict(spec.parameters), cell_timeout=timeout)
        if not result.ok and result.out_dir.is_dir():  # the failed run's staging folder (`folder` keeps any
            # earlier run); not there when it could not be made, and the error says why
            # UTF-8, not the locale's: Windows' cp1252 cannot write a path or message in another script,
            # and the UnicodeEncodeError ended the whole grid; nor may a full disk (when runs fail), which the
            # status row then says
            try:
                (result.out_dir / "error.txt").write_text(result.error + "\n", encoding="utf-8")
            except OSError as error:
                result.error += f" (error.txt not written: {error.strerror or error})"
        # another grid writing the same run (the same command twice): not a failure, and no error.txt of its own
        status = ("ok (again: the notebook's code had changed)" if result.ok and done else "ok" if result.ok
                  else f"running elsewhere: {result.error}" if result.busy else f"failed: {result.error}")
        rows.append({"notebook": spec.notebook.stem, "run": spec.name, "status": status,
                     "seconds": round(result.seconds, 1)})
    return pd.DataFrame(rows, columns=["notebook", "run", "status", "seconds"])


def collect(out_root: str | Path, specs: list[RunSpec] | None = None) -> pd.DataFrame:
    """The finished runs under `out_root`, one row each: notebook, run, what metrics.json records of
    the run (profile, seed, dataset, device, wall_time_s), the swept parameters and the flat metrics.

    specs: only these runs (pass the grid's specs), so runs of an earlier grid with other values or
    another profile in the same folder stay out of the table; each swept parameter is a column (a
    list or dict value as its text, e.g. "['pcgrad']", so that the table can be grouped by it).
    None: every finished run there, without the swept parameters (the folder name, column "run",
    holds them). A metric named like one of the other columns is put under "metrics/<name>".
    An out_root that is not a folder is an error; a folder with no finished run gives an empty table.
    """
    out_root = Path(out_root).expanduser()
    if not out_root.is_dir():  # a typo gave an empty table, and only summarise said something: "available: []"
        raise ValueError(f"out_root {out_root} {'is a file' if out_root.exists() else 'does not exist'}; give the "
                         "folder run_grid wrote the runs to (its out_root; --out on the command line)")
    if specs is None:  # staging (.partial) and set-aside (.old) folders are not runs
        runs = [(m.parent, None, _recorded(m.parent)) for m in sorted(out_root.glob(f"*/*/{DONE}"))
                if not m.parent.name.endswith((".partial", ".old"))]
    else:  # only runs of the spec's parameters (a copied-in folder, or another grid's, may hold others)
        runs = [(spec.folder(out_root), spec, spec.record(out_root)) for spec in specs]
    unread = [folder.name for folder, _, record in runs if record is None]
    if unread:  # a run not (yet) finished, failed, or with a damaged metrics.json: left out, but not silently
        shown = f"{unread[:3]}{' ...' if len(unread) > 3 else ''}"
        warnings.warn(f"{len(unread)} of {len(runs)} runs have no finished, readable result and are not in the table "
                      f"(not run yet, failed, or a damaged metrics.json): {shown}; run the grid again (the same "
                      "command, or run_grid) to run them",
                      stacklevel=2)
    older = [folder.name for folder, spec, record in runs
             if record is not None and spec is not None and spec.code_changed(out_root)]
    if older:  # in the table, but not the current notebook's results (an edit since, or a re-run that failed)
        shown = f"{older[:3]}{' ...' if len(older) > 3 else ''}"
        warnings.warn(f"{len(older)} of {len(runs)} runs in the table were made by an earlier version of their "
                      f"notebook's code: {shown}; run the grid again (the same command, or run_grid) to replace "
                      "them with runs of the current code",
                      stacklevel=2)
    rows, averaged = [], {}
    for folder, spec, record in runs:
        if record is None:
            continue
        seeds = record.get("metrics", {}).get("seeds") if isinstance(record.get("metrics"), dict) else None
        if isinstance(seeds, list) and len(seeds) > 1:  # a run that averages several seeds (notebook 02's num_seeds)
            averaged[folder.name] = seeds
        row = {"notebook": record.get("notebook", folder.parent.name), "run": folder.name}
        row.update({k: record.get(k) for k in ("profile", "seed", "dataset", "device", "wall_time_s")})
        if spec is not None:
            row.update({k: v if not isinstance(v, (list, dict)) else str(v)
                        for k, v in spec.parameters if k not in row})
        try:
            metrics = flatten_metrics(record.get("metrics", {}))
        except ValueError as error:
            raise ValueError(f"{folder / 'metrics.json'}: {error}") from None
        row.update({(k if k not in row else f"metrics/{k}"): v for k, v in metrics.items()})
        rows.append(row)
    shared = sorted({s for a, b in itertools.combinations(averaged.values(), 2) for s in set(a) & set(b)})
    if shared:  # grid seeds 0, 1, 2 of runs of 3 seeds each: {0,1,2}, {1,2,3}, {2,3,4}, not three seeds
        shown = dict(list(averaged.items())[:3])
        warnings.warn(f"runs average overlapping seeds {shared} (e.g. {shown}): their results share runs and are not "
                      "independent, so a spread across them is not one across seeds; give each run one seed (notebook "
                      "02: num_seeds=1 in the grid's values) and let the grid's seeds vary", stacklevel=2)
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, by: str | list[str], metrics: str | list[str]) -> pd.DataFrame:
    """Mean and sample standard deviation (n - 1) of `metrics` across seeds for each group in `by` (a name or
    a list). A group holding two runs of one seed (another swept value pooled) is warned about.

    Runs without a value of a metric (NaN: undefined for that run, e.g. an AUC on a validation set of
    one class, or not recorded) are left out of its mean and standard deviation, with a warning;
    "count" is how many runs each figure is of.
    """
    by = [by] if isinstance(by, str) else list(by)  # list("weighting") would be its letters
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not by:  # pandas: "No group keys passed!"
        raise ValueError("summarise needs a column to group the runs by, e.g. by='weighting'")
    if not metrics:  # pandas: "No objects to concatenate"
        raise ValueError("summarise needs at least one metric column, e.g. metrics=['delta_m']")
    _check_columns(table, [*by, *metrics])
    _check_numeric(table, metrics)
    empty = {m: int(table[m].isna().sum()) for m in metrics}
    said = [f"{n} of {len(table)} runs have no {m}" for m, n in empty.items() if n]
    if said:  # a mean of the runs that worked read like a mean of all of them
        warnings.warn(f"{'; '.join(said)} (NaN: undefined for that run, or not recorded); the mean and std are of "
                      "the other runs, and the 'count' column says how many", stacklevel=2)
    if "seed" in table.columns and "seed" not in by:  # the spread is meant to be across seeds
        repeated = [group[0] if len(by) == 1 else group  # pandas gives one-column groups as 1-tuples
                    for group, seeds in table.groupby(by, dropna=False)["seed"] if seeds.duplicated().any()]
        if repeated:  # two learning rates x three seeds read as six seeds: std and count of a mixture
            shown = f"{repeated[:3]}{' ...' if len(repeated) > 3 else ''}"
            warnings.warn(f"group(s) {shown} hold several runs of one seed: a parameter that differs between them "
                          f"(another swept value) is pooled as if it were a seed, so the std and count are not "
                          f"across seeds; add it to by (now {by})", stacklevel=2)
    # dropna=False: a run whose group could not be read (NaN) stays in the table, under NaN
    return table.groupby(by, dropna=False)[metrics].agg(["mean", "std", "count"])


def plot_spread(table: pd.DataFrame, by: str | list[str], metric: str | list[str], title: str = "",
                ylabel: str | None = None):
    """Each run as a dot and the mean per group as a short line: the spread across seeds at a glance.

    With a few seeds a bar up to the mean would describe no run; the dots are the runs, the line
    only marks their mean. A group's dots are set side by side (deterministically, in table order:
    when every group holds the same seeds, listed seed by seed, a seed sits at the same place in
    every group), so equal values do not hide each other. Runs without a value (NaN) are counted at
    the foot of their group ("1 of 3: no value"); its line is the mean of the others.
    by, metric: one column each, a name or a one-item list (as summarise takes them).
    ylabel: the y-axis label; default `metric`, "Δm (%)" for "delta_m" (weighting.delta_m is in percent).
    """
    import matplotlib.pyplot as plt

    by, metric = _one_column("by", by, "weighting"), _one_column("metric", metric, "delta_m")
    _check_columns(table, [by, metric])
    _check_numeric(table, [metric])
    # in table order; a run whose group is missing (NaN, never equal to itself) is its own "nan" group
    # (iterated, not list(): pandas 2 takes its len(), which fails for a NaN group with "Categorical categories
    # cannot be null")
    grouped = [(group, column) for group, column in table.groupby(by, sort=False, dropna=False)[metric]]
    groups = [group for group, _ in grouped]
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 3.5, 3.2))
    means = 0  # mean lines drawn: the first one names the line in the legend
    for i, (_, column) in enumerate(grouped):
        values = column.to_numpy(dtype=float)
        offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
        ax.scatter(i + offsets, values, color="tab:blue", zorder=3, s=16, label="a run (seed)" if i == 0 else None)
        finite = np.isfinite(values)
        if finite.any():  # a group of failed runs (NaN) has no mean
            ax.hlines(values[finite].mean(), i - 0.28, i + 0.28, color="black", lw=1.8, zorder=2,
                      label="mean of the runs" if means == 0 else None)
            means += 1
            if not finite.all():  # the mean of the others: say so where the missing dots would be
                ax.text(i, 0.02, f"{(~finite).sum()} of {len(values)}:\nno value", transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=7, color="tab:red")
        else:  # said where its dots would be, rather than a blank column
            ax.text(i, 0.5, f"{len(values)} run(s),\nno value", transform=ax.get_xaxis_transform(), ha="center",
                    va="center", fontsize=8, color="tab:red")
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=30, ha="right")
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_xlabel(by)
    ax.set_ylabel(ylabel or ("Δm (%)" if metric == "delta_m" else metric))
    ax.set_title(title or f"{metric} by {by} (dots: seeds, line: mean)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, off the dots
    fig.tight_layout()
    return fig


def _one_column(argument: str, name: str | list[str], example: str) -> str:
    """The column `name` names: a name, or a list of one as summarise takes it (a list was a TypeError,
    "unhashable type: 'list'"); one axis shows one column."""
    if isinstance(name, (list, tuple)) and len(name) == 1:
        return name[0]
    if isinstance(name, (list, tuple)):
        raise ValueError(f"plot_spread draws one column per axis; give {argument} one name, e.g. {example!r}, got "
                         f"{list(name)} (summarise groups by several)")
    return name


def _check_columns(table: pd.DataFrame, columns: list[str]) -> None:
    """Raise ValueError naming the columns the table lacks (pandas says only KeyError 'nope')."""
    missing = [c for c in columns if c not in table.columns]
    if missing and table.columns.empty:  # collect found no finished run: its table has no columns at all
        raise ValueError(f"columns {missing} are not in the table: it is empty (collect found no finished run); "
                         "run the grid first, or check the folder given to collect")
    if missing:
        raise ValueError(f"columns {missing} are not in the table; available: {list(table.columns)}")


def _check_numeric(table: pd.DataFrame, metrics: list[str]) -> None:
    """Refuse metric columns that hold text (a mean of them fails deep inside pandas)."""
    text = [m for m in metrics if not pd.api.types.is_numeric_dtype(table[m]) and not table[m].isna().all()]
    if text:
        raise ValueError(f"columns {text} do not hold numbers (e.g. {table[text[0]].dropna().iloc[0]!r}); "
                         "summarise and plot the numeric metrics, group by the others")


def _parse_set(text: str) -> tuple[str, list[Any]]:
    """`name=v1,v2` -> ("name", [v1, v2]): Python literals, else plain strings.

    "lr=1e-3,1e-4" -> [0.001, 0.0001]; "size=(64,64),(96,96)" -> [(64, 64), (96, 96)] (lists in the notebook);
    "weightings=['fixed'],['pcgrad']" -> [["fixed"], ["pcgrad"]]; "dataset=busi,synthetic" -> strings.
    """
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects name=value[,value...], got {text!r}")
    name, values = text.split("=", 1)
    if not name.strip() or not values.strip():
        raise argparse.ArgumentTypeError(f"--set {text!r} needs a name and at least one value, "
                                         "e.g. --set num_seeds=1 or --set lr=1e-3,1e-4")
    try:  # the whole list at once, so commas inside tuples and lists stay where they are
        return name.strip(), list(ast.literal_eval(f"[{values}]"))
    except (ValueError, SyntaxError):
        pass

    def literal(v: str) -> Any:
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            # meant as a literal (a tuple, a list, a quoted string) but malformed
            if v.strip()[:1] and v.strip()[0] in "([{'\"":
                message = (f"--set {text!r}: {v!r} is not a valid Python literal; check its brackets, and quote "
                           "the strings inside (['fixed'], not [fixed])")
                raise argparse.ArgumentTypeError(message) from None
            return v

    pieces = [v.strip() for v in values.split(",")]  # "busi, synthetic": no ' synthetic'
    if "" in pieces[:-1]:  # "a,,b": a run with the value "" (a last comma is allowed, as in [1, 2,] above)
        raise argparse.ArgumentTypeError(f"--set {text!r} has an empty value between two commas; give each value "
                                         "once, e.g. --set dataset=busi,synthetic ('' for an empty text)")
    return name.strip(), [literal(v) for v in pieces if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlearn.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", nargs="+", required=True, metavar="NN", help="notebook numbers or names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to run (default: 0)")
    # as python -m mtlearn.course and the notebooks: a smoke default made tables of untrained models look real
    parser.add_argument("--profile", default=None,
                        help="smoke | course | paper (default: $MTLEARN_PROFILE, else course)")
    parser.add_argument("--set", dest="sets", action="append", type=_parse_set, default=[],
                        metavar="NAME=V1,V2", help="a notebook parameter and the values to sweep")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "experiments",
                        help="folder of the runs and results.csv (default: outputs/experiments)")
    parser.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a run whose cell runs longer than this (default: 3600, none for the paper "
                             "profile; 0: no limit)")
    args = parser.parse_args(argv)
    printable_stdout()
    try:
        profile = resolve_profile(args.profile, name="--profile")
        cell_timeout = resolve_cell_timeout(args.cell_timeout, profile)  # every run of a grid has its profile
    except ValueError as error:
        parser.error(str(error))
    try:
        available = course_notebooks()
    except FileNotFoundError as error:
        parser.error(str(error))
    notebooks, unmatched = select_notebooks(available, args.notebooks)
    if unmatched:  # else `--notebooks 02 20` ran 02 alone and said nothing of 20
        parser.error(f"no notebook in {available[0].parent} matches {unmatched}; available: "
                     f"{[nb.stem for nb in available]}")
    names = [name for name, _ in args.sets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # dict() would keep the last one silently
        parser.error(f"--set {', '.join(repeated)} given more than once; list the values in one --set, "
                     "e.g. --set lr=1e-3,1e-4")
    try:
        args.out = home_expanded(args.out, "--out")
        check_folder(args.out, "--out", "one folder per run and results.csv")
        specs = grid(notebooks, dict(args.sets), args.seeds, profile)
    except ValueError as error:  # e.g. --set seed=5, or a name the notebook lacks: a usage error, not a traceback
        parser.error(str(error))
    try:
        with sigterm_as_interrupt():
            status = run_grid(specs, args.out, cell_timeout=cell_timeout)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: what is kept, not a traceback from the kernel client
        what, code = stop_status(stop)
        print(f"{what}: the finished runs are kept in {args.out}; run the same command again to go on (they "
              "are skipped, the interrupted one runs again)", file=sys.stderr)
        return code
    print(status.to_string(index=False))
    # this grid's runs only, not those of earlier grids in --out (absent when no run could make its folder);
    # what collect warns of (runs left out) is said as a line of this command's output, not as a Python
    # warning naming a line of experiments.py
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        table = collect(args.out, specs) if args.out.is_dir() else pd.DataFrame()
    for warning in said:
        print(f"note: {warning.message}")
    path = args.out / "results.csv"
    elsewhere = int(status["status"].str.startswith("running elsewhere").sum())
    if not table.empty:
        try:
            write_text(table.to_csv(index=False), path)  # atomic: a crash while writing keeps the previous file
        except OSError as error:  # open in Excel, which locks it on Windows, or a full disk: the runs are all kept
            # (atomic_file's message names the file and the way out)
            print(f"\n{error}\nThe finished runs are kept: once {path.name} can be written, run this command again "
                  "(the same --out), which skips them and writes only the table", file=sys.stderr)
            return 1
        print(f"\n{len(table)} results collected into {path}")
    elif path.exists() and not elsewhere:  # an earlier grid's: left in place, it would pass for this one's
        try:                               # (with another grid running, it is that one's to replace)
            path.unlink()
        except OSError as error:  # open in Excel (Windows)
            print(f"\nno run of this grid finished, and the earlier grid's {path} could not be removed ({error}): "
                  "it is not this grid's table", file=sys.stderr)
            return 1
        print(f"\nno run of this grid finished; removed the earlier grid's {path}")
    if elsewhere:  # this table lacks them; the other grid's, or the same command later, has them
        runs = "1 run was" if elsewhere == 1 else f"{elsewhere} runs were"
        print(f"\n{runs} being written by another grid (the same command running twice?): run this command again "
              "once that grid has ended, to collect them (the finished runs are skipped)")
    return 0 if not status["status"].str.startswith("failed").any() else 1


if __name__ == "__main__":
    sys.exit(main())
