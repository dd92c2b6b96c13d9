import pytest
import torch

from mtlearn.losses import (
    ClassificationLoss,
    DiceSoftmaxFocal,
    LossConfig,
    ReconstructionLoss,
    SegmentationLoss,
    build_losses,
    check_tasks,
    task_losses,
)


def _mask(batch=2, size=8):
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, 2:6, 2:6] = 1.0
    return mask


def _logits_for(mask, confidence=20.0):
    """Two-class logits that predict `mask` with the given margin."""
    foreground = (mask * 2 - 1) * confidence  # (B, 1, H, W)
    return torch.cat([-foreground, foreground], dim=1)  # (B, 2, H, W)


@pytest.mark.parametrize("kind", ["dicece", "dicefocal"])
def test_segmentation_loss_small_for_right_large_for_wrong(kind):
    loss = SegmentationLoss(kind)
    mask = _mask()
    right = loss(_logits_for(mask), mask)
    wrong = loss(_logits_for(1 - mask), mask)
    assert right.dim() == 0 and right < 0.01
    assert wrong > 1.0


def test_dicefocal_is_softmax_dice_plus_softmax_focal():
    """By hand: mean over pixels of -(1 - p)^gamma log p at the true class (Lin et al.), plus soft Dice."""
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 1, 6, 6))
    p = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(mask[:, 0], 3).permute(0, 3, 1, 2).float()
    focal = -(onehot * (1 - p) ** 2 * p.log()).sum(1).mean()  # (B, H, W) per pixel -> mean
    intersection, total = (p * onehot).sum((2, 3)), (p + onehot).sum((2, 3))
    dice = (1 - (2 * intersection + 1e-5) / (total + 1e-5)).mean()
    loss = SegmentationLoss("dicefocal")
    torch.testing.assert_close(loss(logits, mask), dice + focal, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss(logits + 7.0, mask), loss(logits, mask))  # softmax: shifts do not matter


@pytest.mark.parametrize("gamma", [0.0, 1.0, 3.0])
def test_dicefocal_uses_the_configured_focal_gamma(gamma):
    """LossConfig.focal_gamma reaches the focal term: -(1 - p)^gamma log p (gamma 0: plain cross-entropy)."""
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 1, 6, 6))
    p = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(mask[:, 0], 3).permute(0, 3, 1, 2).float()
    focal = -(onehot * (1 - p) ** gamma * p.log()).sum(1).mean()
    intersection, total = (p * onehot).sum((2, 3)), (p + onehot).sum((2, 3))
    dice = (1 - (2 * intersection + 1e-5) / (total + 1e-5)).mean()
    loss = build_losses(("seg",), LossConfig(seg="dicefocal", focal_gamma=gamma))["seg"]
    torch.testing.assert_close(loss(logits, mask), dice + focal, rtol=1e-5, atol=1e-6)
    # the module itself takes the one name used everywhere else (it was `gamma`)
    torch.testing.assert_close(DiceSoftmaxFocal(focal_gamma=gamma)(logits, mask), dice + focal, rtol=1e-5, atol=1e-6)


def test_the_defaults_are_the_published_ones():
    """Focal gamma 2 (Lin et al. 2017) wherever a student leaves it out (LossConfig, SegmentationLoss), and
    ReconstructionLoss() is the L1 loss its docstring and LossConfig.recon promise."""
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 1, 6, 6))
    by_config = build_losses(("seg",), LossConfig(seg="dicefocal"))["seg"](logits, mask)
    torch.testing.assert_close(by_config, SegmentationLoss("dicefocal", focal_gamma=2.0)(logits, mask))
    torch.testing.assert_close(SegmentationLoss("dicefocal")(logits, mask), by_config)
    assert (LossConfig().seg, LossConfig().recon, LossConfig().class_weights) == ("dicece", "l1", None)
    output, clean = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(ReconstructionLoss()(output, clean), torch.nn.functional.l1_loss(output, clean))


def _dice_plus_ce_by_hand(logits, mask):
    """Soft Dice (per image and class, background included, smoothing 1e-5) + pixel-mean cross-entropy."""
    p = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(mask[:, 0].long(), logits.shape[1]).permute(0, 3, 1, 2).float()
    ce = -(onehot * p.log()).sum(1).mean()
    intersection, total = (p * onehot).sum((2, 3)), (p + onehot).sum((2, 3))
    dice = (1 - (2 * intersection + 1e-5) / (total + 1e-5)).mean()
    return dice, ce


def test_dicece_is_softmax_dice_plus_cross_entropy():
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 1, 4, 4)).float()
    dice, ce = _dice_plus_ce_by_hand(logits, mask)
    assert dice > 0.1 and ce > 0.1  # both terms weigh in, so dropping either changes the sum
    torch.testing.assert_close(SegmentationLoss("dicece")(logits, mask), dice + ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, gamma", [("dicece", 0.0), ("dicefocal", 2.0)])
def test_an_empty_mask_keeps_the_documented_one_over_k_dice_floor(kind, gamma):
    """Normal scan: the foreground Dice is ~0 whatever the model predicts (the Dice part ~1/K), unless its
    predicted foreground sums below the 1e-5 smoothing; then the Dice part is ~0."""
    empty = torch.zeros(2, 1, 8, 8)
    for confidence, dice_part in ((3.0, 1 / 2), (20.0, 0.0)):  # foreground sum 64 sigmoid(-6) = 0.16; ~1e-16
        logits = _logits_for(empty, confidence)
        p = logits.softmax(1)
        pixel_term = -((1 - p[:, :1]) ** gamma * p[:, :1].log()).mean()  # cross-entropy or focal, class 0 true
        loss = SegmentationLoss(kind)(logits, empty)
        assert loss - pixel_term == pytest.approx(dice_part, abs=2e-3)


@pytest.mark.parametrize("kind", ["dicece", "dicefocal"])
def test_segmentation_loss_rounds_a_soft_mask_to_the_nearest_class(kind):
    # an interpolated mask: 0.6 is lesion, 0.4 background (truncation would make both background)
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 2, 8, 8), _mask()
    loss = SegmentationLoss(kind)
    torch.testing.assert_close(loss(logits, mask * 0.6), loss(logits, mask))
    torch.testing.assert_close(loss(logits, mask * 0.4), loss(logits, torch.zeros_like(mask)))


@pytest.mark.parametrize("kind", ["dicece", "dicefocal"])
def test_segmentation_loss_takes_a_boolean_mask_as_zero_one(kind):
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 2, 8, 8), _mask()
    loss = SegmentationLoss(kind)
    torch.testing.assert_close(loss(logits, mask > 0.5), loss(logits, mask))  # round() has no bool kernel


def test_segmentation_loss_gradient_and_integer_mask():
    loss = SegmentationLoss("dicece")
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    value = loss(logits, _mask().long())
    value.backward()
    assert torch.isfinite(value) and logits.grad.abs().sum() > 0


def test_classification_loss_matches_weighted_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    label = torch.tensor([0, 2, 2])
    weights = [1.0, 2.0, 0.5]
    # hand-computed: weighted mean of -log softmax[label], normalised by the weights of the labels
    nll = -torch.log_softmax(logits, 1)[torch.arange(3), label]
    w = torch.tensor(weights)[label]
    expected = (w * nll).sum() / w.sum()
    assert torch.allclose(ClassificationLoss(weights)(logits, label), expected)
    # a weighted mean: the same for weights ten times smaller (their sum over the batch, 0.2, below 1)
    assert torch.allclose(ClassificationLoss([w / 10 for w in weights])(logits, label), expected)
    assert torch.allclose(ClassificationLoss()(logits, label), nll.mean())


def test_a_zero_class_weight_leaves_that_class_out():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    label = torch.tensor([0, 1, 2])
    nll = -torch.log_softmax(logits, 1)[torch.arange(3), label]
    loss = ClassificationLoss([1.0, 0.0, 1.0])(logits, label)  # class 1 ignored, not an error
    assert torch.allclose(loss, (nll[0] + nll[2]) / 2)
    # a batch of the left-out class alone adds 0: torch's weighted mean was 0/0, NaN, and stopped training
    logits.requires_grad_(True)
    loss = ClassificationLoss([1.0, 0.0, 1.0])(logits, torch.tensor([1, 1, 1]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("kind, expected", [("l1", 0.5), ("mse", 0.25)])
def test_reconstruction_loss_values(kind, expected):
    output = torch.full((2, 1, 4, 4), 0.5)
    clean = torch.zeros(2, 1, 4, 4)
    assert ReconstructionLoss(kind)(output, clean).item() == pytest.approx(expected)


def test_build_losses_follows_config():
    losses = build_losses(("recon", "seg", "cls"), LossConfig(seg="dicefocal", recon="mse", class_weights=[1, 1, 2]))
    assert list(losses) == ["recon", "seg", "cls"]
    assert losses["seg"].kind == "dicefocal" and losses["recon"].kind == "mse"
    assert losses["cls"].weight.tolist() == [1.0, 1.0, 2.0]


def test_task_losses_reads_targets_from_the_batch():
    outputs = {"seg": torch.randn(2, 2, 8, 8), "cls": torch.randn(2, 3), "recon": torch.rand(2, 1, 8, 8)}
    batch = {"mask": _mask(), "label": torch.tensor([0, 2]), "clean": torch.rand(2, 1, 8, 8)}
    losses = task_losses(outputs, batch, build_losses(("seg", "cls", "recon")))
    assert set(losses) == {"seg", "cls", "recon"}
    assert all(v.dim() == 0 for v in losses.values())
    # each loss scores its own output against its own batch key, with the default kinds
    dice, ce = _dice_plus_ce_by_hand(outputs["seg"], batch["mask"])
    torch.testing.assert_close(losses["seg"], dice + ce, rtol=1e-5, atol=1e-6)
    nll = -torch.log_softmax(outputs["cls"], 1)[torch.arange(2), batch["label"]]
    torch.testing.assert_close(losses["cls"], nll.mean())
    torch.testing.assert_close(losses["recon"], (outputs["recon"] - batch["clean"]).abs().mean())  # L1


def test_a_single_task_may_be_named_by_a_bare_string():
    """check_tasks("seg") is one task, not the letters s, e, g."""
    assert check_tasks("seg") == ("seg",)
    assert list(build_losses("cls")) == ["cls"]


@pytest.mark.parametrize("make, match", [
    (lambda: SegmentationLoss("dice"), "unknown segmentation loss"),
    (lambda: ReconstructionLoss("huber"), "unknown reconstruction loss"),
    (lambda: ClassificationLoss([[1.0, 2.0]]), "class_weights"),
    (lambda: ClassificationLoss([1.0, -1.0]), "class_weights"),
    # negative with a positive sum: its class's loss would reward wrong answers (the sum alone let it through)
    (lambda: ClassificationLoss([1.0, -0.5]), r"class_weights must be a flat list of finite, non-negative numbers"),
    # each of these passed the old `< 0` check and made the loss NaN
    (lambda: ClassificationLoss([1.0, float("nan")]), r"class_weights must be .*finite.*got \[1.0, nan\]"),
    (lambda: ClassificationLoss([0.0, 0.0]), r"class_weights must be .*not all 0"),
    (lambda: SegmentationLoss("dicefocal", focal_gamma=-1),
     r"focal_gamma must be a finite number >= 0 \(2 as published.*got -1"),
    (lambda: SegmentationLoss("dicefocal", focal_gamma=float("nan")), r"focal_gamma must be a finite number >= 0"),
    # refused with the default Dice + CE too: a config that switches to dicefocal later holds the same value
    (lambda: build_losses(("seg",), LossConfig(focal_gamma=-1)), r"focal_gamma must be a finite number >= 0"),
    # not tensors: "'numpy.ndarray' object has no attribute 'numel'", "'list' object has no attribute 'dtype'"
    (lambda: SegmentationLoss()(torch.randn(2, 2, 8, 8), _mask().numpy()),
     r"segmentation mask must be a torch tensor, got a ndarray; convert it with torch.as_tensor\(...\)"),
    (lambda: ClassificationLoss()(torch.randn(4, 3), [0, 1, 2, 0]), r"classification labels must be a torch tensor, "
                                                                     r"got a list"),
    (lambda: ReconstructionLoss()(torch.rand(2, 1, 8, 8).numpy(), torch.rand(2, 1, 8, 8)),
     r"reconstruction output must be a torch tensor"),
    (lambda: check_tasks(("seg", "depth")), "unknown task 'depth'"),
    (lambda: check_tasks(()), "at least one"),
    (lambda: check_tasks(("seg", "seg")), "must not repeat"),
    (lambda: SegmentationLoss()(torch.randn(2, 2, 8, 8), torch.zeros(2, 8, 8)), r"\(B, 1, H, W\)"),
    # another batch size: MONAI's bare AssertionError; one channel: a loss over one class, MONAI only warned
    (lambda: SegmentationLoss()(torch.randn(2, 2, 8, 8), torch.zeros(3, 1, 8, 8)),
     r"target must be \(B, 1, H, W\) matching logits \(2, 2, 8, 8\), got \(3, 1, 8, 8\)"),
    (lambda: SegmentationLoss("dicefocal")(torch.randn(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)),
     r"one channel per class including background \(>= 2\), got 1 channel"),
    (lambda: SegmentationLoss()(torch.randn(2, 8, 8), torch.zeros(2, 1, 8, 8)), r"logits must be \(B, K, H, W\)"),
    (lambda: ClassificationLoss([1.0, 1.0])(torch.randn(2, 3), torch.tensor([0, 1])),
     r"class_weights has 2 entries but the model predicts 3 classes: give one weight per class"),
    (lambda: ClassificationLoss([1.0, 1.0, 1.0, 1.0])(torch.randn(2, 3), torch.tensor([0, 1])),
     r"class_weights has 4 entries but the model predicts 3 classes"),  # torch's "weight tensor should be..."
    (lambda: ReconstructionLoss()(torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8)), "differ"),
    (lambda: task_losses({"seg": torch.randn(2, 2, 8, 8)}, {"image": torch.rand(2, 1, 8, 8)},
                         build_losses(("seg",))), r"batch\['mask'\]"),
    (lambda: task_losses({"cls": torch.randn(2, 3)}, {"mask": _mask()}, build_losses(("seg",))),
     "no output for task 'seg'"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kind", ["dicece", "dicefocal"])
@pytest.mark.parametrize("mask, match", [
    (_mask() * 255, r"class indices 0\.\.1, got max 255; a 0/255 mask needs mask / 255"),
    (-_mask(), r"class indices 0\.\.1, got min -1"),
    (_mask() * 2, r"class indices 0\.\.1, got max 2"),  # one past the last class
])
def test_segmentation_loss_names_bad_mask_values(kind, mask, match):
    # MONAI's own error was "index 255 is out of bounds for dimension 1 with size 2"
    with pytest.raises(ValueError, match=match):
        SegmentationLoss(kind)(torch.randn(2, 2, 8, 8), mask)


@pytest.mark.parametrize("label, match", [
    (torch.tensor([0, 5]), r"0\.\.2 \(num_classes=3\), got max 5; build the model with num_classes=6"),
    (torch.tensor([0, 3]), r"0\.\.2 \(num_classes=3\), got max 3; build the model with num_classes=4"),
    (torch.tensor([0, -1]), r"got min -1; map the labels to 0\.\.2"),
    (torch.eye(3)[:2], r"\(B,\) integer class indices.*shape \(2, 3\).*label\.argmax\(1\)"),  # one-hot
    (torch.eye(3, dtype=torch.long)[:2], r"shape \(2, 3\).*label\.argmax\(1\)"),
    (torch.tensor([0.0, 1.0]), r"torch\.float32.*whole-number float ones label\.long\(\)"),
    (torch.tensor([0.5, 1.0]), r"a fraction such as 0\.5 is no class index"),  # .long() alone would truncate it
])
def test_classification_loss_names_bad_labels(label, match):
    # torch's own errors were "Target 5 is out of bounds" (a device-side assert on CUDA) and a batch-size mismatch
    with pytest.raises(ValueError, match=match):
        ClassificationLoss()(torch.randn(2, 3), label)


def test_targets_are_read_every_step_on_the_cpu_and_once_on_an_accelerator():
    from mtlearn.losses import _index_range

    loss = ClassificationLoss()
    assert _index_range(torch.tensor([0, 2]), loss) == (0, 2)
    assert _index_range(torch.tensor([1, 4]), loss) == (1, 4)  # CPU: reading costs nothing, so always
    # off the CPU a read waits for the GPU: only the first batch a module sees is read. A "meta" tensor
    # stands in for a GPU one; it has no values, so reading it raises, which shows the read
    meta = torch.empty(2, dtype=torch.long, device="meta")
    fresh = ClassificationLoss()
    with pytest.raises((RuntimeError, NotImplementedError)):
        _index_range(meta, fresh)  # the first batch is checked
    assert _index_range(meta, fresh) is None  # later ones are not
    assert _index_range(meta, loss) is None  # nor on a module that has checked a batch already


@pytest.mark.parametrize("logits", [torch.randn(4), torch.randn(4, 1), torch.randn(4, 3, 1)])
def test_classification_logits_that_are_not_two_per_image_are_named(logits):
    # (4,) was an IndexError from logits.shape[1]; (4, 1) a cross-entropy over one class, always 0
    with pytest.raises(ValueError, match=r"logits must have shape \(B, num_classes\) with num_classes >= 2, got "
                                         r"\(4.*a binary task needs two logits per image"):
        ClassificationLoss()(logits, torch.tensor([0, 1, 1, 0]))


def test_a_model_output_that_is_not_a_dict_is_named():
    """A raw MONAI UNet returns its logits as a tensor; torch said "Tensor.__contains__ only supports Tensor or
    scalar"."""
    with pytest.raises(ValueError, match=r"the model returned a Tensor, not a dict of task outputs; .*"
                                         r"\{'seg': logits\}.*mtlearn\.mtl\.monai_baseline"):
        task_losses(torch.randn(2, 2, 8, 8), {"mask": _mask()}, build_losses(("seg",)))


@pytest.mark.parametrize("config, match", [
    ({"seg": "dicefocal", "focal_gamma": 1.0}, r"got a dict; pass e.g. losses=LossConfig\(seg='dicefocal', "
                                               r"focal_gamma=1\.0\)"),
    ("dicefocal", r"got a str; pass e.g. losses=LossConfig\(seg='dicefocal'\)"),
    ({}, r"got a dict"),  # falsy: it silently became the default LossConfig()
])
def test_losses_that_are_not_a_loss_config_are_named(config, match):
    # a dict was an AttributeError: 'dict' object has no attribute 'seg'
    with pytest.raises(ValueError, match=r"losses must be a LossConfig \(from mtlearn\.losses\) or None.*" + match):
        build_losses(("seg", "cls"), config)


def test_classification_loss_still_takes_column_labels():
    logits, label = torch.randn(2, 3), torch.tensor([0, 2])
    assert torch.equal(ClassificationLoss()(logits, label.view(2, 1)), ClassificationLoss()(logits, label))


def test_a_one_hot_or_nan_seg_target_is_named_with_the_fix():
    logits = torch.zeros(2, 3, 8, 8)
    one_hot = r"got \(2, 3, 8, 8\); a one-hot mask .* needs mask\.argmax\(1, keepdim=True\)"
    with pytest.raises(ValueError, match=one_hot):
        SegmentationLoss()(logits, torch.zeros(2, 3, 8, 8))
    # one channel per class but another batch size: the batch is what is wrong, so no one-hot advice
    with pytest.raises(ValueError, match=r"matching logits \(2, 3, 8, 8\), got \(4, 3, 8, 8\)$"):
        SegmentationLoss()(logits, torch.zeros(4, 3, 8, 8))
    # a soft mask (resized with interpolation) is read rounded: -0.2 is background, 1.6 is class 2 of two
    soft = torch.zeros(2, 1, 8, 8)
    soft[0, 0, :2] = -0.2
    torch.testing.assert_close(SegmentationLoss()(logits, soft), SegmentationLoss()(logits, torch.zeros(2, 1, 8, 8)))
    soft[1, 0, 4:] = 1.6
    with pytest.raises(ValueError, match=r"class indices 0\.\.1, got max 1\.6"):
        SegmentationLoss()(logits[:, :2], soft)
    mask = torch.zeros(2, 1, 8, 8)
    mask[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"class indices 0\.\.2, got NaN or inf values"):
        SegmentationLoss()(logits, mask)


def test_an_integer_reconstruction_target_is_refused():
    """A uint8 clean image was turned into floats 0..255 and trained toward: an L1 loss 131 higher, silently."""
    output = torch.rand(2, 1, 8, 8)
    clean = (torch.rand(2, 1, 8, 8) * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"reconstruction target is torch\.uint8; .*clean\.float\(\) / 255"):
        ReconstructionLoss()(output, clean)
    with pytest.raises(ValueError, match=r"reconstruction target is torch\.int64"):  # torch.randint's, say
        ReconstructionLoss()(output, clean.long())
    torch.testing.assert_close(ReconstructionLoss("mse")(output, clean.float() / 255),
                               torch.nn.functional.mse_loss(output, clean.float() / 255))
