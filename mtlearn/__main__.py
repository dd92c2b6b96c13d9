"""`python -m mtlearn`: the package's commands, each with its own --help.

The package itself has no command: its work is done by the modules listed, so this lists them
(a bare `python -m mtlearn` said only "No module named mtlearn.__main__").
"""

import sys

COMMANDS = (
    ("python -m mtlearn.course", "run the course notebooks with papermill (the main job; make course)"),
    ("python -m mtlearn.train", "train one configured model, on one process or several (torchrun)"),
    ("python -m mtlearn.experiments", "grids of notebook runs: notebooks x parameters x seeds, resumable"),
    ("python -m data_fetch", "download and verify a real dataset (list: what there is)"),
    ("python -m benchmarks", "the speed and memory benchmarks, side by side (from a clone's root)"),
)


def main() -> int:
    width = max(len(command) for command, _ in COMMANDS)
    print("mtlearn has no command of its own; these are its commands (each takes --help):")
    for command, what in COMMANDS:
        print(f"  {command:<{width}}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
