import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from mtlearn.weighting import (
    WEIGHTINGS,
    DynamicWeightAverage,
    FixedWeights,
    GradNorm,
    PCGrad,
    UncertaintyWeighting,
    build_weighting,
    delta_m,
    find_shared_parameters,
    project_conflicting,
)

TASKS = ("seg", "cls")


class TwoTaskNet(nn.Module):
    """Shared linear encoder, one linear head per task: the smallest multi-task network."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})

    def forward(self, x):
        features = torch.tanh(self.encoder(x))
        return {t: head(features).squeeze(1) for t, head in self.heads.items()}


def _regression_problem(noise=(0.05, 1.0), n=256, seed=0):
    """Two linear regression targets of the same input, with different label noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    targets = {t: x @ torch.randn(4, generator=g) * 0.5 + s * torch.randn(n, generator=g) for t, s in zip(TASKS, noise)}
    return x, targets


def _losses(net, x, targets, scale=None):
    out = net(x)
    scale = scale or {t: 1.0 for t in TASKS}
    return {t: scale[t] * nn.functional.mse_loss(out[t], targets[t]) for t in TASKS}


def test_fixed_weights_default_and_gradient():
    weighting = FixedWeights(TASKS)
    assert weighting.weights() == {"seg": 1.0, "cls": 0.25}  # ResFormer: L_seg + 0.25 L_cls
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    total = weighting.backward({"seg": a * 1.0, "cls": b * 1.0})
    assert total.item() == pytest.approx(2.0 + 0.25 * 3.0)
    assert a.grad.item() == 1.0 and b.grad.item() == 0.25


def test_fixed_weights_accept_a_zero_weight():
    # weight 0 switches a task's loss off (it is still computed and logged): allowed, unlike a negative one
    weighting = FixedWeights(TASKS, {"seg": 1.0, "cls": 0})
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    assert weighting.backward({"seg": a * 1.0, "cls": b * 1.0}).item() == 2.0
    assert a.grad.item() == 1.0 and b.grad.item() == 0.0


def test_uncertainty_weighting_halves_the_gaussian_task_by_hand():
    # Kendall et al. eq. (7) and (10): c_t exp(-s_t) L_t + s_t / 2 with c = 1/2 for regression ("recon"), 1 otherwise
    weighting = UncertaintyWeighting(("seg", "cls", "recon"))
    assert weighting.weights() == {"seg": 1.0, "cls": 1.0, "recon": 0.5}  # s_t = 0 at the start
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.5, -1.0, 2.0]))
    losses = {"seg": torch.tensor(0.4), "cls": torch.tensor(1.2), "recon": torch.tensor(3.0)}
    expected = (math.exp(-0.5) * 0.4 + 0.25) + (math.exp(1.0) * 1.2 - 0.5) + (0.5 * math.exp(-2.0) * 3.0 + 1.0)
    assert weighting.combine(losses).item() == pytest.approx(expected, rel=1e-6)
    assert weighting.weights()["recon"] == pytest.approx(0.5 * math.exp(-2.0), rel=1e-6)


def test_uncertainty_weighting_down_weights_the_noisier_task():
    torch.manual_seed(0)
    net, weighting = TwoTaskNet(), UncertaintyWeighting(TASKS)
    x, targets = _regression_problem(noise=(0.05, 1.0))
    optimizer = torch.optim.Adam([*net.parameters(), *weighting.parameters()], lr=0.03)
    for _ in range(300):
        optimizer.zero_grad()
        weighting.backward(_losses(net, x, targets))
        optimizer.step()
    w = weighting.weights()
    assert w["cls"] < w["seg"] / 5  # the task with 20x the label noise counts far less


def test_uncertainty_weighting_optimum_is_one_over_twice_the_loss():
    weighting = UncertaintyWeighting(("seg", "recon"))
    losses = {"seg": torch.tensor(0.1), "recon": torch.tensor(2.0)}
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        weighting.backward(losses)
        optimizer.step()
    # d/ds [c exp(-s) L + s/2] = 0  ->  weight c exp(-s) = 1 / (2 L), for either likelihood
    assert weighting.weights()["seg"] == pytest.approx(1 / (2 * 0.1), rel=0.02)
    assert weighting.weights()["recon"] == pytest.approx(1 / (2 * 2.0), rel=0.02)


def test_dwa_raises_the_weight_of_the_slowest_task():
    weighting = DynamicWeightAverage(TASKS, temperature=2.0)
    weighting.end_epoch({"seg": 1.0, "cls": 1.0})
    assert weighting.weights() == {"seg": 1.0, "cls": 1.0}  # first two epochs: equal weights
    weighting.end_epoch({"seg": 0.5, "cls": 0.95})  # seg halves, cls barely moves
    w = weighting.weights()
    e_seg, e_cls = math.exp(0.5 / 2), math.exp(0.95 / 2)
    assert w["cls"] == pytest.approx(2 * e_cls / (e_seg + e_cls))
    assert w["cls"] > w["seg"] and sum(w.values()) == pytest.approx(2.0)
    total = weighting.combine({"seg": torch.tensor(1.0), "cls": torch.tensor(1.0)})
    assert total.item() == pytest.approx(2.0)


def test_dwa_keeps_equal_weights_after_one_epoch_even_with_unequal_losses():
    # a ratio needs two epochs of history: after one, the weights must still be 1 whatever the losses
    weighting = DynamicWeightAverage(TASKS, temperature=2.0)
    weighting.end_epoch({"seg": 1.0, "cls": 3.0})
    assert weighting.weights() == {"seg": 1.0, "cls": 1.0}


def test_a_task_loss_of_zero_keeps_the_weights_finite():
    # a task solved exactly (loss 0: e.g. a tiny classification set memorised) must not make a ratio 1/0 (inf, then NaN)
    dwa = DynamicWeightAverage(TASKS)
    dwa.end_epoch({"seg": 0.0, "cls": 1.0})
    dwa.end_epoch({"seg": 1.0, "cls": 1.0})
    assert all(math.isfinite(w) for w in dwa.weights().values())
    torch.manual_seed(0)
    net, gradnorm = TwoTaskNet(), GradNorm(TASKS)
    x, targets = _regression_problem(n=32)
    gradnorm.backward(_losses(net, x, targets, {"seg": 0.0, "cls": 1.0}), list(net.encoder.parameters()))
    gradnorm.after_step()  # its first batch is GradNorm's L_t(0), the denominator of every later ratio
    gradnorm.backward(_losses(net, x, targets), list(net.encoder.parameters()))
    gradnorm.after_step()  # L_t / 0 was inf, its ratio NaN: the task dropped out of the balancing unnoticed
    assert torch.isfinite(gradnorm.last_ratios).all()
    assert all(math.isfinite(w) for w in gradnorm.weights().values())


def test_a_task_at_zero_at_first_gets_its_rate_from_its_first_loss_above_zero():
    """DWA: a loss 0 two epochs ago made the ratio 0.01 / 1e-12 and gave that task every weight (the other 0);
    GradNorm: a first batch of one class (loss 0) kept L(0) = 0, so the ratio stayed ~0 and the weight fell to
    0.001 for the rest of the run."""
    dwa = DynamicWeightAverage(TASKS)
    dwa.end_epoch({"seg": 0.0, "cls": 1.0})
    dwa.end_epoch({"seg": 0.01, "cls": 1.0})
    assert dwa.weights() == {"seg": 1.0, "cls": 1.0}  # no rate for seg yet: as if it held, like cls
    torch.manual_seed(0)
    net, gradnorm = TwoTaskNet(), GradNorm(TASKS)
    x, targets = _regression_problem(n=32)
    first = _losses(net, x, targets, {"seg": 0.0, "cls": 1.0})
    gradnorm.backward(first, list(net.encoder.parameters()))
    gradnorm.after_step()
    second = _losses(net, x, targets, {"seg": 1.0, "cls": 2.0})  # cls moved: its L(0) must not follow
    gradnorm.backward(second, list(net.encoder.parameters()))
    seg, cls = second["seg"].item(), first["cls"].item()  # seg's L(0) is its first loss above 0; cls's stays
    assert seg > 0 and gradnorm.initial_losses.tolist() == pytest.approx([seg, cls])
    drop = second["cls"].item() / cls  # cls's rate (2: its loss doubled); seg's is 1
    assert gradnorm.last_ratios.tolist() == pytest.approx([2 / (1 + drop), 2 * drop / (1 + drop)])


def test_states_are_the_same_only_with_the_same_keys_lengths_and_values():
    from mtlearn.weighting import _same_state

    assert _same_state({"a": [1, torch.ones(2)]}, {"a": [1, torch.ones(2)]})
    for other in ({"a": [1, torch.ones(2)], "b": 2}, {"a": [1, torch.ones(2), 3]}, {"a": [1, torch.zeros(2)]},
                  {"a": [1.0, torch.ones(2)]}, {"a": [1, torch.ones(3)]}):
        assert not _same_state({"a": [1, torch.ones(2)]}, other)
        assert not _same_state(other, {"a": [1, torch.ones(2)]})


@pytest.mark.parametrize("make", [lambda: GradNorm(TASKS), lambda: PCGrad(TASKS)])
def test_gradient_weightings_say_why_they_have_no_combine(make):
    with pytest.raises(NotImplementedError, match=r"changes the gradients in backward\(\) and has no weighted sum"):
        make().combine({"seg": torch.tensor(1.0), "cls": torch.tensor(1.0)})  # was NotImplementedError('')


def _weighted_grad_norms(net, losses, weighting):
    layer = net.encoder.weight
    return [torch.autograd.grad(w * losses[t], layer, retain_graph=True)[0].norm().item()
            for t, w in weighting.weights().items()]


def test_gradnorm_steps_its_weights_on_the_gradient_averaged_over_torchrun_processes(monkeypatch):
    """Each process measures the gradient norms on its own share of the batch: stepped on its own gradient, the
    task weights of the processes drift apart and each trains on a different weighted loss."""
    from mtlearn import weighting as W

    other_process = torch.tensor([0.0, 1.0])  # the other rank's weight gradient, where this one has [1, 0]
    monkeypatch.setattr(W, "is_distributed", lambda: True)
    monkeypatch.setattr(W.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(W.dist, "all_reduce", lambda tensor: tensor.add_(other_process))
    gradnorm = GradNorm(TASKS)
    gradnorm.task_weights.grad = torch.tensor([1.0, 0.0])
    gradnorm.after_step()  # the mean, [0.5, 0.5], moves both weights alike: renormalised, they stay 1 and 1
    assert torch.allclose(gradnorm.task_weights.detach(), torch.ones(2))


def test_gradnorm_equalises_gradient_norms():
    torch.manual_seed(0)
    net, weighting = TwoTaskNet(), GradNorm(TASKS, alpha=0.0, lr=0.02)
    x, targets = _regression_problem(noise=(0.1, 0.1))
    shared = list(net.encoder.parameters())
    scale = {"seg": 10.0, "cls": 1.0}  # seg's gradient is ten times larger
    before = _weighted_grad_norms(net, _losses(net, x, targets, scale), weighting)
    for _ in range(150):  # the network is held fixed: only the weights move
        net.zero_grad()
        weighting.backward(_losses(net, x, targets, scale), shared)
        weighting.after_step()
    after = _weighted_grad_norms(net, _losses(net, x, targets, scale), weighting)
    w = weighting.weights()
    assert w["cls"] > 1.5 > 0.5 > w["seg"]  # the task with the smaller gradient gains weight
    assert sum(w.values()) == pytest.approx(2.0)  # renormalised to the number of tasks
    assert before[0] / before[1] > 5 and abs(after[0] / after[1] - 1) < 0.1


def test_gradnorm_measures_the_gradient_at_the_last_shared_layer():
    # G_t = || d(w_t L_t) / dW || for W the last shared weight with >= 2 dims (w_t = 1 at the start)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    heads = {t: nn.Linear(8, 1) for t in TASKS}
    x, targets = _regression_problem(n=32)
    features = encoder(x)
    losses = {t: f * nn.functional.mse_loss(heads[t](features).squeeze(1), targets[t]) for t, f in zip(TASKS, (3, 1))}
    last = encoder[2].weight
    expected = [torch.autograd.grad(losses[t], last, retain_graph=True)[0].norm() for t in TASKS]
    weighting = GradNorm(TASKS)
    weighting.backward(losses, list(encoder.parameters()))
    torch.testing.assert_close(weighting.last_grad_norms, torch.stack(expected))
    unused = nn.Linear(8, 3)  # e.g. a backbone's classifier that no task uses, last among the shared parameters
    losses = {t: nn.functional.mse_loss(heads[t](encoder(x)).squeeze(1), targets[t]) for t in TASKS}
    with pytest.raises(ValueError, match=r"a weight of shape \(3, 8\)\), which the task losses do not reach"):
        GradNorm(TASKS).backward(losses, [*encoder.parameters(), *unused.parameters()])  # torch's "not been used"


def test_gradnorm_weight_gradient_by_hand_with_its_target_held_constant():
    """d/dw_t sum_s |w_s n_s - mean(G) r_s^alpha| = sign(G_t - target_t) n_t, the target a constant (Chen et al.
    2018); n_t = ||dL_t/dW|| at the last shared layer. A gradient through the target changes it once alpha > 0."""
    torch.manual_seed(0)
    net, weighting = TwoTaskNet(), GradNorm(TASKS, alpha=1.5)
    x, targets = _regression_problem()
    scale = {"seg": 3.0, "cls": 1.0}
    losses = _losses(net, x, targets, scale)
    weighting.backward(losses, list(net.encoder.parameters()))  # records L(0)
    weighting.initial_losses = torch.stack([losses["seg"] * 2, losses["cls"]]).detach()  # seg has halved since
    losses = _losses(net, x, targets, scale)
    norms = torch.stack([torch.autograd.grad(losses[t], net.encoder.weight, retain_graph=True)[0].norm()
                         for t in TASKS])  # G_t at w_t = 1
    ratio = torch.stack([losses[t].detach() for t in TASKS]) / weighting.initial_losses
    target = norms.mean() * (ratio / ratio.mean()) ** 1.5
    weighting.backward(losses, list(net.encoder.parameters()))
    torch.testing.assert_close(weighting.task_weights.grad, torch.sign(norms - target) * norms)


def test_gradnorm_weights_stay_put_when_the_gradscaler_skipped_the_step():
    """An overflow elsewhere in the network under fp16: the network did not move, so neither do the weights."""
    net, weighting = TwoTaskNet(), GradNorm(TASKS, alpha=0.0, lr=0.02)
    x, targets = _regression_problem()
    weighting.backward(_losses(net, x, targets, {"seg": 10.0, "cls": 1.0}), list(net.encoder.parameters()))
    assert torch.isfinite(weighting.task_weights.grad).all()  # its own gradient is fine
    weighting.step_skipped = True  # as fit sets it from the GradScaler
    weighting.after_step()
    assert weighting.weights() == {"seg": 1.0, "cls": 1.0} and weighting.task_weights.grad is None
    weighting.step_skipped = False


def test_gradnorm_favours_the_task_that_trains_slower():
    net, weighting = TwoTaskNet(), GradNorm(TASKS, alpha=1.5, lr=0.02)
    x, targets = _regression_problem(noise=(0.1, 0.1))
    losses = _losses(net, x, targets)
    weighting.backward(losses, list(net.encoder.parameters()))  # records L(0)
    weighting.initial_losses = torch.stack([losses["seg"], losses["cls"] * 4]).detach()  # cls fell 4x, seg not
    for _ in range(50):
        weighting.backward(_losses(net, x, targets), list(net.encoder.parameters()))
        weighting.after_step()
    assert weighting.weights()["seg"] > weighting.weights()["cls"]


def _gradnorm_weights(dtype, loss_scale, steps=20):
    """GradNorm's weights after `steps` on a network run in `dtype`, with losses far below 1."""
    x, targets = _regression_problem(noise=(0.1, 0.1))
    torch.manual_seed(0)
    net, weighting = TwoTaskNet().to(dtype), GradNorm(TASKS, alpha=0.0, lr=0.02)
    for _ in range(steps):
        net.zero_grad()
        out = net(x.to(dtype))
        # gradients of about 1e-7: below fp16's smallest normal number (6e-5), as in a late fp16 run
        losses = {t: f * 1e-7 * nn.functional.mse_loss(out[t].float(), targets[t]) for t, f in zip(TASKS, (10.0, 1.0))}
        weighting.backward(losses, list(net.encoder.parameters()), scale=lambda t: t * loss_scale)
        weighting.after_step()
    return weighting.weights()


def test_gradnorm_under_fp16_measures_the_norms_of_the_scaled_loss():
    """Under fp16 the engine passes GradScaler.scale: the weights must move as in fp32."""
    reference = _gradnorm_weights(torch.float32, 1.0)
    assert reference["cls"] > 1.2  # the task with the smaller gradient gains weight
    assert _gradnorm_weights(torch.float16, 2.0**16) == pytest.approx(reference, rel=1e-3)


def test_gradnorm_weight_gradient_survives_fp16_autocast_with_a_large_shared_layer():
    """A Colab T4 trains in fp16 with a GradScaler (S = 65536). GradNorm differentiates the norms of
    the last shared layer's gradients again; with a layer of 262k weights a gradient divided by S
    before that second backward falls to the edge of fp16's range (4 % off here, 0 on a deeper model:
    the weights froze). It must match fp32."""
    torch.manual_seed(0)
    encoder, heads = nn.Linear(512, 512), nn.ModuleDict({t: nn.Linear(512, 1) for t in TASKS})
    x = torch.randn(64, 512)
    targets = {t: torch.randn(64) for t in TASKS}

    def weight_grad(dtype, loss_scale):
        weighting = GradNorm(TASKS, alpha=1.5)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            features = torch.tanh(encoder(x))
            out = {t: heads[t](features).squeeze(1) for t in TASKS}
        losses = {t: f * nn.functional.mse_loss(out[t].float(), targets[t]) for t, f in zip(TASKS, (10.0, 1.0))}
        encoder.zero_grad()
        weighting.backward(losses, [encoder.weight, encoder.bias], scale=lambda t: t * loss_scale)
        return weighting.task_weights.grad

    reference = weight_grad(None, 1.0)
    assert reference.abs().min() > 0  # two tasks with different gradient norms: both weights move
    torch.testing.assert_close(weight_grad(torch.float16, 2.0**16), reference, rtol=5e-3, atol=0)


def test_gradnorm_skips_a_step_whose_scaled_gradients_overflowed():
    net, weighting = TwoTaskNet(), GradNorm(TASKS, alpha=0.0, lr=0.02)
    x, targets = _regression_problem()
    weighting.backward(_losses(net, x, targets), list(net.encoder.parameters()), scale=lambda t: t * float("inf"))
    weighting.after_step()
    assert weighting.weights() == {"seg": 1.0, "cls": 1.0} and weighting.task_weights.grad is None
    weighting.backward(_losses(net, x, targets, {"seg": 10.0, "cls": 1.0}), list(net.encoder.parameters()))
    weighting.after_step()  # the next good step moves them again
    assert weighting.weights()["cls"] > 1.0


def _gradnorm_step_with_weights(values):
    """GradNorm.after_step from the given weights with a zero gradient: Adam leaves them put, so
    whatever changes them is the clamp and renormalisation."""
    weighting = GradNorm(TASKS)
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor(values))
    weighting.task_weights.grad = torch.zeros(len(TASKS))
    weighting.after_step()
    return weighting.task_weights.detach()


@pytest.mark.parametrize("lr", [0.1, 0.025])
def test_gradnorm_moves_its_weights_by_its_learning_rate(lr):
    """Adam's first step moves each weight by lr against the sign of its gradient (1 - lr, 1 + lr: still sum 2)."""
    weighting = GradNorm(TASKS) if lr == 0.025 else GradNorm(TASKS, lr=lr)  # 0.025: the default
    weighting.task_weights.grad = torch.tensor([1.0, -1.0])
    weighting.after_step()
    torch.testing.assert_close(weighting.task_weights.detach(), torch.tensor([1 - lr, 1 + lr]))


def test_gradnorm_weights_the_networks_gradient_by_its_task_weights():
    torch.manual_seed(0)
    net, weighting = TwoTaskNet(), GradNorm(TASKS)
    x, targets = _regression_problem()
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([2.0, 0.5]))
    losses = _losses(net, x, targets)
    expected = torch.autograd.grad(2.0 * losses["seg"] + 0.5 * losses["cls"], net.encoder.weight, retain_graph=True)[0]
    total = weighting.backward(losses, list(net.encoder.parameters()))
    torch.testing.assert_close(net.encoder.weight.grad, expected)
    assert total.item() == pytest.approx(float((2.0 * losses["seg"] + 0.5 * losses["cls"]).detach()))


def test_gradnorm_renormalises_the_weights_to_sum_to_the_number_of_tasks():
    weights = _gradnorm_step_with_weights([3.0, 0.5])
    torch.testing.assert_close(weights, torch.tensor([3.0, 0.5]) * 2 / 3.5)  # ratios kept, sum 2


def test_gradnorm_keeps_the_weights_positive():
    # a weight pushed below zero would flip its task's gradient: clamped to 1e-3 before renormalising
    weights = _gradnorm_step_with_weights([3.0, -0.5])
    assert (weights > 0).all() and weights.sum().item() == pytest.approx(2.0)
    torch.testing.assert_close(weights, torch.tensor([3.0, 1e-3]) * 2 / 3.001)


def test_pcgrad_projection_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflicting: g1 . g2 = -1
    p1, p2 = project_conflicting([g1, g2])
    assert torch.allclose(p1, torch.tensor([0.5, 0.5])) and torch.allclose(p2, torch.tensor([0.0, 1.0]))
    h1, h2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # not conflicting: untouched
    q1, q2 = project_conflicting([h1, h2])
    assert torch.equal(q1, h1) and torch.equal(q2, h2)


def test_pcgrad_projects_the_already_projected_gradient_with_three_tasks():
    # each later projection starts from g_i as projected so far, not from the original g_i: g1 . g3 = 0,
    # but g1 projected on g2's normal plane, (0.5, 0.5), conflicts with g3 and is projected again
    g1, g2, g3 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.0, -1.0])
    twin = torch.Generator().manual_seed(1)
    orders = [torch.randperm(3, generator=twin).tolist() for _ in range(3)]
    assert orders[0] == [1, 2, 0] and orders[2] == [1, 2, 0]  # seed 1: g1 sees g2 then g3, g3 sees g2 then g1
    p1, p2, p3 = project_conflicting([g1, g2, g3], torch.Generator().manual_seed(1))
    torch.testing.assert_close(p1, torch.tensor([0.5, 0.0]))  # (0.5, 0.5) from g2, then g3's component removed
    torch.testing.assert_close(p2, torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(p3, torch.tensor([0.0, -0.5]))  # (-0.5, -0.5) from g2, then g1's component removed


def test_pcgrad_draws_its_task_order_from_its_seed():
    """With three tasks the order changes the result; PCGrad(seed=s) projects as project_conflicting does with
    a generator seeded s."""
    tasks = ("seg", "cls", "recon")
    g = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.0, -1.0])]
    merged = {}
    for seed in (0, 1):
        p = nn.Parameter(torch.zeros(2))
        PCGrad(tasks, seed=seed).backward({t: torch.dot(p, gt) for t, gt in zip(tasks, g)}, [p])
        merged[seed] = p.grad
        torch.testing.assert_close(p.grad, sum(project_conflicting(g, torch.Generator().manual_seed(seed))))
    assert not torch.allclose(merged[0], merged[1])


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_removes_the_conflicting_component(seed):
    g = torch.Generator().manual_seed(seed)
    g1 = torch.randn(50, generator=g)
    g2 = -g1 + 0.5 * torch.randn(50, generator=g)  # strongly conflicting
    assert torch.dot(g1, g2) < 0
    p1, p2 = project_conflicting([g1, g2], g)
    assert torch.dot(p1, g2) >= -1e-5 and torch.dot(p2, g1) >= -1e-5


def test_pcgrad_backward_projects_shared_and_keeps_heads():
    torch.manual_seed(0)
    net = TwoTaskNet()
    x, targets = _regression_problem()
    targets["cls"] = -targets["seg"]  # opposite targets with identical heads: conflicting encoder gradients
    net.heads["cls"].load_state_dict(net.heads["seg"].state_dict())
    shared = list(net.encoder.parameters())
    losses = _losses(net, x, targets)
    per_task = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
                for t in TASKS]
    head_grads = {t: torch.autograd.grad(losses[t], net.heads[t].weight, retain_graph=True)[0] for t in TASKS}
    weighting = PCGrad(TASKS)
    weighting.backward(losses, shared)
    assert weighting.last_cosine < 0
    expected = sum(project_conflicting(per_task))  # two tasks: the order does not matter
    got = torch.cat([p.grad.flatten() for p in shared])
    assert torch.allclose(got, expected, atol=1e-6)
    for t in TASKS:
        assert torch.allclose(net.heads[t].weight.grad, head_grads[t])


@pytest.mark.parametrize("make", [lambda: GradNorm(TASKS), lambda: PCGrad(TASKS)])
def test_gradient_weightings_skip_frozen_shared_parameters_and_name_an_all_frozen_encoder(make):
    """As fit passes them: a frozen one made autograd raise "One of the differentiated Tensors does not
    require grad", naming neither the weighting nor the cause."""
    torch.manual_seed(0)
    net = TwoTaskNet()
    x, targets = _regression_problem()
    net.encoder.bias.requires_grad_(False)  # part of the encoder frozen
    make().backward(_losses(net, x, targets), list(net.encoder.parameters()))
    assert net.encoder.weight.grad is not None and net.encoder.bias.grad is None
    net.encoder.requires_grad_(False)
    with pytest.raises(ValueError, match=r"needs shared parameters that train, but every one given is frozen"):
        make().backward(_losses(net, x, targets), list(net.encoder.parameters()))


def test_pcgrad_gives_channels_last_weights_channels_last_gradients():
    """Projected gradients go back in the parameter's own memory format, with the same values."""
    torch.manual_seed(0)
    encoder = nn.Conv2d(2, 4, 3).to(memory_format=torch.channels_last)  # 2 input channels: NCHW != NHWC
    heads = {t: nn.Linear(4, 1) for t in TASKS}
    features = encoder(torch.randn(6, 2, 8, 8).to(memory_format=torch.channels_last)).mean(dim=(2, 3))
    losses = {t: heads[t](features).pow(2).mean() * (1 if t == "seg" else -1) for t in TASKS}
    shared = [encoder.weight, encoder.bias]
    per_task = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
                for t in TASKS]
    expected = sum(project_conflicting(per_task))
    PCGrad(TASKS).backward(losses, shared)
    assert encoder.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(torch.cat([p.grad.flatten() for p in shared]), expected, atol=1e-6)


def test_find_shared_parameters_is_the_encoder():
    net = TwoTaskNet()
    x, targets = _regression_problem(n=8)
    shared = find_shared_parameters(net.parameters(), _losses(net, x, targets))
    assert [id(p) for p in shared] == [id(p) for p in net.encoder.parameters()]
    with pytest.raises(ValueError, match="share no parameters"):
        out = net(x)
        find_shared_parameters(net.heads.parameters(), {t: out[t].sum() for t in TASKS})


def _weighting_step(net, weighting, x, targets, epoch, train_net=True):
    """One training step as engine.fit runs it, then an epoch end; train_net=False holds the network fixed."""
    params = [*net.parameters()] if train_net else []
    if weighting.in_optimizer:  # the engine trains e.g. the log-variances with the network's optimiser
        params += list(weighting.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1) if params else None
    net.zero_grad()
    weighting.zero_grad()
    weighting.backward(_losses(net, x, targets), list(net.encoder.parameters()))
    if optimizer is not None:
        optimizer.step()
    weighting.after_step()
    weighting.end_epoch({"seg": 1.0 + epoch, "cls": 2.0})


def _weights_only_round_trip(weighting, fresh):
    """Save weighting.state_dict() as a checkpoint does, load it into `fresh` with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(weighting.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize("name", ["uncertainty", "dwa", "gradnorm"])
def test_state_survives_a_weights_only_round_trip(name):
    torch.manual_seed(0)
    net, weighting = TwoTaskNet(), build_weighting(name, TASKS)
    x, targets = _regression_problem(n=16)
    for epoch in range(3):
        _weighting_step(net, weighting, x, targets, epoch)
    assert weighting.weights() != build_weighting(name, TASKS).weights()  # it adapted: the check below can fail
    restored = _weights_only_round_trip(weighting, build_weighting(name, TASKS))
    assert restored.weights() == weighting.weights()
    # the hidden state must come back too (DWA's loss history, GradNorm's Adam moments): the next
    # update from the same losses must be the same as the original's
    for w in (weighting, restored):
        _weighting_step(net, w, x, targets, epoch=3, train_net=False)
    assert restored.weights() == weighting.weights()


def test_fixed_weights_survive_a_weights_only_round_trip():
    # fixed weights never change in training, so the configured ones must come back, not the defaults
    weighting = FixedWeights(TASKS, {"seg": 0.3, "cls": 2.0})
    restored = _weights_only_round_trip(weighting, FixedWeights(TASKS))
    assert restored.weights() == weighting.weights() != FixedWeights(TASKS).weights()


def test_fixed_weights_are_recorded_as_given():
    # options() goes into a run's options.json and the resume check: 0.1, not float32's 0.10000000149
    assert FixedWeights(TASKS, {"seg": 1.0, "cls": 0.1}).options() == {"weights": {"seg": 1.0, "cls": 0.1}}
    weighting = FixedWeights(TASKS, {"seg": 1.0, "cls": 0.1})
    assert weighting.weights() == {"seg": 1.0, "cls": 0.1}  # History's weight/cls was 0.10000000149011612
    weighting.load_state_dict({"task_weights": torch.tensor([2.0, 0.5])})  # a state loaded by hand: what it holds
    assert weighting.weights() == {"seg": 2.0, "cls": 0.5}


def test_pcgrad_generator_survives_a_weights_only_round_trip():
    # PCGrad's weights are always 1: its state is the generator that orders the projections
    torch.manual_seed(0)
    net, weighting = TwoTaskNet(), PCGrad(TASKS)
    x, targets = _regression_problem(n=16)
    for epoch in range(3):
        _weighting_step(net, weighting, x, targets, epoch)
    assert not torch.equal(weighting.generator.get_state(), PCGrad(TASKS).generator.get_state())  # it was drawn from
    restored = _weights_only_round_trip(weighting, PCGrad(TASKS))
    # the next projection order: both generators draw the same permutation of many tasks
    assert torch.equal(torch.randperm(20, generator=restored.generator),
                       torch.randperm(20, generator=weighting.generator))


def test_weighting_gradients_are_finite_and_reach_every_parameter():
    for name in WEIGHTINGS:
        net, weighting = TwoTaskNet(), build_weighting(name, TASKS)
        x, targets = _regression_problem(n=16)
        weighting.backward(_losses(net, x, targets), list(net.encoder.parameters()))
        for p in [*net.parameters(), *weighting.parameters()]:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_delta_m_averages_over_the_baselines_metrics_not_every_metric_reported():
    """A student passes the whole compute() dict of the multi-task model and a two-metric baseline."""
    mtl = {"seg/dice": 0.8, "cls/acc": 0.9, "seg/iou": 0.7, "cls/auc": 0.95}
    single = {"seg/dice": 0.75, "cls/acc": 1.0}
    assert delta_m(mtl, single) == pytest.approx(100 * ((0.8 - 0.75) / 0.75 + (0.9 - 1.0) / 1.0) / 2)


def test_the_published_defaults():
    """DWA's temperature 2 (Liu et al. 2019) and GradNorm's alpha 1.5 (Chen et al. 2018, their NYUv2 value),
    with its weights' learning rate: what build_weighting("dwa") or ("gradnorm") gives a student."""
    assert build_weighting("dwa", TASKS).options() == {"temperature": 2.0}
    assert build_weighting("gradnorm", TASKS).options() == {"alpha": 1.5, "lr": 0.025}


@pytest.mark.parametrize("mtl, single, says", [
    ({"dice": float("nan")}, {"dice": 0.4}, r"multi-task metric 'dice' is nan: the run diverged"),  # was nan
    ({"dice": "0.5"}, {"dice": 0.4}, r"multi-task metric 'dice' must be a number, got '0.5'"),  # was 25.0
    ({"dice": 0.5}, {"dice": "0.4"}, r"baseline metric 'dice' must be a number, got '0.4'"),  # was a TypeError
    ({"dice": True}, {"dice": 0.4}, r"multi-task metric 'dice' must be a number, got True"),
])
def test_delta_m_refuses_what_is_not_a_finite_number(mtl, single, says):
    with pytest.raises(ValueError, match=says):
        delta_m(mtl, single)
    assert delta_m({"dice": np.float32(0.5)}, {"dice": torch.tensor(0.4)}) == pytest.approx(25.0, abs=1e-4)


@pytest.mark.parametrize("losses, says", [
    ({"seg": torch.ones(3), "cls": torch.tensor(1.0)},  # per-item losses: torch.stack's "equal size" error
     r"the 'seg' loss must be one number \(the batch's mean loss\), got a tensor of shape \(3,\); reduce per-item "
     r"losses with .mean\(\)"),
    ({"seg": torch.tensor(1.0), "cls": 2.0},  # .item(): "'float' object has no attribute 'float'"
     r"the 'cls' loss must be a tensor \(the batch's mean loss, with its graph\), got a float: pass the loss "
     r"tensor itself"),
])
def test_combine_names_a_loss_that_is_not_one_tensor_number(losses, says):
    for name in ("fixed", "uncertainty", "dwa"):
        with pytest.raises(ValueError, match=says):
            build_weighting(name, tasks=("seg", "cls")).combine(losses)
    fixed = build_weighting("fixed", tasks=("seg", "cls"))
    total = fixed.combine({"seg": torch.ones(1), "cls": torch.tensor(2.0)})  # a (1,) loss is one number too
    assert total.shape == () and total.item() == fixed.weights()["seg"] + 2 * fixed.weights()["cls"]


def test_dwa_refuses_a_non_finite_epoch_loss():
    dwa = build_weighting("dwa", tasks=("seg", "cls"))
    with pytest.raises(ValueError, match=r"DWA needs each task's finite mean training loss, got \{'seg': nan"):
        dwa.end_epoch({"seg": float("nan"), "cls": 1.0})
    with pytest.raises(ValueError, match=r"the 'cls' epoch loss must be a number, got 'x'"):
        dwa.end_epoch({"seg": 1.0, "cls": "x"})
    dwa.end_epoch({"seg": torch.tensor(1.0), "cls": np.float64(2.0)})  # what fit passes, or a tensor
    assert dwa.epochs_seen == 1


def test_delta_m_by_hand():
    mtl = {"seg/dice": 0.8, "cls/acc": 0.9, "seg/loss": 0.5}
    single = {"seg/dice": 0.75, "cls/acc": 1.0, "seg/loss": 0.4}
    expected = 100 * ((0.8 - 0.75) / 0.75 + (0.9 - 1.0) / 1.0 - (0.5 - 0.4) / 0.4) / 3
    assert delta_m(mtl, single) == pytest.approx(expected)
    flipped = 100 * ((0.8 - 0.75) / 0.75 - (0.9 - 1.0) / 1.0 - (0.5 - 0.4) / 0.4) / 3
    assert delta_m(mtl, single, {"cls/acc": False}) == pytest.approx(flipped)


@pytest.mark.parametrize("name", ["recon/loss", "recon/mse", "recon/MAE", "depth/abs_error", "loss_seg", "seg/hd95",
                                  "seg/Hausdorff", "seg/hausdorff95", "seg/asd", "seg/surface_distance", "cls/nll",
                                  "cls/ece", "cls/cross_entropy", "cls/brier", "cls/log_loss", "recon/lpips", "fid",
                                  "cls/fpr", "seg/voe", "depth/abs_rel", "depth/sq_rel", "depth/log10", "depth/rmse",
                                  "normal/mean_angle", "normal/median_angle"])
def test_delta_m_counts_losses_errors_and_distances_as_lower_is_better(name):
    # halving an error, a loss or a boundary distance is a +50 % gain
    assert delta_m({name: 0.1}, {name: 0.2}) == pytest.approx(50.0)


@pytest.mark.parametrize("name", ["seg/dice", "recon/psnr", "cls/auc", "cls/balanced_acc", "recon/ms_ssim",
                                  "seg/threshold_dice", "seg/nsd", "seg/normalized_surface_distance",
                                  "error_reduction", "loss_improvement", "entropy_gain", "normal/angle_11.25"])
def test_delta_m_counts_other_metrics_as_higher_is_better(name):
    assert delta_m({name: 0.3}, {name: 0.2}) == pytest.approx(50.0)


def test_delta_m_relative_change_of_a_negative_baseline_keeps_its_sign():
    # higher is better, -2 -> -1 is an improvement: +50 %, not -50 % (the change is relative to |baseline|)
    assert delta_m({"log_likelihood": -1.0}, {"log_likelihood": -2.0}) == pytest.approx(50.0)
    assert delta_m({"val/loss": -3.0}, {"val/loss": -2.0}) == pytest.approx(50.0)  # lower is better


@pytest.mark.parametrize("make, match", [
    (lambda: build_weighting("magic", TASKS), "unknown weighting 'magic'.*'fixed'.*'pcgrad'"),
    (lambda: FixedWeights(TASKS, {"seg": 1.0}), "one number per task"),
    (lambda: FixedWeights(TASKS, {"seg": 1.0, "cls": -1.0}), "non-negative"),
    (lambda: FixedWeights(TASKS, {"seg": math.inf, "cls": 1.0}), "must be finite"),
    (lambda: DynamicWeightAverage(TASKS, temperature=0), "temperature"),
    (lambda: GradNorm(TASKS, alpha=-1), "alpha"),
    (lambda: FixedWeights(TASKS).combine({"seg": torch.tensor(1.0)}), "expected losses for tasks"),
    # one loss too many (a recon loss beside a seg/cls weighting) would be dropped without a word
    (lambda: FixedWeights(TASKS).combine({t: torch.tensor(1.0) for t in ("seg", "cls", "recon")}),
     r"expected losses for tasks \('seg', 'cls'\), got \('seg', 'cls', 'recon'\)"),
    (lambda: PCGrad(TASKS).backward({t: torch.tensor(1.0, requires_grad=True) for t in TASKS}), "shared parameters"),
    (lambda: delta_m({}, {"seg/dice": 0.5}), "missing from mtl_metrics"),
    (lambda: delta_m({"seg/dice": 0.5}, {"seg/dice": 0.0}), "is 0"),
    (lambda: delta_m({}, {}), "empty"),
    (lambda: delta_m({"seg/dice": 0.5}, {"seg/dice": float("nan")}), "'seg/dice' is nan; the relative change"),
    (lambda: delta_m({"val/loss": 1.0}, {"val/loss": 2.0}, {"val/los": False}),
     r"higher_is_better names \['val/los'\], which single_task_metrics lacks"),
    (lambda: build_weighting("dwa", TASKS, temprature=2.0), r"weighting 'dwa' has no option \['temprature'\]; "
                                                            r"its options are \['temperature'\]"),
    (lambda: build_weighting("uncertainty", TASKS, foo=1), r"its options are none"),
    # a loss of 0 trains nothing; an IndexError; a KeyError
    (lambda: FixedWeights(TASKS, {"seg": 0, "cls": 0.0}), r"weights are all 0, so the loss would be 0"),
    # float32 holds 1e-50 as 0 (past the all-0 check: a loss of 0) and 1e39 as inf
    (lambda: FixedWeights(TASKS, {"seg": 1e-50, "cls": 0}), r"weights are kept as float32, which holds 1e-50 as 0\.0; "
                                                            r"give weights between about 1e-38 and 1e38"),
    (lambda: FixedWeights(TASKS, {"seg": 1.0, "cls": 1e39}), r"which holds 1e\+39 as inf"),
    (lambda: FixedWeights(TASKS, {"seg": 1.0, "cls": 10**400}), r"which holds 1000.* as inf"),  # an OverflowError
    (lambda: GradNorm(TASKS).backward({t: torch.tensor(1.0, requires_grad=True) for t in TASKS},
                                      [nn.Parameter(torch.ones(3))]),
     r"GradNorm measures gradient norms at the last shared convolution or linear layer, but .* hold none"),
    (lambda: DynamicWeightAverage(TASKS).end_epoch({"seg": 1.0}), r"expected losses for tasks \('seg', 'cls'\)"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make, match", [
    # NaN passed `temperature <= 0`, then made the weights NaN, and NonFiniteWeightsError blamed the learning rate
    (lambda: DynamicWeightAverage(TASKS, temperature=float("nan")), r"temperature must be a finite number > 0 .*nan"),
    (lambda: DynamicWeightAverage(TASKS, temperature=float("inf")), r"temperature must be a finite number > 0"),
    # strings (from a config file) were a bare TypeError: '<=' not supported between instances of 'str' and 'int'
    (lambda: DynamicWeightAverage(TASKS, temperature="2"), r"temperature .*got '2'; pass it unquoted"),
    (lambda: GradNorm(TASKS, alpha="1.5"), r"alpha must be a finite number >= 0 \(1\.5 as published.*got '1\.5'; pass"),
    (lambda: GradNorm(TASKS, alpha=float("nan")), r"alpha must be a finite number >= 0 .*got nan"),
    (lambda: GradNorm(TASKS, lr=float("nan")), r"lr must be a finite number > 0 .*got nan"),
    (lambda: GradNorm(TASKS, lr=0), r"lr must be a finite number > 0"),
    (lambda: PCGrad(TASKS, seed="0"), r"seed must be an integer >= 0, got '0'"),
])
def test_bad_hyperparameters_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_hyperparameters_keep_the_state_dict_loadable():
    """GradNorm's lr reaches its Adam's state, and so the checkpoint: a NumPy float there made
    torch.load(weights_only=True) refuse the whole file."""
    import numpy as np

    weighting = GradNorm(TASKS, alpha=np.float64(1.5), lr=np.float64(0.025))
    assert type(weighting.alpha) is float and type(weighting.optimizer.param_groups[0]["lr"]) is float
    buffer = io.BytesIO()
    torch.save(weighting.state_dict(), buffer)
    buffer.seek(0)
    GradNorm(TASKS).load_state_dict(torch.load(buffer, weights_only=True))
    assert type(DynamicWeightAverage(TASKS, temperature=np.float32(2)).temperature) is float


def _pcgrad_on_two_shards(rank, store, results):
    """Rank 0's task gradients conflict ([1, 0] and [-1, 1]), rank 1's do not ([1, 0] and [1, 1])."""
    from tests.test_engine import _one_of_two_processes

    with _one_of_two_processes(rank, store, results):
        p = torch.zeros(2, requires_grad=True)
        a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]) if rank == 0 else torch.tensor([1.0, 1.0])
        PCGrad(("seg", "cls")).backward({"seg": (a * p).sum(), "cls": (b * p).sum()}, [p])
        (results / f"grad{rank}.txt").write_text(" ".join(f"{v:g}" for v in p.grad.tolist()))


@pytest.mark.slow
def test_pcgrad_under_torchrun_projects_the_whole_batchs_task_gradients(tmp_path):
    """Averaged over the two shards the task gradients are [1, 0] and [0, 1]: no conflict, so the update is
    their sum [1, 1] on both processes. Projecting each shard's and averaging gave [1.25, 1.25]."""
    import torch.multiprocessing as mp

    mp.spawn(_pcgrad_on_two_shards, args=(tmp_path / "store", tmp_path), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["finished"] * 2
    assert [(tmp_path / f"grad{r}.txt").read_text() for r in (0, 1)] == ["1 1"] * 2


def _gradnorm_on_two_shards(rank, store, results):
    """Both processes start at losses (1, 1) on average; then rank 0 sees (1, 3) and rank 1 (3, 1)."""
    from tests.test_engine import _one_of_two_processes

    with _one_of_two_processes(rank, store, results):
        p = torch.ones(2, 2, requires_grad=True)
        weighting = GradNorm(("seg", "cls"))
        for seg, cls in ((1.0, 1.0), (1.0, 3.0) if rank == 0 else (3.0, 1.0)):
            weighting.backward({"seg": seg * p.sum() / 4, "cls": cls * p.sum() / 4}, [p])
        (results / f"ratio{rank}.txt").write_text(" ".join(f"{v:g}" for v in weighting.last_ratios.tolist()))


@pytest.mark.slow
def test_gradnorm_under_torchrun_reads_the_training_rates_of_the_whole_batch(tmp_path):
    """L_t / L_t(0) from every process's losses: both tasks went from 1 to 2 on average, so r = (1, 1) on
    both processes; each process's own losses gave (0.5, 1.5) on one and (1.5, 0.5) on the other."""
    import torch.multiprocessing as mp

    mp.spawn(_gradnorm_on_two_shards, args=(tmp_path / "store", tmp_path), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["finished"] * 2
    assert [(tmp_path / f"ratio{r}.txt").read_text() for r in (0, 1)] == ["1 1"] * 2
