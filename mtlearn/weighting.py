"""Multi-task loss weighting: how several task losses become one update of a shared network.

Every strategy is a small nn.Module with the same interface, called by `engine.fit` in this order:

    total = weighting.backward(losses, shared_parameters, scale)  # fills .grad of the network
    optimizer.step()                                              # (the weighting's own parameters included
                                                                  #  when `in_optimizer` is True)
    weighting.after_step()                                        # e.g. GradNorm's own update (fit sets
                                                                  #  .step_skipped first: True when the
                                                                  #  GradScaler skipped the step, fp16 overflow)
    ...
    weighting.end_epoch(mean_train_losses)                        # once per epoch, e.g. DWA
    weighting.weights() -> {"seg": 1.0, "cls": 0.25}              # current weights, for plots

`losses` is a dict task -> scalar loss; `shared_parameters` the parameters every task uses (the
encoder); `scale` multiplies a loss before backward (GradScaler.scale under fp16, identity
otherwise). Strategies that only weight the losses (fixed, uncertainty, DWA) override `combine`;
strategies that change gradients (GradNorm, PCGrad) override `backward`.

Its state (learned weights, loss history, random generator) is in `state_dict()` and therefore in
every checkpoint, so a resumed run continues with the same weights.

A weighting of your own subclasses LossWeighting and keeps whatever changes during training in
`state_dict()` too: as parameters, as buffers (`register_buffer`, as DWA's loss history) or through
`get_extra_state`/`set_extra_state` (as PCGrad's random generator); a plain attribute is not saved, and
a resumed run would start it afresh. Pass an instance to `fit(weighting=...)`, or add the class to
`WEIGHTINGS` to choose it by name in the same Python process (in `fit`, and in notebook 02's `weightings`
when a cell before its set-up cell adds it; `python -m mtlearn.train` is a process of its own, which does not).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlearn.losses import check_tasks
from mtlearn.utils import check_int, check_number, is_distributed, is_number

Scale = Callable[[Tensor], Tensor]

# ResFormer (Bui et al. 2024, arXiv 2412.00351): L = L_seg + 0.25 * L_cls. Reconstruction counts fully.
DEFAULT_WEIGHTS = {"seg": 1.0, "cls": 0.25, "recon": 1.0}


def _average_across_processes(tensor: Tensor) -> Tensor:
    """In-place mean over torchrun processes (no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


class LossWeighting(nn.Module):
    """Base class: turns a dict of task losses into gradients (see the module docstring)."""

    needs_shared_parameters = False  # True: backward() needs the shared parameters
    in_optimizer = False  # True: the training optimiser must also update this module's parameters
    step_skipped = False  # set by fit before after_step(): the GradScaler skipped the step (the network did not move)

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks = check_tasks(tasks)

    def _stack(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Task losses in self.tasks order: dict -> (T,)."""
        self._check_tasks(losses)
        for task in self.tasks:
            loss = losses[task]
            if not isinstance(loss, Tensor):  # .float() failed on a float: "'float' object has no attribute"
                raise ValueError(f"the {task!r} loss must be a tensor (the batch's mean loss, with its graph), got a "
                                 f"{type(loss).__name__}: pass the loss tensor itself, not .item()")
            if loss.numel() != 1:  # torch.stack's "expects each tensor to be equal size" otherwise
                raise ValueError(f"the {task!r} loss must be one number (the batch's mean loss), got a tensor of shape "
                                 f"{tuple(loss.shape)}; reduce per-item losses with .mean()")
        return torch.stack([losses[task].float().reshape(()) for task in self.tasks])

    def _check_tasks(self, losses: Mapping[str, Any]) -> None:
        if set(losses) != set(self.tasks):
            raise ValueError(f"expected losses for tasks {self.tasks}, got {tuple(losses)}")

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum of the task losses -> scalar (differentiable)."""
        raise NotImplementedError(f"{type(self).__name__} defines no combine(): a weighting overrides combine "
                                  "(a weighted sum of the losses) or backward (if it changes the gradients)")

    def backward(self, losses: Mapping[str, Tensor], shared_parameters: Sequence[nn.Parameter] | None = None,
                 scale: Scale | None = None) -> Tensor:
        """Back-propagate the combined loss; return it detached (for logging)."""
        total = self.combine(losses)
        (scale(total) if scale else total).backward()
        return total.detach()

    def after_step(self) -> None:
        """Called after every optimiser step (self.step_skipped: the GradScaler skipped it, fp16
        gradients having overflowed somewhere in the network, so the network did not move)."""

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        """Called once per epoch with the mean training loss of every task."""

    def weights(self) -> dict[str, float]:
        """Current weight of every task."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The constructor's settings other than `tasks` (what a resumed run must share with the saved one)."""
        return {}


def _no_weighted_sum(weighting: LossWeighting) -> NotImplementedError:
    return NotImplementedError(f"{type(weighting).__name__} changes the gradients in backward() and has no weighted "
                               "sum of its own; to weigh losses yourself, use its current weights(), e.g. "
                               "sum(w * losses[t] for t, w in weighting.weights().items())")


def has_trained(weighting: LossWeighting) -> bool:
    """Whether `weighting` has left the state a new one of its kind starts in (learned weights, a loss history, a
    random generator that drew, an optimiser's moments): a run given it starts where the last one ended."""
    try:
        fresh = type(weighting)(weighting.tasks, **weighting.options())
    except Exception:  # noqa: BLE001 (a user's own class with another constructor: nothing to compare with)
        return False
    return not _same_state(weighting.state_dict(), fresh.state_dict())


def _same_state(a, b) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())
    return type(a) is type(b) and a == b


def check_task_weights(weights, tasks: Sequence[str], name: str = "weights") -> None:
    """Refuse anything but one finite number >= 0 per task of `tasks` (`name`: what the caller calls them)."""
    example = {t: DEFAULT_WEIGHTS.get(t, 1.0) for t in tasks}
    if not isinstance(weights, Mapping) or set(weights) != set(tasks):
        raise ValueError(f"{name} must give one number per task {tuple(tasks)}, e.g. {example}; got {weights!r}")
    if not all(is_number(w) and 0 <= w < math.inf for w in weights.values()):  # NaN fails the comparison
        raise ValueError(f"{name} must be finite and non-negative numbers, e.g. {example}; got {weights!r}")
    # kept as float32 (a buffer): 1e-50 became 0 and 1e39 inf, past the checks above
    kept = {w: _as_float32(w) for w in weights.values()}
    lost = [w for w, f in kept.items() if (w > 0) != (f > 0) or not np.isfinite(f)]
    if lost:
        shown = repr(lost[0]) if len(repr(lost[0])) <= 20 else repr(lost[0])[:17] + "..."  # 10**400: 401 digits
        raise ValueError(f"{name} are kept as float32, which holds {shown} as {float(kept[lost[0]])}; give "
                         f"weights between about 1e-38 and 1e38 (only their ratios matter), e.g. {example}")
    if not any(weights.values()):  # a total loss of 0: the network would get no gradient and train nothing
        raise ValueError(f"{name} are all 0, so the loss would be 0 and nothing would train; give at least one "
                         f"task a weight > 0, e.g. {example}")


def _as_float32(value) -> np.float32:
    """`value` as float32 holds it (inf past its range, where NumPy warns, or raises for a huge int)."""
    try:
        with np.errstate(over="ignore"):
            return np.float32(value)
    except OverflowError:  # 10**400: an int no float holds
        return np.float32(np.inf)


class FixedWeights(LossWeighting):
    """L = sum_t w_t L_t with constant weights.

    The ResFormer paper (Bui et al. 2024) trains with L_seg + 0.25 L_cls: the classification loss is
    larger and noisier early on, and down-weighting it keeps it from dominating the shared encoder.
    """

    def __init__(self, tasks: Sequence[str] = ("seg", "cls"), weights: Mapping[str, float] | None = None):
        super().__init__(tasks)
        weights = dict(weights) if weights is not None else {t: DEFAULT_WEIGHTS[t] for t in self.tasks}
        check_task_weights(weights, self.tasks)
        self.given = {t: float(weights[t]) for t in self.tasks}  # as given: 0.1, not float32's 0.10000000149
        self.register_buffer("task_weights", torch.tensor([self.given[t] for t in self.tasks]))

    def combine(self, losses):
        return (self.task_weights * self._stack(losses)).sum()

    def weights(self):
        # the shortest decimal of each float32 weight: History's weight/cls 0.1, not 0.10000000149011612
        return {t: float(str(np.float32(w))) for t, w in zip(self.tasks, self.task_weights.tolist())}

    def options(self):
        return {"weights": dict(self.given)}


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018).

    Each task gets a learned log-variance s_t = log sigma_t^2 and the loss becomes
        sum_t  c_t exp(-s_t) L_t + s_t / 2,
    with c_t = 1/2 for a Gaussian (regression: "recon") and 1 for a softmax likelihood ("seg",
    "cls"), as in the paper's equations (7) and (10). A noisy task cannot drive its loss down, so
    raising s_t is cheaper than fitting it: its weight c_t exp(-s_t) falls (to 1 / (2 L_t) at the
    optimum). The s_t are parameters: the training optimiser must update them (`in_optimizer`).
    The Gaussian factor 1/2 is exact for an MSE reconstruction loss (LossConfig(recon="mse")); the
    default L1 loss is a Laplace likelihood, whose own form would settle recon's weight at 1 / L_t,
    twice as high. It is kept as the paper writes it, for either loss.
    """

    in_optimizer = True

    def __init__(self, tasks: Sequence[str] = ("seg", "cls")):
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))  # s_t, start at sigma = 1
        self.register_buffer("factors", torch.tensor([0.5 if t == "recon" else 1.0 for t in self.tasks]))

    def combine(self, losses):
        precision = self.factors * torch.exp(-self.log_vars)  # (T,) the effective task weights
        return (precision * self._stack(losses) + 0.5 * self.log_vars).sum()

    def weights(self):
        return dict(zip(self.tasks, (self.factors * torch.exp(-self.log_vars)).tolist()))


class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).

    Weights follow each task's rate of improvement over the last two epochs:
        r_t = L_t(e-1) / L_t(e-2),   w_t(e) = T exp(r_t / temperature) / sum_k exp(r_k / temperature),
    with T the number of tasks, as in the shape comments, so that the weights sum to T (the paper
    writes K for the number of tasks and T for the temperature).
    A task whose loss falls slowly (r_t near 1) gets more weight than one falling fast. The first
    two epochs use w_t = 1. It needs only the losses, no gradients, so it costs nothing.
    """

    def __init__(self, tasks: Sequence[str] = ("seg", "cls"), temperature: float = 2.0):
        super().__init__(tasks)
        self.temperature = check_number("temperature", temperature, 0, above=True,
                                        advice="2 as published; larger: weights closer to equal")
        self.register_buffer("task_weights", torch.ones(len(self.tasks)))
        self.register_buffer("loss_history", torch.zeros(2, len(self.tasks)))  # rows: epoch e-2, e-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def combine(self, losses):
        return (self.task_weights * self._stack(losses)).sum()

    def end_epoch(self, epoch_losses):
        self._check_tasks(epoch_losses)
        current = torch.tensor([_as_float(epoch_losses[t], f"the {t!r} epoch loss") for t in self.tasks],
                               device=self.loss_history.device)
        if not torch.isfinite(current).all():  # the ratios would make every weight NaN
            raise ValueError(f"DWA needs each task's finite mean training loss, got {dict(epoch_losses)}")
        self.loss_history = torch.stack([self.loss_history[1], current])  # (2, T)
        self.epochs_seen += 1
        if self.epochs_seen >= 2:
            earlier, last = self.loss_history
            # a task at 0 two epochs ago has no rate: 1 (as if it held), not 0.01 / 1e-12, which gave it every weight
            ratio = torch.where(earlier > 0, last / earlier.clamp_min(1e-12), torch.ones_like(last))  # (T,)
            self.task_weights = len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)

    def weights(self):
        return dict(zip(self.tasks, self.task_weights.tolist()))

    def options(self):
        return {"temperature": self.temperature}


class GradNorm(LossWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018).

    Balances tasks by their gradient magnitude at the last shared layer W. For each task
        G_t = || d(w_t L_t) / dW ||,   r_t = (L_t / L_t(0)) / mean_k (L_k / L_k(0)),
    and the weights w_t minimise  sum_t | G_t - mean(G) * r_t^alpha |  (the target is a constant).
    A task with a small gradient, or one that trains more slowly (large r_t), gains weight. The
    network itself is trained on sum_t w_t L_t. After every step the weights are renormalised to
    sum to the number of tasks. The weights have their own Adam optimiser (they follow this
    objective, not the training loss), stored in the checkpoint with them.

    W is the last parameter with two or more dimensions in `shared_parameters` (the last conv or
    linear weight of the encoder in registration order): in a ResFormer, the last MLP weight of the
    last stage's attention path. The paper takes the last layer every task's gradient passes
    through; here the decoder also reads the earlier stages through the skips (and the multi-scale
    head the third stage), so G_t at W is a cheap proxy for a task's pull on the encoder, not all of it.
    Under torchrun, L_t and L_t(0) are means over every process; G_t is each process's own (the
    norm of its shard's gradient: a norm of the averaged gradient would need a differentiable
    all-reduce), and the weights' gradients are averaged before their step.
    """

    needs_shared_parameters = True

    def __init__(self, tasks: Sequence[str] = ("seg", "cls"), alpha: float = 1.5, lr: float = 0.025):
        super().__init__(tasks)
        self.alpha = check_number("alpha", alpha, 0,
                                  advice="1.5 as published; 0: equal gradient norms, whatever the training rates")
        self.lr = check_number("lr", lr, 0, above=True,
                               advice="the learning rate of the task weights' Adam, e.g. 0.025")
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.zeros(len(self.tasks)))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.optimizer = torch.optim.Adam([self.task_weights], lr=self.lr)
        self.last_grad_norms = torch.zeros(len(self.tasks))  # G_t of the last step, for inspection
        self.last_ratios = torch.ones(len(self.tasks))  # r_t of the last step, for inspection

    def backward(self, losses, shared_parameters=None, scale=None):
        if not shared_parameters:
            raise ValueError("GradNorm needs the shared parameters (the encoder) to measure gradient norms")
        layers = [p for p in _trainable(shared_parameters, "GradNorm") if p.dim() >= 2]
        if not layers:  # its norms are those of the last shared layer's weight matrix
            raise ValueError("GradNorm measures gradient norms at the last shared convolution or linear layer, but "
                             "the shared parameters hold none (only biases or norms); pass the encoder's parameters, "
                             "or use 'uncertainty' or 'dwa', which need no gradients")
        layer = layers[-1]  # last shared layer W
        task_losses = self._stack(losses)  # (T,)
        if not self.initialised:
            self.initial_losses = _average_across_processes(task_losses.detach().clone())
            self.initialised.fill_(True)
        elif not (self.initial_losses > 0).all():  # a task at 0 on the first batch (a batch of one class) would have
            # a ratio of 0 / 1e-12 for good, and so almost no weight: its L(0) is its first loss above 0
            now = _average_across_processes(task_losses.detach().clone())
            self.initial_losses = torch.where(self.initial_losses > 0, self.initial_losses, now)
        # G_t: graph kept (create_graph) so that the norm can be differentiated w.r.t. w_t. Under fp16
        # everything here is S times larger (S: the loss scale; 1 without a GradScaler): the gradients
        # are taken of the scaled loss, as the network's are, and the objective is differentiated in
        # that scaled form too, then divided by S in fp32. Dividing the norms by S first would send
        # values ~1/S back through fp16 operations, where they underflow to 0 (the weights would stop
        # moving on a T4). S overflowing gives inf, see after_step.
        scale = scale or (lambda t: t)
        loss_scale = scale(torch.ones((), device=task_losses.device))  # S
        grads = [torch.autograd.grad(scale(w * loss), layer, retain_graph=True, create_graph=True, allow_unused=True)[0]
                 for w, loss in zip(self.task_weights, task_losses)]
        if any(g is None for g in grads):  # torch: "One of the differentiated Tensors appears to not have been used"
            raise ValueError(f"GradNorm measures gradient norms at the last shared layer with 2 or more dimensions "
                             f"(a weight of shape {tuple(layer.shape)}), which the task losses do not reach (an unused "
                             "layer among the shared parameters?); pass the parameters every task uses, the encoder's")
        scaled_norms = torch.stack([g.norm() for g in grads])  # (T,) S * G_t
        current = _average_across_processes(task_losses.detach().clone())  # L_t over every process, as L_t(0)
        ratio = current / self.initial_losses.clamp_min(1e-12)
        ratio = ratio / ratio.mean()
        self.last_ratios = ratio.cpu()
        target = (scaled_norms.mean() * ratio**self.alpha).detach()  # a constant for the weights
        gradnorm_loss = (scaled_norms - target).abs().sum()  # S * sum_t |G_t - mean(G) r_t^alpha|
        weight_grad = torch.autograd.grad(gradnorm_loss, self.task_weights, retain_graph=True)[0] / loss_scale
        grad_norms = scaled_norms / loss_scale  # (T,) G_t
        # the network: weighted sum with the weights held constant (.detach())
        total = (self.task_weights.detach() * task_losses).sum()
        scale(total).backward()
        self.task_weights.grad = weight_grad
        self.last_grad_norms = grad_norms.detach().cpu()
        return total.detach()

    def combine(self, losses):
        raise _no_weighted_sum(self)

    def after_step(self):
        if self.task_weights.grad is None:
            return
        _average_across_processes(self.task_weights.grad)  # a rank's inf makes every rank's mean inf
        # fp16 gradients overflowed, in the layer G_t is measured at (the weights' own gradient is inf)
        # or anywhere else in the network (step_skipped): the GradScaler skipped the step, and so do the weights
        if self.step_skipped or not torch.isfinite(self.task_weights.grad).all():
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # renormalise: sum_t w_t = T (and keep them positive)
            self.task_weights.clamp_(min=1e-3)
            self.task_weights.mul_(len(self.tasks) / self.task_weights.sum())

    def weights(self):
        return dict(zip(self.tasks, self.task_weights.detach().tolist()))

    def options(self):
        return {"alpha": self.alpha, "lr": self.lr}

    def get_extra_state(self):
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


def project_conflicting(grads: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """PCGrad's projection of flat task gradients: list of (P,) -> list of (P,).

    For each task i and every other task j in random order: if g_i . g_j < 0 (they conflict),
    remove from g_i its component along g_j. Non-conflicting pairs are left untouched.
    """
    projected = []
    for i, grad in enumerate(grads):
        g = grad.clone()
        others = [j for j in torch.randperm(len(grads), generator=generator).tolist() if j != i]
        for j in others:
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g = g - dot / grads[j].pow(2).sum().clamp_min(1e-20) * grads[j]
        projected.append(g)
    return projected


class PCGrad(LossWeighting):
    """Projecting Conflicting Gradients (Yu, Kumar, Gupta, Levine, Hausman, Finn, NeurIPS 2020).

    When two tasks pull the shared encoder in opposing directions (negative dot product), the
    summed gradient favours the larger one and can hurt the other. PCGrad projects each task's
    gradient onto the normal plane of every gradient it conflicts with (random task order) and
    sums the results. Only the shared parameters are projected; task heads get their usual
    gradient. Costs one gradient pass per task (for the shared parameters) on top of the usual
    backward. Task weights stay 1. Under torchrun each task's gradient is averaged over the
    processes first (one all-reduce per task), so the update is PCGrad's of the whole batch.
    `seed` seeds the task order; fit(weighting="pcgrad", seed=s) passes s unless weighting_kwargs give one.
    """

    needs_shared_parameters = True

    def __init__(self, tasks: Sequence[str] = ("seg", "cls"), seed: int = 0):
        super().__init__(tasks)
        self.seed = check_int("seed", seed, 0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_cosine = float("nan")  # cosine between the first two task gradients, for inspection

    def combine(self, losses):
        raise _no_weighted_sum(self)

    def backward(self, losses, shared_parameters=None, scale=None):
        if not shared_parameters:
            raise ValueError("PCGrad needs the shared parameters (the encoder) to project their gradients")
        shared_parameters = _trainable(shared_parameters, "PCGrad")
        scale = scale or (lambda t: t)
        task_losses = self._stack(losses)
        grads = []
        for loss in task_losses:  # one gradient per task, flattened: (P,)
            parts = torch.autograd.grad(scale(loss), shared_parameters, retain_graph=True,
                                        allow_unused=True, materialize_grads=True)
            # under torchrun: the whole batch's gradient of this task, averaged over the processes before
            # the projection (which is not linear: projecting each shard's and averaging is another update)
            grads.append(_average_across_processes(torch.cat([g.reshape(-1) for g in parts])))
        if len(grads) >= 2:
            self.last_cosine = float(nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
        merged = torch.stack(project_conflicting(grads, self.generator)).sum(0)  # (P,)
        total = task_losses.sum()
        scale(total).backward()  # task heads: plain gradients; shared ones are replaced below
        # (`merged` is the same on every process: the same averaged gradients, the same random order)
        offset = 0
        for p in shared_parameters:
            # empty_like keeps the parameter's memory format: channels_last weights get channels_last
            # gradients (a plain view would be NCHW, and the optimiser's fused kernels fall back)
            p.grad = torch.empty_like(p).copy_(merged[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return total.detach()

    def weights(self):
        return {task: 1.0 for task in self.tasks}

    def options(self):
        return {"seed": self.seed}

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])


WEIGHTINGS = {
    "fixed": FixedWeights,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
}


def build_weighting(name: str, tasks: Sequence[str] = ("seg", "cls"), **kwargs) -> LossWeighting:
    """A weighting strategy by name, e.g. build_weighting("dwa", ("seg", "cls"), temperature=2.0)."""
    if isinstance(name, type) and issubclass(name, LossWeighting):  # a class, not an instance of it
        known = [key for key, kind in WEIGHTINGS.items() if kind is name]
        by_name = f"weighting={known[0]!r}" if known else "add it to mtlearn.weighting.WEIGHTINGS to use it by name"
        raise ValueError(f"weighting is the class {name.__name__}, not an instance of it: pass "
                         f"{name.__name__}({tuple(tasks)!r}), or {by_name}")
    if not isinstance(name, str) or name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; expected one of {tuple(WEIGHTINGS)}, or a LossWeighting "
                         "instance (one of your own: see the module docstring of mtlearn.weighting)")
    options = [p for p in inspect.signature(WEIGHTINGS[name]).parameters if p != "tasks"]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:  # rather than __init__'s "got an unexpected keyword argument" without the valid names
        raise ValueError(f"weighting {name!r} has no option {unknown}; its options are {options or 'none'} "
                         "(in fit: weighting_kwargs)")
    return WEIGHTINGS[name](tasks, **kwargs)


def weighting_settings(name: str, kwargs: Mapping[str, Any], tasks: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The weighting `name` (a registered name or a class name) and the options of the weighting it
    builds, defaults filled in: ("gradnorm", {}) and ("GradNorm", {"alpha": 1.5}) both give
    ("gradnorm", {"alpha": 1.5, "lr": 0.025}). An unregistered class (a user's own) keeps its name
    and the options given."""
    cls = WEIGHTINGS.get(name) or next((c for c in WEIGHTINGS.values() if c.__name__ == name), None)
    if cls is None:
        return name, dict(kwargs)
    return next(key for key, c in WEIGHTINGS.items() if c is cls), cls(tasks, **kwargs).options()


def _trainable(shared_parameters: Iterable[nn.Parameter], method: str) -> list[nn.Parameter]:
    """The shared parameters that train (as fit passes them); a frozen one made autograd.grad raise
    "One of the differentiated Tensors does not require grad", naming neither the method nor the cause."""
    trainable = [p for p in shared_parameters if p.requires_grad]
    if not trainable:
        raise ValueError(f"{method} needs shared parameters that train, but every one given is frozen "
                         "(requires_grad=False); unfreeze the encoder, or use 'fixed', 'uncertainty' or 'dwa'")
    return trainable


def find_shared_parameters(parameters: Iterable[nn.Parameter], losses: Mapping[str, Tensor]) -> list[nn.Parameter]:
    """The parameters that every task's loss reaches (the shared encoder), in the given order.

    One extra backward pass per task, done once: the graph is kept for the real backward.
    """
    parameters = [p for p in parameters if p.requires_grad]
    reached = [torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
               for loss in losses.values()]
    shared = [p for k, p in enumerate(parameters) if all(grads[k] is not None for grads in reached)]
    if not shared:
        raise ValueError(f"the tasks {tuple(losses)} share no parameters; gradient-based weighting "
                         "(gradnorm, pcgrad) needs a shared encoder; use 'fixed' or 'uncertainty'")
    return shared


def delta_m(mtl_metrics: Mapping[str, float], single_task_metrics: Mapping[str, float],
            higher_is_better: Mapping[str, bool] | None = None) -> float:
    """Multi-task gain in percent (Maninis et al. 2019; Vandenhende et al. 2021, eq. 11):

        Delta_m = 100 / M * sum_i (-1)^{l_i} (M_mtl,i - M_single,i) / |M_single,i|,

    over the M metrics in `single_task_metrics`, with l_i = 1 when lower is better. Positive: the
    multi-task model beats the single-task models on average. The papers average over tasks (and over
    each task's metrics within it); over metrics it is the same when each task has one, as here
    (seg/dice, cls/acc): give one metric per task, or a task with three metrics weighs three times.
    `higher_is_better` maps metric name -> bool; for a name it omits, the name decides: losses, errors
    and distances are lower-is-better (names containing "loss", "error", "mse", "mae", "distance",
    "hausdorff", "entropy", "brier", "lpips", depth's "abs_rel" and "sq_rel", a normal's "mean_angle",
    or with a part such as "hd95", "asd", "nll", "ece", "fid", "fpr", "fnr" or "log10"), unless the
    name says it is a reduction, an improvement or a gain, or a normalised surface Dice ("nsd");
    everything else is higher-is-better. Say it with `higher_is_better` when in doubt.
    """
    if not single_task_metrics:
        raise ValueError("single_task_metrics is empty; give at least one baseline metric")
    stray = sorted(set(higher_is_better or {}) - set(single_task_metrics))
    if stray:  # a misspelt name would silently fall back to guessing its direction from the name
        raise ValueError(f"higher_is_better names {stray}, which single_task_metrics lacks; its metrics are "
                         f"{sorted(single_task_metrics)}")
    total = 0.0
    for name, baseline in single_task_metrics.items():
        if name not in mtl_metrics:
            raise ValueError(f"metric {name!r} of the single-task baseline is missing from mtl_metrics "
                             f"(which has {sorted(mtl_metrics)})")
        # text read from a file: a "0.5" was taken as it came, a "0.4" baseline failed in a comparison
        baseline = _as_float(baseline, f"baseline metric {name!r}")
        value = _as_float(mtl_metrics[name], f"multi-task metric {name!r}")
        if baseline == 0 or not math.isfinite(baseline):
            raise ValueError(f"baseline metric {name!r} is {baseline}; the relative change is undefined")
        if not math.isfinite(value):  # NaN made Delta_m NaN without a word
            raise ValueError(f"multi-task metric {name!r} is {value}: the run diverged or the metric could not be "
                             "computed; Delta_m is undefined")
        if higher_is_better is not None and name in higher_is_better:
            higher = bool(higher_is_better[name])
        else:
            higher = not _lower_is_better(name)
        sign = 1.0 if higher else -1.0
        total += sign * (value - baseline) / abs(baseline)
    return 100.0 * total / len(single_task_metrics)


# what a metric's name says about its direction (delta_m): a Hausdorff distance taken as higher-is-better
# flipped its term's sign without a word. Words match anywhere in the name, parts between "/", "_", ...;
# the higher-is-better ones win (an error *reduction*, the normalised surface *Dice*).
_HIGHER_IS_BETTER_WORDS = ("reduction", "improvement", "gain", "normalized_surface", "normalised_surface")
_HIGHER_IS_BETTER_PARTS = {"nsd"}
_LOWER_IS_BETTER_WORDS = ("loss", "error", "mse", "mae", "distance", "hausdorff", "entropy", "brier", "lpips",
                          "abs_rel", "sq_rel", "mean_angle", "median_angle")  # depth and surface-normal errors
_LOWER_IS_BETTER_PARTS = {"hd", "hd95", "asd", "assd", "msd", "nll", "ece", "mce", "fid", "fpr", "fnr", "voe", "rvd",
                          "log10", "rmse"}


def _lower_is_better(name: str) -> bool:
    lowered = name.lower()
    parts = set(re.split(r"[^a-z0-9]+", lowered))
    if any(word in lowered for word in _HIGHER_IS_BETTER_WORDS) or parts & _HIGHER_IS_BETTER_PARTS:
        return False
    return any(word in lowered for word in _LOWER_IS_BETTER_WORDS) or bool(parts & _LOWER_IS_BETTER_PARTS)


def _as_float(value, what: str) -> float:
    """`value` (a Python or NumPy number, or a one-element tensor) as a float; a ValueError naming `what` for
    text, a bool or anything else."""
    if isinstance(value, Tensor):
        ok = value.numel() == 1
    elif isinstance(value, np.ndarray):
        ok = value.size == 1
    else:
        ok = is_number(value)  # False for text and bools
    if not ok:
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)
