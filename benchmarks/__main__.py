"""Run the benchmark groups and print one table each.

    python -m benchmarks                 # everything (about half an hour on 2 CPU cores)
    python -m benchmarks --quick         # smaller sizes, for a first look
    python -m benchmarks --only models engine
    python -m benchmarks --only models --threads 1 --rounds 3   # options for the groups that take them

Each module in this folder exposes `run(quick: bool, ...) -> list[dict]`; the rows of one module
are measured in the same process, so their ratios are comparable. --threads and --rounds go only
to the groups whose `run` takes them (threads: models, disentangle, umsrep; rounds: models,
engine; the others' headings say the option does not apply); left out, every group keeps its own
default (`python -m benchmarks.bench_<group> --help` and benchmarks/README.md say which). The models
group runs last: on a CPU it changes how the process allocates memory (see bench_models).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import time

MODULES = ("data", "models", "engine", "disentangle", "umsrep")


def format_table(rows: list[dict]) -> str:
    """Rows (dicts) -> an aligned text table with the union of their keys as columns."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(values, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace(",", "").replace("-", "", 1).replace("e", "", 1).isdigit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps")
    parser.add_argument("--only", nargs="+", choices=MODULES, default=MODULES, help="run only these groups")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (>= 1) for models, disentangle and umsrep (default: each group's own, "
                             "2, 1, 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds for models and engine (default: each group's own, 2 and 5; "
                             "fewer with --quick)")
    args = parser.parse_args(argv)
    for option in ("threads", "rounds"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be >= 1, got {getattr(args, option)}")
    from benchmarks import run_header

    print(run_header(threads=args.threads or "each group's own"))
    # models last: on a CPU it makes the process keep its freed memory (bench_models.keep_freed_memory),
    # which would hold for every group measured after it
    for name in sorted(dict.fromkeys(args.only), key=lambda group: group == "models"):  # each group once
        module = importlib.import_module(f"benchmarks.bench_{name}")
        accepted = inspect.signature(module.run).parameters
        given = {k: v for k, v in (("threads", args.threads), ("rounds", args.rounds)) if v is not None}
        options = {k: v for k, v in given.items() if k in accepted}
        started = time.perf_counter()
        rows = module.run(quick=args.quick, **options)
        settings = "".join(f", {k} {v}" for k, v in options.items())
        settings += "".join(f"; --{k} does not apply" for k in given if k not in options)  # not silently dropped
        print(f"\n## {name}  ({time.perf_counter() - started:.0f} s{settings})\n")
        print(format_table(rows))


if __name__ == "__main__":
    main()
