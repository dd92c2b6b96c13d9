"""How fast SyntheticUltrasound draws items: the course generates its data on the fly, every epoch.

Target: 10,000 items at 128 px in under 10 s (1 ms per item) in one process, so that a DataLoader
with 2 workers on 2 CPU cores keeps a small model fed.

    python -m benchmarks.bench_data            # 10,000 items at 128 px; 2,500 at 256 px, scaled to 10,000
    python -m benchmarks.bench_data --quick    # a tenth of each, scaled up
"""

from __future__ import annotations

import argparse
import time

from mtlearn.data import SyntheticUltrasound

TARGET_SECONDS = 10.0  # per 10,000 items at 128 px


def time_generation(num_samples: int, image_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds to draw every item of a SyntheticUltrasound, tensors included, one process.

    CPU time is reported too: on a machine shared with other jobs the wall time also counts the
    time spent waiting for a core.
    """
    dataset = SyntheticUltrasound(num_samples=num_samples, image_size=image_size, seed=0)
    dataset[0]  # warm-up: first-call costs are not per-item costs
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(num_samples):
        dataset[i]
    return time.perf_counter() - wall, time.process_time() - cpu


def run(quick: bool = False) -> list[dict]:
    """Rows: benchmark, setting, value (wall seconds per 10,000 items), unit, target, cpu_s."""
    rows = []
    for image_size, n in ((128, 10_000), (256, 2_500)):
        n = n // 10 if quick else n
        wall, cpu = time_generation(n, image_size)
        scale = 10_000 / n  # quick runs time fewer items and scale up
        rows.append({
            "benchmark": "synthetic ultrasound",
            "setting": f"10,000 items, {image_size} px, 1 process" + (f" (from {n:,})" if scale != 1 else ""),
            "value": wall * scale, "unit": "s", "target": f"< {TARGET_SECONDS:g}" if image_size == 128 else "",
            "cpu_s": cpu * scale, "ms_per_item": 1000 * wall / n,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    from benchmarks import run_header
    from benchmarks.__main__ import format_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the items, scaled up")
    args = parser.parse_args(argv)
    print(run_header())
    print(format_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
