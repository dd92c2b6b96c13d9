"""Run the course notebooks with papermill: the project's main job.

    python -m mtlearn.course                       # every notebook, course profile, into outputs/
    python -m mtlearn.course --profile smoke --seed 7 --only 00 01

Each notebook is executed into `outputs/<notebook>/<profile>/` (the executed notebook, its
figures and its metrics.json); the committed notebooks in notebooks/ are never written. A notebook
that fails is reported with its failing cell and the others still run. The run ends with one
table of every notebook's headline metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlearn.notebook import flatten_metrics

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"  # in a clone (and an editable install)


@dataclass
class NotebookResult:
    """What one papermill execution left behind."""

    notebook: str
    out_dir: Path
    ok: bool
    seconds: float
    error: str = ""
    metrics: dict[str, Any] | None = None


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
    """Papermill's error names the cell; keep its first lines and the exception."""
    name = getattr(error, "ename", type(error).__name__)
    value = getattr(error, "evalue", str(error))
    cell = getattr(error, "exec_count", None)
    where = f"cell [{cell}]" if cell is not None else "a cell"
    return f"{where} raised {name}: {value}".strip()


def run_notebook(
    notebook: Path,
    out_dir: Path,
    parameters: dict[str, Any],
    *,
    kernel_name: str | None = None,
    progress: bool = False,
) -> NotebookResult:
    """Execute `notebook` into `out_dir` with papermill; never raises for a failing notebook.

    `out_dir` is passed to the notebook as its `out_dir` parameter, so its figures and
    metrics.json land next to the executed copy.
    """
    import papermill as pm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)  # an earlier run's metrics must not pass for this one's
    params = dict(parameters, out_dir=str(out_dir.resolve()))
    started = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebook),
            str(out_dir / notebook.name),
            parameters=params,
            kernel_name=kernel_name,
            cwd=str(notebook.parent),
            progress_bar=progress,
            log_output=False,
            # The kernel's own log (e.g. "Kernel is running over TCP") would land in the caller's
            # cell output when a notebook runs a grid of notebooks: keep only its errors.
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except Exception as error:  # papermill raises PapermillExecutionError, kernels may raise others
        return NotebookResult(notebook.stem, out_dir, False, time.perf_counter() - started, _failing_cell(error))
    if not metrics_path.exists():
        return NotebookResult(notebook.stem, out_dir, False, time.perf_counter() - started,
                              "the notebook finished without writing metrics.json")
    metrics = json.loads(metrics_path.read_text())
    return NotebookResult(notebook.stem, out_dir, True, time.perf_counter() - started, metrics=metrics)


def headline_table(results: list[NotebookResult]) -> str:
    """One line per notebook: status, time and its top-level numeric metrics."""
    lines = [f"{'notebook':<28} {'status':<6} {'time':>7}  headline metrics"]
    for r in results:
        if r.ok and r.metrics:
            flat = {k: float(v) for k, v in flatten_metrics(r.metrics.get("metrics", {})).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            shown = ", ".join(f"{k}={v:.3g}" for k, v in list(flat.items())[:6])
        else:
            shown = r.error
        lines.append(f"{r.notebook:<28} {'ok' if r.ok else 'FAIL':<6} {r.seconds:>6.0f}s  {shown}")
    return "\n".join(lines)


def notebook_parameters(profile: str, seed: int | None = None, device: str = "auto") -> dict:
    """The papermill parameters of one course run; seed None leaves each notebook's default seed
    (notebook 04 defaults to 1), so the main job reproduces the committed runs."""
    params = {"profile": profile, "device": device}
    if seed is not None:
        params["seed"] = seed
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlearn.course", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None,
                        help="smoke | course | paper (default: $MTLEARN_PROFILE if set, else course)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed passed to every notebook (default: each notebook's own, as committed)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs/)")
    parser.add_argument("--only", nargs="*", default=None, metavar="NN",
                        help="run only notebooks whose number or name starts with these")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = parser.parse_args(argv)

    from mtlearn.notebook import resolve_profile
    from mtlearn.utils import pick_device

    try:
        profile = resolve_profile(args.profile)
        pick_device(args.device)  # a typo fails here, once, not inside every notebook's kernel
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    try:
        notebooks = course_notebooks()
    except FileNotFoundError as error:
        parser.error(str(error))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(s) for s in args.only)]
    if not notebooks:
        parser.error(f"no notebook matches {args.only}; available: {[p.stem for p in course_notebooks()]}")

    from tqdm.auto import tqdm

    results = []
    bar = tqdm(notebooks, desc=f"course notebooks ({profile})", unit="notebook")
    for nb in bar:
        bar.set_postfix_str(nb.stem)
        result = run_notebook(nb, args.out / nb.stem / profile, notebook_parameters(profile, args.seed, args.device))
        if not result.ok:
            tqdm.write(f"{nb.stem} failed: {result.error} (executed copy: {result.out_dir / nb.name})")
        results.append(result)
    print()
    print(headline_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
