"""Task losses for multi-task training: one loss module per task, built from a small config.

Each task reads its prediction from the model's output dict and its target from the batch:

    task     prediction                    target (batch key)          loss
    "seg"    (B, K, H, W) logits           "mask"  (B, 1, H, W) 0..K-1 Dice + cross-entropy (or Dice + focal)
    "cls"    (B, num_classes) logits       "label" (B,) int            cross-entropy (optional class weights)
    "recon"  (B, C, H, W) image            "clean" (B, C, H, W)        L1 (or MSE)

The segmentation losses come from MONAI; the others are PyTorch's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtlearn.utils import check_number

# Which batch key holds each task's target (COMMON interface). The order is the canonical task order.
TASK_TARGETS = {"seg": "mask", "cls": "label", "recon": "clean"}
TASKS = tuple(TASK_TARGETS)

SEG_LOSSES = ("dicece", "dicefocal")
RECON_LOSSES = ("l1", "mse")


@dataclass
class LossConfig:
    """Which loss each task trains with (`fit(..., losses=LossConfig(...))`); the defaults suit two-class masks."""

    seg: str = "dicece"  # "dicece" (Dice + cross-entropy) or "dicefocal" (Dice + focal: ResFormer, several classes)
    focal_gamma: float = 2.0  # focusing parameter of the focal term (Lin et al. 2017); used by "dicefocal" only
    class_weights: Sequence[float] | None = None  # per-class weights of the classification cross-entropy (None: equal)
    recon: str = "l1"  # "l1" or "mse" for the denoising / reconstruction task


def class_indices(mask: Tensor) -> Tensor:
    """A mask as long class indices: a soft (float) mask rounds to the nearest class, a bool mask is 0/1."""
    return mask.long() if mask.dtype == torch.bool else mask.round().long()


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Validate a task list and return it as a tuple in the order given."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    try:
        tasks = tuple(tasks)
    except TypeError:  # a number: "'int' object is not iterable" named nothing
        raise ValueError(f"tasks must name some of {TASKS}, e.g. ('seg', 'cls'), got {tasks!r}") from None
    if not tasks:
        raise ValueError(f"tasks must name at least one of {TASKS}, got an empty list")
    for task in tasks:
        if task not in TASK_TARGETS:
            raise ValueError(f"unknown task {task!r}; expected some of {TASKS}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must not repeat, got {tasks}")
    return tasks


class DiceSoftmaxFocal(nn.Module):
    """Dice + focal loss, both on the softmax of the logits.

    focal = mean over pixels of -(1 - p_t)^focal_gamma log p_t, p_t the softmax probability of the true
    class (Lin et al. 2017).
    Why not MONAI's DiceFocalLoss: (in MONAI 1.6) its focal part applies a sigmoid to each channel
    separately, which is not the multi-class focal loss of the paper and is not even invariant to
    adding a constant to every logit. MONAI's softmax FocalLoss is, but it averages over the K
    channels too, where only the true class's is non-zero: that is the per-pixel focal loss / K,
    so we multiply by K, or the focal term would weigh half as much as Dice with 2 classes.
    logits: (B, K, H, W), mask: (B, 1, H, W) class indices -> scalar
    """

    def __init__(self, focal_gamma: float = 2.0):
        super().__init__()
        # < 0 gives NaN on confident pixels
        check_number("focal_gamma", focal_gamma, 0, advice="2 as published; 0: plain cross-entropy")
        from monai.losses import DiceLoss, FocalLoss  # here: MONAI takes ~3 s to import (train --help waited)

        self.dice = DiceLoss(softmax=True, to_onehot_y=True)
        self.focal = FocalLoss(to_onehot_y=True, gamma=focal_gamma, use_softmax=True)

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        """logits: (B, K, H, W), mask: (B, 1, H, W) class indices -> scalar"""
        return self.dice(logits, mask) + self.focal(logits, mask) * logits.shape[1]


def _index_range(targets: Tensor, module: nn.Module) -> tuple[float, float] | None:
    """(min, max) of the targets as they came (NaN when one is NaN: what .long() makes of NaN is
    undefined, int64's minimum on x86, 0 on ARM), or None when this call need not look.

    Reading a value of a GPU tensor waits for every queued kernel, which would stall each training
    step. So on an accelerator only the first batch a loss module sees is checked (targets that are
    wrong, 0/255 masks or 1-based labels, are wrong from the first batch on); on the CPU, always.
    """
    if not targets.numel() or (targets.device.type != "cpu" and getattr(module, "_targets_checked", False)):
        return None
    module._targets_checked = True
    low, high = torch.stack(torch.aminmax(targets.to(torch.uint8) if targets.dtype == torch.bool else targets)).tolist()
    return low, high


def describe_index_range(low: float, high: float, count: int) -> str | None:
    """What is wrong with class indices ranging over [low, high] for `count` classes ("max 255"), as a
    float mask rounds them; None when nothing is."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "NaN or inf values"
    if round(high) >= count:
        return f"max {high:g}"
    return f"min {low:g}" if round(low) < 0 else None


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy (or Dice + focal) on softmax logits, from MONAI.

    Dice alone ignores how confident the pixels are and is noisy on small lesions; the
    cross-entropy (or focal) term gives every pixel a smooth gradient. ResFormer (Bui et al. 2024)
    trains with Dice (+ focal, gamma 2, for several classes).

    The Dice part is MONAI's: per image and per class, background included, averaged. On an image
    whose mask is empty (a normal scan) the foreground class has nothing to overlap, so its Dice is
    about 0 whatever the model predicts (only predicted foreground summing below the 1e-5 smoothing
    escapes it): such an image adds a nearly constant 1/K to the Dice part, with almost no gradient,
    and the cross-entropy (focal) term alone teaches it to stay empty. So the reported segmentation
    loss keeps a floor that grows with the share of normal scans, however good the masks are.
    (nnU-Net instead takes Dice over the whole batch: MONAI's DiceLoss(batch=True).)
    """

    def __init__(self, kind: str = "dicece", focal_gamma: float = 2.0):
        super().__init__()
        if kind not in SEG_LOSSES:
            raise ValueError(f"unknown segmentation loss {kind!r}; expected one of {SEG_LOSSES}")
        self.kind = kind
        # checked whichever loss is chosen: one config may switch seg to "dicefocal" later
        check_number("focal_gamma", focal_gamma, 0, advice="2 as published; 0: plain cross-entropy")
        if kind == "dicece":
            from monai.losses import DiceCELoss  # here, not at the top: see DiceSoftmaxFocal

            self.loss = DiceCELoss(softmax=True, to_onehot_y=True)
        else:
            self.loss = DiceSoftmaxFocal(focal_gamma)

    def forward(self, logits: Tensor, mask: Tensor) -> Tensor:
        """logits: (B, K, H, W), mask: (B, 1, H, W) with values 0..K-1 (float or int) -> scalar."""
        check_seg_pair(logits, mask)
        extremes = _index_range(mask, self)  # MONAI's one-hot would fail with "index 255 is out of bounds"
        mask = class_indices(mask)  # (B, 1, H, W)
        if extremes is not None:
            bad = describe_index_range(*extremes, logits.shape[1])
            if bad is not None:
                raise ValueError(
                    f"segmentation mask values must be class indices 0..{logits.shape[1] - 1}, got {bad}; "
                    f"a 0/255 mask needs mask / 255 (or > 0), and seg_classes must cover every mask value"
                )
        return self.loss(logits.float(), mask)


def check_tensors(**named) -> None:
    """Refuse a loss input that is not a torch tensor (a NumPy mask, a list of labels), naming it."""
    for name, value in named.items():
        if not isinstance(value, Tensor):  # else an AttributeError: "'numpy.ndarray' object has no attribute"
            raise ValueError(f"{name} must be a torch tensor, got a {type(value).__name__}; convert it with "
                             "torch.as_tensor(...)")


def check_seg_pair(logits: Tensor, mask: Tensor) -> None:
    """Refuse segmentation logits that are not (B, K >= 2, H, W), or a mask that is not (B, 1, H, W) beside them.

    One channel cannot be a softmax over classes (its argmax is always background, and MONAI's loss
    only warns); a mask of another batch size or size fails later in MONAI with a bare AssertionError.
    """
    check_tensors(**{"segmentation logits": logits, "segmentation mask": mask})
    if logits.dim() != 4:
        raise ValueError(f"segmentation logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"segmentation logits need one channel per class including background (>= 2), "
                         f"got {logits.shape[1]} channel(s) in shape {tuple(logits.shape)}")
    wanted = (logits.shape[0], 1, *logits.shape[2:])  # (B, 1, H, W)
    if tuple(mask.shape) != wanted:
        fix = "; a (B, H, W) mask needs mask.unsqueeze(1)" if mask.dim() == 3 else ""
        if mask.dim() == 4 and mask.shape[1] == logits.shape[1] and mask.shape[0] == logits.shape[0]:
            fix = "; a one-hot mask (one channel per class) needs mask.argmax(1, keepdim=True)"
        raise ValueError(f"segmentation target must be (B, 1, H, W) matching logits {tuple(logits.shape)}, got "
                         f"{tuple(mask.shape)}{fix}")


def check_class_logits(logits: Tensor) -> None:
    """Refuse classification logits that are not (B, num_classes >= 2), with the fix.

    A head with one output per image, (B,) or (B, 1) (a sigmoid-style binary head), would fail in
    torch with an IndexError, or train a cross-entropy over one class, which is always 0.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"classification logits must have shape (B, num_classes) with num_classes >= 2, got "
                         f"{tuple(logits.shape)}; a binary task needs two logits per image (a head with 2 outputs, "
                         "e.g. nn.Linear(features, 2), and labels 0/1), not one sigmoid logit")


def check_class_weights(class_weights: Sequence[float] | None, dtype=torch.float32) -> Tensor | None:
    """class_weights as a flat tensor, or None; a ValueError for anything a weighted mean cannot use.

    NaN passes `< 0`, and weights summing to 0 divide by 0: either makes the loss NaN.
    """
    if class_weights is None:
        return None
    try:
        weight = torch.as_tensor(class_weights, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):  # text, ragged lists
        weight = None
    if (weight is None or weight.dim() != 1 or not torch.isfinite(weight).all() or (weight < 0).any()
            or weight.sum() <= 0):
        raise ValueError(f"class_weights must be a flat list of finite, non-negative numbers, not all 0 (e.g. "
                         f"[1.0, 3.0]), got {class_weights!r}")
    return weight


def check_class_weight_count(count: int, num_classes: int) -> None:
    """One class weight per class of the model, or a ValueError saying so (the loss and the metrics alike)."""
    if count != num_classes:
        raise ValueError(f"class_weights has {count} entries but the model predicts {num_classes} classes: give "
                         "one weight per class, in class-index order")


class ClassificationLoss(nn.Module):
    """Cross-entropy on logits, optionally weighted per class to counter class imbalance."""

    def __init__(self, class_weights: Sequence[float] | None = None):
        super().__init__()
        self.register_buffer("weight", check_class_weights(class_weights))

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        """logits: (B, num_classes), label: (B,) int in 0..num_classes-1 -> scalar."""
        check_tensors(**{"classification logits": logits, "classification labels": label})
        check_class_logits(logits)
        if self.weight is not None:
            check_class_weight_count(self.weight.numel(), logits.shape[1])
        num_classes = logits.shape[1]
        # torch's own errors here are raw ("Target 5 is out of bounds", a device-side assert on CUDA)
        if label.dtype.is_floating_point or label.numel() != len(logits):
            raise ValueError(
                f"classification labels must be (B,) integer class indices 0..{num_classes - 1}, got "
                f"{label.dtype} of shape {tuple(label.shape)} for {len(logits)} predictions; "
                f"one-hot labels need label.argmax(1), whole-number float ones label.long() (a fraction such as "
                f"0.5 is no class index: check where the labels come from)"
            )
        label = label.long().view(-1)
        extremes = _index_range(label, self)
        if extremes is not None:
            low, high = extremes
            if low < 0 or high >= num_classes:
                fix = f"build the model with num_classes={high + 1} or " if high >= num_classes else ""
                raise ValueError(
                    f"classification labels must be class indices 0..{num_classes - 1} (num_classes={num_classes}), "
                    f"got {f'max {high}' if high >= num_classes else f'min {low}'}; "
                    f"{fix}map the labels to 0..{num_classes - 1}"
                )
        if self.weight is None:
            return nn.functional.cross_entropy(logits.float(), label)
        # torch's weighted mean divides by the batch's summed label weights: 0/0 = NaN for a batch of
        # zero-weight labels only (a class weighted 0 to leave it out), which stopped training as if the
        # model had diverged. Such a batch adds 0, as in MetricAccumulator; no GPU sync to find out.
        summed = nn.functional.cross_entropy(logits.float(), label, weight=self.weight, reduction="sum")
        return summed / self.weight[label].sum().clamp_min(torch.finfo(torch.float32).tiny)


class ReconstructionLoss(nn.Module):
    """Pixel-wise L1 (robust to outliers, sharper images) or MSE between output and clean image."""

    def __init__(self, kind: str = "l1"):
        super().__init__()
        if kind not in RECON_LOSSES:
            raise ValueError(f"unknown reconstruction loss {kind!r}; expected one of {RECON_LOSSES}")
        self.kind = kind

    def forward(self, output: Tensor, clean: Tensor) -> Tensor:
        """output, clean: (B, C, H, W) -> scalar."""
        check_tensors(**{"reconstruction output": output, "reconstruction target": clean})
        if output.shape != clean.shape:
            raise ValueError(f"reconstruction output {tuple(output.shape)} and target {tuple(clean.shape)} differ")
        if not clean.is_floating_point():  # a uint8 target trained toward 0..255: a loss 255 times too large
            raise ValueError(f"the reconstruction target is {clean.dtype}; give the clean image as floats on the "
                             "input images' scale (8-bit: clean.float() / 255)")
        if self.kind == "l1":
            return nn.functional.l1_loss(output.float(), clean.float())
        return nn.functional.mse_loss(output.float(), clean.float())


def build_losses(tasks: Sequence[str] = ("seg", "cls"), config: LossConfig | None = None) -> nn.ModuleDict:
    """One loss module per task, keyed by task name."""
    tasks = check_tasks(tasks)
    if config is not None and not isinstance(config, LossConfig):  # a dict fails later as "no attribute 'seg'"
        given = ", ".join(f"{k}={v!r}" for k, v in config.items()) if isinstance(config, Mapping) else ""
        given = given or "seg='dicefocal'"
        raise ValueError(f"losses must be a LossConfig (from mtlearn.losses) or None for the defaults, got a "
                         f"{type(config).__name__}; pass e.g. losses=LossConfig({given})")
    config = config or LossConfig()
    makers = {
        "seg": lambda: SegmentationLoss(config.seg, config.focal_gamma),
        "cls": lambda: ClassificationLoss(config.class_weights),
        "recon": lambda: ReconstructionLoss(config.recon),
    }
    return nn.ModuleDict({task: makers[task]() for task in tasks})


def check_outputs(outputs) -> None:
    """Refuse model outputs that are not a dict task -> prediction, with the fix.

    Without this, a network that returns its logits as a plain tensor (MONAI's UNet, say) fails
    inside torch with "Tensor.__contains__ only supports Tensor or scalar", which names neither the
    model nor the dict it should return.
    """
    if not isinstance(outputs, Mapping):
        raise ValueError(f"the model returned a {type(outputs).__name__}, not a dict of task outputs; return one "
                         "keyed by task from forward, e.g. {'seg': logits} for a segmentation network (MONAI's UNet "
                         "and SwinUNETR come wrapped so by mtlearn.mtl.monai_baseline('unet'))")


def task_losses(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor],
                loss_fns: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """Compute every task's loss: outputs[task] against batch[TASK_TARGETS[task]].

    Raises a ValueError naming the task when the model output or the batch target is missing.
    """
    check_outputs(outputs)
    losses = {}
    for task, loss_fn in loss_fns.items():
        if task not in outputs:
            raise ValueError(
                f"the model returned no output for task {task!r} (it returned {sorted(outputs)}); "
                f"build the model with this task or train on a subset of its tasks"
            )
        key = TASK_TARGETS[task]
        if key not in batch:
            raise ValueError(
                f"task {task!r} needs the target batch[{key!r}], but the batch only has {sorted(batch)}; "
                f"use a dataset that provides {key!r} or drop {task!r} from tasks"
            )
        target = batch[key].to(outputs[task].device, non_blocking=True)
        losses[task] = loss_fn(outputs[task], target)
    return losses
