"""Grids of notebook runs through papermill: notebooks x parameters x seeds, resumable.

    python -m mtlearn.experiments --notebooks 01 02 --seeds 0 1 --profile smoke --out outputs/grid
    python -m mtlearn.experiments --notebooks 02 --seeds 0 1 2 --set "weightings=['fixed'],['pcgrad']" \
        --set num_seeds=1

`--set NAME=V1,V2` sweeps a parameter of the notebook's `parameters` cell (a name the notebook does
not have is an error, not a silently ignored value); the values are Python literals.

Each run gets its own folder, named after its parameters. A run whose folder already holds a
`metrics.json` written with the same parameters is skipped, so an interrupted grid picks up where it
stopped and a finished grid does no work. A failing run is recorded (`error.txt` beside the executed
notebook) and the grid goes on. `collect(out_root)` reads every metrics.json into one table.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mtlearn.course import course_notebooks, run_notebook
from mtlearn.notebook import flatten_metrics


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a notebook and the parameters papermill injects."""

    notebook: Path
    parameters: tuple[tuple[str, Any], ...]  # sorted (name, value) pairs, hashable

    @property
    def name(self) -> str:
        """Folder name: every injected parameter, sorted, e.g. `profile=course,seed=1,weightings=['pcgrad']`."""
        name = ",".join(f"{k}={v}" for k, v in self.parameters) or "default"
        return name.replace("/", "_")  # a value holding a path must not nest folders

    def folder(self, out_root: Path) -> Path:
        return Path(out_root) / self.notebook.stem / self.name

    def is_complete(self, out_root: Path) -> bool:
        """True when metrics.json exists and was written by a run with these parameters."""
        path = self.folder(out_root) / "metrics.json"
        if not path.exists():
            return False
        recorded = json.loads(path.read_text())
        return all(recorded.get(k, v) == v for k, v in self.parameters if k in ("profile", "seed", "dataset"))


def grid(notebooks: list[Path], parameters: dict[str, list[Any]], seeds: list[int], profile: str) -> list[RunSpec]:
    """Every combination of notebook, parameter values and seed, in a stable order."""
    if not notebooks:
        raise ValueError("the grid needs at least one notebook")
    if not seeds:
        raise ValueError("the grid needs at least one seed, e.g. seeds=[0]")
    names = sorted(parameters)
    for nb in notebooks:
        _check_parameters(Path(nb), names)
    specs = []
    for nb in notebooks:
        for values in itertools.product(*(parameters[n] for n in names)):
            for seed in seeds:
                params = dict(zip(names, values), seed=seed, profile=profile)
                specs.append(RunSpec(Path(nb), tuple(sorted(params.items()))))
    return specs


def _check_parameters(notebook: Path, names: list[str]) -> None:
    """Raise ValueError if `notebook`'s parameters cell lacks one of `names`.

    Why: papermill only logs a warning for an unknown parameter and runs the notebook with its
    defaults, so a misspelt name would give a grid of identical runs with different labels.
    """
    import papermill

    known = papermill.inspect_notebook(str(notebook))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{notebook.stem} has no parameter {unknown}; its parameters: {sorted(known)}")


def run_grid(specs: list[RunSpec], out_root: str | Path, *, progress: bool = True) -> pd.DataFrame:
    """Run every spec not yet complete; return a status table (one row per run)."""
    from tqdm.auto import tqdm

    out_root = Path(out_root)
    rows = []
    for spec in tqdm(specs, desc="experiment grid", unit="run", disable=not progress):
        folder = spec.folder(out_root)
        if spec.is_complete(out_root):
            rows.append({"notebook": spec.notebook.stem, "run": spec.name, "status": "skipped (done)", "seconds": 0.0})
            continue
        result = run_notebook(spec.notebook, folder, dict(spec.parameters))
        error_file = folder / "error.txt"
        if result.ok:
            error_file.unlink(missing_ok=True)
        else:
            error_file.write_text(result.error + "\n")
        rows.append({"notebook": spec.notebook.stem, "run": spec.name,
                     "status": "ok" if result.ok else f"failed: {result.error}", "seconds": round(result.seconds, 1)})
    return pd.DataFrame(rows)


def collect(out_root: str | Path) -> pd.DataFrame:
    """Every metrics.json under `out_root` as one row: notebook, run parameters and flat metrics."""
    rows = []
    for path in sorted(Path(out_root).glob("*/*/metrics.json")):
        record = json.loads(path.read_text())
        row = {"notebook": record.get("notebook", path.parent.parent.name), "run": path.parent.name}
        row.update({k: record.get(k) for k in ("profile", "seed", "dataset", "device", "wall_time_s")})
        row.update(flatten_metrics(record.get("metrics", {})))
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean and standard deviation of `metrics` across seeds for each group in `by`."""
    missing = [m for m in [*by, *metrics] if m not in table.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the table; available: {list(table.columns)}")
    return table.groupby(by)[metrics].agg(["mean", "std", "count"])


def plot_spread(table: pd.DataFrame, by: str, metric: str, title: str = ""):
    """Each run as a dot and the mean per group as a bar: the spread across seeds at a glance."""
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(table[by]))
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 2.5, 3.2))
    for i, group in enumerate(groups):
        values = table.loc[table[by] == group, metric].astype(float)
        ax.bar(i, values.mean(), color="tab:blue", alpha=0.35)
        ax.scatter([i] * len(values), values, color="tab:blue", zorder=3, s=14)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=30, ha="right")
    ax.set_xlabel(by)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by {by} (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _parse_set(text: str) -> tuple[str, list[Any]]:
    """`name=v1,v2` -> ("name", [v1, v2]): Python literals, else plain strings.

    "lr=1e-3,1e-4" -> [0.001, 0.0001]; "size=(64,64),(96,96)" -> [(64, 64), (96, 96)];
    "weightings=['fixed'],['pcgrad']" -> [["fixed"], ["pcgrad"]]; "dataset=busi,synthetic" -> strings.
    """
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects name=value[,value...], got {text!r}")
    name, values = text.split("=", 1)
    try:  # the whole list at once, so commas inside tuples and lists stay where they are
        return name.strip(), list(ast.literal_eval(f"[{values}]"))
    except (ValueError, SyntaxError):
        pass

    def literal(v: str) -> Any:
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v

    return name.strip(), [literal(v) for v in values.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtlearn.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", nargs="+", required=True, metavar="NN", help="notebook numbers or names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--profile", default="smoke", help="smoke | course | paper (default: smoke)")
    parser.add_argument("--set", dest="sets", action="append", type=_parse_set, default=[],
                        metavar="NAME=V1,V2", help="a notebook parameter and the values to sweep")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "experiments")
    args = parser.parse_args(argv)

    from mtlearn.notebook import resolve_profile

    try:
        profile = resolve_profile(args.profile)
    except ValueError as error:
        parser.error(str(error))
    try:
        available = course_notebooks()
    except FileNotFoundError as error:
        parser.error(str(error))
    notebooks = [nb for nb in available if any(nb.stem.startswith(s) for s in args.notebooks)]
    if not notebooks:
        parser.error(f"no notebook in {available[0].parent} matches {args.notebooks}")
    specs = grid(notebooks, dict(args.sets), args.seeds, profile)
    status = run_grid(specs, args.out)
    print(status.to_string(index=False))
    table = collect(args.out)
    if not table.empty:
        table.to_csv(args.out / "results.csv", index=False)
        print(f"\n{len(table)} results collected into {args.out / 'results.csv'}")
    return 0 if not status["status"].str.startswith("failed").any() else 1


if __name__ == "__main__":
    sys.exit(main())
