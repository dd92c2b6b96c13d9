"""Evaluation metrics for every task, and an accumulator that sums them over a data loader.

    key                  meaning                                                      source
    "seg/dice"           mean per-image Dice of the foreground classes                 monai.metrics.compute_dice
    "seg/iou"            mean per-image IoU (Jaccard) of the foreground classes        monai.metrics.compute_iou
    "cls/acc"            accuracy                                                      confusion matrix
    "cls/balanced_acc"   mean recall over the classes present (sklearn's definition)   confusion matrix
    "cls/sensitivity"    recall of the last class (malignant) against the rest         confusion matrix
    "cls/specificity"    true-negative rate of the last class against the rest         confusion matrix
    "cls/auc"            ROC AUC, one-vs-rest, averaged over the classes present       monai.metrics.compute_roc_auc
    "recon/psnr"         mean per-image PSNR in dB, each capped at 100 dB              monai.metrics.PSNRMetric
    "recon/ssim"         mean per-image SSIM (2-D)                                     monai.metrics.SSIMMetric
    "<task>/loss"        mean loss per image (when the losses are given; cls with class weights: weighted by
                         the labels' class weights, as the loss itself is)

Choices worth knowing:
- An image whose ground-truth mask is empty (a "normal" scan) scores Dice/IoU 1 when the prediction
  is empty too and 0 otherwise (MONAI's ignore_empty=False), so false alarms on normal scans count.
- With more than two segmentation classes, an image's Dice/IoU is the mean over the foreground classes
  present in its true mask or its prediction (a class absent from both is skipped, not counted as a
  perfect 1); an image whose whole foreground is empty in both scores 1, as in the binary case.
- SSIM uses an 11 x 11 Gaussian window (sigma 1.5, as scikit-image's gaussian_weights=True); on an
  image smaller than 11 pixels the window shrinks to the largest odd size that fits (a 2-pixel side
  gives a 1 x 1 window: SSIM of single pixels), where scikit-image refuses the image. MONAI computes it in
  float32, as E[x^2] - E[x]^2 for the variances, which cancels on large flat bright regions: there it can
  read up to about 1e-3 below scikit-image's float64 value (a flat 1.0 against a flat 1.25: 0.9745, not 0.9756).
- A perfect reconstruction has infinite PSNR; each image's PSNR is capped at PSNR_CEILING_DB (100 dB)
  so that one such image cannot make the mean inf.
- Sensitivity and specificity are those of the last class against all the others: malignant, in
  every breast-ultrasound dataset here (class 1 of two, class 2 of normal / benign / malignant; the
  loaders order their classes so). That is the clinical question: how many cancers are caught, how
  many other scans are cleared. Averaged over the classes instead (macro), the sensitivity would
  repeat the balanced accuracy, and the specificity would count the normal class's, which no one reads.
- ROC AUC ranks the images by their one-vs-rest log-odds (one_vs_rest_scores), not by the
  float32 softmax: a confident model's probabilities round to exactly 1.0 (from a logit gap of
  about 17), and the ties would make its AUC depend on that rounding. The ranking is the same.

The accumulator keeps sums and counts, not averages, so that several processes (torchrun) can add
theirs with one all_reduce before the division.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mtlearn.losses import (TASK_TARGETS, check_class_logits, check_class_weight_count, check_class_weights,
                            check_outputs, check_seg_pair, check_tasks, class_indices, describe_index_range)
from mtlearn.utils import check_number, is_int

METRIC_KEYS = {
    "seg": ("seg/dice", "seg/iou"),
    "cls": ("cls/acc", "cls/balanced_acc", "cls/sensitivity", "cls/specificity", "cls/auc"),
    "recon": ("recon/psnr", "recon/ssim"),
}

# Per-image PSNR ceiling. 100 dB is an RMSE of 1e-5 of the data range. Quantisation alone leaves an RMSE of
# 1/sqrt(12) of a step: ~59 dB for the 8-bit scans used here (~107 dB for 16-bit images, just above the cap),
# so an image above 100 dB is indistinguishable from perfect at their precision, and capping keeps the mean
# finite when one image has zero error.
PSNR_CEILING_DB = 100.0


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, sensitivity, specificity from a (K, K) confusion matrix.

    confusion[i, j] counts images of true class i predicted as class j. Sensitivity and
    specificity are the last class's (malignant) against the rest; nan when no image of it, or
    none of the others, is among the labels.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"a confusion matrix is (K, K), true classes by predicted ones, got shape {confusion.shape}")
    if not np.isfinite(confusion).all() or (confusion < 0).any():
        raise ValueError("a confusion matrix holds counts (finite, >= 0); got negative or non-finite entries")
    total = confusion.sum()
    tp = np.diag(confusion)
    fn = confusion.sum(axis=1) - tp  # true class k, predicted something else
    fp = confusion.sum(axis=0) - tp  # predicted k, true class something else
    tn = total - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / (tp + fn)  # nan for a class absent from the labels
        specificity = tn / (tn + fp)
    return {
        "cls/acc": float(tp.sum() / total) if total else float("nan"),
        "cls/balanced_acc": _nanmean(recall),
        # the last class, the positive one (see the module's notes); no class at all: nothing to report
        "cls/sensitivity": float(recall[-1]) if len(recall) else float("nan"),
        "cls/specificity": float(specificity[-1]) if len(specificity) else float("nan"),
    }


def one_vs_rest_scores(logits: np.ndarray | Tensor) -> np.ndarray:
    """(N, K) logits -> (N, K) float64 scores s[:, k] = log(p_k / (1 - p_k)), p = softmax(logits).

    The log-odds of each class against the rest: they rank the images exactly as p_k does, but
    computed as logit_k - logsumexp(other logits) they do not round to a tie where p_k rounds to 1.
    Each row is shifted by its largest logit first (when finite), so rows with the same softmax (logits
    that differ by a constant) get the same scores, a tie, rather than ones a rounding apart.
    """
    logits = torch.as_tensor(logits).detach().cpu().double()  # a model's output as it comes, or an array
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with K >= 2 classes, got {tuple(logits.shape)}")
    shift = logits.amax(dim=1, keepdim=True)
    logits = logits - shift.nan_to_num(0.0, posinf=0.0, neginf=0.0)  # an infinite logit keeps its own sign
    others = logits.unsqueeze(1).expand(-1, logits.shape[1], -1)  # (N, K, K): row k holds every logit
    own = torch.eye(logits.shape[1], dtype=torch.bool)  # ... of which class k's own is masked out
    return (logits - torch.logsumexp(others.masked_fill(own, float("-inf")), dim=2)).numpy()


def class_labels(labels: Tensor, name: str = "class labels") -> Tensor:
    """`labels` as long class indices, or a ValueError naming `name` for fractional or non-finite ones (.long()
    would truncate 1.7 to 1, and turn NaN or inf into a garbage class)."""
    if labels.dtype.is_floating_point:
        bad = labels[~torch.isfinite(labels) | (labels != labels.round())].flatten()
        if len(bad):
            raise ValueError(f"{name} must be whole numbers (class indices), got {bad[:3].tolist()}"
                             f"{' and more' if len(bad) > 3 else ''}; probabilities or soft labels need .argmax(1) "
                             "(one column per class) or rounding, and NaN labels dropping or fixing")
    return labels.long()


def roc_auc(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float:
    """One-vs-rest ROC AUC averaged over the classes that occur in `labels` (and have negatives).

    scores: (N, K), higher = more likely class k: softmax probabilities, or better the
    one_vs_rest_scores of the logits (the same ranking, without ties from rounding);
    labels: (N,) ints -> float (nan when undefined, and when a score is NaN: a diverged model has no
    ranking, and MONAI would rank its NaNs somewhere and report a plausible AUC).
    """
    # detached and on the CPU first: np.asarray fails on a tensor that needs grad or lives on a GPU
    scores = torch.as_tensor(scores.detach().cpu() if isinstance(scores, Tensor) else np.asarray(scores),
                             dtype=torch.float64)
    labels = torch.as_tensor(labels.detach().cpu() if isinstance(labels, Tensor) else np.asarray(labels)).flatten()
    labels = class_labels(labels)
    if scores.ndim != 2 or scores.shape[0] != len(labels):
        raise ValueError(f"roc_auc needs (N, K) scores, one column per class, for N = {len(labels)} labels, got "
                         f"shape {tuple(scores.shape)}; for one positive-class score s per image pass "
                         "torch.stack([-s, s], dim=1)")
    if len(labels) == 0:
        return float("nan")
    if int(labels.min()) < 0 or int(labels.max()) >= scores.shape[1]:
        raise ValueError(f"labels must be class indices 0..{scores.shape[1] - 1} (one per score column), "
                         f"got values {int(labels.min())}..{int(labels.max())}")
    if scores.isnan().any():
        return float("nan")
    from monai.metrics import compute_roc_auc  # MONAI is imported where used: it takes ~3 s (mtlearn.train --help)

    onehot = torch.nn.functional.one_hot(labels, scores.shape[1])  # (N, K)
    with warnings.catch_warnings():  # MONAI warns for a class with no positives (or no negatives)
        warnings.simplefilter("ignore", UserWarning)
        per_class = compute_roc_auc(scores, onehot, average="none")  # (K,), nan where undefined
    return _nanmean(np.asarray(per_class, dtype=np.float64))


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


class MetricAccumulator:
    """Sums every task's metrics over batches; `compute()` turns them into one dict of floats.

    Usage: acc.update(model_outputs, batch) per batch, acc.sync() under torchrun, acc.compute().
    The classification logits and labels are kept (ROC AUC needs them all), so after an evaluation
    `probabilities`, `scores`, `labels` and `confusion_matrix()` feed ROC and confusion-matrix plots.
    """

    def __init__(self, tasks: Sequence[str] = ("seg", "cls"), num_classes: int | None = None,
                 data_range: float = 1.0, class_weights: Sequence[float] | None = None):
        self.tasks = check_tasks(tasks)
        if num_classes is not None and (not is_int(num_classes) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 (the classification logits' width), or None to take it "
                             f"from the first logits, got {num_classes!r}")
        self._given_classes = num_classes  # what reset() goes back to
        self.num_classes = num_classes  # inferred from the first classification logits when None
        # those of the classification loss (LossConfig.class_weights): its batch mean divides by the
        # batch's summed label weights, so "cls/loss" weights each batch by that sum, not its size
        self.class_weights = check_class_weights(class_weights, torch.float64)
        if self.class_weights is not None and num_classes is not None:
            check_class_weight_count(len(self.class_weights), num_classes)
        # max - min of the clean images, for PSNR and SSIM
        self.data_range = check_number("data_range", data_range, 0, above=True,
                                       advice="max - min of the clean images, e.g. 1.0")
        self.reset()

    def __repr__(self) -> str:  # was "<mtlearn.metrics.MetricAccumulator object at 0x...>"
        seen = int(max(*self.counts.values(), sum(len(labels) for labels in self._labels), 0))  # cls: kept labels
        return (f"MetricAccumulator(tasks={self.tasks}, num_classes={self.num_classes}, {seen} images so far; "
                ".compute() for the metrics)")

    def reset(self) -> None:
        """Forget every batch, and a class count read from the logits: the next pass may have another."""
        self.num_classes = self._given_classes
        self.sums: dict[str, float] = {}  # metric -> sum over images
        self.counts: dict[str, float] = {}  # metric -> number of images that contributed
        self.confusion = None if self.num_classes is None else np.zeros((self.num_classes,) * 2, np.int64)
        self._logits: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.synced = False  # sync() has added the other processes' totals in: a second one would again

    @property
    def empty(self) -> bool:
        """True until the first update() (and again after reset())."""
        return not self.counts and not self._labels

    def _add(self, key: str, values: Tensor, skip_nan: bool = True) -> None:
        """Add per-image values; skip_nan drops undefined ones (Dice of an image with nothing to find)."""
        values = values.detach().cpu().double().flatten()  # .cpu() first: MPS has no float64
        if skip_nan:
            values = values[~torch.isnan(values)]
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
        self.counts[key] = self.counts.get(key, 0.0) + float(values.numel())

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor],
               losses: Mapping[str, Tensor] | None = None) -> None:
        """outputs: the model's dict; batch: the loader's dict; losses: optional per-task batch mean losses
        (a scalar tensor or a float each).

        Shapes as the losses take them: "seg" (B, K, H, W) logits and "mask" (B, 1, H, W) class
        indices 0..K-1; "cls" (B, num_classes) logits and "label" (B,) class indices; "recon" and
        "clean" (B, C, H, W).
        """
        check_outputs(outputs)
        if self.synced:  # the totals are every process's now; this batch would join them on one only
            raise ValueError("update() after sync(): the accumulator holds every process's totals; call reset() "
                             "to start a new pass")
        for task in self.tasks:
            key = TASK_TARGETS[task]
            if task not in outputs or key not in batch:
                raise ValueError(f"task {task!r} needs outputs[{task!r}] and batch[{key!r}]")
            prediction = outputs[task].detach().float()
            if not isinstance(batch[key], Tensor):  # a list of labels: "'list' object has no attribute 'to'"
                raise TypeError(f"batch[{key!r}] must be a tensor, got a {type(batch[key]).__name__}; convert it with "
                                f"torch.as_tensor(...) (a DataLoader's batches already are)")
            target = batch[key].to(prediction.device)
            if task == "seg":
                self._update_seg(prediction, target)
            elif task == "cls":
                self._update_cls(prediction, target)
            else:
                self._update_recon(prediction, target.float())
            if losses is not None and task in losses:
                self._add_loss(task, losses[task], target)

    def _add_loss(self, task: str, loss: Tensor, target: Tensor) -> None:
        """Add one batch's mean loss, weighted by what it is a mean over: its images, or for a
        class-weighted cross-entropy the summed weights of its labels (so that the result is the
        dataset's loss whatever the batch size)."""
        loss = torch.as_tensor(loss)  # a float from loss.item() too
        if loss.numel() != 1:
            raise ValueError(f"losses[{task!r}] must be the batch's mean loss (one number), got shape "
                             f"{tuple(loss.shape)}; per-image losses need .mean()")
        weight = float(len(target))
        if task == "cls" and self.class_weights is not None:
            check_class_weight_count(len(self.class_weights), self.num_classes)
            weight = float(self.class_weights[target.detach().long().view(-1).cpu()].sum())
            if weight == 0:  # only zero-weight labels: torch's mean is 0/0, and the dataset's gets nothing
                return
        key = f"{task}/loss"
        # a NaN loss is a failure, not an undefined value: it must make the mean NaN, not vanish
        self.sums[key] = self.sums.get(key, 0.0) + float(loss.detach().cpu().double()) * weight
        self.counts[key] = self.counts.get(key, 0.0) + weight

    def _update_seg(self, logits: Tensor, mask: Tensor) -> None:
        check_seg_pair(logits, mask)
        if not len(logits):  # an empty batch adds nothing (MONAI's Dice fails on it: "non-empty TensorList")
            return
        num_seg = logits.shape[1]
        if mask.numel():  # the .cpu() of the scores below waits for the GPU anyway: no extra stall
            raw = mask.to(torch.uint8) if mask.dtype == torch.bool else mask  # before rounding: NaN stays NaN
            bad = describe_index_range(*torch.stack(torch.aminmax(raw)).tolist(), num_seg)
            if bad is not None:
                raise ValueError(f"segmentation mask values must be class indices 0..{num_seg - 1}, got {bad}; a "
                                 "0/255 mask needs mask / 255 (or > 0), and the logits need one channel per mask value")
        from monai.metrics import compute_dice, compute_iou

        indices = class_indices(mask[:, 0])  # (B, H, W)
        pred = torch.nn.functional.one_hot(logits.argmax(1), num_seg).permute(0, 3, 1, 2)  # (B, K, H, W)
        true = torch.nn.functional.one_hot(indices, num_seg).permute(0, 3, 1, 2)  # (B, K, H, W)
        dice = compute_dice(pred, true, include_background=False, ignore_empty=False)  # (B, K-1)
        iou = compute_iou(pred, true, include_background=False, ignore_empty=False)
        # ignore_empty=False scores a class empty in both masks 1: right for the one foreground class of
        # the binary case, but with several it would reward every class the image simply lacks. So skip
        # those classes, and score 1 only an image whose whole foreground is empty in both.
        present = (pred[:, 1:] | true[:, 1:]).flatten(2).any(2)  # (B, K-1)
        nothing = ~present.any(1)  # (B,) no foreground in the truth or the prediction
        # the argmax of NaN logits is background, which would score a diverged model 1 on every empty
        # mask: such an image scores NaN, and that NaN must make the mean NaN, not vanish
        diverged = ~logits.detach().isfinite().flatten(1).all(1)  # (B,)
        for key, values in (("seg/dice", dice), ("seg/iou", iou)):
            per_image = values.masked_fill(~present, float("nan")).nanmean(dim=1)  # (B,)
            per_image = per_image.masked_fill(nothing, 1.0).masked_fill(diverged, float("nan"))
            self._add(key, per_image, skip_nan=False)

    def _update_cls(self, logits: Tensor, label: Tensor) -> None:
        check_class_logits(logits)
        if label.numel() != len(logits) or label.dim() > 2 or (label.dim() == 2 and label.shape[1] != 1):
            # a one-hot (B, K) label would be read as B * K labels, a (2, 2) one for 4 logits as 4
            raise ValueError(f"class labels must be (B,) class indices, got shape {tuple(label.shape)} for "
                             f"{len(logits)} predictions; one-hot labels need label.argmax(1)")
        label = class_labels(label).view(-1)
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
            self.confusion = np.zeros((self.num_classes,) * 2, np.int64)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class logits, got {logits.shape[1]}")
        if len(label) and (label.min() < 0 or label.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in 0..{self.num_classes - 1}, got {sorted(set(label.tolist()))}")
        pred = logits.argmax(1)
        pairs = (label * self.num_classes + pred).cpu()  # index of each (true, predicted) cell
        self.confusion += torch.bincount(pairs, minlength=self.num_classes**2).view(  # (K * K,) -> (K, K)
            self.num_classes, self.num_classes).numpy()  # rows: true class, columns: predicted
        self._logits.append(logits.detach().cpu().double().numpy())  # .cpu() first: MPS has no float64
        self._labels.append(label.cpu().numpy())

    def _update_recon(self, output: Tensor, clean: Tensor) -> None:
        if output.shape != clean.shape or output.dim() != 4:  # else MONAI's y_pred/y error, ten frames down
            raise ValueError(f"recon outputs and clean images must both be (B, C, H, W) of one shape, got "
                             f"{tuple(output.shape)} and {tuple(clean.shape)}")
        if not len(clean):  # an empty batch adds nothing (MONAI's PSNR fails on it: "index 0 is out of bounds")
            return
        top = float(clean.detach().amax())  # the PSNR below reads its values anyway: no extra stall
        if top > 2 * self.data_range:  # a 0..255 image scored against data_range 1: PSNR -43 dB, SSIM ~0
            raise ValueError(f"the clean images reach {top:g}, but data_range is {self.data_range:g}: scale them "
                             f"to [0, {self.data_range:g}] (e.g. / 255) or pass data_range= their full range")
        from monai.metrics import PSNRMetric, SSIMMetric

        side = min(11, *output.shape[2:])
        win_size = side if side % 2 else side - 1  # SSIM needs an odd window no larger than the image
        psnr = PSNRMetric(max_val=self.data_range)(output, clean)  # (B, 1), inf at zero error
        # NaN only where the output is not finite (a diverged model): it must make the mean NaN, not vanish
        self._add("recon/psnr", psnr.clamp(max=PSNR_CEILING_DB), skip_nan=False)
        ssim = SSIMMetric(spatial_dims=2, data_range=self.data_range, win_size=win_size)
        self._add("recon/ssim", ssim(output, clean), skip_nan=False)

    def sync(self) -> None:
        """Add up the sums, counts and predictions of every process (no-op without torchrun, and when
        already synced: a second sum would count every other process's images again)."""
        if self.synced or not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        keys = sorted(set(self.sums) | set(self.counts))
        gathered: list = [None] * dist.get_world_size()  # every rank must know every key
        dist.all_gather_object(gathered, keys)
        keys = sorted({k for rank_keys in gathered for k in rank_keys})
        values = torch.tensor([[self.sums.get(k, 0.0), self.counts.get(k, 0.0)] for k in keys],
                              dtype=torch.float64, device=device).view(-1, 2)  # (num_keys, 2)
        dist.all_reduce(values)
        self.sums = {k: float(v[0]) for k, v in zip(keys, values)}
        self.counts = {k: float(v[1]) for k, v in zip(keys, values)}
        if "cls" in self.tasks:
            predictions: list = [None] * dist.get_world_size()
            dist.all_gather_object(predictions, (self.confusion, self._logits, self._labels))
            confusions = [c for c, _, _ in predictions if c is not None]
            self.confusion = sum(confusions) if confusions else None
            self._logits = [z for _, logits, _ in predictions for z in logits]
            self._labels = [y for _, _, labels in predictions for y in labels]
        self.synced = True

    @property
    def logits(self) -> np.ndarray:
        """(N, num_classes) float64 classification logits of every image seen."""
        if not self._logits:
            return np.zeros((0, self.num_classes or 0), np.float64)
        return np.concatenate(self._logits)

    @property
    def probabilities(self) -> np.ndarray:
        """(N, num_classes) softmax probabilities of every image seen (classification)."""
        return torch.softmax(torch.from_numpy(self.logits), 1).numpy()

    @property
    def scores(self) -> np.ndarray:
        """(N, num_classes) one-vs-rest log-odds (one_vs_rest_scores): what ROC curves should rank by."""
        if not self._logits:
            return self.logits
        return one_vs_rest_scores(self.logits)

    @property
    def labels(self) -> np.ndarray:
        """(N,) true class of every image seen (classification)."""
        return np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)

    def confusion_matrix(self) -> np.ndarray:
        """(K, K) counts, rows = true class, columns = predicted class."""
        if self.confusion is None:
            raise ValueError("no classification batch was seen; call update() with 'cls' outputs first")
        return self.confusion.copy()

    def compute(self) -> dict[str, float]:
        """All metrics as floats, keyed "task/metric" (nan where a metric is undefined)."""
        results = {}
        for key in self.sums:
            results[key] = self.sums[key] / self.counts[key] if self.counts[key] else float("nan")
        if "cls" in self.tasks and self.confusion is not None:
            scores = classification_metrics(self.confusion)
            if all(np.isfinite(logits).all() for logits in self._logits):
                scores["cls/auc"] = roc_auc(self.scores, self.labels)
            else:  # the argmax of a NaN row is class 0: a diverged model would read as a plausible accuracy
                scores = dict.fromkeys([*scores, "cls/auc"], float("nan"))
            results.update(scores)
        return dict(sorted(results.items()))
