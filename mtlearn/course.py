"""Run the course notebooks with papermill: the project's main job.

    python -m mtlearn.course                       # every notebook, course profile, into outputs/
    python -m mtlearn.course --profile smoke --seed 7 --only 00 01

Each notebook is executed into `outputs/<notebook>/<profile>/` (the executed notebook, its
figures, its metrics.json and a `done` marker); the committed notebooks in notebooks/ are never
written. A notebook runs in a staging folder beside it (`<profile>.partial/`) that replaces the
old folder only when the run succeeds, so a failed or interrupted rerun leaves the previous results
as they were (and the failed run in `<profile>.partial/` to look at). A notebook that fails is
reported with its failing cell and the others still run. The run ends with one table of every
notebook's headline metrics.

A cell that runs longer than `--cell-timeout` seconds (default: one hour, none for the paper
profile) stops its notebook with an error instead of leaving the job waiting forever: the longest
course cell takes up to about ten minutes on 2 CPU cores, and a kernel whose reply got lost (seen
once) would otherwise hang the whole run without a word.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_fetch.locking import make_and_lock
from mtlearn.notebook import flatten_metrics
from mtlearn.utils import (DISK_FULL, atomic_file, check_number, printable_stdout, sigterm_as_interrupt, stop_status,
                           write_text)

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"  # in a clone (and an editable install)
DONE = "done"  # marker file: the folder holds a whole successful run (written last, before it is moved in)
CELL_TIMEOUT_S = {"smoke": 3600.0, "course": 3600.0, "paper": None}  # --cell-timeout's default per profile


@dataclass
class NotebookResult:
    """What one papermill execution left behind."""

    notebook: str  # the notebook's name, e.g. "01_resformer_mtl"
    out_dir: Path  # where the executed copy is: the requested folder, or on failure its kept `.partial` staging
    # (or the folder's `.lock` when another run held it: nothing of this run was written)
    ok: bool  # the notebook ran to its end
    seconds: float  # wall time of the execution
    error: str = ""  # why it failed and what to do ("" when ok)
    metrics: dict[str, Any] | None = None  # its metrics.json, when it wrote one
    busy: bool = False  # another run held the folder: this one ran nothing (error says which run)


def select_notebooks(available: list[Path], prefixes: list[str]) -> tuple[list[Path], list[str]]:
    """The notebooks whose names start with one of `prefixes` ("02", "02_loss"), in course order, and
    the prefixes that match none (for the caller's usage error)."""
    # a blank prefix ('--only "$NB"' with NB unset) would match every notebook: an hour's run for a typo
    chosen = [nb for nb in available if any(p.strip() and nb.stem.startswith(p) for p in prefixes)]
    unmatched = [p for p in prefixes if not p.strip() or not any(nb.stem.startswith(p) for nb in available)]
    return chosen, unmatched


def course_notebooks(notebook_dir: Path | None = None) -> list[Path]:
    """The numbered notebooks `NN_topic.ipynb`, in course order.

    notebook_dir None: the repository's notebooks/ beside the package, else ./notebooks, else the
    working directory. A pip install from git brings the package but not the notebooks (Colab's
    setup cell): then none of these holds them and the error says to clone the repository.
    """
    candidates = [notebook_dir] if notebook_dir is not None else [NOTEBOOK_DIR, Path.cwd() / "notebooks", Path.cwd()]
    for folder in candidates:
        found = sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))
        if found:
            return found
    raise FileNotFoundError(
        f"no course notebook (NN_topic.ipynb) in {', '.join(str(c) for c in candidates)}. The notebooks come with "
        "the repository, not with the pip package: clone it and run from the clone (on Colab: "
        "`!git clone <repository URL>` then `%cd <clone>/notebooks`)"
    )


def _failing_cell(error: Exception) -> str:
    """Papermill's error names the cell; keep its first lines and the exception. Anything else (no
    such kernel, an unreadable notebook) happened before any cell ran, and says so."""
    from papermill.exceptions import PapermillExecutionError

    if not isinstance(error, PapermillExecutionError):
        text = f"the notebook could not run: {type(error).__name__}: {error}"
        if type(error).__name__ == "NoSuchKernel":
            text += ("; install a kernel for this environment (ipykernel comes with the dev extra, not with "
                     "mtlearn itself): python -m pip install ipykernel && "
                     "python -m ipykernel install --sys-prefix --name python3")
        return text
    cell = error.exec_count
    where = f"cell [{cell}]" if cell is not None else "a cell"
    return f"{where} raised {error.ename}: {error.evalue}".strip()


def _kernel_died(executed: Path) -> str:
    """The kernel process ended in the middle of a cell: no Python exception to show, so name the cell
    (the last one papermill started; its execution count is not always saved) and the usual cause."""
    cell = "a cell"
    try:
        cells = json.loads(executed.read_text(encoding="utf-8"))["cells"]
        started = [c for c in cells if c.get("metadata", {}).get("papermill", {}).get("start_time")]
        lines = "".join(started[-1]["source"]).strip().splitlines()
        cell = f"the cell starting {lines[0]!r}" if lines else cell
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # no copy written yet, or no cell started
        pass
    return (f"the kernel died while {cell} ran (out of memory, or a crash in native code): lower the batch "
            f"size or the profile, and see the executed copy {executed}")


def _timed_out(error: Exception, cell_timeout: float | None) -> str:
    """nbclient's CellTimeoutError (several lines, the cell's source among them) -> one line and the fix.

    It comes for two reasons: the cell ran past `cell_timeout` ("Cell execution timed out"), or the
    cell finished but its output did not arrive in time ("Timeout waiting for IOPub output").
    """
    text = str(error)
    parts = text.split("-------------------\n")  # nbclient's layout: the cell's source between two rules
    lines = parts[1].strip().splitlines() if len(parts) > 2 else []
    # a cell of 11 lines or more is quoted as its first 5 lines as a Python list, "...", and its last 5
    if len(lines) == 3 and lines[1] == "..." and lines[0].startswith("["):
        try:
            quoted = ast.literal_eval(lines[0])
        except (ValueError, SyntaxError, TypeError):  # a cell whose own lines look so: its first line
            quoted = None
        if isinstance(quoted, list) and all(isinstance(line, str) for line in quoted):
            lines = [line for line in quoted if line.strip()] or lines
    cell = f"the cell starting {lines[0]!r}" if lines else "a cell"
    if cell_timeout is not None and "Cell execution timed out" in text:
        return (f"{cell} ran longer than the cell timeout ({cell_timeout:g} s) and was stopped; if it was "
                "only slow, raise the limit (--cell-timeout SECONDS, 0: none)")
    reason = re.search(r"The message was: (.*?)\.?$", text, re.MULTILINE)
    return f"{cell} timed out: {reason.group(1) if reason else text.splitlines()[0]}"


MAX_NAME_BYTES = 255  # a file name's limit on ext4, APFS and NTFS: a run folder's name must fit


def check_staging_fits(name: str, what: str, fix: str) -> None:
    """Refuse a run folder's `name` whose staging twin `<name>.partial` is longer than a file name may be: the
    run would fail with "File name too long" at its lock or staging folder. what: how the message names it."""
    size = len(f"{name}.partial".encode())
    if size > MAX_NAME_BYTES:
        raise ValueError(f"{what} {name[:60]!r}... would be {size} bytes with its '.partial' suffix, over the "
                         f"{MAX_NAME_BYTES} a file name may have; {fix}")


def _literal_path(path: Path) -> str:
    """`path` for papermill, which formats its paths with the parameters (str.format): a folder named after
    a dict value, `flags={'a': 1}`, was read as a placeholder and the run failed with "Missing parameter"."""
    return str(path).replace("{", "{{").replace("}", "}}")


def run_notebook(
    notebook: Path,
    out_dir: Path,
    parameters: dict[str, Any],
    *,
    kernel_name: str | None = None,
    progress: bool = False,
    cell_timeout: float | None = None,
) -> NotebookResult:
    """Execute `notebook` into `out_dir` with papermill; never raises for a failing notebook.

    `out_dir` is passed to the notebook as its `out_dir` parameter, so its figures and
    metrics.json land next to the executed copy. The notebook runs in `<out_dir>.partial`, which
    replaces `out_dir` only on success: a failure leaves `out_dir` untouched and the failed run in
    the staging folder (the result's `out_dir`), until the next run of the same notebook.
    cell_timeout: seconds one cell may run before the notebook is stopped as failed (a fraction is
    rounded up to whole seconds); None: no limit.
    Raises ValueError for an out_dir that holds the notebook (publishing would replace it) or whose name is
    too long for its staging twin, and for a parameter its parameters cell does not have (papermill would
    only log it and run the defaults).
    """
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError, DeadKernelError  # papermill's executor

    if cell_timeout is not None:
        check_number("cell_timeout", cell_timeout, 0, above=True, advice="seconds; None: no limit")
    notebook, out_dir = Path(notebook).expanduser(), Path(out_dir).expanduser()  # "~/out" as start() takes it
    if not isinstance(parameters, dict):
        raise TypeError(f"parameters must be a dict of the notebook's parameters, e.g. {{'profile': 'smoke'}}, got "
                        f"{type(parameters).__name__}")
    try:  # {} without a parameters cell: papermill then injects at the top
        known = pm.inspect_notebook(_literal_path(notebook))
    except Exception:  # a missing or unreadable notebook: the run below fails and says so, as for any failure
        known = {}
    unknown = sorted(name for name in parameters if known and name not in known)
    if unknown:  # "epoch" for "epochs": a run of the defaults, ok, with one line in papermill's log
        raise ValueError(f"{notebook.stem} has no parameter {unknown}; its parameters: {sorted(known)}")
    final = out_dir.resolve()
    if notebook.resolve().parent.is_relative_to(final):  # publishing would replace the notebook's own folder
        raise ValueError(f"out_dir {out_dir} holds the notebook {notebook.name} itself; a finished run replaces "
                         "its out_dir, so give a folder outside the notebooks' one, e.g. outputs/<notebook>")
    check_staging_fits(final.name, "out_dir's name", "give a shorter name")
    staging = final.with_name(final.name + ".partial")
    started = time.perf_counter()

    def failed(error: str) -> NotebookResult:
        return NotebookResult(notebook.stem, staging, False, time.perf_counter() - started, error)

    lock = final.with_name(final.name + ".lock")
    try:
        holder = make_and_lock(final.parent, lock)
    except OSError as error:  # e.g. a file where a folder of the path should be: this run fails, the rest go on
        return failed(f"cannot make the run's folder {staging}: {error}")
    if holder is not None:  # a second run into the same folder would delete the first one's staging folder
        # out_dir: the lock, not a folder of the other run's (a grid writes error.txt into a failed run's folder)
        return NotebookResult(notebook.stem, lock, False, 0.0, f"another run is writing {out_dir} ({holder}); "
                              f"wait for it to finish, or write elsewhere; if no run is writing there (one killed "
                              f"on another machine, or on Windows), delete {lock}", busy=True)
    try:
        shutil.rmtree(staging, ignore_errors=True)  # an earlier failed attempt: its files are not this run's
        try:
            staging.mkdir(parents=True)
        except OSError as error:  # e.g. a file where a folder of the path should be: this run fails, the rest go on
            return failed(f"cannot make the run's folder {staging}: {error}")
        metrics_path = staging / "metrics.json"
        params = dict(injected_parameters(parameters), out_dir=str(staging))
        env_root = os.environ.get("MTLEARN_DATA", "")
        try:
            if env_root and not Path(env_root).expanduser().is_absolute():
                # the default data_root likewise: the kernel inherits this environment, not this folder
                os.environ["MTLEARN_DATA"] = str(Path(env_root).expanduser().absolute())
            pm.execute_notebook(  # papermill fills {name} in its paths from the parameters: braces kept literal
                _literal_path(notebook),
                _literal_path(staging / notebook.name),
                parameters=params,
                kernel_name=kernel_name,
                cwd=str(notebook.parent),
                progress_bar=progress,
                log_output=False,
                # nbclient takes whole seconds only (1.5 failed every notebook before its first cell)
                execution_timeout=math.ceil(cell_timeout) if cell_timeout is not None else None,
                # The kernel's own log (e.g. "Kernel is running over TCP") would land in the caller's
                # cell output when a notebook runs a grid of notebooks, and so would the "KeyboardInterrupt
                # caught in kernel" it logs as an error when it is shut down after a run that succeeded:
                # cell errors reach papermill by the kernel's messages, not its log.
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
            )
        except Exception as error:  # papermill raises PapermillExecutionError, kernels may raise others
            if isinstance(error, CellTimeoutError):
                return failed(_timed_out(error, cell_timeout))
            if isinstance(error, DeadKernelError):
                return failed(_kernel_died(staging / notebook.name))
            return failed(_failing_cell(error))
        finally:
            if env_root:
                os.environ["MTLEARN_DATA"] = env_root
        if not metrics_path.exists():
            return failed("the notebook finished without writing metrics.json")
        try:
            metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as error:  # written by hand, or cut short: a failed run, not a crashed course
            return failed(f"metrics.json is not valid JSON ({error}); write it with run.finish (atomic)")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("metrics", {}), dict):  # the tables read both
            return failed("metrics.json must hold a dict whose 'metrics' is a dict of headline numbers; write it with "
                          "run.finish({'dice': ...})")
        try:
            _publish(staging, final, notebook.name)
        except OSError as error:  # a file of the previous run held open (Windows), or a full disk
            where = staging if staging.exists() else final
            fix = ("free some space" if error.errno in DISK_FULL
                   else f"close any program using files in {final} or {final.name}.old")
            return NotebookResult(notebook.stem, where, False, time.perf_counter() - started,
                                  f"the notebook ran, but its folder could not be put in place of {final} ({error}); "
                                  f"{fix} and run it again (this run is kept in {where})")
        return NotebookResult(notebook.stem, out_dir, True, time.perf_counter() - started, metrics=metrics)
    finally:
        lock.unlink(missing_ok=True)


def _publish(staging: Path, final: Path, notebook_name: str) -> None:
    """Move a successful run from `staging` to `final`, replacing the previous run there."""
    # The executed copy shows the folder it ran in (injected parameters, printed paths), and so does every
    # notebook the run wrote inside it (notebook 06's grid runs): point them at the folder their files are about
    # to be in. Paths are JSON-escaped, as in the .ipynb text; in the injected cell papermill writes them as
    # Python literals, with \xe9 for é (its own escaping).
    from papermill.translators import PythonTranslator

    executed = staging / notebook_name
    for written in [executed, *sorted(p for p in staging.rglob("*.ipynb") if p != executed and not p.is_symlink())]:
        # surrogateescape: a file that is not UTF-8 (not the run's own notebook) keeps its bytes
        text = original = written.read_text(encoding="utf-8", errors="surrogateescape")
        for form in (str, lambda path: PythonTranslator.translate_str(str(path))[1:-1]):
            text = text.replace(*(json.dumps(form(p), ensure_ascii=False)[1:-1] for p in (staging, final)))
        if text != original:  # atomic: a full disk keeps the file as it was, not an empty one
            with atomic_file(written, binary=True) as f:
                f.write(text.encode("utf-8", errors="surrogateescape"))
    freeze_progress_bars(executed)
    (staging / DONE).write_text(f"{notebook_name} finished {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    # Two renames, not a copy: at every moment one whole run (old or new) is on disk. An interruption
    # between them leaves the previous run in `<final>.old` (and no `final`) until a run succeeds.
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def freeze_progress_bars(path: Path) -> int:
    """Give every progress bar of the saved notebook `path` the text of its final state; returns how many.

    tqdm's notebook bars are widgets, and the plain-text copy saved beside each one (what GitHub and
    other viewers without widgets show) is written when the bar is made: a saved notebook shows every
    bar at 0 % (tqdm/tqdm#1120). The widget state saved with the notebook holds where each bar ended;
    this writes that as text, "epoch 1/6: 100%|██████████| 30/30 [00:02<00:00, 12.0it/s]". The file
    keeps its JSON layout (one-space indent, as Jupyter and papermill write it).
    """
    text = Path(path).read_text(encoding="utf-8")
    notebook = json.loads(text)
    state = notebook.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    changed = 0
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            final = _bar_text(state, view.get("model_id")) if isinstance(view, dict) else None
            saved = output.get("data", {}).get("text/plain", "")
            if final is not None and "".join(saved) != final:
                output["data"]["text/plain"] = [final] if isinstance(saved, list) else final  # the file's form
                changed += 1
    if changed:
        trailing = "\n" if text.endswith("\n") else ""
        write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + trailing, Path(path))  # atomic, UTF-8
    return changed


def _bar_text(state: dict, model_id: str | None) -> str | None:
    """tqdm's text line for the bar widget `model_id` (a box of prefix, progress, suffix), or None."""
    import html

    box = state.get(model_id or "", {})
    children = box.get("state", {}).get("children", []) if box.get("model_name") == "HBoxModel" else []
    parts = [state.get(str(child).removeprefix("IPY_MODEL_"), {}) for child in children]
    if [part.get("model_name") for part in parts] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    prefix, bar, suffix = (part.get("state", {}) for part in parts)
    value, most = bar.get("value") or 0, bar.get("max") or 0
    filled = max(0, min(10, int(10 * value / most))) if most else 0

    def plain(value: str | None) -> str:
        return html.unescape(value or "").replace("\u2007", " ")  # tqdm pads with figure spaces

    return f"{plain(prefix.get('value'))}|{'█' * filled}{' ' * (10 - filled)}|{plain(suffix.get('value'))}"


def headline_table(results: list[NotebookResult]) -> str:
    """One line per notebook: status, time and its first six numeric metrics (nested ones flattened,
    `seg/dice`), or the first line of its error.

    A metric that is NaN (metrics.json stores it as null) shows as `name=NaN`: a broken metric must
    be seen, not left out.
    """
    lines = [f"{'notebook':<28} {'status':<6} {'time':>7}  headline metrics"]
    for r in results:
        if r.ok and r.metrics:
            flat = {k: v for k, v in flatten_metrics(r.metrics.get("metrics", {})).items()
                    if v is None or isinstance(v, (int, float)) and not isinstance(v, bool)}
            shown = ", ".join(f"{k}={_number(v)}" for k, v in list(flat.items())[:6])
        else:  # one line per notebook: a multi-line error (the missing-dataset advice) is in the failure report
            lines_of_error = r.error.strip().splitlines() or [""]
            shown = lines_of_error[0] + (" ..." if len(lines_of_error) > 1 else "")
        status = "ok" if r.ok else "BUSY" if r.busy else "FAIL"  # BUSY: another run held its folder
        lines.append(f"{r.notebook:<28} {status:<6} {r.seconds:>6.0f}s  {shown}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "NaN" if value is None or math.isnan(value) else f"{value:.3g}"


def injected_parameters(parameters: dict) -> dict:
    """`parameters` as run_notebook injects them (out_dir aside): the kernel runs in the notebook's folder, so a
    relative data_root, which means the caller's folder, is made absolute."""
    params = dict(parameters)
    root = params.get("data_root")
    if isinstance(root, (str, Path)) and str(root) and not Path(root).expanduser().is_absolute():
        params["data_root"] = str(Path(root).expanduser().absolute())
    return params


def notebook_parameters(profile: str, seed: int | None = None, device: str = "auto") -> dict:
    """The papermill parameters of one course run; seed None leaves each notebook's default seed
    (notebook 04 defaults to 1), so the main job reproduces the committed runs."""
    params = {"profile": profile, "device": device}
    if seed is not None:
        params["seed"] = seed
    return params


def resolve_cell_timeout(seconds: float | None, profile: str) -> float | None:
    """--cell-timeout as run_notebook takes it: None -> the profile's default (CELL_TIMEOUT_S), 0 -> no
    limit (None); anything else must be a finite number of seconds > 0."""
    cell_timeout = CELL_TIMEOUT_S.get(profile) if seconds is None else seconds or None
    if cell_timeout is not None and not 0 < cell_timeout < math.inf:
        raise ValueError(f"--cell-timeout must be a number of seconds > 0 (0: no limit), got {seconds:g}")
    return cell_timeout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlearn.course", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None,
                        help="smoke | course | paper (default: $MTLEARN_PROFILE if set, else course)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed passed to every notebook (default: each notebook's own, as committed)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs/)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NN",  # a bare --only must not mean "all"
                        help="run only notebooks whose number or name starts with these")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a notebook whose cell runs longer than this (default: 3600, none for the "
                             "paper profile; 0: no limit)")
    args = parser.parse_args(argv)
    printable_stdout()

    from mtlearn.notebook import PAPER_ON_CPU, resolve_profile
    from mtlearn.utils import check_folder, home_expanded, pick_device, seed_everything

    try:
        profile = resolve_profile(args.profile, name="--profile")
        device = pick_device(args.device)  # a typo fails here, once, not inside every notebook's kernel
        if args.seed is not None:  # the check each notebook's start() makes; seeding this process is harmless
            seed_everything(args.seed)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    try:
        cell_timeout = resolve_cell_timeout(args.cell_timeout, profile)
    except ValueError as error:
        parser.error(str(error))
    try:
        notebooks = course_notebooks()
    except FileNotFoundError as error:
        parser.error(str(error))
    try:
        args.out = home_expanded(args.out, "--out")
        check_folder(args.out, "--out", "one folder per notebook")
    except ValueError as error:
        parser.error(str(error))
    if args.only:
        available = notebooks
        notebooks, unmatched = select_notebooks(available, args.only)
        if unmatched:  # else `--only 00 99` ran 00 alone and said nothing of 99
            parser.error(f"no notebook matches {unmatched}; available: {[p.stem for p in available]}")

    from tqdm.auto import tqdm

    if profile == "paper" and device.type == "cpu":  # each notebook warns too, but inside its kernel, unseen here
        print("note: " + PAPER_ON_CPU.replace("profile='course'", "--profile course"), file=sys.stderr)
    results = []
    bar = tqdm(notebooks, desc=f"course notebooks ({profile})", unit="notebook")
    for index, nb in enumerate(bar):
        bar.set_postfix_str(nb.stem)
        try:
            with sigterm_as_interrupt():
                result = run_notebook(nb, args.out / nb.stem / profile,
                                      notebook_parameters(profile, args.seed, args.device), cell_timeout=cell_timeout)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: what is kept, not a traceback from the kernel client
            bar.close()
            if results:
                print(headline_table(results))
            rest = " ".join(n.stem.split("_")[0] for n in notebooks[index:])
            what, status = stop_status(stop)
            print(f"{what} during {nb.stem}: the notebooks before it are finished in {args.out}, and {nb.stem} "
                  f"keeps its previous results, if any; run the same command with --only {rest} for the rest",
                  file=sys.stderr)
            return status
        if not result.ok:
            executed = result.out_dir / nb.name
            where = (f" (executed copy: {executed}; the previous run, if any, is kept in "
                     f"{args.out / nb.stem / profile})") if executed.is_file() else ""
            tqdm.write(f"{nb.stem} {'not run' if result.busy else 'failed'}: {result.error}{where}")
        results.append(result)
    print()
    print(headline_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
