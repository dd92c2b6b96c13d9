"""Attribution: every head and method gives an input-sized map, the checks score what they should,
randomising the model changes the maps, and the viewer redraws when a control changes."""

import matplotlib

matplotlib.use("Agg")
import copy
import math
import re
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from torch import nn

from mtlearn import attribution as A
from mtlearn.data.synthetic import SyntheticUltrasound
from mtlearn.encoder import init_weights
from mtlearn.mtl import build_model

SIZE = 32
FAST = {"ig": {"n_steps": 4}, "smoothgrad": {"nt_samples": 2}, "occlusion": {"window": 8, "stride": 8}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", tasks=("seg", "cls", "recon"), image_size=SIZE).eval()


@pytest.fixture(scope="module")
def explainer(model):
    return A.Explainer(model)


@pytest.fixture(scope="module")
def data():
    # items: benign, malignant, normal, malignant; every one with an artifact
    return SyntheticUltrasound(num_samples=4, image_size=SIZE, seed=0, artifact_rate=1.0)


@pytest.fixture(scope="module")
def images(data):
    return torch.stack([data[i]["image"] for i in range(2)])  # (2, 1, 32, 32)


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.filterwarnings("ignore:Integrated Gradients' maps")  # 4 steps, for speed: incomplete, as it warns
@pytest.mark.parametrize("head", A.HEADS)
@pytest.mark.parametrize("method", A.METHODS)
def test_every_head_and_method_gives_an_input_sized_map(explainer, images, head, method):
    maps = explainer.attribute(images, head, method=method, **FAST.get(method, {}))
    assert maps.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(maps).all()
    assert maps.abs().sum() > 0
    if method not in A.SIGNED_METHODS:
        assert (maps >= 0).all()


def test_attribute_function_passes_its_layer_target_and_options_on(model, explainer, images):
    once = A.attribute(model, images, head="cls", target=1, method="gradcam", layer="encoder.stages.2")
    assert torch.allclose(once, A.Explainer(model, layer="encoder.stages.2").attribute(images, "cls", 1, "gradcam"))
    assert not torch.allclose(once, explainer.attribute(images, "cls", 1, "gradcam"))  # not the default layer
    nearest = A.attribute(model, images, "cls", 1, "gradcam", layer="encoder.stages.2", interpolate_mode="nearest")
    assert not torch.allclose(once, nearest)


def test_gradcam_rectifies_the_layer_map_before_resampling_it(explainer, images):
    """Grad-CAM keeps positive evidence: ReLU on the coarse map, then the upsampling. Clamping only after it
    (as the upsampled map is anyway, for bicubic's overshoot) lets negative cells pull down their positive
    neighbours; a layer map of one sign cannot tell the two apart, this one has both."""
    from captum.attr import LayerGradCam

    with torch.autocast("cpu", enabled=False):
        args = explainer.forward_args(images, "cls", 1)
        cam = LayerGradCam(explainer.head("cls"), explainer.layer).attribute(
            images.clone().requires_grad_(True), additional_forward_args=args, relu_attributions=False).detach()
    assert (cam < 0).any() and (cam > 0).any()
    expected = A.upsample_cells(cam.clamp_min(0), images.shape[-2:]).sum(1, keepdim=True)
    assert torch.allclose(explainer.attribute(images, "cls", 1, "gradcam"), expected, atol=1e-6)
    clamped_after = A.upsample_cells(cam, images.shape[-2:]).clamp_min(0).sum(1, keepdim=True)
    assert not torch.allclose(clamped_after, expected, atol=1e-6)


def test_explainer_explains_a_training_model_in_eval_mode(images):
    """In train mode BatchNorm normalises with the batch's statistics, so an image's map would depend on
    the images it is explained with: the explainer's copy is in eval mode, the user's model stays in train."""
    torch.manual_seed(0)
    net = build_model("tiny", tasks=("seg", "cls", "recon"), image_size=SIZE).train()
    explainer = A.Explainer(net)
    for method in ("saliency", "gradcam"):
        together = explainer.attribute(images, "cls", 1, method)
        alone = explainer.attribute(images[:1], "cls", 1, method)
        assert torch.allclose(alone[0], together[0], rtol=1e-4, atol=1e-6 * float(together.abs().max()))
    assert all(module.training for module in net.modules())


def test_attribution_does_not_change_the_model(model, images):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    A.attribute(model, images, head="seg", method="saliency")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------ wrappers


def test_class_logit_is_one_scalar_per_sample(model, images):
    target = torch.tensor([2, 0])
    scores = A.ClassLogit(model)(images, target)
    logits = model(images)["cls"]
    assert scores.shape == (2,)
    assert torch.allclose(scores, logits[torch.arange(2), target])


def test_explaining_one_head_runs_only_that_head_and_gives_the_same_map(model, explainer, images):
    """The wrappers ran the whole model: explaining the classifier computed both decoders too (occlusion and IG up
    to 1.5 times slower). Through MultiTaskUNet.forward_task only the head explained runs, with the same maps."""

    class Whole(nn.Module):  # the same model seen as any dict-returning model: every output computed
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

    whole = A.Explainer(Whole())
    ran = []
    decoders = explainer.model.decoders  # the explainer's own copy of the model
    hooks = [decoders[t].register_forward_hook(lambda m, a, o, t=t: ran.append(t)) for t in ("seg", "recon")]
    try:
        for head in ("cls", "seg", "recon"):
            for method in ("saliency", "occlusion"):
                ran.clear()
                ours = explainer.attribute(images, head, method=method)
                assert set(ran) == ({head} - {"cls"})
                assert torch.equal(ours, whole.attribute(images, head, method=method))
    finally:
        for hook in hooks:
            hook.remove()
    # a hook on the model itself (an input normalisation, say) runs: the whole forward is taken then
    calls = []
    hook = explainer.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        explainer.head_output(images, "cls")
    finally:
        hook.remove()
    assert calls == [1]


def test_lesion_score_sums_log_odds_over_the_region(model, images):
    region = torch.zeros(2, 1, SIZE, SIZE)
    region[0, :, 4:10, 4:10] = 1
    region[1, :, 20:, :] = 1
    scores = A.LesionScore(model)(images, region)
    logits = model(images)["seg"]
    log_odds = logits[:, 1] - logits[:, 0]  # two classes: logsumexp of the others is the background logit
    assert scores.shape == (2,)
    assert torch.allclose(scores, (log_odds * region[:, 0]).sum((1, 2)), rtol=1e-4, atol=1e-4)
    # a half-precision model's log-odds summed in float16 overflowed to inf at 128 px (65,504 is its largest)
    logits = torch.full((1, 2, 128, 128), 0.0, dtype=torch.float16)
    logits[:, 1] = 8.0

    class Constant(nn.Module):
        def forward(self, x):
            return {"seg": logits}

    half = dict(dtype=torch.float16)  # the images and region of a model cast with .half()
    score = A.LesionScore(Constant())(torch.zeros(1, 1, 128, 128, **half), torch.ones(1, 1, 128, 128, **half))
    assert score.item() == pytest.approx(128 * 128 * 8.0)  # log-odds 8 - 0 on every pixel, not inf
    logits = torch.full((1, 2, 4, 4), 0.0, dtype=torch.float64)  # float64 (checking the maths) stays float64
    logits[0, 1, 0, 0] = 3e-8
    double = dict(dtype=torch.float64)
    score = A.LesionScore(Constant())(torch.zeros(1, 1, 4, 4, **double), torch.ones(1, 1, 4, 4, **double))
    assert score.dtype == torch.float64 and score.item() == pytest.approx(3e-8, rel=1e-6)


def test_reconstruction_error_is_the_mean_over_the_region(model, images):
    region = torch.zeros(2, 1, SIZE, SIZE)
    region[:, :, :8] = 1
    reference = torch.rand_like(images)
    errors = A.ReconstructionError(model)(images, region, reference)
    squared = ((model(images)["recon"] - reference) ** 2)[:, 0, :8]
    assert errors.shape == (2,)
    assert torch.allclose(errors, squared.mean((1, 2)), rtol=1e-5)


def test_default_targets_come_from_the_model(model, explainer, images):
    with torch.no_grad():
        outputs = model(images)  # the user's model itself, not the explainer's route to it
    (cls_target,) = explainer.forward_args(images, "cls")
    assert torch.equal(cls_target, outputs["cls"].argmax(1))
    (region,) = explainer.forward_args(images, "seg")
    predicted = (outputs["seg"].argmax(1, keepdim=True) == 1).float()
    assert region.shape == (2, 1, SIZE, SIZE) and torch.equal(region, predicted)
    region, reference = explainer.forward_args(images, "recon")
    assert region.eq(1).all() and torch.equal(reference, images)


@pytest.mark.parametrize("head, target", [("cls", 1), ("seg", None), ("recon", None)])
def test_integrated_gradients_are_complete(explainer, images, head, target):
    """IG's maps add up to score(image) - score(baseline) (Sundararajan et al.'s completeness), within 5 % of that
    change, for every head. Relative only: the untrained cls head's change is ~0.003, so an absolute tolerance
    of 0.005 let an all-zero map pass."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete enough: no completeness warning either
        maps = explainer.attribute(images, head, target, "ig", n_steps=32)  # default baseline: flat mean grey
    args = explainer.forward_args(images, head, target)
    flat = images.mean(dim=(1, 2, 3), keepdim=True).expand_as(images)
    with torch.no_grad():
        change = explainer.head(head)(images, *args) - explainer.head(head)(flat, *args)
    assert change.abs().min() > 1e-3
    assert torch.allclose(maps.sum((1, 2, 3)), change, rtol=0.05, atol=0)
    assert not torch.allclose(2 * maps.sum((1, 2, 3)), change, rtol=0.05, atol=0)


@pytest.mark.parametrize("baseline, n_steps", [("black", 32), ("mean", 2)])
def test_integrated_gradients_warn_once_when_the_maps_are_incomplete(model, images, baseline, n_steps):
    """From black (the LayerNorm jump near it) or in 2 steps the maps miss the score change by 12-97 %, and only
    an exercise done by hand showed it; the warning says by how much and what to change, once per explainer."""
    explainer = A.Explainer(model)
    with pytest.warns(UserWarning, match=r"Integrated Gradients' maps of images \[.*\] do not add up to score\(image\) "
                                         r"- score\(baseline\) \(completeness\): image \d's map sums to -?[\d.]+ where "
                                         rf"the score changes by -?[\d.]+\..*n_steps={n_steps} now, e\.g\. "
                                         rf"{4 * n_steps}") as caught:
        maps = explainer.attribute(images, "seg", method="ig", n_steps=n_steps, baseline=baseline)
    sums = re.search(r"image (\d)'s map sums to (\S+) where the score changes by (\S+)\.", str(caught[0].message))
    image, total, change = int(sums[1]), float(sums[2]), float(sums[3])
    assert total == pytest.approx(float(maps[image].sum()), rel=1e-3)  # what it reports is the map's own sum
    assert abs(total - change) > 0.1 * abs(change)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = explainer.attribute(images, "seg", method="ig", n_steps=n_steps, baseline=baseline)
    assert torch.equal(maps, again)  # the check changes nothing in the maps
    if baseline == "black":
        with pytest.warns(UserWarning, match="or the default baseline 'mean'"):
            A.Explainer(model).attribute(images, "seg", method="ig", n_steps=n_steps, baseline=baseline)
    else:  # already on it: only the steps are advised
        assert "default baseline" not in str(caught[0].message)


def test_occlusion_fills_each_patch_with_the_baseline(explainer, images):
    """window = stride = 16 on 32 px: four patches, each pixel covered once, so the map over a patch is the
    score drop when that patch is replaced by the baseline (for "mean", the image's own mean grey)."""
    head, target = explainer.head("cls"), torch.tensor([1, 1])
    fills = {"mean": images.mean(dim=(1, 2, 3), keepdim=True), "black": torch.zeros(2, 1, 1, 1)}  # (B, 1, 1, 1)
    maps = {}
    for baseline, fill in fills.items():
        maps[baseline] = explainer.attribute(images, "cls", 1, "occlusion", window=16, stride=16, baseline=baseline)
        occluded = images.clone()
        occluded[:, :, :16, 16:] = fill  # the top-right patch
        with torch.no_grad():
            drop = head(images, target) - head(occluded, target)  # (B,)
        patch = maps[baseline][:, 0, :16, 16:]  # (B, 16, 16)
        assert torch.allclose(patch, drop.view(2, 1, 1).expand_as(patch), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(maps["mean"], maps["black"])


def test_the_mean_baseline_is_grey_in_every_channel():
    """For an RGB model the reference is one flat grey (the image's mean over all channels), not a tint."""
    images = torch.stack([torch.full((4, 4), v) for v in (0.2, 0.5, 0.8)]).unsqueeze(0)  # (1, 3, 4, 4)
    reference = A._baseline(images, "mean")
    assert reference.shape == images.shape and torch.allclose(reference, torch.full_like(images, 0.5))


def test_other_models_through_keys_and_layer(images):
    """A DisentangleNet names its outputs differently and has no encoder.stages: say which to use."""
    from mtlearn.disentangle import DisentangleNet

    torch.manual_seed(0)
    net = DisentangleNet(in_channels=1, num_classes_a=3, num_classes_b=2, widths=(4, 8))
    explainer = A.Explainer(net, layer="encoder_a", keys={"cls": "logits_a"})
    for method in ("gradcam", "ig"):
        maps = explainer.attribute(images, "cls", 2, method, **FAST.get(method, {}))
        assert maps.shape == (2, 1, SIZE, SIZE) and maps.abs().sum() > 0
    groups = A.randomisation_groups(explainer, images, "cls")
    assert groups[0].startswith("head_a.") and any(name.startswith("encoder_a.") for name in groups)
    assert not any(name.startswith(("encoder_b", "head_b", "adv")) for name in groups)
    data = [{"image": image, "label": 0} for image in images]
    with pytest.raises(ValueError, match=r"the model has none of the outputs .* \(it gives \[.*'logits_a'"
                                         r".*\]\); say which one each head reads, e\.g\. keys=\{'cls': 'logits_a'\}"):
        A.AttributionExplorer(net, data, methods="saliency")  # was "heads must be a non-empty subset of ..., got []"
    viewer = A.AttributionExplorer(net, data, methods="saliency", keys={"cls": "logits_a"})
    assert viewer.num_classes == 3


# ------------------------------------------------------------------------------------------ in-place


def test_without_inplace_switches_every_inplace_module_off_on_a_copy(model, images):
    before = A.count_inplace(model)  # the ResFormer stem and decoders use nn.ReLU(inplace=True)
    copy = A.without_inplace(model)
    assert A.count_inplace(copy) == 0 and A.count_inplace(model) == before
    assert sum(isinstance(m, nn.ReLU) and not m.inplace for m in copy.modules()) >= before
    with torch.no_grad():
        assert torch.equal(copy(images)["cls"], model(images)["cls"])


def test_without_inplace_repairs_a_layer_method():
    """An in-place ReLU right after the explained layer breaks Captum's layer hooks."""
    from captum.attr import LayerIntegratedGradients

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="in-place"):
        LayerIntegratedGradients(net, net[2]).attribute(x, target=0)
    fixed = A.without_inplace(net)
    maps = LayerIntegratedGradients(fixed, fixed[2]).attribute(x, target=0)
    assert maps.shape == (2, 4, 8, 8) and torch.isfinite(maps).all()


# ------------------------------------------------------------------------------------------ checks

# hand-made 4 x 4 maps against the mask of the top-left 2 x 2 block
MASK = torch.zeros(1, 1, 4, 4)
MASK[..., :2, :2] = 1


def _map(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 4, 4)


SHARE_CASES = [
    # (map, mode, expected share)
    (MASK.clone(), "positive", 1.0),
    (1 - MASK, "positive", 0.0),
    (torch.ones(1, 1, 4, 4), "positive", 4 / 16),  # a flat map scores the mask's area fraction
    (MASK * 3 + (1 - MASK) * 1, "positive", 12 / 24),
    (MASK * 2 - (1 - MASK), "positive", 1.0),  # negative evidence outside is not counted
    (MASK * 2 - (1 - MASK), "absolute", 8 / 20),
]


@pytest.mark.parametrize("maps, mode, expected", SHARE_CASES)
def test_mask_share_on_hand_made_maps(maps, mode, expected):
    assert A.mask_share(maps, MASK, mode).item() == pytest.approx(expected)


def test_mask_share_is_undefined_for_an_empty_mask_and_zero_for_a_massless_map():
    share = A.mask_share(torch.cat([_map(range(16)), torch.zeros(1, 1, 4, 4)]),
                         torch.cat([torch.zeros(1, 1, 4, 4), MASK]))
    assert math.isnan(share[0]) and share[1] == 0.0  # no evidence anywhere: none in the mask (a pointing miss too)


POINTING_CASES = [
    # (map, tolerance, mode, expected hit)
    (_map([0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0, "positive", 1.0),  # peak at (1, 1): inside
    (_map([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]), 0, "positive", 0.0),  # peak at (3, 3): outside
    (_map([0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0, "positive", 0.0),  # (0, 2): next to the mask
    (_map([0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 1, "positive", 1.0),  # ... within 1 px tolerance
    (_map([0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 1, "positive", 0.0),  # (0, 3): 2 px away
    (_map([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -9]), 0, "positive", 1.0),  # strong negative ignored
    (_map([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -9]), 0, "absolute", 0.0),  # ... unless absolute
    (torch.zeros(1, 1, 4, 4), 0, "positive", 0.0),  # a map with no evidence points nowhere
    (torch.zeros(1, 1, 4, 4), 1, "positive", 0.0),  # ... even where the grown mask covers most of the image
    (_map([0, 0, 0, 0, 0, 9, 9, 0, 0, 9, 9, 0, 0, 0, 0, 0]), 0, "positive", 0.0),  # plateau, 1 of 4 inside
    (_map([9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0, "positive", 1.0),  # plateau, 2 of 3 inside
    (_map([0, 9, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0, "positive", 1.0),  # plateau, 1 of 2: half counts
    # one true peak outside beats a near-peak patch inside: only ties to within rounding form a plateau
    (_map([8.999, 8.999, 0, 0, 8.999, 8.999, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]), 0, "positive", 0.0),
]


@pytest.mark.parametrize("maps, tolerance, mode, expected", POINTING_CASES)
def test_pointing_game_on_hand_made_maps(maps, tolerance, mode, expected):
    assert A.pointing_game(maps, MASK, tolerance, mode).item() == expected


def test_pointing_game_skips_empty_masks():
    hits = A.pointing_game(torch.rand(2, 1, 4, 4), torch.cat([MASK, torch.zeros(1, 1, 4, 4)]))
    assert not math.isnan(hits[0]) and math.isnan(hits[1])


def test_localisation_chances_on_hand_made_masks(explainer, data):
    """The chance levels counted by hand: a one-pixel region in the middle and a 2 x 2 one in a corner;
    an empty mask is left out. Grown by tolerance 1, both become 3 x 3 (the corner is clipped by the border)."""
    images = torch.stack([data[i]["image"] for i in range(3)])
    masks = torch.zeros(3, 1, SIZE, SIZE)
    masks[0, 0, SIZE // 2, SIZE // 2] = 1
    masks[1, 0, :2, :2] = 1  # masks[2]: empty
    scores = A.localisation_scores(explainer, images, masks, "cls", methods=("saliency",), tolerance=1)["saliency"]
    assert scores["chance"] == pytest.approx((1 + 4) / 2 / SIZE**2)
    assert scores["pointing_chance"] == pytest.approx(9 / SIZE**2)
    scores = A.localisation_scores(explainer, images, masks, "cls", methods=("saliency",), tolerance=0)["saliency"]
    assert scores["pointing_chance"] == pytest.approx((1 + 4) / 2 / SIZE**2)  # no growing: the chance itself


def test_masks_other_than_zero_and_one_are_refused_not_used_as_weights(explainer, data):
    """A 0/255 PNG mask used to weight the scores: shares of 14 and a "chance" of 9.8."""
    png = (MASK * 255).to(torch.uint8)
    for score in (A.mask_share, A.pointing_game):
        with pytest.raises(ValueError, match=r"mask must hold 0 and 1 only, got values in 0\.\.255; .*pass mask > 0"):
            score(torch.rand(1, 1, 4, 4), png)
    with pytest.raises(ValueError, match=r"mask must hold 0 and 1 only, got values in 0\.\.0\.5"):
        A.mask_share(torch.rand(1, 1, 4, 4), MASK * 0.5)  # a soft mask
    images = torch.stack([data[i]["image"] for i in range(2)])
    masks = torch.stack([data[i]["mask"] for i in range(2)]) * 255
    with pytest.raises(ValueError, match=r"mask must hold 0 and 1 only"):
        A.localisation_scores(explainer, images, masks, "cls", methods=("saliency",))
    assert A.mask_share(torch.rand(1, 1, 4, 4), MASK.bool()).item() <= 1  # booleans are 0/1


def test_a_model_that_returns_a_tuple_is_named_with_the_fix():
    with pytest.raises(TypeError, match=r"the model returns a tuple; .* wrap the model so that it returns "
                                        r"e\.g\. \{'cls': logits\}"):
        A._head_output((torch.zeros(2, 3), torch.zeros(2, 1, 4, 4)), "cls")


def test_localisation_scores_average_over_items_with_a_region(explainer, data):
    items = [data[i] for i in range(4)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    scores = A.localisation_scores(explainer, images, masks, "cls", methods=("saliency", "gradcam"))
    assert set(scores) == {"saliency", "gradcam"}
    for values in scores.values():
        assert 0 <= values["mask_share"] <= 1 and 0 <= values["pointing_game"] <= 1
    keep = masks.flatten(1).sum(1) > 0
    assert scores["saliency"]["chance"] == pytest.approx(float(masks[keep].flatten(1).mean(1).mean()))
    grown = torch.nn.functional.max_pool2d(masks[keep], 3, stride=1, padding=1)  # tolerance 1
    assert scores["saliency"]["pointing_chance"] == pytest.approx(float(grown.flatten(1).mean(1).mean()))
    maps = explainer.attribute(images[keep], "cls", None, "saliency")
    assert scores["saliency"]["mask_share"] == pytest.approx(float(A.mask_share(maps, masks[keep]).mean()), rel=1e-5)
    labels = torch.tensor([it["label"] for it in items])
    whole = A.localisation_scores(explainer, images, masks, "cls", labels, methods=("saliency",))
    one_by_one = A.localisation_scores(explainer, images, masks, "cls", labels, methods=("saliency",), batch_size=1)
    assert whole["saliency"] == pytest.approx(one_by_one["saliency"])


def test_the_recon_head_is_scored_against_the_reference_given(explainer, model, data):
    """The clean images, where there are any: the same maps as attribute(reference=...) gives, not those
    of the reconstruction scored against the noisy input."""
    items = [data[i] for i in range(4)]
    images, masks = torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items])
    clean = torch.stack([it["clean"] for it in items])
    keep = masks.flatten(1).sum(1) > 0
    scored = A.localisation_scores(explainer, images, masks, "recon", methods=("saliency",), reference=clean)
    maps = explainer.attribute(images[keep], "recon", None, "saliency", reference=clean[keep])
    assert scored["saliency"]["mask_share"] == pytest.approx(float(A.mask_share(maps, masks[keep]).mean()), rel=1e-5)
    noisy = A.localisation_scores(explainer, images, masks, "recon", methods=("saliency",))
    assert noisy["saliency"]["mask_share"] != pytest.approx(scored["saliency"]["mask_share"], rel=1e-3)
    with pytest.raises(ValueError, match=r"reference must have the images' shape \(4, 1, 32, 32\)"):
        A.localisation_scores(explainer, images, masks, "recon", methods=("saliency",), reference=clean[:2])
    result = A.cascading_randomisation(model, images[:2], "recon", method="saliency", groups=["heads.recon.out"],
                                       reference=clean[:2], progress=False)
    assert torch.allclose(result.maps[0], explainer.attribute(images[:2], "recon", None, "saliency",
                                                              reference=clean[:2]).cpu())


# ------------------------------------------------------------------------------------------ sanity check


def test_spearman_on_known_rankings():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(A.spearman(a, a), torch.ones(2))
    assert torch.allclose(A.spearman(a, -a, absolute=False), -torch.ones(2))  # reversed ranking
    assert torch.allclose(A.spearman(a, a ** 3), torch.ones(2))  # ranks only: monotone maps agree
    assert A.spearman(a[:1], torch.zeros(1, 4)).item() == 0.0  # a constant map shares no ranking


def test_a_compiled_model_is_explained_through_the_model_inside(model, explainer, images):
    # Grad-CAM's hook, added after torch.compile traced the model, never fired (Captum's "Forward hook did not
    # obtain any outputs"); the randomisation test counted "_orig_mod" as a block level, reached blocks the head
    # does not use (the compiled backward gives zeros, not None), and re-initialised with PyTorch's defaults
    compiled = torch.compile(model)  # nothing is compiled until it runs, and the explainer never runs it
    wrapped = A.Explainer(compiled)
    assert not any(name.startswith("_orig_mod") for name, _ in wrapped.model.named_modules())
    assert A.randomisation_groups(wrapped, images, "cls") == A.randomisation_groups(explainer, images, "cls")
    assert A.model_init(compiled) is init_weights
    saliency = wrapped.attribute(images, "cls", 1, "saliency")  # a map with gradients first, as in the notebook
    assert torch.allclose(saliency, explainer.attribute(images, "cls", 1, "saliency"))
    gradcam = wrapped.attribute(images, "cls", 1, "gradcam")
    assert torch.allclose(gradcam, explainer.attribute(images, "cls", 1, "gradcam"))
    assert A.Explainer(compiled, layer=model.encoder.stages[2]).layer_name == "encoder.stages.2"
    # a name as the wrapper's named_modules() lists it, and DataParallel's (DDP's) wrapper too
    assert A.Explainer(compiled, layer="_orig_mod.encoder.stages.2").layer_name == "encoder.stages.2"
    both = torch.compile(torch.nn.DataParallel(model))  # wrapped twice: both prefixes go
    assert A.Explainer(both, layer="_orig_mod.module.encoder.stages.2").layer_name == "encoder.stages.2"
    own = nn.Sequential()  # a model whose own module is called "module": its names are kept, wrapped or not
    own.module = nn.Sequential(nn.Linear(2, 2))
    assert A.Explainer(own, layer="module.0").layer_name == "module.0"
    assert A.Explainer(torch.nn.DataParallel(own), layer="module.0").layer_name == "module.0"
    parallel = A.Explainer(torch.nn.DataParallel(model), layer="module.encoder.stages.2")
    assert parallel.layer_name == "encoder.stages.2" and not isinstance(parallel.model, torch.nn.DataParallel)
    assert torch.allclose(parallel.attribute(images, "cls", 1, "saliency"), saliency)


def test_randomisation_takes_the_model_or_its_explainer_where_each_belongs(model, explainer, images):
    # notebook 05 passes an explainer to one and the model to the other: swapped, a bare AttributeError, and
    # "build the model and load_state_dict first" for an Explainer
    assert A.randomisation_groups(model, images, "cls") == A.randomisation_groups(explainer, images, "cls")
    with pytest.raises(TypeError, match="got an Explainer where the model goes; pass the model it explains"):
        A.cascading_randomisation(explainer, images, "cls", 1, "saliency", progress=False)


def test_randomisation_groups_follow_the_head_from_the_top(explainer, images):
    cls_groups = A.randomisation_groups(explainer, images, "cls")
    assert cls_groups[0].startswith("heads.cls")
    assert not any(name.startswith(("decoders", "heads.seg", "heads.recon")) for name in cls_groups)
    stages = [name for name in cls_groups if name.startswith("encoder.stages")]
    assert stages == [f"encoder.stages.{i}" for i in (3, 2, 1, 0)]
    seg_groups = A.randomisation_groups(explainer, images, "seg")
    assert seg_groups[0] == "heads.seg.conv" and any(name.startswith("decoders.seg") for name in seg_groups)


def test_cascading_randomisation_lowers_the_rank_correlation(model, images):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = A.cascading_randomisation(model, images, "cls", method="ig", n_steps=8, progress=False)
    assert result.steps[0] == "original" and result.spearman[0] == 1.0
    assert len(result.steps) == len(result.spearman) == len(result.maps) > 2
    assert all(m.shape == (2, 1, SIZE, SIZE) for m in result.maps)
    assert result.spearman[-1] < 0.8  # the fully randomised model explains nothing of the original
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # on a copy


def test_an_explainer_shows_its_model_and_layer(model):
    """It printed as <mtlearn.attribution.Explainer object at 0x...>."""
    assert repr(A.Explainer(model)) == ("Explainer(MultiTaskUNet: a copy in eval mode on cpu; Grad-CAM layer "
                                        f"{A.default_layer(model)} (the default))")
    assert repr(A.Explainer(model, layer=model.encoder.stages[0])).endswith("Grad-CAM layer encoder.stages.0)")
    assert repr(A.Explainer(nn.Conv2d(1, 2, 3))).endswith("Grad-CAM layer none (give layer= for Grad-CAM))")


def test_a_randomisation_result_shows_its_steps_and_correlations_not_its_maps():
    """Its repr printed every map's tensor: 325 lines for two images."""
    maps = [torch.rand(2, 1, 32, 32)] * 2
    result = A.RandomisationResult(["original", "heads.cls"], [1.0, 0.25], maps)
    assert repr(result) == "RandomisationResult(steps=['original', 'heads.cls'], spearman=[1.0, 0.25], absolute=True)"


def test_cascading_randomisation_is_seeded_and_leaves_the_callers_random_state(model, images):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = A.cascading_randomisation(model, images, "cls", method="smoothgrad", nt_samples=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    again = A.cascading_randomisation(model, images, "cls", method="smoothgrad", nt_samples=2, progress=False)
    assert first.spearman == again.spearman


def test_cascading_randomisation_draws_the_same_noise_at_every_step(model, images):
    """The segmentation head's last layer cannot change a cls map: a SmoothGrad map that changes, changed its noise."""
    result = A.cascading_randomisation(model, images, "cls", method="smoothgrad", groups=["heads.seg.conv"],
                                       nt_samples=2, progress=False)
    assert torch.equal(result.maps[0], result.maps[1])


def test_cascading_randomisation_is_cumulative(model, images):
    """Step 2 randomises a block the cls head does not use on top of step 1: fc2 stays random, the maps stay."""
    result = A.cascading_randomisation(model, images, "cls", method="saliency",
                                       groups=["heads.cls.fc2", "heads.seg.conv"], progress=False)
    assert not torch.allclose(result.maps[1], result.maps[0])
    assert torch.equal(result.maps[2], result.maps[1])


def test_cascading_randomisation_seeds_only_the_generators_it_restores(model, images, monkeypatch):
    """torch.manual_seed would also seed every CUDA device, whose states a CPU run does not save."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(("cuda", seed)))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: seeded.append(("mps", seed)))
    A.cascading_randomisation(model, images, "cls", method="saliency", groups=["heads.cls.fc2"], progress=False)
    assert seeded == []


def test_smoothgrad_noise_follows_each_images_own_range(explainer):
    """Noise at 15 % of the batch's range would give a flat image a map; of its own range, none."""
    images = torch.stack([torch.zeros(1, 8, 8), torch.linspace(0, 1, 64).view(1, 8, 8)])
    maps = explainer._smoothgrad(lambda x: x.square().flatten(1).sum(1), images, (), nt_samples=4)  # |grad| = 2|x|
    assert maps[0].abs().max() < 1e-4 and maps[1].abs().max() > 0.5


def test_randomise_redraws_a_constant_parameter_without_reset_at_a_small_scale():
    """A constant has no spread of its own to keep: it is redrawn with std 0.02 (a layer scale, a gate)."""
    torch.manual_seed(0)
    block = nn.Module()
    block.gate = nn.Parameter(torch.ones(10_000))
    A.randomise_(block)
    gate = block.gate.detach()
    assert float(gate.std()) == pytest.approx(0.02, rel=0.05) and abs(float(gate.mean())) < 0.002


def test_count_inplace_looks_inside_nested_modules():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(inplace=True)), nn.ReLU())
    assert A.count_inplace(model) == 1 and A.count_inplace(A.without_inplace(model)) == 0


def test_cascading_randomisation_draws_each_blocks_weights_from_its_own_seed(model, images, monkeypatch):
    drawn, randomise = [], A.randomise_

    def recorded(module, init=None):
        drawn.append(torch.initial_seed())
        return randomise(module, init)

    monkeypatch.setattr(A, "randomise_", recorded)
    A.cascading_randomisation(model, images, "cls", 1, "saliency", groups=["heads.cls.fc2", "heads.cls.fc1"], seed=7,
                              progress=False)
    assert drawn == [8, 9]


def test_the_occlusion_window_must_fit_the_shorter_side(explainer):
    with pytest.raises(ValueError, match=r"window must be an int in 1\.\.32 \(the image side"):
        explainer.check_options("occlusion", (32, 48), window=40)
    explainer.check_options("occlusion", (32, 48), window=32)


def test_a_non_negative_map_with_zeros_is_drawn_on_the_unsigned_scale():
    """Grad-CAM after its ReLU is mostly zeros: that is no sign of negative evidence."""
    cam = torch.zeros(1, 8, 8)  # one map per image, as _show_map gets them
    cam[0, 2:4, 2:4] = 1.0
    assert not A._is_signed("gradcam", [cam]) and A._is_signed("gradcam", [cam - 0.5])


def test_randomise_redraws_parameters():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    weight = layer.weight.detach().clone()
    A.randomise_(layer)
    assert not torch.allclose(layer.weight, weight)


def test_randomise_restores_the_weight_scale_of_a_freshly_built_model(model):
    """Adebayo et al. re-initialise with the model's own scheme: mtlearn's init_weights (linear std 0.02,
    Kaiming-normal convolutions), not PyTorch's defaults (std 1 / sqrt(3 fan_in) for both)."""
    torch.manual_seed(1)
    fresh = build_model("tiny", tasks=("seg", "cls", "recon"), image_size=SIZE)
    assert A.model_init(fresh) is init_weights and A.model_init(nn.Linear(2, 2)) is None
    net = copy.deepcopy(model)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # as if trained: far from the initial scale
    for block in ("heads.cls.fc1", "encoder.stages.3"):
        A.randomise_(net.get_submodule(block), A.model_init(net))
    for name in ("heads.cls.fc1.weight", "encoder.stages.3.cnn.0.conv2.weight"):
        std, fresh_std = float(net.get_parameter(name).detach().std()), float(fresh.get_parameter(name).detach().std())
        assert std == pytest.approx(fresh_std, rel=0.1), name


def test_cascading_randomisation_reinitialises_with_the_models_scheme(model, images, monkeypatch):
    used = []
    randomise = A.randomise_
    monkeypatch.setattr(A, "randomise_", lambda module, init=None: used.append(init) or randomise(module, init))
    for init in ("auto", None):
        A.cascading_randomisation(model, images, "cls", method="saliency", groups=["heads.cls.fc2"], init=init,
                                  progress=False)
    assert used == [init_weights, None]


# ------------------------------------------------------------------------------------------ figures, viewer


def _panels(fig) -> list:
    """A figure's axes without its colourbars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _colourbars(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _limits(fig, columns: int, first: int = 2) -> list[list[tuple]]:
    """(vmin, vmax) of the map drawn in each panel, by row, map columns only (the map is the top image)."""
    panels = _panels(fig)
    rows = [panels[r * columns:(r + 1) * columns] for r in range(len(panels) // columns)]
    return [[tuple(round(v, 6) for v in ax.get_images()[-1].get_clim()) for ax in row[first:]] for row in rows]


def test_plot_attributions_grid(images):
    maps = {"ig": torch.randn(2, 1, SIZE, SIZE), "gradcam": torch.rand(2, 1, SIZE, SIZE)}
    fig = A.plot_attributions(images, maps, masks=torch.zeros(2, 1, SIZE, SIZE), title="t")
    assert len(_panels(fig)) == 2 * 4
    assert [ax.get_title() for ax in fig.axes[:4]] == ["image", "lesion mask", "ig", "gradcam"]
    assert len(_colourbars(fig)) == 2  # one under each map column
    plt.close(fig)


def test_colourbar_ends_are_written_alike_at_every_scale(images):
    """.2g wrote 0.00011 beside 7.2e-06 and -5.7e-05 (notebook 05's recon-head colourbars)."""
    assert [A._tick_label(v) for v in (0.0, 1.1e-4, 7.2e-6, -5.7e-5, 0.36, 12.0, 1234.5, 99.5, 0.00999, 0.5)] == \
        ["0", "1.1e-04", "7.2e-06", "-5.7e-05", "0.36", "12", "1234", "100", "0.01", "0.5"]
    maps = {"ig": 1e-4 * torch.randn(2, 1, SIZE, SIZE), "saliency": 1e-4 * torch.rand(2, 1, SIZE, SIZE)}
    fig = A.plot_attributions(images, maps)
    fig.canvas.draw()
    written = [t.get_text() for bar in _colourbars(fig) for t in bar.get_xticklabels() if t.get_text() != "0"]
    assert written and all(re.fullmatch(r"-?\d\.\de-0\d", t) for t in written), written
    plt.close(fig)


def _two_models():
    """Maps of two models, the second's three times as strong: keys as in notebook 05's shortcut figure."""
    torch.manual_seed(0)
    ig, cam = torch.randn(2, 1, SIZE, SIZE), torch.rand(2, 1, SIZE, SIZE)
    return {"mtl/ig": ig, "mtl/gradcam": cam, "shortcut/ig": 3 * ig.flip(-1), "shortcut/gradcam": 3 * cam.flip(-1)}


def test_plot_attributions_shares_one_colour_scale_per_method_across_models_and_rows(images):
    maps = _two_models()
    fig = A.plot_attributions(images, maps, torch.zeros(2, 1, SIZE, SIZE))
    limits = _limits(fig, 6)  # by row: mtl/ig, mtl/gradcam, shortcut/ig, shortcut/gradcam
    assert len({row[0] for row in limits} | {row[2] for row in limits}) == 1  # one IG scale for both models
    assert len({row[1] for row in limits} | {row[3] for row in limits}) == 1  # one Grad-CAM scale
    ig = A.colour_limit([maps[k][r] for k in ("mtl/ig", "shortcut/ig") for r in range(2)])
    cam = A.colour_limit([maps[k][r] for k in ("mtl/gradcam", "shortcut/gradcam") for r in range(2)])
    signed, unsigned = (-round(ig, 6), round(ig, 6)), (0.0, round(cam, 6))
    assert limits == [[signed, unsigned, signed, unsigned]] * 2  # IG centred on 0, Grad-CAM from 0
    assert len(_colourbars(fig)) == 4
    plt.close(fig)


def test_plot_attributions_share_column_and_panel(images):
    maps = _two_models()
    fig = A.plot_attributions(images, maps, share="column")
    limits = _limits(fig, 5, first=1)
    assert limits[0] == limits[1]  # rows share
    assert limits[0][2][1] == pytest.approx(3 * limits[0][0][1], rel=1e-4)  # the columns of one method do not
    assert len(_colourbars(fig)) == 4
    fig = A.plot_attributions(images, maps, share="panel")
    limits = _limits(fig, 5, first=1)
    assert limits[0] != limits[1]
    assert len(_colourbars(fig)) == 2 * 4  # each panel its own
    with pytest.raises(ValueError, match="share must be one of"):
        A.plot_attributions(images, maps, share="row")
    plt.close("all")


def test_an_all_zero_map_is_labelled_and_low_values_are_transparent(images):
    maps = {"gradcam": torch.stack([torch.rand(1, SIZE, SIZE), torch.zeros(1, SIZE, SIZE)]),
            "ig": torch.randn(2, 1, SIZE, SIZE)}
    fig = A.plot_attributions(images, maps)
    panels = _panels(fig)  # row 0: image, gradcam, ig; row 1: the same
    labels = [[t.get_text() for t in ax.texts] for ax in panels]
    assert labels == [[], [], [], [], ["map = 0"], []]
    assert max(panels[4].texts[0].get_position()) < 0.1  # in a corner: in the middle it covered the lesion
    for ax in (panels[1], panels[2]):
        overlay = ax.get_images()[-1]
        low, high = overlay.get_clim()
        assert overlay.cmap(overlay.norm(0.0))[3] < 0.01  # no attribution: the image shows through
        assert overlay.cmap(overlay.norm(high))[3] > 0.5  # strong attribution: clearly coloured
        if low < 0:  # signed (IG): strong negative too, transparent at 0 in the middle
            assert overlay.cmap(overlay.norm(low))[3] > 0.5
    plt.close(fig)


def test_colourbars_show_the_colours_the_panels_show_over_grey_tissue(images):
    """The overlay's colours are partly transparent: on a white bar the faint end read pink, where the
    panels (over the grey image) show a dark haze."""
    maps = {"saliency": torch.rand(2, 1, SIZE, SIZE), "ig": torch.randn(2, 1, SIZE, SIZE)}
    fig = A.plot_attributions(images, maps)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0  # (H, W, 3), top row first
    grey = matplotlib.colors.to_rgb(A.BAR_BACKGROUND)
    for bar in _colourbars(fig):
        image = next(c for c in bar.collections if isinstance(c, matplotlib.collections.QuadMesh))  # its colours
        (x0, y0), (x1, y1) = bar.get_window_extent().get_points()
        low, high = image.get_clim()
        for fraction in (0.3, 0.6):  # along the bar, which runs from low (left) to high
            colour = image.cmap(image.norm(low + fraction * (high - low)))
            expected = np.array(colour[:3]) * colour[3] + np.array(grey) * (1 - colour[3])
            row, column = int(pixels.shape[0] - (y0 + y1) / 2), int(x0 + fraction * (x1 - x0))
            np.testing.assert_allclose(pixels[row, column], expected, atol=0.03)
    plt.close(fig)


def test_colour_limit_is_a_robust_maximum():
    values = torch.arange(1, 101, dtype=torch.float32).view(1, 10, 10)
    assert A.colour_limit([values], 100) == 100
    assert A.colour_limit([values, -values], 50) == pytest.approx(50.5)  # |value| of all maps pooled
    sparse = torch.zeros(1, 10, 10)
    sparse[0, 0, 0] = -4.0
    assert A.colour_limit([sparse]) == 4.0  # zeros say nothing about strength: one non-zero pixel sets the scale
    assert A.colour_limit([torch.zeros(1, 4, 4)]) == 1.0
    with pytest.raises(ValueError, match="percentile"):
        A.colour_limit([values], 0)


def test_plot_randomisation_gives_this_images_and_the_mean_rho_and_labels_empty_maps():
    original = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    flipped = torch.stack([original[0], -original[1]])  # image 1: every sign flipped, the ranking of |value| kept
    result = A.RandomisationResult(["original", "head", "stem"], [1.0, 0.25, 0.0],
                                   [original, flipped, torch.zeros(2, 1, 4, 4)])  # absolute (the default)
    fig = A.plot_randomisation(result, index=1, method="ig", image=original[1])
    titles = [ax.get_title() for ax in _panels(fig)]
    assert titles[1] == "head\nthis image: rho = 1.00\nmean: rho = 0.25"
    assert [[t.get_text() for t in ax.texts] for ax in _panels(fig)] == [[], [], ["map = 0"]]
    result.absolute = False  # as cascading_randomisation(..., absolute=False) records it: signs count
    fig = A.plot_randomisation(result, index=1, method="ig")
    assert "this image: rho = -1.00" in _panels(fig)[1].get_title()
    plt.close("all")


def test_cascading_randomisation_records_how_it_compared(model, images):
    result = A.cascading_randomisation(model, images[:1], "cls", 1, "saliency", groups=["heads.cls.fc2"],
                                       absolute=False, progress=False)
    assert result.absolute is False


def test_viewer_draws_its_map_with_a_colourbar(model, data, monkeypatch):
    shown = []
    monkeypatch.setattr(A, "show_in", lambda output, fig: shown.append(len(_colourbars(fig))))
    A.AttributionExplorer(model, data, methods=("saliency",))
    assert shown == [1]


def test_viewer_displays_as_an_explorer_with_a_static_picture(model, data):
    from mtlearn.widgets import Explorer

    viewer = A.AttributionExplorer(model, data, methods=("saliency",))
    bundle = viewer._repr_mimebundle_()
    assert isinstance(viewer, Explorer) and bundle["text/plain"].startswith("AttributionExplorer: interactive")
    assert bundle["image/png"] == viewer.output.outputs[0]["data"]["image/png"]


def test_a_closed_viewer_lets_go_of_its_model_copy(model, data):
    import gc
    import weakref

    viewer = A.AttributionExplorer(model, data, methods=("saliency",))
    copy = weakref.ref(viewer.explainer.model)  # the explainer's own copy of the model, 6-8 MB in the notebooks
    assert viewer._cache
    viewer.close()
    gc.collect()
    assert copy() is None and viewer.explainer is None and not viewer._cache
    assert all(widget.comm is None for widget in (viewer.widget, viewer.head, viewer.method, viewer.output))


def test_outlines_are_not_told_apart_by_colour_alone(model, data):
    # for a colour-blind reader lime is the yellow of a map's strongest values, and lime and orange merge
    from matplotlib import patheffects
    from matplotlib.collections import LineCollection, QuadMesh

    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[..., 8:16, 8:16] = 1
    fig = A.plot_attributions(torch.rand(2, 1, SIZE, SIZE), {"saliency": torch.rand(2, 1, SIZE, SIZE)}, mask)
    # the outlines: all but the colourbar's mesh and dividers (a ContourSet from Matplotlib 3.8, its one level's
    # collection before)
    on_maps = [c for ax in fig.axes for c in ax.collections if not isinstance(c, (LineCollection, QuadMesh))]
    assert len(on_maps) == 2  # one per image, on the saliency column
    for outline in on_maps:  # a black stroke under the lime line
        assert any(isinstance(e, patheffects.withStroke) for e in outline.get_path_effects())
    viewer = A.AttributionExplorer(model, data, methods=("saliency",))  # every item has a lesion and an artifact
    lesion, artifact = viewer.figure.axes[0].collections
    assert lesion.get_linestyle()[0][1] is None and artifact.get_linestyle()[0][1] is not None  # solid, dashed
    assert "artifact: orange, dashed" in viewer.figure.axes[0].get_title()
    plt.close("all")


def test_viewer_redraws_on_control_changes(model, data):
    viewer = A.AttributionExplorer(model, data, methods=("saliency", "gradcam"), method_kw=FAST)
    assert viewer.head.options == ("cls", "seg", "recon")
    assert viewer.state["head"] == "cls" and viewer.state["method"] == "saliency"
    assert viewer.state["target"] == "predicted class" and viewer.state["map_shape"] == (1, 1, SIZE, SIZE)
    assert [label for label, _ in viewer.target.options] == ["predicted class", "normal", "benign", "malignant"]
    viewer.index.value = 1
    assert viewer.state["index"] == 1 and "synthetic-00001" in viewer.state["title"]
    assert 0 <= viewer.state["mask_share"] <= 1  # item 1 has a lesion
    viewer.target.value = 2
    assert viewer.state["target"] == "malignant"
    viewer.method.value = "gradcam"
    assert viewer.state["method"] == "gradcam"
    viewer.head.value = "seg"
    assert viewer.state["head"] == "seg" and viewer.state["target"] == "predicted lesion"
    viewer.target.value = "mask"
    assert viewer.state["target"] == "true lesion"
    viewer.head.value = "recon"
    assert viewer.state["target"] == "whole image"
    viewer.index.value = 2  # a normal image: no lesion, so no in-lesion share
    assert math.isnan(viewer.state["mask_share"]) and "in-lesion" not in viewer.state["title"]
    # the map is cached with the item it was computed on (an augmented dataset reads differently each time)
    assert viewer.compute(2, "recon", "image", "gradcam")[0] is viewer.compute(2, "recon", "image", "gradcam")[0]
    # ... per target: another class is another map
    assert not torch.equal(viewer.compute(1, "cls", 0, "saliency")[1], viewer.compute(1, "cls", 2, "saliency")[1])
    # the recon head is explained against the item's clean image, as in the notebook
    item, shown = viewer.compute(1, "recon", "image", "saliency")
    expected = viewer.explainer.attribute(item["image"][None], "recon", None, "saliency", reference=item["clean"][None])
    assert torch.allclose(shown, expected.cpu())
    assert viewer.CACHE_SIZE == 64  # the documented default (views seen last)
    viewer.CACHE_SIZE = 3  # it grew with every view clicked through (about 1 MiB per view at 128 px)
    for index in range(4):  # views not seen before (class 1)
        viewer.compute(index, "cls", 1, "saliency")
    assert list(viewer._cache) == [(index, "cls", 1, "saliency") for index in (1, 2, 3)]  # the oldest went
    viewer.compute(1, "cls", 1, "saliency")  # seen again: kept over 2, unseen longer
    viewer.compute(0, "cls", 1, "saliency")
    assert list(viewer._cache) == [(index, "cls", 1, "saliency") for index in (3, 1, 0)]


def test_viewer_offers_lesion_targets_only_where_the_data_has_masks(model, data):
    """A classification-only dataset (BreastMNIST) has no "mask": choosing a lesion target raised KeyError."""
    no_masks = [{k: v for k, v in data[i].items() if k != "mask"} for i in range(len(data))]
    viewer = A.AttributionExplorer(model, no_masks, methods=("saliency",))
    viewer.head.value = "seg"
    assert [value for _, value in viewer.target.options] == ["predicted"]
    viewer.head.value = "recon"
    assert [value for _, value in viewer.target.options] == ["image"]
    assert math.isnan(viewer.state["mask_share"])


def test_viewer_takes_class_names_as_a_numpy_array(model, data):
    viewer = A.AttributionExplorer(model, data, methods=("saliency",), class_names=np.array(["n", "b", "m"]))
    assert [label for label, _ in viewer.target.options] == ["predicted class", "n", "b", "m"]
    # the dataset's own names as an array too (`self.class_names or ...` raised "truth value ... ambiguous")
    array_named = SyntheticUltrasound(num_samples=4, image_size=SIZE, seed=0, artifact_rate=1.0)
    array_named.class_names = np.array(["n", "b", "m"])
    viewer = A.AttributionExplorer(model, array_named, methods=("saliency",))
    assert [label for label, _ in viewer.target.options] == ["predicted class", "n", "b", "m"]


def test_viewer_points_with_its_tolerance_and_closes_its_figures(model, data):
    plt.close("all")
    hits = {}
    for tolerance in (None, 2):
        viewer = A.AttributionExplorer(model, data, methods=("saliency", "gradcam"),
                                       **({} if tolerance is None else {"tolerance": tolerance}))
        viewer.index.value = 1  # an image with a lesion
        item, maps = viewer.compute(1, "cls", "predicted", "saliency")
        hits[tolerance] = viewer.state["pointing_game"]
        assert hits[tolerance] == float(A.pointing_game(maps, item["mask"][None], tolerance or 1)[0])
        viewer.method.value = "gradcam"
        viewer.head.value = "seg"
        assert plt.get_fignums() == []  # every drawn figure was closed after showing
    assert hits == {None: 0.0, 2: 1.0}  # this saliency peak lies 2 px from the lesion: a hit at the notebook's 2


def test_viewer_rejects_bad_arguments(model, data):
    with pytest.raises(ValueError, match="non-empty"):
        A.AttributionExplorer(model, [])
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # "'DataLoader' object is not subscriptable"
    with pytest.raises(ValueError, match=r"got a DataLoader: pass the loader's dataset, AttributionExplorer\(model, "
                                         r"loader\.dataset\)"):
        A.AttributionExplorer(model, loader)
    with pytest.raises(ValueError, match="item 0 is a Tensor of shape"):  # a batch: "too many indices for tensor"
        A.AttributionExplorer(model, torch.rand(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"method_kw maps each method to its options.*\['n_steps'\] is not a method"):
        A.AttributionExplorer(model, data, method_kw={"n_steps": 2})  # flat, as attribute() takes them: unused
    with pytest.raises(ValueError, match="methods"):
        A.AttributionExplorer(model, data, methods=("lime",))
    with pytest.raises(ValueError, match="tolerance"):
        A.AttributionExplorer(model, data, tolerance=-1)
    for names in (["n", "b"], ["n", "b", "m", "x"]):  # a class the model lacks (a callback error), or one missing
        with pytest.raises(ValueError, match=rf"class_names has {len(names)} names, but the model predicts 3 classes"):
            A.AttributionExplorer(model, data, methods=("saliency",), class_names=names)


def test_maps_are_made_inside_no_grad_and_inference_mode(explainer, images):
    """Evaluation code runs under torch.inference_mode(): the maps needed gradients and Captum failed."""
    plain = explainer.attribute(images, "cls", method="saliency")
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(explainer.attribute(images, "cls", method="saliency"), plain)
            assert A.randomisation_groups(explainer, images, "cls")  # found by their gradients too


@pytest.mark.parametrize("method", A.METHODS)
def test_an_explainer_and_targets_made_inside_inference_mode_work(model, images, method):
    """The copy of the model made inside inference_mode had inference weights (every gradient method failed,
    and randomisation could not switch their gradients on); targets made there could not be saved for backward."""
    plain = A.Explainer(model)
    with torch.inference_mode():
        explainer = A.Explainer(model)
        label, region = torch.tensor([0, 2]), (images > images.mean()).float()
        for head, target in (("cls", label), ("seg", region), ("recon", region)):
            torch.manual_seed(0)  # the same noise for SmoothGrad
            inside = explainer.attribute(images, head, target, method)
            torch.manual_seed(0)
            torch.testing.assert_close(inside, plain.attribute(images, head, target.clone(), method))
    with torch.inference_mode():
        assert A.randomisation_groups(plain, images, "cls", torch.tensor([0, 2]))  # a target made in there
        result = A.cascading_randomisation(model, images, "cls", method="saliency", progress=False)
    assert result.spearman[0] == 1.0 and len(result.steps) > 1  # every block randomised in turn


def test_an_unknown_randomisation_group_is_named_before_any_map(model, images, monkeypatch):
    monkeypatch.setattr(A.Explainer, "attribute", lambda *a, **k: pytest.fail("a map was made"))
    with pytest.raises(ValueError, match=r"groups names 'encoder.nope', which the model does not have"):
        A.cascading_randomisation(model, images, "cls", method="saliency", groups=["encoder.nope"], progress=False)


# ------------------------------------------------------------------------------------------ bad arguments

BAD = [
    (dict(head="depth"), r"unknown head 'depth'; expected one of \('cls', 'seg', 'recon'\)$"),
    # labels where the head goes: the message printed the whole tensor; a NumPy array raised "ambiguous"
    (dict(head=torch.tensor([0, 1])), r"the head must be one of .*, got Tensor of shape \(2,\) \(class labels or a "
                                      r"region go in target=\)"),
    (dict(head=np.array([0, 1])), r"got ndarray of shape \(2,\)"),
    (dict(method="lime"), "unknown method"),
    (dict(method="ig", steps=3), "takes no option"),
    (dict(method="ig", baseline="white"), "baseline must be"),
    (dict(target=torch.tensor([0, 1, 2])), "cls target"),
    (dict(target=7), r"class indices in 0\.\.2, got \[7, 7\]"),
    (dict(target=3), r"class indices in 0\.\.2, got \[3, 3\]"),  # one past the last: gather's index error
    (dict(head="seg", target=torch.ones(2, 1, 8, 8)), "seg target must be a region"),
    # a 0/255 mask scaled the score 255 times, a soft one reweighted it
    (dict(head="seg", target=torch.full((2, 1, SIZE, SIZE), 255.0)), r"seg target must hold 0 and 1 only, .*mask > 0"),
    (dict(head="recon", target=torch.full((2, 1, SIZE, SIZE), 0.3)), r"recon target must hold 0 and 1 only"),
    (dict(head="recon", reference=torch.ones(1, 1, SIZE, SIZE)), "reference must have"),
    # method options that Captum would assert on, or that gave NaN maps / were silently replaced
    (dict(method="ig", n_steps=0), "n_steps must be an int >= 1, got 0"),
    (dict(method="smoothgrad", nt_samples=0), "nt_samples must be an int >= 1, got 0"),
    (dict(method="smoothgrad", nt_samples=2.5), "nt_samples must be an int"),
    (dict(method="smoothgrad", stdev=-1), r"stdev must be a finite number > 0 \(a fraction of the image's value range"),
    (dict(method="smoothgrad", stdev=float("nan")), "stdev must be a finite number > 0"),
    (dict(method="smoothgrad", stdev="0.15"), "stdev must be a finite number > 0 .*got '0.15'; pass it unquoted"),
    (dict(method="occlusion", window=64), r"window must be an int in 1\.\.32 \(the image side"),
    (dict(method="occlusion", window=0), r"window must be an int in 1\.\.32 .*got 0"),
    (dict(method="occlusion", window=8, stride=0), r"stride must be an int in 1\.\.8"),
    (dict(method="occlusion", window=8, stride=16), r"stride must be an int in 1\.\.8"),
    (dict(method="occlusion", perturbations_per_eval=0), "perturbations_per_eval must be an int >= 1"),
]


@pytest.mark.parametrize("head, message", [("depth", r"unknown head 'depth'; expected one of"),
                                           (torch.tensor([0, 1]), r"got Tensor of shape \(2,\) \(class labels"),
                                           (np.array([0, 1]), r"got ndarray of shape \(2,\)")])
def test_the_public_head_wrapper_names_a_wrong_head_too(explainer, head, message):
    """Explainer.head is public (Captum on one head): a bare KeyError, or a tensor printed whole, before."""
    with pytest.raises(ValueError, match=message):
        explainer.head(head)


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_arguments_are_named(explainer, images, kwargs, message):
    kwargs = {"method": "saliency"} | kwargs
    with pytest.raises(ValueError, match=message):
        explainer.attribute(images, **kwargs)


BAD_TARGET_TYPES = [
    ("malignant", r"class index \(int\), 2 class indices or None.*class_names\.index\('malignant'\)"),
    (["benign", "normal"], r"class index \(int\), 2 class indices or None"),
    (1.5, "whole numbers"),  # it became class 1 without a word
    (torch.tensor([0.0, 1.5]), "whole numbers"),
    (torch.tensor([True, False]), "whole numbers"),
]


def test_labels_kept_as_whole_floats_are_class_indices(explainer, images):
    torch.manual_seed(0)
    as_floats = explainer.attribute(images, "cls", torch.tensor([0.0, 2.0]), method="saliency")
    torch.manual_seed(0)
    torch.testing.assert_close(as_floats, explainer.attribute(images, "cls", torch.tensor([0, 2]), method="saliency"))


def test_a_bad_setting_of_any_method_stops_the_loops_before_the_first_map(explainer, images, monkeypatch):
    calls = []
    attribute = A.Explainer.attribute  # every explainer, the copy cascading_randomisation makes included
    monkeypatch.setattr(A.Explainer, "attribute", lambda *a, **k: calls.append(a[2:]) or attribute(*a, **k))
    mask = torch.ones(len(images), 1, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"window must be an int in 1\.\.32"):  # occlusion comes last
        A.localisation_scores(explainer, images, mask, methods=("saliency", "occlusion"),
                              method_kw={"occlusion": {"window": 99}})
    with pytest.raises(ValueError, match=r"n_steps must be an int >= 1"):
        A.cascading_randomisation(explainer.model, images, method="ig", n_steps=0, progress=False)
    assert calls == []  # neither computed a single map first


def test_localisation_scores_takes_one_method_by_name_and_refuses_options_given_flat(explainer, images):
    mask = torch.ones(len(images), 1, SIZE, SIZE)
    assert list(A.localisation_scores(explainer, images, mask, methods="saliency")) == ["saliency"]  # not "s", "a"...
    with pytest.raises(ValueError, match=r"e\.g\. \{'ig': \{'n_steps': 16\}\}, but \['n_steps'\] is not a method"):
        A.localisation_scores(explainer, images, mask, methods=["ig"], method_kw={"n_steps": 2})  # ran 32 steps
    with pytest.raises(ValueError, match=r"\['ig'\] is not a method with a dict of options"):
        A.localisation_scores(explainer, images, mask, methods=["ig"], method_kw={"ig": 2})


@pytest.mark.parametrize("target, message", BAD_TARGET_TYPES)
def test_bad_cls_target_types_are_named(explainer, images, target, message):
    with pytest.raises(TypeError, match=message):
        explainer.attribute(images, "cls", target, method="saliency")


BAD_EXPLAINERS = [
    (lambda m: A.Explainer(m.state_dict()), TypeError, r"nn\.Module, got OrderedDict.*load_state_dict"),
    (lambda m: A.Explainer(None), TypeError, r"nn\.Module, got NoneType"),
    (lambda m: A.attribute(m.state_dict(), torch.zeros(1, 1, SIZE, SIZE)), TypeError, "load_state_dict"),
    (lambda m: A.Explainer(m, keys={"classification": "cls"}), ValueError,
     r"unknown head\(s\) \['classification'\]; the heads are \('cls', 'seg', 'recon'\)"),
]


@pytest.mark.parametrize("make, error, message", BAD_EXPLAINERS,
                         ids=["state_dict", "None", "attribute(state_dict)", "unknown keys"])
def test_bad_explainer_arguments_are_named(model, make, error, message):
    with pytest.raises(error, match=message):
        make(model)


def test_default_options_still_accepted(explainer, images):
    """None keeps meaning "the default" for occlusion's window and stride; numpy ints count as ints."""
    assert explainer.attribute(images, method="occlusion", window=None, stride=None).shape == (2, 1, SIZE, SIZE)
    maps = explainer.attribute(images, target=np.array([0, 1]), method="occlusion", window=np.int64(SIZE))
    assert maps.shape == (2, 1, SIZE, SIZE)


def test_bad_inputs_are_named(model, explainer, images):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        explainer.attribute(images[0], "cls", method="saliency")
    with pytest.raises(TypeError, match=r"got a ndarray of shape \(2, 1, 32, 32\); convert it with torch\.as_tensor"
                                        r"\(images\)\.float\(\)$"):
        explainer.attribute(images.numpy(), "cls", method="saliency")  # "add a batch axis" was the advice
    with pytest.raises(TypeError, match=r"\.float\(\) / 255 \(8-bit: 0\.\.255 -> 0\.\.1\)"):
        explainer.attribute((images.numpy() * 255).astype(np.uint8), "cls", method="saliency")
    with pytest.raises(TypeError, match=r"got a list; stack the images into one, torch\.stack\(images\)"):
        explainer.attribute(list(images), "cls", method="saliency")  # as_tensor fails on a list of tensors
    with pytest.raises(ValueError, match="no module named"):
        A.Explainer(model, layer="encoder.nothing").attribute(images, "cls", method="gradcam")
    with pytest.raises(ValueError, match="pass layer="):
        A.attribute(nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), images, method="gradcam")
    with pytest.raises(ValueError, match="no 'logits_a' output"):
        A.Explainer(model, keys={"cls": "logits_a"}).attribute(images, "cls", method="saliency")
    with pytest.raises(ValueError, match="mode"):
        A.mask_share(torch.rand(1, 1, 4, 4), MASK, mode="signed")
    with pytest.raises(ValueError, match="tolerance"):
        A.pointing_game(torch.rand(1, 1, 4, 4), MASK, tolerance=-1)
    for bad in (-1, 2.5):  # localisation_scores grew the mask first: torch's "pad must be non-negative"
        with pytest.raises(ValueError, match=r"tolerance must be an integer >= 0 \(pixels\)"):
            A.localisation_scores(FixedMaps(), torch.zeros(1, 1, 4, 4), MASK, methods=("ig",), tolerance=bad)
    with pytest.raises(ValueError, match="mask must have"):
        A.mask_share(torch.rand(1, 1, 4, 4), torch.ones(1, 1, 3, 3))


def test_images_in_0_to_255_are_warned_about_once_at_the_callers_line(model, images):
    explainer = A.Explainer(model)
    raw = (images * 255).round().clamp(0, 255)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explainer.attribute(raw, "cls", method="saliency")  # through torch's decorators: named torch's file
        explainer.attribute(raw, "cls", method="saliency")  # once per explainer, not per call or batch
        A.localisation_scores(A.Explainer(model), raw, torch.ones(2, 1, SIZE, SIZE), methods=["saliency"])
    said = [w.filename for w in caught if "which looks like raw, unscaled intensities" in str(w.message)]
    assert said == [__file__, __file__]  # the first explainer once, the second once


def test_plot_scores_groups_bars_by_model():
    rows = [{"model": m, "method": k, "mask_share": 0.1 * i, "pointing_game": 0.5}
            for i, (m, k) in enumerate([("a", "ig"), ("a", "gradcam"), ("b", "ig"), ("b", "gradcam")])]
    fig = A.plot_scores(rows, chance=0.05, pointing_chance=0.12)
    share = fig.axes[0]
    assert [line.get_ydata()[0] for ax in fig.axes for line in ax.lines] == [0.05, 0.12]  # each panel its chance
    assert [round(p.get_height(), 6) for p in share.patches] == [0.0, 0.1, 0.2, 0.3]
    assert [t.get_text() for t in share.get_xticklabels()] == ["ig", "gradcam"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b", "chance"]
    assert share.get_ylabel() == "mask share"
    plt.close(fig)


def test_plot_scores_y_axis_follows_the_bars_and_chance_and_each_bar_shows_its_value():
    shares = {("mtl", "ig"): 0.091, ("shortcut", "ig"): 0.157,
              ("mtl", "gradcam"): 0.022, ("shortcut", "gradcam"): 0.039}
    rows = [{"model": m, "method": k, "mask_share": v, "pointing_game": v / 2} for (m, k), v in shares.items()]
    fig = A.plot_scores(rows, chance=0.038, pointing_chance=0.099)
    share, pointing = fig.axes[:2]
    assert 0.157 < share.get_ylim()[1] < 0.3 and share.get_ylim()[0] == 0  # not squashed under a 0-1 axis
    assert 0.099 < pointing.get_ylim()[1] < 0.2  # the chance line is above every bar here, and still shown
    written = sorted(float(t.get_text()) for t in share.texts)
    assert written == sorted(shares.values())
    assert "0.038" in share.get_title() and "0.099" in pointing.get_title()
    plt.close(fig)


@pytest.mark.parametrize("groups, upright", [(3, True), (5, False)])
def test_plot_scores_writes_values_upright_and_apart_up_to_three_groups(groups, upright):
    # three groups used to get their values turned 90 degrees at 6 pt, barely legible; level bars of three
    # decimals are the widest labels side by side
    rows = [{"model": f"m{g}", "method": k, "mask_share": 0.123, "pointing_game": 0.5}
            for g in range(groups) for k in ("ig", "saliency", "smoothgrad", "gradcam", "occlusion")]
    fig = A.plot_scores(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        assert {t.get_rotation() for t in ax.texts} == {0.0 if upright else 90.0}
        boxes = [t.get_window_extent(renderer).shrunk(0.9, 1) for t in ax.texts]  # glyphs, not side bearings
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_plot_scores_keeps_a_group_its_colour_across_figures():
    # by order, orange was "single" in notebook 05's lesion figure and "shortcut" in its artifact figure
    colours = {"mtl": "tab:blue", "single": "tab:green", "shortcut": "tab:red"}  # one dict for every figure
    for models in (["mtl", "single"], ["shortcut", "mtl"], ["other", "mtl", "more"]):
        rows = [{"model": m, "method": k, "mask_share": 0.2, "pointing_game": 0.5}
                for m in models for k in ("ig", "gradcam")]
        fig = A.plot_scores(rows, colours=colours)
        for ax in fig.axes[:2]:
            drawn = {bars.get_label(): to_hex(bars.patches[0].get_facecolor()) for bars in ax.containers}
            given = {m: to_hex(colours[m]) for m in models if m in colours}
            assert {m: drawn[m] for m in given} == given
            # a group without a colour takes the cycle's next one, and none repeats another's
            assert len(set(drawn.values())) == len(models)
        plt.close(fig)
    many = [{"model": f"m{g}", "method": "ig", "mask_share": 0.2, "pointing_game": 0.5} for g in range(24)]
    fig = A.plot_scores(many, colours={"m0": "black"})  # the cycle has ten colours: it started again at blue
    assert len({to_hex(bars.patches[0].get_facecolor()) for bars in fig.axes[0].containers}) == 24  # past 20: grey
    plt.close(fig)
    sixty = [dict(many[0], model=f"m{g}") for g in range(60)]
    assert len(A._group_colours([r["model"] for r in sixty], {})) == 60
    assert len(set(A._group_colours([r["model"] for r in sixty], {}).values())) == 60
    with pytest.raises(ValueError, match="61 groups are more than plot_scores can colour apart"):
        A.plot_scores([*sixty, dict(many[0], model="one more")])
    # alpha counts: a faint red and a red are told apart
    plt.close(A.plot_scores(many[:2], colours={"m0": (1, 0, 0, 0.3), "m1": (1, 0, 0, 1)}))
    row = [{"model": "a", "method": "ig", "mask_share": 0.1, "pointing_game": 1.0}]
    with pytest.raises(ValueError, match=r"colours\['a'\] = 'blu' is not a Matplotlib colour; use a name"):
        A.plot_scores(row, colours={"a": "blu"})  # Matplotlib's "Invalid RGBA argument" named no group
    with pytest.raises(ValueError, match=r"colours gives 'a' and 'b' the same colour \('#ff0000'\)"):
        A.plot_scores([*row, dict(row[0], model="b")], colours={"a": "red", "b": "#ff0000"})
    plt.close(A.plot_scores(row, colours={"a": "red", "unshown": "red"}))  # a shared dict: names not drawn count not

# ------------------------------------------------------------------------------------------ by hand, on stubs


class TinyCam(nn.Module):
    """encoder.stages[0]: a 2 x 2 convolution of stride 2 (4 x 4 -> 2 x 2) whose channel 0 sums each block and
    channel 1 is minus that sum; cls: the identity on the average-pooled channels (class k reads channel k)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.stages = nn.ModuleList([nn.Conv2d(1, 2, 2, stride=2, bias=False)])
        with torch.no_grad():
            self.encoder.stages[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2))

    def forward(self, x):
        return {"cls": self.encoder.stages[0](x).mean(dim=(2, 3))}  # (B, 2)


def test_gradcam_by_hand_relu_then_bilinear_upsampling():
    """Class 0: the gradient of the pooled channel 0 is 1/4 everywhere, so the channel weights are (1/4, 0) and
    the coarse map is A_0 / 4 = block sums / 4 = [[1, 0], [0, 2]] for blocks of ones and twos. TinyCam is a
    patchify layer: the default anchor "block" puts each cell in the middle of its 2 x 2 block (pixels 0.5 and
    2.5), and bilinear upsampling gives the first rows below. anchor="corner" puts cell j on pixel 2j (as a
    padded stride-2 convolution centres it): pixel 1 halfway, pixel 3 at the edge. Class 1 sees -A_0: ReLU -> 0."""
    x = torch.zeros(1, 1, 4, 4)
    x[..., :2, :2], x[..., 2:, 2:] = 1.0, 2.0
    explainer = A.Explainer(TinyCam())
    assert A.default_layer(explainer.model) == "encoder.stages.0"
    block = torch.tensor([[1.0, 0.75, 0.25, 0.0],
                          [0.75, 0.6875, 0.5625, 0.5],
                          [0.25, 0.5625, 1.1875, 1.5],
                          [0.0, 0.5, 1.5, 2.0]])
    corner = torch.tensor([[1.0, 0.5, 0.0, 0.0],
                           [0.5, 0.75, 1.0, 1.0],
                           [0.0, 1.0, 2.0, 2.0],
                           [0.0, 1.0, 2.0, 2.0]])
    assert torch.allclose(explainer.attribute(x, "cls", 0, "gradcam")[0, 0], block)
    assert torch.allclose(explainer.attribute(x, "cls", 0, "gradcam", anchor="corner")[0, 0], corner)
    assert torch.equal(explainer.attribute(x, "cls", 1, "gradcam"), torch.zeros(1, 1, 4, 4))
    # bicubic overshoots around the peak (a ring below 0), which made the unsigned map read as signed
    bicubic = explainer.attribute(x, "cls", 0, "gradcam", interpolate_mode="bicubic")[0, 0]
    raw = A.upsample_cells(torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]]), (4, 4), "bicubic")[0, 0]
    assert raw.min() < 0 and torch.allclose(bicubic, raw.clamp_min(0))


def test_upsample_cells_block_is_a_plain_resize_and_corner_puts_cell_j_on_pixel_stride_times_j():
    torch.manual_seed(0)
    cells = torch.rand(2, 3, 4, 6)
    for mode in ("bilinear", "nearest", "bicubic"):
        resized = nn.functional.interpolate(cells, (32, 36), mode=mode, **({} if mode == "nearest" else
                                                                             {"align_corners": False}))
        torch.testing.assert_close(A.upsample_cells(cells, (32, 36), mode, anchor="block"), resized)
    one = torch.zeros(1, 1, 4, 4)
    one[..., 1, 2] = 1.0
    up = A.upsample_cells(one, (64, 64), anchor="corner")  # stride 16
    assert up[0, 0, 16, 32] == 1.0 and up[0, 0].argmax() == 16 * 64 + 32
    assert A.upsample_cells(torch.full((1, 1, 1, 1), 3.0), (8, 8), anchor="corner").eq(3.0).all()  # everywhere
    assert torch.equal(A.upsample_cells(cells, (32, 36)), A.upsample_cells(cells, (32, 36), anchor="block"))
    with pytest.raises(ValueError, match="unknown interpolate_mode 'cubic'"):
        A.upsample_cells(one, (8, 8), "cubic")
    with pytest.raises(ValueError, match="unknown anchor 'centre'"):
        A.upsample_cells(one, (8, 8), anchor="centre")


def test_a_convolutional_encoders_cells_are_centred_where_the_corner_anchor_puts_them():
    """What "corner" is for: in the attention-free encoder (padded stride-2 convolutions and pooling) the input
    gradient of cell (3, 3) of the H/16 stage is centred near pixel 16 * 3 = 48, not at 16 * 3 + 7.5 where the
    default "block" (a plain resize) puts it."""
    torch.manual_seed(0)
    net = A.without_inplace(build_model("tiny", tasks=("seg", "cls"), image_size=128, use_attention=False)).eval()
    seen = {}
    handle = net.encoder.stages[3].register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    x = torch.rand(2, 1, 128, 128, requires_grad=True)
    net(x)
    handle.remove()
    seen["out"][:, :, 3, 3].sum().backward()
    weight = x.grad.abs().sum((0, 1))  # (128, 128)
    pixels = torch.arange(128.0)
    rows, cols = (weight.sum(1) * pixels).sum() / weight.sum(), (weight.sum(0) * pixels).sum() / weight.sum()
    assert abs(rows - 48) < 3 and abs(cols - 48) < 3, (rows, cols)


def test_default_gradcam_layer_is_the_last_encoder_stage(model, explainer, images):
    assert len(model.encoder.stages) == 4 and A.default_layer(model) == "encoder.stages.3"
    last = A.Explainer(model, layer="encoder.stages.3").attribute(images, "cls", 1, "gradcam")
    assert torch.equal(explainer.attribute(images, "cls", 1, "gradcam"), last)


def test_integrated_gradients_do_not_warn_about_a_score_change_near_zero(model):
    """A score that hardly changes (an untrained head's logit, a flat image) cannot be missed by a share of itself:
    the miss must also exceed 0.001. In a smoke run of notebook 05 images whose logit moved by 0.0001 were called
    200 % off; for a score near 0 a percentage said nothing ("by up to 3842255%")."""
    explainer = A.Explainer(model)
    images = torch.rand(2, 1, 8, 8)
    tiny = lambda x: 1e-4 * torch.sin(3 * x).flatten(1).sum(1)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = explainer._ig(tiny, images, (), n_steps=1, baseline="black")  # coarse: off by ~16 % of a tiny change
    change = tiny(images) - tiny(torch.zeros_like(images))
    assert (one.flatten(1).sum(1) - change).abs().max() > 0.1 * change.abs().min()  # it is off, relatively
    with pytest.warns(UserWarning, match="do not add up"):  # the same integral, 10,000 times larger: warned
        explainer._ig(lambda x: 1e4 * tiny(x), images, (), n_steps=1, baseline="black")


@pytest.mark.parametrize("score, n_steps, warned", [
    (lambda x: (x ** 3).flatten(1).sum(1), 1, "sums to 3 where the score changes by 4"),  # 25 % off
    (lambda x: 0.01 * (x ** 3).flatten(1).sum(1), 1, "sums to 0.03 where the score changes by 0.04"),  # above 0.001
    (lambda x: torch.exp(4 * x).flatten(1).sum(1), 2, None),  # 206.2 of 214.4: 4 % off, within the 10 %
])
def test_integrated_gradients_warn_by_the_tolerance_and_the_floor(model, score, n_steps, warned):
    """Worked cases on four white pixels from black: one midpoint step gives a cube 0.75 of its rise per pixel."""
    explainer = A.Explainer(model)
    images = torch.ones(1, 1, 2, 2)
    if warned is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            explainer._ig(score, images, (), n_steps=n_steps, baseline="black")
    else:
        with pytest.warns(UserWarning, match=warned):
            explainer._ig(score, images, (), n_steps=n_steps, baseline="black")


def test_cascading_randomisation_does_not_warn_about_the_randomised_models_maps(model, images, monkeypatch):
    """The sanity check's randomised models are not the model being explained: their IG maps' completeness is not
    the question, and a warning about them (at some randomised block) would be read as one about the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.Explainer(model).attribute(images, "seg", method="ig", n_steps=32)  # the model's own maps are complete
        A.cascading_randomisation(model, images, "seg", None, "ig", n_steps=32, progress=False)

    class Forgetful(A.Explainer):  # warns every time: what the cascade's randomised models alone would say
        warned_incomplete = property(lambda self: False, lambda self, value: None)

    monkeypatch.setattr(A, "Explainer", Forgetful)
    with pytest.warns(UserWarning, match="do not add up"):  # some randomised model's maps are incomplete
        A.cascading_randomisation(model, images, "seg", None, "ig", n_steps=32, progress=False)


def test_integrated_gradients_takes_its_number_of_steps(model):
    """A curved score: a one-step path integral differs from a 16-step one, which adds up to the score change."""
    explainer = A.Explainer(model)  # its own: the one-step integral's completeness warning comes once per explainer
    images = torch.rand(2, 1, 8, 8)
    score = lambda x: torch.sin(3 * x).flatten(1).sum(1)  # noqa: E731
    with pytest.warns(UserWarning, match="n_steps=1 now"):
        one = explainer._ig(score, images, (), n_steps=1, baseline="black")
    many = explainer._ig(score, images, (), n_steps=16, baseline="black")
    assert not torch.allclose(one, many, atol=1e-3)
    assert torch.allclose(many.flatten(1).sum(1), score(images) - score(torch.zeros_like(images)), atol=1e-3)
    seen = []  # and exactly that many: n_steps copies of the batch go through the model for the integral, and
    # the images and their baselines once each for the completeness check (while it has not yet warned)
    fresh = A.Explainer(model)
    fresh._ig(lambda x: (seen.append(len(x)), score(x))[1], images, (), n_steps=5, baseline="black")
    assert sum(seen) == (5 + 2) * len(images)
    seen.clear()  # once it has warned, no more: the integral alone
    explainer._ig(lambda x: (seen.append(len(x)), score(x))[1], images, (), n_steps=5, baseline="black")
    assert sum(seen) == 5 * len(images)


def test_smoothgrad_with_a_seed_gives_one_map_and_leaves_the_global_generator_alone(explainer):
    """Two identical calls differed by 40 % of the map's maximum, and each moved torch's generator."""
    images, score = torch.rand(2, 1, 8, 8), (lambda x: x.square().flatten(1).sum(1))
    torch.manual_seed(1)
    first = explainer._smoothgrad(score, images, (), nt_samples=4, seed=3)
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(explainer._smoothgrad(score, images, (), nt_samples=4, seed=3), first)
    assert torch.equal(torch.rand(3), after)  # as if SmoothGrad had not run
    assert not torch.equal(explainer._smoothgrad(score, images, (), nt_samples=4, seed=4), first)
    # without reseeding torch between calls, and with a NumPy seed (a sweep's), as Generator.manual_seed refuses
    assert torch.equal(explainer._smoothgrad(score, images, (), nt_samples=4, seed=np.int64(3)), first)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        explainer.check_options("smoothgrad", (8, 8), seed=-1)
    # an image's map is the same alone or in any batch: a pointing game moved from 0.083 to 0.167 with batch_size
    batch = torch.rand(5, 1, 8, 8)
    together = explainer._smoothgrad(score, batch, (), nt_samples=4, seed=3)
    for i in range(5):
        torch.testing.assert_close(explainer._smoothgrad(score, batch[i:i + 1], (), nt_samples=4, seed=3),
                                   together[i:i + 1])


def test_smoothgrad_averages_over_the_noisy_copies(explainer):
    """A linear score has the gradient w at every noisy copy: the average of |w| is |w|, whatever nt_samples."""
    w = torch.randn(2, 1, 8, 8)
    maps = explainer._smoothgrad(lambda x: (x * w).flatten(1).sum(1), torch.rand(2, 1, 8, 8), (), nt_samples=3)
    assert torch.allclose(maps, w.abs())


def test_smoothgrad_noise_is_15_percent_of_each_images_range(explainer):
    """Score sum(x^2): |gradient| = 2 |x + noise|. Away from the one bright pixel x = 0, so the map averages
    2 |noise|, whose mean is 2 sigma sqrt(2 / pi) with sigma = 0.15 * range (ranges 1 and 10 here)."""
    images = torch.zeros(2, 1, 8, 8)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 1.0, 10.0
    torch.manual_seed(0)
    maps = explainer._smoothgrad(lambda x: x.square().flatten(1).sum(1), images, (), nt_samples=64)
    expected = 2 * 0.15 * torch.tensor([1.0, 10.0]) * math.sqrt(2 / math.pi)
    assert torch.allclose(maps.flatten(1)[:, 1:].mean(1), expected, rtol=0.05)
    # stdev reaches the noise (twice as much, twice the mean); its range is max - min, not the maximum
    torch.manual_seed(0)
    doubled = explainer._smoothgrad(lambda x: x.square().flatten(1).sum(1), images, (), nt_samples=64, stdev=0.3)
    assert torch.allclose(doubled.flatten(1)[:, 1:].mean(1), 2 * expected, rtol=0.05)
    torch.manual_seed(0)
    shifted = explainer._smoothgrad(lambda x: (x - 5).square().flatten(1).sum(1), images + 5, (), nt_samples=64)
    assert torch.allclose(shifted, maps, atol=1e-4)


def test_occlusion_default_patches_are_an_eighth_of_the_side_and_side_by_side(explainer):
    """The score reads pixel (0, 0) only, so only a patch covering it drops the score, by x00 (black baseline).
    Default window 32 / 8 = 4 and stride = window: the top-left 4 x 4 block gets x00, every other pixel 0."""
    images = 1.0 + torch.rand(2, 1, 32, 32)
    maps = explainer._occlusion(lambda x: x[:, 0, 0, 0], images, (), baseline="black")
    expected = torch.zeros_like(images)
    expected[:, :, :4, :4] = images[:, :, :1, :1]
    assert torch.allclose(maps, expected)


def test_occlusion_maps_of_a_colour_image_are_the_score_drop_once_not_per_channel(explainer):
    """A patch covers all three channels; summing the channels' (equal) maps gave 3 x the drop."""
    images = 1.0 + torch.rand(2, 3, 32, 32)
    maps = explainer._occlusion(lambda x: x[:, 0, 0, 0], images, (), baseline="black")
    assert maps.shape == (2, 1, 32, 32)
    expected = torch.zeros(2, 1, 32, 32)
    expected[:, :, :4, :4] = images[:, :1, :1, :1]
    assert torch.allclose(maps, expected)


def test_spearman_ignores_signs_averages_ties_and_is_undefined_for_a_constant_first_map():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert A.spearman(a, -a).item() == pytest.approx(1.0)  # absolute (the default): |-a| ranks like a
    # ranks (1.5, 1.5, 3.5, 3.5) against (1, 2, 3, 4): centred, (-1, -1, 1, 1) . (-1.5, -0.5, 0.5, 1.5) = 4
    assert A.spearman(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), a).item() == pytest.approx(4 / (2 * math.sqrt(5)))
    assert math.isnan(A.spearman(torch.zeros(1, 4), a).item())


class ConstantHeads(nn.Module):
    """A stub: seg logits (0, log 3, 0) at every pixel, so p(lesion) = 3/5 and its log-odds log(3/2); a 3-channel
    reconstruction of zeros."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        B, _, H, W = x.shape
        seg = torch.tensor([0.0, math.log(3.0), 0.0]).view(1, 3, 1, 1).expand(B, 3, H, W) * self.scale
        return {"seg": seg, "recon": torch.zeros(B, 3, H, W)}


def test_lesion_score_uses_the_log_odds_against_every_other_class():
    region = torch.zeros(1, 1, 2, 2)
    region[..., 0, :] = 1  # two pixels
    score = A.LesionScore(ConstantHeads())(torch.zeros(1, 1, 2, 2), region)
    assert score.item() == pytest.approx(2 * math.log(3 / 2))


def test_reconstruction_error_averages_over_channels_and_region_pixels():
    """Error 1 in one of three channels: 1/3 per pixel, whatever the region's size."""
    reference = torch.zeros(1, 3, 2, 2)
    reference[:, 0] = 1.0
    region = torch.zeros(1, 1, 2, 2)
    region[..., 0, :] = 1
    error = A.ReconstructionError(ConstantHeads())(torch.zeros(1, 1, 2, 2), region, reference)
    assert error.item() == pytest.approx(1 / 3)


class LinearScore(nn.Module):
    """A stub: class 0 scores sum(x * weight), class 1 minus that."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        score = (x * self.weight).flatten(1).sum(1)
        return {"cls": torch.stack([score, -score], dim=1)}


def test_maps_sum_the_input_channels():
    """Saliency of a linear score is |weight| per channel; the map adds the three channels."""
    weight = torch.randn(3, 4, 4)
    maps = A.Explainer(LinearScore(weight)).attribute(torch.rand(2, 3, 4, 4), "cls", 0, "saliency")
    assert torch.allclose(maps, weight.abs().sum(0).expand(2, 1, 4, 4))


class SigmoidSeg(nn.Module):
    """A stub segmentation head with one output channel (sigmoid): logit x - 0.5, lesion where x > 0.5."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(-0.5))

    def forward(self, x):
        return {"seg": x + self.bias}


class ThreeClassSeg(nn.Module):
    """Seg logits of three classes: class 1 wins where x > 0.5, class 2 where x < 0.4, class 0 between."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        return {"seg": torch.cat([torch.zeros_like(x) + self.bias, x - 0.5, 0.4 - x], dim=1)}


def test_default_seg_region_of_a_multi_class_head_is_where_the_lesion_class_wins():
    images = torch.rand(2, 1, 6, 6)
    (region,) = A.Explainer(ThreeClassSeg()).forward_args(images, "seg")
    assert torch.equal(region, (images > 0.5).float())  # class 1 only, not every class but background


def test_default_seg_region_of_a_single_channel_head_is_where_its_logit_is_positive():
    images = torch.rand(2, 1, 6, 6)
    (region,) = A.Explainer(SigmoidSeg()).forward_args(images, "seg")
    assert torch.equal(region, (images > 0.5).float())
    # its score is the summed logit, which is the log-odds (negative where p < 0.5), not a probability
    torch.testing.assert_close(A.LesionScore(SigmoidSeg())(images, region), ((images - 0.5) * region).sum((1, 2, 3)))
    everywhere = torch.ones_like(region)
    assert (A.LesionScore(SigmoidSeg())(torch.full_like(images, 0.25), everywhere) < 0).all()


def test_randomise_resets_a_layer_to_pytorchs_default_scale_not_its_trained_one():
    """nn.Linear(16, 4) draws weight and bias uniformly within 1 / sqrt(16) = 0.25; a trained layer 100x louder
    must come back at that scale, not at its own."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.mul_(100.0)
        layer.bias.mul_(100.0)
    A.randomise_(layer)
    assert layer.weight.abs().max() <= 0.25 and layer.bias.abs().max() <= 0.25


class FixedMaps:
    """A stub explainer whose every map is the 4 x 4 map below: +1 inside MASK, -9 outside."""

    def check_options(self, method, image_size, **method_kw):
        pass

    def attribute(self, images, head, target, method, **method_kw):
        return _map([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -9]).expand(len(images), 1, 4, 4)


@pytest.mark.parametrize("mode, share, hit", [("positive", 1.0, 1.0), ("absolute", 1 / 10, 0.0)])
def test_localisation_scores_pass_the_mode_to_both_scores(mode, share, hit):
    scores = A.localisation_scores(FixedMaps(), torch.zeros(1, 1, 4, 4), MASK, methods=("ig",), tolerance=0, mode=mode)
    assert scores == {"ig": pytest.approx({"mask_share": share, "pointing_game": hit, "chance": 0.25,
                                           "pointing_chance": 0.25})}


# ----------------------------------------------------------------------------------------- baselines, pointing, cascade
# Grey baselines, the pointing game's tolerance, rank correlation and the cascade's details (each
# survived a mutation before).


def test_integrated_gradients_start_from_a_given_grey_value(explainer, images):
    """baseline=0.3: the maps add up to score(image) - score(flat 0.3 image), not to the change from the image's
    mean grey (the default) nor from black; the seg head's changes (tens of logits) tell the three apart."""
    maps = explainer.attribute(images, "seg", None, "ig", n_steps=128, baseline=0.3)  # 32: within 8 %
    head, (region,) = explainer.head("seg"), explainer.forward_args(images, "seg")
    with torch.no_grad():
        score = head(images, region)
        change = {name: score - head(start, region) for name, start in [
            ("0.3", torch.full_like(images, 0.3)), ("black", torch.zeros_like(images)),
            ("mean", images.mean(dim=(1, 2, 3), keepdim=True).expand_as(images))]}
    assert torch.allclose(maps.sum((1, 2, 3)), change["0.3"], rtol=0.05, atol=0)
    for other in ("black", "mean"):
        assert not torch.allclose(maps.sum((1, 2, 3)), change[other], rtol=0.05, atol=0), other


class StubMaps:
    """A stub explainer whose every map is `values` (1, 1, 4, 4)."""

    def __init__(self, values):
        self.values = values

    def check_options(self, method, image_size, **method_kw):
        pass

    def attribute(self, images, head, target, method, **method_kw):
        return self.values.expand(len(images), 1, 4, 4)


@pytest.mark.parametrize("tolerance, hit", [(0, 0.0), (1, 1.0), (2, 1.0)])
def test_localisation_scores_point_with_their_tolerance(tolerance, hit):
    """The peak at (0, 2) is one pixel right of the mask: a miss without tolerance, a hit with it."""
    peak_next_to_mask = _map([0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = A.localisation_scores(StubMaps(peak_next_to_mask), torch.zeros(1, 1, 4, 4), MASK, methods=("ig",),
                                   tolerance=tolerance)
    assert scores["ig"]["pointing_game"] == hit


def test_spearman_compares_ranks_not_values():
    """A monotone but uneven map ranks like an even one: rho 1, where a linear correlation would not be."""
    even, uneven = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    assert A.spearman(uneven, even).item() == pytest.approx(1.0)
    assert A.spearman(even, uneven).item() == pytest.approx(1.0)


def test_cascading_randomisation_explains_the_trained_models_class_at_every_step(model, images, monkeypatch):
    """A randomised head predicts other classes; the target stays the one the trained model predicted."""
    targets = []
    attribute = A.Explainer.attribute
    monkeypatch.setattr(A.Explainer, "attribute", lambda self, images, head, target, *args, **kw:
                        targets.append(target) or attribute(self, images, head, target, *args, **kw))
    A.cascading_randomisation(model, images, "cls", method="saliency", groups=["heads.cls.fc2", "heads.cls.fc1"],
                              progress=False)
    with torch.no_grad():
        predicted = model(images)["cls"].argmax(1)
    assert len(targets) == 3 and all(torch.equal(t, predicted) for t in targets)


def test_cascading_randomisation_leaves_out_an_image_whose_map_is_constant(model, images, monkeypatch):
    """Its rank correlation is undefined (NaN): the curve is the mean over the other images, not NaN."""
    attribute = A.Explainer.attribute

    def first_flat(self, *args, **kw):
        maps = attribute(self, *args, **kw)
        maps[0] = 0.0  # e.g. Grad-CAM with nothing above zero after its ReLU
        return maps

    monkeypatch.setattr(A.Explainer, "attribute", first_flat)
    result = A.cascading_randomisation(model, images, "cls", method="saliency", groups=["heads.cls.fc2"],
                                       progress=False)
    assert all(math.isfinite(rho) for rho in result.spearman), result.spearman


def test_signed_maps_are_red_for_and_blue_against_and_the_colourbar_marks_clipping():
    cmap = A._overlay_cmap(True)
    top, bottom = cmap(1.0), cmap(0.0)
    assert top[0] > top[2] and bottom[2] > bottom[0]  # red at the positive end, blue at the negative
    fig, ax = plt.subplots()
    strong = torch.zeros(1, 8, 8)
    strong[0, 0, 0] = 10.0
    shown = ax.imshow(np.zeros((8, 8)), vmin=0, vmax=1.0)
    assert A._colourbar(fig, shown, ax, [strong, torch.zeros(1, 8, 8)]).extend == "max"  # one panel clipped
    assert A._colourbar(fig, shown, ax, [torch.zeros(1, 8, 8)]).extend == "neither"
    plt.close(fig)


@pytest.mark.filterwarnings("ignore:Integrated Gradients' maps")  # 4 steps, for speed: incomplete, as it warns
def test_cascading_randomisation_compares_signed_maps_when_asked(model, images):
    """absolute=False: the curve is the signed rank correlation (a sign flip counts), not that of |maps|."""
    result = A.cascading_randomisation(model, images, "cls", 1, "ig", groups=["heads.cls.fc2"], absolute=False,
                                       n_steps=4, progress=False)
    signed = A.spearman(result.maps[0], result.maps[1], absolute=False).mean().item()
    unsigned = A.spearman(result.maps[0], result.maps[1]).mean().item()
    assert result.spearman[1] == pytest.approx(signed) and signed != pytest.approx(unsigned)


def test_an_empty_recon_region_gives_a_zero_map_not_nan(explainer, images):
    """The viewer's "lesion region" of a normal image is empty: no error to explain, so no attribution."""
    empty = torch.zeros(2, 1, SIZE, SIZE)
    assert torch.equal(A.ReconstructionError(explainer.model)(images, empty, images), torch.zeros(2))
    maps = explainer.attribute(images, "recon", empty, "saliency")
    assert torch.equal(maps, torch.zeros_like(maps))


def test_randomise_redraws_parameters_no_reset_covers_at_their_own_scale():
    """A bare parameter (a Swin relative-position table, a layer scale) has no reset_parameters: it is
    redrawn from a normal with its own std, not left trained."""
    torch.manual_seed(0)
    block = nn.Module()
    block.table = nn.Parameter(0.5 * torch.randn(1000))
    trained = block.table.detach().clone()
    A.randomise_(block)
    assert not torch.allclose(block.table, trained)
    redrawn = block.table.detach()
    assert float(redrawn.std()) == pytest.approx(0.5, rel=0.1) and abs(float(redrawn.mean())) < 0.05


# ------------------------------------------------------------------------------------------ inputs the model refuses,
# targets as lists and arrays, occlusion's cost

UINT8 = r"must be a floating-point tensor, got torch\.uint8; convert with \.float\(\) / 255"


def test_integer_images_are_refused_as_the_model_refuses_them(model, explainer, images):
    """A bare .float() turned uint8 images into 0..255 ones: the maps explained the model on inputs it
    never saw, and that model(...) itself refuses with this very advice."""
    as_bytes = (images * 255).to(torch.uint8)
    with pytest.raises(ValueError, match="images " + UINT8):
        model(as_bytes)
    mask = torch.ones(len(images), 1, SIZE, SIZE)
    for explain in (lambda: explainer.attribute(as_bytes, "cls", 1, method="saliency"),
                    lambda: A.attribute(model, as_bytes, "cls", 1, method="saliency"),
                    lambda: explainer.head_output(as_bytes, "cls"),
                    lambda: A.localisation_scores(explainer, as_bytes, mask, "cls", 1, methods=("saliency",)),
                    lambda: A.cascading_randomisation(model, as_bytes, "cls", 1, method="saliency", progress=False)):
        with pytest.raises(ValueError, match="images " + UINT8):
            explain()
    with pytest.raises(ValueError, match="reference " + UINT8):  # the recon head scores against it on 0..1
        explainer.attribute(images, "recon", method="saliency", reference=as_bytes)
    with pytest.raises(ValueError, match=r"torch\.int64; convert with \.float\(\)$"):
        explainer.attribute(as_bytes.long(), "cls", 1, method="saliency")


@pytest.mark.parametrize("given", [list, np.array], ids=["list", "numpy"])
def test_localisation_scores_take_per_sample_targets_as_lists_and_arrays(explainer, data, given):
    """Only tensors lost the rows of empty masks and were cut into batches: a list of 4 labels reached
    a batch of 3 whole ("3 class indices, got shape (4,)"), a NumPy region kept the empty mask's row."""
    items = [data[i] for i in range(4)]  # the third (normal) has an empty mask: it is left out
    images, masks = torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items])
    labels = [it["label"] for it in items]

    def saliency(head, target, mask=masks):
        return A.localisation_scores(explainer, images, mask, head, target, methods=("saliency",),
                                     batch_size=2)["saliency"]

    assert saliency("cls", given(labels)) == pytest.approx(saliency("cls", torch.tensor(labels)))
    regions = masks.numpy().tolist() if given is list else masks.numpy()  # the seg head's target, and the mask
    assert saliency("seg", regions, regions) == pytest.approx(saliency("seg", masks))
    assert saliency("cls", given([2])) == pytest.approx(saliency("cls", 2))  # [2]: class 2 for every image, like 2
    with pytest.raises(ValueError, match=r"a per-sample target needs one row per image \(4\), got shape \(3,\)"):
        A.localisation_scores(explainer, images, masks, "cls", given(labels[:3]), methods=("saliency",))


@pytest.mark.parametrize("size, window, stride, passes", [
    ((32, 32), None, None, 8 * 8),  # window 4, side by side
    ((64, 64), None, None, 8 * 8),  # window 8: 64 passes whatever the side of a square image
    ((48, 80), None, None, 8 * 14),  # window 6, from the shorter side: 80 / 6 -> 14 patches, the last over the edge
    ((48, 80), 6, 4, 12 * 20),  # (ceil((48 - 6) / 4) + 1) x (ceil((80 - 6) / 4) + 1)
])
def test_occlusion_costs_what_its_docstring_says(explainer, size, window, stride, passes):
    rows = []

    def score(x):
        rows.append(len(x))
        return x[:, 0, 0, 0]

    explainer._occlusion(score, torch.rand(1, 1, *size), (), window=window, stride=stride)
    assert sum(rows) - 1 == passes  # one pass on the image itself, then one per patch


# ------------------------------------------------------------------------------------------ review of 2026-12-04


def test_a_float64_model_is_explained_in_float64(model, images):
    """The images were cast to float32 whatever the model: a float64 model was refused with the advice to
    convert the images with .double(), which the caller had already done."""
    double = copy.deepcopy(model).double()
    maps = A.attribute(double, images.double(), "cls", 1, "saliency")
    assert maps.dtype == torch.float64
    torch.testing.assert_close(maps.float(), A.attribute(model, images, "cls", 1, "saliency"), rtol=1e-3, atol=1e-6)


def test_the_explorer_takes_a_float64_model(model, data):
    """Its first forward pass (which heads, how many classes) cast the image to float32 whatever the model:
    a float64 model, which the explainer takes, was refused before the widget existed."""
    viewer = A.AttributionExplorer(copy.deepcopy(model).double(), data, methods=("saliency",))
    assert viewer.num_classes == 3 and viewer.state["map_shape"] == (1, 1, SIZE, SIZE)


def test_a_callers_autocast_does_not_reach_the_maps(explainer, images):
    plain = explainer.attribute(images, "cls", 1, "ig", n_steps=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert explainer.head_output(images, "cls").dtype == torch.float32
        inside = explainer.attribute(images, "cls", 1, "ig", n_steps=8)
    torch.testing.assert_close(inside, plain)


@pytest.mark.parametrize("method, options, message", [
    ("occlusion", {"baseline": "white"}, "baseline must be 'mean', 'black' or a finite grey value"),
    ("ig", {"baseline": float("nan")}, "baseline must be .* got nan"),
    ("ig", {"baseline": 10**400}, "baseline must be .* got 1000"),  # was math.isfinite's OverflowError
    ("gradcam", {"interpolate_mode": "cubic"}, "unknown interpolate_mode 'cubic'"),
    ("gradcam", {"anchor": "centre"}, "unknown anchor 'centre'"),
])
def test_baselines_and_upsampling_options_are_checked_before_the_first_map(explainer, images, monkeypatch,
                                                                           method, options, message):
    calls = []
    attribute = A.Explainer.attribute
    monkeypatch.setattr(A.Explainer, "attribute", lambda *a, **k: calls.append(a[2:]) or attribute(*a, **k))
    mask = torch.ones(len(images), 1, SIZE, SIZE)
    with pytest.raises(ValueError, match=message):
        A.localisation_scores(explainer, images, mask, methods=("saliency", method), method_kw={method: options})
    assert calls == []


def test_localisation_masks_are_checked_against_the_images_before_the_first_map(explainer, images, monkeypatch):
    calls = []
    attribute = A.Explainer.attribute
    monkeypatch.setattr(A.Explainer, "attribute", lambda *a, **k: calls.append(a[2:]) or attribute(*a, **k))
    for mask in (torch.ones(3, 1, SIZE, SIZE), torch.ones(2, 1, 16, 16)):  # IndexError; a ValueError after a pass
        with pytest.raises(ValueError, match=r"mask must be \(B, 1, H, W\) like the images, \(2, 1, 32, 32\)"):
            A.localisation_scores(explainer, images, mask, methods=("saliency",))
    assert calls == []
    monkeypatch.undo()
    mask = torch.zeros(2, SIZE, SIZE)
    mask[:, 8:20, 8:20] = 1
    flat = A.localisation_scores(explainer, images, mask, "cls", 1, methods=("saliency",))  # (B, H, W), as regions
    assert flat == A.localisation_scores(explainer, images, mask[:, None], "cls", 1, methods=("saliency",))


def test_plots_refuse_bad_input_before_opening_a_figure(images):
    plt.close("all")
    maps = torch.rand(2, 1, SIZE, SIZE)
    result = A.RandomisationResult(steps=["original", "head"], spearman=[1.0, 0.2], maps=[maps, maps], absolute=True)
    for call, message in [
        (lambda: A.plot_attributions(images, {"ig": maps[:1]}), r"maps\['ig'\] must be \(B, 1, H, W\)"),
        (lambda: A.plot_attributions(images, {"ig": torch.rand(2, 2, SIZE, SIZE)}), r"maps\['ig'\] must be"),
        (lambda: A.plot_attributions(images, {"ig": maps}, masks=torch.ones(1, 1, SIZE, SIZE)), "masks must be"),
        (lambda: A.plot_attributions(images, {"ig": maps}, row_labels=["a"]), r"one label per image \(2\)"),
        (lambda: A.plot_attributions(images[:0], {"ig": maps[:0]}), r"images must be .*at least one image, got \(0, "),
        (lambda: A.plot_attributions(images[0], {"ig": maps[0]}), r"images must be a \(B, C, H, W\) tensor"),
        (lambda: A.plot_randomisation(result, index=2), r"index must be an image of the result, an int in 0\.\.1"),
        # these opened the figure first and left it open
        (lambda: A.plot_randomisation(result, image=images[:1]), r"image must be a non-empty \(C, H, W\) array"),
        (lambda: A.plot_attributions(torch.rand(2, 2, SIZE, SIZE), {"ig": maps}), r"images must be a non-empty"),
        (lambda: A.plot_scores([]), "at least one row"),
        (lambda: A.plot_scores([{"model": "a", "method": "ig", "mask_share": 0.1, "pointing_game": 1.0}],
                               colours=["C0"]), r"colours must be \{group name: colour\}"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    assert plt.get_fignums() == []


def test_a_model_without_weights_is_named():
    with pytest.raises(ValueError, match="Explainer needs a model with floating-point weights; Identity has none"):
        A.Explainer(nn.Identity())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scores_refuse_maps_with_nan_or_inf(bad):
    """One NaN pixel made the share NaN and the pointing game a miss, one inf pixel a hit: averaged over
    different samples, against the docstring's promise."""
    maps, mask = torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 2:5] = 1
    maps[1, 0, 0, 0] = bad
    for score in (A.mask_share, A.pointing_game):
        with pytest.raises(ValueError, match="maps hold NaN or inf values"):
            score(maps, mask)
    maps[1, 0, 0, 0] = 0.0
    # NumPy arrays, as localisation_scores takes its masks: the same scores as tensors
    assert torch.equal(A.mask_share(maps.numpy(), mask.numpy()), A.mask_share(maps, mask))


def test_spearman_refuses_maps_of_another_shape():
    with pytest.raises(ValueError, match=r"a and b must be maps of the same shape.*\(1, 1, 8, 8\) and \(3, 1, 8, 8\)"):
        A.spearman(torch.rand(1, 1, 8, 8), torch.rand(3, 1, 8, 8))  # broadcast to 3 values, silently


def test_plot_randomisation_refuses_an_image_of_another_size():
    result = A.RandomisationResult(steps=["original", "head"], spearman=[1.0, 0.2],
                                   maps=[torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)])
    plt.close("all")
    with pytest.raises(ValueError, match=r"image is \(32, 32\) but the maps are \(16, 16\)"):
        A.plot_randomisation(result, image=torch.rand(1, 32, 32))  # the map covered its top-left quarter
    assert plt.get_fignums() == []
    assert len(A.plot_randomisation(result, image=torch.rand(1, 16, 16)).axes) == 2
    plt.close("all")


def test_plot_attributions_checks_percentile_and_masks_before_the_figure(images):
    maps = {"saliency": torch.rand(2, 1, *images.shape[-2:])}
    plt.close("all")
    with pytest.raises(ValueError, match=r"percentile must be a number in \(0, 100\]"):
        A.plot_attributions(images, maps, percentile=0)
    with pytest.raises(ValueError, match=r"masks must be a non-empty \(C, H, W\) array with 1 or 3 channels"):
        A.plot_attributions(images, maps, masks=torch.zeros(2, 2, *images.shape[-2:]))
    with pytest.raises(TypeError, match=r"maps must be a dict of method .* got a Tensor; name it, e\.g\. "
                                        r"plot_attributions\(images, \{'ig': maps\}\)"):
        A.plot_attributions(images, maps["saliency"])  # attribute()'s tensor as it comes: an IndexError
    assert plt.get_fignums() == []


@pytest.mark.parametrize("rows, message", [
    ({"saliency": {"mask_share": 0.2, "pointing_game": 1.0}}, r"needs a list of at least one row"),
    ([{"method": "saliency", "mask_share": 0.2, "pointing_game": 1.0}], r"row 0 has no \['model'\]"),
    ([{"method": "ig", "model": "a", "mask_share": 0.2}], r"row 0 has no \['pointing_game'\]"),
    ([{"method": "ig", "model": "a", "mask_share": None, "pointing_game": "1"}],  # was float(None)'s TypeError
     r"row 0 has mask_share=None, pointing_game='1'; scores are numbers"),
    ([{"method": "ig", "model": "a", "mask_share": np.array([0.1, 0.2]), "pointing_game": torch.ones(2)}],
     r"row 0 has mask_share=array\(\[0.1, 0.2\]\), pointing_game=tensor\(\[1., 1.\]\); scores are numbers"),
    ([{"method": "ig", "model": "a", "mask_share": 0.1, "pointing_game": 1.0},  # only the second was drawn
      {"method": "ig", "model": "a", "mask_share": 0.3, "pointing_game": 0.0}],
     r"rows repeat the \(model, method\) pair\(s\) \[\"\('a', 'ig'\)\"\]; give one row per pair"),
])
def test_plot_scores_names_a_row_it_cannot_read(rows, message):
    """A bare KeyError 'model', or "string indices must be integers" for localisation_scores' own dict."""
    with pytest.raises(ValueError, match=message):
        A.plot_scores(rows)
    plt.close("all")


def test_plot_scores_takes_numpy_and_tensor_scores():
    rows = [{"method": "ig", "model": "a", "mask_share": np.float32(0.2), "pointing_game": torch.tensor(1.0)}]
    fig = A.plot_scores(rows)
    heights = [[bar.get_height() for bar in ax.containers[0]] for ax in fig.axes]
    assert heights == [[pytest.approx(0.2)], [1.0]]
    plt.close("all")


def test_nan_images_are_named_not_explained(explainer, images):
    bad = images.clone()
    bad[1, 0, 3, 3] = float("nan")  # was a NaN map for that image, without a word
    with pytest.raises(ValueError, match=r"images \[1\] hold NaN or infinite values; check the data"):
        explainer.attribute(bad, "cls", method="ig")
    bad[0, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"images \[0, 1\] hold NaN or infinite values"):
        explainer.attribute(bad, "cls", method="saliency")


def test_an_empty_batch_is_named_not_passed_to_captum(explainer, images):
    with pytest.raises(ValueError, match=r"images is an empty batch \(0, 1, \d+, \d+\); pass at least one image"):
        explainer.attribute(images[:0], "cls", method="saliency")  # was an IndexError from inside Captum


def test_the_explorer_says_what_it_cannot_draw_and_takes_one_method_as_text(model, data, monkeypatch):
    viewer = A.AttributionExplorer(model, data, methods="saliency", tolerance=np.int64(1))
    assert list(viewer.method.options) == ["saliency"]  # not ['s', 'a', 'l', ...]
    with pytest.raises(ValueError, match=r"tolerance must be an integer >= 0 \(pixels\), got '1'"):
        A.AttributionExplorer(model, data, methods="saliency", tolerance="1")

    def fails(*args):
        raise RuntimeError("window larger than the image")

    monkeypatch.setattr(viewer, "compute", fails)
    plt.close("all")
    assert viewer.figure is not None  # item 0's
    viewer.index.value = 1
    assert viewer.state == {"index": 1, "error": "item 1 cannot be drawn: RuntimeError: window larger than the image"}
    assert viewer.figure is None  # not item 0's figure, as if it were item 1's
    assert viewer.output.outputs[0]["text"].startswith("item 1 cannot be drawn: RuntimeError")
    assert plt.get_fignums() == []


def test_localisation_scores_name_the_method_whose_maps_overflowed(model, data, images, monkeypatch):
    explainer = A.Explainer(model)
    mask = torch.stack([data[i]["mask"] for i in range(2)])
    monkeypatch.setattr(explainer, "attribute", lambda x, *args, **kwargs: torch.full((len(x), 1, *x.shape[-2:]),
                                                                                      float("nan")))
    with pytest.raises(ValueError, match=r"saliency's maps hold NaN or inf values"):
        A.localisation_scores(explainer, images, mask, methods=("saliency",))


def test_colour_limit_pools_maps_of_any_shape():
    """The docstring says any shape; a (C > 3, H, W) stack was refused as "not an image" by the picture check."""
    maps = torch.arange(1, 8 * 4 * 4 + 1, dtype=torch.float32).reshape(8, 4, 4)
    assert A.colour_limit([maps], 100.0) == 128.0 and A.colour_limit([maps.numpy(), -maps], 100.0) == 128.0
