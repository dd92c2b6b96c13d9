"""The benchmarks run and print the tables they promise (smallest sizes; no timing is asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks import bench_disentangle, bench_engine, bench_models, bench_umsrep
from benchmarks.__main__ import format_table
from mtlearn.mtl import build_model, monai_baseline
from mtlearn.umsrep import strategy_config
from mtlearn.utils import count_parameters, pick_device

ROOT = Path(__file__).resolve().parents[1]


def _parse_table(lines: list[str]) -> list[dict]:
    """format_table's text back into rows, cut at the columns its dashed line marks (cells may be blank)."""
    header, dashes, *body = lines
    spans, start = [], 0
    for dash in dashes.split("  "):
        spans.append((start, start + len(dash)))
        start += len(dash) + 2
    cut = lambda line: [line[a:b].strip() for a, b in spans]
    columns = cut(header)
    return [dict(zip(columns, cut(line))) for line in body]


def _tables(stdout: str) -> dict[str, list[dict]]:
    """`## group  (N s)` sections of `python -m benchmarks` -> {group: rows}."""
    tables = {}
    for section in stdout.split("\n## ")[1:]:
        title, _, table = section.partition("\n\n")
        tables[title.split()[0]] = _parse_table(table.strip("\n").splitlines())
    return tables


@pytest.mark.slow
def test_quick_run_prints_a_table_per_chosen_group():
    """The cheapest groups through the command line, as the README runs them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "data", "engine"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tables = _tables(done.stdout)
    assert list(tables) == ["data", "engine"]  # the chosen groups only, in order

    data = tables["data"]
    assert list(data[0]) == ["benchmark", "setting", "value", "unit", "target", "cpu_s", "ms_per_item"]
    # --quick draws a tenth of the items and scales the time up to 10,000
    assert [row["setting"] for row in data] == ["10,000 items, 128 px, 1 process (from 1,000)",
                                                "10,000 items, 256 px, 1 process (from 250)"]
    assert [row["target"] for row in data] == ["< 10", ""]  # the target is for 128 px only
    assert all(float(row["value"]) > 0 and row["unit"] == "s" for row in data)

    engine = tables["engine"]
    expected = [config["name"] for config in bench_engine._configs(pick_device("auto"), quick=True)]
    assert [row["config"] for row in engine] == expected
    measured = [row for row in engine if not row["note"]]
    assert measured[0]["config"] == "fp32" and float(measured[0]["speedup"]) == 1.0  # the reference row
    assert all(row["preset"] == "tiny" and row["image_size"] == "64" and row["batch"] == "8" for row in engine)
    assert all(float(row["images_per_s"]) > 0 and row["data_wait_ok"] in ("True", "False") for row in measured)
    if pick_device("auto").type == "cpu":  # compiling takes minutes on a CPU: quick skips it and says why
        assert engine[-1]["note"].startswith("skipped with --quick") and engine[-1]["images_per_s"] == ""


def test_format_table_aligns_the_union_of_columns():
    rows = [{"model": "tiny", "params": 12345.6}, {"model": "paper", "note": "slow", "params": 0.123456}]
    assert format_table(rows).splitlines() == [
        "model  params  note",
        "-----  ------  ----",
        "tiny   12,346      ",  # numbers right-aligned; >= 1000 with thousands separators; a missing cell blank
        "paper   0.123  slow",  # otherwise 3 significant digits
    ]


def test_models_measure_one_row_per_model_at_one_input_size():
    rows = bench_models.measure(32, ["tiny", "monai unet"], batch_size=1, rounds=1, in_channels=1)
    assert [row["model"] for row in rows] == ["tiny", "monai unet"]
    expected_params = [count_parameters(build_model("tiny", in_channels=1, image_size=32)),
                       count_parameters(monai_baseline("unet", 1, 2, 32))]
    assert [row["params_M"] for row in rows] == pytest.approx([p / 1e6 for p in expected_params])
    assert all(row["input"] == "32x32x1" and row["batch"] == 1 for row in rows)
    assert all(row["GFLOPs_fwd"] > 0 and row["train_img_per_s"] > 0 for row in rows)
    assert all(row["vs_swinunetr"] == "" for row in rows)  # no SwinUNETR row to compare with


def test_models_refuses_an_unknown_group_and_bad_options():
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"unknown benchmark group\(s\) \['gpu'\]"):
        bench_models.run(quick=True, groups=("gpu",))
    assert torch.get_num_threads() == threads
    with pytest.raises(SystemExit):  # refused before anything is measured
        bench_models.main(["--rounds", "0"])


def _disentangle_rows(unseen, shared_unseen, probe, shared_probe):
    return [{"model": "disentangle", "unseen_shape_acc": unseen, "probe_background_a": probe},
            {"model": "shared", "unseen_shape_acc": shared_unseen, "probe_background_a": shared_probe},
            {"model": "two_encoder", "unseen_shape_acc": 0.1, "probe_background_a": 1.0}]


def test_disentangle_criterion_passes_and_names_each_failure():
    passed = bench_disentangle.add_criterion(_disentangle_rows(0.95, 0.5, 0.55, 0.95))
    assert [row["criterion"] for row in passed] == ["pass", "", ""]  # judged on the DisentangleNet row only
    failed = bench_disentangle.add_criterion(_disentangle_rows(0.85, 0.7, 0.65, 0.7))
    assert failed[0]["criterion"] == ("fail (unseen 0.85 < 0.9; shared unseen 0.70 not 20% lower; probe 0.65 > 0.6; "
                                      "shared probe 0.70 not clearly higher)")


def _strategy_table(joint_dice: float) -> pd.DataFrame:
    """A hand-made compare_strategies table: (d) joint trains 30 % of (e)'s FLOPs in 20 % of its time."""
    scores = {"recon/psnr": 20.0, "recon/ssim": 0.5, "seg/dice": 0.8, "cls/acc": 0.9, "cls/auc": 0.95}
    rows = {
        "joint": dict(models=1, train_gflops=3.0, amortised_gflops=5.0, total_gflops=8.0, wall_time_s=2.0,
                      amortised_wall_time_s=4.0, total_wall_time_s=6.0, cpu_time_s=2.0, amortised_cpu_time_s=4.0,
                      total_cpu_time_s=6.0, **{**scores, "seg/dice": joint_dice}),
        "scratch": dict(models=3, train_gflops=10.0, amortised_gflops=10.0, total_gflops=10.0, wall_time_s=10.0,
                        amortised_wall_time_s=10.0, total_wall_time_s=10.0, cpu_time_s=10.0,
                        amortised_cpu_time_s=10.0, total_cpu_time_s=10.0, **scores),
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    for column in ("trainable_params", "memory_mb", "images_seen"):
        table[column] = 1
    return table


def test_umsrep_rows_give_shares_of_single_task_training_and_the_verdict():
    config = strategy_config("smoke")
    joint, scratch = bench_umsrep.strategy_rows(_strategy_table(joint_dice=0.8), config)
    assert joint["strategy"] == "joint" and scratch["strategy"] == "scratch"
    assert list(joint)[:len(bench_umsrep.COLUMNS) + 1] == ["strategy", *bench_umsrep.COLUMNS]
    assert (joint["flops_vs_e"], joint["time_vs_e"]) == pytest.approx((0.3, 0.2))
    assert (joint["flops_vs_e_with_pretraining"], joint["time_vs_e_with_pretraining"]) == pytest.approx((0.8, 0.6))
    # within 35 % of (e) on its own training, not once all of the pre-training is counted
    assert (joint["criterion"], joint["criterion_with_pretraining"]) == ("pass", "fail")
    assert (scratch["criterion"], scratch["flops_vs_e"]) == ("", 1.0)
    worse, _ = bench_umsrep.strategy_rows(_strategy_table(joint_dice=0.75), config)  # 5 points of Dice below (e)
    assert worse["criterion"] == "fail"
