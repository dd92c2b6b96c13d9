"""UMS-Rep: freezing, transfer, compute accounting, denoising pairs, the strategy table and its check."""

import math
import re
import itertools
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtlearn.checkpoint import load_checkpoint as load_checkpoint_file
from mtlearn.checkpoint import save_checkpoint
from mtlearn.data import SyntheticUltrasound, load_dataset
from mtlearn.losses import build_losses, task_losses
from mtlearn.mtl import build_model
from mtlearn.umsrep import (
    METRICS,
    NUM_STAGES,
    DenoisingPairs,
    InMemory,
    StepCost,
    TrainedModel,
    UMSRepConfig,
    _new_model,
    build_optimizer,
    encoder_parts,
    freeze_encoder,
    joint_vs_single_task,
    load_strategy_data,
    measure_training_step,
    pretrain_representation,
    run_comparison,
    run_strategy,
    strategy_config,
    strategy_table,
    train_and_measure,
    transfer_encoder,
    transfer_decoders,
)
from mtlearn.utils import count_parameters
from tests.fixtures_real import QUIRK_REPORTS

SIZE = 32
TASKS = ("seg", "cls", "recon")


def tiny(tasks=TASKS, seed=0):
    torch.manual_seed(seed)
    return build_model("tiny", tasks=tasks, image_size=SIZE)


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, 1, SIZE, SIZE, generator=g)
    return {"image": (clean + 0.1 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1), "clean": clean,
            "mask": (torch.rand(n, 1, SIZE, SIZE, generator=g) > 0.7).float(),
            "label": torch.randint(0, 3, (n,), generator=g)}


def train_steps(model, optimizer, steps=2, tasks=TASKS):
    loss_fns = build_losses(tasks)
    model.train()
    for step in range(steps):
        losses = task_losses(model(batch(seed=step)["image"]), batch(seed=step), loss_fns)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def encoder_state(model, group_indices):
    """Copies of every tensor (parameters and BN buffers) of the chosen encoder groups."""
    groups = encoder_parts(model)
    return {(i, k): v.detach().clone() for i in group_indices for part in groups[i]
            for k, v in part.state_dict().items()}


# ---------------------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("trainable_stages", [0, 2])
def test_frozen_parts_do_not_change_but_the_rest_trains(trainable_stages):
    model = freeze_encoder(tiny(), trainable_stages)
    frozen_groups = range(NUM_STAGES + 1 - trainable_stages)  # group 0: stem + patch embedding
    frozen_before = encoder_state(model, frozen_groups)
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    assert any(k[1].endswith("running_mean") for k in frozen_before)  # BN statistics are part of the check
    train_steps(model, build_optimizer(model, lr=1e-2))
    frozen_after = encoder_state(model, frozen_groups)
    for key, value in frozen_before.items():
        assert torch.equal(value, frozen_after[key]), f"frozen tensor {key} changed"
    assert any(not torch.equal(v, model.heads.state_dict()[k]) for k, v in heads_before.items())
    if trainable_stages:
        last_before = encoder_state(tiny(), [NUM_STAGES])
        last_after = encoder_state(model, [NUM_STAGES])
        assert any(not torch.equal(v, last_after[k]) for k, v in last_before.items()), "unfrozen stage did not train"


def test_optimizer_holds_only_trainable_parameters():
    model = freeze_encoder(tiny(), 1)
    optimizer = build_optimizer(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert held == trainable
    assert not any(id(p) in held for p in model.encoder.stem.parameters())
    assert all(p.requires_grad for p in [*model.heads.parameters(), *model.decoders.parameters()])


def test_frozen_parts_stay_in_eval_mode_while_training():
    frozen = freeze_encoder(tiny().train(), 0)
    assert not frozen.encoder.stem.training and not frozen.encoder.stages[3].training  # at once, not at a forward
    model = freeze_encoder(tiny(), 2).train()
    model(batch()["image"])
    assert not model.encoder.stem.training and not model.encoder.stages[1].training  # frozen
    assert model.encoder.stages[3].training and model.heads["cls"].training  # trainable


def test_refreezing_replaces_the_previous_choice():
    model = freeze_encoder(freeze_encoder(tiny(), 0), NUM_STAGES).train()
    assert count_parameters(model, trainable_only=True) == count_parameters(model)
    model(batch()["image"])
    assert model.encoder.stem.training


def test_unfreezing_a_training_model_puts_the_unfrozen_parts_back_in_training_mode():
    """Gradual unfreezing without another model.train(): the stem stayed in eval mode (BatchNorm
    statistics fixed, stochastic depth off) until something called train()."""
    model = freeze_encoder(tiny().train(), 0)
    model = freeze_encoder(model, NUM_STAGES)
    assert model.encoder.stem.training and model.encoder.stages[0].training
    before = model.encoder.stem[1].running_mean.clone()
    model(batch()["image"])
    assert not torch.equal(model.encoder.stem[1].running_mean, before)  # its BatchNorm learns again
    evaluating = freeze_encoder(freeze_encoder(tiny().eval(), 0), NUM_STAGES)
    assert not evaluating.encoder.stem.training  # a model in eval mode stays there


def test_trainable_parameters_grow_frozen_partial_full():
    counts = [count_parameters(freeze_encoder(tiny(), stages), trainable_only=True) for stages in (0, 2, NUM_STAGES)]
    assert counts[0] < counts[1] < counts[2] == count_parameters(tiny())
    heads_only = sum(p.numel() for name in ("decoders", "heads") for p in getattr(tiny(), name).parameters())
    assert counts[0] == heads_only


@pytest.mark.parametrize("bad", [-1, NUM_STAGES + 1, 1.5, True, "all"])
def test_freeze_encoder_rejects_bad_stage_counts(bad):
    with pytest.raises(ValueError, match=r"trainable_stages must be an integer from 0 \(frozen encoder\) to 4 "):
        freeze_encoder(tiny(), bad)


def test_build_optimizer_refuses_a_model_with_nothing_to_train():
    model = tiny(("cls",))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters; unfreeze something \(freeze_encoder\(model, 4\)\)"):
        build_optimizer(model)


@pytest.mark.parametrize("kwargs, says", [
    (dict(lr=-1), r"lr must be a finite number > 0 \(e.g. 1e-4\), got -1"),  # was torch's "Invalid learning rate"
    (dict(lr=float("inf")), r"lr must be a finite number > 0"),  # torch took it, and trained NaN weights
    (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0 \(0: no decay\)"),
    (dict(lr=1.0, weight_decay=2.0), r"would shrink every weight by lr x weight_decay = 2 \(>= 1\)"),
    (dict(betas=(0.9, 1.0)), r"betas must be a pair of numbers in \[0, 1\), e.g. \(0.9, 0.999\), got \(0.9, 1.0\)"),
])
def test_build_optimizer_names_a_bad_hyperparameter_as_fit_does(kwargs, says):
    with pytest.raises(ValueError, match=says):
        build_optimizer(tiny(), **kwargs)


def test_build_optimizer_keeps_numpy_hyperparameters_out_of_its_checkpoints(tmp_path):
    """A sweep's NumPy numbers went into the optimiser's state as they were, and weights_only loading refuses them."""
    optimizer = build_optimizer(tiny(), lr=np.float64(2e-3), weight_decay=np.float32(0.1),
                                betas=(np.float64(0.8), 0.95))
    group = optimizer.param_groups[0]
    assert [type(v) for v in (group["lr"], group["weight_decay"], *group["betas"])] == [float] * 4
    assert load_checkpoint_file(save_checkpoint({"optimizer": optimizer.state_dict()}, tmp_path / "o.pt"))


# ---------------------------------------------------------------------------------------------- transfer


def test_transfer_copies_the_encoder_and_starts_dense_decoders_from_the_denoiser():
    denoiser, model = tiny(("recon",), seed=1), tiny(TASKS, seed=2)
    assert transfer_encoder(denoiser, model) == len(denoiser.encoder.state_dict())
    for key, value in denoiser.encoder.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[key])
    assert sorted(transfer_decoders(denoiser, model)) == ["decoders.recon", "decoders.seg", "heads.recon"]
    x = batch()["image"]
    denoiser.eval(), model.eval()
    assert torch.allclose(denoiser(x)["recon"], model(x)["recon"])  # the same denoiser inside the multi-task model
    for key, value in denoiser.decoders["recon"].state_dict().items():
        assert torch.equal(value, model.decoders["seg"].state_dict()[key])
    fresh = tiny(TASKS, seed=2)  # the mask and class heads keep their own initial weights
    for name in ("seg", "cls"):
        assert all(torch.equal(v, model.heads[name].state_dict()[k]) for k, v in fresh.heads[name].state_dict().items())


def test_a_decoder_of_another_layout_is_left_alone():
    denoiser = tiny(("recon",))
    with_dfe = build_model("tiny", tasks=("seg", "recon"), image_size=SIZE, dfe="three")
    assert sorted(transfer_decoders(denoiser, with_dfe)) == ["decoders.recon", "heads.recon"]
    with pytest.raises(ValueError, match=r"no 'recon' decoder to copy; pre-train it with tasks=\('recon',\)"):
        transfer_decoders(tiny(("cls",)), with_dfe)


def test_transfer_decoders_checks_every_part_before_copying_any():
    """A mask head of another size failed after the decoders were copied (the model left half changed), advising
    "the same preset and in_channels", which both had."""
    pretrained_seg = build_model("tiny", tasks=("seg",), image_size=SIZE)
    model = build_model("tiny", tasks=("seg",), seg_classes=3, image_size=SIZE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"heads.seg.conv.weight has shape \(2, 16, 1, 1\) in the pretrained model but "
                                         r"\(3, 16, 1, 1\) here; build both with the same preset, in_channels and "
                                         r"seg_classes$"):
        transfer_decoders(pretrained_seg, model, source="seg")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("source", ["clsx", "cls"])
def test_transfer_decoders_refuses_an_unknown_source_before_advising_pre_training(source):
    """source="clsx" advised "pre-train it with tasks=('clsx',)", a task that does not exist."""
    with pytest.raises(ValueError, match=rf"source must be a task with a decoder, one of \('recon', 'seg'\), "
                                         rf"got '{source}'$"):
        transfer_decoders(tiny(("recon",)), tiny(TASKS), source=source)


def test_transfer_encoder_refuses_another_architecture():
    other = build_model("tiny", tasks=("recon",), image_size=SIZE, in_channels=3)
    with pytest.raises(ValueError, match="in_channels"):
        transfer_encoder(other, tiny())


def test_transfer_encoder_refuses_a_model_without_a_resformer_encoder():
    """A MONAI baseline's `.encoder` is a ModuleList: it was AttributeError 'ModuleList' ... 'config'."""
    from mtlearn.mtl import monai_baseline

    unet = monai_baseline("unet", image_size=SIZE)
    with pytest.raises(ValueError, match=r"the pretrained model: MonaiBaseline has no ResFormer `encoder` .*model"):
        transfer_encoder(unet, tiny())
    with pytest.raises(ValueError, match=r"the model: MonaiBaseline has no ResFormer `encoder`"):
        transfer_encoder(tiny(), unet)


def test_transfer_encoder_refuses_another_image_size():
    """No tensor changes shape with the image size, but the attention windows do (2 x 2 vs 4 x 4)."""
    larger = build_model("tiny", tasks=("recon",), image_size=2 * SIZE)
    with pytest.raises(ValueError, match=r"differ in image_size: \(64, 64\) in the pretrained model, \(32, 32\) here"):
        transfer_encoder(larger, tiny())
    larger_windows = build_model("tiny", tasks=("recon",), image_size=SIZE, window_size=4)  # tiny: 2
    with pytest.raises(ValueError, match=r"differ in window_size: 4 in the pretrained model, 2 here; .* window_size"):
        transfer_encoder(larger_windows, tiny())


def test_transfer_encoder_refuses_another_preset_by_its_first_differing_tensors():
    """course has two Swin blocks per stage where tiny has one: the keys differ before any shape does."""
    course = build_model("course", tasks=("recon",), image_size=SIZE)
    with pytest.raises(ValueError, match=re.escape(
            "the encoder of the two models differ (e.g. ['stages.0.transformer.1.attn.proj.bias', "
            "'stages.0.transformer.1.attn.proj.weight', 'stages.0.transformer.1.attn.qkv.bias']); build both with "
            "the same preset, in_channels and image_size")):
        transfer_encoder(course, tiny())


# ---------------------------------------------------------------------------------------------- compute


def test_step_flops_scale_with_images_and_shrink_when_frozen():
    model, data = tiny(), batch(4)
    half = {k: v[:2] for k, v in data.items()}
    full_4, full_2 = measure_training_step(model, data, TASKS), measure_training_step(model, half, TASKS)
    assert full_4.flops == pytest.approx(2 * full_2.flops, rel=1e-6)  # per image: the same
    assert full_4.activation_bytes == pytest.approx(2 * full_2.activation_bytes, rel=0.05)
    assert full_2.fixed_saved_bytes == 0 < full_4.fixed_saved_bytes  # under 4 images all is taken to grow
    frozen = measure_training_step(freeze_encoder(tiny(), 0), data, TASKS)
    assert frozen.flops < full_4.flops and frozen.activation_bytes < full_4.activation_bytes
    assert frozen.memory_bytes() < full_4.memory_bytes()
    # a full training step is forward + backward: between 2x and 3.5x the forward FLOPs
    from mtlearn.utils import count_flops
    forward = count_flops(model, data["image"])
    assert 2 * forward < full_4.flops < 3.5 * forward


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_memory_estimate_extrapolates_only_what_grows_with_the_batch(amp_dtype):
    """Under autocast a half-precision copy of each weight is saved once per step: an estimate for 8
    images from a step on 2 must not multiply it by 4 (it was ~30 % high for the course preset)."""
    model, data = tiny(), batch(16)
    small = measure_training_step(model, {k: v[:4] for k, v in data.items()}, TASKS, amp_dtype=amp_dtype)
    large = measure_training_step(model, data, TASKS, amp_dtype=amp_dtype)
    assert small.memory_bytes(16) == pytest.approx(large.memory_bytes(), rel=0.03)  # some saved sizes follow the data
    if amp_dtype is not None:
        assert small.fixed_saved_bytes > 0.3 * small.activation_bytes  # the weight copies
    with_nothing_fixed = small.parameter_bytes + 3 * small.trainable_bytes + 4 * small.activation_bytes
    assert with_nothing_fixed > large.memory_bytes() * (1.1 if amp_dtype else 1.0)  # the old estimate: too high


def test_saved_activations_are_measured_with_the_attention_training_uses(monkeypatch):
    """The FLOPs need attention's math form (its matrix products count); the memory must not come from
    it, or the estimate mixes two kernels (and the fixed part is computed from them)."""
    import mtlearn.umsrep as U
    from mtlearn.utils import countable_attention

    counting = []
    original = U.countable_attention

    def tracked():
        counting.append(True)
        return original()

    monkeypatch.setattr(U, "countable_attention", tracked)
    model, data = tiny(), batch(4)
    cost = measure_training_step(model, data, TASKS)
    assert len(counting) == 1  # one pass for the FLOPs
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage())
        return tensor

    probe = tiny().train()  # the same weights (seed 0): what autograd saves in a plain training step
    parameters = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    loss_fns = build_losses(TASKS)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)
        sum(task_losses(probe(data["image"]), data, loss_fns).values()).backward()
    plain = sum({s.data_ptr(): s.nbytes() for s in saved if s.data_ptr() not in parameters}.values())
    saved.clear()
    with countable_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(task_losses(probe(data["image"]), data, loss_fns).values()).backward()
    math_form = sum({s.data_ptr(): s.nbytes() for s in saved if s.data_ptr() not in parameters}.values())
    assert math_form != plain  # the test can tell the two apart
    assert cost.activation_bytes == pytest.approx(plain, rel=0.01)


def test_measuring_does_not_touch_the_model():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_training_step(model, batch(), TASKS)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def record(strategy, tasks, flops_per_image=1e6, images=100, wall=1.0, cpu=None, **metrics):
    return TrainedModel(strategy, tasks, dict(metrics), trainable_parameters=10, flops_per_image=flops_per_image,
                        images_seen=images, wall_time_s=wall, cpu_time_s=2 * wall if cpu is None else cpu,
                        memory_mib=1.0)


def test_training_flops_are_per_image_flops_times_images_seen():
    assert record("scratch", ("seg",), flops_per_image=3e6, images=250).train_flops == pytest.approx(7.5e8)


def test_table_sums_models_and_amortises_the_pretraining():
    runs = [record("pretrain", ("recon",), images=200, wall=4.0),
            *(record("full", (t,), wall=2.0, **{"seg/dice": 0.8}) for t in ("seg", "cls", "recon")),
            record("joint", TASKS, wall=3.0),
            *(record("scratch", (t,), wall=5.0) for t in ("seg", "cls", "recon"))]
    table = strategy_table(runs, UMSRepConfig())
    assert list(table.index) == ["pretrain", "full", "joint", "scratch"]
    assert "denoising" in table.loc["pretrain", "description"]
    # rows in the order the strategies ran (the notebook's (a)-(e)), not alphabetical
    order = ["frozen", "partial", "full"]
    assert list(strategy_table([record(s, ("seg",)) for s in order], UMSRepConfig()).index) == order
    assert table.loc["full", "models"] == 3 and table.loc["full", "wall_time_s"] == 6.0
    assert table.loc["full", "train_gflops"] == pytest.approx(0.3)  # 3 models x 100 images x 1 MFLOP
    assert table.loc["joint", "total_gflops"] == pytest.approx(0.1 + 0.2)
    assert table.loc["joint", "amortised_wall_time_s"] == pytest.approx(3.0 + 4.0 / 2)  # 2 strategies reuse it
    assert table.loc["scratch", "pretrain_gflops"] == 0 and table.loc["scratch", "total_wall_time_s"] == 15.0
    assert table.loc["full", "seg/dice"] == 0.8 and math.isnan(table.loc["joint", "seg/dice"])


def test_table_refuses_a_network_passed_twice():
    """joint's records passed twice read models=2 and twice its compute: the repeat UMSRepConfig refuses in
    strategies."""
    joint = record("joint", TASKS)
    with pytest.raises(ValueError, match=r"the runs hold 'joint' on seg\+cls\+recon twice; pass each trained network "
                                         r"once"):
        strategy_table([record("pretrain", ("recon",)), joint, joint, record("scratch", ("seg",))], UMSRepConfig())
    table = strategy_table([joint, record("scratch", ("seg",)), record("scratch", ("cls",))], UMSRepConfig())
    assert table.loc["scratch", "models"] == 2  # one strategy's networks for other tasks are no repeat
    with pytest.raises(ValueError, match=r"joint and baseline are both 'scratch'; compare two strategies"):
        joint_vs_single_task(table, joint="scratch", baseline="scratch")


@pytest.mark.parametrize("runs, got", [([], "none"), (None, "none"), ((), "none"), ([1], "an item of type int")])
def test_table_names_missing_records(runs, got):
    """[] failed inside pandas ("None of ['strategy'] are in the columns"), None on "not iterable"."""
    with pytest.raises(ValueError, match=rf"strategy_table needs .*TrainedModel records \(run_strategy's results.*"
                                         rf"got {got}$"):
        strategy_table(runs, strategy_config("smoke"))


def test_joint_vs_single_task_names_a_table_of_the_wrong_kind():
    """{"joint": 1} failed on "'dict' object has no attribute 'index'"."""
    with pytest.raises(ValueError, match=r"table must be the strategy table, a DataFrame indexed by strategy "
                                         r"\(compare_strategies\(\.\.\.\) or strategy_table.*got dict"):
        joint_vs_single_task({"joint": 1})


def scores(psnr, dice):
    return {"recon/psnr": psnr, "recon/ssim": 0.7, "seg/dice": dice, "cls/acc": 0.9, "cls/auc": 0.95}


@pytest.mark.parametrize("joint_wall, joint_dice, passed", [
    (3.0, 0.89, True),     # 20 % of the time, 1 point below: passes
    (3.0, 0.87, False),    # 3 points below
    (6.0, 0.91, False),    # 40 % of the time
])
def test_joint_vs_single_task_applies_both_conditions(joint_wall, joint_dice, passed):
    runs = [record("pretrain", ("recon",), images=100, wall=5.0),
            record("joint", TASKS, images=100, wall=joint_wall, **scores(24.0, joint_dice)),
            *(record("scratch", (t,), images=200, wall=5.0, **scores(24.2, 0.90)) for t in TASKS)]
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()))
    assert check["flops_share_train"] == pytest.approx(100 / 600)
    assert check["time_share_train"] == pytest.approx(joint_wall / 15.0)
    assert check["cpu_share_train"] == pytest.approx(joint_wall / 15.0)  # CPU time is 2 x wall in every record
    assert check["flops_share_total"] == pytest.approx(200 / 600)
    assert check["ok_recon/psnr"] and check["passed"] is passed
    assert check["passed_with_pretraining"] is (passed and (joint_wall + 5.0) / 15.0 <= 0.35)


@pytest.mark.parametrize("joint_flops, joint_wall, joint_dice, passed", [
    (250.0, 3.0, 0.90, False),  # 42 % of the FLOPs, 20 % of the time: both shares must hold
    (100.0, 6.0, 0.90, False),  # 17 % of the FLOPs, 40 % of the time
    (100.0, 3.0, 0.99, True),   # 9 points *above* the baseline: a gain never fails the tolerance
])
def test_joint_vs_single_task_needs_both_shares_and_only_limits_drops(joint_flops, joint_wall, joint_dice, passed):
    runs = [record("pretrain", ("recon",), images=100, wall=5.0),
            record("joint", TASKS, flops_per_image=joint_flops * 1e4, images=100, wall=joint_wall,
                   **scores(24.0, joint_dice)),
            *(record("scratch", (t,), images=200, wall=5.0, **scores(24.2, 0.90)) for t in TASKS)]
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()))
    assert check["flops_share_train"] == pytest.approx(joint_flops / 600)
    assert check["passed"] is passed
    with pytest.raises(ValueError, match="a fraction"):
        joint_vs_single_task(strategy_table(runs, UMSRepConfig()), max_compute_share=35)


def test_joint_vs_single_task_charges_a_pretrained_baseline_its_pretraining_too():
    """The shares divided by the baseline's fine-tuning only: against `full` (which reuses the representation
    as well) the amortised and total shares counted the pre-training on one side of the ratio."""
    runs = [record("pretrain", ("recon",), images=200, wall=4.0),
            record("joint", TASKS, images=100, wall=3.0, **scores(24.0, 0.90)),
            *(record("full", (t,), images=100, wall=3.0, **scores(24.2, 0.90)) for t in TASKS)]
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()), baseline="full", max_compute_share=0.6)
    assert check["flops_share_train"] == pytest.approx(100 / 300)
    assert check["flops_share_amortised"] == pytest.approx((100 + 100) / (300 + 100))  # 2 strategies reuse it
    assert check["flops_share_total"] == pytest.approx((100 + 200) / (300 + 200))
    assert check["time_share_total"] == pytest.approx((3.0 + 4.0) / (9.0 + 4.0))
    assert check["passed_with_pretraining"]
    with pytest.raises(ValueError, match=re.escape("the table has no 'scratch' row (rows: ['pretrain', 'joint', "
                                                   "'full']); run both strategies")):
        joint_vs_single_task(strategy_table(runs, UMSRepConfig()))  # the default baseline is scratch
    with pytest.raises(ValueError, match=re.escape("the table has no 'joint' row")):
        joint_vs_single_task(strategy_table(runs[2:], UMSRepConfig()), baseline="full")


def test_joint_vs_single_task_needs_the_cpu_time_share_too():
    """Wall time can pass by luck on a shared machine (the joint run waited less for a core): the
    CPU-time share must hold as well."""
    runs = [record("pretrain", ("recon",), images=100, wall=5.0),
            record("joint", TASKS, images=100, wall=3.0, cpu=14.0, **scores(24.0, 0.90)),  # CPU share 14 / 30
            *(record("scratch", (t,), images=200, wall=5.0, **scores(24.2, 0.90)) for t in TASKS)]
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()))
    assert check["time_share_train"] == pytest.approx(0.2) and check["cpu_share_train"] == pytest.approx(14 / 30)
    assert check["metrics_ok"] and not check["passed"]


def test_joint_vs_single_task_leaves_unmeasured_shares_out_of_the_verdict():
    """A resumed run's CPU time is NaN (unknown): NaN <= 0.35 is False, which failed every verdict of a
    resumed comparison with no reason given. An unknown share is reported and left out; the measured
    shares and the metrics still decide."""
    nan = float("nan")
    scratch = [record("scratch", (t,), images=200, wall=5.0, **scores(24.2, 0.90)) for t in TASKS]
    runs = [record("pretrain", ("recon",), images=100, wall=4.0),
            *(record("frozen", (t,), images=100, wall=1.0) for t in TASKS),
            record("joint", TASKS, images=100, wall=3.0, cpu=nan, **scores(24.0, 0.90)), *scratch]
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()))
    assert check["unmeasured"] == ["cpu_share_train", "cpu_share_amortised", "cpu_share_total"]
    assert all(math.isnan(check[key]) for key in check["unmeasured"])
    # the verdicts of test_joint_vs_single_task_shares_by_hand_and_passed_amortised, whose CPU shares were measured
    assert check["passed"] and check["passed_amortised"] and not check["passed_with_pretraining"]
    # only the pre-training resumed: the fine-tuning share is known and still decides `passed`
    runs[0] = record("pretrain", ("recon",), images=100, wall=4.0, cpu=nan)
    runs[4] = record("joint", TASKS, images=100, wall=3.0, cpu=14.0, **scores(24.0, 0.90))  # CPU share 14 / 30
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()))
    assert check["unmeasured"] == ["cpu_share_amortised", "cpu_share_total"]
    assert check["metrics_ok"] and not check["passed"]  # a measured share above the limit still fails
    assert check["passed_amortised"]  # 1.5 / 6 of the FLOPs, 5 / 15 of the time; its CPU share is unknown
    # unknown shares never make the metrics pass
    runs[4] = record("joint", TASKS, images=100, wall=3.0, cpu=nan, **scores(24.0, 0.80))
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()))
    assert not check["metrics_ok"] and not check["passed"] and not check["passed_amortised"]
    measured = joint_vs_single_task(strategy_table([record("joint", TASKS, images=100, wall=3.0), *scratch],
                                                   UMSRepConfig()))
    assert measured["unmeasured"] == []


# ---------------------------------------------------------------------------------------------- data


def test_denoising_pairs_carry_no_labels_and_use_the_clean_target():
    data = SyntheticUltrasound(4, image_size=SIZE, seed=0)
    pairs = DenoisingPairs(data, gaussian_std=0.05)
    item = pairs[1]
    assert set(item) == {"image", "clean", "id"}
    assert torch.equal(item["clean"], data[1]["clean"])
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert not torch.equal(item["image"], data[1]["image"])  # Gaussian noise added to the speckled image
    assert torch.equal(DenoisingPairs(data, gaussian_std=0.0)[1]["image"], data[1]["image"])  # the speckle is kept
    assert load_strategy_data(handful(gaussian_std=0.1)).unlabeled.gaussian_std == 0.1  # the config's, not 0.02
    unlabeled = load_strategy_data(handful()).unlabeled  # the representation's pairs: new noise at every read
    assert not torch.equal(unlabeled[0]["image"], unlabeled[0]["image"])


def test_the_added_noise_has_the_standard_deviation_asked_for():
    grey = {"image": torch.full((1, 64, 64), 0.5), "label": 0}  # mid-grey: no clamping; 10**6 looks: no speckle
    item = DenoisingPairs([grey], gaussian_std=0.05, speckle_looks=1e6, fixed_noise=True)[0]
    assert (item["image"] - item["clean"]).std().item() == pytest.approx(0.05, rel=0.05)


def test_real_images_become_their_own_target_with_added_noise():
    real = [{"image": torch.full((1, SIZE, SIZE), 0.5), "mask": torch.zeros(1, SIZE, SIZE), "label": 1, "id": "a"}]
    pairs = DenoisingPairs(real, gaussian_std=0.02, speckle_looks=4.0, labels=True, fixed_noise=True, seed=3)
    item = pairs[0]
    assert torch.equal(item["clean"], real[0]["image"]) and item["label"] == 1 and "mask" in item
    # speckle of 4 looks on a 50 dB display: 10 / ln 10 * sqrt(trigamma(4)) / 50 = 0.0463; Gaussian 0.02 beside it
    assert (item["image"] - item["clean"]).std().item() == pytest.approx(math.hypot(0.0463, 0.02), rel=0.1)
    assert torch.equal(pairs[0]["image"], item["image"])  # fixed noise: the same each time


def test_a_grey_image_in_three_channels_gets_the_same_noise_in_each():
    """A grey image repeated for a 3-channel model got other speckle and noise in every channel: a network could
    average them away (std 0.051 -> 0.029), so denoising was easier with 3 channels than with 1."""
    real = [{"image": torch.full((3, SIZE, SIZE), 0.5)}]
    item = DenoisingPairs(real, gaussian_std=0.05, speckle_looks=4.0, fixed_noise=True)[0]
    assert item["image"].shape == (3, SIZE, SIZE) and (item["image"] - item["clean"]).std() > 0.03
    assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][0], item["image"][2])
    one = DenoisingPairs([{"image": real[0]["image"][:1]}], gaussian_std=0.05, speckle_looks=4.0, fixed_noise=True)[0]
    assert torch.equal(one["image"][0], item["image"][0])  # and the one channel's noise is the grey image's
    synthetic = [{"image": torch.full((3, SIZE, SIZE), 0.5), "clean": torch.full((3, SIZE, SIZE), 0.5)}]
    noisy = DenoisingPairs(synthetic, gaussian_std=0.05, fixed_noise=True)[0]["image"]  # speckle already in it
    assert torch.equal(noisy[0], noisy[1]) and torch.equal(noisy[0], noisy[2]) and noisy.std() > 0.03


@pytest.mark.parametrize("grey", [0.2, 0.5, 0.8])
def test_speckle_on_a_real_image_is_added_as_its_log_compressed_display_shows_it(grey):
    """The displayed image is log-compressed, so speckle (multiplicative in intensity) is added to it, alike at
    every grey level and zero-mean; multiplying the displayed value gave std 0.05 at 0.2 and 0.25 at 0.8 (a
    quarter of the bright pixels clipped at 1), and the target's mean moved."""
    from scipy.special import polygamma

    real = [{"image": torch.full((1, 128, 128), grey)}]
    noise = DenoisingPairs(real, gaussian_std=0.0, speckle_looks=4.0, fixed_noise=True)[0]["image"] - grey
    expected = 10 / math.log(10) * math.sqrt(polygamma(1, 4.0)) / 50  # 0.0463
    assert noise.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(noise.mean().item()) < 0.002
    sector = torch.full((1, 64, 64), grey)
    sector[:, :, :16] = 0.0  # black outside the scan sector: below the display's floor, no echo to speckle
    noisy = DenoisingPairs([{"image": sector}], gaussian_std=0.0, fixed_noise=True)[0]["image"]
    assert (noisy[:, :, :16] == 0).all() and (noisy[:, :, 16:] != grey).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(gaussian_std=-0.1), "gaussian_std must be a finite number >= 0"),
    (dict(gaussian_std=math.inf), "gaussian_std must be a finite number"),
    (dict(speckle_looks=0), "speckle_looks must be a finite number > 0"),
    (dict(speckle_looks=math.inf), "speckle_looks must be a finite number"),  # Gamma(inf, 0) drew NaN images
    # a TypeError from the comparison, and NumPy's message at the first item read
    (dict(gaussian_std="0.1"), r"gaussian_std must be a finite number >= 0 \(intensity units.*got '0.1'"),
    (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
])
def test_denoising_pairs_reject_bad_noise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenoisingPairs([], **kwargs)


def test_denoising_pairs_name_items_that_are_not_dicts_with_an_image():
    """DenoisingPairs([1, 2, 3])[0] failed on "argument of type 'int' is not iterable"."""
    with pytest.raises(ValueError, match=r"items are dicts with an 'image' \(C, H, W\) tensor.*item 0 is of type int"):
        DenoisingPairs([1, 2, 3])[0]
    with pytest.raises(ValueError, match=r"item 1 has keys \['label'\]"):
        DenoisingPairs([{"image": torch.zeros(1, 4, 4)}, {"label": 0}])[1]


def test_denoising_pairs_in_memory_and_a_comparison_show_what_they_hold():
    """DenoisingPairs and InMemory printed as <... object at 0x...> (in notebook 03's StrategyData too), and a
    Comparison printed the whole pretrained network."""
    pairs = DenoisingPairs(SyntheticUltrasound(num_samples=4, image_size=32), gaussian_std=0.05)
    assert repr(pairs) == ("DenoisingPairs(4 pairs from SyntheticUltrasound, gaussian_std=0.05, speckle_looks=4.0, "
                           "labels=False, fixed_noise=False, seed=0)")
    assert repr(InMemory(pairs)) == "InMemory(4 items, keys=['image', 'clean'])"
    from mtlearn.umsrep import Comparison

    comparison = Comparison(table=None, runs=[], representation=build_model("tiny", image_size=32),
                            config=strategy_config("smoke"))
    assert "representation" not in repr(comparison) and "Conv2d" not in repr(comparison)


def test_denoising_pairs_and_in_memory_check_their_switches_keys_and_indices():
    items = [{"image": torch.zeros(1, 4, 4), "label": 0}, {"image": torch.ones(1, 4, 4), "label": 1}]
    with pytest.raises(ValueError, match=r"labels must be True or False, got 'no'"):
        DenoisingPairs(items, labels="no")  # kept the labels
    with pytest.raises(ValueError, match=r"fixed_noise must be True or False, got 1"):
        DenoisingPairs(items, fixed_noise=1)
    for dataset in (DenoisingPairs(items, fixed_noise=True), InMemory(items)):
        assert dataset[1]["label" if isinstance(dataset, InMemory) else "image"] is not None
        with pytest.raises(IndexError, match=r"index -1 out of range for a dataset of 2 items"):
            dataset[-1]  # DenoisingPairs: NumPy's "expected non-negative integer"; InMemory: the last item
    with pytest.raises(ValueError, match=r"keys is empty; name the items' keys to keep"):
        InMemory(items, keys=[])  # kept empty items, {}


def test_in_memory_refuses_a_key_the_items_lack_and_by_default_keeps_those_they_have():
    """keys=("image", "bogus") dropped "bogus" without a word."""
    items = [{"image": torch.zeros(1, 4, 4), "label": 0, "id": "a"}]
    with pytest.raises(ValueError, match=r"have no \['bogus'\] \(they have \['image', 'label', 'id'\]\); keep only"):
        InMemory(items, keys=("image", "bogus"))
    with pytest.raises(ValueError, match=r"InMemory needs a dataset whose items are dicts.*item 0 is of type int"):
        InMemory([1, 2])
    assert set(InMemory(items)[0]) == {"image", "label"} and set(InMemory(items, "image")[0]) == {"image"}
    assert len(InMemory([])) == 0


def test_a_few_denoising_steps_lower_the_reconstruction_error():
    pairs = DenoisingPairs(SyntheticUltrasound(8, image_size=SIZE, seed=0), gaussian_std=0.02, fixed_noise=True)
    data = {k: torch.stack([pairs[i][k] for i in range(len(pairs))]) for k in ("image", "clean")}
    model = tiny(("recon",))
    optimizer = build_optimizer(model, lr=3e-3)

    def error():
        model.eval()
        with torch.no_grad():
            return (model(data["image"])["recon"] - data["clean"]).abs().mean().item()

    before = error()
    model.train()
    for _ in range(15):
        loss = (model(data["image"])["recon"] - data["clean"]).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert error() < 0.7 * before


# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategies=("frozen", "best")), "unknown strategies"),
    (dict(image_size=40), "image_size"),
    (dict(joint_epochs=0), "joint_epochs"),
    (dict(partial_stages=5), "partial_stages"),
    (dict(num_train=1), "num_train"),
    (dict(partial_stages=1.5), "partial_stages must be an integer"),
    (dict(joint_stages=True), "joint_stages must be an integer"),
    (dict(max_compute_share=35), r"max_compute_share must be a number in \(0, 1\] \(a fraction: 0.35 for 35 %\)"),
    (dict(max_compute_share="0.35"), "pass it unquoted"),  # a bare TypeError from '<'
    (dict(tolerance={"seg/dice": float("nan")}), "allowed drops >= 0"),  # every check failed, no reason given
    (dict(strategies=()), r"strategies is empty: name at least one; choose from \('frozen'"),  # "unknown []"
    # these failed only after the data was loaded (with BUSI: after every image was read and resized)
    (dict(lr=-1), "lr must be a finite number > 0"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0"),
    (dict(lr=1.0, weight_decay=2.0), r"would shrink every weight by lr x weight_decay = 2"),  # fit's rule, at once
    (dict(speckle_looks=-1), "speckle_looks must be a finite number > 0"),
    (dict(gaussian_std=-0.1), "gaussian_std must be a finite number >= 0"),
    (dict(seed=-3), "seed must be"),
    (dict(preset="huge"), r"preset must be one of \('paper', 'course', 'tiny'\), got 'huge'"),
    (dict(dataset="isic"), r"dataset must be one of \('synthetic', 'busi'\), got 'isic'"),
    (dict(amp="fp8"), r"amp must be one of \('auto', 'bf16', 'fp16', 'off'\) \(or True/False\), got 'fp8'"),
    (dict(amp=1), r"amp must be one of .* \(or True/False\), got 1"),
    (dict(device="gpu0"), r"device must be 'auto' or a torch device such as 'cpu' or 'cuda', got 'gpu0'"),
    (dict(progress="no"), r"progress must be True or False, got 'no'; pass it unquoted"),
    (dict(tolerance={"seg/dice": -0.1}), "allowed drops >= 0"),
    (dict(tolerance={"seg/dice": 10**400}), "allowed drops >= 0"),  # was math.isfinite's OverflowError
    (dict(tolerance={"dice": 0.02}), "tolerance maps metrics"),
    (dict(strategies=("joint", "joint")), "must not repeat"),
    (dict(image_size="64"), "image_size must be an integer"),
    (dict(image_size=16), r"image_size must be an integer multiple of 16, at least 32, got 16"),  # 1x1 last stage
    (dict(joint_task_weights={"sgm": 1.0}), r"joint_task_weights \(or None\) must give one number per task"),
    (dict(joint_task_weights={"recon": 1.0, "seg": 1.0, "cls": -0.25}), "joint_task_weights"),
    (dict(joint_task_weights={"recon": 1.0, "seg": 1.0, "cls": float("nan")}), "joint_task_weights"),
    (dict(joint_task_weights={"recon": 1.0, "seg": "1", "cls": 0.25}), "joint_task_weights"),
    (dict(unlabeled_datasets=()), r"unlabeled_datasets must name one or more datasets"),  # failed inside torch
    (dict(unlabeled_datasets=("busi", "busi")), r"each once, got \('busi', 'busi'\)"),  # doubled the images
    # BUSI's test images would reach the representation
    (dict(dataset="busi", unlabeled_datasets=("bus_bra", "breastmnist")), r"\['breastmnist'\] are made from BUSI's"),
    (dict(dataset="busi", unlabeled_datasets=("busi_npz",)), r"\['busi_npz'\] are made from BUSI's"),
    # TypeError: 'NoneType' object is not iterable
    (dict(strategies=None), r"strategies must be a name or a tuple of names, e.g. \('frozen', 'joint'\); got None"),
    (dict(unlabeled_datasets=None), "unlabeled_datasets must be a name or a tuple of names"),
    (dict(strategies=("frozen", 3)), "strategies must be a name or a tuple of names"),
    (dict(tolerance=None), r"tolerance must map metrics to allowed drops, e.g. \{'seg/dice': 0.02\}; got None"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UMSRepConfig(**kwargs)


def test_config_takes_amp_as_fit_does():
    # fit(amp=False) and evaluate(amp=False) work; UMSRepConfig(amp=False) was refused
    assert UMSRepConfig(amp=False).amp is False and UMSRepConfig(amp=True).amp is True
    assert UMSRepConfig(amp=np.True_).amp is True  # resolve_amp asks `amp is True`


def test_a_paper_comparison_on_a_cpu_warns_before_the_data_load(monkeypatch):
    """The docstring's compare_strategies("paper", ...) went straight into weeks of training on a CPU."""
    import warnings

    from mtlearn import umsrep

    class Loaded(Exception):
        pass

    def stop(config):
        raise Loaded

    monkeypatch.setattr(umsrep, "load_strategy_data", stop)
    with pytest.warns(UserWarning, match=r"the paper preset at 224 px is sized for a GPU: on a CPU a comparison .* "
                                         r"takes weeks. .*strategy_config\('course'\)"), pytest.raises(Loaded):
        umsrep.run_comparison(strategy_config("paper", device="cpu"))
    with warnings.catch_warnings(), pytest.raises(Loaded):
        warnings.simplefilter("error")
        umsrep.run_comparison(strategy_config("course", device="cpu"))  # the profile meant for a CPU
    monkeypatch.setattr(umsrep, "pick_device", lambda device: torch.device("cuda"))
    with warnings.catch_warnings(), pytest.raises(Loaded):
        warnings.simplefilter("error")
        umsrep.run_comparison(strategy_config("paper", device="cpu"))  # on a GPU: what it is sized for


def test_run_comparison_and_the_check_name_a_config_or_tolerance_of_the_wrong_kind():
    """run_comparison(123) failed on 'int' object has no attribute 'image_size'; tolerance=5 in dict()."""
    with pytest.raises(ValueError, match=r"config must be a profile name \('smoke', .* or a UMSRepConfig"):
        run_comparison(123)
    with pytest.raises(ValueError, match="tolerance must map metrics to allowed drops"):
        joint_vs_single_task([], tolerance=5)


def test_strategy_config_names_profiles_and_options():
    assert strategy_config("smoke").image_size == 32 and strategy_config("course", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown profile"):
        strategy_config("huge")
    with pytest.raises(ValueError, match="unknown option"):
        strategy_config("smoke", epochs=3)


def test_config_takes_joint_task_weights_for_every_task():
    weights = {"recon": 0.5, "seg": 1, "cls": 0.25}
    assert UMSRepConfig(joint_task_weights=weights).joint_task_weights == weights


def test_an_empty_training_set_is_named_before_training():
    config = strategy_config("smoke", device="cpu", progress=False)
    model = _new_model(config, ("seg",), num_classes=3, in_channels=1)
    with pytest.raises(ValueError, match="'scratch': the training set is empty"):
        train_and_measure(model, "scratch", [], None, config, epochs=1)


def test_a_second_run_into_an_out_dir_in_use_is_refused_before_its_options_are_written(tmp_path,
                                                                                        held_by_another_run):
    pid = held_by_another_run(tmp_path)
    config = strategy_config("smoke", device="cpu", progress=False)
    model = _new_model(config, ("seg",), num_classes=3, in_channels=1)
    with pytest.raises(ValueError, match=re.escape(f"another run is writing to out_dir {tmp_path} (process {pid} ")):
        train_and_measure(model, "scratch", load_strategy_data(config).train, None, config, epochs=1, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_strategies_and_the_representation_name_data_of_the_wrong_kind():
    """run_strategy("scratch", config, None) failed on "'NoneType' object has no attribute 'class_names'"."""
    match = r"data must be the comparison's StrategyData \(load_strategy_data\(config\)\), got NoneType"
    with pytest.raises(ValueError, match=match):
        run_strategy("scratch", strategy_config("smoke"), None)
    with pytest.raises(ValueError, match=match):
        pretrain_representation(strategy_config("smoke"), None)


def test_a_pretrained_strategy_needs_the_representation():
    with pytest.raises(ValueError, match=r"pass the pretrained denoiser \(pretrain_representation\(config, data\)"):
        run_strategy("joint", strategy_config("smoke"), data=None)


def test_comparison_end_to_end_on_a_handful_of_images():
    config = strategy_config("smoke", num_unlabeled=4, num_train=4, num_test=4, batch_size=4,
                             strategies=("frozen", "joint", "scratch"), progress=False, device="cpu")
    result = run_comparison(config)
    table = result.table
    assert list(table.index) == ["pretrain", "frozen", "joint", "scratch"]
    assert list(table["models"]) == [1, 3, 1, 3]
    assert table.loc["frozen", "trainable_params"] < table.loc["scratch", "trainable_params"]
    assert table.loc["frozen", "train_gflops"] < table.loc["scratch", "train_gflops"]
    assert table.loc["joint", "images_seen"] == 4 and table.loc["scratch", "images_seen"] == 12
    for metric in ("recon/psnr", "seg/dice", "cls/acc"):
        assert not table.loc[["joint", "scratch", "frozen"], metric].isna().any()
    assert table.loc["scratch", "pretrain_gflops"] == 0 < table.loc["joint", "pretrain_gflops"]
    assert all(r.history for r in result.runs)


@pytest.mark.filterwarnings(QUIRK_REPORTS)  # the BUSI fixture's missing mask, on purpose
def test_real_data_uses_every_unlabeled_image_and_random_busi_subsets(tmp_path, monkeypatch):
    """dataset="busi": the representation reads BUS-BRA + BUS-UCLM (all of it), the tasks use BUSI."""
    import mtlearn.data
    from tests.fixtures_real import make_bus_bra, make_bus_uclm, make_busi

    make_busi(tmp_path / "busi", per_class=10)
    make_bus_bra(tmp_path / "bus_bra", patients=5)
    uclm = make_bus_uclm(tmp_path / "bus_uclm", patients=4, per_patient=3)  # PAT00_001: image and mask sizes differ
    config = strategy_config("smoke", dataset="busi", data_root=str(tmp_path), num_train=6, num_test=4, seed=1)
    data = load_strategy_data(config)
    torch.manual_seed(1)  # the test images' noise is drawn per item and seed, not from torch's state at loading
    again = load_strategy_data(config)
    assert all(torch.equal(data.test[i]["image"], again.test[i]["image"]) for i in range(len(data.test)))
    bus_bra = load_dataset("bus_bra", root=tmp_path / "bus_bra", split="all", image_size=config.image_size)
    # the masks are not used there, so the image whose mask has another size is kept
    assert len(data.unlabeled) == len(bus_bra) + len(uclm["truth"])
    assert set(data.unlabeled[0]) >= {"image", "clean"}
    assert len(data.train) == 6 and len(data.test) == 4 and data.class_names == ("normal", "benign", "malignant")
    assert {"mask", "label", "clean"} <= set(data.train[0])
    # the names come from BUSI through the random subset, not from a default that happens to match
    load = mtlearn.data.load_dataset

    def renamed(name, **kwargs):
        dataset = load(name, **kwargs)
        if name == "busi":
            dataset.class_names = ("N", "B", "M")
        return dataset

    monkeypatch.setattr(mtlearn.data, "load_dataset", renamed)
    assert load_strategy_data(config).class_names == ("N", "B", "M")
    monkeypatch.undo()
    # the dataset's own folder where the folder holding them goes: was told to fetch BUS-BRA into busi/bus_bra
    from data_fetch import completion_marker

    completion_marker(tmp_path / "busi", "busi").write_text("{}")  # as data_fetch leaves a download
    nested = strategy_config("smoke", dataset="busi", data_root=str(tmp_path / "busi"), num_train=6, num_test=4)
    with pytest.raises(FileNotFoundError, match=r"data_root .*busi is the 'busi' dataset's own folder, not the folder "
                                                r"that holds one folder per dataset .*: pass data_root="):
        load_strategy_data(nested)


@pytest.mark.filterwarnings(QUIRK_REPORTS)
def test_busi_as_unlabeled_data_gives_the_representation_no_test_image(tmp_path):
    """split="all" put every BUSI test image into the denoiser's training data when the tasks use BUSI too."""
    from tests.fixtures_real import make_busi

    make_busi(tmp_path / "busi", per_class=10)
    config = strategy_config("smoke", dataset="busi", data_root=str(tmp_path), unlabeled_datasets="busi",
                             num_train=None, num_test=None)
    data = load_strategy_data(config)
    unlabeled = [data.unlabeled.dataset[i]["image"] for i in range(len(data.unlabeled))]  # the acquired images
    train = load_dataset("busi", root=tmp_path / "busi", split="train", image_size=config.image_size, seed=0)
    assert len(unlabeled) == len(train) > 0
    assert len(data.test) > 0
    for j in range(len(data.test)):
        assert not any(torch.equal(data.test.items[j]["clean"], image) for image in unlabeled), j


def test_one_dataset_or_strategy_name_is_a_one_element_tuple():
    # tuple("busi") was silently ('b', 'u', 's', 'i')
    config = strategy_config("smoke", unlabeled_datasets="busi", strategies="joint")
    assert config.unlabeled_datasets == ("busi",) and config.strategies == ("joint",)


# ---------------------------------------------------------------------------------------------- interruption


def handful(**overrides):
    """The smoke profile on four images, one batch per epoch, quietly on the CPU."""
    return strategy_config("smoke", **{"num_unlabeled": 4, "num_train": 4, "num_test": 4, "batch_size": 4,
                                       "progress": False, "device": "cpu", **overrides})


def test_each_step_of_a_comparison_takes_a_profile_name_and_checks_a_config_edited_after_it_was_built(tmp_path):
    """load_strategy_data("smoke") failed on "'str' object has no attribute 'image_size'"; config.batch_size = 0
    set afterwards reached torch's DataLoader, and a strategy name after pre-training ("unknown strategy 'j'")."""
    assert len(load_strategy_data("smoke").train) == strategy_config("smoke").num_train
    config = handful()
    config.batch_size = 0
    for step in (load_strategy_data, run_comparison):
        with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
            step(config)
    config = handful()
    config.strategies = "joint"  # one name, as the constructor takes it
    assert load_strategy_data(config).train is not None
    with pytest.raises(ValueError, match=r"config must be a profile name .* or a UMSRepConfig"):
        load_strategy_data(None)
    with pytest.raises(ValueError, match=r"unknown profile \['course'\]; expected one of"):
        strategy_config(["course"])  # was "unhashable type: 'list'"
    # torch devices the trainer refuses, checked when a step starts (before the data loads), not when the config is
    # built: pre-training refused 'xpu' only after the data had loaded
    for device, says in [("xpu", r"unknown device 'xpu'"), ("cpu:3", r"device 'cpu:3': there is one CPU device")]:
        with pytest.raises(ValueError, match=says):
            load_strategy_data(handful(device=device))
    data = load_strategy_data(handful())
    with pytest.raises(ValueError, match=r"out_dir must be a folder path \(or None: no checkpoints\), got 5"):
        pretrain_representation(handful(), data, out_dir=5)  # was Path()'s TypeError
    with pytest.raises(ValueError, match=r"out_dir must be a folder path"):
        run_strategy("scratch", handful(), data, out_dir=5)
    pair = (tiny(("recon",)), None)  # pretrain_representation's result, not unpacked
    # was: "tuple has no ResFormer encoder; build it with mtlearn.build_model(...)"
    with pytest.raises(ValueError, match=r"pass the pretrained denoiser "
                                         r"\(pretrain_representation\(config, data\)\[0\], not a tuple\)"):
        run_strategy("frozen", handful(), data, pair)


def count_fits(monkeypatch, root):
    """Record (run folder below `root`, resume) for every engine.fit call from now on."""
    from mtlearn import engine

    fit, calls = engine.fit, []

    def counting_fit(*args, **kwargs):
        folder = kwargs["out_dir"] and Path(kwargs["out_dir"]).relative_to(root).as_posix()
        calls.append((folder, kwargs["resume"]))
        return fit(*args, **kwargs)

    monkeypatch.setattr(engine, "fit", counting_fit)
    return calls


def test_a_comparison_without_a_pretrained_strategy_pre_trains_nothing(tmp_path, monkeypatch):
    """strategies=("scratch",) pre-trained the representation anyway: its compute spent, its row in the table."""
    calls = count_fits(monkeypatch, tmp_path)
    result = run_comparison(handful(strategies="scratch"), out_dir=tmp_path)
    assert result.representation is None and [r.strategy for r in result.runs] == ["scratch"] * 3
    assert list(result.table.index) == ["scratch"] and result.table.loc["scratch", "pretrain_gflops"] == 0
    assert sorted(folder for folder, _ in calls) == ["scratch/cls", "scratch/recon", "scratch/seg"]  # no pretrain/


def without_times(records):
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "data_time", "data_share")} for r in records]


@pytest.mark.slow
def test_an_interrupted_comparison_resumes_to_the_same_result_without_retraining(tmp_path, monkeypatch):
    from mtlearn import engine, umsrep
    from mtlearn.checkpoint import load_checkpoint

    config = handful(strategies=("frozen", "joint"), joint_epochs=2)
    expected = run_comparison(config)  # no out_dir: nothing written, nothing resumed
    calls = count_fits(monkeypatch, tmp_path)
    update, joint_steps = engine._update, []

    def dies_in_the_second_joint_epoch(run, losses):
        if calls[-1][0] == "joint/recon+seg+cls":
            joint_steps.append(1)
            if len(joint_steps) == 2:  # one batch per epoch: the first step of epoch 2
                raise KeyboardInterrupt
        return update(run, losses)

    monkeypatch.setattr(engine, "_update", dies_in_the_second_joint_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(config, out_dir=tmp_path)
    assert [folder for folder, _ in calls] == ["pretrain/recon", "frozen/recon", "frozen/seg", "frozen/cls",
                                               "joint/recon+seg+cls"]
    assert (tmp_path / "frozen" / "cls" / "result.pt").is_file() and not (tmp_path / "joint" / "recon+seg+cls" /
                                                                          "result.pt").exists()
    # the interrupted session's first epoch took long (written into its checkpoint): the resumed run must count it
    last = tmp_path / "joint" / "recon+seg+cls" / "last.pt"
    state = load_checkpoint(last)
    state["history"]["records"][0]["epoch_time"] = 1000.0
    save_checkpoint(state, last)
    # finished runs' result.pt from before the memory fields said their unit (*_mb, which held MiB): one with the
    # old names, one with both (the new ones win)
    result = tmp_path / "frozen" / "cls" / "result.pt"
    state = load_checkpoint(result)
    state["record"]["memory_mb"] = state["record"].pop("memory_mib")
    state["record"]["cuda_peak_mb"] = state["record"].pop("cuda_peak_mib")
    save_checkpoint(state, result)
    result = tmp_path / "frozen" / "seg" / "result.pt"
    state = load_checkpoint(result)
    state["record"].update(memory_mb=-1.0, cuda_peak_mb=-1.0)
    save_checkpoint(state, result)
    monkeypatch.setattr(engine, "_update", update)
    ticks = itertools.count(0.0, 5.0)  # this session's clock: its training takes 5 s (start 0, end 5)
    monkeypatch.setattr(umsrep, "time", SimpleNamespace(perf_counter=lambda: next(ticks),
                                                        process_time=time.process_time))
    calls.clear()
    resumed = run_comparison(config, out_dir=tmp_path, resume=True)
    assert calls == [("joint/recon+seg+cls", True)]  # finished networks were loaded, not retrained

    assert [(r.strategy, r.tasks) for r in resumed.runs] == [(r.strategy, r.tasks) for r in expected.runs]
    for run, reference in zip(resumed.runs, expected.runs):
        assert run.metrics == reference.metrics, run.strategy
        assert without_times(run.history) == without_times(reference.history), run.strategy
        for key, value in reference.model.state_dict().items():
            assert torch.equal(value, run.model.state_dict()[key]), (run.strategy, key)
        assert (run.flops_per_image, run.trainable_parameters, run.memory_mib) == \
               (reference.flops_per_image, reference.trainable_parameters, reference.memory_mib)
    with pytest.warns(FutureWarning, match="memory_mb is now memory_mib"):  # the old attribute names still read
        assert resumed.runs[0].memory_mb == resumed.runs[0].memory_mib
    with pytest.warns(FutureWarning, match="cuda_peak_mb is now cuda_peak_mib"):
        assert math.isnan(resumed.runs[0].cuda_peak_mb)
    joint = resumed.runs[-1]
    assert joint.resumed_epochs == 1 and [r.resumed_epochs for r in resumed.runs[:-1]] == [0] * 4
    assert joint.wall_time_s == 1000.0 + 5.0  # epoch 1 from the checkpoint, plus this session's work
    assert math.isnan(joint.cpu_time_s)  # not recorded per epoch: unknown rather than too small
    assert all(r.cpu_time_s > 0 for r in resumed.runs[:-1])  # finished runs keep the times they measured
    columns = [*METRICS, "trainable_params", "train_gflops", "images_seen", "memory_mib"]
    assert resumed.table[columns].equals(expected.table[columns])
    assert list(resumed.table["resumed_epochs"]) == [0, 0, 1]


def test_a_comparison_in_a_folder_from_the_home_folder_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = handful(strategies=("joint",))
    run_comparison(config, out_dir="~/u")  # was a folder named "~" in the working folder
    assert (tmp_path / "u" / "joint").is_dir()
    calls = count_fits(monkeypatch, tmp_path)
    run_comparison(config, out_dir="~/u", resume=True)
    assert calls == []  # every run found finished under the home folder: nothing retrained


def test_a_finished_comparison_reloads_and_refuses_other_options(tmp_path, monkeypatch):
    config = handful(strategies=("joint",))
    first = run_comparison(config, out_dir=tmp_path)
    calls = count_fits(monkeypatch, tmp_path)
    # the acceptance thresholds and the progress bars may change: nothing is retrained
    again = run_comparison(replace(config, tolerance={"seg/dice": 0.1}, max_compute_share=0.5, progress=True),
                           out_dir=tmp_path, resume=True)
    assert calls == [] and again.table[list(METRICS)].equals(first.table[list(METRICS)])
    assert not any(run.model.training for run in again.runs)  # reloaded models come back in eval mode too
    assert first.runs[0].metrics and not [k for r in first.runs for k in r.metrics if k.endswith("loss")]  # no losses
    with pytest.raises(ValueError, match=re.escape(
            f"cannot resume from {tmp_path / 'pretrain' / 'recon' / 'options.json'} with other options (seed: 0 then, "
            "1 now). Resume with the options of that run, or start a new run in another out_dir")):
        run_comparison(replace(config, seed=1), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=re.escape("with other options (lr: 0.001 then, 0.002 now)")):
        run_comparison(replace(config, lr=2e-3), out_dir=tmp_path, resume=True)  # finished runs of another lr
    # options of the runs it does not load: each run is compared on its own (scratch_epochs refused pretrain/recon)
    reloaded = run_comparison(replace(config, scratch_epochs=5, finetune_epochs=3, partial_stages=1),
                              out_dir=tmp_path, resume=True)
    assert calls == [] and reloaded.table[list(METRICS)].equals(first.table[list(METRICS)])
    with pytest.raises(ValueError, match=re.escape("joint/recon+seg+cls/options.json with other options (epochs: 1 "
                                                   "then, 2 now)")):
        run_comparison(replace(config, joint_epochs=2), out_dir=tmp_path, resume=True)  # its own: refused
    with pytest.raises(ValueError, match=re.escape("with other options (joint_stages: 4 then, 2 now)")):
        run_comparison(replace(config, joint_stages=2), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=re.escape(f"out_dir {tmp_path / 'pretrain' / 'recon'} already holds a run "
                                                   "(last.pt, epoch 1 of 1): for a new run choose another out_dir or "
                                                   "delete this one; to continue that run pass resume=True")):
        run_comparison(config, out_dir=tmp_path)
    assert calls == []


def test_resume_needs_an_out_dir():
    with pytest.raises(ValueError, match=re.escape("resume=True needs out_dir (the folder holding the comparison's "
                                                   "runs)")):
        run_comparison(handful(), resume=True)
    config = handful()
    model = _new_model(config, ("seg",), num_classes=3, in_channels=1)
    with pytest.raises(ValueError, match=re.escape("resume=True needs out_dir (the folder holding the run's last.pt "
                                                   "and result.pt)")):
        train_and_measure(model, "scratch", load_strategy_data(config).train, None, config, epochs=1, resume=True)
    # before the data are loaded: resume="no" is true (it resumed), out_dir=5 failed in Path() unnamed
    with pytest.raises(ValueError, match="resume must be True or False, got 'no'; pass it unquoted"):
        run_comparison(handful(), out_dir="runs", resume="no")
    with pytest.raises(ValueError, match=re.escape("out_dir must be a folder path (or None: no checkpoints), got 5")):
        run_comparison(handful(), out_dir=5)


# ---------------------------------------------------------------------------------------------- mutation audit
# Tests that pin down what surviving mutants of umsrep.py changed unnoticed.


def test_build_optimizer_is_adamw_with_the_given_hyperparameters():
    groups = build_optimizer(tiny()).param_groups
    assert [(g["lr"], tuple(g["betas"]), g["weight_decay"]) for g in groups] == [(1e-3, (0.9, 0.999), 3e-5)]
    optimizer = build_optimizer(tiny(), lr=2e-3, weight_decay=0.1, betas=(0.8, 0.95))
    assert type(optimizer) is torch.optim.AdamW
    groups = optimizer.param_groups
    assert [(g["lr"], tuple(g["betas"]), g["weight_decay"]) for g in groups] == [(2e-3, (0.8, 0.95), 0.1)]


def test_table_amortises_flops_and_cpu_time_and_reports_the_largest_memory():
    runs = [record("pretrain", ("recon",), images=200, wall=4.0),  # 0.2 GFLOP, 8 s CPU
            *(replace(record("full", (t,), wall=2.0), memory_mib=m)
              for t, m in zip(("seg", "cls", "recon"), (3, 7, 5))),
            record("joint", TASKS, wall=3.0)]
    table = strategy_table(runs, UMSRepConfig())  # two strategies reuse the representation: half each
    assert table.loc["joint", "amortised_gflops"] == pytest.approx(0.1 + 0.2 / 2)
    assert table.loc["full", "amortised_gflops"] == pytest.approx(0.3 + 0.2 / 2)
    assert table.loc["joint", "cpu_time_s"] == 6.0 and table.loc["joint", "total_cpu_time_s"] == pytest.approx(6 + 8)
    assert table.loc["joint", "amortised_cpu_time_s"] == pytest.approx(6.0 + 8.0 / 2)
    assert table.loc["full", "memory_mib"] == 7  # the models train one after another: the largest, not the sum


def test_joint_vs_single_task_shares_by_hand_and_passed_amortised():
    """Pre-training 0.1 GFLOP / 4 s / 8 s CPU, shared by two strategies (frozen and joint); joint 0.1 GFLOP / 3 s;
    scratch 0.6 GFLOP / 15 s. Fine-tuning and amortised shares pass 35 %, the total's time share does not."""
    runs = [record("pretrain", ("recon",), images=100, wall=4.0),
            *(record("frozen", (t,), images=100, wall=1.0) for t in TASKS),
            record("joint", TASKS, images=100, wall=3.0, **scores(24.0, 0.90)),
            *(record("scratch", (t,), images=200, wall=5.0, **scores(24.2, 0.90)) for t in TASKS)]
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()))
    expected = {"flops_share_train": 1 / 6, "time_share_train": 3 / 15, "cpu_share_train": 6 / 30,
                "flops_share_amortised": 1.5 / 6, "time_share_amortised": 5 / 15, "cpu_share_amortised": 10 / 30,
                "flops_share_total": 2 / 6, "time_share_total": 7 / 15, "cpu_share_total": 14 / 30}
    for key, value in expected.items():
        assert check[key] == pytest.approx(value), key
    assert check["passed"] and check["passed_amortised"] and not check["passed_with_pretraining"]


def test_joint_vs_single_task_limits_are_inclusive():
    """Exactly max_compute_share of the compute and exactly the tolerated drop both pass (values exact in binary)."""
    runs = [record("joint", TASKS, flops_per_image=3e6, images=100, wall=7.5, **{"seg/dice": 0.5}),
            *(record("scratch", (t,), images=200, wall=5.0, **{"seg/dice": 0.75}) for t in TASKS)]
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()), max_compute_share=0.5,
                                 tolerance={"seg/dice": 0.25})
    assert (check["flops_share_train"], check["time_share_train"], check["cpu_share_train"]) == (0.5, 0.5, 0.5)
    assert check["delta_seg/dice"] == -0.25 and check["ok_seg/dice"] and check["passed"]
    worse = joint_vs_single_task(strategy_table(runs, UMSRepConfig()), max_compute_share=0.5,
                                 tolerance={"seg/dice": 0.24})
    assert not worse["ok_seg/dice"] and not worse["passed"]
    # not exact in binary: 0.78 - 0.80 is -0.020000000000000018, which failed a tolerance of 0.02
    runs = [record("joint", TASKS, flops_per_image=3e6, images=100, wall=7.5, **{"seg/dice": 0.78}),
            *(record("scratch", (t,), images=200, wall=5.0, **{"seg/dice": 0.80}) for t in TASKS)]
    check = joint_vs_single_task(strategy_table(runs, UMSRepConfig()), max_compute_share=0.5,
                                 tolerance={"seg/dice": 0.02})
    assert check["ok_seg/dice"] and check["passed"]


def test_each_strategy_trains_what_it_promises(monkeypatch):
    """Without training (train_and_measure recorded): the networks, epochs, loss weights, trainable
    encoder stages and starting weights of every strategy."""
    import mtlearn.umsrep as umsrep
    from mtlearn.umsrep import StrategyData

    weights = {"recon": 0.5, "seg": 1.0, "cls": 0.25}
    config = strategy_config("smoke", finetune_epochs=2, joint_epochs=3, scratch_epochs=4, partial_stages=1,
                             joint_stages=3, joint_task_weights=weights, device="cpu", progress=False)
    data = StrategyData(unlabeled=None, train=None, test=None, class_names=("normal", "benign", "malignant"))
    representation = _new_model(config, ("recon",), 3, 1)
    with torch.no_grad():  # unlike any fresh model (which _new_model seeds identically)
        for p in representation.parameters():
            p.add_(1.0)
    calls = []

    def recording(model, strategy, train, test, config, epochs, task_weights=None, out_dir=None, resume=False):
        encoder_copied = all(torch.equal(v, model.encoder.state_dict()[k])
                             for k, v in representation.encoder.state_dict().items())
        seg_decoder_copied = "seg" in model.decoders and all(
            torch.equal(v, model.decoders["seg"].state_dict()[k])
            for k, v in representation.decoders["recon"].state_dict().items())
        calls.append((tuple(model.tasks), epochs, task_weights, count_parameters(model, trainable_only=True),
                      encoder_copied, seg_decoder_copied))

    monkeypatch.setattr(umsrep, "train_and_measure", recording)

    def trainable(tasks, stages):  # all parameters but those of the first NUM_STAGES + 1 - stages encoder groups
        model = tiny(tasks)
        frozen = encoder_parts(model)[:NUM_STAGES + 1 - stages] if stages < NUM_STAGES else []
        return count_parameters(model) - sum(p.numel() for group in frozen for part in group for p in part.parameters())

    single = [("recon",), ("seg",), ("cls",)]
    expected = {
        "frozen": [(t, 2, None, trainable(t, 0), True, t == ("seg",)) for t in single],
        "partial": [(t, 2, None, trainable(t, 1), True, t == ("seg",)) for t in single],
        "full": [(t, 2, None, trainable(t, NUM_STAGES), True, t == ("seg",)) for t in single],
        "joint": [(("recon", "seg", "cls"), 3, weights, trainable(("recon", "seg", "cls"), 3), True, True)],
        "scratch": [(t, 4, None, count_parameters(tiny(t)), False, False) for t in single],
        "joint_scratch": [(("recon", "seg", "cls"), 4, weights, count_parameters(tiny(("recon", "seg", "cls"))),
                           False, False)],
    }
    for strategy, calls_expected in expected.items():
        calls.clear()
        run_strategy(strategy, config, data, representation)
        assert calls == calls_expected, strategy


def test_train_and_measure_trains_with_the_configured_optimiser(tmp_path):
    config = handful(lr=2e-3, weight_decay=0.05, num_train=6)  # batches of 4 and 2
    model = _new_model(config, ("seg",), num_classes=3, in_channels=1)
    result = train_and_measure(model, "scratch", load_strategy_data(config).train, None, config, epochs=2,
                               out_dir=tmp_path)
    saved = load_checkpoint_file(tmp_path / "last.pt")["config"]
    assert (saved["lr"], saved["weight_decay"], saved["epochs"], saved["tasks"]) == (2e-3, 0.05, 2, ["seg"])
    assert result.images_seen == 2 * 6 and len(result.history) == 2
    assert result.history[0]["lr"] == pytest.approx(2e-3)


def test_fixed_noise_is_drawn_per_item_and_seed():
    """A fixed test set: each item keeps its noise, but items (and seeds) get different noise, not one pattern."""
    grey = {"image": torch.full((1, SIZE, SIZE), 0.5), "mask": torch.zeros(1, SIZE, SIZE), "label": 0}
    pairs = DenoisingPairs([grey, grey], labels=True, fixed_noise=True, seed=3)
    assert torch.equal(pairs[0]["image"], pairs[0]["image"]) and torch.equal(pairs[1]["image"], pairs[1]["image"])
    assert not torch.equal(pairs[0]["image"], pairs[1]["image"])  # the same picture, other noise
    other_seed = DenoisingPairs([grey, grey], labels=True, fixed_noise=True, seed=4)
    assert not torch.equal(pairs[0]["image"], other_seed[0]["image"])


# ---------------------------------------------------------------------------------------------- accounting
# The memory formula, what the step cost counts, the clocks and the record of train_and_measure, and
# what makes strategies comparable (each survived a mutation before).


def test_memory_estimate_by_hand():
    """Weights + gradient and two AdamW moments per trainable weight + saved tensors, of which only
    the part that grows with the batch is scaled to another batch size."""
    cost = StepCost(batch_size=4, flops=0, activation_bytes=1000, parameter_bytes=300, trainable_bytes=100,
                    fixed_saved_bytes=200)
    assert cost.memory_bytes() == 300 + 3 * 100 + 1000
    assert cost.memory_bytes(8) == 300 + 3 * 100 + 200 + 2 * 800
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got -5"):
        cost.memory_bytes(-5)  # was a positive size


def test_step_cost_holds_every_weight_and_buffer_and_only_trainable_weights_for_the_optimiser():
    model = freeze_encoder(tiny(), 1)
    cost = measure_training_step(model, batch(), TASKS)
    assert cost.parameter_bytes == sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert cost.trainable_bytes == 4 * count_parameters(model, trainable_only=True) < cost.parameter_bytes


def test_a_model_left_in_eval_mode_is_measured_as_it_trains():
    """The step is a training step: BatchNorm saves its batch statistics whatever mode the model was left in."""
    model = tiny()
    trained = measure_training_step(model, batch(), TASKS)
    modes = []
    model.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))  # copied with the model
    assert measure_training_step(model.eval(), batch(), TASKS) == trained
    assert modes and all(modes)  # the copy measured ran in train mode
    assert not model.training  # measured on a copy


def test_train_and_measure_records_memory_at_the_batch_size_cpu_time_and_an_eval_model(monkeypatch):
    """Memory is estimated for config.batch_size (the step is measured on 4 images); CPU time is the
    process's, not the wall clock (a training that waits uses no CPU); the model comes back in eval mode."""
    from mtlearn import engine, umsrep

    clock = SimpleNamespace(wall=100.0, cpu=10.0)  # read by the fake clock below, advanced by the fake fit
    monkeypatch.setattr(umsrep, "time", SimpleNamespace(perf_counter=lambda: clock.wall,
                                                        process_time=lambda: clock.cpu))

    def waiting_fit(model, loader, *args, **kwargs):
        clock.wall += 0.3  # 0.3 s passed, of which the process used 0.05 s of CPU
        clock.cpu += 0.05
        return engine.History()

    monkeypatch.setattr(engine, "fit", waiting_fit)
    measure = umsrep.measure_training_step

    def slow_measure(*args, **kwargs):  # counting FLOPs is slow, and no part of the training timed
        clock.wall, clock.cpu = clock.wall + 5.0, clock.cpu + 5.0
        return measure(*args, **kwargs)

    monkeypatch.setattr(umsrep, "measure_training_step", slow_measure)
    config = handful(num_train=8, batch_size=8)
    train = load_strategy_data(config).train
    model = _new_model(config, ("seg",), num_classes=3, in_channels=1)
    result = train_and_measure(model, "scratch", train, None, config, epochs=1)
    cost = measure_training_step(model, next(iter(DataLoader(train, batch_size=4))), ("seg",))
    assert cost.memory_bytes(8) > cost.memory_bytes()
    assert result.memory_mib == pytest.approx(cost.memory_bytes(8) / 2**20)
    assert result.wall_time_s == pytest.approx(0.3) and result.cpu_time_s == pytest.approx(0.05)
    assert result.model is model and not model.training


def test_train_and_measure_scores_the_test_set_not_the_training_set():
    """Every number of the strategy table is a test score: scored on the training images, scratch and full
    fine-tuning (which fit them best) would look better than they generalise."""
    from mtlearn.engine import evaluate

    config = handful()
    data = load_strategy_data(config)
    model = _new_model(config, ("seg", "cls"), num_classes=3, in_channels=1)
    result = train_and_measure(model, "scratch", data.train, data.test, config, epochs=1)

    def scores(dataset):
        found = evaluate(model, DataLoader(dataset, batch_size=config.batch_size), ("seg", "cls"))
        return {k: v for k, v in found.items() if not k.endswith("loss")}

    assert result.metrics == pytest.approx(scores(data.test)) and result.metrics != pytest.approx(scores(data.train))


def test_table_takes_the_largest_measured_cuda_peak_whatever_the_order():
    """A comparison started on the CPU and resumed on a GPU mixes unmeasured (NaN) and measured peaks."""
    peaks = {"seg": float("nan"), "cls": 3.0, "recon": 2.0}
    for order in (("seg", "cls", "recon"), ("cls", "recon", "seg")):
        runs = [replace(record("full", (t,)), cuda_peak_mib=peaks[t]) for t in order]
        assert strategy_table(runs, UMSRepConfig()).loc["full", "cuda_peak_mib"] == 3.0, order
    unmeasured = [record("full", (t,)) for t in peaks]  # the CPU: NaN for every model
    assert math.isnan(strategy_table(unmeasured, UMSRepConfig()).loc["full", "cuda_peak_mib"])


def test_table_sums_the_epochs_each_model_had_trained_before_a_resume():
    runs = [replace(record("full", (t,)), resumed_epochs=n) for t, n in zip(("seg", "cls", "recon"), (1, 2, 0))]
    assert strategy_table(runs, UMSRepConfig()).loc["full", "resumed_epochs"] == 3


def test_a_run_resumed_with_other_task_weights_is_refused(tmp_path):
    config = handful()
    train = load_strategy_data(config).train
    weights = {"seg": 1.0, "cls": 0.5, "recon": 1.0}
    train_and_measure(_new_model(config, TASKS, 3, 1), "joint", train, None, config, epochs=1, task_weights=weights,
                      out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"other options \(task_weights: .*'cls': 0.5.* then, .*'cls': 2.0.* now\)"):
        train_and_measure(_new_model(config, TASKS, 3, 1), "joint", train, None, config, epochs=1,
                          task_weights={**weights, "cls": 2.0}, out_dir=tmp_path, resume=True)


def test_table_sums_the_trainable_parameters_of_a_strategys_models():
    runs = [replace(record("full", (t,)), trainable_parameters=n) for t, n in zip(("seg", "cls", "recon"), (5, 7, 9))]
    assert strategy_table(runs, UMSRepConfig()).loc["full", "trainable_params"] == 5 + 7 + 9


def test_batches_are_pinned_only_for_a_cuda_device(monkeypatch):
    """On a machine with a GPU, a comparison run on the CPU (device="cpu") pinned every batch for nothing."""
    from mtlearn.umsrep import _loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _loader(list(range(8)), handful(device="cpu"), shuffle=False).pin_memory is False


def test_every_strategy_sees_the_same_batches_and_starts_from_the_same_weights():
    """The loader's order and a new model's weights follow config.seed, not whatever ran before."""
    from mtlearn.umsrep import _loader

    config = handful()
    data = list(range(32))
    first = [b.tolist() for b in _loader(data, config, shuffle=True)]
    torch.rand(10)  # another strategy drew random numbers in between
    assert [b.tolist() for b in _loader(data, config, shuffle=True)] == first != [list(range(i, i + 4))
                                                                                 for i in range(0, 32, 4)]
    assert [b.tolist() for b in _loader(data, handful(seed=1), shuffle=True)] != first  # config.seed's order
    model = _new_model(config, TASKS, 3, 1)
    torch.rand(10)
    again = _new_model(config, TASKS, 3, 1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_synthetic_representation_images_are_not_the_labelled_ones():
    data = load_strategy_data(handful(num_unlabeled=6))
    unlabeled = [data.unlabeled[i]["clean"] for i in range(len(data.unlabeled))]
    labelled = [data.train[i]["clean"] for i in range(len(data.train))] + [data.test[i]["clean"]
                                                                           for i in range(len(data.test))]
    assert len(unlabeled) == 6 and not any(torch.equal(u, x) for u in unlabeled for x in labelled)
    assert len(load_strategy_data(handful(num_unlabeled=None)).unlabeled) == 2 * 4  # default: twice the labelled


def test_the_representation_learns_from_the_unlabeled_images_only(monkeypatch):
    import mtlearn.umsrep as umsrep
    from mtlearn.umsrep import StrategyData, pretrain_representation

    calls = []
    monkeypatch.setattr(umsrep, "train_and_measure", lambda model, strategy, train, test, config, epochs, **kw:
                        calls.append((tuple(model.tasks), strategy, train, test, epochs)))
    data = StrategyData(unlabeled="unlabeled", train="labelled", test="test", class_names=("a", "b", "c"))
    config = handful(pretrain_epochs=3)
    pretrain_representation(config, data)
    assert calls == [(("recon",), "pretrain", "unlabeled", "test", 3)]


@pytest.mark.parametrize("looks", [4.0, 16.0])
def test_speckle_has_mean_one_and_variance_one_over_looks(looks):
    """The intensity factor behind the displayed speckle: Gamma(looks, 1 / looks), read back from the decibels."""
    from scipy.special import digamma

    from mtlearn.data.synthetic import DYNAMIC_RANGE_DB

    grey = {"image": torch.full((1, 64, 64), 0.5), "label": 0}  # mid-grey: no clamping at 0 or 1
    item = DenoisingPairs([grey], gaussian_std=0.0, speckle_looks=looks, fixed_noise=True)[0]
    mean_db = 10 / math.log(10) * (digamma(looks) - math.log(looks))  # taken away to make it zero-mean
    factor = 10 ** (((item["image"] - item["clean"]).double() * DYNAMIC_RANGE_DB + mean_db) / 10)
    assert factor.mean().item() == pytest.approx(1.0, abs=0.03)
    assert factor.var().item() == pytest.approx(1 / looks, rel=0.15)


def test_training_noise_is_new_at_every_read_but_follows_torchs_seed():
    """Augmentation: each epoch sees other noise, and seed_everything makes the run repeatable."""
    pairs = DenoisingPairs([{"image": torch.full((1, SIZE, SIZE), 0.5), "label": 0}], gaussian_std=0.05)
    torch.manual_seed(0)
    first, second = pairs[0]["image"], pairs[0]["image"]
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(pairs[0]["image"], first)


def test_only_strategies_that_start_from_the_representation_count_its_images():
    runs = [record("pretrain", ("recon",), images=200), record("joint", TASKS),
            *(record("scratch", (t,)) for t in ("seg", "cls", "recon"))]
    table = strategy_table(runs, UMSRepConfig())
    assert table.loc["joint", "pretrain_images_seen"] == 200 and table.loc["scratch", "pretrain_images_seen"] == 0
