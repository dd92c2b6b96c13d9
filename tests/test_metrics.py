import math
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

from mtlearn.metrics import MetricAccumulator, class_labels, classification_metrics, one_vs_rest_scores, roc_auc


def test_three_class_metrics_by_hand():
    confusion = np.array([[3, 1, 0], [1, 2, 1], [0, 1, 4]])  # rows: true class
    m = classification_metrics(confusion)
    assert m["cls/acc"] == pytest.approx(9 / 13)
    assert m["cls/balanced_acc"] == pytest.approx((3 / 4 + 2 / 4 + 4 / 5) / 3)
    # the last class (malignant) against the rest: 4 of its 5 caught; of the 8 others, 7 not called it
    assert m["cls/sensitivity"] == pytest.approx(4 / 5)
    assert m["cls/specificity"] == pytest.approx(7 / 8)


def test_an_accumulator_shows_its_tasks_and_how_many_images_it_has_seen():
    """It printed as <mtlearn.metrics.MetricAccumulator object at 0x...>."""
    acc = MetricAccumulator(tasks=("cls",))
    assert repr(acc) == ("MetricAccumulator(tasks=('cls',), num_classes=None, 0 images so far; .compute() for the "
                         "metrics)")
    acc.update({"cls": torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])}, {"label": torch.tensor([0, 1, 1])})
    assert repr(acc) == "MetricAccumulator(tasks=('cls',), num_classes=2, 3 images so far; .compute() for the metrics)"
    seg = MetricAccumulator(tasks=("seg",))  # counted per metric, not by the kept labels
    seg.update({"seg": torch.randn(2, 2, 8, 8)}, {"mask": torch.ones(2, 1, 8, 8)})
    assert "2 images so far" in repr(seg)


def test_three_class_sensitivity_is_malignant_against_the_rest_as_sklearn_reads_it():
    rng = np.random.default_rng(1)
    labels, predicted = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    confusion = np.zeros((3, 3))
    np.add.at(confusion, (labels, predicted), 1)
    m = classification_metrics(confusion)
    malignant, called_malignant = labels == 2, predicted == 2
    assert m["cls/sensitivity"] == pytest.approx(recall_score(malignant, called_malignant))
    assert m["cls/specificity"] == pytest.approx(recall_score(~malignant, ~called_malignant))
    assert m["cls/sensitivity"] != pytest.approx(m["cls/balanced_acc"])


def test_an_empty_confusion_matrix_gives_nan_not_an_error():
    m = classification_metrics(np.zeros((0, 0)))
    assert all(math.isnan(m[k]) for k in ("cls/acc", "cls/balanced_acc", "cls/sensitivity", "cls/specificity"))


def test_sensitivity_is_nan_without_a_positive_image():
    m = classification_metrics(np.array([[3, 1, 0], [1, 2, 1], [0, 0, 0]]))
    assert math.isnan(m["cls/sensitivity"])
    assert m["cls/specificity"] == pytest.approx(7 / 8)


def test_binary_metrics_report_the_positive_class():
    m = classification_metrics(np.array([[5, 1], [2, 2]]))
    assert m["cls/sensitivity"] == pytest.approx(2 / 4)
    assert m["cls/specificity"] == pytest.approx(5 / 6)
    assert m["cls/balanced_acc"] == pytest.approx((5 / 6 + 2 / 4) / 2)


def test_balanced_accuracy_skips_a_class_absent_from_the_labels():
    # class 2 never occurs (its recall is 0 / 0): the mean runs over the two classes present, as sklearn's
    m = classification_metrics(np.array([[3, 1, 0], [1, 1, 2], [0, 0, 0]]))
    assert m["cls/balanced_acc"] == pytest.approx((3 / 4 + 1 / 4) / 2)


def test_balanced_accuracy_and_auc_agree_with_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    logits = rng.normal(size=(40, 3)) + 1.5 * np.eye(3)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    acc = MetricAccumulator(("cls",))
    for start in range(0, 40, 16):  # three batches of unequal size
        acc.update({"cls": torch.tensor(logits[start:start + 16])}, {"label": torch.tensor(labels[start:start + 16])})
    m = acc.compute()
    assert m["cls/balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))
    assert m["cls/auc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"), abs=1e-6)
    assert acc.confusion_matrix().sum() == 40 and acc.probabilities.shape == (40, 3)
    assert (acc.labels == labels).all()


def test_auc_of_a_confident_model_ranks_by_the_logits_not_the_rounded_softmax():
    # every logit gap is above 17, where a float32 softmax rounds p(class 1) to exactly 1.0 for most
    # images: ranking by those probabilities would tie them; the true ranking is the logit gap's
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    gap = np.where(labels == 1, rng.normal(32, 4, 400), rng.normal(26, 4, 400))
    logits = torch.tensor(np.stack([np.zeros(400), gap], 1), dtype=torch.float32)
    assert len(np.unique(torch.softmax(logits, 1)[:, 1].numpy())) < 400  # the ties that would bite
    acc = MetricAccumulator(("cls",))
    acc.update({"cls": logits}, {"label": torch.tensor(labels)})
    assert acc.compute()["cls/auc"] == pytest.approx(roc_auc_score(labels, gap.astype(np.float32)), abs=1e-12)


def test_one_vs_rest_scores_are_the_log_odds_of_the_softmax():
    logits = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, 0.1], [200.0, 0.0, -5.0]], dtype=torch.float64)
    scores = one_vs_rest_scores(logits)
    p = torch.softmax(logits[:2], 1).numpy()
    assert scores[:2] == pytest.approx(np.log(p / (1 - p)))
    assert scores[2, 0] == pytest.approx(200 - np.log(1 + np.exp(-5.0)))  # finite where p rounds to 1
    binary = one_vs_rest_scores(logits[:, :2])  # two classes: the logit gap, with either sign
    assert binary[:, 1] == pytest.approx((logits[:, 1] - logits[:, 0]).numpy())
    assert (binary[:, 0] == -binary[:, 1]).all()
    with pytest.raises(ValueError, match="K >= 2"):
        one_vs_rest_scores(torch.zeros(3, 1))
    raw = logits[:2].float().requires_grad_()  # a model's output as it comes
    assert one_vs_rest_scores(raw) == pytest.approx(scores[:2], abs=1e-5)
    # float64 throughout, as documented: logits 1e-12 apart keep their order (float32 would tie them)
    close = one_vs_rest_scores(np.array([[0.0, 1.0], [0.0, 1.0 + 1e-12]]))
    assert close.dtype == np.float64 and close[1, 1] > close[0, 1]


def test_logits_with_the_same_softmax_tie_in_the_scores_and_in_the_auc():
    # [0, 1, 1] and [1, 2, 2] differ by a constant: the same probabilities, so a tie for every class; unshifted,
    # their log-odds came out one rounding apart and the AUC counted the pair as ordered (0.806, not 0.694)
    logits = np.array([[0.0, 1.0, 1.0], [1.0, 2.0, 2.0], [0.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    labels = np.array([1, 0, 2, 0])
    scores = one_vs_rest_scores(logits)
    assert (scores[0] == scores[1]).all()
    assert roc_auc(scores, labels) == pytest.approx(25 / 36)  # sklearn's one-vs-rest AUC of the softmax
    # an infinite logit is no shift: that class's score stays +inf, the others -inf, nothing turns NaN
    infinite = one_vs_rest_scores(np.array([[np.inf, 0.0, 1.0], [0.0, 1.0, 2.0]]))
    assert infinite[0, 0] == np.inf and (infinite[0, 1:] == -np.inf).all() and np.isfinite(infinite[1]).all()


def test_class_labels_name_three_wrong_labels_and_say_when_there_are_more():
    with pytest.raises(ValueError, match=r"got \[0\.5, 1\.5, 2\.5\]; probabilities"):  # all three, nothing more
        class_labels(torch.tensor([0.5, 1.5, 2.5, 1.0]))
    with pytest.raises(ValueError, match=r"got \[0\.5, 1\.5, 2\.5\] and more; probabilities"):
        class_labels(torch.tensor([0.5, 1.5, 2.5, 0.25]))


def test_a_nan_loss_in_one_batch_makes_the_mean_loss_nan():
    # undefined metric values are skipped, but a NaN loss is a failure the validation must show
    acc = MetricAccumulator(("cls",))
    batch = {"label": torch.tensor([0, 1])}
    acc.update({"cls": torch.tensor([[2.0, 0.0], [0.0, 2.0]])}, batch, losses={"cls": torch.tensor(0.2)})
    acc.update({"cls": torch.tensor([[2.0, 0.0], [0.0, 2.0]])}, batch, losses={"cls": torch.tensor(float("nan"))})
    assert math.isnan(acc.compute()["cls/loss"])


def test_auc_skips_a_class_absent_from_the_labels():
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1, 0, 1])  # class 2 never occurs
    expected = np.mean([roc_auc_score(labels == k, probabilities[:, k]) for k in (0, 1)])
    assert roc_auc(probabilities, labels) == pytest.approx(expected)
    assert math.isnan(roc_auc(probabilities[:0], labels[:0]))


def _seg_logits(mask):
    return torch.cat([1 - mask, mask], dim=1) * 10  # (B, 2, H, W) that predicts `mask`


def test_dice_and_iou_by_hand():
    true = torch.zeros(3, 1, 8, 8)
    true[0, :, 0:4, 0:4] = 1  # 16 pixels
    pred = torch.zeros(3, 1, 8, 8)
    pred[0, :, 0:2, 0:4] = 1  # 8 of them: Dice 2*8/(16+8) = 2/3, IoU 8/16
    pred[2, :, 0, 0] = 1  # image 1: both empty -> 1; image 2: empty truth, one false pixel -> 0
    acc = MetricAccumulator(("seg",))
    acc.update({"seg": _seg_logits(pred)}, {"mask": true})
    m = acc.compute()
    assert m["seg/dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["seg/iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_binary_dice_scores_every_empty_truth_image_one_or_zero():
    # the binary rule the committed notebooks rely on: empty and empty 1, a false alarm 0, no image skipped
    true = torch.zeros(2, 1, 4, 4)
    pred = torch.zeros(2, 1, 4, 4)
    pred[1, :, 0, 0] = 1
    acc = MetricAccumulator(("seg",))
    acc.update({"seg": _seg_logits(pred)}, {"mask": true})
    assert acc.sums == {"seg/dice": 1.0, "seg/iou": 1.0} and acc.counts == {"seg/dice": 2.0, "seg/iou": 2.0}


def test_multiclass_dice_averages_only_the_classes_present():
    # 3 classes; a class absent from both masks of an image must not count as a perfect 1
    true = torch.zeros(3, 1, 8, 8, dtype=torch.long)
    true[0, :, 0:4, 0:4] = 1  # 16 pixels of class 1
    pred = torch.zeros(3, 1, 8, 8, dtype=torch.long)
    pred[0, :, 0:2, 0:4] = 1  # 8 of them: Dice 2/3, IoU 1/2 (class 2 is absent from both: skipped)
    pred[2, :, 0, 0] = 2  # image 1: no foreground anywhere -> 1; image 2: a false class-2 pixel -> 0
    logits = torch.nn.functional.one_hot(pred[:, 0], 3).permute(0, 3, 1, 2).float() * 10  # (B, 3, H, W)
    acc = MetricAccumulator(("seg",))
    acc.update({"seg": logits}, {"mask": true.float()})
    m = acc.compute()
    assert m["seg/dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["seg/iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_psnr_and_ssim():
    clean = torch.rand(2, 1, 16, 16)
    acc = MetricAccumulator(("recon",))
    acc.update({"recon": clean + 0.1}, {"clean": clean})  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert acc.compute()["recon/psnr"] == pytest.approx(20.0, abs=1e-3)
    acc.reset()
    acc.update({"recon": clean}, {"clean": clean})
    assert acc.compute()["recon/ssim"] == pytest.approx(1.0, abs=1e-4)


def _recon_metrics(output, clean, data_range=1.0):
    acc = MetricAccumulator(("recon",), data_range=data_range)
    acc.update({"recon": output}, {"clean": clean})
    return acc.compute()


def test_non_finite_class_logits_make_every_classification_metric_nan():
    """argmax of a NaN row is class 0: accuracy would still look plausible for a diverged model."""
    acc = MetricAccumulator(("cls",))
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    acc.update({"cls": logits}, {"label": torch.tensor([0, 1, 2])})
    assert acc.compute()["cls/acc"] == 1.0
    acc.update({"cls": torch.full((1, 3), float("nan"))}, {"label": torch.tensor([0])})
    metrics = acc.compute()
    assert {"cls/acc", "cls/auc", "cls/balanced_acc"} <= set(metrics)
    assert all(math.isnan(v) for k, v in metrics.items() if k.startswith("cls/"))
    one_row = MetricAccumulator(("cls",))  # one NaN row beside finite ones in a batch: NaN as well (not 1.0)
    one_row.update({"cls": torch.tensor([[2.0, 0.0], [float("nan")] * 2])}, {"label": torch.tensor([0, 0])})
    assert all(math.isnan(v) for k, v in one_row.compute().items() if k.startswith("cls/"))


def test_non_finite_segmentation_logits_make_dice_and_iou_nan():
    """argmax of NaN logits is background: every empty mask would score 1 for a diverged model."""
    acc = MetricAccumulator(("seg",))
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 2:5, 2:5] = 1  # one lesion, one empty mask
    logits = torch.stack([mask[:, 0] * -4 + 2, mask[:, 0] * 4 - 2], 1)  # (2, 2, 8, 8), right everywhere
    acc.update({"seg": logits}, {"mask": mask})
    assert acc.compute()["seg/dice"] == 1.0
    nan_logits = torch.full_like(logits, float("nan"))
    acc.update({"seg": nan_logits}, {"mask": mask})
    metrics = acc.compute()
    assert math.isnan(metrics["seg/dice"]) and math.isnan(metrics["seg/iou"])
    one_pixel = MetricAccumulator(("seg",))  # a single NaN logit: argmax calls it lesion (Dice 18/19, not NaN)
    logits[0, 1, 0, 0] = float("nan")
    one_pixel.update({"seg": logits[:1]}, {"mask": mask[:1]})
    metrics = one_pixel.compute()
    assert math.isnan(metrics["seg/dice"]) and math.isnan(metrics["seg/iou"])


def test_a_non_finite_reconstruction_makes_psnr_and_ssim_nan_not_vanish():
    """A diverged model (an fp16 overflow) must not report the PSNR of its other images as if all were fine."""
    torch.manual_seed(0)
    clean = torch.rand(4, 1, 16, 16)
    output = clean + 0.05 * torch.randn_like(clean)
    output[1] = float("nan")
    metrics = _recon_metrics(output, clean)
    assert math.isnan(metrics["recon/psnr"]) and math.isnan(metrics["recon/ssim"])


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_psnr_is_the_per_image_formula_with_the_data_range(data_range):
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 1, 16, 16, generator=g)
    output = clean + torch.tensor([0.05, 0.1, 0.2]).view(3, 1, 1, 1) * torch.randn(clean.shape, generator=g)
    mse = ((output - clean) ** 2).mean((1, 2, 3)).double()  # one MSE per image
    expected = (10 * torch.log10(data_range**2 / mse)).mean()  # mean of the per-image PSNRs
    assert _recon_metrics(output, clean, data_range)["recon/psnr"] == pytest.approx(float(expected), abs=1e-4)


def test_a_perfect_reconstruction_keeps_the_mean_psnr_finite():
    clean = torch.rand(2, 1, 16, 16)
    output = clean.clone()
    output[1] += 0.1  # image 0 perfect (capped at 100 dB), image 1 at 20 dB
    assert _recon_metrics(output, clean)["recon/psnr"] == pytest.approx((100.0 + 20.0) / 2, abs=1e-3)


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_drops_with_noise_and_matches_skimage(data_range):
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 32, 32, generator=g)
    scores = []
    for sigma in (0.05, 0.1, 0.3):
        noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        ssim = _recon_metrics(noisy, clean, data_range)["recon/ssim"]
        # skimage with the Gaussian window of Wang et al. (sigma 1.5, 11 taps, population covariances)
        reference = np.mean([structural_similarity(c[0].double().numpy(), n[0].double().numpy(), data_range=data_range,
                                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                             for c, n in zip(clean, noisy)])
        assert ssim == pytest.approx(reference, abs=1e-5)
        scores.append(ssim)
    assert 1 > scores[0] > scores[1] > scores[2]


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_of_a_constant_offset_follows_the_formula(data_range):
    # flat images: no variance, so SSIM is the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    clean = torch.full((1, 1, 16, 16), 0.2)
    c1 = (0.01 * data_range) ** 2
    expected = (2 * 0.2 * 0.3 + c1) / (0.2**2 + 0.3**2 + c1)  # 0.923 for range 1, 0.998 for 255
    assert _recon_metrics(clean + 0.1, clean, data_range)["recon/ssim"] == pytest.approx(expected, rel=1e-4)


def _ssim_by_hand(x, y, window, data_range=1.0):
    """Mean SSIM of Wang et al. (2004): Gaussian window (sigma 1.5, `window` taps), valid positions only."""
    taps = np.arange(window) - window // 2
    g = np.exp(-(taps**2) / (2 * 1.5**2))
    kernel = np.outer(g, g) / g.sum() ** 2
    rows, cols = x.shape[0] - window + 1, x.shape[1] - window + 1

    def local_mean(a):
        return np.array([[(a[i:i + window, j:j + window] * kernel).sum() for j in range(cols)] for i in range(rows)])

    mx, my = local_mean(x), local_mean(y)
    vx, vy, cov = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


@pytest.mark.parametrize("size, window", [(8, 7), (10, 9)])
def test_ssim_of_an_image_smaller_than_the_window_uses_the_largest_odd_window(size, window):
    # the 11-tap window does not fit: it shrinks to the largest odd size that does (an even one has no centre)
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, size, size, generator=g)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    expected = np.mean([_ssim_by_hand(c[0].double().numpy(), n[0].double().numpy(), window)
                        for c, n in zip(clean, noisy)])
    assert _recon_metrics(noisy, clean)["recon/ssim"] == pytest.approx(expected, abs=1e-5)


def test_ssim_window_fits_the_shorter_side_of_a_non_square_image():
    """A 16 x 8 image: the window shrinks to 7 taps for its 8-pixel width, not 11 for its height."""
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 1, 16, 8, generator=g)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    expected = np.mean([_ssim_by_hand(c[0].double().numpy(), n[0].double().numpy(), 7)
                        for c, n in zip(clean, noisy)])
    assert _recon_metrics(noisy, clean)["recon/ssim"] == pytest.approx(expected, abs=1e-5)


def test_soft_masks_are_rounded_to_the_nearest_class():
    # a resized (interpolated) mask holds values between 0 and 1: >= 0.5 is lesion, < 0.5 background,
    # as in SegmentationLoss; truncation would drop every soft lesion pixel
    true = torch.zeros(1, 1, 8, 8)
    true[0, :, 0:4, 0:4] = 0.75  # 16 soft lesion pixels
    true[0, :, 4:8, 4:8] = 0.25  # 16 soft background pixels
    pred = torch.zeros(1, 1, 8, 8)
    pred[0, :, 0:2, 0:4] = 1  # 8 of the 16 lesion pixels: Dice 2/3, IoU 1/2
    acc = MetricAccumulator(("seg",))
    acc.update({"seg": _seg_logits(pred)}, {"mask": true})
    m = acc.compute()
    assert m["seg/dice"] == pytest.approx(2 / 3) and m["seg/iou"] == pytest.approx(1 / 2)
    acc = MetricAccumulator(("seg",))
    acc.update({"seg": _seg_logits(pred)}, {"mask": true > 0.5})  # a boolean mask: the same classes
    assert acc.compute()["seg/dice"] == pytest.approx(2 / 3)


def test_losses_are_averaged_per_image():
    acc = MetricAccumulator(("cls",))
    acc.update({"cls": torch.zeros(3, 3)}, {"label": torch.zeros(3)}, {"cls": torch.tensor(1.0)})
    acc.update({"cls": torch.zeros(1, 3)}, {"label": torch.zeros(1)}, {"cls": torch.tensor(5.0)})
    assert acc.compute()["cls/loss"] == pytest.approx((3 * 1.0 + 5.0) / 4)


def test_probabilities_are_each_images_softmax():
    """The probabilities fed to ROC and calibration plots: one softmax per image, over its classes."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    acc = MetricAccumulator(("cls",))
    acc.update({"cls": logits}, {"label": torch.tensor([0, 1])})
    expected = np.exp(logits.double().numpy()) / np.exp(logits.double().numpy()).sum(1, keepdims=True)
    assert acc.probabilities == pytest.approx(expected)


def test_reset_forgets_the_classification_batches_too():
    """An accumulator reused for the next evaluation must not carry the last one's confusion matrix or AUC inputs."""
    acc = MetricAccumulator(("cls",))
    acc.update({"cls": torch.tensor([[0.0, 2.0], [0.0, 2.0]])}, {"label": torch.tensor([0, 0])})  # two false alarms
    acc.reset()
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), np.array([0, 1, 1])
    acc.update({"cls": logits}, {"label": torch.tensor(labels)})
    assert (acc.confusion_matrix() == [[1, 0], [1, 1]]).all() and (acc.labels == labels).all()
    acc.confusion_matrix()[:] = 0  # a copy: a caller normalising it in place changes nothing here
    assert acc.confusion_matrix().sum() == 3
    m = acc.compute()
    assert m["cls/specificity"] == 1.0 and m["cls/sensitivity"] == 0.5
    assert m["cls/auc"] == pytest.approx(roc_auc_score(labels, (logits[:, 1] - logits[:, 0]).numpy()))
    acc.reset()  # the class count read from the first logits is forgotten too: "expected 2 class logits, got 3"
    acc.update({"cls": torch.eye(3)}, {"label": torch.tensor([0, 1, 2])})
    assert acc.confusion_matrix().shape == (3, 3) and acc.compute()["cls/acc"] == 1.0
    given = MetricAccumulator(("cls",), num_classes=2)
    given.reset()
    assert given.num_classes == 2  # a count given stays


def _sync_in_one_process_group(acc, tmp_path):
    """acc.sync() inside a real one-process gloo group (a test may have patched the collectives first)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        acc.sync()
    finally:
        dist.destroy_process_group()


def test_sync_in_a_one_process_group_keeps_the_values(tmp_path):
    acc = MetricAccumulator(("seg", "cls"))
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1
    acc.update({"seg": _seg_logits(mask), "cls": torch.tensor([[2.0, 0, 0], [0, 0, 2.0]])},
               {"mask": mask, "label": torch.tensor([0, 2])})
    before = acc.compute()
    _sync_in_one_process_group(acc, tmp_path)
    assert acc.compute() == before


def test_sync_adds_the_sums_and_counts_of_every_process(tmp_path, monkeypatch):
    # simulate two identical processes in a one-process group: every reduction doubles, every gather repeats
    acc = MetricAccumulator(("seg", "cls"))
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4] = 1
    acc.update({"seg": _seg_logits(mask), "cls": torch.tensor([[2.0, 0, 0], [0, 0, 2.0]])},
               {"mask": mask, "label": torch.tensor([0, 2])}, {"seg": torch.tensor(0.5)})
    before, sums, counts, confusion = acc.compute(), dict(acc.sums), dict(acc.counts), acc.confusion_matrix()

    def all_reduce(tensor, *args, **kwargs):
        tensor.mul_(2)

    def all_gather_object(object_list, obj, *args, **kwargs):
        object_list[:] = [obj, obj]

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    _sync_in_one_process_group(acc, tmp_path)
    assert acc.counts == {k: 2 * v for k, v in counts.items()} and counts["seg/dice"] == 2
    assert acc.sums == {k: 2 * v for k, v in sums.items()}
    assert (acc.confusion_matrix() == 2 * confusion).all() and len(acc.labels) == 4
    assert acc.compute() == pytest.approx(before)  # two identical halves: same averages
    # a second sync would double the other processes' images again; an update would join one process only
    _sync_in_one_process_group(acc, tmp_path)
    assert acc.counts == {k: 2 * v for k, v in counts.items()}
    with pytest.raises(ValueError, match=r"update\(\) after sync\(\): .*call reset\(\) to start a new pass"):
        acc.update({"seg": _seg_logits(mask), "cls": torch.tensor([[2.0, 0, 0], [0, 0, 2.0]])},
                   {"mask": mask, "label": torch.tensor([0, 2])})
    acc.reset()
    assert not acc.synced


@pytest.mark.parametrize("make, match", [
    (lambda: MetricAccumulator(("seg", "pose")), "unknown task"),
    (lambda: MetricAccumulator(("recon",), data_range=0), "data_range"),
    (lambda: MetricAccumulator(("recon",), data_range=float("nan")),
     r"data_range must be a finite number > 0 \(max - min.*got nan"),
    (lambda: MetricAccumulator(("cls",)).confusion_matrix(), "no classification batch"),
    (lambda: MetricAccumulator(("seg",)).update({"cls": torch.zeros(1, 3)}, {"mask": torch.zeros(1, 1, 4, 4)}),
     r"outputs\['seg'\]"),
    (lambda: MetricAccumulator(("cls",), num_classes=2).update({"cls": torch.zeros(1, 3)}, {"label": torch.zeros(1)}),
     "expected 2 class logits"),
    (lambda: MetricAccumulator(("cls",)).update({"cls": torch.zeros(2, 3)}, {"label": torch.tensor([0, 3])}),
     r"labels must lie in 0..2"),
    (lambda: MetricAccumulator(("seg",)).update({"seg": torch.zeros(1, 1, 4, 4)}, {"mask": torch.zeros(1, 1, 4, 4)}),
     r"one channel per class including background \(>= 2\), got 1 channel"),
    # what update said before: "Class values must be smaller than num_classes", a permute error about sparse
    # tensors, an IndexError, a broadcast error; 1.7 was read as class 1 without a word
    (lambda: MetricAccumulator(("seg",)).update({"seg": torch.zeros(2, 2, 4, 4)},
                                                {"mask": torch.full((2, 1, 4, 4), 255.0)}),
     r"mask values must be class indices 0\.\.1, got max 255; a 0/255 mask needs mask / 255"),
    (lambda: MetricAccumulator(("seg",)).update({"seg": torch.zeros(2, 2, 4, 4)}, {"mask": torch.zeros(2, 4, 4)}),
     r"target must be \(B, 1, H, W\) matching logits \(2, 2, 4, 4\), got \(2, 4, 4\); .*mask\.unsqueeze\(1\)"),
    (lambda: MetricAccumulator(("seg",)).update({"seg": torch.zeros(2, 2, 4, 4)}, {"mask": torch.zeros(2, 1, 4, 5)}),
     r"target must be \(B, 1, H, W\) matching logits \(2, 2, 4, 4\), got \(2, 1, 4, 5\)$"),
    (lambda: MetricAccumulator(("cls",)).update({"cls": torch.zeros(4, 3)}, {"label": torch.tensor([0, 1.7, 2, 1])}),
     r"class labels must be whole numbers \(class indices\), got \[1\.7"),  # the wrong ones
    # inf passed round() and became class -2**63 (then "labels must lie in 0..2"); NaN failed as "not whole"
    (lambda: MetricAccumulator(("cls",)).update({"cls": torch.zeros(3, 3)}, {"label": torch.tensor([0, 1, math.inf])}),
     r"class labels must be whole numbers \(class indices\), got \[inf\]; .*NaN labels dropping or fixing"),
    (lambda: MetricAccumulator(("cls",)).update({"cls": torch.zeros(3, 3)}, {"label": torch.eye(3)[[0, 2, 1]]}),
     r"class labels must be \(B,\) class indices, got shape \(3, 3\) .*label\.argmax\(1\)"),
    (lambda: MetricAccumulator(("cls",)).update({"cls": torch.zeros(4)}, {"label": torch.tensor([0, 1, 1, 0])}),
     r"logits must have shape \(B, num_classes\) .*two logits per image"),
    (lambda: MetricAccumulator(("seg",)).update(torch.zeros(2, 2, 4, 4), {"mask": torch.zeros(2, 1, 4, 4)}),
     r"the model returned a Tensor, not a dict"),
    # unchecked before: a string or NaN weight, 0 or "3" classes, a float loss (AttributeError), per-image losses
    (lambda: MetricAccumulator(("cls",), class_weights=[1.0, float("nan")]), r"class_weights must be .*finite"),
    (lambda: MetricAccumulator(("cls",), class_weights="ab"), r"class_weights must be a flat list"),
    (lambda: MetricAccumulator(("cls",), num_classes=3, class_weights=[1.0, 2.0]),
     r"class_weights has 2 entries but the model predicts 3 classes: give one weight per class"),
    (lambda: MetricAccumulator(("cls",), num_classes=3, class_weights=[1.0, 2.0, 1.0, 1.0]),
     r"class_weights has 4 entries but the model predicts 3 classes"),
    (lambda: MetricAccumulator(("cls",), class_weights=[1.0, 2.0]).update(
        {"cls": torch.zeros(2, 3)}, {"label": torch.tensor([0, 2])}, {"cls": torch.tensor(1.0)}),
     r"class_weights has 2 entries but the model predicts 3 classes"),
    (lambda: MetricAccumulator(("cls",), num_classes="3"), r"num_classes must be an int >= 2 .*got '3'"),
    (lambda: MetricAccumulator(("cls",), num_classes=1), r"num_classes must be an int >= 2"),
    (lambda: MetricAccumulator(("cls",)).update({"cls": torch.zeros(2, 3)}, {"label": torch.tensor([0, 2])},
                                                {"cls": torch.ones(2)}),
     r"losses\['cls'\] must be the batch's mean loss \(one number\), got shape \(2,\); .*\.mean\(\)"),
    (lambda: roc_auc(np.zeros((3, 2)), np.array([0.0, 1.0, 0.6])), r"labels must be whole numbers \(class indices\)"),
    (lambda: classification_metrics(np.ones((2, 3))), r"confusion matrix is \(K, K\).*got shape \(2, 3\)"),
    (lambda: classification_metrics(np.array([[1, -1], [0, 2]])), r"holds counts \(finite, >= 0\)"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_loss_given_as_a_float_counts_like_a_tensor():
    batch = {"label": torch.tensor([0, 1, 1])}
    as_tensor, as_float = MetricAccumulator(("cls",)), MetricAccumulator(("cls",))
    as_tensor.update({"cls": torch.zeros(3, 2)}, batch, {"cls": torch.tensor(0.5)})
    as_float.update({"cls": torch.zeros(3, 2)}, batch, {"cls": 0.5})  # loss.item(): was an AttributeError
    assert as_float.compute() == as_tensor.compute() and as_float.compute()["cls/loss"] == 0.5


def test_roc_auc_of_nan_scores_is_nan():
    """MONAI ranked the NaNs somewhere: a diverged model got a plausible AUC (0.5 here, 1.0 or 0.0 elsewhere)."""
    scores = np.array([[0.0, 1.0], [0.0, np.nan], [0.0, 2.0], [0.0, 3.0]])
    assert math.isnan(roc_auc(scores, np.array([0, 1, 0, 1])))
    assert roc_auc(np.nan_to_num(scores), np.array([0, 1, 0, 1])) == pytest.approx(0.5)


def test_sync_reduces_every_key_any_process_has(tmp_path, monkeypatch):
    """A process that saw no loss must still join that key's reduction (all_reduce needs equal tensors on every
    rank), and the merged mean must count the other process's images."""
    acc = MetricAccumulator(("seg",))
    mask = torch.zeros(1, 1, 8, 8)
    acc.update({"seg": _seg_logits(mask)}, {"mask": mask})  # no losses on this process: keys seg/dice, seg/iou

    def all_gather_object(object_list, obj, *args, **kwargs):
        object_list[:] = [obj, sorted([*obj, "seg/loss"])]  # the other process also has a loss

    def all_reduce(tensor, *args, **kwargs):
        # the other process: three images of Dice and IoU 0, loss sum 1.2 over those three
        tensor.add_(torch.tensor([[0.0, 3.0], [0.0, 3.0], [1.2, 3.0]], dtype=tensor.dtype))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    _sync_in_one_process_group(acc, tmp_path)
    assert acc.compute() == pytest.approx({"seg/dice": 1 / 4, "seg/iou": 1 / 4, "seg/loss": 0.4})


def test_a_class_weighted_loss_is_the_datasets_whatever_the_batch_size():
    """The weighted cross-entropy divides by the batch's summed label weights, so a mean of batch means
    (each counted once per image) moved with the batch size: 1.152 at 12 images per batch, 0.879 at 3."""
    from mtlearn.losses import ClassificationLoss

    torch.manual_seed(0)
    logits, labels = torch.randn(12, 2), torch.tensor([0] * 9 + [1] * 3)[torch.randperm(12)]
    loss = ClassificationLoss([1.0, 3.0])
    whole = float(loss(logits, labels))
    for batch_size in (12, 6, 5, 4, 3, 1):  # 5: a short last batch, so each batch's weight must be its sum
        acc = MetricAccumulator(("cls",), class_weights=[1.0, 3.0])
        for start in range(0, 12, batch_size):
            part = slice(start, start + batch_size)
            acc.update({"cls": logits[part]}, {"label": labels[part]}, {"cls": loss(logits[part], labels[part])})
        assert acc.compute()["cls/loss"] == pytest.approx(whole, rel=1e-6), batch_size
    zero = MetricAccumulator(("cls",), class_weights=[0.0, 1.0])  # a batch of zero-weight labels counts for nothing
    zero_loss = ClassificationLoss([0.0, 1.0])
    for part, label in ((slice(0, 2), 0), (slice(2, 4), 1)):
        targets = torch.full((2,), label)
        zero.update({"cls": logits[part]}, {"label": targets}, {"cls": zero_loss(logits[part], targets)})
    assert zero.compute()["cls/loss"] == pytest.approx(float(zero_loss(logits[2:4], torch.tensor([1, 1]))))
    # torch's own weighted cross-entropy is 0/0 = NaN for that batch: it counts for nothing too
    plain = MetricAccumulator(("cls",), class_weights=[0.0, 1.0])
    for part, label in ((slice(0, 2), 0), (slice(2, 4), 1)):
        targets = torch.full((2,), label)
        batch_loss = torch.nn.functional.cross_entropy(logits[part], targets, weight=torch.tensor([0.0, 1.0]))
        plain.update({"cls": logits[part]}, {"label": targets}, {"cls": batch_loss})
    assert plain.compute()["cls/loss"] == pytest.approx(zero.compute()["cls/loss"])


def test_evaluate_passes_the_losses_class_weights_to_its_accumulator():
    from torch.utils.data import DataLoader

    from mtlearn.engine import evaluate
    from mtlearn.losses import ClassificationLoss, LossConfig

    class Fixed(torch.nn.Module):
        tasks = ("cls",)

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return {"cls": x.flatten(1)[:, :2] * self.scale}

    torch.manual_seed(0)
    images, labels = torch.randn(12, 1, 2, 2), torch.tensor([0] * 9 + [1] * 3)
    rows = [{"image": i, "label": y} for i, y in zip(images, labels)]
    whole = float(ClassificationLoss([1.0, 3.0])(images.flatten(1)[:, :2], labels))
    for batch_size in (12, 4):
        loader = DataLoader(rows, batch_size=batch_size)
        metrics = evaluate(Fixed(), loader, losses=LossConfig(class_weights=[1.0, 3.0]))
        assert metrics["cls/loss"] == pytest.approx(whole, rel=1e-6)


def test_roc_auc_takes_tensors_that_need_grad_and_names_bad_shapes_and_labels():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.detach()[:, 1].numpy()))
    with pytest.raises(ValueError, match=r"\(N, K\) scores, one column per class.*torch\.stack\(\[-s, s\], dim=1\)"):
        roc_auc(scores[:, 1].detach(), labels)  # sklearn's binary form: one score per image
    with pytest.raises(ValueError, match=r"labels must be class indices 0\.\.1 .*got values 0\.\.2"):
        roc_auc(scores.detach(), torch.tensor([0, 1, 2, 1]))
    assert math.isnan(roc_auc(np.zeros((0, 2)), np.zeros(0, dtype=int)))


def test_an_empty_seg_batch_adds_nothing_as_an_empty_cls_batch_does():
    """MONAI's Dice failed on it: "stack expects a non-empty TensorList"."""
    acc = MetricAccumulator(("seg",))
    acc.update({"seg": torch.zeros(0, 2, 8, 8)}, {"mask": torch.zeros(0, 1, 8, 8)}, losses={"seg": torch.tensor(0.3)})
    assert math.isnan(acc.compute()["seg/loss"])  # a mean over no image is undefined, not a perfect 0
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    acc.update({"seg": torch.cat([-mask, mask], 1) * 5}, {"mask": mask})
    assert acc.compute()["seg/dice"] == 1.0


def test_an_empty_recon_batch_adds_nothing():
    """MONAI's PSNR failed on it: "index 0 is out of bounds for dimension 0 with size 0"."""
    acc = MetricAccumulator(("recon",))
    acc.update({"recon": torch.zeros(0, 1, 16, 16)}, {"clean": torch.zeros(0, 1, 16, 16)})
    clean = torch.rand(2, 1, 16, 16)
    acc.update({"recon": clean}, {"clean": clean})
    assert acc.counts["recon/psnr"] == 2 and acc.compute()["recon/ssim"] == pytest.approx(1.0)


def test_targets_of_the_wrong_kind_or_shape_are_named():
    """A list of labels failed with "'list' object has no attribute 'to'"; recon outputs of another shape than
    the clean images inside MONAI, ten frames down."""
    acc = MetricAccumulator(("cls",))
    with pytest.raises(TypeError, match=r"batch\['label'\] must be a tensor, got a list; convert it with "
                                        r"torch\.as_tensor"):
        acc.update({"cls": torch.randn(4, 3)}, {"label": [0, 1, 2, 0]})
    recon = MetricAccumulator(("recon",))
    with pytest.raises(ValueError, match=r"both be \(B, C, H, W\) of one shape, got \(2, 16, 16\) and \(2, 16, 16\)"):
        recon.update({"recon": torch.rand(2, 16, 16)}, {"clean": torch.rand(2, 16, 16)})  # same shape, no channels
    for output in (torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16)):
        shape = re.escape(str(tuple(output.shape)))
        with pytest.raises(ValueError, match=rf"both be \(B, C, H, W\) of one shape, got {shape} and \(2, 1, 16, 16\)"):
            recon.update({"recon": output}, {"clean": torch.rand(2, 1, 16, 16)})
    assert recon.empty


def test_clean_images_far_beyond_the_data_range_are_named():
    """A 0..255 target scored against data_range 1 gave PSNR -43.6 dB and SSIM 1e-5 without a word."""
    clean = torch.randint(0, 256, (2, 1, 16, 16)).float()
    acc = MetricAccumulator(("recon",))
    with pytest.raises(ValueError, match=r"the clean images reach 25\d, but data_range is 1: scale them to \[0, 1\]"):
        acc.update({"recon": clean}, {"clean": clean})
    scaled = MetricAccumulator(("recon",), data_range=255.0)
    scaled.update({"recon": clean}, {"clean": clean})
    assert scaled.compute()["recon/ssim"] == pytest.approx(1.0)
    # the limit is twice the range: noise may push a clean image a little past 1, a factor 3 is another scale
    ramp = torch.linspace(0, 1, 256).view(1, 1, 16, 16)
    MetricAccumulator(("recon",)).update({"recon": ramp}, {"clean": ramp * 1.9})
    with pytest.raises(ValueError, match=r"the clean images reach 3, but data_range is 1"):
        MetricAccumulator(("recon",)).update({"recon": ramp}, {"clean": ramp * 3.0})


def test_nan_in_a_mask_and_labels_of_another_shape_are_named():
    acc = MetricAccumulator(("seg", "cls"))
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"class indices 0\.\.1, got NaN or inf values"):  # was "min -922...808"
        acc.update({"seg": torch.zeros(2, 2, 8, 8)}, {"mask": mask})
    with pytest.raises(ValueError, match=r"class labels must be \(B,\) class indices, got shape \(2, 2\) for 4"):
        MetricAccumulator(("cls",)).update({"cls": torch.zeros(4, 3)}, {"label": torch.zeros(2, 2)})
