import contextlib
import copy
import inspect
import math
import os
import pickle
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mtlearn.checkpoint import save_checkpoint
from mtlearn.disentangle import LossNotFiniteError
from mtlearn.engine import (
    CompileError,
    History,
    NonFiniteLossError,
    NonFiniteWeightsError,
    TrainConfig,
    evaluate,
    fit,
    load_checkpoint,
    resolve_amp,
)
from mtlearn.losses import LossConfig
from mtlearn.metrics import MetricAccumulator
from mtlearn.weighting import WEIGHTINGS, DynamicWeightAverage, FixedWeights, GradNorm, PCGrad, UncertaintyWeighting

TASKS = ("seg", "cls", "recon")
# Many tests continue a finished run for more epochs; the warning that the learning rate then jumps is
# tested where it is the point (test_resume_into_a_longer_run_follows_the_longer_schedule).
pytestmark = pytest.mark.filterwarnings("ignore:resuming .* with epochs=")


class ToyNet(nn.Module):
    """Shared conv encoder (BatchNorm, dropout) and one small head per task; returns a dict like mtl.py."""

    def __init__(self, tasks=TASKS, num_classes=3, nan_at_call=None, nan_task="cls"):
        super().__init__()
        self.tasks = tuple(tasks)
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleDict({"seg": nn.Conv2d(8, 2, 1), "cls": nn.Linear(8, num_classes),
                                    "recon": nn.Conv2d(8, 1, 1)})
        self.nan_at_call, self.nan_task, self.calls, self.feature_dtype = nan_at_call, nan_task, 0, None

    def forward(self, x):
        features = self.encoder(x)  # (B, 8, H, W)
        self.feature_dtype = features.dtype
        out = {"seg": self.heads["seg"](features), "cls": self.heads["cls"](features.mean((2, 3))),
               "recon": self.heads["recon"](features)}
        out = {t: out[t] for t in self.tasks}
        if self.training:
            self.calls += 1
            if self.calls == self.nan_at_call:
                out[self.nan_task] = out[self.nan_task] * float("nan")
        return out


class ToyData(Dataset):
    """Squares on noise; __getitem__ draws from NumPy's and Python's global generators (like augmentation)."""

    def __init__(self, n=16, size=16, seed=0, keys=("image", "mask", "label", "clean"), crash_after=None):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            label = i % 3
            mask = torch.zeros(1, size, size)
            if label:
                mask[:, 4:4 + 4 * label, 4:12] = 1
            clean = 0.1 + 0.8 * mask
            self.items.append({"image": clean + 0.2 * torch.randn(1, size, size, generator=g), "mask": mask,
                               "label": label, "clean": clean})
        self.keys, self.crash_after, self.fetched = keys, crash_after, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.fetched += 1
        if self.crash_after is not None and self.fetched > self.crash_after:
            raise RuntimeError("simulated crash (power cut)")
        item = {k: self.items[i][k] for k in self.keys}
        if random.random() < 0.5:  # a "flip" from Python's generator
            item = {k: v.flip(-1) if torch.is_tensor(v) else v for k, v in item.items()}
        item["image"] = item["image"] + float(np.random.normal(0, 0.01))  # NumPy's generator
        return item


def _loaders(batch_size=4, seed=0, **data_kwargs):
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(ToyData(**data_kwargs), batch_size=batch_size, shuffle=True, generator=generator)
    val = DataLoader(ToyData(n=8, seed=1), batch_size=4)
    return train, val


def _fit(model, train, val, **kwargs):
    options = dict(epochs=2, lr=1e-2, progress=False, seed=0)
    options.update(kwargs)
    return fit(model, train, val, **options)


def _fit_on_cpu(model, train, val, **kwargs):
    """_fit on the CPU even where CUDA is present (device "auto" would pick the GPU)."""
    return _fit(model, train, val, device="cpu", **kwargs)


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_fit_trains_every_weighting(weighting, tmp_path):
    torch.manual_seed(0)
    model = ToyNet()
    before = [p.detach().clone() for p in model.parameters()]
    train, val = _loaders()
    history = _fit(model, train, val, weighting=weighting, out_dir=tmp_path, restore_best=False)
    frame = history.to_frame()
    assert list(frame.index) == [1, 2]
    for key in ("train/seg", "train/cls", "train/recon", "train/total", "weight/seg", "val/seg/dice", "val/cls/auc",
                "val/recon/psnr", "lr", "epoch_time", "data_time", "data_share"):
        assert key in frame and np.isfinite(frame[key]).all(), key
    assert frame["lr"].iloc[1] < frame["lr"].iloc[0] == pytest.approx(1e-2)  # polynomial decay
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed)  # every parameter received a gradient and moved
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_subset_of_model_tasks():
    model = ToyNet(tasks=("seg", "cls"))
    train, val = _loaders(keys=("image", "mask", "label"))  # no "clean" needed for seg + cls
    history = _fit(model, train, val, tasks=("cls",), epochs=1)
    assert "train/seg" not in history.records[0] and "val/cls/acc" in history.records[0]


def test_polynomial_decay_per_iteration():
    model = ToyNet()
    train, _ = _loaders()  # 4 steps per epoch
    history = _fit(model, train, None, epochs=2, lr=1.0e-2, poly_power=0.9)
    # second epoch starts after 4 of 8 iterations: lr = base * (1 - 4/8) ** 0.9
    assert history.records[1]["lr"] == pytest.approx(1e-2 * 0.5**0.9)
    squared = _fit(ToyNet(), train, None, epochs=2, lr=1.0e-2, poly_power=2.0)  # the power is the one given
    assert squared.records[1]["lr"] == pytest.approx(1e-2 * 0.5**2)
    assert type(squared.records[1]["epoch"]) is int  # metrics.json writes 2, not 2.0


@pytest.mark.parametrize("weighting", ["dwa", "uncertainty", "gradnorm", "pcgrad"])
def test_resume_matches_an_uninterrupted_run(weighting, tmp_path):
    # bit-for-bit is promised on the CPU (GPU kernels may be non-deterministic): pinned there
    torch.manual_seed(0)
    reference = ToyNet()
    train, val = _loaders()
    full = _fit_on_cpu(reference, train, val, epochs=3, weighting=weighting, out_dir=tmp_path / "full")

    torch.manual_seed(0)  # the same run again, but it crashes
    model = ToyNet()
    crashing, val = _loaders(crash_after=16 * 2 + 6)  # dies in the third epoch, after epoch 2's checkpoint
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_on_cpu(model, crashing, val, epochs=3, weighting=weighting, out_dir=tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2

    torch.manual_seed(7)  # a new process: another initialisation, everything must come from last.pt
    model = ToyNet()
    train, val = _loaders(seed=99)  # even the loader's generator state is restored
    resumed = _fit_on_cpu(model, train, val, epochs=3, weighting=weighting, out_dir=tmp_path / "resumed",
                          resume=True, seed=5)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    drop = ("epoch_time", "data_time", "data_share")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.records] == \
           [{k: v for k, v in r.items() if k not in drop} for r in full.records]
    last_full = load_checkpoint(tmp_path / "full" / "last.pt")
    last_resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    # the whole state, nested: PCGrad's is only its generator's, GradNorm's holds its Adam's
    assert last_full["weighting"], "the weighting saved no state"
    torch.testing.assert_close(last_resumed["weighting"], last_full["weighting"], rtol=0, atol=0)


def _gradient_norms_seen_by_the_optimiser(**kwargs):
    """Train one epoch (4 steps); return the model's total gradient norm just before each optimiser step."""
    torch.manual_seed(0)
    model, norms = ToyNet(), []

    def record(optimizer, step_args, step_kwargs):
        grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack(grads)).item())

    handle = register_optimizer_step_pre_hook(record)  # every optimiser: remove it after
    try:
        _fit(model, _loaders()[0], None, epochs=1, **kwargs)
    finally:
        handle.remove()
    return norms


def test_grad_clip_bounds_the_gradient_norm_of_every_step():
    unclipped = _gradient_norms_seen_by_the_optimiser()
    assert len(unclipped) == 4 and min(unclipped) > 0.1  # without clipping the toy gradients exceed the limit
    # AdamW's step hardly depends on the gradient's scale, so the bound is checked on the gradient itself:
    # every step's norm is scaled down to the limit (not zeroed, not left alone)
    clipped = _gradient_norms_seen_by_the_optimiser(grad_clip=0.05)
    assert clipped == pytest.approx([0.05] * 4, rel=1e-4)


@pytest.mark.parametrize("where", ["model", "data"])
def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(where, tmp_path):
    torch.manual_seed(0)
    model = ToyNet(nan_at_call=6 if where == "model" else None)  # epoch 2, step 2 (4 steps per epoch)
    train, val = _loaders()
    if where == "data":
        train.dataset.items[5]["image"] = torch.full((1, 16, 16), float("nan"))
    with pytest.raises(NonFiniteLossError) as caught:
        _fit(model, train, val, epochs=3, out_dir=tmp_path)
    error = caught.value
    if where == "model":
        assert (error.epoch, error.step, error.task) == (2, 2, "cls")
        assert "epoch 2, step 2" in str(error) and "'cls' loss" in str(error)
    else:
        assert error.epoch == 1 and error.task in TASKS  # the NaN image is in epoch 1's shuffle
    last = tmp_path / "last.pt"
    if where == "model":
        assert str(last) in str(error)
        state = torch.load(last, weights_only=True)
        assert state["epoch"] == 1 and len(state["history"]["records"]) == 1
        fresh = ToyNet()
        fresh.load_state_dict(state["model"])
        assert all(torch.isfinite(p).all() for p in fresh.parameters())
        # the good checkpoint resumes a healthy run to the end
        history = _fit(ToyNet(), *_loaders(), epochs=3, out_dir=tmp_path, resume=True)
        assert len(history) == 3
    else:
        assert not last.exists()  # no epoch finished, so there is nothing to trust
        assert "checkpoint" not in str(error)  # nor a last.pt named that is not there
    if where == "data":  # the NaN image went through BatchNorm in train mode; its statistics must not stay
        assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())


@pytest.mark.parametrize("error", [
    NonFiniteLossError(3, 7, "seg", float("nan"), Path("runs/last.pt")),
    NonFiniteLossError(1, 2, None, float("inf"), causes="a learning rate too high"),
    NonFiniteWeightsError(2, [f"w{i}" for i in range(5)], Path("last.pt")),
    CompileError("InvalidCxxCompiler: No working C++ compiler found"),
    LossNotFiniteError("adv_loss_a", float("nan")),
], ids=lambda error: type(error).__name__)
def test_the_training_errors_survive_a_trip_between_processes(error):
    """A process pool (a grid run in parallel) pickles the worker's error: it must come back whole, not as a
    TypeError from an __init__ that takes other arguments than the message (which breaks the pool)."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert {k: str(v) for k, v in vars(back).items()} == {k: str(v) for k, v in vars(error).items()}


def test_a_nan_batch_leaves_batchnorm_as_it_found_it_without_a_checkpoint_to_go_back_to():
    """Above, fit's start state (kept for out_dir) hid the guard's own undo: without out_dir, or after the first
    last.pt, the model handed back carried NaN running statistics, and every later evaluation returned NaN."""
    torch.manual_seed(0)
    model = ToyNet()
    train, val = _loaders()
    train.dataset.items[5]["image"] = torch.full((1, 16, 16), float("nan"))
    with pytest.raises(NonFiniteLossError):
        _fit(model, train, val, epochs=3)
    batchnorm = model.encoder[1]
    assert torch.isfinite(batchnorm.running_mean).all() and torch.isfinite(batchnorm.running_var).all()


def test_resume_with_a_damaged_best_pt_says_how_to_go_on_from_last_pt(tmp_path):
    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path)
    (tmp_path / "best.pt").write_bytes(b"half a checkpoint")  # last.pt is intact
    with pytest.raises(ValueError,
                       match=r"cannot read .*best.pt.*\. To resume from last.pt anyway, move best.pt aside"):
        _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True)
    (tmp_path / "best.pt").rename(tmp_path / "best.pt.bad")
    assert len(_fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True)) == 2  # as the message says


def test_resume_without_best_pt_says_the_best_weights_are_lost(tmp_path):
    """best.pt deleted, last.pt kept: the model ended with the last epoch's weights while history.best_epoch named
    an earlier one, without a word."""
    train, val = _loaders()
    history = _fit(ToyNet(), train, val, epochs=2, lr=0.5, out_dir=tmp_path, monitor="cls/loss")
    assert history.best_epoch == 1  # epoch 2 is worse at this learning rate: best.pt holds epoch 1
    (tmp_path / "best.pt").unlink()
    with pytest.warns(UserWarning, match=r"best.pt is missing, so the weights of the best epoch so far \(1\) are lost"):
        _fit(ToyNet(), train, val, epochs=3, lr=0.5, out_dir=tmp_path, monitor="cls/loss", resume=True)


@contextlib.contextmanager
def _one_of_two_processes(rank, store, results):
    """A torchrun-like process group of two (gloo, a file store), one CPU thread, for mp.spawn targets.

    Writes how the body ended to results/rank<rank>.txt: "finished", "stopped at step S, task T" for
    a NonFiniteLossError, or the error (e.g. gloo's once the other process has gone). The process ends
    with the with block, through os._exit as mtlearn.train's command line does under torchrun:
    DistributedDataParallel keeps gloo's threads alive past destroy_process_group, and a normal exit
    then aborts now and then (SIGABRT after the atexit handlers), which failed CI once.
    """
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        yield
        outcome = "finished"
    except NonFiniteLossError as error:
        outcome = f"stopped at step {error.step}, task {error.task}"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    finally:
        dist.destroy_process_group()
    (results / f"rank{rank}.txt").write_text(outcome)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_with_nan_on_rank_one(rank, store, results):
    """Rank 1's model returns NaN at its second step."""
    with _one_of_two_processes(rank, store, results):
        _fit(ToyNet(nan_at_call=2 if rank == 1 else None), _loaders()[0], None, epochs=1)


@pytest.mark.slow
def test_nan_guard_stops_every_torchrun_process_together(tmp_path):
    """A bad loss on one process stops all of them (not one raising while the others wait in all-reduce)."""
    import torch.multiprocessing as mp

    mp.spawn(_train_with_nan_on_rank_one, args=(tmp_path / "store", tmp_path), nprocs=2)
    assert (tmp_path / "rank1.txt").read_text() == "stopped at step 2, task cls"
    assert (tmp_path / "rank0.txt").read_text() == "stopped at step 2, task None"


def _average_a_number_per_process(rank, store, results):
    import mtlearn.engine as engine

    with _one_of_two_processes(rank, store, results):
        means = engine._mean_across_processes([rank, 10.0 * rank], torch.device("cpu"))
        (results / f"mean{rank}.txt").write_text(repr(means))


@pytest.mark.slow
def test_losses_and_times_are_averaged_over_the_processes_not_summed(tmp_path):
    """The epoch's losses and times are each process's mean: summed, two processes would read twice the loss."""
    import torch.multiprocessing as mp

    mp.spawn(_average_a_number_per_process, args=(tmp_path / "store", tmp_path), nprocs=2)
    assert [(tmp_path / f"mean{rank}.txt").read_text() for rank in (0, 1)] == ["[0.5, 5.0]"] * 2


def _validate_on_an_empty_shard(rank, store, results):
    """Rank 1's share of a one-image validation set is empty, as train.make_loader splits it."""
    with _one_of_two_processes(rank, store, results):
        val = DataLoader(Subset(ToyData(n=1, seed=1), range(rank, 1, 2)), batch_size=4)
        history = _fit(ToyNet(), _loaders()[0], val, epochs=1, device="cpu")
        (results / f"dice{rank}.txt").write_text(str(history.records[-1]["val/seg/dice"]))


@pytest.mark.slow
def test_torchrun_validates_when_one_process_has_no_validation_images(tmp_path):
    """Refusing an empty val_loader per process would stop one process and leave the other waiting."""
    import torch.multiprocessing as mp

    mp.spawn(_validate_on_an_empty_shard, args=(tmp_path / "store", tmp_path), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["finished", "finished"]
    assert (tmp_path / "dice0.txt").read_text() == (tmp_path / "dice1.txt").read_text()  # the one image, on both


def _train_two_of_three_heads(rank, store, results):
    """A seg+cls+recon model trained on seg and cls only (without find_unused_parameters DDP raised
    "Expected to have finished reduction ..." at the second step)."""
    with _one_of_two_processes(rank, store, results):
        torch.manual_seed(0)  # the same initial weights on both processes
        model = ToyNet()  # returns all three outputs; recon takes no part in the loss
        _fit(model, _loaders()[0], None, epochs=1, tasks=("seg", "cls"), device="cpu")
        torch.save(model.state_dict(), results / f"rank{rank}.pt")


@pytest.mark.slow
def test_torchrun_trains_a_subset_of_the_model_heads(tmp_path):
    """fit(tasks=...) of a model with more heads: DDP must not wait for the untrained head's gradients."""
    import torch.multiprocessing as mp

    mp.spawn(_train_two_of_three_heads, args=(tmp_path / "store", tmp_path), nprocs=2)
    assert (tmp_path / "rank0.txt").read_text() == "finished"
    assert (tmp_path / "rank1.txt").read_text() == "finished"
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in states[0]:  # the processes stayed in sync
        torch.testing.assert_close(states[0][key], states[1][key])
    torch.manual_seed(0)
    untouched = ToyNet()  # the initial weights: the untrained recon head must not have moved (no gradient)
    torch.testing.assert_close(states[0]["heads.recon.weight"], untouched.heads["recon"].weight.detach())


def test_validation_losses_are_the_configured_ones():
    """val/<task>/loss is what monitor="seg/loss" picks best.pt by: with Dice + focal and class weights
    configured, validating with the default losses would pick the epoch by a loss nobody trained with."""
    train, _ = _loaders()
    val = DataLoader(ToyData(n=8, seed=1).items, batch_size=4)  # without ToyData's random flips: the same each pass
    model = ToyNet()
    losses = LossConfig(seg="dicefocal", class_weights=[1.0, 5.0, 1.0])
    last = _fit_on_cpu(model, train, val, epochs=1, losses=losses, restore_best=False).records[-1]
    configured, default = evaluate(model, val, losses=losses), evaluate(model, val)
    for key in ("seg/loss", "cls/loss"):
        assert last[f"val/{key}"] == pytest.approx(configured[key]) and configured[key] != pytest.approx(default[key])


def test_resume_into_a_longer_run_follows_the_longer_schedule(tmp_path):
    """... and says that the rate jumps (from where the old schedule was to where the new one is): the run
    then differs from one started with the longer `epochs`, which the README's "resume reproduces" suggested."""
    train, val = _loaders()  # 4 steps per epoch
    _fit(ToyNet(), train, val, epochs=1, lr=1e-2, out_dir=tmp_path)  # its schedule ends at lr 0
    new = 1e-2 * (1 - 4 / 8) ** 0.9  # step 4 of 8, not 0
    with pytest.warns(UserWarning, match=rf"resuming .*last\.pt with epochs=2, where the run was started with 1: the "
                                         rf"learning-rate schedule is recomputed for the new length, so the rate goes "
                                         rf"from 0 to {new:.3g} at once"):
        history = _fit(ToyNet(), train, val, epochs=2, lr=1e-2, out_dir=tmp_path, resume=True)
    assert history.records[1]["lr"] == pytest.approx(new)
    # a small change in the middle of a schedule is a jump too (cut at epoch 2 of 4, resumed for 5)
    _fit(ToyNet(), train, val, epochs=2, lr=1e-2, out_dir=tmp_path / "middle")
    state = load_checkpoint(tmp_path / "middle" / "last.pt")
    state["config"]["epochs"] = 4  # as if started for 4 and cut after 2: the rate at step 8 of 16
    state["scheduler"]["_last_lr"] = [1e-2 * (1 - 8 / 16) ** 0.9]
    save_checkpoint(state, tmp_path / "middle" / "last.pt")
    with pytest.warns(UserWarning, match=rf"epochs=5, where the run was started with 4: .* from "
                                         rf"{1e-2 * (1 - 8 / 16) ** 0.9:.3g} to {1e-2 * (1 - 8 / 20) ** 0.9:.3g}"):
        _fit(ToyNet(), train, val, epochs=5, lr=1e-2, out_dir=tmp_path / "middle", resume=True)
    with warnings.catch_warnings():  # shorter than the epochs done: nothing trains, so no jump to speak of
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("error", message="resuming .* with epochs=")
        _fit(ToyNet(), train, val, epochs=1, lr=1e-2, out_dir=tmp_path / "middle", resume=True)
    _fit(ToyNet(), train, val, epochs=1, lr=1e-2, poly_power=0, out_dir=tmp_path / "constant")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant rate does not jump: the longer run is the uninterrupted one
        _fit(ToyNet(), train, val, epochs=2, lr=1e-2, poly_power=0, out_dir=tmp_path / "constant", resume=True)


@pytest.mark.parametrize("changed, named", [(dict(weighting="dwa"), "weighting: 'fixed' then, 'dwa' now"),
                                            (dict(lr=1e-3), "lr: 0.01 then, 0.001 now"),
                                            (dict(tasks=("seg", "cls")), "tasks"),
                                            (dict(monitor="seg/loss"),
                                             "with monitor 'val/seg/loss': its best.pt was chosen by 'val/seg/dice'"),
                                            # the optimiser's and the losses' settings: each changes every later step
                                            (dict(grad_clip=1.0), "grad_clip: None then, 1.0 now"),
                                            (dict(weight_decay=0.1), "weight_decay: 3e-05 then, 0.1 now"),
                                            (dict(betas=(0.8, 0.99)), r"betas: \[0.9, 0.999\] then, \[0.8, 0.99\] now"),
                                            (dict(poly_power=2.0), "poly_power: 0.9 then, 2.0 now"),
                                            (dict(losses=LossConfig(seg="dicefocal")),
                                             "losses: {'seg': 'dicece', .*} then, {'seg': 'dicefocal', .*} now")])
def test_resume_with_other_options_is_refused_by_name(changed, named, tmp_path):
    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=1, lr=1e-2, out_dir=tmp_path)
    options = {"epochs": 2, "lr": 1e-2, **changed}
    with pytest.raises(ValueError, match=f"cannot resume .*{named}.*another out_dir"):
        _fit(ToyNet(), train, val, out_dir=tmp_path, resume=True, **options)


def test_resume_takes_the_default_losses_given_either_way(tmp_path):
    """losses=None means LossConfig(): a run started with one resumes with the other (it was refused, the
    message reading "losses: None then")."""
    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path / "none")
    assert len(_fit(ToyNet(), train, val, out_dir=tmp_path / "none", resume=True, losses=LossConfig()).records) == 2
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path / "default", losses=LossConfig())
    assert len(_fit(ToyNet(), train, val, out_dir=tmp_path / "default", resume=True).records) == 2


def _frozen(model, *prefixes):
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(prefixes))
    return model


@pytest.mark.parametrize("then, now, named", [((), ("encoder.0",), r"frozen now: encoder.0.weight, encoder.0.bias; "
                                                                    r"training now: none"),
                                               (("heads.recon",), ("heads.seg",), r"frozen now: heads.seg.weight, "
                                                r"heads.seg.bias; training now: heads.recon.weight, heads.recon.bias")])
def test_resume_with_other_parameters_frozen_is_refused_before_the_model_changes(then, now, named, tmp_path):
    """The optimiser's moments are a list in parameter order: with one more part frozen they failed to load
    with torch's bare size error, and with another part of the same count frozen (the second case) they
    loaded onto the wrong parameters, to crash at the first step on a shape, after the model was overwritten."""
    train, val = _loaders()
    _fit(_frozen(ToyNet(), *then), train, val, epochs=1, out_dir=tmp_path)
    model = _frozen(ToyNet(), *now)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"cannot resume from .*last.pt: other parameters train now .*\\({named}\\).*"
                                         r"Freeze \(requires_grad=False\) the same parameters .*another out_dir"):
        _fit(model, train, val, epochs=2, out_dir=tmp_path, resume=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert [r["epoch"] for r in _fit(_frozen(ToyNet(), *then), train, val, epochs=2, out_dir=tmp_path,
                                     resume=True).records] == [1, 2]  # the same parts frozen: it resumes


def test_resume_from_a_last_pt_not_written_by_fit_names_what_it_lacks(tmp_path):
    """A hand-saved last.pt (or another loop's) stopped with a bare KeyError: 'optimizer'."""
    save_checkpoint({"model": ToyNet().state_dict(), "epoch": 1}, tmp_path / "last.pt")
    train, val = _loaders()
    with pytest.raises(ValueError, match=r"last.pt: it is not a checkpoint written by fit \(it has no 'optimizer', "
                                         r"'scheduler', 'weighting', 'rng', 'history'\)\. Move it out of the folder"):
        _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True)
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path / "fit")
    state = load_checkpoint(tmp_path / "fit" / "last.pt")
    del state["history"]  # one key missing is named too
    save_checkpoint(state, tmp_path / "fit" / "last.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint written by fit \(it has no 'history'\)"):
        _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path / "fit", resume=True)


class WiderNet(ToyNet):
    """ToyNet with one more layer: another architecture, whose parameter names differ."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(2, 2)


@pytest.mark.parametrize("then, now", [(ToyNet, WiderNet), (WiderNet, ToyNet)])
def test_resume_with_another_architecture_says_so_not_that_other_parameters_train(then, now, tmp_path):
    """Other parameter names are another model: load_weights' message, not the frozen-parameters one."""
    train, val = _loaders()
    _fit(then(), train, val, epochs=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"its weights do not fit this model") as caught:
        _fit(now(), train, val, epochs=2, out_dir=tmp_path, resume=True)
    assert "other parameters train now" not in str(caught.value)


def test_a_weighting_instance_resumes_by_its_settings(tmp_path):
    """Only an instance's class name was saved: GradNorm(alpha=1.5) resumed as GradNorm(alpha=0.0) without a
    word, and the same run resumed by name (weighting="gradnorm", alpha=1.5) was refused."""
    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path / "a", weighting=GradNorm(TASKS, alpha=1.5))
    with pytest.raises(ValueError, match=r"weighting_kwargs: \{'alpha': 1.5, 'lr': 0.025\} then, "
                                         r"\{'alpha': 0.0, 'lr': 0.025\} now"):
        _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path / "a", resume=True, weighting=GradNorm(TASKS, alpha=0.0))
    by_name = _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path / "a", resume=True, weighting="gradnorm",
                   weighting_kwargs={"alpha": 1.5})
    assert [r["epoch"] for r in by_name.records] == [1, 2]  # resumed, not refused
    # fixed weights given as task_weights, resumed with the instance that has them (and one that has not)
    weights = {"seg": 1.0, "cls": 0.1, "recon": 0.5}
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path / "b", weighting="fixed", task_weights=weights)
    _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path / "b", resume=True, weighting=FixedWeights(TASKS, weights))
    with pytest.raises(ValueError, match="'cls': 0.1.* then, .*'cls': 0.25.* now"):
        _fit(ToyNet(), train, val, epochs=3, out_dir=tmp_path / "b", resume=True, weighting=FixedWeights(TASKS))


def test_pcgrad_by_name_draws_its_task_order_from_the_runs_seed(tmp_path):
    """fit(weighting="pcgrad", seed=s) built PCGrad(seed=0) whatever s was: every run of a loop over seeds
    projected the three tasks' gradients in the same order."""
    def run(name, **options):
        torch.manual_seed(0)
        model = ToyNet()
        _fit_on_cpu(model, *_loaders(), epochs=1, seed=1, out_dir=tmp_path / name, **options)
        return model.state_dict(), load_checkpoint(tmp_path / name / "last.pt")["weighting"]

    by_name, by_name_state = run("by_name", weighting="pcgrad")
    own_seed, own_seed_state = run("own_seed", weighting=PCGrad(TASKS, seed=1))
    default, default_state = run("default", weighting="pcgrad", weighting_kwargs={"seed": 0})
    torch.testing.assert_close(by_name_state, own_seed_state, rtol=0, atol=0)
    assert all(torch.equal(by_name[k], own_seed[k]) for k in by_name)
    assert not all(torch.equal(by_name[k], default[k]) for k in by_name)  # the order changes the update

    # the seed only starts the generator the checkpoint restores: a resume need not repeat it either way
    resumed = _fit_on_cpu(ToyNet(), *_loaders(), epochs=2, seed=1, out_dir=tmp_path / "by_name", resume=True,
                          weighting=PCGrad(TASKS, seed=1))
    assert [r["epoch"] for r in resumed.records] == [1, 2]


def test_a_weighting_instance_that_trained_is_refused_for_a_new_run(tmp_path):
    """One DWA passed to runs of several seeds started the second from the first's loss history (its epoch-2 weights
    [0.997, 1.027] instead of [1, 1])."""
    def run(weighting):
        torch.manual_seed(0)
        return _fit(ToyNet(), *_loaders(), epochs=3, weighting=weighting, seed=0)

    reused = DynamicWeightAverage(TASKS)
    first = run(reused)
    train, val = _loaders()
    with pytest.raises(ValueError, match=r"the DynamicWeightAverage passed as weighting has trained already .* pass "
                                         r"a new one for every run \(build it inside the loop\)"):
        _fit(ToyNet(), train, val, epochs=3, weighting=reused, seed=0)
    again = run(DynamicWeightAverage(TASKS))  # a new one: the run of the first, again
    assert [r["train/total"] for r in again.records] == [r["train/total"] for r in first.records]
    fixed = FixedWeights(TASKS)  # nothing to learn: one instance serves every run
    _fit(ToyNet(), train, val, epochs=1, weighting=fixed)
    _fit(ToyNet(), train, val, epochs=1, weighting=fixed)
    # in the order of training: a weighting's state, and a checkpoint's of it, is kept by position
    for other in (("seg", "cls"), TASKS[::-1]):
        with pytest.raises(ValueError, match=r"built for tasks .*, training uses \('seg', 'cls', 'recon'\); build "
                                             r"it with tasks=\('seg', 'cls', 'recon'\)"):
            _fit(ToyNet(), train, val, epochs=1, weighting=FixedWeights(other))
    # resuming is what carries a weighting's state on: its checkpoint (into a new instance, or the same one,
    # trained, as a notebook cell run again holds it)
    trained = DynamicWeightAverage(TASKS)
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path, weighting=trained)
    _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True, weighting=DynamicWeightAverage(TASKS))
    _fit(ToyNet(), train, val, epochs=3, out_dir=tmp_path, resume=True, weighting=trained)


def test_bf16_autocast_on_cpu():
    model = ToyNet()
    history = _fit_on_cpu(model, *_loaders(), epochs=1, amp="bf16")
    assert model.feature_dtype == torch.bfloat16  # the forward really ran in bfloat16
    assert np.isfinite(history.records[0]["train/total"])
    assert next(model.parameters()).dtype == torch.float32  # weights stay float32
    assert resolve_amp("auto", torch.device("cpu")) is None and resolve_amp(True, torch.device("cpu")) == torch.bfloat16


def test_auto_precision_asks_the_gpu_it_runs_on(monkeypatch):
    """A box with an A100 (cuda:0) and a T4 (cuda:1): the T4 gets fp16 with loss scaling, not bf16."""
    capability = {0: (8, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[torch.device(device).index])
    assert resolve_amp("auto", torch.device("cuda:0")) == torch.bfloat16
    assert resolve_amp("auto", torch.device("cuda:1")) == torch.float16
    with pytest.raises(ValueError, match="no native bfloat16"):
        resolve_amp("bf16", torch.device("cuda:1"))


def test_a_step_skipped_by_the_loss_scaler_raises_no_scheduler_warning(monkeypatch):
    """fp16 with a GradScaler, simulated on the CPU: an initial scale of 2^60 overflows, the scaler
    skips the step, and torch would warn that the schedule stepped before the optimiser."""
    import functools

    from torch.optim.optimizer import register_optimizer_step_post_hook

    import mtlearn.engine as engine

    steps = []
    hook = register_optimizer_step_post_hook(lambda *args: steps.append(1))  # counts the steps taken
    try:
        train, val = _loaders()
        _fit_on_cpu(ToyNet(), train, val, epochs=1)
        assert len(steps) == len(train)  # without the scaler, every step is taken
        steps.clear()
        monkeypatch.setattr(engine, "resolve_amp", lambda amp, device: torch.float16)
        monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**60))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit_on_cpu(ToyNet(), train, val, epochs=1)
    finally:
        hook.remove()
    assert len(steps) < len(train)  # the scaler did skip steps: the case this test is about
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_gradnorm_weights_stay_when_the_loss_scaler_skips_a_step_for_an_overflow_outside_its_layer(monkeypatch):
    """fp16, simulated on the CPU: the cls head's gradients overflow every step, the last shared layer's (where
    GradNorm measures) do not, so its own gradient is finite; the scaler skips every step and the network does
    not move, and the task weights did (they followed an update that never happened)."""
    import functools

    import mtlearn.engine as engine

    monkeypatch.setattr(engine, "resolve_amp", lambda amp, device: torch.float16)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**4))
    train, val = _loaders()
    model = ToyNet()
    model.heads["cls"].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = copy.deepcopy(model.encoder.state_dict())
    history = _fit_on_cpu(model, train, val, epochs=1, weighting="gradnorm")
    assert all(torch.equal(before[k], v) for k, v in model.encoder.named_parameters())  # no step taken
    assert [history.records[-1][f"weight/{t}"] for t in ("seg", "cls")] == [1.0, 1.0]
    # without the overflow every step is taken, and the weights follow them
    history = _fit_on_cpu(ToyNet(), train, val, epochs=1, weighting="gradnorm")
    assert [history.records[-1][f"weight/{t}"] for t in ("seg", "cls")] != [1.0, 1.0]


def test_a_weighting_subclass_overrides_after_step_without_arguments():
    """Notebook 02's exercise: subclass PCGrad so that after_step() logs last_cosine. after_step(skipped)
    made that override fail ("takes 1 positional argument but 2 were given")."""
    from mtlearn.weighting import PCGrad

    class Logged(PCGrad):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.cosines = []

        def after_step(self):
            super().after_step()
            self.cosines.append(self.last_cosine)

    train, val = _loaders()
    weighting = Logged(TASKS)
    _fit_on_cpu(ToyNet(), train, val, epochs=1, weighting=weighting)
    assert len(weighting.cosines) == len(train) and weighting.step_skipped is False


def test_channels_last_on_cpu():
    model = ToyNet()
    _fit_on_cpu(model, *_loaders(), epochs=1, channels_last=True)
    # encoder[4]: 8 input channels (a weight with one input channel is contiguous in either layout)
    assert model.encoder[4].weight.is_contiguous(memory_format=torch.channels_last)
    assert not ToyNet().encoder[4].weight.is_contiguous(memory_format=torch.channels_last)
    default = ToyNet()
    _fit_on_cpu(default, *_loaders(), epochs=1)  # channels_last=None: on CUDA only
    assert not default.encoder[4].weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_needs_no_grad_scaler(tmp_path):
    """Loss scaling is for fp16's narrow range; with bf16 a scaler would only rescale for nothing."""
    _fit_on_cpu(ToyNet(), *_loaders(), epochs=1, amp="bf16", out_dir=tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["scaler"] == {}


def test_fit_gives_the_sampler_each_epoch(tmp_path):
    """A DistributedSampler shuffles anew only when told the epoch: without it every epoch repeats one order."""
    from torch.utils.data import RandomSampler

    class EpochSampler(RandomSampler):
        epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    data = ToyData()
    train = DataLoader(data, batch_size=4, sampler=EpochSampler(data, generator=torch.Generator().manual_seed(0)))
    _fit_on_cpu(ToyNet(), train, None, epochs=3)
    assert EpochSampler.epochs == [0, 1, 2]


def test_fit_validates_with_its_data_range():
    """Images in 0..255: validation PSNR (and so best.pt) must use the range given, as evaluate does."""
    train, val = _loaders()
    scaled = [{k: v * 255 if k in ("image", "clean") else v for k, v in batch.items()} for batch in val]
    model = ToyNet(tasks=("recon",))
    history = _fit_on_cpu(model, [{k: v * 255 if k in ("image", "clean") else v for k, v in b.items()}
                                  for b in train], scaled, epochs=1, tasks=("recon",), data_range=255.0,
                          restore_best=False)
    expected = evaluate(model, scaled, ("recon",), device="cpu", data_range=255.0)["recon/psnr"]
    assert history.records[0]["val/recon/psnr"] == pytest.approx(expected)


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    model = ToyNet()
    history = _fit(model, *_loaders(), epochs=2, out_dir=tmp_path, weighting="gradnorm")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "weighting", "scaler", "rng", "history", "epoch", "config"}
    assert set(state["rng"]) >= {"torch", "numpy", "python", "loader_generator"}
    assert History.from_state_dict(state["history"]).records == history.records
    assert state["config"]["weighting"] == "gradnorm" and state["config"]["tasks"] == list(TASKS)
    best = load_checkpoint(tmp_path / "best.pt", ToyNet())
    assert best["epoch"] == history.best_epoch
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_best_checkpoint_is_chosen_on_validation_and_restored(tmp_path):
    model = ToyNet()
    history = _fit(model, *_loaders(), epochs=3, out_dir=tmp_path, monitor="seg/loss")
    assert history.monitor == "val/seg/loss" and history.mode == "min"
    losses = [r["val/seg/loss"] for r in history.records]
    assert history.best_epoch == 1 + int(np.argmin(losses))
    best = load_checkpoint(tmp_path / "best.pt")
    for name, value in model.state_dict().items():  # restore_best=True
        assert torch.equal(value.cpu(), best["model"][name]), name  # the checkpoint loads onto the CPU
    no_val = _fit(ToyNet(), _loaders()[0], None, epochs=1, out_dir=tmp_path / "noval")
    assert no_val.best_epoch is None and not (tmp_path / "noval" / "best.pt").exists()


def test_data_wait_is_measured(monkeypatch):
    """On a fake clock: each item takes 1 s to load, each training forward 0.5 s, nothing else any time."""
    import mtlearn.engine as engine

    clock = [0.0]

    class FakeTime:
        perf_counter = staticmethod(lambda: clock[0])

    class TimedData(ToyData):
        def __getitem__(self, i):
            clock[0] += 1.0
            return super().__getitem__(i)

    class TimedNet(ToyNet):
        def forward(self, x):
            if self.training:
                clock[0] += 0.5
            return super().forward(x)

    monkeypatch.setattr(engine, "time", FakeTime)
    train = DataLoader(TimedData(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    record = _fit(TimedNet(), train, None, epochs=1).records[0]  # 16 items in 4 batches, 4 forwards
    assert record["data_time"] == 16.0 and record["epoch_time"] == 18.0
    assert record["data_share"] == pytest.approx(16.0 / 18.0)

    class SlowStart(DataLoader):  # starting the worker processes takes 3 s: a wait for data too
        def __iter__(self):
            clock[0] += 3.0
            return super().__iter__()

    started = SlowStart(TimedData(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    record = _fit(TimedNet(), started, None, epochs=1).records[0]
    assert record["data_time"] == 19.0 and record["epoch_time"] == 21.0


def test_evaluate_returns_metrics_and_keeps_predictions():
    model = ToyNet()
    model.train()
    accumulator = MetricAccumulator(TASKS)
    metrics = evaluate(model, _loaders()[1], accumulator=accumulator)
    assert {"seg/dice", "seg/iou", "cls/acc", "cls/auc", "recon/psnr", "recon/ssim", "seg/loss"} <= set(metrics)
    assert accumulator.probabilities.shape == (8, 3) and accumulator.confusion_matrix().sum() == 8
    assert model.training  # the mode is restored


def test_validation_items_without_a_target_are_refused_before_training():
    """A validation set without labels failed only after a whole epoch of training, in the first evaluation."""
    model, train = ToyNet(), _loaders()[0]
    val = DataLoader(ToyData(n=8, keys=("image", "mask", "clean")), batch_size=4)
    with pytest.raises(ValueError, match=r"the validation items have no \['label'\] for task\(s\) \['cls'\] \(their "
                                         r"keys: \['clean', 'image', 'mask'\]\); .*or train only the tasks it has"):
        _fit(model, train, val)
    assert model.calls == 0
    _fit(model, train, val, epochs=1, tasks=("seg", "recon"))  # the tasks it has targets for
    from mtlearn.engine import _check_val_targets

    random.seed(0), np.random.seed(0)
    expected = random.random(), np.random.rand()
    random.seed(0), np.random.seed(0)
    _check_val_targets(val, ("seg",))  # ToyData's items draw from both: the run draws as without the check
    assert (random.random(), np.random.rand()) == expected


def test_fit_writes_into_the_home_folder_for_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _fit_on_cpu(ToyNet(), *_loaders(), epochs=1, out_dir="~/run")  # was a folder "~" in the working folder
    assert (tmp_path / "run" / "last.pt").is_file()
    model = ToyNet()
    history = _fit_on_cpu(model, *_loaders(), epochs=2, out_dir="~/run", resume=True)
    assert [r["epoch"] for r in history.records] == [1, 2] and model.calls == 4  # epoch 2 only: 4 batches


def test_evaluate_refuses_an_accumulator_it_would_not_fill_afresh():
    """A second evaluate() into the same accumulator averaged both passes together; one built for other tasks
    dropped the metrics of the tasks it lacked."""
    model, val, accumulator = ToyNet(), _loaders()[1], MetricAccumulator(TASKS)
    evaluate(model, val, accumulator=accumulator)
    with pytest.raises(ValueError, match=r"already holds an earlier pass; call accumulator\.reset\(\) first"):
        evaluate(model, val, accumulator=accumulator)
    assert accumulator.confusion_matrix().sum() == 8  # the refused call added nothing
    accumulator.reset()
    evaluate(model, val, accumulator=accumulator)
    assert accumulator.confusion_matrix().sum() == 8  # one pass, not two
    labels_only = MetricAccumulator(("cls",))  # updated without losses: labels and logits, no sums yet
    labels_only.update({"cls": torch.randn(4, 3)}, {"label": torch.tensor([0, 1, 2, 0])})
    with pytest.raises(ValueError, match=r"already holds an earlier pass"):
        evaluate(model, val, ("cls",), accumulator=labels_only)
    with pytest.raises(ValueError, match=r"built for tasks \('cls',\), but evaluate runs \('seg', 'cls', 'recon'\)"):
        evaluate(ToyNet(), _loaders()[1], accumulator=MetricAccumulator(("cls",)))
    # built with other class weights (cls/loss then moved with batch_size: 1.096 at 1, 1.111 at 15) or range
    weighted = LossConfig(class_weights=[1.0, 2.0, 3.0])
    net = ToyNet()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"built with class_weights=None, but evaluate's losses have \[1\.0, 2\.0, "
                                         r"3\.0\]; build it with the same"):
        evaluate(net, _loaders()[1], losses=weighted, accumulator=MetricAccumulator(TASKS), device="cpu")
    with pytest.raises(ValueError, match=r"built with data_range=255, but evaluate runs with data_range=1"):
        evaluate(net, _loaders()[1], accumulator=MetricAccumulator(TASKS, data_range=255.0))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # refused before anything was done
    # what cannot change a number is not refused: weights that differ by a factor, a range without recon,
    # weights without cls
    evaluate(ToyNet(), _loaders()[1], losses=weighted, accumulator=MetricAccumulator(TASKS, class_weights=[2, 4, 6]))
    evaluate(ToyNet(tasks=("cls",)), _loaders()[1], accumulator=MetricAccumulator(("cls",), data_range=255.0))
    evaluate(ToyNet(tasks=("seg",)), _loaders()[1], losses=weighted, accumulator=MetricAccumulator(("seg",)))
    matching, net, results = MetricAccumulator(TASKS, class_weights=[1.0, 2.0, 3.0]), ToyNet(), []
    for given in (matching, None):
        random.seed(0)  # ToyData flips and shifts its items at random
        np.random.seed(0)
        results.append(evaluate(net, _loaders()[1], losses=weighted, accumulator=given))
    assert results[0] == results[1]


def test_a_loader_that_would_not_score_each_image_once_is_warned_about():
    """A padding DistributedSampler counted an image twice (AUC moved by 0.03), drop_last left one out: silently."""
    data = ToyData(n=15)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=4, rank=0, shuffle=False)
    dropping, padding = DataLoader(data, batch_size=4, drop_last=True), DataLoader(data, batch_size=4, sampler=sampler)
    for loader, said in ((dropping, r"drops its last 3 image\(s\) \(drop_last=True, 15 images in batches of 4\)"),
                         (padding, r"counts 1 image\(s\) twice \(a DistributedSampler pads 15 images to a multiple of "
                                   r"4 processes\)")):
        with pytest.warns(UserWarning, match=rf"the loader {said}, so the metrics are not those of the whole set"):
            evaluate(ToyNet(), loader)
        with pytest.warns(UserWarning, match=rf"the val_loader {said}"):
            fit(ToyNet(), DataLoader(data, batch_size=4), loader, epochs=1, progress=False, device="cpu")
    # what the batch sampler holds, not the dataset: 8 of 10 items chosen, in batches of 4, drop nothing; 6 drop 2
    chosen = [0, 1, 2, 3, 4, 5, 6, 7]
    with pytest.warns(UserWarning, match=r"drops its last 2 image\(s\) \(drop_last=True, 6 images in batches of 4\)"):
        evaluate(ToyNet(), DataLoader(data, batch_size=4, sampler=chosen[:6], drop_last=True))
    batches = torch.utils.data.BatchSampler(chosen[:6], batch_size=4, drop_last=True)
    with pytest.warns(UserWarning, match=r"drops its last 2 image\(s\)"):
        evaluate(ToyNet(), DataLoader(data, batch_sampler=batches))
    dropping = torch.utils.data.DistributedSampler(data, num_replicas=4, rank=0, shuffle=False, drop_last=True)
    with pytest.warns(UserWarning, match=r"leaves 3 image\(s\) out \(a DistributedSampler with drop_last=True, 15 "
                                         r"images on 4 processes\)"):
        evaluate(ToyNet(), DataLoader(data, batch_size=4, sampler=dropping))
    with warnings.catch_warnings():  # each image once: nothing to say (16 images on 4 processes, or 16 in 4s)
        warnings.simplefilter("error")
        evaluate(ToyNet(), DataLoader(data, batch_size=4, sampler=chosen, drop_last=True))
        warnings.simplefilter("error")
        evaluate(ToyNet(), DataLoader(ToyData(n=16), batch_size=4, drop_last=True))
        evaluate(ToyNet(), DataLoader(data, batch_size=4))
        even = torch.utils.data.DistributedSampler(ToyData(n=16), num_replicas=4, rank=0)
        evaluate(ToyNet(), DataLoader(ToyData(n=16), batch_size=4, sampler=even))


def test_evaluate_builds_no_graph():
    """Under no_grad: validation keeps no activations for a backward that never comes (GPU memory)."""
    model, grad_enabled = ToyNet(), []
    model.register_forward_hook(lambda *args: grad_enabled.append(torch.is_grad_enabled()))
    evaluate(model, _loaders()[1])
    assert grad_enabled == [False, False]  # two batches of 4


def test_fit_trains_a_model_handed_over_in_eval_mode_in_train_mode():
    """e.g. after model.eval() for an inference: BatchNorm and dropout would otherwise stay frozen, silently."""
    model = ToyNet()
    model.eval()
    _fit_on_cpu(model, _loaders()[0], None, epochs=1)
    assert model.calls == 4  # ToyNet counts the forward passes made in train mode: every batch's


def test_evaluate_leaves_a_frozen_batchnorm_frozen():
    """A part the user froze (eval mode) stays frozen: model.train(True) afterwards would unfreeze it."""
    model = ToyNet()
    model.encoder[1].eval()
    evaluate(model, _loaders()[1])
    assert model.training and not model.encoder[1].training


def test_a_history_shows_as_a_line_that_says_where_the_rest_is():
    """The dataclass's repr printed every record on one line: ~600 characters an epoch, ~90 kB for the paper's 150."""
    history = History(monitor="val/seg/dice")
    assert repr(history) == ("History(0 epochs, no best epoch on val/seg/dice, mode='max'; .to_frame() for the "
                             "table, .plot() to see it)")
    for epoch in range(1, 151):
        history.append({"epoch": epoch, "val/seg/dice": 0.5 + 0.1 * (epoch == 97), "train/seg": 1.0})
    assert repr(history) == ("History(150 epochs, best val/seg/dice 0.6 at epoch 97, mode='max'; .to_frame() for "
                             "the table, .plot() to see it)")


def test_history_frame_and_plot():
    history = _fit(ToyNet(), *_loaders(), epochs=2)
    frame = history.to_frame()
    assert frame.shape[0] == 2 and frame.index.name == "epoch"
    figure = history.plot()
    assert len(figure.axes) == 4 and figure.axes[0].get_title() == "Training loss"
    assert [line.get_label() for line in figure.axes[2].lines] == list(TASKS)


def _review_history() -> History:
    """Two tasks, where cls/acc and cls/balanced_acc coincide (balanced classes)."""
    history = History(monitor="val/seg/dice")
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "train/seg": 1 / epoch, "train/cls": 2 / epoch, "train/total": 1.5 / epoch,
                        "val/seg/dice": 0.5 + epoch / 10, "val/seg/iou": 0.4 + epoch / 10,
                        "val/cls/acc": 0.6, "val/cls/balanced_acc": 0.6, "val/cls/auc": 0.7,
                        "weight/seg": 1.0, "weight/cls": 0.25, "lr": 1e-3 / epoch})
    return history


def test_history_plot_gives_each_task_one_colour_in_every_panel():
    """Orange was "cls" in the loss and weight panels but "seg/iou" among the validation metrics."""
    from matplotlib.colors import to_hex

    losses, metrics, weights, _ = _review_history().plot().axes
    colour = {}
    for ax in (losses, metrics, weights):
        for line in ax.get_lines():
            task = line.get_label().split("/")[0]
            if task in ("seg", "cls"):
                colour.setdefault(task, set()).add(to_hex(line.get_color()))
    assert colour == {"seg": {to_hex("tab:blue")}, "cls": {to_hex("tab:orange")}}
    # the metrics of one task differ by line style and marker, so coinciding curves stay apart
    styles = {line.get_label(): (line.get_linestyle(), line.get_marker()) for line in metrics.get_lines()}
    assert len({styles[m] for m in ("cls/acc", "cls/balanced_acc", "cls/auc")}) == 3
    assert styles["seg/dice"] != styles["seg/iou"]
    # a task's first metric has filled markers, its others hollow ones (white)
    faces = {line.get_label(): to_hex(line.get_markerfacecolor()) for line in metrics.get_lines()}
    assert faces["seg/dice"] == to_hex("tab:blue") and faces["cls/acc"] == to_hex("tab:orange")
    assert {faces[m] for m in ("seg/iou", "cls/balanced_acc", "cls/auc")} == {to_hex("white")}


def test_history_plot_tells_tasks_apart_by_marker_too():
    # a colour-blind reader: cls's orange and recon's green merge in protanopia, where only the colour differed
    history = History(monitor="val/recon/psnr")
    for epoch in (1, 2):
        history.append({"epoch": epoch, "train/seg": 1.0, "train/cls": 1.0, "train/recon": 1.0, "train/total": 3.0,
                        "train/depth": 1.0, "train/edges": 1.0,  # a user's own tasks: all had "v"
                        "val/seg/dice": 0.5, "val/cls/acc": 0.5, "val/recon/ssim": 0.5, "lr": 1e-3})
    losses, metrics, _, _ = history.plot().axes
    for ax in (losses, metrics):
        markers = {line.get_label().split("/")[0]: line.get_marker() for line in ax.get_lines()
                   if not line.get_label().startswith("best")}
        assert len(set(markers.values())) == len(markers) >= 3  # seg, cls, recon (total, depth...): one each
    assert {line.get_marker() for line in losses.get_lines() if line.get_label() == "cls"} == {
        line.get_marker() for line in metrics.get_lines() if line.get_label() == "cls/acc"}  # the same in each panel


def test_history_plot_marks_the_best_epoch_among_the_validation_metrics():
    history = _review_history()  # val/seg/dice rises: epoch 3 is the best
    metrics = history.plot().axes[1]
    best = [line for line in metrics.get_lines() if line.get_label() == "best epoch (val/seg/dice)"]
    assert history.best_epoch == 3 and len(best) == 1 and list(best[0].get_xdata()) == [3, 3]


def test_history_plot_says_what_a_panel_lacks():
    history = History(monitor="val/seg/dice")
    history.append({"epoch": 1, "train/seg": 0.5, "train/loss": 0.5, "lr": 1e-3})  # fit without val_loader
    _, metrics, weights, _ = history.plot().axes
    assert [t.get_text() for t in metrics.texts] == ["no validation\n(fit without val_loader)"]
    assert [t.get_text() for t in weights.texts] == ["not recorded"] and not metrics.get_lines()


def test_history_plot_takes_one_metric_as_text():
    metrics = _review_history().plot("val/seg/dice").axes[1]  # was read letter by letter: KeyError 'v'
    assert [line.get_label() for line in metrics.get_lines()][0] == "seg/dice"


def test_history_plot_legends_sit_outside_the_panels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = _review_history().plot()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # lays the panels out (constrained layout)
    renderer = canvas.get_renderer()
    for ax in figure.axes[:3]:
        legend, box = ax.get_legend(), ax.get_window_extent(renderer)
        assert legend.get_window_extent(renderer).y1 < box.y0  # below the panel, not over the curves
    assert figure.axes[3].get_legend() is None and figure.axes[3].get_ylabel() == "learning rate"


def test_progress_bar_only_when_asked(capsys):
    _fit(ToyNet(), *_loaders(), epochs=1, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    _fit(ToyNet(), *_loaders(), epochs=1, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "4/4" in err  # a step per batch: 16 images in batches of 4


def test_one_progress_bar_for_the_whole_run_naming_the_epoch(capsys, tmp_path):
    # a bar per epoch filled notebook cells that train several models with screens of finished bars
    _fit(ToyNet(), *_loaders(), epochs=3, progress=True)
    err = capsys.readouterr().err
    assert "12/12" in err and "epoch 3/3" in err and "/4 [" not in err  # 3 epochs of 4 steps, in one bar
    assert err.lstrip("\r").startswith("epoch 1/3:") and "epoch 0/3" not in err  # from its first render on
    assert re.search(r"epoch 2/3: +\d+%.* [5-8]/12 ", err)  # the description follows the epoch
    model = ToyNet()
    _fit(model, *_loaders(), epochs=1, out_dir=tmp_path, progress=False)
    _fit(model, *_loaders(), epochs=3, out_dir=tmp_path, resume=True, progress=True)
    err = capsys.readouterr().err
    assert "epoch 2/3" in err and " 4/12 " in err and " 0/12 " not in err  # a resumed run starts where it was
    assert "epoch 1/3" not in err
    with pytest.warns(UserWarning, match="already has 3 epochs"):
        _fit(model, *_loaders(), epochs=3, out_dir=tmp_path, resume=True, progress=True)
    assert capsys.readouterr().err == ""  # nothing trained: no bar


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(epochs=1.5), "epochs must be an integer >= 1"),
    (dict(lr=0.0), r"lr must be a finite number > 0 \(e\.g\. 1e-4\), got 0\.0"),
    (dict(lr=float("inf")), "lr must be a finite number > 0"),  # inf > 0: it trained a NaN model
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(lr="1e-3"), "lr must be a finite number > 0 .*got '1e-3'; pass it unquoted"),  # a config file's string
    (dict(weight_decay=-1e-4), r"weight_decay must be a finite number >= 0 \(0: no decay\)"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0"),
    (dict(learning_rate=1e-3), "unknown fit\\(\\) option 'learning_rate'"),
    (dict(weighting="magic"), "unknown weighting 'magic'; expected one of \\('fixed'"),
    # a weighting of one's own passed as its class: "unknown weighting <class ...>" said nothing of the instance
    (dict(weighting=DynamicWeightAverage), r"weighting is the class DynamicWeightAverage, not an instance of it: "
                                           r"pass DynamicWeightAverage\(\('seg', 'cls', 'recon'\)\), or "
                                           r"weighting='dwa'$"),
    (dict(weighting=type("Mine", (FixedWeights,), {})), r"pass Mine\(\('seg', 'cls', 'recon'\)\), or add it to "
                                                        r"mtlearn\.weighting\.WEIGHTINGS to use it by name$"),
    (dict(weighting=3), r"unknown weighting 3; .*, or a LossWeighting instance \(one of your own: see the module "
                        r"docstring of mtlearn\.weighting\)$"),
    (dict(weighting=dict), r"unknown weighting <class 'dict'>"),  # a class, but no weighting's
    (dict(weighting=["dwa"]), r"unknown weighting \['dwa'\]"),  # not "unhashable type: 'list'"
    (dict(tasks=("seg", "depth")), "unknown task 'depth'"),
    (dict(resume=True), "resume=True needs out_dir"),
    (dict(amp="fp16", device="cpu"), "amp='fp16' needs a CUDA GPU"),  # pinned: on a GPU it is valid
    (dict(amp="fp8"), "unknown amp 'fp8'"),
    (dict(weighting="dwa", task_weights={"seg": 1, "cls": 1, "recon": 1}), "task_weights only applies"),
    (dict(grad_clip=-1.0), r"grad_clip must be a finite number > 0 .*got -1\.0"),
    (dict(weighting="gradnorm", compile=True), "'gradnorm' cannot train with compile=True"),  # double backward
    # retain_graph per task: failed at the first step, after minutes of compiling
    (dict(weighting="pcgrad", compile=True), "'pcgrad' cannot train with compile=True: PCGrad back-propagates"),
    (dict(weighting=PCGrad(("seg", "cls", "recon")), compile=True), "'pcgrad' cannot train with compile=True"),
    (dict(weighting=GradNorm(("seg", "cls", "recon")), compile=True), "'gradnorm' cannot train with compile=True"),
    (dict(monitor="seg/dcie"), "monitor 'seg/dcie' is not a validation metric; choose one of .*'seg/dice'"),
    # a raw TypeError before
    (dict(grad_clip="1"), r"grad_clip must be a finite number > 0 .*or None: no clipping\), got '1'"),
    # trained the whole run, then divided by 0
    (dict(poly_power=-1.0), r"poly_power must be a finite number >= 0 \(0\.9 as published"),
    (dict(poly_power="0.9"), "poly_power must be a finite number >= 0"),
    (dict(betas=(0.9,)), r"betas must be a pair of numbers in \[0, 1\)"),  # IndexError inside Adam before
    (dict(betas=(0.9, 0.999, 0.5)), r"betas must be a pair of numbers in \[0, 1\)"),  # the third one dropped
    (dict(betas=(0.9, 1.5)), r"betas must be a pair of numbers in \[0, 1\)"),
    (dict(betas=(0.9, 1.0)), r"betas must be a pair of numbers in \[0, 1\)"),  # 1: the moments never forget
    (dict(task_weights=[1, 0.25]), "task_weights must map task names to weights"),
    (dict(restore_best="no"), "restore_best must be True or False, got 'no'; pass it unquoted"),  # "no" is truthy
    (dict(progress="false"), "progress must be True or False"),
    (dict(channels_last="yes"), r"channels_last \(or None: on CUDA only\) must be True or False"),
    # raw AttributeError / TypeErrors before, or (weight decay) a run whose loss grew to 1e19 without a word
    (dict(monitor=None), r"monitor must be a validation metric's name, .*got None"),
    (dict(weighting_kwargs=[1]), r"weighting_kwargs must map option names to values"),
    (dict(out_dir=5), r"out_dir must be a folder path \(or None: no checkpoints\), got 5"),
    (dict(tasks=5), r"tasks must name some of \('seg', 'cls', 'recon'\), .*got 5"),
    (dict(lr=1e-2, weight_decay=1e9),
     r"lr 0.01 with weight_decay 1e\+09 would shrink every weight by .* \(>= 1\).*; lower lr \(usually"),
    (dict(lr=1.0, weight_decay=1.0), r"would shrink every weight by lr x weight_decay = 1 \(>= 1\)"),  # to 0
])
def test_bad_fit_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(ToyNet(), *_loaders(), **kwargs)


def test_a_misspelt_monitor_is_refused_before_the_first_step():
    model = ToyNet(tasks=("seg", "cls"))
    with pytest.raises(ValueError, match=r"monitor 'dice' is not a validation metric; choose one of \['cls/acc'"):
        _fit(model, *_loaders(), monitor="dice")
    assert model.calls == 0  # it trained a whole epoch, unsaved, before saying so
    with pytest.raises(ValueError, match=r"monitor 'recon/psnr' is not a validation metric"):  # a task not trained
        _fit(model, *_loaders(), monitor="recon/psnr")
    _fit(ToyNet(tasks=("seg", "cls")), *_loaders(), epochs=1, monitor="val/cls/loss")  # every real key is accepted


def test_a_config_that_is_not_a_train_config_is_named():
    with pytest.raises(TypeError, match=r"config must be a TrainConfig, got a dict; pass options as keyword"):
        _fit(ToyNet(), *_loaders(), config={"epochs": 1})


def test_batch_missing_a_target_is_named():
    train, val = _loaders(keys=("image", "label", "clean"))
    with pytest.raises(ValueError, match=r"task 'seg' needs the target batch\['mask'\]"):
        _fit(ToyNet(), train, val)


def test_model_without_tasks_needs_tasks_argument():
    model = ToyNet()
    del model.tasks
    for call in (lambda: _fit(model, *_loaders()), lambda: evaluate(model, _loaders()[1])):
        with pytest.raises(ValueError, match=r"the model has no `tasks` attribute .*; pass them, e.g. tasks="):
            call()


def test_empty_loader_is_refused():
    empty = DataLoader(ToyData(n=2), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="yields no batches"):
        fit(ToyNet(), empty, config=TrainConfig(progress=False))
    model = ToyNet()
    with pytest.raises(ValueError, match=r"val_loader yields no batches; .* \(or pass val_loader=None"):
        fit(model, _loaders()[0], empty, config=TrainConfig(progress=False))
    assert model.calls == 0  # not after an epoch of training
    with warnings.catch_warnings():  # the error alone: no drop_last warning before it
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="the loader yielded no batches, so there is nothing to evaluate"):
            evaluate(ToyNet(), empty)  # it returned {} without a word


def test_out_dir_holding_a_run_is_refused_without_resume(tmp_path):
    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt")}
    model = ToyNet()
    with pytest.raises(ValueError, match=re.escape(
            f"out_dir {tmp_path} already holds a run (last.pt, epoch 1 of 1): for a new run choose another "
            "out_dir (CLI: --out-dir) or delete this one; to continue that run pass resume=True (CLI: --resume)")):
        _fit(model, train, val, epochs=2, out_dir=tmp_path)
    assert model.calls == 0  # refused before the first step
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the old run is intact
    (tmp_path / "last.pt").unlink()  # deleted to save space; the best weights are what was worth keeping
    with pytest.raises(ValueError, match=r"already holds best.pt of an earlier run \(without its last.pt\)"):
        _fit(model, train, val, epochs=2, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"has no last.pt to resume from, and holds best.pt of an earlier run"):
        _fit(model, train, val, epochs=2, out_dir=tmp_path, resume=True)  # it started over, replacing best.pt
    assert model.calls == 0 and (tmp_path / "best.pt").read_bytes() == before["best.pt"]


@pytest.mark.parametrize("below", [False, True])
def test_out_dir_that_is_a_file_is_refused_before_training(below, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    model = ToyNet()
    with pytest.raises(ValueError, match=re.escape(f"{file} is a file. Choose another out_dir")):
        _fit(model, *_loaders(), epochs=1, out_dir=file / "run" if below else file)
    assert model.calls == 0  # not after a whole epoch of training
    assert file.read_text() == "not a folder"


def test_out_dir_no_one_may_write_to_is_refused_before_training(tmp_path, unwritable):
    unwritable(tmp_path)
    model = ToyNet()
    with pytest.raises(PermissionError, match=re.escape(f"out_dir {tmp_path / 'run'} is not writable ({tmp_path}, the "
                                                        "folder it would be made in)")):
        _fit(model, *_loaders(), epochs=1, out_dir=tmp_path / "run")
    assert model.calls == 0  # it trained an epoch, then failed naming a hidden temporary file


def test_an_out_dir_another_live_run_writes_to_is_refused_before_training(tmp_path, held_by_another_run):
    pid = held_by_another_run(tmp_path)
    model = ToyNet()
    with pytest.raises(ValueError, match=re.escape(f"another run is writing to out_dir {tmp_path} (process {pid} on ")):
        _fit(model, *_loaders(), epochs=1, out_dir=tmp_path)
    assert model.calls == 0 and sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_dataset_instead_of_a_loader_is_named():
    train, val = _loaders()
    with pytest.raises(TypeError, match=r"train_loader is a Dataset \(ToyData\), not a DataLoader; wrap it: "
                                        r"torch\.utils\.data\.DataLoader\(dataset"):
        _fit(ToyNet(), train.dataset, val)
    with pytest.raises(TypeError, match=r"val_loader is a Dataset \(ToyData\), not a DataLoader"):
        _fit(ToyNet(), train, val.dataset)
    items = [train.dataset[i] for i in range(4)]  # a plain list: not a Dataset, but just as unbatched
    with pytest.raises(TypeError, match=r"batch\['image'\] has shape \(1, 16, 16\): the loader yields single items"):
        _fit(ToyNet(), items, None)
    for name, loaders in [("train_loader", (iter(train), val)), ("val_loader", (train, iter(val)))]:
        with pytest.raises(TypeError, match=rf"{name} is a one-shot iterator \(\w+\), empty after its first pass"):
            _fit(ToyNet(), *loaders)  # trained (or validated) the first epoch only, without a word


def test_the_check_of_the_validation_items_does_not_start_cuda(monkeypatch):
    """It keeps the generators a dataset may draw from while it reads an item; it read GPU 0's too, which
    started CUDA there even for a run on the CPU (a context per torchrun process on a GPU machine)."""
    import mtlearn.engine as engine

    def touched(*args, **kwargs):
        raise AssertionError("CUDA was asked for its random state")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", touched)
    monkeypatch.setattr(torch.cuda, "set_rng_state", touched)
    _, val = _loaders()
    engine._check_val_targets(val, TASKS)  # reads one item, and puts the CPU's generators back


def test_evaluate_names_a_dataset_given_for_its_loader_without_training_advice():
    """evaluate(model, test_set) was told to wrap it in DataLoader(data, batch_size=8, shuffle=True)."""
    _, val = _loaders()
    with pytest.raises(TypeError, match=r"loader is a Dataset \(ToyData\), not a DataLoader; wrap it: "
                                        r"torch\.utils\.data\.DataLoader\(dataset, batch_size=8\)$"):
        evaluate(ToyNet(), val.dataset, TASKS)
    batch = next(iter(val))  # fit's "options go by keyword, e.g. epochs=5": evaluate has no epochs
    with pytest.raises(TypeError, match=r"loader must be a DataLoader \(or a list of batch dicts\), got a dict; one "
                                        r"batch goes in a list, \[batch\]$"):
        evaluate(ToyNet(), batch, TASKS)
    items = [val.dataset[i] for i in range(4)]  # a list of items reaches the batch check
    with pytest.raises(TypeError, match=r"single items.*batch_size=8\) \(and shuffle=True for training\)"):
        evaluate(ToyNet(), items, TASKS)


def _children() -> set[int]:
    import multiprocessing

    return {process.pid for process in multiprocessing.active_children()}


def test_an_interrupted_fit_stops_its_loader_workers_though_the_traceback_is_kept(monkeypatch):
    """Jupyter keeps the last traceback, which holds fit's frames and so the loader's iterator: after a
    Ctrl-C its worker processes ran on until the next error replaced it."""
    import mtlearn.engine as engine

    update, steps = engine._update, []

    def interrupt_at_the_third_step(run, losses):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return update(run, losses)

    train = DataLoader(ToyData(), batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    before = _children()
    monkeypatch.setattr(engine, "_update", interrupt_at_the_third_step)
    with pytest.raises(KeyboardInterrupt) as kept:  # as IPython keeps sys.last_exc: its traceback, every frame
        _fit_on_cpu(ToyNet(), train, None, epochs=1)
    assert len(steps) == 3 and kept.tb is not None
    assert _children() <= before


def test_evaluate_stopped_by_an_error_in_the_data_stops_the_loader_workers():
    """The error comes out of the loader's own next(), whose frames (holding the iterator) the traceback
    keeps: the other worker ran on."""
    data = DataLoader(ToyData(crash_after=2), batch_size=4, num_workers=2)
    before = _children()
    with pytest.raises(RuntimeError, match="simulated crash") as kept:
        evaluate(ToyNet(), data, TASKS, device="cpu")
    assert kept.tb is not None and _children() <= before


@pytest.mark.parametrize("third, options", [(TrainConfig(epochs=1), True), ({"epochs": 1}, True), (5, False),
                                            ("val", False)])
def test_options_in_the_place_of_val_loader_are_named_before_training(third, options):
    """fit(model, train, config) took the config for val_loader: a whole epoch trained on the defaults (10
    epochs, a progress bar) before "'TrainConfig' object is not iterable"."""
    model = ToyNet()
    options = r"; options go by keyword, e\.g\. epochs=5" if options else ""
    article = "an" if isinstance(third, int) else "a"
    with pytest.raises(TypeError, match=rf"val_loader must be a DataLoader \(or a list of batch dicts\), got {article} "
                                        rf"{type(third).__name__}{options}$"):
        fit(model, _loaders()[0], third)
    assert model.calls == 0


def test_tuple_batches_are_named():
    data = TensorDataset(torch.randn(8, 1, 16, 16), torch.zeros(8, 1, 16, 16), torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"every batch must be a dict with 'image' and the task targets \('mask' "
                                        r"for seg, 'label' for cls, 'clean' for recon\); got a list\..*TensorDataset"):
        _fit(ToyNet(tasks=("seg", "cls")), DataLoader(data, batch_size=4), None)


def _finite(state_dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


@pytest.mark.parametrize("epoch", [1, 2])
def test_weights_that_blow_up_stop_before_the_checkpoints_are_overwritten(epoch, tmp_path):
    torch.manual_seed(0)
    model, steps = ToyNet(), []

    def overflow(optimizer, step_args, step_kwargs):  # the epoch's last update overflows; its losses were finite
        steps.append(None)
        if len(steps) == 4 * epoch:  # 4 steps per epoch
            with torch.no_grad():
                model.encoder[0].weight.fill_(float("inf"))

    handle = register_optimizer_step_post_hook(overflow)  # every optimiser: remove it after
    try:
        with pytest.raises(NonFiniteWeightsError) as caught:
            _fit(model, *_loaders(), epochs=3, out_dir=tmp_path)
    finally:
        handle.remove()
    error = caught.value
    assert error.epoch == epoch and error.names == ["encoder.0.weight"]
    assert f"non-finite (NaN or inf) in epoch {epoch}" in str(error) and "learning rate too high" in str(error)
    if epoch == 1:  # nothing was saved yet, and the message names no last.pt that is not there
        assert not (tmp_path / "last.pt").exists() and "checkpoint" not in str(error)
        return
    assert str(tmp_path / "last.pt") in str(error)
    for name in ("last.pt", "best.pt"):  # still epoch 1's, and what they hold is good
        state = load_checkpoint(tmp_path / name)
        assert state["epoch"] == 1 and _finite(state["model"]), name


class NaNClassifierInEval(ToyNet):
    """The classification head diverged (e.g. an fp16 overflow) where only validation reaches it."""

    def forward(self, x):
        out = super().forward(x)
        if not self.training:
            out["cls"] = out["cls"] * float("nan")
        return out


def test_an_infinite_validation_loss_is_named_as_a_nan_one_is(monkeypatch):
    import mtlearn.engine as engine

    real_evaluate = engine._evaluate  # fit's validation pass

    def overflowing(*args, **kwargs):  # an fp16 loss past 65504: inf, not NaN
        return dict(real_evaluate(*args, **kwargs), **{"cls/loss": math.inf})

    monkeypatch.setattr(engine, "_evaluate", overflowing)
    train, val = _loaders()
    with pytest.warns(UserWarning, match=r"epoch 1: the validation loss is not finite \(val/cls/loss\)"):
        history = _fit(ToyNet(), train, val, epochs=1)
    assert history.records[0]["val/cls/loss"] == math.inf and history.best_epoch is None


def test_an_epoch_with_a_nan_validation_loss_is_not_the_best(tmp_path):
    train, val = _loaders()
    with pytest.warns(UserWarning, match=r"epoch 1: the validation loss is not finite \(val/cls/loss\), so this "
                                         r"epoch cannot be the best one.*lower lr \(now 0\.01\)"):
        history = _fit(NaNClassifierInEval(), train, val, epochs=1, out_dir=tmp_path)
    record = history.records[0]
    assert history.monitor == "val/seg/dice"
    assert math.isnan(record["val/cls/loss"]) and math.isfinite(record["val/seg/dice"])  # the monitor looks fine
    assert history.best_epoch is None and not (tmp_path / "best.pt").exists()
    assert (tmp_path / "last.pt").exists()


def test_resume_without_more_epochs_warns(tmp_path):
    train, val = _loaders()
    first = _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path)
    with pytest.warns(UserWarning, match=re.escape(f"the run in {tmp_path} already has 2 epochs; pass a larger "
                                                   "epochs (got 2) to train further")):
        again = _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True)
    assert again.records == first.records


def test_resume_warnings_come_from_rank_0_only(tmp_path, monkeypatch):
    """Under torchrun every process resumes: the warnings were printed once per process."""
    import mtlearn.engine

    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path)
    (tmp_path / "best.pt").unlink()
    monkeypatch.setattr(mtlearn.engine, "is_main_process", lambda: False)  # as rank 1 sees it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "already has 2 epochs" nor "best.pt is missing"
        _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True)
        # nor that a longer run's learning rate jumps (warned on rank 0: test_resume_into_a_longer_run...)
        _fit(ToyNet(), train, val, epochs=3, out_dir=tmp_path, resume=True)


def test_no_batches_under_torchrun_says_the_processes_share_the_training_set(monkeypatch):
    import mtlearn.engine

    monkeypatch.setattr(mtlearn.engine, "is_distributed", lambda: True)
    monkeypatch.setattr(mtlearn.engine, "world_and_rank", lambda: (5, 0))
    empty = DataLoader(ToyData(n=4), batch_size=2, sampler=[], drop_last=True)  # this process's share: none
    with pytest.raises(ValueError, match=r"train_loader yields no batches; .* \(5 torchrun processes share the "
                                         r"training set"):
        _fit(ToyNet(), empty, None, epochs=1)


def test_persistent_workers_with_checkpoints_warn_that_resume_will_differ(tmp_path):
    """Persistent workers carry their Python and NumPy generators from epoch to epoch, and no checkpoint
    holds them: a resumed run differed from an uninterrupted one without a word."""
    train = DataLoader(ToyData(), batch_size=4, shuffle=True, num_workers=1, persistent_workers=True,
                       generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"persistent_workers=True\).*for resumable runs use persistent_workers=False"):
        _fit(ToyNet(), train, None, epochs=1, out_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without checkpoints there is nothing to resume: no warning
        _fit(ToyNet(), train, None, epochs=1)


class Scaled(Dataset):
    """ToyData's items with the image mapped to `low`..`high` (e.g. 0..255: 8-bit intensities never divided)."""

    def __init__(self, low, high):
        self.data, self.low, self.high = ToyData(keys=("image", "label")), low, high

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        image = item["image"].clamp(0, 1)
        return dict(item, image=self.low + (self.high - self.low) * image)


@pytest.mark.parametrize("low, high, options, warned", [
    (0, 255, {}, True),  # raw 8-bit intensities as floats
    (0, 1, {}, False),  # scaled, as the course's datasets are
    (0, 1.5, {}, False),  # a little over range (augmented, say): not called raw
    (0, 2.5, {}, True),  # past twice the range: raw
    (-3, 3, {}, False),  # z-scored (the shapes benchmark)
    (0, 255, {"data_range": 255.0}, False),  # the range is meant, and said
])
def test_fit_warns_once_when_the_images_look_like_unscaled_8_bit(low, high, options, warned):
    train = DataLoader(Scaled(low, high), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(ToyNet(tasks=("cls",)), train, None, epochs=2, progress=False, device="cpu", **options)  # line below
        line = inspect.currentframe().f_lineno - 1
    ours = [w for w in caught if "unscaled intensities" in str(w.message)]
    assert len(ours) == int(warned)  # the first batch only, not every step or epoch
    if warned and high == 255:
        message = str(ours[0].message)
        assert "from 0 to 255" in message and "image / 255" in message and "data_range=255" in message
        assert (ours[0].filename, ours[0].lineno) == (__file__, line)  # it points at the call of fit


class RawClean(Dataset):
    """ToyData's items with the denoising target in 0..255 (the input scaled, the target not)."""

    def __init__(self):
        self.data = ToyData()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[i]
        return dict(item, clean=item["clean"] * 255)


def test_fit_warns_when_the_denoising_target_looks_unscaled():
    """A 0..255 "clean" trained the recon head toward raw intensities (train/recon 121 instead of 0.67) without a
    word (without a val_loader; with one, its metric refused the target after the first epoch): only the input
    images were looked at. (evaluate's metric refuses such a target at once.)"""
    loader = DataLoader(RawClean(), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(ToyNet(tasks=("recon",)), loader, None, epochs=1, progress=False, device="cpu")
    ours = [str(w.message) for w in caught if "unscaled intensities" in str(w.message)]
    assert len(ours) == 1 and "the first training batch's clean images range from" in ours[0], ours
    with pytest.raises(ValueError, match="the clean images reach"):
        evaluate(ToyNet(tasks=("recon",)), loader)
    with warnings.catch_warnings():  # without the recon task the target is not read: nothing to say
        warnings.simplefilter("error")
        fit(ToyNet(tasks=("cls",)), loader, None, epochs=1, progress=False, device="cpu")


@pytest.mark.parametrize("block", [torch.no_grad, torch.inference_mode])
def test_fit_inside_no_grad_is_refused_at_once(block):
    """Under no_grad, fit loaded the data and failed in the weighting's backward with torch's "element 0 of
    tensors does not require grad"."""
    model = ToyNet(tasks=("cls",))
    before = [p.detach().clone() for p in model.parameters()]
    with block(), pytest.raises(RuntimeError, match=rf"fit was called inside torch\.{block.__name__}\(\), where "
                                                    "nothing can learn; call it outside"):
        fit(model, DataLoader(ToyData(), batch_size=4), None, epochs=1, progress=False, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_evaluate_warns_once_when_the_images_look_like_unscaled_8_bit_and_fit_warns_only_for_training():
    """A trained model evaluated on raw 0..255 images scored nonsense without a word (fit warned, evaluate did
    not); fit's own validation passes on such images must not repeat its warning every epoch."""
    model, raw = ToyNet(tasks=("cls",)), DataLoader(Scaled(0, 255), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(model, raw)  # the line below
        line = inspect.currentframe().f_lineno - 1
    ours = [w for w in caught if "unscaled intensities" in str(w.message)]
    assert len(ours) == 1 and "the first evaluated batch's images range from 0 to 255" in str(ours[0].message)
    assert "pass evaluate the scale's full range as data_range" in str(ours[0].message)
    assert (ours[0].filename, ours[0].lineno) == (__file__, line)  # it points at the call of evaluate
    looked = []  # the first batch only: not a min/max (a GPU sync) per batch of a long evaluation

    def spy(image, data_range):
        looked.append(1)
        return None

    import mtlearn.engine as engine
    real = engine.unscaled_range
    engine.unscaled_range = spy
    try:
        evaluate(model, DataLoader(Scaled(0, 1), batch_size=4))  # 4 batches
    finally:
        engine.unscaled_range = real
    assert len(looked) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(model, DataLoader(Scaled(0, 1), batch_size=4))
        evaluate(model, raw, data_range=255.0)  # the range is meant, and said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(ToyNet(tasks=("cls",)), raw, raw, epochs=2, progress=False, device="cpu")
    assert len([w for w in caught if "unscaled intensities" in str(w.message)]) == 1  # training's, once


def test_fit_prints_a_warning_above_its_bar_not_on_the_end_of_its_line(capsys, monkeypatch):
    """A terminal bar stands on an unfinished line: a warning went onto its end, the bar on below it."""
    def show(message, category, filename, lineno, file=None, line=None):  # as Python prints one, to the bar's stream
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", show)
        fit(ToyNet(tasks=("cls",)), DataLoader(Scaled(0, 255), batch_size=4), None, epochs=1, device="cpu")
        assert warnings.showwarning is show  # given back
    err = capsys.readouterr().err
    before = err[:err.index("UserWarning: the first training batch")]
    assert "epoch 1/1" in before  # the bar was drawn,
    assert "epoch" not in re.split("[\r\n]", before)[-1]  # cleared before the warning
    assert "epoch 1/1" in err[err.index("unscaled intensities"):]  # and drawn again below it


def test_a_resumed_fit_looks_at_its_own_first_batch_too(tmp_path):
    """The check runs on the first batch of each call of fit, a resumed one included (it starts at epoch 2)."""
    train = DataLoader(Scaled(0, 255), batch_size=4)
    for epochs, resume in ((1, False), (2, True)):
        with pytest.warns(UserWarning, match="unscaled intensities"):
            fit(ToyNet(tasks=("cls",)), train, None, epochs=epochs, progress=False, device="cpu", out_dir=tmp_path,
                resume=resume)


class SoftmaxNet(ToyNet):
    """ToyNet ending in a softmax, as students write it: probabilities where the losses take logits."""

    def __init__(self, tasks=TASKS, which=("cls",)):
        super().__init__(tasks=tasks)
        self.which = which

    def forward(self, x):
        return {t: v.softmax(dim=1) if t in self.which else v for t, v in super().forward(x).items()}


@pytest.mark.parametrize("model, named, amp", [(SoftmaxNet(which=("cls",)), "'cls'", "off"),
                                               (SoftmaxNet(which=("seg", "cls")), "'seg' and 'cls'", "off"),
                                               # bfloat16 probabilities miss a float32 tolerance for their sum
                                               (SoftmaxNet(which=("seg", "cls")), "'seg' and 'cls'", "bf16"),
                                               (ToyNet(), None, "off"), (ToyNet(), None, "bf16")])
def test_fit_warns_once_when_the_model_returns_probabilities(model, named, amp):
    """A softmax at the end of the model trains on log(softmax(p)): slowly or not at all, without a word."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, _loaders()[0], None, epochs=2, progress=False, device="cpu", amp=amp)  # line below
        line = inspect.currentframe().f_lineno - 1
    ours = [w for w in caught if "probabilities" in str(w.message)]
    assert len(ours) == (named is not None)  # the first batch only, not every step or epoch
    if named:
        assert str(ours[0].message).startswith(f"the model's {named} outputs lie in [0, 1] and sum to 1 over the "
                                               "classes: probabilities, from a softmax")
        assert (ours[0].filename, ours[0].lineno) == (__file__, line)  # it points at the call of fit


def test_load_checkpoint_into_another_model_names_the_file(tmp_path):
    _fit(ToyNet(), *_loaders(), epochs=1, out_dir=tmp_path)
    path = tmp_path / "last.pt"
    with pytest.raises(ValueError, match=re.escape(f"cannot load {path} into this model: the checkpoint was written "
                                                   "for another model") + r".*size mismatch for heads\.cls\.weight"):
        load_checkpoint(path, ToyNet(num_classes=5))


# ---------------------------------------------------------------------------------------------- mutation audit
# Tests that pin down what surviving mutants of engine.py changed unnoticed.


def _optimiser_groups(model, **kwargs):
    """Fit one epoch; return the hyperparameters of fit's AdamW groups: (lr, betas, weight_decay, holds_model)."""
    seen = []

    def record(optimizer, step_args, step_kwargs):
        if type(optimizer) is torch.optim.AdamW and not seen:  # GradNorm's own Adam is not fit's optimiser
            model_ids = {id(p) for p in model.parameters()}
            seen.extend((g["initial_lr"], tuple(g["betas"]), g["weight_decay"],
                         all(id(p) in model_ids for p in g["params"])) for g in optimizer.param_groups)

    handle = register_optimizer_step_pre_hook(record)
    try:
        fit(model, _loaders()[0], None, epochs=1, progress=False, seed=0, **kwargs)
    finally:
        handle.remove()
    return seen


def test_training_defaults_are_resformers():
    """SPEC section 1: AdamW, betas 0.9/0.999, weight decay 3e-5, lr 1e-4, polynomial decay power 0.9."""
    config = TrainConfig()
    assert (config.lr, tuple(config.betas), config.weight_decay, config.poly_power) == (1e-4, (0.9, 0.999), 3e-5, 0.9)
    assert _optimiser_groups(ToyNet()) == [(1e-4, (0.9, 0.999), 3e-5, True)]


def test_adamw_takes_the_configured_betas_and_weight_decay():
    groups = _optimiser_groups(ToyNet(), lr=2e-3, betas=(0.8, 0.95), weight_decay=0.1)
    assert groups == [(2e-3, (0.8, 0.95), 0.1, True)]
    # learned task weights (uncertainty's log-variances) are optimised with the network but never decayed
    groups = _optimiser_groups(ToyNet(), lr=2e-3, betas=(0.8, 0.95), weight_decay=0.1, weighting="uncertainty")
    assert groups == [(2e-3, (0.8, 0.95), 0.1, True), (2e-3, (0.8, 0.95), 0.0, False)]


@pytest.mark.parametrize("tasks, monitor", [(("seg", "cls"), "val/seg/dice"), (("cls", "recon"), "val/cls/auc"),
                                            (("recon",), "val/recon/psnr")])
def test_default_monitor_is_dice_then_auc_then_psnr(tasks, monitor):
    history = _fit(ToyNet(tasks=tasks), *_loaders(), epochs=1)
    assert (history.monitor, history.mode) == (monitor, "max")


def test_history_keeps_the_first_of_equal_best_values():
    """A later epoch must improve on the best, not merely tie it; mode "min" for losses."""
    history = History(monitor="val/seg/dice", mode="max")
    assert [history.append({"epoch": e, "val/seg/dice": v}) for e, v in enumerate([0.5, 0.7, 0.7, 0.6], 1)] == \
           [True, True, False, False]
    assert (history.best_epoch, history.best_value) == (2, 0.7)
    history = History(monitor="val/seg/loss", mode="min")
    assert [history.append({"epoch": e, "val/seg/loss": v}) for e, v in enumerate([0.5, 0.3, 0.3, 0.4], 1)] == \
           [True, True, False, False]
    assert history.best_epoch == 2
    # an infinite validation loss (overflow) makes an epoch untrustworthy, like NaN
    history = History(monitor="val/seg/dice", mode="max")
    assert not history.append({"epoch": 1, "val/seg/dice": 0.9, "val/cls/loss": float("inf")})
    assert history.best_epoch is None


def test_loss_scaled_gradients_are_unscaled_before_clipping(monkeypatch):
    """fp16 with a GradScaler (simulated on the CPU, scale 2^10): the clip applies to the true gradients,
    so the optimiser sees norm grad_clip, not grad_clip / 2^10 (clipped while still scaled)."""
    import functools

    import mtlearn.engine as engine

    monkeypatch.setattr(engine, "resolve_amp", lambda amp, device: torch.float16)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**10))
    clipped = _gradient_norms_seen_by_the_optimiser(grad_clip=0.05, device="cpu")
    assert clipped == pytest.approx([0.05] * 4, rel=1e-3)


class LayoutNet(ToyNet):
    """ToyNet on 3-channel images; records whether each input arrived in channels_last layout."""

    def __init__(self):
        super().__init__()
        self.layouts = {True: [], False: []}  # training -> one flag per forward

    def forward(self, x):
        self.layouts[self.training].append(x.is_contiguous(memory_format=torch.channels_last))
        return super().forward(x.mean(1, keepdim=True))


class RGBData(ToyData):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["image"] = item["image"].repeat(3, 1, 1)  # (3, H, W): channels_last differs from NCHW
        return item


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_the_weights_and_every_input(channels_last):
    model = LayoutNet()
    train = DataLoader(RGBData(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(RGBData(n=8, seed=1), batch_size=4)
    _fit_on_cpu(model, train, val, epochs=1, channels_last=channels_last)
    assert model.layouts[True] == [channels_last] * 4 and model.layouts[False] == [channels_last] * 2
    # a weight with several input channels (one input channel is contiguous in either layout)
    assert model.encoder[4].weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    model.layouts[False].clear()
    evaluate(model, val, channels_last=not channels_last)  # evaluate's own option
    assert model.layouts[False] == [not channels_last] * 2


def test_recorded_task_weights_are_those_the_epoch_trained_with():
    """DWA: w = 1 in epochs 1 and 2; epoch 3 trains with T softmax(r / 2), r_t = L_t(2) / L_t(1) (T = 3 tasks)."""
    history = _fit(ToyNet(), *_loaders(), epochs=3, weighting="dwa")
    first, second, third = history.records
    assert all(r[f"weight/{t}"] == 1.0 for r in (first, second) for t in TASKS)
    ratios = np.array([second[f"train/{t}"] / first[f"train/{t}"] for t in TASKS])
    expected = 3 * np.exp(ratios / 2) / np.exp(ratios / 2).sum()
    assert [third[f"weight/{t}"] for t in TASKS] == pytest.approx(list(expected), rel=1e-5)


def test_train_losses_are_the_mean_over_the_epochs_steps(monkeypatch):
    import mtlearn.engine as engine

    forward, steps = engine._forward, []

    def recording_forward(run, batch, tasks, **kwargs):
        losses, values = forward(run, batch, tasks, **kwargs)
        steps.append(values.copy())
        return losses, values

    monkeypatch.setattr(engine, "_forward", recording_forward)
    record = _fit(ToyNet(), _loaders()[0], None, epochs=1).records[0]  # 4 steps, fixed weights 1, 0.25, 1
    means = np.mean(steps, axis=0)
    assert len(steps) == 4
    assert [record[f"train/{t}"] for t in TASKS] == pytest.approx(list(means), rel=1e-6)
    assert record["train/total"] == pytest.approx(means @ np.array([1.0, 0.25, 1.0]), rel=1e-5)


class FlatClsNet(ToyNet):
    """Constant class logits: cls/acc is the same every epoch, so epoch 1 stays the best (ties do not win)."""

    def forward(self, x):
        out = super().forward(x)
        out["cls"] = torch.zeros_like(out["cls"])
        return out


@pytest.mark.parametrize("restore_best", [True, False])
def test_restore_best_chooses_between_best_and_last_weights(restore_best, tmp_path):
    torch.manual_seed(0)
    model = FlatClsNet()
    history = _fit_on_cpu(model, *_loaders(), epochs=3, out_dir=tmp_path, monitor="cls/acc", restore_best=restore_best)
    assert len({r["val/cls/acc"] for r in history.records}) == 1 and history.best_epoch == 1
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert (best["epoch"], last["epoch"]) == (1, 3)
    expected = best["model"] if restore_best else last["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert not torch.equal(best["model"]["encoder.0.weight"], last["model"]["encoder.0.weight"])


def test_resumed_run_restores_the_best_epoch_of_the_earlier_session(tmp_path):
    train, val = _loaders()
    _fit_on_cpu(FlatClsNet(), train, val, epochs=1, out_dir=tmp_path, monitor="cls/acc")
    model = FlatClsNet()
    history = _fit_on_cpu(model, train, val, epochs=3, out_dir=tmp_path, monitor="cls/acc", resume=True)
    assert history.best_epoch == 1
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, best["model"][name]), name


def test_a_first_epoch_stopped_before_its_best_pt_writes_it_on_resume(tmp_path, monkeypatch):
    """No best.pt yet: the stop between the two writes of epoch 1 is repaired from last.pt, not reported as
    best weights lost."""
    import mtlearn.engine as engine

    save = engine.save_checkpoint

    def stop_at_best(state, path):
        if path.name == "best.pt":
            raise KeyboardInterrupt
        return save(state, path)

    train, val = _loaders()
    monkeypatch.setattr(engine, "save_checkpoint", stop_at_best)
    with pytest.raises(KeyboardInterrupt):
        _fit_on_cpu(ToyNet(), train, val, epochs=1, out_dir=tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1 and not (tmp_path / "best.pt").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit_on_cpu(ToyNet(), train, val, epochs=1, out_dir=tmp_path, resume=True)
    said = [str(w.message) for w in caught]
    assert any("already has 1 epochs" in m for m in said) and not any("is missing" in m for m in said)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


def test_a_run_stopped_between_its_two_checkpoints_resumes_with_the_right_best_weights(tmp_path, monkeypatch):
    """best.pt was written before last.pt: stopped between them, best.pt held an epoch the resumed history
    did not have, and restore_best could return weights of an epoch it never judged best."""
    import mtlearn.engine as engine

    save = engine.save_checkpoint

    def stop_at_best_of_epoch_2(state, path):
        if path.name == "best.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt  # the user, or the machine, between the two writes
        return save(state, path)

    # epoch 2 beats epoch 1 whatever the global generator left ToyNet's first weights at (another test order
    # drew weights whose epoch 2 was no better: no best.pt to stop at)
    real_evaluate, dice = engine._evaluate, iter([0.5, 0.6])
    monkeypatch.setattr(engine, "_evaluate", lambda *a, **k: dict(real_evaluate(*a, **k), **{"seg/dice": next(dice)}))
    train, val = _loaders()
    _fit_on_cpu(ToyNet(), train, val, epochs=1, out_dir=tmp_path)
    monkeypatch.setattr(engine, "save_checkpoint", stop_at_best_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _fit_on_cpu(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True)
    monkeypatch.undo()
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 2 and load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    model = ToyNet()
    with pytest.warns(UserWarning, match="already has 2 epochs"):
        history = _fit_on_cpu(model, train, val, epochs=2, out_dir=tmp_path, resume=True)
    assert history.best_epoch == 2 and load_checkpoint(tmp_path / "best.pt")["epoch"] == 2  # repaired
    for name, value in model.state_dict().items():
        assert torch.equal(value, last["model"][name]), name


def test_non_finite_batchnorm_statistics_stop_training_too(tmp_path):
    """Buffers are saved in checkpoints as well: an inf running variance must not be written either."""
    torch.manual_seed(0)
    model, steps = ToyNet(), []

    def overflow(optimizer, step_args, step_kwargs):
        steps.append(None)
        if len(steps) == 8:  # the last step of epoch 2
            model.encoder[1].running_var.fill_(float("inf"))

    handle = register_optimizer_step_post_hook(overflow)
    try:
        with pytest.raises(NonFiniteWeightsError) as caught:
            _fit(model, *_loaders(), epochs=3, out_dir=tmp_path)
    finally:
        handle.remove()
    assert caught.value.epoch == 2 and caught.value.names == ["encoder.1.running_var"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_evaluate_averages_over_images_not_batches():
    """8 validation images in batches of 3, 3, 2 score what one batch of 8 scores (eval mode: per-image outputs)."""
    torch.manual_seed(0)
    model, data, scores = ToyNet(), ToyData(n=8, seed=1), []
    for batch_size in (8, 3):
        np.random.seed(0), random.seed(0)  # the same flips and noise for both (ToyData draws them)
        scores.append(evaluate(model, DataLoader(data, batch_size=batch_size)))
    whole, uneven = scores
    assert set(whole) == set(uneven)
    for key, value in whole.items():
        assert uneven[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_a_fit_whose_monitor_is_nan_in_every_epoch_says_there_is_no_best_epoch(tmp_path, monkeypatch):
    """One class in the validation set: cls/auc is NaN every epoch, and best.pt was never written, without a word."""
    import mtlearn.engine as engine

    real_evaluate = engine._evaluate  # fit's validation pass
    monkeypatch.setattr(engine, "_evaluate", lambda *a, **k: dict(real_evaluate(*a, **k), **{"cls/auc": math.nan}))
    with pytest.warns(UserWarning, match=r"no epoch could be the best one: val/cls/auc was not finite in any epoch "
                                         r"\(last: nan\), so there is no best\.pt.*monitor='seg/loss'"):
        history = _fit(ToyNet(), *_loaders(), epochs=2, monitor="cls/auc", out_dir=tmp_path)
    assert history.best_epoch is None and not (tmp_path / "best.pt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a monitor with a value in some epoch, or no validation: nothing to say
        _fit(ToyNet(), *_loaders(), epochs=1)
        _fit(ToyNet(), _loaders()[0], None, epochs=1, out_dir=tmp_path / "no_val")
        # resumed with a val_loader but no epoch left: none was validated, which is no NaN monitor
        warnings.filterwarnings("ignore", message=r"the run in .* already has 1 epochs")  # said, and not this
        _fit(ToyNet(), *_loaders(), epochs=1, out_dir=tmp_path / "no_val", resume=True)
    epochs = iter([math.nan, 0.7])  # NaN in epoch 1 only: epoch 2 is the best, and nothing to warn of
    monkeypatch.setattr(engine, "_evaluate", lambda *a, **k: dict(real_evaluate(*a, **k), **{"cls/auc": next(epochs)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fit(ToyNet(), *_loaders(), epochs=2, monitor="cls/auc").best_epoch == 2


def test_a_nan_validation_metric_never_becomes_the_best():
    """NaN compares False with everything, so only an explicit check keeps it from winning a first epoch."""
    history = History(monitor="val/seg/dice", mode="max")
    assert not history.append({"epoch": 1, "val/seg/dice": float("nan")})
    assert (history.best_epoch, history.best_value) == (None, None)
    assert history.append({"epoch": 2, "val/seg/dice": 0.4})  # the first real value is the best, not "worse than NaN"
    assert (history.best_epoch, history.best_value) == (2, 0.4)


class BlowUpWeights(FixedWeights):
    """Fixed weights whose state turns NaN at the end of epoch `at` (e.g. a learned weight that overflowed)."""

    def __init__(self, at):
        super().__init__(TASKS)
        self.at, self.epochs = at, 0

    def end_epoch(self, epoch_losses):
        self.epochs += 1
        if self.epochs == self.at:
            self.task_weights.fill_(float("nan"))


def test_non_finite_task_weights_stop_training_before_they_are_saved(tmp_path):
    """The weighting's state is saved in last.pt too: a NaN task weight must be caught like a NaN model weight."""
    with pytest.raises(NonFiniteWeightsError) as caught:
        _fit(ToyNet(), *_loaders(), epochs=3, weighting=BlowUpWeights(at=2), out_dir=tmp_path)
    assert caught.value.epoch == 2 and caught.value.names == ["weighting.task_weights"]
    state = load_checkpoint(tmp_path / "last.pt")  # still epoch 1's, with the weights it trained with
    assert state["epoch"] == 1 and state["weighting"]["task_weights"].tolist() == [1.0, 0.25, 1.0]


def test_resume_restores_the_loss_scalers_scale(monkeypatch, tmp_path):
    """fp16 with a GradScaler, simulated on the CPU: 2^60 overflows, so epoch 1 backs the scale off. A resumed
    run must go on from that scale, not start again at 2^60 (and skip the steps the first run already skipped)."""
    import functools

    import mtlearn.engine as engine

    monkeypatch.setattr(engine, "resolve_amp", lambda amp, device: torch.float16)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**60))
    train_one_epoch, starts = engine._train_one_epoch, []

    def recording(run, *args, **kwargs):  # the scale each epoch starts from
        starts.append(run.scaler.get_scale())
        return train_one_epoch(run, *args, **kwargs)

    monkeypatch.setattr(engine, "_train_one_epoch", recording)
    crashing, val = _loaders(crash_after=16 + 6)  # dies in epoch 2, after epoch 1's checkpoint
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_on_cpu(ToyNet(), crashing, val, epochs=2, out_dir=tmp_path)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["epoch"] == 1 and saved["scaler"]["scale"] < 2.0**60  # the scaler did back off
    assert starts == [2.0**60, saved["scaler"]["scale"]]  # the crashed run's epoch 2 went on from it
    _fit_on_cpu(ToyNet(), *_loaders(), epochs=2, out_dir=tmp_path, resume=True)
    assert starts[2:] == [saved["scaler"]["scale"]]


def test_several_bad_losses_name_the_first_task():
    """NaN images make every task's loss NaN; the error names the first task in the run's order."""
    train, _ = _loaders()
    for item in train.dataset.items:
        item["image"] = torch.full((1, 16, 16), float("nan"))
    with pytest.raises(NonFiniteLossError) as caught:
        _fit(ToyNet(), train, None, epochs=1)
    assert (caught.value.epoch, caught.value.step, caught.value.task) == (1, 1, "seg")
    assert "the 'seg' loss is nan" in str(caught.value)


def test_numpy_numbers_as_options_give_checkpoints_that_load(tmp_path):
    """fit accepts NumPy numbers (a learning rate from np.logspace); the checkpoint must still load with
    weights_only=True, which refuses NumPy objects, and the run must resume."""
    train, val = _loaders()
    options = dict(lr=np.logspace(-3, -2, 2)[1], poly_power=np.float32(0.9),
                   task_weights={"seg": np.float32(1), "cls": np.float64(0.5), "recon": np.float32(1)})
    _fit(ToyNet(), train, val, epochs=np.int64(1), out_dir=tmp_path, **options)
    for name in ("best.pt", "last.pt"):
        config = load_checkpoint(tmp_path / name)["config"]
        assert type(config["lr"]) is float and type(config["task_weights"]["cls"]) is float
    history = _fit(ToyNet(), train, val, epochs=np.int64(2), out_dir=tmp_path, resume=True, **options)
    assert len(history.records) == 2


@pytest.mark.parametrize("losses", [
    LossConfig(class_weights=np.array([1.0, 2.0, 3.0])),  # as sklearn's compute_class_weight returns them
    LossConfig(class_weights=list(np.array([1.0, 2.0, 3.0]))),  # a list of NumPy floats
    LossConfig(seg="dicefocal", focal_gamma=np.float64(2.0), class_weights=[1.0, 2.0, 3.0]),
    # a tensor: saved, then its comparison on resume raised "Boolean value of Tensor ... is ambiguous"
    LossConfig(class_weights=torch.tensor([1.0, 2.0, 3.0])),
], ids=["array", "list of numpy floats", "numpy focal_gamma", "tensor"])
def test_numpy_values_inside_the_loss_config_give_checkpoints_that_load(losses, tmp_path):
    """The LossConfig's fields reach the checkpoint's config too: a NumPy array there made every checkpoint
    unreadable ("corrupt or truncated"), after the whole run had trained, and resume failed the same way."""
    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path, losses=losses)
    for name in ("best.pt", "last.pt"):
        saved = load_checkpoint(tmp_path / name)["config"]["losses"]
        assert saved["class_weights"] == [1.0, 2.0, 3.0] and type(saved["class_weights"][0]) is float
        assert type(saved["focal_gamma"]) is float
    history = _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True, losses=losses)
    assert [r["epoch"] for r in history.records] == [1, 2]


@pytest.mark.parametrize("batch_size", [8, 2])
def test_resume_with_another_number_of_batches_per_epoch_is_refused(batch_size, tmp_path):
    """The restored scheduler counts steps of the old loader, the schedule's total those of the new one: 4 steps
    of batch 4, then batches of 8 (2 per epoch) trained all of epoch 2 at lr 0.0, without a word."""
    train, val = _loaders(batch_size=4)  # 16 images: 4 steps per epoch
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["steps_per_epoch"] == 4
    model = ToyNet()
    with pytest.raises(ValueError, match=rf"cannot resume .*\(steps_per_epoch: 4 then, {16 // batch_size} now; "
                                         rf"batch_size: 4 then, {batch_size} now\)\. "
                                         r".*keep the batch size, the training set and the number of torchrun "
                                         r"processes .*--batch-size, --limit, --nproc_per_node.*another out_dir"):
        _fit(model, _loaders(batch_size=batch_size)[0], val, epochs=2, out_dir=tmp_path, resume=True)
    assert model.calls == 0


@pytest.mark.parametrize("batch_size, images, changed", [(3, 9, "batch_size: 4 then, 3 now"),
                                                          (4, 12, "train_items: 9 then, 12 now")])
def test_resume_with_other_batches_of_the_same_number_is_refused(tmp_path, batch_size, images, changed):
    """9 images in batches of 4, resumed in batches of 3 (or 12 images of 4): 3 batches per epoch either way, so it
    resumed without a word into a run that no uninterrupted one matches (as the README says it refuses)."""
    _fit(ToyNet(), _loaders(batch_size=4, n=9)[0], None, epochs=1, out_dir=tmp_path)
    assert {k: load_checkpoint(tmp_path / "last.pt")[k] for k in ("steps_per_epoch", "batch_size", "train_items")} \
        == {"steps_per_epoch": 3, "batch_size": 4, "train_items": 9}
    with pytest.raises(ValueError, match=rf"cannot resume .*\({changed}\)\. \w+ is the .*keep the batch size"):
        _fit(ToyNet(), _loaders(batch_size=batch_size, n=images)[0], None, epochs=2, out_dir=tmp_path, resume=True)


def test_resume_by_another_number_of_processes_is_refused(tmp_path, monkeypatch):
    """2 torchrun processes of batch 4 resumed by 3 (or by 1) trained on other batches (12 images a step, not 8),
    under a warning about dropout from each process; the run's own number is recorded and compared."""
    import mtlearn.engine

    train = _loaders(batch_size=4)[0]
    _fit(ToyNet(), train, None, epochs=1, out_dir=tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["processes"] == 1
    monkeypatch.setattr(mtlearn.engine, "world_and_rank", lambda: (3, 0))  # what a 3-process run would count
    with pytest.raises(ValueError, match=r"cannot resume .*\(processes: 1 then, 3 now\)\. processes is the number "
                                         r"of torchrun processes .*--nproc_per_node"):
        _fit(ToyNet(), train, None, epochs=2, out_dir=tmp_path, resume=True)


def test_a_checkpoint_without_steps_per_epoch_still_resumes(tmp_path):
    """Checkpoints written before steps_per_epoch was saved resume as before, unchecked."""
    from mtlearn.checkpoint import save_checkpoint

    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    del state["steps_per_epoch"]
    save_checkpoint(state, tmp_path / "last.pt")
    history = _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True)
    assert history.records[1]["lr"] == pytest.approx(1e-2 * (1 - 4 / 8) ** 0.9)


@pytest.mark.parametrize("options, match", [
    (dict(weighting=FixedWeights(TASKS), task_weights={"seg": 5.0, "cls": 5.0, "recon": 5.0}),
     r"task_weights only apply to a weighting given by name .*not to the FixedWeights instance .*pass them to the "
     r"constructor instead: FixedWeights\(tasks, weights=\{'seg': 5\.0, 'cls': 5\.0, 'recon': 5\.0\}\)"),
    (dict(weighting=DynamicWeightAverage(TASKS), weighting_kwargs={"temperature": 100.0}),
     r"weighting_kwargs only apply .*DynamicWeightAverage\(tasks, temperature=100\.0\)"),
])
def test_a_weighting_instance_refuses_options_it_would_ignore(options, match):
    """With weighting="fixed" the same misuse is refused; with an instance both were silently dropped."""
    model = ToyNet()
    with pytest.raises(ValueError, match=match):
        _fit(model, *_loaders(), **options)
    assert model.calls == 0


def test_a_model_that_returns_a_tensor_is_told_to_return_a_dict():
    """A raw MONAI UNet returns its logits, not {"seg": logits}: torch said "Tensor.__contains__ only supports
    Tensor or scalar"."""
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    train, val = _loaders(keys=("image", "mask"))
    match = r"the model returned a Tensor, not a dict .*\{'seg': logits\}.*monai_baseline\('unet'\)"
    with pytest.raises(ValueError, match=match):
        _fit(net, train, val, tasks=("seg",), epochs=1)
    with pytest.raises(ValueError, match=match):
        evaluate(net, val, tasks=("seg",))


def test_classification_logits_of_one_per_image_are_named():
    class OneLogitNet(ToyNet):
        def forward(self, x):
            out = super().forward(x)
            out["cls"] = out["cls"][:, 0]  # (B,): a "binary" head with one output
            return out

    with pytest.raises(ValueError, match=r"logits must have shape \(B, num_classes\) .*got \(4,\); a binary task "
                                         r"needs two logits per image"):
        _fit(OneLogitNet(), *_loaders(), epochs=1)


@pytest.mark.parametrize("data_range", [0, -1.0, float("nan"), float("inf"), "1"])
@pytest.mark.parametrize("validate", [True, False])
def test_a_bad_data_range_is_refused_before_the_first_step(data_range, validate):
    """It was checked by the validation metrics, after a whole epoch; "1" was a bare TypeError in the check for
    unscaled images; and without a val_loader it was never checked."""
    model = ToyNet()
    train, val = _loaders()
    with pytest.raises(ValueError, match=r"data_range must be a finite number > 0 \(max - min of the clean images.*"
                                         rf"got {re.escape(repr(data_range))}"):
        _fit(model, train, val if validate else None, data_range=data_range)
    assert model.calls == 0


def test_losses_given_as_a_dict_are_named():
    model = ToyNet()
    with pytest.raises(ValueError, match=r"losses must be a LossConfig .*got a dict; pass e\.g\. "
                                         r"losses=LossConfig\(seg='dicefocal'\)"):
        _fit(model, *_loaders(), losses={"seg": "dicefocal"})
    assert model.calls == 0


def test_a_weighting_inside_a_train_config_is_the_one_that_learns():
    """As with fit(weighting=w): the caller's object holds the learned weights afterwards."""
    weighting = UncertaintyWeighting(TASKS)
    history = fit(ToyNet(), _loaders()[0], None, TrainConfig(weighting=weighting, epochs=1, lr=1e-2, seed=0,
                                                             progress=False))
    assert weighting.log_vars.detach().abs().min() > 0  # every task's weight moved from its start
    assert history.records[-1]["weight/seg"] != 1.0


def test_a_training_loader_without_a_length_is_named():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(ToyData())

    with pytest.raises(ValueError, match=r"train_loader has no length \(a Stream without __len__\?\); .* __len__"):
        fit(ToyNet(), DataLoader(Stream(), batch_size=4), config=TrainConfig(progress=False))


def _dropout_state_per_process(rank, store, results):
    with _one_of_two_processes(rank, store, results):
        _fit(ToyNet(), _loaders()[0], None, epochs=1, device="cpu")
        (results / f"state{rank}.txt").write_text(str(torch.get_rng_state().sum().item()))


def _resume_per_process(rank, store, results):
    """Two epochs straight, then one epoch and a resume to two; constant lr, so the runs can agree."""
    from mtlearn.train import state_digest

    with _one_of_two_processes(rank, store, results):
        outcomes = []
        for folder, epochs, resume in (("full", 2, False), ("part", 1, False), ("part", 2, True)):
            torch.manual_seed(0)
            model = ToyNet()
            _fit(model, _loaders()[0], None, epochs=epochs, poly_power=0, device="cpu", out_dir=results / folder,
                 resume=resume)
            outcomes.append(f"{state_digest(model)} {torch.get_rng_state().sum().item()}")
        (results / f"outcome{rank}.txt").write_text("\n".join(outcomes))


@pytest.mark.slow
def test_torchrun_on_the_cpu_resumes_each_process_to_the_uninterrupted_run(tmp_path):
    """Only rank 0 writes last.pt: it restored rank 0's CPU generator on every rank, so after a resume
    both dropped the same units and the weights differed from the uninterrupted run's."""
    import torch.multiprocessing as mp

    mp.spawn(_resume_per_process, args=(tmp_path / "store", tmp_path), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["finished", "finished"]
    outcomes = [(tmp_path / f"outcome{r}.txt").read_text().splitlines() for r in (0, 1)]
    for full, _, resumed in outcomes:
        assert resumed == full  # the same weights and, for the next epoch, the same generator
    assert outcomes[0][0].split()[1] != outcomes[1][0].split()[1]  # each process its own generator


@pytest.mark.slow
def test_torchrun_processes_on_the_cpu_drop_different_units(tmp_path):
    """Seeded, each process must draw its own dropout masks (gloo, CPU generator), not its neighbour's."""
    import torch.multiprocessing as mp

    mp.spawn(_dropout_state_per_process, args=(tmp_path / "store", tmp_path), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["finished", "finished"]
    assert (tmp_path / "state0.txt").read_text() != (tmp_path / "state1.txt").read_text()


@pytest.mark.parametrize("learned", [False, True])
def test_an_interrupted_first_epoch_gives_the_model_back_so_a_resume_repeats_the_run(tmp_path, monkeypatch, learned):
    """Ctrl-C in epoch 1 (no last.pt yet): resume=True starts afresh, but went on from the weights the
    interrupted call had already moved in the same model object, so the run was not the uninterrupted one.
    learned: a weighting instance with learned weights, passed in (its state moved too)."""
    import mtlearn.engine as engine
    from mtlearn.weighting import UncertaintyWeighting

    def weighting():
        return {"weighting": UncertaintyWeighting(TASKS)} if learned else {}

    torch.manual_seed(0)
    uninterrupted = ToyNet()
    start = copy.deepcopy(uninterrupted.state_dict())
    _fit(uninterrupted, *_loaders(), epochs=2, out_dir=tmp_path / "a", **weighting())
    train, val = _loaders()  # the same loaders throughout: the interrupted call drew from their generator too
    options = weighting()  # the same instance for the interrupted call and the resume
    model = ToyNet()
    model.load_state_dict(start)
    real_update, steps = engine._update, []

    def interrupted(*args, **kwargs):
        if len(steps) == 3:  # after three of epoch 1's four steps
            raise KeyboardInterrupt
        steps.append(1)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(engine, "_update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(model, train, val, epochs=2, out_dir=tmp_path / "b", **options)
    assert not (tmp_path / "b" / "last.pt").exists() and len(steps) == 3
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # given back
    monkeypatch.setattr(engine, "_update", real_update)
    _fit(model, train, val, epochs=2, out_dir=tmp_path / "b", resume=True, **options)
    assert all(torch.equal(v, uninterrupted.state_dict()[k]) for k, v in model.state_dict().items())


def test_an_interruption_after_the_first_checkpoint_leaves_the_model_trained(tmp_path, monkeypatch):
    """From the first last.pt on, the run is on disk: Ctrl-C in epoch 2 must not rewind the model in the
    notebook to its starting weights (a resume reads last.pt in any case)."""
    import mtlearn.engine as engine

    torch.manual_seed(0)
    model = ToyNet()
    start = copy.deepcopy(model.state_dict())
    real_update, steps = engine._update, []

    def interrupted(*args, **kwargs):
        if len(steps) == 5:  # one step into epoch 2 (four steps each)
            raise KeyboardInterrupt
        steps.append(1)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(engine, "_update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(model, *_loaders(), epochs=2, out_dir=tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert not all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    # a resumed call starts from last.pt: Ctrl-C in its first epoch keeps the steps it took, as above
    saved = load_checkpoint(tmp_path / "last.pt")["model"]
    steps[:] = [1] * 4  # the next call raises after its first step
    with pytest.raises(KeyboardInterrupt):
        _fit(model, *_loaders(), epochs=2, out_dir=tmp_path, resume=True)
    assert len(steps) == 5 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert not all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_a_misspelt_monitor_is_refused_without_a_val_loader_too():
    """Accepted silently, it went into the history; a resume that added a val_loader was then refused for a
    best.pt "chosen by 'val/seg/dcie'"."""
    train, _ = _loaders()
    with pytest.raises(ValueError, match=r"monitor 'seg/dcie' is not a validation metric; choose one of"):
        _fit(ToyNet(), train, None, epochs=1, monitor="seg/dcie")


def test_evaluate_takes_a_model_without_parameters():
    """device=None reads the model's device from its parameters: a model with none raised a bare StopIteration."""

    class Fixed(nn.Module):  # a baseline that always predicts the same
        tasks = ("cls",)

        def forward(self, x):
            return {"cls": torch.zeros(len(x), 3)}

    metrics = evaluate(Fixed(), _loaders()[1], ("cls",))
    assert 0.0 <= metrics["cls/acc"] <= 1.0


def test_a_restore_that_fails_does_not_hide_the_error_that_stopped_the_run(tmp_path, monkeypatch):
    import mtlearn.engine as engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    model = ToyNet()
    monkeypatch.setattr(engine, "_update", interrupted)
    monkeypatch.setattr(model, "load_state_dict", lambda *args, **kwargs: 1 / 0)  # e.g. a broken CUDA context
    with pytest.warns(UserWarning, match=r"could not give the model its starting state back \(division by zero\)"):
        with pytest.raises(KeyboardInterrupt):
            _fit(model, *_loaders(), epochs=1, out_dir=tmp_path)


@pytest.mark.parametrize("wrap", ["compile", "DataParallel"])
def test_a_model_wrapped_before_fit_is_refused_naming_the_plain_way(wrap, tmp_path):
    """Its checkpoints held the wrapper's names ("_orig_mod.", "module." before each), which the plain model of a
    resume did not know: "written for another model"."""
    model = ToyNet()
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    fix = "pass the model itself and compile=True" if wrap == "compile" else r"pass the model itself \(DataParallel"
    with pytest.raises(ValueError, match=fix):
        _fit(wrapped, *_loaders(), epochs=1, out_dir=tmp_path)
    assert model.calls == 0 and not any(tmp_path.iterdir())


def _backend_failure(inner: Exception) -> Exception:
    """torch.compile's error for a backend that failed (its signature grew a third argument over releases)."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        return BackendCompilerFailed(lambda: None, inner, None)
    except TypeError:
        return BackendCompilerFailed(lambda: None, inner)


class _Uncompilable(nn.Module):
    """What torch.compile returns on a machine where its backend cannot build the model: a wrapper whose first
    call fails (here at once, without minutes of tracing first)."""

    def __init__(self, model, error: Exception):
        super().__init__()
        self.model, self.error = model, error

    def forward(self, x):
        raise self.error


def test_a_model_torch_compile_cannot_build_is_named_with_the_fix(monkeypatch, capsys):
    # without a C++ compiler, torch said InvalidCxxCompiler and how to debug it, not how to train without compiling
    from torch._inductor.exc import InvalidCxxCompiler

    failure = _backend_failure(InvalidCxxCompiler())
    monkeypatch.setattr(torch, "compile", lambda model: _Uncompilable(model, failure))
    with pytest.raises(CompileError, match=r"torch\.compile could not build the model \(InvalidCxxCompiler: No working "
                       r"C\+\+ compiler .*\); train with compile=False \(on the command line: without --compile\)"
                       ) as caught:
        _fit(ToyNet(), *_loaders(), compile=True, progress=True, device="cpu")
    assert caught.value.__cause__ is failure  # torch's own error stays in the traceback
    assert "compiling the model: the first steps take a minute or more" in capsys.readouterr().err  # not a frozen 0
    # any other error of a compiled run is left as it is
    monkeypatch.setattr(torch, "compile", lambda model: _Uncompilable(model, ValueError("a bad batch")))
    with pytest.raises(ValueError, match="^a bad batch$"):
        _fit(ToyNet(), *_loaders(), compile=True, device="cpu")


def test_an_unreadable_last_pt_points_to_a_readable_best_pt(tmp_path):
    """Deleting last.pt, as the message said, left a folder --resume refused (only best.pt); best.pt is a whole
    checkpoint of the best epoch, from which the run can go on."""
    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path)
    best_epoch = int(load_checkpoint(tmp_path / "best.pt")["epoch"])
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(ValueError, match=re.escape(
            f"Or go on from the best epoch so far: {tmp_path / 'best.pt'} is readable and a whole checkpoint (epoch "
            f"{best_epoch}); copy it over last.pt (cp {tmp_path / 'best.pt'} {last}) and resume")):
        _fit(ToyNet(), train, val, epochs=3, out_dir=tmp_path, resume=True)
    last.write_bytes((tmp_path / "best.pt").read_bytes())
    history = _fit(ToyNet(), train, val, epochs=3, out_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in history.records] == [*range(1, best_epoch + 1), *range(best_epoch + 1, 4)]
    (tmp_path / "best.pt").write_bytes(b"")  # both unreadable: nothing to offer
    last.write_bytes(b"")
    with pytest.raises(ValueError, match=r"retrain that run$"):
        _fit(ToyNet(), train, val, epochs=4, out_dir=tmp_path, resume=True)


def test_a_model_that_merely_has_an_orig_mod_attribute_is_not_taken_for_a_compiled_one(tmp_path):
    """An EMA-style wrapper keeps the original as `_orig_mod`: only torch.compile's OptimizedModule is refused."""
    model = ToyNet()
    model._orig_mod = nn.Linear(1, 1)  # a submodule of that name, trained along
    _fit(model, *_loaders(), epochs=1)
    assert model.calls > 0


def test_a_run_saved_with_wrapped_names_resumes_into_the_plain_model(tmp_path):
    """fit saved torch.compile(model)'s names ("_orig_mod.<name>") before it refused wrapped models: such a
    last.pt resumes with the plain model, its frozen-parameter check included."""
    train, val = _loaders()
    _fit(ToyNet(), train, val, epochs=1, out_dir=tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    state["model"] = {f"_orig_mod.{k}": v for k, v in state["model"].items()}
    state["trainable"] = [f"_orig_mod.{n}" for n in state["trainable"]]
    save_checkpoint(state, tmp_path / "last.pt")
    frozen = ToyNet()
    frozen.encoder[0].weight.requires_grad_(False)  # the saved names are compared, not skipped for their prefix
    with pytest.raises(ValueError, match=r"other parameters train now than in that run \(frozen now: encoder\.0\."
                                         r"weight; training now: none\)"):
        _fit(frozen, train, val, epochs=2, out_dir=tmp_path, resume=True)
    history = _fit(ToyNet(), train, val, epochs=2, out_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in history.records] == [1, 2]


def test_the_progress_bar_is_closed_after_a_run_and_after_an_error(monkeypatch):
    """A bar left open stays in tqdm's list, and in a notebook a failed run is not marked as such. (The bars are
    held here, so that only fit's own close(), not the garbage collector, can close them.)"""
    import mtlearn.engine

    bars = []

    class Held(mtlearn.engine.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if getattr(self, "desc", "").startswith("epoch"):  # fit's bar (a disabled one has no desc)
                bars.append(self)

    monkeypatch.setattr(mtlearn.engine, "tqdm", Held)
    _fit(ToyNet(), *_loaders(), epochs=1, progress=True)
    with pytest.raises(NonFiniteLossError):  # stopped inside the first epoch, at its second step
        _fit(ToyNet(nan_at_call=2), *_loaders(), epochs=1, progress=True)
    assert [bar.n for bar in bars] == [4, 1]  # the first after its 4 steps, the second after its one good step
    assert all(bar.disable for bar in bars)  # tqdm's mark of a closed bar
