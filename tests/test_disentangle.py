"""Disentanglement models, the min-max loop and the shapes experiment (tiny sizes, CPU, seconds)."""

import copy
import inspect
import math
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import mtlearn
from mtlearn import disentangle as D
from mtlearn.data.shapes import ShapesBackground

TINY = (4, 8, 16)  # encoder widths for tests


def tiny_model(kind: str = "disentangle", **kwargs):
    kwargs.setdefault("widths", TINY)
    kwargs.setdefault("hidden", 16)
    return D.MODELS[kind](**kwargs)


@pytest.fixture(scope="module")
def shapes_batch():
    loader = DataLoader(Subset(ShapesBackground("train", (32, 40)), range(48)), batch_size=48)
    return next(iter(loader))


# ---------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize(
    "in_channels, widths, size, expected",
    [
        (1, (8, 16, 32, 64), (56, 72), [(8, 56, 72), (16, 28, 36), (32, 14, 18), (64, 7, 9)]),
        (3, (4, 8), (33, 17), [(4, 33, 17), (8, 17, 9)]),
        (1, (4,), (16, 16), [(4, 16, 16)]),
        (2, (4, 8, 16), (5, 7), [(4, 5, 7), (8, 3, 4), (16, 2, 2)]),
    ],
)
def test_encoder_stage_shapes(in_channels, widths, size, expected):
    encoder = D.Encoder(in_channels, widths)
    stages = encoder(torch.randn(2, in_channels, *size))
    assert [tuple(s.shape[1:]) for s in stages] == expected
    assert encoder.out_channels == widths[-1]


def test_encoder_is_a_conv_then_pre_activation_units():
    """SPEC: conv, then residual units BN-LReLU-conv/2-BN-LReLU-conv; no BN-activation of its own in
    the stem (the first unit applies it), one at the end (the last unit's sum has none)."""
    encoder = D.Encoder(1, (8, 16, 32, 64))
    assert isinstance(encoder.stem, torch.nn.Conv2d)
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 2 * len(encoder.units) + 1
    assert isinstance(encoder.units[0].main[0], torch.nn.BatchNorm2d)


@pytest.mark.parametrize("hidden", [0, 16])
@pytest.mark.parametrize("readout", ["pooled", "spatial"])
def test_classifier_shapes(hidden, readout):
    head = D.Classifier(8, 3, hidden=hidden, readout=readout)
    assert head(torch.randn(5, 8, 6, 7)).shape == (5, 3)


@pytest.mark.parametrize("kind", list(D.MODELS))
@pytest.mark.parametrize("in_channels, classes_a, classes_b, size", [(1, 2, 2, (32, 40)), (3, 3, 2, (24, 24))])
def test_model_output_shapes(kind, in_channels, classes_a, classes_b, size):
    model = tiny_model(kind, in_channels=in_channels, num_classes_a=classes_a, num_classes_b=classes_b)
    out = model(torch.randn(4, in_channels, *size))
    h, w = -(-size[0] // 4), -(-size[1] // 4)  # two halvings, rounded up
    assert out["features_a"].shape == out["features_b"].shape == (4, 16, h, w)
    assert out["logits_a"].shape == (4, classes_a) and out["logits_b"].shape == (4, classes_b)
    if kind == "disentangle":
        assert out["adv_a"].shape == (4, classes_a) and out["adv_b"].shape == (4, classes_b)
    else:
        assert "adv_a" not in out
    if kind == "shared":
        assert out["features_a"] is out["features_b"]


def test_disentangle_parameter_groups_split_the_model():
    model = tiny_model()
    main, adversaries = model.main_parameters(), model.adversary_parameters()
    assert {id(p) for p in main}.isdisjoint(id(p) for p in adversaries)
    assert len(main) + len(adversaries) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: D.Encoder(in_channels=0), "in_channels"),
        (lambda: D.Encoder(widths=()), "widths"),
        (lambda: D.Encoder(widths=(8, 0)), "widths"),
        (lambda: D.Encoder(widths=64), r"widths must list the width of each encoder stage, .*got 64"),  # "has no len()"
        (lambda: D.disentangle_config("smoke", widths=64), r"widths must list the width of each"),  # at build
        (lambda: D.DisentangleNet(widths=TINY, dropout="0.1"), r"dropout must be a number in \[0, 1\).*unquoted"),
        (lambda: D.Classifier(8, num_classes=1), "num_classes"),
        (lambda: D.Classifier(8, 2, readout="local"), "unknown readout 'local'"),
        (lambda: D.Classifier(8, 2, hidden=-1), "hidden"),
        (lambda: D.Classifier(8, 2, dropout=1.0), "dropout"),
        (lambda: D.Classifier(8, 2, readout="spatial", grid=0), "grid must be an integer >= 1"),
        (lambda: D.Classifier(0, 2), "in_channels must be an integer >= 1"),
        # a unit of 0 channels built silently, 8.0 failed with torch's TypeError, -1 with a RuntimeError
        (lambda: D.ResidualUnit(0, 8), "in_channels must be an integer >= 1, got 0"),
        (lambda: D.ResidualUnit(8.0, 16), r"in_channels must be an integer >= 1, got 8\.0"),
        (lambda: D.ResidualUnit(8, -1), "out_channels must be an integer >= 1, got -1"),
        (lambda: D.ResidualUnit(8, 16, negative_slope=float("nan")), "negative_slope must be a finite number >= 0"),
        (lambda: D.DisentangleNet(num_classes_a=1), "num_classes_a"),
        (lambda: D.SharedEncoderNet(num_classes_b=True), "num_classes_b"),
        (lambda: D.DisentangleNet(adv_readout="grid"), "unknown readout"),
        (lambda: D.build_model("vae"), "unknown model kind 'vae'"),
        (lambda: D.disentangle_config("fast"), "unknown profile 'fast'"),
        (lambda: D.disentangle_config("course", w=1.0), "unknown DisentangleConfig fields"),
        (lambda: D.DisentangleConfig(adv_loss="gradient_reversal"), "adv_loss"),
        (lambda: D.DisentangleConfig(adv_target="half"), "adv_target"),
        (lambda: D.DisentangleConfig(w_adv=-3.0), "w_adv must be a finite number >= 0"),
        (lambda: D.DisentangleConfig(batch_size=1), "batch_size must be an integer >= 2"),
        (lambda: D.DisentangleConfig(epochs=0), "epochs must be an integer >= 1"),
        (lambda: D.balanced_sampler(np.zeros(3), np.zeros(4)), "same length"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("x, match", [
    (torch.randn(2, 3, 16, 16), r"built for 1 input channel\(s\), got 3 .*in_channels=3"),
    (torch.randn(2, 16, 16), r"\(B, C, H, W\), got a tensor of shape \(2, 16, 16\)"),
    (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), r"uint8; convert with .float\(\) / 255"),
    (torch.zeros(2, 1, 16, 16, dtype=torch.float64), r"float64 but the model's weights are torch.float32"),
    (torch.zeros(2, 1, 0, 16), r"the images are empty \(size 0x16"),
])
def test_encoder_rejects_wrong_input(x, match):
    with pytest.raises(ValueError, match=match):
        D.Encoder(1, TINY)(x)
    assert D.Encoder(1, TINY)(torch.randn(2, 1, 5, 7))[-1].shape[0] == 2  # any size, no stride


@pytest.mark.parametrize("kind", list(D.MODELS))
def test_every_parameter_gets_a_gradient_and_no_nan(kind):
    torch.manual_seed(0)
    model = tiny_model(kind, adv_hidden=0) if kind == "disentangle" else tiny_model(kind)
    out = model(torch.randn(6, 1, 24, 32))
    loss = sum((torch.randn_like(v) * v).sum() for k, v in out.items() if not k.startswith("features"))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(torch.isfinite(v).all() for v in out.values())


# ---------------------------------------------------------------------------------------------- loop pieces


def test_label_prior_reads_conditional_frequencies():
    joint = torch.tensor([[0.0, 600.0], [500.0, 100.0]])  # rows: shape (circle, bar); cols: background
    p_b_given_a = D.label_prior(joint, torch.tensor([0, 1]), axis=1)
    assert torch.allclose(p_b_given_a, torch.tensor([[0.0, 1.0], [5 / 6, 1 / 6]]))
    p_a_given_b = D.label_prior(joint, torch.tensor([0, 1]), axis=0)
    assert torch.allclose(p_a_given_b, torch.tensor([[0.0, 1.0], [6 / 7, 1 / 7]]))
    with pytest.raises(ValueError, match=r"axis must be 1 \(p\(b \| a = given\)\) or 0 .*got 2"):
        D.label_prior(joint, torch.tensor([0, 1]), axis=2)  # was read as axis=0
    # a uint8 or bool tensor indexes as a mask: [1, 1] gave the rows of classes 0 and 1, not class 1 twice
    torch.testing.assert_close(D.label_prior(joint, [1, 1], axis=1), torch.tensor([[5 / 6, 1 / 6]] * 2))  # a list
    for dtype in (torch.uint8, torch.int32):
        torch.testing.assert_close(D.label_prior(joint, torch.tensor([1, 1], dtype=dtype), axis=1),
                                   torch.tensor([[5 / 6, 1 / 6]] * 2))
    for given in (torch.tensor([True, False]), torch.tensor([1.0, 0.0]), torch.tensor([1 + 0j, 0j])):
        with pytest.raises(ValueError, match=rf"given must hold class indices .*got {given.dtype}; pass labels\.long"):
            D.label_prior(joint, given, axis=1)


def test_adversarial_term_forms():
    logits = torch.tensor([[3.0, -3.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    uniform = torch.full((2, 2), 0.5)
    expected = -F.cross_entropy(logits, labels).item()
    assert D.adversarial_term(logits, labels, "negative_ce", uniform) == pytest.approx(expected)
    confusion = D.adversarial_term(logits, labels, "confusion", uniform)
    # confusion is smallest (log 2) when the adversary predicts the target exactly
    assert confusion > D.adversarial_term(torch.zeros(2, 2), labels, "confusion", uniform)
    assert D.adversarial_term(torch.zeros(2, 2), labels, "confusion", uniform) == pytest.approx(np.log(2))


@pytest.mark.parametrize(
    "step, warmup, ramp, expected",
    [(0, 0, 0, 2.0), (5, 10, 0, 0.0), (10, 10, 4, 0.5), (13, 10, 4, 2.0), (100, 10, 4, 2.0), (1, 0, 4, 1.0)],
)
def test_adversary_weight_schedule(step, warmup, ramp, expected):
    assert D.adversary_weight(step, 2.0, warmup, ramp) == pytest.approx(expected)


@pytest.mark.parametrize("step, warmup, ramp, name", [(-5, 10, 10, "step"), (5, -1, 0, "warmup_steps"),
                                                      (5, 0, -1, "ramp_steps"), (5, None, 0, "warmup_steps")])
def test_adversary_weight_refuses_a_negative_count(step, warmup, ramp, name):
    """A negative ramp gave the full weight at once, a negative step none: numbers, not an error."""
    with pytest.raises(ValueError, match=rf"adversary_weight's {name} must be a number >= 0"):
        D.adversary_weight(step, 2.0, warmup, ramp)


def test_balanced_sampler_names_an_empty_training_set():
    with pytest.raises(ValueError, match=r"empty label arrays: the training set has no items"):
        D.balanced_sampler(np.array([], dtype=int), np.array([], dtype=int))


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _unchanged(module, snapshot):
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), snapshot))


def test_adversary_step_learns_and_leaves_the_rest_frozen(shapes_batch):
    torch.manual_seed(0)
    model = tiny_model()
    x, y_a, y_b = shapes_batch["image"], shapes_batch["shape"], shapes_batch["background"]
    features_a, features_b = model.encode(x)
    frozen = {name: _snapshot(getattr(model, name)) for name in ("encoder_a", "encoder_b", "head_a", "head_b")}
    optimizer = torch.optim.SGD(model.adversary_parameters(), lr=0.05, momentum=0.9)
    first = D.adversary_step(model, optimizer, features_a.detach(), features_b.detach(), y_a, y_b)
    for _ in range(30):
        last = D.adversary_step(model, optimizer, features_a.detach(), features_b.detach(), y_a, y_b)
    assert last["adv_loss_a"] < first["adv_loss_a"] and last["adv_loss_b"] < first["adv_loss_b"]
    for name, snapshot in frozen.items():
        assert _unchanged(getattr(model, name), snapshot), f"{name} changed in the adversary phase"
        assert all(p.grad is None for p in getattr(model, name).parameters()), f"{name} got gradients"


def test_an_adversary_step_without_scores_takes_the_same_step_and_reads_nothing_back(shapes_batch, monkeypatch):
    """train_disentangle keeps the scores of the first of its 100 steps a batch: the others read four numbers
    back each (and two for the NaN check), every read a wait for the GPU's queue."""
    torch.manual_seed(0)
    model = tiny_model()
    x, y_a, y_b = shapes_batch["image"], shapes_batch["shape"], shapes_batch["background"]
    features_a, features_b = (f.detach() for f in model.encode(x))
    quiet = copy.deepcopy(model)
    D.adversary_step(model, torch.optim.SGD(model.adversary_parameters(), lr=0.05), features_a, features_b, y_a, y_b)
    reads = []
    for method in ("item", "__bool__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, original=original: reads.append(1) or original(self))
    scores = D.adversary_step(quiet, torch.optim.SGD(quiet.adversary_parameters(), lr=0.05), features_a, features_b,
                              y_a, y_b, scores=False)
    monkeypatch.undo()
    assert scores == {} and len(reads) == 1  # the NaN check, once for both losses
    for key, value in model.state_dict().items():
        assert torch.equal(value, quiet.state_dict()[key]), key


@pytest.mark.parametrize("adv_loss", ["negative_ce", "confusion"])
def test_main_step_makes_the_frozen_adversary_worse(shapes_batch, adv_loss):
    torch.manual_seed(0)
    model = tiny_model()
    x, y_a, y_b = shapes_batch["image"], shapes_batch["shape"], shapes_batch["background"]
    adv_optimizer = torch.optim.SGD(model.adversary_parameters(), lr=0.05, momentum=0.9)
    features_a, features_b = model.encode(x)
    for _ in range(30):  # a well-trained adversary first
        D.adversary_step(model, adv_optimizer, features_a.detach(), features_b.detach(), y_a, y_b)

    def adversary_ce():
        with torch.no_grad():
            adv_a, adv_b = model.adversaries(*model.encode(x))
            return F.cross_entropy(adv_b, y_b).item()

    before = adversary_ce()
    adversary_grads = [p.grad.clone() for p in model.adversary_parameters()]  # from their own last step
    optimizer = torch.optim.Adam(model.main_parameters(), lr=1e-2)
    uniform = torch.full((len(x), 2), 0.5)
    buffers = [b.clone() for b in (*model.adv_a.buffers(), *model.adv_b.buffers())]
    for _ in range(5):
        record = D.main_step(model, optimizer, *model.encode(x), y_a, y_b, w_adv=10.0, adv_loss=adv_loss,
                             target_a=uniform, target_b=uniform)
    assert "adv_term" in record
    # their BatchNorm statistics too: the adversary phase counts each batch, the main phase does not
    assert all(torch.equal(b, c) for b, c in zip((*model.adv_a.buffers(), *model.adv_b.buffers()), buffers))
    assert adversary_ce() > before + 0.1  # the encoders learned to fool the (fixed) adversary
    assert all(p.requires_grad for p in model.adversary_parameters())  # unfrozen again afterwards
    # frozen during the main phase: its backward passed through them without touching their gradients
    assert all(torch.equal(p.grad, g) for p, g in zip(model.adversary_parameters(), adversary_grads))


def test_main_step_pushes_each_adversary_towards_its_own_target(shapes_batch):
    """adv_a (task A read from f_b) towards target_a, adv_b towards target_b: with two classes on each
    side a swap of the two would go unnoticed by every shape check."""
    torch.manual_seed(0)
    model = tiny_model(dropout=0.0)  # the adversaries' outputs, as main_step will see them, computed first
    x, y_a, y_b = shapes_batch["image"], shapes_batch["shape"], shapes_batch["background"]
    features_a, features_b = model.encode(x)
    target_a = torch.softmax(torch.randn(len(x), 2), 1)
    target_b = torch.softmax(3 * torch.randn(len(x), 2), 1)
    with torch.no_grad():  # in train mode: BatchNorm on the batch's statistics, as in main_step
        adv_a, adv_b = model.adversaries(features_a, features_b)

    def term(first, second):
        return (D.adversarial_term(adv_a, y_a, "confusion", first)
                + D.adversarial_term(adv_b, y_b, "confusion", second)).item()

    optimizer = torch.optim.Adam(model.main_parameters(), lr=1e-2)
    record = D.main_step(model, optimizer, features_a, features_b, y_a, y_b, w_adv=3.0, target_a=target_a,
                         target_b=target_b)
    # the term as such, not times w_adv: a ramp or another weight must not change what the history reports
    assert record["adv_term"] == pytest.approx(term(target_a, target_b), rel=1e-5)
    assert term(target_a, target_b) != pytest.approx(term(target_b, target_a), rel=1e-3)  # a swap would show


def test_main_step_refuses_bad_arguments_before_freezing_the_adversaries(shapes_batch):
    model = tiny_model()
    x, y_a, y_b = shapes_batch["image"], shapes_batch["shape"], shapes_batch["background"]
    optimizer = torch.optim.Adam(model.main_parameters(), lr=1e-3)
    uniform = torch.full((len(x), 2), 0.5)
    with pytest.raises(ValueError, match="w_leak > 0 needs leakage"):
        D.main_step(model, optimizer, *model.encode(x), y_a, y_b, w_adv=1.0, target_a=uniform, target_b=uniform,
                    w_leak=1.0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # no main step
def test_the_adversary_phase_of_training_sends_no_gradient_into_the_encoders(monkeypatch):
    """train_disentangle detaches the features for the adversaries: with its main phase stubbed out,
    a whole epoch of adversary steps leaves the encoders and heads as they were, without gradients."""
    monkeypatch.setattr(D, "main_step", lambda model, optimizer, *args, **kwargs: {"loss": 0.0})
    torch.manual_seed(0)
    model = tiny_model()
    frozen = {name: _snapshot(getattr(model, name)) for name in ("encoder_a", "encoder_b", "head_a", "head_b")}
    adversaries = _snapshot(model.adv_a)
    batches = [_labelled_batch([(0, 1), (1, 1), (1, 0), (1, 0)], seed=s) for s in (0, 1)]
    D.train_disentangle(model, batches, epochs=1, lr=0.01, adv_steps=3, device="cpu", progress=False,
                        recalibrate_bn=False)
    assert not _unchanged(model.adv_a, adversaries)  # the adversaries did learn
    for name, snapshot in frozen.items():
        assert all(p.grad is None for p in getattr(model, name).parameters()), f"{name} got gradients"
        assert _unchanged(getattr(model, name), snapshot), f"{name} changed"


def test_a_model_handed_over_in_eval_mode_trains_in_train_mode():
    """e.g. one that shapes_experiment returned (in eval mode) trained further: BatchNorm would use its
    running statistics and dropout stay off, without a word."""
    model = tiny_model()
    model.eval()
    modes = []
    model.encoder_a.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    batches = [_labelled_batch([(0, 1), (1, 1), (1, 0), (1, 0)], seed=s) for s in (0, 1)]
    D.train_disentangle(model, batches, epochs=1, adv_steps=1, device="cpu", progress=False, recalibrate_bn=False)
    assert modes == [True, True]  # one forward per batch, in train mode


def test_adversary_batchnorm_statistics_take_each_batch_once():
    """100 adversary steps per batch at momentum 0.1 left the running mean that of the last batch alone
    (0.9 ** 100 of everything before); one update per batch keeps the earlier batches in it. (The
    main step's forward through the adversaries counted each batch a second time.)"""
    torch.manual_seed(0)
    model = tiny_model(hidden=0)  # linear adversaries: BN on the pooled features, then one dense layer
    batches = [_labelled_batch([(0, 1), (1, 1), (1, 0), (1, 0)], seed=s) for s in (0, 1, 2)]
    seen = []
    model.adv_b.net[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].mean(0)))
    D.train_disentangle(model, batches, epochs=1, adv_steps=20, device="cpu", progress=False, recalibrate_bn=False)
    assert len(seen) == 3 * 22  # per batch: 20 adversary steps, the fit score and the main step, on the same features
    per_batch = [seen[i * 22] for i in range(3)]
    # BatchNorm's running mean (momentum 0.1) from 0, updated by the first adversary step of each batch
    # only: the main step runs the adversaries on the same features and must not count them again
    expected = torch.zeros_like(per_batch[0])
    for mean in per_batch:
        expected = 0.9 * expected + 0.1 * mean
    assert torch.allclose(model.adv_b.net[0].running_mean, expected, atol=1e-5)


def test_fit_accuracy_draws_no_random_number_and_uses_no_dropout(shapes_batch):
    """It scores the adversaries in training mode (batch statistics); dropout drew masks there, moving
    the global generator and making the score noisy."""
    model = tiny_model(dropout=0.5)
    features = [f.detach() for f in model.encode(shapes_batch["image"])]
    y_a, y_b = shapes_batch["shape"], shapes_batch["background"]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = D.fit_accuracy(model, *features, y_a, y_b)
    assert torch.equal(torch.get_rng_state(), state)
    assert D.fit_accuracy(model, *features, y_a, y_b) == first
    assert all(m.training for m in model.adv_a.modules())  # left in training mode


def test_linear_leakage_needs_a_combination_seen_twice():
    leak = D.LinearLeakage()
    features = torch.randn(4, 8, 2, 2, requires_grad=True)
    assert leak(features, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])).item() == 0.0  # one per cell
    assert leak.covariance is None


def test_linear_leakage_takes_half_precision_features():
    """bf16 or fp16 features (a model trained under autocast) failed: "expected m1 and m2 to have the same dtype"."""
    features = torch.randn(8, 4, 2, 2)
    group, target = torch.tensor([0, 0, 1, 1] * 2), torch.tensor([0, 1] * 4)
    reference = D.LinearLeakage()(features, group, target)
    for dtype in (torch.bfloat16, torch.float16):
        half = D.LinearLeakage()(features.to(dtype), group, target)
        assert half.dtype == torch.float32 and torch.isclose(half, reference, rtol=0.05)


def test_main_step_without_adversary_is_plain_multitask(shapes_batch):
    torch.manual_seed(0)
    model = tiny_model("shared")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y_a, y_b = shapes_batch["image"], shapes_batch["shape"], shapes_batch["background"]
    first = D.main_step(model, optimizer, *model.encode(x), y_a, y_b, w_adv=5.0)
    for _ in range(10):
        last = D.main_step(model, optimizer, *model.encode(x), y_a, y_b, w_adv=5.0)
    assert "adv_term" not in last
    assert last["loss_a"] + last["loss_b"] < first["loss_a"] + first["loss_b"]


def test_balanced_sampler_equalises_seen_combinations():
    data = ShapesBackground("train", (32, 40))
    sampler = D.balanced_sampler(data.labels, data.backgrounds, seed=0)
    drawn = list(sampler)
    assert len(drawn) == len(data)
    combos = Counter(zip(data.labels[drawn].tolist(), data.backgrounds[drawn].tolist()))
    assert set(combos) == {(0, 1), (1, 1), (1, 0)}  # circle on black stays absent
    assert all(300 < n < 500 for n in combos.values())  # about 400 each instead of 600 / 100 / 500
    assert drawn == list(D.balanced_sampler(data.labels, data.backgrounds, seed=0))
    assert drawn != list(D.balanced_sampler(data.labels, data.backgrounds, seed=1))


def test_shapes_loaders_balance_the_seen_combinations_of_both_labels():
    """The informative case (bars on black against bars on white) is a third of the draws, not its share
    of the data; balancing by shape alone would leave it there."""
    config = D.disentangle_config("smoke")
    train = D.shapes_loaders(config)["train"]
    data = train.dataset
    weights = train.sampler.weights.numpy()
    combos = Counter(zip(data.labels.tolist(), data.backgrounds.tolist()))
    assert len(combos) == 3 and len(set(combos.values())) > 1  # the data itself is unbalanced
    mass = Counter()
    for shape, background, weight in zip(data.labels, data.backgrounds, weights):
        mass[int(shape), int(background)] += weight
    assert all(value == pytest.approx(sum(mass.values()) / 3) for value in mass.values())
    unbalanced = D.shapes_loaders(D.disentangle_config("smoke", balance=False))["train"]
    assert isinstance(unbalanced.sampler, torch.utils.data.RandomSampler)  # shuffled, as the paper preset trains


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_loaders():
    train = Subset(ShapesBackground("train", (32, 40)), range(64))
    test = Subset(ShapesBackground("test", (32, 40)), range(40))
    return DataLoader(train, batch_size=16, shuffle=True, drop_last=True), DataLoader(test, batch_size=20)


class _BreaksAt(torch.utils.data.Dataset):
    """The items of `data` up to index `at`, then an error, as a damaged file would raise."""

    def __init__(self, data, at: int):
        self.data, self.at = data, at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if index >= self.at:
            raise OSError("simulated unreadable image")
        return self.data[index]


def test_train_disentangle_asks_for_the_adversaries_scores_on_the_first_step_of_each_batch(tiny_loaders,
                                                                                         monkeypatch):
    adversary_step, asked = D.adversary_step, []

    def records(*args, scores=True, **kwargs):
        asked.append(scores)
        return adversary_step(*args, scores=scores, **kwargs)

    monkeypatch.setattr(D, "adversary_step", records)
    D.train_disentangle(tiny_model(), tiny_loaders[0], epochs=1, adv_steps=3, device="cpu", progress=False,
                        recalibrate_bn=False)
    assert asked == [True, False, False] * len(tiny_loaders[0])  # only the first step's scores are recorded


def test_train_disentangle_stopped_by_an_error_in_the_data_stops_the_loader_workers(tiny_loaders):
    """The error comes out of the loader's own next(), whose frames (holding the iterator) the traceback
    keeps, and Jupyter keeps the last traceback: the other worker ran on."""
    import multiprocessing

    data = _BreaksAt(tiny_loaders[0].dataset, at=16)
    before = {process.pid for process in multiprocessing.active_children()}
    with pytest.raises(OSError, match="simulated unreadable image") as kept:
        D.train_disentangle(tiny_model(), DataLoader(data, batch_size=8, num_workers=2), epochs=1, adv_steps=1,
                            device="cpu", progress=False)
    assert kept.tb is not None and {process.pid for process in multiprocessing.active_children()} <= before


@pytest.mark.parametrize("call", [
    lambda model, loader: D.evaluate_disentangle(model, loader, device="cpu"),
    lambda model, loader: D.recalibrate_batchnorm(model, loader, device="cpu"),
    lambda model, loader: mtlearn.probes.extract_features(model.encoder_a, loader, device="cpu"),
], ids=["evaluate_disentangle", "recalibrate_batchnorm", "extract_features"])
def test_the_other_loops_over_a_loader_stop_its_workers_on_an_error(call, tiny_loaders):
    import multiprocessing

    data = _BreaksAt(tiny_loaders[0].dataset, at=16)
    before = {process.pid for process in multiprocessing.active_children()}
    with pytest.raises(OSError, match="simulated unreadable image") as kept:
        call(tiny_model(), DataLoader(data, batch_size=8, num_workers=2))
    assert kept.tb is not None and {process.pid for process in multiprocessing.active_children()} <= before


@pytest.mark.parametrize("kind", list(D.MODELS))
def test_train_disentangle_runs_every_model(kind, tiny_loaders):
    train, val = tiny_loaders
    model = tiny_model(kind)
    history = D.train_disentangle(model, train, val, epochs=2, adv_steps=2, w_adv=1.0, ramp_epochs=1.0,
                                  w_leak=1.0, device="cpu", progress=False)
    expected = {"loss_a", "loss_b", "acc_a", "acc_b", "w_adv", "val_acc_a", "val_acc_b"}
    if kind == "disentangle":
        expected |= {"adv_loss_a", "adv_loss_b", "adv_acc_a", "adv_acc_b", "adv_fit_acc_a", "adv_fit_acc_b",
                     "adv_term", "leak", "val_adv_acc_a", "val_adv_acc_b"}
        assert history["w_adv"][0] < history["w_adv"][1] == 1.0  # ramped up over the first epoch
    else:
        assert history["w_adv"] == [0.0, 0.0]
    assert set(history) == expected
    assert all(len(v) == 2 and np.isfinite(v).all() for v in history.values())


def test_train_disentangle_hands_leak_shrink_to_the_penalty(tiny_loaders, monkeypatch):
    made = []

    class Recorded(D.LinearLeakage):
        def __init__(self, shrink=0.01, decay=0.9):
            made.append(shrink)
            super().__init__(shrink, decay)

    monkeypatch.setattr(D, "LinearLeakage", Recorded)
    D.train_disentangle(tiny_model(), tiny_loaders[0], epochs=1, adv_steps=1, w_leak=1.0, leak_shrink=0.5,
                        device="cpu", progress=False)
    assert made == [0.5, 0.5]


def test_a_snapshot_of_the_game_is_a_copy_that_restores_it():
    """What one batch changes in place (the label-pair counts) or replaces (the penalty's covariance) must
    come back exactly when a step is undone."""
    model = tiny_model()
    leakage = (D.LinearLeakage(), D.LinearLeakage())
    leakage[0].covariance = torch.eye(2)
    game = dict(model=model, leakage=leakage, adv_optimizer=None, joint=torch.tensor([[3.0, 1.0], [0.0, 2.0]]))
    saved = D._snapshot(game)
    game["joint"] += 1.0
    leakage[0].covariance, leakage[1].covariance = 2 * torch.eye(2), torch.ones(2, 2)
    D._restore(game, saved)
    assert torch.equal(game["joint"], torch.tensor([[3.0, 1.0], [0.0, 2.0]]))
    assert torch.equal(leakage[0].covariance, torch.eye(2)) and leakage[1].covariance is None


def test_history_averages_each_key_over_the_steps_that_recorded_it(tiny_loaders, monkeypatch):
    """adv_term exists only once w_adv > 0: a warm-up epoch has none (NaN), and no zeros dilute the next."""
    train, _ = tiny_loaders  # 4 steps per epoch
    terms, real_main_step = [], D.main_step

    def recording(*args, **kwargs):
        record = real_main_step(*args, **kwargs)
        terms.append(record.get("adv_term"))
        return record

    monkeypatch.setattr(D, "main_step", recording)
    history = D.train_disentangle(tiny_model(), train, epochs=3, adv_steps=2, w_adv=1.0, warmup_epochs=1.5,
                                  device="cpu", progress=False)
    assert all(len(v) == 3 for v in history.values())
    assert np.isnan(history["adv_term"][0]) and np.isfinite(history["adv_term"][1:]).all()
    assert history["w_adv"] == [0.0, 0.5, 1.0]  # 2 of epoch 2's 4 steps are past the warm-up
    assert terms[:6] == [None] * 6 and None not in terms[6:]  # epoch 2: its last 2 steps only
    assert history["adv_term"][1] == pytest.approx(np.mean(terms[6:8]))  # over 2 steps, not 4
    assert history["adv_term"][2] == pytest.approx(np.mean(terms[8:]))


def test_adversary_accuracy_is_scored_before_it_fits_the_batch():
    """After 100 steps on 50 random images a linear adversary fits them; before, it is at chance."""
    torch.manual_seed(0)
    images = torch.randn(400, 1, 16, 16)
    data = [{"image": x, "shape": int(i % 2), "background": int(torch.randint(0, 2, ()))} for i, x in enumerate(images)]
    loader = DataLoader(data, batch_size=50, shuffle=True, drop_last=True)
    history = D.train_disentangle(tiny_model(), loader, epochs=1, adv_steps=100, w_adv=0.0, device="cpu",
                                  progress=False)
    assert history["adv_fit_acc_b"][0] > 0.9  # random background labels, memorised batch by batch
    assert history["adv_acc_b"][0] < 0.7  # ... and read no better than chance on the next batch


def test_train_disentangle_seeds_itself(tiny_loaders):
    """Same seed: same run whatever the global RNG held before; another seed: another run.

    The model is built once and copied, so the initial weights are equal and only train_disentangle's
    own seeding decides the shuffling of the training loader.
    """
    train, _ = tiny_loaders
    torch.manual_seed(1)
    model = tiny_model()

    def run(global_seed, seed):
        torch.manual_seed(global_seed)  # a different global state before each run
        trained = copy.deepcopy(model)
        history = D.train_disentangle(trained, train, epochs=1, adv_steps=2, device="cpu", seed=seed, progress=False)
        return history, [p.detach().clone() for p in trained.parameters()]

    (history, weights), (again, weights_again) = run(123, seed=3), run(999, seed=3)
    assert history == again
    assert all(torch.equal(p, q) for p, q in zip(weights, weights_again))
    other, other_weights = run(123, seed=4)
    assert other != history
    assert not all(torch.equal(p, q) for p, q in zip(weights, other_weights))


@pytest.mark.parametrize("kind, name", [("disentangle", "adv_loss_a"), ("shared", "loss_a")])
def test_a_nan_loss_stops_training_before_it_changes_the_model(kind, name, shapes_batch):
    """Images holding NaN in the second batch: the run stops there, naming the epoch, the step and
    the loss (the adversaries' comes first), and the model is exactly as after the first batch
    (weights and BatchNorm statistics: the bad batch's statistics are put back)."""
    from mtlearn.engine import NonFiniteLossError

    keys = ("image", "shape", "background")
    good = {k: shapes_batch[k][:16] for k in keys}
    bad = {k: shapes_batch[k][16:32].clone() for k in keys}
    bad["image"][3, 0, 5, 5] = float("nan")
    torch.manual_seed(0)
    model = tiny_model(kind)
    reference = copy.deepcopy(model)
    kwargs = dict(epochs=1, adv_steps=2, w_adv=1.0, device="cpu", progress=False, recalibrate_bn=False)
    D.train_disentangle(reference, [good], **kwargs)
    with pytest.raises(NonFiniteLossError, match=rf"the '{name}' loss is nan at epoch 1, step 2.*lr") as caught:
        D.train_disentangle(model, [good, bad], **kwargs)
    assert (caught.value.epoch, caught.value.step, caught.value.task) == (1, 2, name)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_a_nan_before_the_first_checkpoint_gives_the_starting_state_back(shapes_batch, tmp_path):
    """With out_dir, a NaN in epoch 1 left the model as after the last finite step, so the fresh start of
    resume=True (with a lower lr, say) began on half-trained weights; fit gives the starting state back,
    the loader's generator included."""
    from mtlearn.engine import NonFiniteLossError

    keys = ("image", "shape", "background")
    items = [{k: shapes_batch[k][i] for k in keys} for i in range(32)]
    # the NaN image in the second batch, so that the first one has moved the model (the shuffle's own order)
    bad = torch.cat(list(DataLoader(range(32), batch_size=16, shuffle=True,
                                    generator=torch.Generator().manual_seed(3))))[20].item()
    items[bad]["image"] = items[bad]["image"].clone()
    items[bad]["image"][0, 5, 5] = float("nan")
    loader = DataLoader(items, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    generator_state = loader.generator.get_state()
    torch.manual_seed(0)
    model = tiny_model()
    start = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 2"):
        D.train_disentangle(model, loader, epochs=1, adv_steps=2, device="cpu", progress=False, out_dir=tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, start[key]), key
    assert torch.equal(loader.generator.get_state(), generator_state)


REAL_MAIN_STEP = D.main_step


def interrupt_main_step(monkeypatch, at_call: int | None) -> None:
    """From now on the `at_call`-th call of D.main_step raises KeyboardInterrupt (Ctrl-C, a Colab
    disconnect) and every other call runs the real step; None puts the real step back."""
    if at_call is None:
        monkeypatch.setattr(D, "main_step", REAL_MAIN_STEP)
        return
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return REAL_MAIN_STEP(*args, **kwargs)
    monkeypatch.setattr(D, "main_step", step)


def test_an_interruption_after_the_first_checkpoint_keeps_the_weights_reached(tiny_loaders, tmp_path, monkeypatch):
    """Once last.pt exists the starting state is no longer given back: an interruption in epoch 2, and one
    in the first epoch of a resumed run, leave the model where it got to, as a run without out_dir does."""
    train = tiny_loaders[0]  # 4 steps per epoch
    kwargs = dict(epochs=3, adv_steps=2, w_adv=1.0, device="cpu", progress=False, seed=2)
    torch.manual_seed(0)
    model = tiny_model()
    reference, first, resumed = copy.deepcopy(model), copy.deepcopy(model), tiny_model()
    for net, out_dir in ((reference, None), (first, tmp_path)):
        interrupt_main_step(monkeypatch, 6)  # epoch 2, step 2
        with pytest.raises(KeyboardInterrupt):
            D.train_disentangle(net, train, out_dir=out_dir, **kwargs)
    interrupt_main_step(monkeypatch, 2)  # the resumed run's first epoch (epoch 2), step 2: where the others stopped
    with pytest.raises(KeyboardInterrupt):
        D.train_disentangle(resumed, train, out_dir=tmp_path, resume=True, **kwargs)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, first.state_dict()[key]), key
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_an_interrupted_run_resumes_to_the_same_result(tiny_loaders, tmp_path, monkeypatch):
    """Killed in the middle of epoch 2 of 3, resumed from last.pt: the same weights (adversaries,
    BatchNorm statistics) and history as a run that was never interrupted. The ramp, the leakage
    statistics and the shuffling all cross the epoch boundary, so each must be restored."""
    train, val = tiny_loaders  # 4 steps per epoch, shuffled with the global generator
    kwargs = dict(epochs=3, adv_steps=2, w_adv=1.0, ramp_epochs=1.5, w_leak=1.0, device="cpu", progress=False, seed=2)
    torch.manual_seed(0)
    model = tiny_model()
    straight, interrupted = copy.deepcopy(model), copy.deepcopy(model)
    expected = D.train_disentangle(straight, train, val, **kwargs)
    interrupt_main_step(monkeypatch, 6)  # epoch 2, step 2
    with pytest.raises(KeyboardInterrupt):
        D.train_disentangle(interrupted, train, val, out_dir=tmp_path, **kwargs)
    interrupt_main_step(monkeypatch, None)
    resumed = tiny_model()  # a new session: a fresh model, its weights come from last.pt
    history = D.train_disentangle(resumed, train, val, out_dir=tmp_path, resume=True, **kwargs)
    assert history == expected
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_run_interrupted_in_its_first_epoch_starts_again_from_where_it_started(tiny_loaders, tmp_path,
                                                                                     monkeypatch):
    """Before its first last.pt there is nothing to resume: rerunning the cell with resume=True starts
    afresh, but on the model the interrupted epoch had trained (and a loader generator it had moved),
    so the "same" run ended elsewhere. As fit does, the starting state is given back."""
    dataset = tiny_loaders[0].dataset

    def loader():  # shuffled by a generator of its own, which seed= does not reset
        return DataLoader(dataset, batch_size=16, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(7))

    kwargs = dict(epochs=2, adv_steps=2, w_adv=1.0, w_leak=1.0, device="cpu", progress=False, seed=2)
    torch.manual_seed(0)
    model = tiny_model()
    straight, interrupted = copy.deepcopy(model), copy.deepcopy(model)
    expected = D.train_disentangle(straight, loader(), **kwargs)
    interrupt_main_step(monkeypatch, 3)  # epoch 1, step 3
    train = loader()
    with pytest.raises(KeyboardInterrupt):
        D.train_disentangle(interrupted, train, out_dir=tmp_path, **kwargs)
    interrupt_main_step(monkeypatch, None)
    for key, value in model.state_dict().items():  # its weights, BatchNorm statistics and adversaries
        assert torch.equal(value, interrupted.state_dict()[key]), key
    assert D.train_disentangle(interrupted, train, out_dir=tmp_path, resume=True, **kwargs) == expected
    for key, value in straight.state_dict().items():
        assert torch.equal(value, interrupted.state_dict()[key]), key


def test_a_run_resumed_with_a_val_loader_it_did_not_have_keeps_its_epochs_in_line(tiny_loaders, tmp_path,
                                                                                   monkeypatch):
    """Validation added on resume: epoch 2's score sat at index 0, where plots draw epoch 1. Every key of
    the history has one entry per epoch, NaN where nothing was measured; dropped again, the same."""
    train, val = tiny_loaders  # 4 steps per epoch
    kwargs = dict(epochs=3, adv_steps=1, device="cpu", progress=False, out_dir=tmp_path)
    interrupt_main_step(monkeypatch, 6)  # epoch 2, step 2
    with pytest.raises(KeyboardInterrupt):
        D.train_disentangle(tiny_model(), train, **kwargs)  # no validation in epoch 1
    interrupt_main_step(monkeypatch, None)
    history = D.train_disentangle(tiny_model(), train, val, resume=True, **kwargs)
    assert {len(values) for values in history.values()} == {3}
    assert math.isnan(history["val_acc_a"][0]) and all(0 <= v <= 1 for v in history["val_acc_a"][1:])
    (tmp_path / "last.pt").unlink(), (tmp_path / "final.pt").unlink()  # a new run in the same folder
    interrupt_main_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        D.train_disentangle(tiny_model(), train, val, **kwargs)
    interrupt_main_step(monkeypatch, None)
    history = D.train_disentangle(tiny_model(), train, resume=True, **kwargs)  # validation dropped
    assert {len(values) for values in history.values()} == {3}
    assert not math.isnan(history["val_acc_a"][0]) and all(math.isnan(v) for v in history["val_acc_a"][1:])


def test_a_second_game_into_an_out_dir_in_use_is_refused_before_training(tiny_loaders, tmp_path, monkeypatch,
                                                                         held_by_another_run):
    pid = held_by_another_run(tmp_path)
    monkeypatch.setattr(D, "main_step", lambda *args, **kwargs: pytest.fail("trained in a folder in use"))
    with pytest.raises(ValueError, match=re.escape(f"another run is writing to out_dir {tmp_path} (process {pid} ")):
        D.train_disentangle(tiny_model(), tiny_loaders[0], out_dir=tmp_path, epochs=1, device="cpu", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_checkpointed_run_is_not_overwritten_or_resumed_with_other_options(tiny_loaders, tmp_path):
    train, _ = tiny_loaders
    kwargs = dict(epochs=1, adv_steps=2, device="cpu", progress=False)
    D.train_disentangle(tiny_model(), train, out_dir=tmp_path, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "last.pt"]  # its lock released
    with pytest.raises(ValueError, match=r"already holds a run \(last.pt, epoch 1 of 1\)") as caught:
        D.train_disentangle(tiny_model(), train, out_dir=tmp_path, **kwargs)
    assert "CLI" not in str(caught.value)  # train_disentangle has no command line
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        D.train_disentangle(tiny_model(), train, resume=True, **kwargs)
    with pytest.raises(ValueError, match=r"other options \(w_adv: 3.0 then, 1.0 now\)"):
        D.train_disentangle(tiny_model(), train, out_dir=tmp_path, resume=True, **kwargs, w_adv=1.0)
    # the weights cannot tell another dropout: it resumed silently
    with pytest.raises(ValueError, match=r"other options \(weightless_layers: .* then, .*'Dropout\(p=0.5"):
        D.train_disentangle(tiny_model(dropout=0.5), train, out_dir=tmp_path, resume=True, **kwargs)


def test_final_pt_holds_the_model_returned_with_its_batchnorm_recalibrated(tiny_loaders, tmp_path):
    """last.pt is written before the final recalibration: loaded for use, its statistics were the lagging ones
    (a smoke DisentangleNet scored 0.00 on the unseen split from last.pt against the 0.52 recorded)."""
    from mtlearn.checkpoint import load_checkpoint

    train, test = tiny_loaders
    kwargs = dict(epochs=1, adv_steps=2, device="cpu", progress=False)
    trained = tiny_model()
    D.train_disentangle(trained, train, out_dir=tmp_path, **kwargs)
    expected = D.evaluate_disentangle(trained, test, device="cpu")
    loaded = tiny_model()
    assert load_checkpoint(tmp_path / "final.pt", loaded)["recalibrated_bn"] is True
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.state_dict().items())
    assert D.evaluate_disentangle(loaded, test, device="cpu") == expected
    stale = load_checkpoint(tmp_path / "last.pt")["model"]
    assert not all(torch.equal(v, stale[k]) for k, v in trained.state_dict().items() if "running_" in k)
    assert load_checkpoint(tmp_path / "final.pt")["epoch"] == 1
    (tmp_path / "final.pt").unlink()  # a finished run resumed: nothing trains, and final.pt is written again
    again = tiny_model()
    D.train_disentangle(again, train, out_dir=tmp_path, resume=True, **kwargs)
    written = load_checkpoint(tmp_path / "final.pt")["model"]
    assert all(torch.equal(v, written[k]) for k, v in again.state_dict().items())
    (tmp_path / "last.pt").unlink()  # a new run would overwrite final.pt: refused, as fit's best.pt is
    with pytest.raises(ValueError, match=r"already holds final\.pt of an earlier run \(without its last\.pt\)"):
        D.train_disentangle(tiny_model(), train, out_dir=tmp_path, **kwargs)


def test_final_pt_says_whether_its_batchnorm_was_recalibrated(tiny_loaders, tmp_path):
    from mtlearn.checkpoint import load_checkpoint

    D.train_disentangle(tiny_model(), tiny_loaders[0], epochs=1, adv_steps=1, device="cpu", progress=False,
                        out_dir=tmp_path, recalibrate_bn=False)
    assert load_checkpoint(tmp_path / "final.pt")["recalibrated_bn"] is False


def test_a_nan_loss_names_the_last_checkpoint(shapes_batch, tmp_path):
    from mtlearn.engine import NonFiniteLossError, load_checkpoint

    keys = ("image", "shape", "background")
    good = {k: shapes_batch[k][:16] for k in keys}
    bad = {k: shapes_batch[k][16:32].clone() for k in keys}
    bad["image"][0, 0, 0, 0] = float("nan")

    class GoodThenBad:  # one batch per epoch: a good one, then one holding a NaN
        epoch = 0

        def __len__(self):
            return 1

        def __iter__(self):
            self.epoch += 1
            return iter([good if self.epoch == 1 else bad])

    with pytest.raises(NonFiniteLossError, match=rf"epoch 2, step 1; the last good checkpoint is {tmp_path}/last.pt"):
        D.train_disentangle(tiny_model(), GoodThenBad(), epochs=2, adv_steps=2, device="cpu", progress=False,
                            out_dir=tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1  # epoch 1, kept


@pytest.mark.parametrize("epoch, blown", [(2, "weight"), (1, "weight"), (2, "leakage"), (2, "buffer")])
def test_weights_that_blow_up_stop_before_last_pt_is_overwritten(shapes_batch, tmp_path, monkeypatch, epoch, blown):
    """Every loss finite, but the epoch's last update overflowed: last.pt was written with inf weights, and
    named as the last good checkpoint when the next epoch's loss turned NaN (as fit's check does)."""
    from mtlearn.engine import NonFiniteWeightsError, load_checkpoint

    keys = ("image", "shape", "background")
    batches = [{k: shapes_batch[k][i * 16:(i + 1) * 16] for k in keys} for i in range(2)]  # two per epoch
    torch.manual_seed(0)
    model = tiny_model()
    start = copy.deepcopy(model.state_dict())
    calls, main_step, leakage_call = [], D.main_step, D.LinearLeakage.__call__

    def overflowing_step(*args, **kwargs):
        record = main_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2 * epoch and blown == "weight":
            with torch.no_grad():
                model.encoder_a.stem.weight.fill_(float("inf"))
        if len(calls) == 2 * epoch and blown == "buffer":  # BatchNorm's statistics are saved too: checked as well
            model.encoder_a.units[0].main[0].running_var.fill_(float("inf"))
        return record

    def overflowing_leakage(self, *args):
        value = leakage_call(self, *args)
        if len(calls) == 2 * epoch - 1 and blown == "leakage":  # within the epoch's last main step
            self.covariance = torch.full_like(self.covariance, float("nan"))
        return value

    monkeypatch.setattr(D, "main_step", overflowing_step)
    monkeypatch.setattr(D.LinearLeakage, "__call__", overflowing_leakage)
    with pytest.raises(NonFiniteWeightsError) as caught:
        D.train_disentangle(model, batches, epochs=3, adv_steps=1, w_leak=1.0, device="cpu", progress=False,
                            out_dir=tmp_path, recalibrate_bn=False)
    error = caught.value
    assert error.epoch == epoch and "lr or adv_lr too high" in str(error) and "grad_clip" not in str(error)
    assert error.names == {"weight": ["encoder_a.stem.weight"], "buffer": ["encoder_a.units.0.main.0.running_var"],
                           "leakage": ["leak_a.covariance", "leak_b.covariance"]}[blown]
    if epoch == 1:  # nothing saved yet: none named, and the model is given its starting state back
        assert not (tmp_path / "last.pt").exists() and "checkpoint" not in str(error)
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
        return
    assert f"the last good checkpoint is {tmp_path / 'last.pt'}" in str(error)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_an_infinite_loss_stops_the_step_as_a_nan_one_does(value):
    """An overflowing loss is inf (not NaN) until the backward pass spreads it: it is caught as it is."""
    D._stop_if_not_finite(loss_a=torch.tensor(1.0))
    with pytest.raises(D.LossNotFiniteError, match=f"the loss_b loss is {value}"):
        D._stop_if_not_finite(loss_a=torch.tensor(1.0), loss_b=torch.tensor(value))


def test_each_step_refuses_a_nan_loss_before_its_optimiser_step(shapes_batch):
    x, y_a, y_b = shapes_batch["image"][:16], shapes_batch["shape"][:16], shapes_batch["background"][:16]
    model = tiny_model()
    features_a, features_b = model.encode(x)
    features_a = features_a.detach().clone()
    features_a[0] = float("inf")
    adv_optimizer = torch.optim.SGD(model.adversary_parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(D.LossNotFiniteError, match="adv_loss_b"):  # adv_b reads f_a
        D.adversary_step(model, adv_optimizer, features_a, features_b.detach(), y_a, y_b)
    optimizer = torch.optim.Adam(model.main_parameters())
    with pytest.raises(D.LossNotFiniteError, match="loss_a"):
        D.main_step(model, optimizer, features_a.requires_grad_(), features_b, y_a, y_b, w_adv=1.0,
                    target_a=torch.full((16, 2), 0.5), target_b=torch.full((16, 2), 0.5))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) or "running" in key or "num_batches" in key, key
    assert all(p.requires_grad for p in model.adversary_parameters())  # unfrozen again after the error


@pytest.mark.parametrize(
    "kwargs, match",
    [({"adv_loss": "wasserstein"}, "adv_loss"), ({"adv_target": "half"}, "adv_target"),
     ({"epochs": 0}, "epochs"), ({"adv_steps": 0}, "adv_steps"),
     ({"w_adv": -1.0}, "w_adv must be a finite number >= 0"),
     # these reached torch's SGD ("Invalid learning rate: -1", not naming adv_lr) or gave NaN losses
     ({"adv_lr": -1}, "adv_lr must be a finite number > 0"), ({"weight_decay": -1}, "weight_decay must be a finite"),
     ({"adv_momentum": 5}, r"adv_momentum must be a number in \[0, 1\)"),
     ({"leak_shrink": -1.0}, "leak_shrink must be a finite number > 0"),  # failed only with w_leak > 0, later
     ({"task_keys": "shape"}, r"task_keys must be two different label names, .*got 'shape'"),  # "too many values"
     ({"task_keys": ("shape", "shape")}, "task_keys must be two different label names"),
     # these gave TypeError / KeyError: 0 (a set has no first key)
     ({"task_keys": None}, "task_keys must be two different"), ({"task_keys": {"shape", "background"}}, "got {"),
     ({"task_keys": {"shape": 0, "background": 1}}, "task_keys must be two different label names")],
)
def test_train_disentangle_bad_arguments(kwargs, match, tiny_loaders):
    with pytest.raises(ValueError, match=match):
        D.train_disentangle(tiny_model(), tiny_loaders[0], device="cpu", progress=False, **kwargs)


def _train(model, train_loader, val_loader=None, **kwargs):
    return D.train_disentangle(model, train_loader, val_loader, epochs=1, adv_steps=1, device="cpu", progress=False,
                               **kwargs)


@pytest.fixture(scope="module")
def square_loader():  # 32 x 32: a size mtlearn.build_model's networks accept
    return DataLoader(Subset(ShapesBackground("test", (32, 32)), range(8)), batch_size=4)


@pytest.mark.parametrize("call, error, match", [
    # these ended in a bare KeyError, "'int' object has no attribute 'to'", "... has no attribute 'encode'" or {}
    (lambda train, square: _train(tiny_model(), train, task_keys=("shape", "colour")), ValueError,
     r"task_keys \('shape', 'colour'\): the batches have no 'colour'; they hold \['background', 'id', 'image'"),
    (lambda train, square: D.evaluate_disentangle(tiny_model(), train, task_keys=("shape", "bg"), device="cpu"),
     ValueError, r"no 'bg'; they hold \[.*'shape'\], pass two of these as task_keys"),
    (lambda train, square: _train(tiny_model(), train.dataset), TypeError,
     r"train_loader is a Dataset \(Subset\), not a DataLoader; wrap it: torch.utils.data.DataLoader\(dataset"),
    (lambda train, square: _train(tiny_model(), train, train.dataset), TypeError, "val_loader is a Dataset"),
    (lambda train, square: D.evaluate_disentangle(tiny_model(), train.dataset, device="cpu"), TypeError,
     "loader is a Dataset"),
    (lambda train, square: _train(tiny_model(), DataLoader(Subset(train.dataset, range(3)), batch_size=4,
                                                           drop_last=True)),
     ValueError, "train_loader yields no batches; check the dataset size and batch_size/drop_last"),
    (lambda train, square: _train(tiny_model(), train, DataLoader(Subset(train.dataset, range(3)), batch_size=4,
                                                                  drop_last=True)),
     ValueError, "val_loader yields no batches"),  # was: after the first epoch's training
    (lambda train, square: _train(tiny_model(), [train.dataset[i] for i in range(4)]), TypeError,
     r"batch\['shape'\] is not a tensor \(got int\).*single items.*DataLoader"),
    (lambda train, square: _train(mtlearn.build_model("tiny"), train), TypeError,
     r"model must be one of MODELS .*got a MultiTaskUNet; build one with mtlearn.disentangle.build_model"),
    (lambda train, square: D.evaluate_disentangle(mtlearn.build_model("tiny", image_size=32), square, device="cpu"),
     TypeError, r"model must be one of MODELS .*got a MultiTaskUNet"),
    # a compiled DisentangleNet was told to build one with build_model
    (lambda train, square: _train(torch.compile(tiny_model()), train), TypeError,
     r"got a DisentangleNet inside a wrapper \(OptimizedModule, torch.compile's or DistributedDataParallel's\); "
     r"pass the model itself: model._orig_mod"),
    (lambda train, square: _train(torch.nn.DataParallel(tiny_model()), train), TypeError,
     r"got a DisentangleNet inside a wrapper \(DataParallel, .*model.module for DDP"),
    # refused before it runs: this was torch's "mat1 and mat2 shapes cannot be multiplied"
    (lambda train, square: D.evaluate_disentangle(torch.nn.Linear(3, 3), train, device="cpu"), TypeError,
     r"model must be one of MODELS .*\(DisentangleNet, SharedEncoderNet, TwoEncoderNet\), got a Linear; build one"),
])
def test_train_and_evaluate_refuse_bad_input(call, error, match, tiny_loaders, square_loader):
    with pytest.raises(error, match=match):
        call(tiny_loaders[0], square_loader)


@pytest.mark.parametrize("call", [
    lambda: D.build_model("shared", config="course"),
    lambda: D.shapes_experiment("disentangle", "smoke", device="cpu", progress=False),
    lambda: D.ultrasound_experiment("shared", "smoke", device="cpu", progress=False),
])
def test_a_profile_name_is_not_a_config(call):
    # this failed with "'str' object has no attribute 'model_kwargs'" (or 'image_size')
    with pytest.raises(TypeError, match=r"config must be a DisentangleConfig or None .*; pass disentangle_config\('"):
        call()


def test_recalibrate_batchnorm_matches_the_data(tiny_loaders):
    model = tiny_model("shared")
    bn = model.encoder.units[0].main[0]  # the first BN, on the stem's output
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    D.recalibrate_batchnorm(model, tiny_loaders[0], device="cpu")
    with torch.no_grad():
        stem_out = torch.cat([model.encoder.stem(b["image"]) for b in tiny_loaders[0]])
    assert torch.allclose(bn.running_mean, stem_out.mean(dim=(0, 2, 3)), atol=1e-4)


def test_recalibrate_batchnorm_gives_every_part_its_own_mode_back(tiny_loaders):
    """torch's update_bn put every submodule in the model's mode: a frozen (eval) encoder came out in
    training mode and went on updating its statistics."""
    model = tiny_model("disentangle").train()
    model.encoder_b.eval()  # frozen by the user
    D.recalibrate_batchnorm(model, tiny_loaders[0], device="cpu")
    assert model.training and model.encoder_a.training and not model.encoder_b.training
    assert not any(m.training for m in model.encoder_b.modules())
    model.eval()
    D.recalibrate_batchnorm(model, tiny_loaders[0], device="cpu")
    assert not any(m.training for m in model.modules())


def test_recalibrate_batchnorm_refuses_an_empty_loader_and_keeps_the_statistics(tiny_loaders):
    """update_bn reset every running mean to 0 and variance to 1, then saw no batch: no error, wrong BN."""
    model = tiny_model("shared")
    D.recalibrate_batchnorm(model, tiny_loaders[0], device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    empty = DataLoader(Subset(tiny_loaders[0].dataset, range(3)), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match=r"the loader yielded no batches.*\(they are unchanged\)"):
        D.recalibrate_batchnorm(model, empty, device="cpu")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_recalibrate_batchnorm_that_fails_on_a_one_image_batch_puts_the_model_back(tiny_loaders):
    """A last batch of one image failed inside update_bn with advice that could not help ("call model.eval()"),
    leaving every BatchNorm with momentum None and half-recomputed statistics."""
    model = tiny_model("shared")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    odd = DataLoader(Subset(tiny_loaders[0].dataset, range(17)), batch_size=4)  # 4 x 4 + 1
    with pytest.raises(ValueError, match=r"batch 5 holds one image, from which the classifiers' BatchNorm cannot "
                                         r"take statistics; pass a DataLoader with drop_last=True"):
        D.recalibrate_batchnorm(model, odd, device="cpu")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    encoders = torch.nn.Sequential(model.encoder)  # BatchNorm2d only: one image still has values per channel
    D.recalibrate_batchnorm(encoders, odd, device="cpu")  # as torch's update_bn takes it


def test_recalibrate_batchnorm_of_a_model_without_batchnorm_says_so(tiny_loaders):
    """It said "the loader yielded no batches; check the dataset is not empty" (update_bn returns at once)."""
    with pytest.warns(UserWarning, match=r"Linear has no BatchNorm layer: nothing to recalibrate"):
        D.recalibrate_batchnorm(torch.nn.Linear(2, 2), tiny_loaders[0], device="cpu")


def test_one_shot_iterators_are_refused_where_a_loader_is_read_every_epoch(tiny_loaders):
    """iter(loader) trained epoch 1 only (acc_a [0.36, nan, nan]) without a word; a generator failed on len()."""
    train = tiny_loaders[0]
    for one_shot in (iter(train), (batch for batch in train)):
        with pytest.raises(TypeError, match=r"train_loader is a one-shot iterator \(\w+\), empty after its first "
                                             r"pass, and it is read every epoch; pass the DataLoader itself"):
            _train(tiny_model(), one_shot)
    # read once: an iterator does
    assert set(D.evaluate_disentangle(tiny_model(), iter(tiny_loaders[1]), device="cpu")) >= {"acc_a", "acc_b"}


def test_string_labels_are_named_as_such():
    """Class names through a DataLoader are a list of strings: training said "the loader yields single items, not
    batches; wrap the data in a DataLoader" (it was one), the probes "too many dimensions 'str'"."""
    (batch,) = _batches([(0, 1), (1, 0)])
    named = [{**batch, "shape": ["circle", "bar", "circle", "bar"]}]
    with pytest.raises(TypeError, match=r"batch\['shape'\] holds strings \(e.g. 'circle'\), not class indices"):
        _train(tiny_model(), named)
    features, labels = mtlearn.probes.extract_features(lambda x: x.flatten(1), named, "cpu", ("shape",))
    assert labels["shape"].tolist() == ["circle", "bar", "circle", "bar"] and features.shape == (4, 32 * 40)


def test_extract_features_names_batches_that_are_not_dicts_with_an_image():
    images = torch.rand(4, 1, 8, 8)
    for batch, got in [([images, torch.zeros(4)], "a list"), ({"img": images}, r"keys \['img'\]")]:
        with pytest.raises(TypeError, match=rf"every batch must be a dict with an 'image' tensor and the labels, got "
                                            rf"{got}"):  # KeyError: 'image', or "list indices must be integers"
            mtlearn.probes.extract_features(lambda x: x.flatten(1), [batch], "cpu")


def test_evaluate_disentangle_refuses_nan_logits(tiny_loaders):
    """argmax of NaN logits is class 0: a diverged model scored near chance (or 1.0 on class-0 labels)."""
    model = tiny_model()
    with torch.no_grad():
        model.head_a.net[-1].weight.fill_(float("nan"))  # the last layer of head A
    with pytest.raises(ValueError, match=r"the model's logits_a hold NaN or inf; check its weights"):
        D.evaluate_disentangle(model, tiny_loaders[1], device="cpu")


def test_evaluate_disentangle_keys_and_range(tiny_loaders):
    model = tiny_model()
    scores = D.evaluate_disentangle(model, tiny_loaders[1], device="cpu")
    assert set(scores) == {"acc_a", "acc_b", "adv_acc_a", "adv_acc_b"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert set(D.evaluate_disentangle(tiny_model("two_encoder"), tiny_loaders[1], device="cpu")) == {"acc_a", "acc_b"}


def test_evaluate_disentangle_leaves_a_frozen_encoder_frozen(tiny_loaders):
    model = tiny_model()
    model.encoder_b.eval()  # frozen by the user (its BatchNorm statistics fixed)
    D.evaluate_disentangle(model, tiny_loaders[1], device="cpu")
    assert model.training and not any(m.training for m in model.encoder_b.modules())


def test_evaluate_disentangle_and_false_malignant_move_the_model_back(tiny_loaders):
    """Both run the model on their device, then give it back its own (on this CPU-only machine the recorded
    moves are what a GPU run would see: there, then back)."""
    model, moves = tiny_model(), []
    to = model.to
    model.to = lambda device: moves.append(torch.device(device)) or to(device)
    D.evaluate_disentangle(model, tiny_loaders[1], device="cpu")
    assert moves == [torch.device("cpu")] * 2
    moves.clear()
    D._false_malignant(model, [_ultrasound_item(0, 1, predicted=2)], "cpu")
    assert moves == [torch.device("cpu")] * 2


class AlwaysCircleOnWhite(torch.nn.Module):
    """A stub whose every answer is known: shape "circle" (0), background "white" (1), for every image."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        pooled = x.mean(dim=(2, 3), keepdim=True) * self.scale  # (B, 1, 1, 1)
        return pooled.expand(-1, 4, 2, 2), pooled.expand(-1, 4, 2, 2)

    def forward(self, x):
        logits = torch.tensor([[5.0, -5.0]]).expand(len(x), 2)
        return {"logits_a": logits, "logits_b": logits.flip(1)}


class EncodesButReturnsATensor(AlwaysCircleOnWhite):
    """Passes evaluate_disentangle's check before the forward pass (it has encode()), but returns no dict."""

    def forward(self, x):
        return super().forward(x)["logits_a"]


def test_evaluate_disentangle_refuses_a_model_that_returns_no_task_logits(tiny_loaders):
    with pytest.raises(TypeError, match=r"model must be one of MODELS .*got a EncodesButReturnsATensor"):
        D.evaluate_disentangle(EncodesButReturnsATensor(), tiny_loaders[1], device="cpu")


def test_evaluate_disentangle_scores_exactly_what_a_model_predicts():
    test = DataLoader(ShapesBackground("test", (32, 40)), batch_size=64)  # 100 per seen combination
    unseen = DataLoader(ShapesBackground("unseen", (32, 40)), batch_size=64)  # 100 circles on black
    assert D.evaluate_disentangle(AlwaysCircleOnWhite(), test, device="cpu") == pytest.approx(
        {"acc_a": 1 / 3, "acc_b": 2 / 3})  # circles right, bars wrong; white right, black wrong
    assert D.evaluate_disentangle(AlwaysCircleOnWhite(), unseen, device="cpu") == {"acc_a": 1.0, "acc_b": 0.0}


def test_shapes_experiment_scores_the_unseen_split(monkeypatch):
    monkeypatch.setattr(D, "build_model", lambda kind, config: AlwaysCircleOnWhite())
    monkeypatch.setattr(D, "train_disentangle", lambda model, loader, **kwargs: {})
    _, _, metrics = D.shapes_experiment("shared", D.disentangle_config("smoke"), device="cpu", progress=False)
    assert metrics["unseen_shape_acc"] == 1.0 and metrics["seen_shape_acc"] == pytest.approx(1 / 3)
    assert metrics["seen_background_acc"] == pytest.approx(2 / 3)


def test_presets_and_config_helpers():
    assert set(D.PRESETS) == {"smoke", "course", "paper"}
    paper = D.PRESETS["paper"]
    paper_values = (paper.lr, paper.w_adv, paper.adv_loss, paper.adv_steps, paper.image_size)
    assert paper_values == (1e-5, 0.01, "negative_ce", 3, (224, 288))
    # the paper preset's own choices (not published) are named, by fields it has
    assert set(D.PAPER_NOTES) == {"adv_hidden", "adv_lr", "adv_target"}
    assert all(hasattr(paper, name) for name in D.PAPER_NOTES)
    config = D.disentangle_config("smoke", epochs=3)
    assert config.epochs == 3 and D.PRESETS["smoke"].epochs == 1
    # every field train_disentangle takes is passed on (a field left out would train with the default silently)
    from dataclasses import fields

    taken = {f.name for f in fields(D.DisentangleConfig)} & set(D.train_disentangle.__kwdefaults__)
    assert set(config.train_kwargs()) == taken
    assert D.disentangle_config("paper").train_kwargs()["adv_loss"] == "negative_ce"
    course = D.PRESETS["course"].train_kwargs()
    assert {k: D.train_disentangle.__kwdefaults__[k] for k in course} == course  # defaults = course preset
    model = D.build_model("disentangle", config)
    assert isinstance(model, D.DisentangleNet) and model.adv_b.net[-1].in_features == config.widths[-1]


def test_the_config_builds_the_adversaries_it_names():
    spatial = D.build_model("disentangle", D.disentangle_config("smoke", adv_readout="spatial"))
    width = D.PRESETS["smoke"].widths[-1]
    assert spatial.adv_a.net[-1].in_features == width * 4 * 4  # a 4 x 4 grid of the last stage
    assert spatial.head_a.net[0].in_features == width  # the task heads keep their pooled readout


@pytest.mark.parametrize("profile, thousands", [("smoke", 11), ("course", 187), ("paper", 222)])
def test_preset_parameter_counts_are_the_ones_their_comments_give(profile, thousands):
    assert round(mtlearn.count_parameters(D.build_model("disentangle", D.PRESETS[profile])) / 1000) == thousands


def test_shapes_experiment_smoke(tmp_path):
    config = D.disentangle_config("smoke")
    model, history, metrics = D.shapes_experiment("disentangle", config, seed=0, device="cpu", progress=False,
                                                  out_dir=tmp_path)
    assert isinstance(model, D.DisentangleNet) and len(history["acc_a"]) == config.epochs
    for key in ("seen_shape_acc", "seen_background_acc", "unseen_shape_acc", "probe_background_a", "probe_shape_a",
                "probe_background_b", "probe_shape_b", "adv_acc_a", "adv_acc_b", "probe_background_a_circle",
                "probe_background_a_bar"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # the finished run's checkpoint: resuming it trains nothing and measures the same model
    _, again, remeasured = D.shapes_experiment("disentangle", config, seed=0, device="cpu", progress=False,
                                               out_dir=tmp_path, resume=True)
    assert again == history
    assert {k: v for k, v in remeasured.items() if k != "train_seconds"} == \
        {k: v for k, v in metrics.items() if k != "train_seconds"}
    test = D.evaluate_disentangle(model, D.shapes_loaders(config)["test"], device="cpu")  # the test split's
    assert (metrics["adv_acc_a"], metrics["adv_acc_b"]) == (test["adv_acc_a"], test["adv_acc_b"])


def test_the_shapes_data_are_the_same_for_every_seed():
    """The seed varies the starting weights and the batch order, not the images: a spread over seeds is
    the method's, on one benchmark."""
    config = D.disentangle_config("smoke")
    loaders = [D.shapes_loaders(config, seed) for seed in (0, 1)]
    for split in ("train", "val", "test", "unseen"):
        assert torch.equal(loaders[0][split].dataset[0]["image"], loaders[1][split].dataset[0]["image"]), split
    first_batches = [next(iter(split["train"]))["shape"] for split in loaders]
    assert not torch.equal(*first_batches)  # the batch order does follow the seed


def _coded_items(per_combination: int = 50, seed: int = 0) -> list[dict]:
    """Items whose image spells out its labels: pixel 0 = shape, pixel 1 = background, 6 noise pixels.

    Every (shape, background) combination appears `per_combination` times, so the two labels are
    independent and a probe can read one only where a stub puts it.
    """
    generator = torch.Generator().manual_seed(seed)
    items = []
    for shape in (0, 1):
        for background in (0, 1):
            for _ in range(per_combination):
                image = torch.randn(1, 1, 8, generator=generator)
                image[..., 0], image[..., 1] = shape, background
                items.append({"image": image, "shape": shape, "background": background})
    return items


class CodedEncoders(torch.nn.Module):
    """A stub whose two feature sides carry exactly what `side_a` / `side_b` compute from the labels.

    side_*(shape, background) -> (B,) signal, appended as one channel to 3 noise channels (its own
    noise pixels per side): (B, 4, 1, 1) features.
    """

    def __init__(self, side_a, side_b):
        super().__init__()
        self.side_a, self.side_b = side_a, side_b

    def encode(self, x):
        shape, background = x[:, 0, 0, 0], x[:, 0, 0, 1]
        features_a = torch.cat([x[:, 0, :, 2:5], self.side_a(shape, background)[:, None, None]], dim=2)
        features_b = torch.cat([x[:, 0, :, 5:8], self.side_b(shape, background)[:, None, None]], dim=2)
        return features_a.transpose(1, 2)[..., None], features_b.transpose(1, 2)[..., None]  # (B, 4, 1, 1)


def test_probe_within_groups_reads_each_group_alone():
    """Side a carries the background for circles only: the circle probe reads it, the bar probe cannot.

    A probe over all images (not split by shape) would report about 0.75 for both.
    """
    model = CodedEncoders(side_a=lambda shape, background: background * (shape == 0),
                          side_b=lambda shape, background: background)  # side b: the wrong side reads both
    loader = DataLoader(_coded_items(), batch_size=50)
    scores = D.probe_within_groups(model, loader, "background", "shape", ShapesBackground.class_names, device="cpu")
    assert set(scores) == {"probe_background_a_circle", "probe_background_a_bar"}
    assert scores["probe_background_a_circle"] > 0.95
    assert scores["probe_background_a_bar"] < 0.7  # noise only: chance is 0.5
    assert model.training  # the mode is restored


def test_probe_within_groups_is_nan_where_a_group_cannot_be_cross_validated():
    """Circles on black only 4 times: too few for 5 folds, so NaN rather than a score from empty folds."""
    items = [it for it in _coded_items() if not (it["shape"] == 0 and it["background"] == 1)]
    items += [it for it in _coded_items(seed=1) if it["shape"] == 0 and it["background"] == 1][:4]
    model = CodedEncoders(side_a=lambda shape, background: background, side_b=lambda shape, background: shape)
    scores = D.probe_within_groups(model, DataLoader(items, batch_size=50), "background", "shape", ("circle", "bar"),
                                   device="cpu")
    assert math.isnan(scores["probe_background_a_circle"])
    assert scores["probe_background_a_bar"] > 0.95
    only_white = [it for it in items if it["background"] == 0]  # one target value: nothing to tell apart
    scores = D.probe_within_groups(model, DataLoader(only_white, batch_size=50), "background", "shape",
                                   ("circle", "bar"), device="cpu")
    assert all(math.isnan(v) for v in scores.values())


def test_probe_within_groups_reports_an_error_that_is_not_about_too_few_patients(monkeypatch):
    """Only folds that cannot hold every value mean NaN; any other ValueError (NaN features, a bug) was
    turned into NaN too, and the table looked like a small group's."""
    import mtlearn.probes as P

    model = CodedEncoders(side_a=lambda shape, background: background, side_b=lambda shape, background: shape)
    loader = DataLoader(_coded_items(), batch_size=50)

    def uneven(*args, **kwargs):
        raise P.UnevenFoldsError("test fold 1 of 5 holds no item of class 1")

    monkeypatch.setattr(P, "cross_validated_probe", uneven)
    scores = D.probe_within_groups(model, loader, "background", "shape", ("circle", "bar"), device="cpu")
    assert all(math.isnan(v) for v in scores.values())

    def broken(*args, **kwargs):
        raise ValueError("Input X contains NaN.")

    monkeypatch.setattr(P, "cross_validated_probe", broken)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        D.probe_within_groups(model, loader, "background", "shape", ("circle", "bar"), device="cpu")


def test_the_probes_refuse_a_shuffling_loader():
    """Their folds follow the items' order: a shuffled loader moved probe_shape_a from 0.894 to 0.861 or 0.872, and
    the patients, given in the loader's order, no longer matched the images."""
    model = CodedEncoders(side_a=lambda shape, background: background, side_b=lambda shape, background: shape)
    items = _coded_items()
    data = torch.utils.data
    samplers = [data.RandomSampler(items), data.SubsetRandomSampler(range(len(items))),
                data.WeightedRandomSampler([1.0] * len(items), len(items)),
                data.DistributedSampler(items, num_replicas=1, rank=0)]  # shuffles by default
    loaders = [DataLoader(items, batch_size=50, shuffle=True)]
    loaders += [DataLoader(items, batch_size=50, sampler=sampler) for sampler in samplers]
    loaders.append(DataLoader(items, batch_sampler=data.BatchSampler(data.RandomSampler(items), 50, False)))
    for shuffled in loaders:
        for call in (lambda: D.probe_encoders(model, shuffled, ("shape",), device="cpu"),
                     lambda: D.probe_within_groups(model, shuffled, "background", "shape", ("circle", "bar"),
                                                   device="cpu")):
            with pytest.raises(ValueError, match=r"loader shuffles \(shuffle=True, or a random sampler\), so the "
                                                 r"probes would depend on the order it happened to draw"):
                call()
    ordered = data.DistributedSampler(items, num_replicas=1, rank=0, shuffle=False)
    assert D.probe_encoders(model, DataLoader(items, batch_size=50, sampler=ordered), ("shape",), device="cpu")


def test_probe_within_groups_refuses_too_few_folds_or_names():
    """folds=0 gave NaN for every group, as if each were too small; one name for two groups left one out."""
    model = CodedEncoders(side_a=lambda shape, background: background, side_b=lambda shape, background: shape)
    loader = DataLoader(_coded_items(), batch_size=50)
    with pytest.raises(ValueError, match="folds must be an integer >= 2, got 0"):
        D.probe_within_groups(model, loader, "background", "shape", ("circle", "bar"), folds=0, device="cpu")
    with pytest.raises(ValueError, match=r"'shape' takes the values \[0, 1\], but group_names \['circle'\] name 0..0"):
        D.probe_within_groups(model, loader, "background", "shape", ["circle"], device="cpu")
    for names in ("circle", {0: "circle", 1: "bar"}):  # a dict's keys were the names: probe_background_a_0
        with pytest.raises(ValueError, match="group_names must name each value of 'shape'"):
            D.probe_within_groups(model, loader, "background", "shape", names, device="cpu")
    with pytest.raises(ValueError, match=r"patients has 3 entries but the loader gives \d+ images"):
        D.probe_within_groups(model, loader, "background", "shape", ("circle", "bar"), device="cpu",
                              patients=np.array(["p1", "p2", "p3"]))  # NumPy's "boolean index did not match"
    for probe in (lambda m: D.probe_within_groups(m, loader, "background", "shape", ("circle", "bar"), device="cpu"),
                  lambda m: D.probe_encoders(m, loader, ("shape", "background"), device="cpu")):
        with pytest.raises(TypeError, match=r"model must be one of MODELS .*got a Conv2d"):  # no attribute 'encode'
            probe(torch.nn.Conv2d(1, 4, 3))


def test_probe_encoders_reads_both_sides():
    """Side a carries the shape only, side b the background only: each key must read its own side."""
    model = CodedEncoders(side_a=lambda shape, background: shape, side_b=lambda shape, background: background)
    loader = DataLoader(_coded_items(), batch_size=50)
    scores = D.probe_encoders(model, loader, ("shape", "background"), device="cpu")
    assert set(scores) == {f"probe_{k}_{s}" for k in ("shape", "background") for s in "ab"}
    assert scores["probe_shape_a"] > 0.95 and scores["probe_background_b"] > 0.95
    assert scores["probe_background_a"] < 0.7 and scores["probe_shape_b"] < 0.7  # noise only: chance is 0.5
    assert model.training  # the mode is restored


def test_probe_encoders_takes_one_label_name_and_says_which_probe_has_too_few_images():
    """"shape" was read letter by letter (KeyError: 's'); too few images advised "pass folds=4", an option
    probe_encoders lacked, without naming the probe."""
    model = CodedEncoders(side_a=lambda shape, background: shape, side_b=lambda shape, background: background)
    loader = DataLoader(_coded_items(), batch_size=50)
    assert set(D.probe_encoders(model, loader, "shape", device="cpu")) == {"probe_shape_a", "probe_shape_b"}
    few = DataLoader(_coded_items(per_combination=2), batch_size=50)  # 4 images of each shape
    with pytest.raises(ValueError, match=r"the probe of 'shape' on the task-A features: class 0 has 4 item\(s\), "
                                         r"fewer than folds=5.*pass folds=4 or fewer"):
        D.probe_encoders(model, few, ("shape",), device="cpu")
    assert D.probe_encoders(model, few, ("shape",), device="cpu", folds=4)["probe_shape_a"] > 0.75  # chance: 0.5
    with pytest.raises(ValueError, match=r"folds must be an integer >= 2, got 1"):
        D.probe_encoders(model, few, ("shape",), device="cpu", folds=1)


def test_samplers_and_loaders_take_numpy_seeds_and_name_a_profile():
    """A sweep's np.int64 seed failed in Generator.manual_seed ("an integer is required")."""
    labels = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    assert list(D.balanced_sampler(*labels, seed=np.int64(3))) == list(D.balanced_sampler(*labels, seed=3))
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got None"):
        D.balanced_sampler(*labels, seed=None)
    config = D.disentangle_config("smoke", image_size=(32, 40))
    assert len(D.shapes_loaders(config, seed=np.int64(1))["train"]) == len(D.shapes_loaders(config, seed=1)["train"])
    with pytest.raises(TypeError, match=r"config must be a DisentangleConfig or None .*disentangle_config\('smoke'\)"):
        D.shapes_loaders("smoke")  # was: 'str' object has no attribute 'image_size'
    with pytest.raises(TypeError, match=r"profile must be a profile name; to change a DisentangleConfig, use "
                                        r"dataclasses.replace"):
        D.disentangle_config(config)  # was: unhashable type: 'DisentangleConfig'


def test_linear_leakage_names_features_or_labels_of_the_wrong_shape():
    leak, labels = D.LinearLeakage(), torch.tensor([0, 1, 0, 1])
    for features, group, target in [(torch.randn(4, 3), labels, labels), (torch.randn(4, 3, 2, 2), labels[:3], labels),
                                    (torch.randn(4, 3, 2, 2), labels, labels[:3])]:
        with pytest.raises(ValueError, match=r"LinearLeakage needs features \(B, C, h, w\) and group, target \(B,\)"):
            leak(features, group, target)  # IndexError: Dimension out of range, or torch's size mismatch


# ---------------------------------------------------------------------------------------------- ultrasound


@pytest.fixture(scope="module")
def ultrasound_data():
    return D.ultrasound_datasets((32, 32), seed=0, num_train=60, num_test=40, train_correlation=0.8)


def test_ultrasound_datasets_make_the_artifact_a_training_only_shortcut(ultrasound_data):
    assert set(ultrasound_data) == {"train", *D.ULTRASOUND_TESTS}
    assert [len(v) for v in ultrasound_data.values()] == [60, 40, 40, 40]
    assert set(ultrasound_data["train"][0]) == {"image", "label", "artifact", "artifact_mask"}
    assert all(bool(it["artifact_mask"].any()) == bool(it["artifact"]) for it in ultrasound_data["independent"])
    assert ultrasound_data["train"][0]["image"].shape == (1, 32, 32)

    def pairs(split):
        return [(it["label"], it["artifact"]) for it in ultrasound_data[split]]

    for split in ("train", "shortcut"):
        assert all(label == 2 for label, artifact in pairs(split) if artifact)  # artifact => malignant
    assert any(label == 2 and not artifact for label, artifact in pairs("train"))  # but not every malignant one
    assert all(artifact == (label != 2) for label, artifact in pairs("reversed"))
    assert any(label != 2 and artifact for label, artifact in pairs("independent"))
    ids = {split: {float(it["image"].sum()) for it in items} for split, items in ultrasound_data.items()}
    assert not ids["train"] & ids["independent"]  # disjoint items


def test_ultrasound_test_splits_carry_the_artifact_at_their_documented_rates():
    """Per class, over 1,000 images: the shortcut split as in training (80 % of the malignant ones, no other),
    the independent one on half of each class. An artifact-free shortcut split passed the check above
    (nothing to contradict "artifact => malignant"), and so did an independent split still correlated."""
    data = D.ultrasound_datasets((32, 32), seed=0, num_train=4, num_test=1000, train_correlation=0.8)

    def rates(split):  # the artifact's share among malignant images, and among the others
        malignant = np.array([it["label"] == 2 for it in data[split]])
        artifact = np.array([bool(it["artifact"]) for it in data[split]])
        return artifact[malignant].mean(), artifact[~malignant].mean()

    shortcut, independent = rates("shortcut"), rates("independent")
    assert shortcut[0] == pytest.approx(0.8, abs=0.05) and shortcut[1] == 0.0
    assert independent == pytest.approx((0.5, 0.5), abs=0.05)
    assert abs(independent[0] - independent[1]) < 0.06  # unrelated to the class
    assert rates("reversed") == (0.0, 1.0)


@pytest.mark.parametrize("correlation", [0.0, -0.5, 1.5])
def test_ultrasound_datasets_bad_correlation(correlation):
    with pytest.raises(ValueError, match="train_correlation"):
        D.ultrasound_datasets((24, 24), num_train=4, num_test=4, train_correlation=correlation)


@pytest.mark.parametrize("kwargs, match", [
    # these named num_samples, an argument of SyntheticUltrasound the caller never passed
    (dict(num_train=0), r"num_train must be an integer >= 1, got 0"),
    (dict(num_test=0), r"num_test must be an integer >= 1, got 0"),
    (dict(num_train=2.0), r"num_train must be an integer >= 1, got 2.0; pass an int"),
    # this was "'<' not supported between instances of 'float' and 'str'"
    (dict(train_correlation="0.8"), r"train_correlation must be a number in \(0, 1\] .*got '0.8'; pass it unquoted"),
    (dict(train_correlation=float("nan")), r"train_correlation must be a number in \(0, 1\] .*got nan"),
])
def test_ultrasound_datasets_name_each_bad_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.ultrasound_datasets((32, 32), **{"num_train": 4, "num_test": 4, **kwargs})


@pytest.mark.parametrize("kind", ["shared", "disentangle"])
def test_ultrasound_experiment_smoke(kind, ultrasound_data):
    config = D.disentangle_config("smoke", image_size=(32, 32), batch_size=20)
    model, history, metrics = D.ultrasound_experiment(kind, config, seed=0, data=ultrasound_data, device="cpu",
                                                      progress=False)
    assert model.head_a.net[-1].out_features == 3 and not model.training
    expected = {f"{m}_{t}" for m in ("class_acc", "artifact_acc") for t in D.ULTRASOUND_TESTS}
    expected |= {"false_malignant_with_artifact", "train_seconds"}
    expected |= {f"probe_{k}_{s}" for k in ("label", "artifact") for s in "ab"}
    within = {f"probe_artifact_a_{name}" for name in ("normal", "benign", "malignant")}
    if kind == "disentangle":
        expected |= {"adv_acc_a", "adv_acc_b"}
    assert set(metrics) == expected | within
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k not in within | {"train_seconds"})
    for label, name in enumerate(("normal", "benign", "malignant")):  # 40 images: some classes too few for 5 folds
        flags = Counter(it["artifact"] for it in ultrasound_data["independent"] if it["label"] == label)
        score = metrics[f"probe_artifact_a_{name}"]
        assert math.isnan(score) if min(flags[0], flags[1]) < 5 else 0.0 <= score <= 1.0, (name, flags, score)
    if kind == "disentangle":  # the adversaries read where class and artifact are unrelated, not the last split
        independent = D.evaluate_disentangle(model, DataLoader(ultrasound_data["independent"], batch_size=100),
                                             task_keys=("label", "artifact"), device="cpu")
        assert (metrics["adv_acc_a"], metrics["adv_acc_b"]) == (independent["adv_acc_a"], independent["adv_acc_b"])
    with pytest.raises(ValueError, match="reversed"):
        D.ultrasound_experiment(kind, config, data={k: v for k, v in ultrasound_data.items() if k != "reversed"},
                                device="cpu", progress=False)
    # was "train_loader yields no batches; check ... batch_size/drop_last": the caller built no loader
    with pytest.raises(ValueError, match=r"the training set holds 60 images, fewer than one batch \(config.batch_size "
                                         r"61\); build the data with more"):
        D.ultrasound_experiment(kind, replace(config, batch_size=61), data=ultrasound_data, device="cpu",
                                progress=False)


@pytest.mark.parametrize("experiment", ["shapes", "ultrasound"])
def test_experiments_start_from_the_seeds_weights_whatever_ran_before(experiment, ultrasound_data, monkeypatch):
    """train_disentangle seeds the batches only, after the model is built: the starting weights would
    follow whatever drew from torch's generator before (another cell of the notebook)."""
    started = []

    def train(model, loader, **kwargs):  # the weights it would start from; no training
        started.append({k: v.clone() for k, v in model.state_dict().items()})
        return {}

    monkeypatch.setattr(D, "train_disentangle", train)
    config = D.disentangle_config("smoke", image_size=(32, 32), batch_size=20)
    for draws in (0, 1000):
        torch.rand(draws)
        if experiment == "shapes":
            D.shapes_experiment("shared", D.disentangle_config("smoke"), seed=3, device="cpu", progress=False)
        else:
            D.ultrasound_experiment("shared", config, seed=3, data=ultrasound_data, device="cpu", progress=False)
    assert all(torch.equal(value, started[1][key]) for key, value in started[0].items())


def test_ultrasound_experiment_balances_class_and_artifact_together(ultrasound_data, monkeypatch):
    """Balanced by class alone, the artifact-bearing malignant images stay a minority of the malignant draws."""
    given = []
    sampler = D.balanced_sampler

    def recording(*labels, seed):
        given.append(labels)
        return sampler(*labels, seed=seed)

    monkeypatch.setattr(D, "balanced_sampler", recording)
    monkeypatch.setattr(D, "train_disentangle", lambda model, loader, **kwargs: {})
    config = D.disentangle_config("smoke", image_size=(32, 32), batch_size=20)
    assert config.balance
    D.ultrasound_experiment("shared", config, seed=0, data=ultrasound_data, device="cpu", progress=False)
    (labels,) = given
    train = ultrasound_data["train"]
    assert [list(values) for values in labels] == [[it["label"] for it in train], [it["artifact"] for it in train]]


class PredictsFromPixel(torch.nn.Module):
    """A stub class head that predicts the class written in each image's first pixel (0, 1 or 2)."""

    def forward(self, x):
        return {"logits_a": 10.0 * F.one_hot(x[:, 0, 0, 0].long(), 3).float()}


def _ultrasound_item(label: int, artifact: int, predicted: int) -> dict:
    image = torch.zeros(1, 4, 4)
    image[0, 0, 0] = predicted
    return {"image": image, "label": label, "artifact": artifact}


def test_false_malignant_counts_normal_and_benign_images_with_the_artifact():
    items = [
        # normal/benign with the artifact: the only ones counted; 1 of 4 called malignant
        _ultrasound_item(0, 1, predicted=2), _ultrasound_item(0, 1, predicted=0),
        _ultrasound_item(1, 1, predicted=1), _ultrasound_item(1, 1, predicted=0),
        # ignored: malignant ones (with or without the artifact), and those without the artifact
        _ultrasound_item(2, 1, predicted=2), _ultrasound_item(2, 0, predicted=2),
        _ultrasound_item(0, 0, predicted=2), _ultrasound_item(1, 0, predicted=2),
    ]
    model = PredictsFromPixel()
    assert D._false_malignant(model, items, "cpu") == pytest.approx(0.25)
    assert model.training  # the mode is restored
    # no normal/benign image carries the artifact: nothing to measure
    assert np.isnan(D._false_malignant(model, items[4:], "cpu"))


# LinearLeakage: the linear-probe-aware penalty


def _leaky_features(shift: float, seed: int = 0):
    """(40, 6, 2, 2) features whose channel 0 moves with `target` by `shift`, group 0/1 half each."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(40, 6, 2, 2, generator=generator)
    group = torch.arange(40) % 2
    target = (torch.arange(40) // 2) % 2
    features[:, 0] += shift * target.view(-1, 1, 1).float()
    return features, group, target


def test_linear_leakage_grows_with_readable_information_and_its_gradient_removes_it():
    small = D.LinearLeakage()(*_leaky_features(0.0))
    features, group, target = _leaky_features(3.0)
    features.requires_grad_(True)
    leakage = D.LinearLeakage()
    large = leakage(features, group, target)
    assert torch.isfinite(large) and large > 10 * small
    large.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    with torch.no_grad():
        after = leakage(features - 0.1 * features.grad / features.grad.norm(), group, target)
    assert after < large  # a step against the gradient makes the target less readable
    assert leakage.covariance.shape == (6, 6)


def test_linear_leakage_ignores_groups_with_a_single_target_value():
    features, group, _ = _leaky_features(3.0)
    target = group.clone()  # every group holds one target value only, like circles always on white
    assert D.LinearLeakage()(features, group, target).item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"shrink": 0.0}, r"shrink must be a finite number > 0 \(it keeps S \+ shrink I invertible\), got 0\.0"),
    ({"shrink": -1.0}, r"shrink must be a finite number > 0"),
    ({"shrink": float("nan")}, r"shrink must be a finite number > 0 .*got nan"),  # made every penalty NaN
    ({"decay": 1.0}, r"decay must be a number in \[0, 1\) .*got 1\.0"),
    ({"decay": -0.1}, r"decay must be a number in \[0, 1\)"),
    ({"decay": "0.9"}, r"decay must be a number in \[0, 1\) .*got '0\.9'; pass it unquoted"),
])
def test_linear_leakage_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.LinearLeakage(**kwargs)


def test_main_step_adds_the_leakage_term_and_needs_its_state(shapes_batch):
    x, y_a, y_b = shapes_batch["image"], shapes_batch["shape"], shapes_batch["background"]
    model = tiny_model()
    optimizer = torch.optim.Adam(model.main_parameters(), lr=1e-3)
    record = D.main_step(model, optimizer, *model.encode(x), y_a, y_b, w_leak=1.0,
                         leakage=(D.LinearLeakage(), D.LinearLeakage()))
    assert "leak" in record and np.isfinite(record["leak"]) and record["leak"] >= 0
    with pytest.raises(ValueError, match="leakage"):
        D.main_step(model, optimizer, *model.encode(x), y_a, y_b, w_leak=1.0)
    with pytest.raises(ValueError, match="w_leak"):
        D.disentangle_config("smoke", w_leak=-1.0)


@pytest.mark.parametrize("overrides, match", [
    ({"lr": "1e-3"}, r"lr must be a finite number > 0, got '1e-3'; pass it unquoted"),
    ({"w_adv": "3"}, r"w_adv must be a finite number >= 0 \(a negative weight .*got '3'; pass it unquoted"),
    ({"w_adv": float("nan")}, r"w_adv must be a finite number >= 0"),
    ({"lr": 0.0}, r"lr must be a finite number > 0"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0"),
    ({"betas": (1.0, 0.9)}, r"betas must be a pair of numbers in \[0, 1\)"),
    ({"betas": 0.9}, r"betas must be a pair"),
    ({"betas": ("0.5", 0.9)}, r"betas must be a pair"),
    ({"warmup_epochs": -1}, r"warmup_epochs must be a finite number >= 0"),
    ({"ramp_epochs": -0.5}, r"ramp_epochs must be a finite number >= 0"),
    ({"hidden": 2.5}, r"hidden must be an integer >= 0"),
    ({"adv_hidden": -1}, r"adv_hidden must be an integer >= 0"),
    ({"adv_lr": -1}, r"adv_lr must be a finite number > 0, got -1"),
    ({"adv_lr": float("inf")}, r"adv_lr must be a finite number > 0"),
    ({"adv_lr": "0.1"}, r"adv_lr must be a finite number > 0, got '0.1'; pass it unquoted"),
    ({"weight_decay": -1}, r"weight_decay must be a finite number >= 0"),
    ({"weight_decay": float("nan")}, r"weight_decay must be a finite number >= 0"),
    ({"adv_momentum": 5}, r"adv_momentum must be a number in \[0, 1\)"),
    ({"adv_momentum": -0.1}, r"adv_momentum must be a number in \[0, 1\) \(the adversaries' SGD momentum"),
    ({"adv_momentum": "0.9"}, r"adv_momentum must be a number in \[0, 1\) .*got '0\.9'; pass it unquoted"),
    ({"leak_shrink": 0.0}, r"leak_shrink must be a finite number > 0"),
    # the string "False" is true: balanced sampling and the cosine decay stayed on
    ({"balance": "False"}, r"balance must be True or False, got 'False'; pass it unquoted"),
    ({"cosine": "False"}, r"cosine must be True or False"),
    # the adversarial term never switched on: DisentangleNet trained as the two-encoder baseline
    ({"epochs": 1, "warmup_epochs": 1}, r"warmup_epochs \(1\) must be below epochs \(1\) when w_adv > 0"),
    # accepted, and refused only when shapes_loaders made the data
    ({"image_size": "56x72"}, r"image_size must be an int or \(H, W\) of ints >= 16, got '56x72'"),
    ({"image_size": (0, -3)}, r"image_size must be an int or \(H, W\) of ints >= 16, got \(0, -3\)"),
])
def test_config_rejects_bad_training_values(overrides, match):
    # these passed silently and failed later in Adam (or a comparison, or the model's constructor)
    with pytest.raises(ValueError, match=match):
        D.disentangle_config("smoke", **overrides)


def test_train_disentangle_checks_lr_and_betas(tiny_loaders):
    for kwargs, match in (({"lr": "1e-3"}, "pass it unquoted"), ({"betas": (0.9, 1.5)}, "betas")):
        with pytest.raises(ValueError, match=match):
            D.train_disentangle(tiny_model(), tiny_loaders[0], device="cpu", progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    # "no" is true: it resumed the run in out_dir instead of refusing to overwrite it
    (dict(resume="no"), r"resume must be True or False, got 'no'; pass it unquoted"),
    (dict(out_dir=5), r"out_dir must be a folder path \(or None: no checkpoints\), got 5"),
    # 1.9 of 2 epochs of 4 batches rounds to 8 steps, all of them: the adversaries never came on
    (dict(epochs=2, warmup_epochs=1.9), r"warmup_epochs \(1.9\) of 4 batches each is 8 steps, every step of the 2 "
                                        r"epochs: with w_adv > 0 make it shorter"),
])
def test_train_disentangle_refuses_bad_run_options(kwargs, match, tiny_loaders):
    with pytest.raises(ValueError, match=match):
        D.train_disentangle(tiny_model(), tiny_loaders[0], device="cpu", progress=False, **kwargs)
    if "warmup_epochs" in kwargs:  # the baseline the message recommends: no adversaries to switch on
        D.train_disentangle(tiny_model(), tiny_loaders[0], device="cpu", progress=False, **kwargs, w_adv=0.0)


def test_resume_from_a_last_pt_of_another_loop_names_what_it_lacks(tiny_loaders, tmp_path):
    """fit's last.pt (same "model", "optimizer", "history" keys) stopped with a bare KeyError: 'schedule'."""
    model = tiny_model()
    torch.save({"model": model.state_dict(), "optimizer": {}, "history": {}, "epoch": 1, "rng": {}},
               tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint written by train_disentangle \(it has no 'schedule', "
                                         r"'adv_optimizer', 'joint', 'leakage', 'step'\)"):
        D.train_disentangle(model, tiny_loaders[0], device="cpu", progress=False, out_dir=tmp_path, resume=True)


# ---------------------------------------------------------------------------------------------- by hand


def test_residual_unit_shortcut_is_a_max_pool():
    """Meng et al.'s shortcut is a 3 x 3 max-pool of stride 2: with the main path silenced, each output
    pixel is the largest input pixel of its 3 x 3 window (padding never wins a max)."""
    unit = D.ResidualUnit(1, 1)
    with torch.no_grad():
        unit.main[-1].weight.zero_()  # the main path now adds 0
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(unit(x), torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]]))


def _labelled_batch(pairs, seed=0):
    """A batch of random 16 x 16 images (mean 3, so convolutions see a non-zero mean) with the given
    (shape, background) label pairs."""
    generator = torch.Generator().manual_seed(seed)
    shape, background = zip(*pairs)
    return {"image": 3.0 + torch.randn(len(pairs), 1, 16, 16, generator=generator),
            "shape": torch.tensor(shape), "background": torch.tensor(background)}


def _record_main_steps(monkeypatch):
    """Replace D.main_step by a wrapper that records, per call, the learning rate and the confusion targets."""
    main_step, calls = D.main_step, []

    def recording(*args, **kwargs):
        arguments = inspect.signature(main_step).bind(*args, **kwargs).arguments
        targets = {k: None if arguments.get(k) is None else arguments[k].clone() for k in ("target_a", "target_b")}
        calls.append({"lr": arguments["optimizer"].param_groups[0]["lr"], **targets})
        return main_step(*args, **kwargs)

    monkeypatch.setattr(D, "main_step", recording)
    return calls


def test_prior_targets_are_the_label_pair_frequencies_counted_so_far(monkeypatch):
    """adv_a reads task A from f_b, so its target is p(a | b); adv_b's is p(b | a). Both are counted over
    every batch so far, the current one included (its own pairs are never impossible)."""
    first = _labelled_batch([(0, 1)] * 3 + [(1, 1)] + [(1, 0)] * 2)  # counts [[0, 3], [2, 1]] (rows: a)
    second = _labelled_batch([(0, 0)] + [(1, 1)] * 3 + [(1, 0)] * 2, seed=1)  # then [[1, 3], [4, 4]]
    calls = _record_main_steps(monkeypatch)
    D.train_disentangle(tiny_model(), [first, second], epochs=1, adv_steps=1, w_adv=1.0, device="cpu",
                        progress=False, recalibrate_bn=False)

    def rows(*probabilities):
        return torch.tensor(probabilities)

    # batch 1: p(a | b=1) = (3/4, 1/4), p(a | b=0) = (0, 1); p(b | a=0) = (0, 1), p(b | a=1) = (2/3, 1/3)
    assert torch.allclose(calls[0]["target_a"], rows(*[(3 / 4, 1 / 4)] * 4, *[(0.0, 1.0)] * 2))
    assert torch.allclose(calls[0]["target_b"], rows(*[(0.0, 1.0)] * 3, *[(2 / 3, 1 / 3)] * 3))
    # batch 2: p(a | b=0) = (1/5, 4/5), p(a | b=1) = (3/7, 4/7); p(b | a=0) = (1/4, 3/4), p(b | a=1) = (1/2, 1/2)
    assert torch.allclose(calls[1]["target_a"], rows((1 / 5, 4 / 5), *[(3 / 7, 4 / 7)] * 3, *[(1 / 5, 4 / 5)] * 2))
    assert torch.allclose(calls[1]["target_b"], rows((1 / 4, 3 / 4), *[(1 / 2, 1 / 2)] * 5))


def test_uniform_targets_spread_over_each_tasks_own_classes(monkeypatch):
    """Three classes for task A, two for task B: 1/3 each for adv_a, 1/2 each for adv_b."""
    batch = _labelled_batch([(0, 0), (1, 1), (2, 0), (2, 1), (0, 1), (1, 0)])
    calls = _record_main_steps(monkeypatch)
    D.train_disentangle(tiny_model(num_classes_a=3), [batch], epochs=1, adv_steps=1, w_adv=1.0,
                        adv_target="uniform", device="cpu", progress=False, recalibrate_bn=False)
    assert torch.allclose(calls[0]["target_a"], torch.full((6, 3), 1 / 3))
    assert torch.allclose(calls[0]["target_b"], torch.full((6, 2), 1 / 2))


@pytest.mark.parametrize("cosine", [True, False])
def test_cosine_schedule_decays_the_main_learning_rate_over_the_whole_run(monkeypatch, cosine):
    """2 epochs of 2 steps: lr (1 + cos(pi t / 4)) / 2 at step t = 0..3, one period for the whole run."""
    batches = [_labelled_batch([(0, 1), (1, 1), (1, 0), (1, 0)], seed=s) for s in (0, 1)]
    calls = _record_main_steps(monkeypatch)
    D.train_disentangle(tiny_model(), batches, epochs=2, lr=0.01, adv_steps=1, w_adv=1.0, cosine=cosine,
                        device="cpu", progress=False, recalibrate_bn=False)
    expected = [0.01 * (1 + math.cos(math.pi * t / 4)) / 2 if cosine else 0.01 for t in range(4)]
    assert [call["lr"] for call in calls] == pytest.approx(expected)


def test_the_optimisers_follow_the_options_and_split_the_model(tmp_path):
    """The paper's optimisers: Adam (betas (0, 0.9)) for encoders + task heads, SGD with momentum for the
    adversaries, L2 on both; read back from the checkpoint, which holds both optimisers."""
    from mtlearn.engine import load_checkpoint

    model = tiny_model()
    D.train_disentangle(model, [_labelled_batch([(0, 1), (1, 1), (1, 0), (1, 0)])], epochs=1, lr=0.01, adv_lr=0.05,
                        adv_momentum=0.8, weight_decay=1e-4, adv_steps=2, cosine=False, device="cpu", progress=False,
                        out_dir=tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    (main,), (adversary,) = state["optimizer"]["param_groups"], state["adv_optimizer"]["param_groups"]
    assert (main["lr"], tuple(main["betas"]), main["weight_decay"]) == (0.01, (0.0, 0.9), 1e-4)
    assert (adversary["lr"], adversary["momentum"], adversary["weight_decay"]) == (0.05, 0.8, 1e-4)
    assert len(main["params"]) == len(model.main_parameters())
    assert len(adversary["params"]) == len(model.adversary_parameters())
    assert all("momentum_buffer" in s for s in state["adv_optimizer"]["state"].values())


def test_main_step_scores_each_adversary_against_its_own_target(shapes_batch):
    """adversarial term = CE(adv_a, target_a) + CE(adv_b, target_b), soft targets, written out by hand."""
    torch.manual_seed(0)
    model = tiny_model()
    x, y_a, y_b = shapes_batch["image"][:16], shapes_batch["shape"][:16], shapes_batch["background"][:16]
    features_a, features_b = model.encode(x)
    target_a, target_b = torch.tensor([[0.9, 0.1]]).expand(16, 2), torch.tensor([[0.2, 0.8]]).expand(16, 2)
    with torch.no_grad():  # train mode: the same batch statistics as inside main_step
        adv_a, adv_b = model.adversaries(features_a, features_b)
    expected = (-(target_a * adv_a.log_softmax(1)).sum(1).mean() - (target_b * adv_b.log_softmax(1)).sum(1).mean())
    optimizer = torch.optim.Adam(model.main_parameters(), lr=1e-3)
    record = D.main_step(model, optimizer, features_a, features_b, y_a, y_b, w_adv=1.0, adv_loss="confusion",
                         target_a=target_a, target_b=target_b)
    assert record["adv_term"] == pytest.approx(expected.item(), rel=1e-5)


def test_main_step_reads_each_sides_leakage_within_its_own_task(shapes_batch):
    """leak_a: task B read from f_a within each task-A class; leak_b: task A from f_b within each task-B class."""
    calls = []

    class Recorder:
        def __call__(self, features, group, target):
            calls.append((features, group, target))
            return features.sum() * 0.0

    model = tiny_model()
    x, y_a, y_b = shapes_batch["image"][:16], shapes_batch["shape"][:16], shapes_batch["background"][:16]
    assert not torch.equal(y_a, y_b)
    features_a, features_b = model.encode(x)
    optimizer = torch.optim.Adam(model.main_parameters(), lr=1e-3)
    D.main_step(model, optimizer, features_a, features_b, y_a, y_b, w_leak=1.0, leakage=(Recorder(), Recorder()))
    (f_a, group_a, target_a), (f_b, group_b, target_b) = calls
    assert f_a is features_a and torch.equal(group_a, y_a) and torch.equal(target_a, y_b)
    assert f_b is features_b and torch.equal(group_b, y_b) and torch.equal(target_b, y_a)


def test_linear_leakage_by_hand():
    """One channel, one group; target 0 at pooled values 0 and 2, target 1 at 4 and 8.

    Standardised by the batch's (unbiased) variance 35/3: the within-cell covariance is the mean squared
    residual (1, 1, 4, 4) / 4 = 2.5, i.e. 2.5 / (35/3) = 3/14, and the squared mean difference (6 - 1)^2 = 25
    is 25 / (35/3) = 15/7; penalty = (15/7) / (3/14 + 0.01). A second batch (0, 1 | 2, 3: variance 5/3,
    covariance 0.25 / (5/3) = 0.15, d^2 = 4 / (5/3) = 2.4) moves the covariance by 1 - decay = 0.1.
    """
    leakage = D.LinearLeakage(shrink=0.01, decay=0.9)
    group, target = torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1])
    first = leakage(torch.tensor([0.0, 2.0, 4.0, 8.0]).view(4, 1, 1, 1), group, target)
    assert leakage.covariance.item() == pytest.approx(3 / 14, rel=1e-4)
    assert first.item() == pytest.approx((15 / 7) / (3 / 14 + 0.01), rel=1e-4)
    second = leakage(torch.tensor([0.0, 1.0, 2.0, 3.0]).view(4, 1, 1, 1), group, target)
    covariance = 0.9 * 3 / 14 + 0.1 * 0.15
    assert leakage.covariance.item() == pytest.approx(covariance, rel=1e-4)
    assert second.item() == pytest.approx(2.4 / (covariance + 0.01), rel=1e-4)


def test_linear_leakage_averages_over_the_groups_by_hand():
    """Two groups, each with both target values: the penalty is the mean of their two distances.

    Pooled values: group 0 holds target 0 at (0, 2) and target 1 at (4, 8); group 1 holds (0, 1) and
    (2, 3). Over the batch of 8: mean 2.5, unbiased variance 48/7. Within-cell residuals (+-1, +-2,
    +-0.5, +-0.5) give a covariance of (11/8) / (48/7) = 77/384; the squared mean differences are
    5^2 and 2^2, i.e. 175/48 and 28/48 standardised.
    """
    group, target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    features = torch.tensor([0.0, 2.0, 4.0, 8.0, 0.0, 1.0, 2.0, 3.0]).view(8, 1, 1, 1)
    penalty = D.LinearLeakage(shrink=0.01)(features, group, target)
    covariance = 77 / 384
    assert penalty.item() == pytest.approx((175 / 48 + 28 / 48) / 2 / (covariance + 0.01), rel=1e-4)


@pytest.mark.parametrize("weight", ["w_adv", "w_leak"])
def test_main_step_scales_each_extra_term_by_its_weight(shapes_batch, weight):
    """With plain SGD a step moves the weights by -lr * (task gradient + w * term gradient): linear in w."""
    torch.manual_seed(0)
    model = tiny_model()
    x, y_a, y_b = shapes_batch["image"], shapes_batch["shape"], shapes_batch["background"]
    uniform = torch.full((len(x), 2), 0.5)

    def step(w):
        copy_ = copy.deepcopy(model)
        before = torch.nn.utils.parameters_to_vector(copy_.main_parameters()).detach().clone()
        optimizer = torch.optim.SGD(copy_.main_parameters(), lr=1.0)
        options = ({"w_adv": w, "target_a": uniform, "target_b": uniform} if weight == "w_adv"
                   else {"w_leak": w, "leakage": (D.LinearLeakage(), D.LinearLeakage())})
        D.main_step(copy_, optimizer, *copy_.encode(x), y_a, y_b, **options)
        return torch.nn.utils.parameters_to_vector(copy_.main_parameters()).detach() - before

    plain, once, twice = step(0.0), step(1.0), step(2.0)
    assert (once - plain).abs().max() > 1e-4  # the term moves the weights at all
    term = once - plain
    assert torch.allclose(twice - plain, 2 * term, atol=1e-3 * term.abs().max().item())  # float32 sums


def test_main_step_stops_on_a_non_finite_leakage_before_any_change(shapes_batch):
    class NaNLeakage:
        def __call__(self, features, group, target):
            return features.sum() * float("nan")

    model = tiny_model()
    x, y_a, y_b = shapes_batch["image"][:16], shapes_batch["shape"][:16], shapes_batch["background"][:16]
    features_a, features_b = model.encode(x)
    before = [p.detach().clone() for p in model.main_parameters()]
    optimizer = torch.optim.SGD(model.main_parameters(), lr=1.0)
    with pytest.raises(D.LossNotFiniteError, match="leakage"):
        D.main_step(model, optimizer, features_a, features_b, y_a, y_b, w_leak=1.0,
                    leakage=(NaNLeakage(), NaNLeakage()))
    assert all(torch.equal(p, q) for p, q in zip(model.main_parameters(), before))
    assert all(p.grad is None for p in model.main_parameters())  # stopped before backward


def test_training_ends_with_batchnorm_statistics_of_the_final_weights():
    """recalibrate_bn (the default): one pass over the training data with the final weights, so a
    BatchNorm's running mean is the mean of what its layer outputs now, not a lagging moving average."""
    batches = [_labelled_batch([(0, 1), (1, 1), (1, 0), (1, 0)], seed=s) for s in (0, 1)]
    torch.manual_seed(0)
    model = tiny_model()
    D.train_disentangle(model, batches, epochs=1, lr=0.01, adv_steps=1, device="cpu", progress=False)
    for encoder in (model.encoder_a, model.encoder_b):
        with torch.no_grad():
            stem = torch.cat([encoder.stem(batch["image"]) for batch in batches])  # (8, C, 16, 16)
        assert torch.allclose(encoder.units[0].main[0].running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-4)


class FixedAdversaries(torch.nn.Module):
    """A stub: the heads always answer class 0; adv_a (task A) always 1, adv_b (task B) always 0."""

    def encode(self, x):  # what evaluate_disentangle checks for before it runs a model
        return x, x

    def forward(self, x):
        def answer(k):
            return F.one_hot(torch.full((len(x),), k), 2).float()

        return {"logits_a": answer(0), "logits_b": answer(0), "adv_a": answer(1), "adv_b": answer(0)}


def test_evaluate_disentangle_scores_each_adversary_against_its_own_task():
    pairs = [(0, 1), (1, 1), (1, 0), (1, 0)]  # (shape, background)
    items = [{"image": torch.zeros(1, 4, 4), "shape": a, "background": b} for a, b in pairs]
    scores = D.evaluate_disentangle(FixedAdversaries(), DataLoader(items, batch_size=2), device="cpu")
    assert scores == pytest.approx({"acc_a": 1 / 4, "acc_b": 2 / 4, "adv_acc_a": 3 / 4, "adv_acc_b": 2 / 4})


def test_evaluate_disentangle_changes_nothing_in_the_model(tiny_loaders):
    """Evaluation runs in eval mode: BatchNorm uses, and keeps, its running statistics."""
    torch.manual_seed(0)
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    D.evaluate_disentangle(model, tiny_loaders[1], device="cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_every_main_step_follows_adv_steps_adversary_steps_on_the_same_batch(monkeypatch):
    """Phase 1 then phase 2, per batch: adv_steps adversary steps (the paper: 3), then one main step."""
    batches = [_labelled_batch([(0, 1), (1, 1), (1, 0), (1, 0)], seed=s) for s in (0, 1)]
    calls = []
    for name in ("adversary_step", "main_step"):
        def counted(*args, step=getattr(D, name), name=name, **kwargs):
            calls.append(name)
            return step(*args, **kwargs)

        monkeypatch.setattr(D, name, counted)
    D.train_disentangle(tiny_model(), batches, epochs=1, adv_steps=3, device="cpu", progress=False,
                        recalibrate_bn=False)
    assert calls == (["adversary_step"] * 3 + ["main_step"]) * 2


def test_probe_encoders_reads_the_features_in_eval_mode():
    """A model still in train mode: the probes see BatchNorm's running statistics, which they leave unchanged."""
    torch.manual_seed(0)
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    D.probe_encoders(model, DataLoader(_coded_items(), batch_size=50), ("shape", "background"), device="cpu")
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_adv_fit_accuracy_is_scored_after_the_last_adversary_step(monkeypatch):
    """adv_fit_acc_* report the adversaries as the batch's adversary phase left them: here the last
    step is followed by a rewrite that makes adv_b always answer "background 0", so its fit accuracy
    must be the batch's share of background 0, whatever it scored before."""
    step = D.adversary_step

    def step_then_always_zero(model, *args, **kwargs):
        record = step(model, *args, **kwargs)
        with torch.no_grad():
            model.adv_b.net[-1].weight.zero_()
            model.adv_b.net[-1].bias.copy_(torch.tensor([10.0, -10.0]))
        return record

    monkeypatch.setattr(D, "adversary_step", step_then_always_zero)
    torch.manual_seed(0)
    backgrounds = [0, 0, 0, 1] * 25  # batches of 50: 3/4 background 0 in each
    data = [{"image": torch.randn(1, 16, 16), "shape": i % 2, "background": b} for i, b in enumerate(backgrounds)]
    model = D.DisentangleNet(widths=(4, 8, 16), hidden=16, adv_hidden=0)
    history = D.train_disentangle(model, DataLoader(data, batch_size=50), epochs=1, adv_steps=1, w_adv=1.0,
                                  device="cpu", progress=False)
    assert history["adv_fit_acc_b"] == [pytest.approx(0.75)]


@pytest.fixture(scope="module")
def uclm_root(tmp_path_factory):
    from tests.fixtures_real import make_bus_uclm

    root = tmp_path_factory.mktemp("uclm")
    return root, make_bus_uclm(root, patients=12)


def test_real_ultrasound_datasets_carry_bus_uclm_flags_split_by_patient(uclm_root):
    root, info = uclm_root
    with pytest.warns(UserWarning, match="bus_uclm"):  # the fixture's cropped image and its INFO.csv disagreement
        data = D.real_ultrasound_datasets("bus_uclm", root, (32, 32), seed=0)
    assert set(data) == {"train", "test"}
    assert all(set(item) == {"image", "label", "artifact", "id"} for items in data.values() for item in items)
    assert data["test"][0]["image"].shape == (1, 32, 32)
    # every image once, with the fixture's label and flag; the cropped one too (the experiment reads no
    # mask, and skipping it lost every cropped BUS-UCLM image)
    truth = info["truth"]
    found = sorted((it["id"], it["label"], it["artifact"]) for items in data.values() for it in items)
    assert found == sorted((stem, t["label"], t["artifact"]) for stem, t in truth.items())
    assert info["mismatched"] and set(info["mismatched"]) <= {it["id"] for items in data.values() for it in items}
    assert len(data["train"]) > len(data["test"]) > 0  # train also holds load_dataset's val split
    patients = {part: {truth[it["id"]]["patient"] for it in items} for part, items in data.items()}
    assert not patients["train"] & patients["test"]


def test_real_ultrasound_datasets_refuse_a_dataset_without_flags(tmp_path):
    from tests.fixtures_real import make_busi

    make_busi(tmp_path / "busi")
    with pytest.warns(UserWarning, match="busi"), \
            pytest.raises(ValueError, match="busi records no artifact flag per image; use 'bus_uclm'"):
        D.real_ultrasound_datasets("busi", tmp_path / "busi", (32, 32))


@pytest.mark.parametrize("kind", ["shared", "disentangle"])
def test_ultrasound_experiment_on_real_flags(kind, uclm_root):
    with pytest.warns(UserWarning, match="bus_uclm"):
        data = D.real_ultrasound_datasets("bus_uclm", uclm_root[0], (32, 32), seed=0)
    config = D.disentangle_config("smoke", image_size=(32, 32), batch_size=10)
    model, history, metrics = D.ultrasound_experiment(kind, config, seed=0, data=data, device="cpu", progress=False)
    expected = {"class_acc_test", "artifact_acc_test", "class_acc_test_artifact", "class_acc_test_no_artifact",
                "false_malignant_with_artifact", "train_seconds"}
    expected |= {f"probe_{k}_{s}" for k in ("label", "artifact") for s in "ab"}
    expected |= {f"probe_artifact_a_{name}" for name in ("normal", "benign", "malignant")}
    if kind == "disentangle":
        expected |= {"adv_acc_a", "adv_acc_b"}
    assert set(metrics) == expected
    assert len(history["loss_a"]) == config.epochs
    # the test accuracy is the flag groups' accuracies weighted by their sizes
    flags = [it["artifact"] for it in data["test"]]
    with_flag = sum(flags) / len(flags)
    groups = (metrics["class_acc_test_artifact"] if with_flag else 0.0) * with_flag
    groups += (metrics["class_acc_test_no_artifact"] if with_flag < 1 else 0.0) * (1 - with_flag)
    assert metrics["class_acc_test"] == pytest.approx(groups)
    with pytest.raises(ValueError, match=r"fewer than one batch \(config.batch_size 1000\); use the whole dataset "
                                         r"\(python -m data_fetch bus_uclm\)"):  # not the synthetic builder's advice
        D.ultrasound_experiment(kind, replace(config, batch_size=1000), data=data, device="cpu", progress=False)
    assert 0.0 <= metrics["probe_artifact_a"] <= 1.0 and 0.0 <= metrics["probe_label_a"] <= 1.0


def test_the_real_data_probes_keep_each_patient_on_one_side_of_the_folds(uclm_root, monkeypatch):
    """BUS-UCLM holds several images per patient: folds drawn per image put one patient's images on both sides,
    and a probe could read the flag through who the patient is."""
    import mtlearn.probes as probes

    root, info = uclm_root
    seen, original = [], probes.cross_validated_probe

    def recording(features, y, folds=5, seed=0, groups=None):
        seen.append(groups)
        return original(features, y, folds, seed, groups=groups)

    monkeypatch.setattr(probes, "cross_validated_probe", recording)
    with pytest.warns(UserWarning, match="bus_uclm"):
        data = D.real_ultrasound_datasets("bus_uclm", root, (32, 32), seed=0)
    config = D.disentangle_config("smoke", image_size=(32, 32), batch_size=10)
    D.ultrasound_experiment("shared", config, seed=0, data=data, device="cpu", progress=False)
    probed = data["train"] + data["test"]
    expected = [info["truth"][item["id"]]["patient"] for item in probed]
    assert len(seen) >= 4 and all(groups is not None for groups in seen)
    # the four probes over every image get the patients in the images' order (the fixture's own record)
    whole = [list(groups) for groups in seen if len(groups) == len(probed)]
    assert len(whole) == 4
    assert all([str(p) for p in groups] == [str(p) for p in expected] for groups in whole)


# ---------------------------------------------------------------------------------------------- review fixes


def _batches(pairs, size=4, label_shape=None, dtype=torch.long):
    """[batch] of `size` 32 x 40 images with shape/background labels, reshaped or retyped as asked."""
    images = torch.rand(size, 1, 32, 40)
    labels = torch.tensor([pairs[i % len(pairs)] for i in range(size)])
    shape, background = labels[:, 0].to(dtype), labels[:, 1].to(dtype)
    if label_shape is not None:
        shape, background = shape.reshape(label_shape), background.reshape(label_shape)
    return [{"image": images, "shape": shape, "background": background}]


def test_evaluate_refuses_labels_that_are_not_one_per_image():
    """(B, 1) labels were compared with (B,) predictions as a (B, B) table: accuracies of 5.0."""
    loader = _batches([(0, 1), (1, 0)], size=10, label_shape=(10, 1))
    with pytest.raises(ValueError, match=r"batch\['shape'\] must hold one integer label per image, shape \(10,\); "
                                         r"got shape \(10, 1\).*squeeze\(1\)"):
        D.evaluate_disentangle(tiny_model(), loader, device="cpu")
    with pytest.raises(ValueError, match=r"got shape \(4,\), dtype torch.float32"):  # torch: "expected Long"
        _train(tiny_model(), _batches([(0, 1), (1, 0)], dtype=torch.float32))
    scores = D.evaluate_disentangle(tiny_model(), _batches([(0, 1)], size=1), device="cpu")  # one image: fine here
    assert all(0 <= v <= 1 for v in scores.values())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.bool])
def test_integer_labels_of_any_width_train_as_int64_ones(dtype):
    """int32 labels (NumPy's default on Windows) failed in cross-entropy ("expected ... Long"), uint8 ones
    in the label counts (an index read as a mask), for every model: the same training as int64 labels."""
    pairs = [(0, 1), (1, 1), (1, 0), (0, 0)]
    histories = []
    for labels in (torch.long, dtype):
        torch.manual_seed(0)
        histories.append(_train(tiny_model(), _batches(pairs, dtype=labels)))
    assert histories[1] == histories[0]
    model, (batch,) = tiny_model(), _batches(pairs)
    narrow = [{**batch, "shape": batch["shape"].to(dtype), "background": batch["background"].to(dtype)}]
    assert D.evaluate_disentangle(model, narrow, device="cpu") == D.evaluate_disentangle(model, [batch], device="cpu")


def test_labels_beyond_a_head_are_refused_naming_the_head_and_the_fix():
    """Three classes on a two-class head: torch's "Target 2 is out of bounds" in training, and accuracies
    that counted the impossible label as a miss in evaluation."""
    loader = _batches([(0, 1), (2, 0)])
    message = (r"batch\['shape'\] holds labels \[0, 2\], but the model's task-a head has 2 classes \(0..1\): "
               r"build it with num_classes_a=3")
    with pytest.raises(ValueError, match=message):
        _train(tiny_model(), loader)
    with pytest.raises(ValueError, match=message):
        D.evaluate_disentangle(tiny_model(), loader, device="cpu")
    # was "build it with num_classes_b=2", which it was
    with pytest.raises(ValueError, match=r"batch\['background'\] holds labels \[-1, 0\]; labels are class indices 0, "
                                         r"1, \.\.\.: leave out the images whose label is unknown \(-1\)"):
        _train(tiny_model("shared"), _batches([(0, -1), (1, 0)]))
    assert set(_train(tiny_model(num_classes_a=3), loader)) >= {"acc_a", "acc_b"}


def test_a_training_batch_of_one_image_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"a training batch holds 1 image: BatchNorm needs 2.*drop_last=True"):
        _train(tiny_model(), _batches([(0, 1)], size=1))  # torch: "Expected more than 1 value per channel"


def test_one_image_through_a_model_in_training_mode_is_refused_with_the_fix():
    model = tiny_model().train()
    with pytest.raises(ValueError, match=r"one image in training mode.*batches of 2 or more.*model\.eval\(\)"):
        model(torch.randn(1, 1, 32, 40))  # torch: "Expected more than 1 value per channel when training"
    assert model(torch.randn(2, 1, 32, 40))["logits_a"].shape == (2, 2)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        norm.eval()  # the classifiers' BatchNorm frozen (the encoders' sees 4 x 5 values): one image is fine
    assert model(torch.randn(1, 1, 32, 40))["logits_a"].shape == (1, 2)
    assert model.eval()(torch.randn(1, 1, 32, 40))["logits_a"].shape == (1, 2)  # eval: running statistics


def test_train_disentangle_writes_into_the_home_folder_for_a_tilde(tiny_loaders, tmp_path, monkeypatch):
    from mtlearn.checkpoint import load_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    D.train_disentangle(tiny_model(), tiny_loaders[0], epochs=1, adv_steps=1, device="cpu", progress=False,
                        out_dir="~/run")  # was a folder named "~" in the working folder
    assert (tmp_path / "run" / "last.pt").is_file()
    monkeypatch.setattr(D, "main_step", lambda *a, **k: pytest.fail("trained again: ~/run/last.pt not found"))
    history = D.train_disentangle(tiny_model(), tiny_loaders[0], epochs=1, adv_steps=1, device="cpu", progress=False,
                                  out_dir="~/run", resume=True)  # the finished run, found and given back
    assert len(history["acc_a"]) == 1 and load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_ultrasound_experiment_refuses_too_few_images_for_its_probes_before_training(monkeypatch):
    """The probes failed after the whole training, advising a folds= option the experiment does not have."""
    data = D.ultrasound_datasets((32, 32), num_train=24, num_test=12)
    monkeypatch.setattr(D, "train_disentangle", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match=r"the images the probes read \(the independent test set, 12\) are too few for "
                                         r"5-fold probes of 'label': class \d has \d item\(s\), fewer than folds=5; "
                                         r"build the data with more test images, e\.g\. ultrasound_datasets\("):
        D.ultrasound_experiment("shared", D.disentangle_config("smoke", image_size=(32, 32)), data=data, device="cpu",
                                progress=False)
    data = D.ultrasound_datasets((32, 32), num_train=24, num_test=60)  # every class often enough, but the flag:
    data["independent"] = [dict(item, artifact=int(i < 2)) for i, item in enumerate(data["independent"])]
    with pytest.raises(ValueError, match=r"5-fold probes of 'artifact': class 1 has 2 item\(s\), fewer than folds=5"):
        D.ultrasound_experiment("shared", D.disentangle_config("smoke", image_size=(32, 32)), data=data, device="cpu",
                                progress=False)


def test_train_disentangle_refuses_a_string_for_a_switch(tiny_loaders):
    for name in ("recalibrate_bn", "cosine", "progress"):
        with pytest.raises(ValueError, match=rf"{name} must be True or False, got 'False'"):
            D.train_disentangle(tiny_model(), tiny_loaders[0], **{"device": "cpu", "progress": False, name: "False"})


def test_main_step_names_the_missing_confusion_targets(shapes_batch):
    x, y_a, y_b = shapes_batch["image"][:8], shapes_batch["shape"][:8], shapes_batch["background"][:8]
    model = tiny_model()
    features_a, features_b = model.encode(x)
    with pytest.raises(ValueError, match=r"adv_loss 'confusion' with w_adv > 0 needs target_a and target_b"):
        D.main_step(model, torch.optim.Adam(model.main_parameters()), features_a, features_b, y_a, y_b, w_adv=1.0)


def test_a_run_with_numpy_options_can_be_resumed(tiny_loaders, tmp_path):
    """An lr from np.logspace went into last.pt as a NumPy object, which weights_only loading refuses."""
    kwargs = dict(adv_steps=1, device="cpu", progress=False, out_dir=tmp_path, lr=np.logspace(-3, -2, 2)[0],
                  w_adv=np.float32(1.0), epochs=np.int64(2), betas=(np.float64(0.0), 0.9), seed=np.int64(1))
    D.train_disentangle(tiny_model(), tiny_loaders[0], **{**kwargs, "epochs": 1})
    with pytest.raises(ValueError, match=r"other options \(epochs: 1 then, 2 now\)"):  # read, not "corrupt"
        D.train_disentangle(tiny_model(), tiny_loaders[0], resume=True, **kwargs)


def test_resuming_with_other_data_or_another_model_is_refused(tmp_path, monkeypatch):
    """The checkpoint knew only train_disentangle's own options: another batch size, sampler or image
    size resumed silently (another schedule, other data), another architecture ended in torch's
    size-mismatch error."""
    data = Subset(ShapesBackground("train", (32, 40)), range(32))
    kwargs = dict(epochs=2, adv_steps=1, device="cpu", progress=False, out_dir=tmp_path, resume=True)
    interrupt_main_step(monkeypatch, 5)  # epoch 2, step 1: 4 batches of 8 per epoch
    with pytest.raises(KeyboardInterrupt):
        D.train_disentangle(tiny_model(), DataLoader(data, batch_size=8), **{**kwargs, "resume": False})
    interrupt_main_step(monkeypatch, None)
    with pytest.raises(ValueError, match=r"other options \(batches: 4 then, 2 now; batch_size: 8 then, 16 now\)"):
        D.train_disentangle(tiny_model(), DataLoader(data, batch_size=16), **kwargs)
    balanced = D.balanced_sampler([data[i]["shape"] for i in range(32)], [data[i]["background"] for i in range(32)])
    with pytest.raises(ValueError, match=r"sampler: 'SequentialSampler' then, 'WeightedRandomSampler' now"):
        D.train_disentangle(tiny_model(), DataLoader(data, batch_size=8, sampler=balanced), **kwargs)
    larger = DataLoader(Subset(ShapesBackground("train", (48, 56)), range(32)), batch_size=8)
    with pytest.raises(ValueError, match=r"the training images are \(1, 48, 56\).*trained on \(1, 32, 40\)"):
        D.train_disentangle(tiny_model(), larger, **kwargs)
    with pytest.raises(ValueError, match=r"its weights do not fit this model.*another out_dir"):
        D.train_disentangle(tiny_model(widths=(4, 8, 32)), DataLoader(data, batch_size=8), **kwargs)
    history = D.train_disentangle(tiny_model(), DataLoader(data, batch_size=8), **kwargs)  # the same: resumes
    assert len(history["acc_a"]) == 2


def test_a_nan_after_some_adversary_steps_leaves_the_adversaries_as_they_were(monkeypatch):
    """The adversary steps before the failing one had moved the adversaries; they are put back too."""
    from mtlearn.engine import NonFiniteLossError

    good, bad = _batches([(0, 1), (1, 1), (1, 0)], size=6), _batches([(0, 1), (1, 1), (1, 0)], size=6)
    kwargs = dict(epochs=1, adv_steps=3, w_adv=1.0, device="cpu", progress=False, recalibrate_bn=False)
    torch.manual_seed(0)
    model = tiny_model()
    reference = copy.deepcopy(model)
    D.train_disentangle(reference, good, **kwargs)
    adversary_step, calls = D.adversary_step, []

    def fails_on_the_second_step_of_batch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # 3 steps on batch 1, then one real step on batch 2 before this one
            raise D.LossNotFiniteError("adv_loss_a", float("nan"))
        return adversary_step(*args, **kwargs)

    monkeypatch.setattr(D, "adversary_step", fails_on_the_second_step_of_batch_two)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2"):
        D.train_disentangle(model, good + bad, **kwargs)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_the_adversaries_are_crossed_each_reads_the_other_tasks_features():
    """The method's point: adv_a predicts task A's label from encoder B's features (and adv_b task B's from A's),
    so that encoder B is pushed to drop A's information. The behavioural tests call model.adversaries
    themselves, so a pairing swapped inside it passed them all."""
    torch.manual_seed(0)
    model = D.DisentangleNet(widths=TINY).eval()
    features_a, features_b = torch.randn(2, TINY[-1], 4, 4), torch.randn(2, TINY[-1], 4, 4)
    adv_a, adv_b = model.adversaries(features_a, features_b)
    moved_a, moved_b = model.adversaries(features_a + 1.0, features_b)  # only encoder A's features change
    assert torch.equal(moved_a, adv_a) and not torch.allclose(moved_b, adv_b)
    torch.testing.assert_close(adv_a, model.adv_a(features_b))
