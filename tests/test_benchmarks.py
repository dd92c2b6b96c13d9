"""The benchmarks run and print the tables they promise (smallest sizes; no timing is asserted).

Their arithmetic is checked with a fake clock or a fake timed function that takes known times:
which rounds count, images per second, scaling, ratios and their direction.
"""

import contextlib
import copy
import functools
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from benchmarks import (
    bench_data,
    bench_disentangle,
    bench_engine,
    bench_models,
    bench_umsrep,
)
from benchmarks.__main__ import format_table
from benchmarks.__main__ import main as benchmarks_main
from mtlearn.mtl import build_model, monai_baseline
from mtlearn.umsrep import strategy_config
from mtlearn.utils import count_parameters, pick_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_threads():
    """torch on 2 threads during the test, not the count a benchmark sets (so that setting it, copying it
    or not restoring it shows); the caller's count back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


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


def _number(text: str) -> float:
    """A number as format_table prints it: 3 significant digits, or a thousands separator from 1,000."""
    return float(text.replace(",", ""))


@pytest.mark.slow
def test_quick_run_prints_a_table_per_chosen_group():
    """The cheapest groups through the command line, as the README runs them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "data", "engine", "disentangle",
                           "umsrep"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # first what the tables need before they are compared with another run's
    assert re.match(r"\d{4}-\d\d-\d\d \| commit \S+ \| python 3\.\d+\.\d+ \| torch \S+ \| monai \S+ \| device \S+ .*"
                    r"\| load \S+ on \d+ CPUs\n", done.stdout), done.stdout[:300]
    tables = _tables(done.stdout)
    assert list(tables) == ["data", "engine", "disentangle", "umsrep"]  # the chosen groups only, in order
    # the two groups that only train and score: a column they read (umsrep's cuda_peak_mib, say) renamed in the
    # package broke them, and no test ran them
    assert len(tables["disentangle"]) >= 1 and len(tables["umsrep"]) >= 1

    data = tables["data"]
    assert list(data[0]) == ["benchmark", "setting", "value", "unit", "target", "cpu_s", "ms_per_item"]
    # --quick draws a tenth of the items and scales the time up to 10,000
    assert [row["setting"] for row in data] == ["10,000 items, 128 px, 1 process (from 1,000)",
                                                "10,000 items, 256 px, 1 process (from 250)"]
    assert [row["target"] for row in data] == ["< 10", ""]  # the target is for 128 px only
    assert all(_number(row["value"]) > 0 and row["unit"] == "s" for row in data)

    engine = tables["engine"]
    expected = [config["name"] for config in bench_engine._configs(pick_device("auto"), quick=True)]
    assert [row["config"] for row in engine] == expected
    measured = [row for row in engine if not row.get("note")]  # no note column when nothing was skipped
    assert measured[0]["config"] == "fp32"  # the reference row
    assert all(row["preset"] == "tiny" and row["image_size"] == "64" and row["batch"] == "8" for row in engine)
    reference = _number(measured[0]["images_per_s"])
    for row in measured:  # the printed columns agree with each other, to their rounding (3 significant digits)
        rate = _number(row["images_per_s"])
        assert _number(row["images_per_s_min"]) <= rate <= _number(row["images_per_s_max"]) and row["rounds"] == "2"
        # each printed value is off by up to 0.5 %, so a ratio of two of them by up to about 1.5 %
        assert _number(row["speedup"]) == pytest.approx(rate / reference, rel=0.02)
        assert _number(row["step_ms"]) == pytest.approx(1000 * 8 / rate, rel=0.02)
        wait, target = _number(row["data_wait_pct"]), bench_engine.DATA_WAIT_TARGET_PCT
        if abs(wait - target) > 0.01 * target:  # nearer than its rounding, the table cannot tell the verdict
            assert row["data_wait_ok"] == str(wait < target)
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
    rows = bench_models.measure(32, ["tiny", "monai unet"], batch_size=1, rounds=1, in_channels=1, device="cpu")
    assert [row["model"] for row in rows] == ["tiny", "monai unet"]
    expected_params = [count_parameters(build_model("tiny", in_channels=1, image_size=32)),
                       count_parameters(monai_baseline("unet", 1, 2, 32))]
    assert [row["params_M"] for row in rows] == pytest.approx([p / 1e6 for p in expected_params])
    assert all(row["input"] == "32x32x1" and row["batch"] == 1 and row["device"] == "cpu" for row in rows)
    assert all(row["GFLOPs_fwd"] > 0 and row["train_img_per_s"] > 0 for row in rows)
    for row in rows:  # both layouts timed; the faster one reported
        assert row["train_img_per_s"] == max(row["img_per_s_contiguous"], row["img_per_s_channels_last"])
        assert row["train_img_per_s"] == row[f"img_per_s_{row['layout']}"]
    assert all(row["vs_swinunetr"] == "" for row in rows)  # no SwinUNETR row to compare with
    two = bench_models.measure(32, ["tiny"], batch_size=2, rounds=1, in_channels=1, device="cpu")[0]
    assert two["GFLOPs_fwd"] == pytest.approx(rows[0]["GFLOPs_fwd"])  # per image, whatever the batch


class _Clock:
    """A stand-in for the `time` module: `wall` and `cpu` seconds move only when a fake step says so."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu


class _StubModel(nn.Conv2d):
    """A real (tiny) module, so that FLOPs and parameters can be counted, with a name to look its times up."""

    def __init__(self, name: str):
        super().__init__(3, 2, 3)
        self.name = name


def _layout(tensor: torch.Tensor) -> str:
    return "contiguous" if tensor.is_contiguous() else "channels_last"


def test_models_rates_leave_out_the_warmup_and_compare_each_model_in_its_faster_layout(monkeypatch):
    # seconds of each step, round by round; round 0 (the warm-up) is made the fastest by far
    seconds = {("paper", "contiguous"): [0.001, 4.0, 5.0], ("paper", "channels_last"): [0.001, 3.0, 2.0],
               ("monai swinunetr", "contiguous"): [0.001, 3.0, 4.0],
               ("monai swinunetr", "channels_last"): [0.001, 6.0, 5.0]}
    clock = _Clock()

    order = []

    def step(model, optimizer, images, amp_dtype):
        assert _layout(model.weight) == _layout(images)  # model and input converted alike
        order.append((model.name, _layout(images)))
        clock.wall += seconds[model.name, _layout(images)].pop(0)

    monkeypatch.setattr(bench_models, "_models", lambda size, channels, names: {n: _StubModel(n) for n in names})
    monkeypatch.setattr(bench_models, "_train_step", step)
    monkeypatch.setattr(bench_models, "time", clock)
    paper, swin = bench_models.measure(8, ["paper", "monai swinunetr"], batch_size=4, rounds=2, device="cpu")
    assert all(not left for left in seconds.values())  # a warm-up round and 2 timed rounds of every layout
    assert order == [*seconds] * 3  # round-robin: every model and layout once per round, not one after another
    # images/s = batch / the best timed step of each layout
    assert (paper["img_per_s_contiguous"], paper["img_per_s_channels_last"]) == pytest.approx((4 / 4.0, 4 / 2.0))
    assert (swin["img_per_s_contiguous"], swin["img_per_s_channels_last"]) == pytest.approx((4 / 3.0, 4 / 5.0))
    assert (paper["layout"], swin["layout"]) == ("channels_last", "contiguous")
    assert (paper["train_img_per_s"], swin["train_img_per_s"]) == pytest.approx((2.0, 4 / 3))
    # best against best: 2.0 / 1.33 (one layout for both would read 2.5 or 0.75)
    assert (paper["vs_swinunetr"], swin["vs_swinunetr"]) == pytest.approx((1.5, 1.0))
    assert (paper["spread"], swin["spread"]) == pytest.approx((3.0 / 2.0, 4.0 / 3.0))  # of the faster layout


class _AutocastRecorder(_StubModel):
    """Records, at every training forward pass, the CPU autocast dtype in force (None when off)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.seen = []

    def forward(self, images):
        if self.training:
            self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return {"seg": super().forward(images)}


@pytest.mark.parametrize("amp, dtype", [("off", None), ("bf16", torch.bfloat16)])
def test_models_amp_runs_every_timed_forward_under_its_autocast(monkeypatch, amp, dtype):
    recorders = []

    def models(size, channels, names):
        recorders.extend(_AutocastRecorder(n) for n in names)
        return {r.name: r for r in recorders}

    monkeypatch.setattr(bench_models, "_models", models)
    monkeypatch.setattr(bench_models.copy, "deepcopy", lambda model: model)  # one recorder sees both layouts
    (row,) = bench_models.measure(8, ["tiny"], batch_size=2, rounds=1, device="cpu", amp=amp)
    assert recorders[0].seen == [dtype] * 4  # (warm-up + 1 timed round) x 2 layouts
    assert row["amp"] == amp


def test_models_refuse_an_unknown_amp_before_measuring(monkeypatch, capsys):
    monkeypatch.setattr(bench_models, "measure", lambda *args, **kwargs: pytest.fail("measured"))
    with pytest.raises(ValueError, match=r"unknown amp 'fp16'; expected one of \('off', 'bf16'\)"):
        bench_models.run(quick=True, groups=("course",), device="cpu", amp="fp16")
    with pytest.raises(SystemExit) as exit_:
        bench_models.main(["--amp", "fp16"])
    assert exit_.value.code == 2 and "--amp: invalid choice: 'fp16'" in capsys.readouterr().err


def test_models_time_a_step_between_two_synchronisations(monkeypatch):
    events = []
    clock = _Clock()
    monkeypatch.setattr(clock, "perf_counter", lambda: events.append("clock") or 0.0)
    monkeypatch.setattr(bench_models, "time", clock)
    monkeypatch.setattr(bench_models, "synchronize", lambda device: events.append(f"sync {device}"))
    monkeypatch.setattr(bench_models, "_train_step", lambda *args: events.append("step"))
    bench_models._timed_step(None, None, torch.zeros(1))
    assert events == ["sync cpu", "clock", "step", "sync cpu", "clock"]  # on CUDA, queued work is waited for


_PAGE_FAULTS = """
import os, resource, sys
import torch
from benchmarks.bench_models import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.empty(64 << 20).fill_(1.0)  # a 256 MB block, touched, freed: once, before counting
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(64 << 20).fill_(1.0)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, os.sysconf("SC_PAGE_SIZE"))
"""


def _page_faults(mode: str) -> tuple[str, int, int]:
    """(what keep_freed_memory returned, or None; minor page faults of 5 rounds; the page size)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}  # torch's huge pages: no faults to count
    done = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**env, "PYTHONPATH": str(ROOT)})
    kept, faults, page = done.stdout.split()
    return kept, int(faults), int(page)


def _huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.is_file() and "[always]" in path.read_text()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or _huge_pages_always(),
                    reason="glibc's mallopt; with transparent huge pages always on, 2 MB pages hide the faults")
def test_keep_freed_memory_stops_the_page_faults_of_large_blocks():
    _, faults, page = _page_faults("default")
    block = (256 << 20) // page  # pages of one 256 MB block
    assert faults > 4 * block  # with glibc's defaults each block is a fresh mmap: new pages in each of 5 rounds
    kept, faults, _ = _page_faults("keep")
    assert kept == "True"
    assert faults < 1.5 * block  # reused; at most one round touches a new block while the heap settles


def test_models_run_keeps_freed_memory_on_the_cpu_unless_asked_not_to(monkeypatch, two_threads):
    calls = []
    monkeypatch.setattr(bench_models, "keep_freed_memory", lambda: calls.append("kept") or True)
    seen = []  # threads and rounds as measure gets them: the table's and the heading's
    monkeypatch.setattr(bench_models, "measure", lambda *args, **kwargs: seen.append(
        (torch.get_num_threads(), kwargs["rounds"])) or [{"model": "tiny"}])
    rows = bench_models.run(quick=True, groups=("course",), device="cpu", threads=1, rounds=3)
    assert rows[0]["malloc"] == "kept"
    assert seen == [(1, 3)] and torch.get_num_threads() == 2  # restored afterwards
    assert calls == ["kept"]
    assert bench_models.run(quick=True, groups=("course",), device="cpu", default_malloc=True)[0]["malloc"] == "default"
    assert calls == ["kept"]  # not called again
    monkeypatch.setattr(bench_models, "keep_freed_memory", lambda: False)  # no glibc: said so, not claimed
    assert bench_models.run(quick=True, groups=("course",), device="cpu")[0]["malloc"] == "default"
    monkeypatch.setattr(bench_models, "_malloc_changed", True)  # kept earlier in this process: cannot be undone
    with pytest.raises(ValueError, match=r"already keeps its freed memory.*new process"):
        bench_models.run(quick=True, groups=("course",), device="cpu", default_malloc=True)
    run_args = []
    monkeypatch.setattr(bench_models, "run", lambda **kwargs: run_args.append(kwargs) or [{"model": "tiny"}])
    bench_models.main(["--default-malloc", "--group", "course"])
    assert run_args[0]["default_malloc"] is True


def test_models_refuses_an_unknown_group_and_bad_options(monkeypatch, capsys):
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"unknown benchmark group\(s\) \['gpu'\]"):
        bench_models.run(quick=True, groups=("gpu",))
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(bench_models, "run", _must_not_run)  # a broken check fails at once, not after a benchmark
    for argv, message in ((["--rounds", "0"], "--rounds must be >= 1, got 0"),  # before anything is measured
                          (["--device", "tpu"], "unknown device 'tpu'")):
        with pytest.raises(SystemExit) as exit_:
            bench_models.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_engine_alternates_the_configurations_and_reports_medians(monkeypatch, two_threads):
    names = [c["name"] for c in bench_engine._configs(pick_device("auto"), quick=True) if not c.get("skip")]
    # epoch seconds (4 steps of 8 images: 32 images) and data shares, round by round; round 0 warms up
    epochs = {name: [(0.001, 0.5), (1.0, 0.01), (1.0, 0.01), (1.0, 0.01)] for name in names}
    epochs["fp32"] = [(0.001, 0.9), (1.0, 0.01), (4.0, 0.02), (2.0, 0.10)]  # 32, 8, 16 images/s
    epochs["fp32 + channels_last"] = [(0.001, 0.0), (0.5, 0.06), (0.5, 0.07), (8.0, 0.08)]  # 64, 64, 4
    calls = []

    def epoch(config, model, loader, device):
        calls.append(config["name"])
        threads.add(torch.get_num_threads())
        seconds, share = epochs[config["name"]].pop(0)
        return {"epoch_time": seconds, "data_share": share}

    monkeypatch.setattr(bench_engine, "_build", lambda config, dataset, device: (None, None))
    monkeypatch.setattr(bench_engine, "_epoch", epoch)
    threads = set()
    rows = {row["config"]: row for row in bench_engine.run(quick=True, rounds=3)}
    assert calls == names * 4  # every configuration once per round, in turn
    if pick_device("auto").type == "cpu":
        assert threads == {1}  # one thread per process on a CPU, as the table's column says
    fp32, channels_last = rows["fp32"], rows["fp32 + channels_last"]
    assert (fp32["images_per_s"], fp32["images_per_s_min"], fp32["images_per_s_max"]) == pytest.approx((16, 8, 32))
    assert fp32["step_ms"] == pytest.approx(500) and fp32["rounds"] == 3 and fp32["warmup_s"] == 0.001
    assert channels_last["images_per_s"] == pytest.approx(64)
    assert channels_last["speedup"] == pytest.approx(4.0) and fp32["speedup"] == 1.0  # ratio of the medians
    if "bf16 autocast" in names:  # left out on a GPU without native bf16 (e.g. a T4)
        assert rows["bf16 autocast"]["speedup"] == pytest.approx(2.0)
    assert (fp32["data_wait_pct"], fp32["data_wait_ok"]) == (pytest.approx(2.0), True)
    assert (channels_last["data_wait_pct"], channels_last["data_wait_ok"]) == (pytest.approx(7.0), False)


@pytest.mark.parametrize("capability, bf16_rows", [((7, 5), 0), ((8, 0), 2)])  # T4: emulated bf16; A100: native
def test_engine_times_bf16_on_a_gpu_only_where_fit_accepts_it(monkeypatch, capability, bf16_rows):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    names = [c["name"] for c in bench_engine._configs(torch.device("cuda"), quick=False)]
    assert "fp16 autocast + GradScaler" in names
    assert sum(name.startswith("bf16") for name in names) == bf16_rows


def test_data_scales_quick_runs_up_and_leaves_out_the_warmup(monkeypatch):
    clock = _Clock()

    class FakeUltrasound:  # each item costs 1 ms of wall time (0.5 ms CPU) per 128x128 pixels; the first 5 s
        def __init__(self, num_samples, image_size, seed):
            self.item_seconds, self.calls = (image_size / 128) ** 2 / 1000, 0

        def __getitem__(self, index):
            self.calls += 1
            seconds = 5.0 if self.calls == 1 else self.item_seconds
            clock.wall, clock.cpu = clock.wall + seconds, clock.cpu + seconds / 2

    monkeypatch.setattr(bench_data, "SyntheticUltrasound", FakeUltrasound)
    monkeypatch.setattr(bench_data, "time", clock)
    small, large = bench_data.run(quick=True)  # 1,000 items at 128 px and 250 at 256 px, scaled to 10,000
    assert (small["value"], small["cpu_s"], small["ms_per_item"]) == pytest.approx((10.0, 5.0, 1.0))
    assert (large["value"], large["cpu_s"], large["ms_per_item"]) == pytest.approx((40.0, 20.0, 4.0))


def test_main_passes_threads_and_rounds_only_to_the_groups_that_take_them(monkeypatch, capsys):
    calls = {}
    for name, module in (("data", bench_data), ("models", bench_models), ("engine", bench_engine),
                         ("umsrep", bench_umsrep)):
        def fake(name=name, **kwargs):
            calls[name] = kwargs
            return [{"group": name}]
        monkeypatch.setattr(module, "run", functools.wraps(module.run)(fake))  # keeps run's signature
    benchmarks_main(["--only", "data", "models", "engine", "umsrep", "--threads", "1", "--rounds", "3"])
    assert calls == {"data": {"quick": False}, "models": {"quick": False, "threads": 1, "rounds": 3},
                     "engine": {"quick": False, "rounds": 3}, "umsrep": {"quick": False, "threads": 1}}
    assert list(calls) == ["data", "engine", "umsrep", "models"]  # models last: it changes the allocator
    printed = capsys.readouterr().out
    assert "## models  (0 s, threads 1, rounds 3)" in printed
    assert "## data  (0 s; --threads does not apply; --rounds does not apply)" in printed  # not dropped silently
    assert "## engine  (0 s, rounds 3; --threads does not apply)" in printed
    benchmarks_main(["--only", "data", "data"])  # a group named twice runs once
    assert capsys.readouterr().out.count("## data") == 1
    monkeypatch.setattr(bench_disentangle, "run", _must_not_run)  # the one group not faked above
    for argv, message in ((["--only"], "--only: expected at least one argument"),  # no group named, or no round
                          (["--rounds", "0"], "--rounds must be >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_:
            benchmarks_main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("module", [bench_disentangle, bench_umsrep])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_bad_seed_is_a_usage_error_before_anything_runs(module, seed, monkeypatch, capsys):
    """It was a traceback from the first training, after the data had been generated."""
    monkeypatch.setattr(module, "run" if module is bench_disentangle else "compare", _must_not_run)
    with pytest.raises(SystemExit):
        module.main(["--quick", "--seed", seed])
    assert f"--seed must be in 0 .. 2**32 - 1, got {seed}" in capsys.readouterr().err


def _must_not_run(*args, **kwargs):
    raise AssertionError("the benchmark ran despite a bad option")


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


def test_disentangle_criterion_passes_values_at_their_limits_and_fails_nan():
    """0.55 + 0.15 is 0.7000000000000001: a shared probe of exactly 0.70 failed "0.15 higher"; and every
    check was written "fail if x < limit", so NaN everywhere passed."""
    at_limits = bench_disentangle.add_criterion(_disentangle_rows(0.90, 0.70, 0.55, 0.70))
    assert at_limits[0]["criterion"] == "pass"
    nan = float("nan")
    assert bench_disentangle.add_criterion(_disentangle_rows(nan, nan, nan, nan))[0]["criterion"] == (
        "fail (unseen nan < 0.9; shared unseen nan not 20% lower; probe nan > 0.6; "
        "shared probe nan not clearly higher)")


def _strategy_table(joint_dice: float, joint_cpu: float = 2.0) -> pd.DataFrame:
    """A hand-made compare_strategies table: (d) joint trains 30 % of (e)'s FLOPs in 20 % of its wall time
    and `joint_cpu` / 10 of its CPU time."""
    scores = {"recon/psnr": 20.0, "recon/ssim": 0.5, "seg/dice": 0.8, "cls/acc": 0.9, "cls/auc": 0.95}
    rows = {
        "joint": dict(models=1, train_gflops=3.0, amortised_gflops=5.0, total_gflops=8.0, wall_time_s=2.0,
                      amortised_wall_time_s=4.0, total_wall_time_s=6.0, cpu_time_s=joint_cpu,
                      amortised_cpu_time_s=joint_cpu + 2, total_cpu_time_s=joint_cpu + 4,
                      **{**scores, "seg/dice": joint_dice}),
        "scratch": dict(models=3, train_gflops=10.0, amortised_gflops=10.0, total_gflops=10.0, wall_time_s=10.0,
                        amortised_wall_time_s=10.0, total_wall_time_s=10.0, cpu_time_s=10.0,
                        amortised_cpu_time_s=10.0, total_cpu_time_s=10.0, **scores),
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    for column in ("trainable_params", "images_seen"):
        table[column] = 1
    table["memory_mib"], table["cuda_peak_mib"] = [7.0, 9.0], float("nan")  # an estimate; not measured on a CPU
    return table


def test_umsrep_rows_give_shares_of_single_task_training_and_the_verdict():
    config = strategy_config("smoke")
    joint, scratch = bench_umsrep.strategy_rows(_strategy_table(joint_dice=0.8), config)
    assert joint["strategy"] == "joint" and scratch["strategy"] == "scratch"
    assert list(joint)[:len(bench_umsrep.COLUMNS) + 1] == ["strategy", *bench_umsrep.COLUMNS]
    assert (joint["flops_vs_e"], joint["time_vs_e"], joint["cpu_vs_e"]) == pytest.approx((0.3, 0.2, 0.2))
    assert (joint["flops_vs_e_with_pretraining"], joint["time_vs_e_with_pretraining"],
            joint["cpu_vs_e_with_pretraining"]) == pytest.approx((0.8, 0.6, 0.6))
    assert (joint["memory_est_mib"], scratch["memory_est_mib"]) == (7.0, 9.0) and "memory_mib" not in joint
    assert math.isnan(joint["cuda_peak_mib"])
    # within 35 % of (e) on its own training, not once all of the pre-training is counted
    assert joint["criterion"] == "pass"
    assert joint["criterion_with_pretraining"] == "fail (flops 0.80, time 0.60, cpu 0.60)"
    assert (scratch["criterion"], scratch["flops_vs_e"]) == ("", 1.0)
    worse, _ = bench_umsrep.strategy_rows(_strategy_table(joint_dice=0.75), config)  # 5 points of Dice below (e)
    busy = _strategy_table(joint_dice=0.8)
    busy.loc["scratch", "cpu_time_s"] = 20.0  # (e)'s CPU time differs from its wall time on a loaded machine
    assert bench_umsrep.strategy_rows(busy, config)[0]["cpu_vs_e"] == pytest.approx(0.1)  # CPU over CPU
    assert worse["criterion"] == "fail (metrics)"


def test_umsrep_verdict_names_only_what_counted():
    """An unmeasured share (NaN) is left out of the check, so it is no reason for a failure either."""
    check = {"passed": False, "metrics_ok": False, "unmeasured": ["cpu_share_train"], "flops_share_train": 0.3,
             "time_share_train": 0.35 + 1e-12, "cpu_share_train": float("nan")}
    assert bench_umsrep.verdict(check, "train", 0.35) == "fail (metrics)"
    check.update(metrics_ok=True, time_share_train=0.5)
    assert bench_umsrep.verdict(check, "train", 0.35) == "fail (time 0.50)"


def test_umsrep_verdict_also_needs_the_cpu_time_share():
    """Wall time within 35 % (20 %), but the process worked half as long as (e): a busy moment for (e)."""
    joint, _ = bench_umsrep.strategy_rows(_strategy_table(joint_dice=0.8, joint_cpu=5.0), strategy_config("smoke"))
    assert (joint["time_vs_e"], joint["cpu_vs_e"]) == pytest.approx((0.2, 0.5))
    assert joint["criterion"] == "fail (cpu 0.50)"


def test_engine_epoch_hands_each_configuration_its_precision_layout_and_compile_to_fit(monkeypatch):
    """A bf16, channels_last or compile row that reached fit as plain fp32 would time fp32 under another name."""
    calls = []

    class History:
        records = [{"epoch_time": 1.0, "data_share": 0.0}]

    monkeypatch.setattr(bench_engine, "fit", lambda *args, **kwargs: calls.append(kwargs) or History())
    configs = bench_engine._configs(torch.device("cpu"), quick=False)
    for config in configs:
        assert bench_engine._epoch(config, None, None, torch.device("cpu")) == History.records[-1]
    seen = {config["name"]: (kwargs["amp"], kwargs["channels_last"], kwargs["compile"], kwargs["epochs"])
            for config, kwargs in zip(configs, calls)}
    assert seen == {
        "fp32": ("off", False, False, 1), "fp32 + channels_last": ("off", True, False, 1),
        "bf16 autocast": ("bf16", False, False, 1), "bf16 autocast + channels_last": ("bf16", True, False, 1),
        "fp32, 2 loader workers": ("off", False, False, 1), "fp32, images cached in memory": ("off", False, False, 1),
        "fp32 + torch.compile": ("off", False, True, 1)}


def test_engine_build_gives_the_loader_its_workers_and_caches_the_images_in_memory(monkeypatch):
    monkeypatch.setattr(bench_engine, "build_model", lambda *args, **kwargs: nn.Linear(1, 1))
    reads = []

    class Items:
        def __len__(self):
            return 16

        def __getitem__(self, index):
            reads.append(index)
            return torch.zeros(1)

    dataset = Items()
    built = {c["name"]: bench_engine._build(c, dataset, torch.device("cpu"))[1]
             for c in bench_engine._configs(torch.device("cpu"), quick=False)}
    assert {name: loader.num_workers for name, loader in built.items() if loader.num_workers} == {
        "fp32, 2 loader workers": 2}
    cached = built["fp32, images cached in memory"].dataset
    assert isinstance(cached, list) and len(cached) == 16 and reads == list(range(16))  # each item made once
    assert all(loader.dataset is dataset for name, loader in built.items() if name != "fp32, images cached in memory")
    assert all(loader.batch_size == bench_engine.BATCH_SIZE and loader.drop_last for loader in built.values())


def _engine_run(monkeypatch, quick, share=0.01, seconds=1.0):
    """bench_engine.run on a (forced) CPU with fake epochs: (rows, names of the epochs timed, datasets built on).
    Its callers take the two_threads fixture."""
    calls, datasets = [], []
    monkeypatch.setattr(bench_engine, "pick_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(bench_engine, "load_dataset", lambda *args, **kwargs: list(range(1000)))
    monkeypatch.setattr(bench_engine, "_build", lambda config, dataset, device: datasets.append(dataset) or (0, 0))
    monkeypatch.setattr(bench_engine, "_epoch", lambda config, model, loader, device: calls.append(
        config["name"]) or {"epoch_time": seconds, "data_share": share})
    rows = bench_engine.run(quick=quick)
    assert torch.get_num_threads() == 2  # the two_threads fixture's, restored
    return rows, calls, datasets


def test_engine_data_wait_of_exactly_the_target_is_not_under_it(monkeypatch, two_threads):
    rows, _, _ = _engine_run(monkeypatch, quick=True, share=0.05)
    assert all(row["data_wait_pct"] == pytest.approx(5.0) and row["data_wait_ok"] is False
               for row in rows if "images_per_s" in row)
    rows, _, _ = _engine_run(monkeypatch, quick=True, share=0.0499)
    assert all(row["data_wait_ok"] is True for row in rows if "images_per_s" in row)


def test_engine_threads_column_is_the_count_the_configurations_ran_with(monkeypatch, two_threads):
    rows, _, _ = _engine_run(monkeypatch, quick=True)
    assert [row["threads"] for row in rows] == [1] * len(rows)  # set to 1 on a CPU; the caller had 2


def test_engine_full_cpu_run_times_compile_for_5_rounds_of_8_steps(monkeypatch, two_threads):
    assert bench_engine._configs(torch.device("cpu"), quick=False)[-1]["skip"] is None
    assert bench_engine._configs(torch.device("cpu"), quick=True)[-1]["skip"].startswith("skipped with --quick")
    rows, calls, datasets = _engine_run(monkeypatch, quick=False, seconds=2.0)
    names = [c["name"] for c in bench_engine._configs(torch.device("cpu"), quick=False)]
    assert "fp32 + torch.compile" in names and calls == names * 6  # a warm-up and 5 timed rounds, compile too
    assert all(len(dataset) == 8 * bench_engine.BATCH_SIZE for dataset in datasets)  # 8 steps of 8 images
    assert all("note" not in row and row["rounds"] == 5 for row in rows)
    assert all(row["images_per_s"] == pytest.approx(64 / 2.0) for row in rows)  # 64 images an epoch of 2 s


def test_models_full_run_measures_the_paper_batches_8_and_2_and_the_course_batch_8(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_models, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(bench_models, "measure", lambda size, names, **kwargs: calls.append(
        (size, tuple(names), kwargs["batch_size"], kwargs["rounds"])) or [{"model": names[0]}])
    bench_models.run(quick=False, device="cpu", threads=1)
    paper = ("paper", "monai swinunetr", "monai unet", "course", "tiny")
    assert calls == [(224, paper, 8, 2), (224, paper, 2, 2), (128, ("course", "tiny", "monai unet"), 8, 2)]


def test_umsrep_total_verdict_reads_the_with_pretraining_check():
    check = {"passed": True, "passed_amortised": True, "passed_with_pretraining": False, "metrics_ok": True,
             "unmeasured": [], **{f"{name}_share_total": 0.8 for name in ("flops", "time", "cpu")},
             **{f"{name}_share_amortised": 0.3 for name in ("flops", "time", "cpu")}}
    assert bench_umsrep.verdict(check, "total", 0.35) == "fail (flops 0.80, time 0.80, cpu 0.80)"
    assert bench_umsrep.verdict(check, "amortised", 0.35) == "pass"
    check.update(passed_amortised=False, passed_with_pretraining=True)
    assert bench_umsrep.verdict(check, "total", 0.35) == "pass"


def test_umsrep_passes_its_threads_and_seed_on_and_restores_the_threads(monkeypatch, capsys, two_threads):
    seen = []

    def strategies(config):
        seen.append((torch.get_num_threads(), config.seed, config.profile))
        return _strategy_table(joint_dice=0.8)

    monkeypatch.setattr(bench_umsrep, "compare_strategies", strategies)
    bench_umsrep.main(["--quick", "--threads", "3", "--seed", "7"])
    assert torch.get_num_threads() == 2
    rows = bench_umsrep.run(quick=True, seed=5, threads=1)
    assert torch.get_num_threads() == 2
    assert seen == [(3, 7, "smoke"), (1, 5, "smoke")]
    assert rows[0]["criterion"] == "pass" and "joint vs (e)" in capsys.readouterr().out


def test_disentangle_passes_its_seed_epochs_and_threads_on_and_restores_the_threads(monkeypatch, capsys,
                                                                                    two_threads):
    seen = []

    def experiment(kind, config, seed, device, progress):
        seen.append((kind, torch.get_num_threads(), seed, config.epochs))
        return nn.Linear(1, 1), None, {"unseen_shape_acc": 0.95 if kind == "disentangle" else 0.5,
                                       "probe_background_a": 0.5 if kind == "disentangle" else 0.9}

    monkeypatch.setattr(bench_disentangle, "shapes_experiment", experiment)
    bench_disentangle.main(["--quick", "--seed", "7", "--epochs", "3", "--threads", "3"])
    assert torch.get_num_threads() == 2
    rows = bench_disentangle.run(quick=True, seed=5, threads=1, epochs=4)
    assert torch.get_num_threads() == 2
    kinds = list(bench_disentangle.MODELS)
    assert seen == [(kind, 3, 7, 3) for kind in kinds] + [(kind, 1, 5, 4) for kind in kinds]
    assert rows[0]["criterion"] == "pass" and "pass" in capsys.readouterr().out


class _DictConv(nn.Conv2d):
    """A tiny real model with the presets' output: a dict of task outputs."""

    def __init__(self):
        super().__init__(3, 2, 3)

    def forward(self, images):
        return {"seg": super().forward(images)}


def test_models_train_step_backpropagates_and_steps_the_optimizer():
    """Every timing test stubs _train_step: one without backward or step would time a forward pass only."""
    torch.manual_seed(0)
    model = _DictConv()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    bench_models._train_step(model, optimizer, torch.randn(2, 3, 8, 8))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # gradients left
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # and every weight moved
    assert optimizer.state  # AdamW took its step


def test_models_build_the_named_presets_and_swinunetr_48(monkeypatch):
    """The paper row built from the course preset, or SwinUNETR at feature size 24, would time other models
    under the paper's names (the table's point is the paper preset beside SwinUNETR-48)."""
    built = {}

    def builder(kind):
        def build(*args, **kwargs):
            built[kind, args[0]] = (args, kwargs)
            return (kind, args[0])
        return build

    monkeypatch.setattr(bench_models, "build_model", builder("preset"))
    monkeypatch.setattr(bench_models, "monai_baseline", builder("monai"))
    names = ["tiny", "course", "paper", "monai unet", "monai swinunetr"]
    models = bench_models._models(96, 1, names)
    assert models == {"tiny": ("preset", "tiny"), "course": ("preset", "course"), "paper": ("preset", "paper"),
                      "monai unet": ("monai", "unet"), "monai swinunetr": ("monai", "swinunetr")}
    for preset in ("tiny", "course", "paper"):
        assert built["preset", preset] == ((preset,), {"in_channels": 1, "image_size": 96})
    assert built["monai", "unet"] == (("unet", 1, 2, 96), {})
    assert built["monai", "swinunetr"] == (("swinunetr", 1, 2, 96), {"feature_size": 48})


@pytest.mark.parametrize("quick", [False, True])
def test_models_paper_group_passes_the_rounds_asked_for(monkeypatch, quick):
    """rounds=3 replaced by the paper group's default (2; quick 1) would time fewer rounds than asked."""
    rounds = []
    monkeypatch.setattr(bench_models, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(bench_models, "measure", lambda size, names, **kwargs: rounds.append(
        kwargs["rounds"]) or [{"model": names[0]}])
    bench_models.run(quick=quick, groups=("paper",), device="cpu", threads=1, rounds=3)
    assert rounds == [3] * (1 if quick else 2)  # every batch of the group
    rounds.clear()  # the defaults: quick's single round left the ratio to one step (2.09 and 7.51 in two runs)
    bench_models.run(quick=quick, groups=("paper",), device="cpu", threads=1)
    assert rounds == ([3] if quick else [2, 2])


def test_models_compare_with_swinunetr_in_its_faster_layout_channels_last(monkeypatch):
    """With SwinUNETR faster in channels_last, its contiguous rate as the reference would flatter every row."""
    seconds = {("paper", "contiguous"): [0.001, 2.0], ("paper", "channels_last"): [0.001, 4.0],
               ("monai swinunetr", "contiguous"): [0.001, 8.0],
               ("monai swinunetr", "channels_last"): [0.001, 4.0]}
    clock = _Clock()

    def step(model, optimizer, images, amp_dtype):
        clock.wall += seconds[model.name, _layout(images)].pop(0)

    monkeypatch.setattr(bench_models, "_models", lambda size, channels, names: {n: _StubModel(n) for n in names})
    monkeypatch.setattr(bench_models, "_train_step", step)
    monkeypatch.setattr(bench_models, "time", clock)
    paper, swin = bench_models.measure(8, ["paper", "monai swinunetr"], batch_size=4, rounds=1, device="cpu")
    assert (swin["layout"], swin["train_img_per_s"]) == ("channels_last", pytest.approx(1.0))
    # 2.0 / 1.0, each in its faster layout (against SwinUNETR's contiguous 0.5 it would read 4.0)
    assert (paper["vs_swinunetr"], swin["vs_swinunetr"]) == pytest.approx((2.0, 1.0))


def test_models_train_step_autocasts_on_the_images_device(monkeypatch):
    """autocast fixed to "cpu" would leave a CUDA forward pass in float32 under --amp bf16. The images here
    only claim to be on CUDA (no GPU is needed): the fake autocast records the device type it is given."""
    seen = []

    def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        seen.append((device_type, dtype, enabled))
        return contextlib.nullcontext()

    class Images:
        device = torch.device("cuda")

    weight = nn.Parameter(torch.ones(2))
    model = lambda images: {"seg": weight * 2}
    optimizer = torch.optim.AdamW([weight], lr=1e-2)
    monkeypatch.setattr(torch, "autocast", autocast)
    bench_models._train_step(model, optimizer, Images(), torch.bfloat16)
    bench_models._train_step(model, optimizer, Images())
    assert [(device, enabled) for device, _, enabled in seen] == [("cuda", True), ("cuda", False)]
    assert seen[0][1] is torch.bfloat16


def test_models_run_turns_cudnn_benchmark_on_for_cuda_only_and_restores_it(monkeypatch):
    """As mtlearn's trainer runs on CUDA: cuDNN autotuning off would time slower convolutions than training uses.
    measure is faked and the device claims to be CUDA, so no GPU is needed."""
    seen = []
    monkeypatch.setattr(bench_models, "measure", lambda *args, **kwargs: seen.append(
        (kwargs["device"].type, torch.backends.cudnn.benchmark)) or [{"model": "tiny"}])
    monkeypatch.setattr(bench_models, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(bench_models, "_device", lambda name: torch.device("cuda"))
    rows = bench_models.run(quick=True, groups=("course",), device="cuda", threads=torch.get_num_threads())
    assert seen == [("cuda", True)] and torch.backends.cudnn.benchmark is False  # on while measuring; restored
    assert rows[0]["malloc"] == ""  # no allocator setting on a GPU
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(bench_models, "_device", lambda name: torch.device("cpu"))
    bench_models.run(quick=True, groups=("course",), device="cpu", threads=torch.get_num_threads())
    assert seen[1:] == [("cpu", False)] and torch.backends.cudnn.benchmark is True


def test_models_accept_one_round(monkeypatch, capsys):
    """--rounds 1 is the fewest rounds there can be, not a usage error."""
    calls = []
    monkeypatch.setattr(bench_models, "run", lambda **kwargs: calls.append(kwargs) or [{"model": "tiny"}])
    bench_models.main(["--rounds", "1", "--group", "course"])
    assert [call["rounds"] for call in calls] == [1] and "tiny" in capsys.readouterr().out


def test_engine_loads_the_data_at_the_image_size_of_its_rows(monkeypatch, two_threads):
    """Images twice the size would time another workload than the rows' image_size column says."""
    loads = []
    monkeypatch.setattr(bench_engine, "pick_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(bench_engine, "load_dataset", lambda *args, **kwargs: loads.append(
        (args, kwargs)) or list(range(1000)))
    monkeypatch.setattr(bench_engine, "_build", lambda config, dataset, device: (None, None))
    monkeypatch.setattr(bench_engine, "_epoch", lambda *args: {"epoch_time": 1.0, "data_share": 0.0})
    rows = bench_engine.run(quick=True)
    assert loads == [(("synthetic",), {"split": "train", "image_size": bench_engine.IMAGE_SIZE})]
    assert all(row["image_size"] == bench_engine.IMAGE_SIZE for row in rows)


def test_engine_every_configuration_starts_from_the_same_weights():
    """Without a seed per build each configuration would train other initial weights, so the rows'
    differences would mix in the initialisation."""
    configs = bench_engine._configs(torch.device("cpu"), quick=False)
    models = [bench_engine._build(config, list(range(16)), torch.device("cpu"))[0] for config in configs[:3]]
    first = models[0].state_dict()
    for model in models[1:]:
        assert all(torch.equal(first[key], value) for key, value in model.state_dict().items())


def test_engine_only_a_compile_failure_becomes_a_note(monkeypatch, two_threads):
    """A failing fp32 or bf16 row must stop the benchmark (a bug), not be reported as a failed torch.compile."""

    def failing_in(name):
        def epoch(config, model, loader, device):
            if config["name"] == name:
                raise RuntimeError("broken")
            return {"epoch_time": 1.0, "data_share": 0.0}
        return epoch

    monkeypatch.setattr(bench_engine, "pick_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(bench_engine, "load_dataset", lambda *args, **kwargs: list(range(1000)))
    monkeypatch.setattr(bench_engine, "_build", lambda config, dataset, device: (None, None))
    compiled = "fp32 + torch.compile"  # no compiler tool chain: a note, the other rows timed
    monkeypatch.setattr(bench_engine, "_epoch", failing_in(compiled))
    rows = {row["config"]: row for row in bench_engine.run(quick=False, rounds=1)}
    assert rows[compiled]["note"] == "torch.compile failed: RuntimeError: broken"
    assert "images_per_s" not in rows[compiled]
    assert all("note" not in row and row["rounds"] == 1 for name, row in rows.items() if name != compiled)
    for name in ("bf16 autocast", "fp32"):  # bf16 first: fp32 failing first would stop on a missing baseline too
        monkeypatch.setattr(bench_engine, "_epoch", failing_in(name))
        with pytest.raises(RuntimeError, match="broken"):
            bench_engine.run(quick=False, rounds=1)
        assert torch.get_num_threads() == 2  # restored all the same


def test_engine_quick_times_torch_compile_on_a_gpu(monkeypatch):
    """--quick skips compiling on a CPU only (minutes there); on CUDA it is part of the quick table."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # asked for the bf16 row
    on_gpu, on_cpu = (bench_engine._configs(torch.device(kind), quick=True)[-1] for kind in ("cuda", "cpu"))
    assert on_gpu["compile"] and on_gpu["skip"] is None
    assert on_cpu["compile"] and on_cpu["skip"] is not None


def test_run_header_names_the_device_and_threads_the_run_measures_with(monkeypatch):
    """It read the process's threads and the "auto" device: 16 threads and a GPU printed over a 2-thread CPU
    table."""
    from benchmarks import run_header

    before = torch.get_num_threads()
    line = run_header("cpu", 2)
    assert " | device cpu | " in line and " | cpu_threads 2 | " in line and torch.get_num_threads() == before
    assert f" | cpu_threads {before} | " in run_header("cpu")  # nothing set: the process's own
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("no git")))
    assert " | commit unknown | " in run_header("cpu", 1)  # an unpacked copy without git still gets its line
