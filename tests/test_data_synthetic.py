"""SyntheticUltrasound: item contract, determinism, class semantics, artifact knob, bad arguments."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import regionprops
from torch.utils.data import DataLoader

from mtlearn.data import SyntheticUltrasound, load_dataset


@pytest.mark.parametrize(
    "image_size, in_channels, shape",
    [(32, 1, (32, 32)), (64, 3, (64, 64)), (128, 1, (128, 128)), ((48, 80), 1, (48, 80)), ((96, 40), 3, (96, 40))],
)
def test_item_shapes_dtypes_and_ranges(image_size, in_channels, shape):
    ds = SyntheticUltrasound(num_samples=12, image_size=image_size, in_channels=in_channels, seed=1)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == item["clean"].shape == (in_channels, *shape)
        assert item["mask"].shape == item["artifact_mask"].shape == (1, *shape)
        for key in ("image", "clean", "mask", "artifact_mask"):
            assert item[key].dtype == torch.float32
            assert 0.0 <= item[key].min() and item[key].max() <= 1.0
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"] in (0, 1, 2) and item["artifact"] in (0, 1)
        assert item["id"] == f"synthetic-{i:05d}"
        if in_channels == 3:  # grey repeated
            assert torch.equal(item["image"][0], item["image"][2])


def test_deterministic_by_seed_and_index():
    a = SyntheticUltrasound(num_samples=5, seed=7, image_size=48)
    b = SyntheticUltrasound(num_samples=50, seed=7, image_size=48)
    other = SyntheticUltrasound(num_samples=5, seed=8, image_size=48)
    for i in range(5):
        assert torch.equal(a[i]["image"], b[i]["image"])  # does not depend on num_samples
        assert torch.equal(a[i]["mask"], b[i]["mask"])
    assert not torch.equal(a[0]["image"], other[0]["image"])
    shifted = SyntheticUltrasound(num_samples=5, seed=7, image_size=48, first_index=3)
    assert torch.equal(shifted[0]["image"], b[3]["image"]) and shifted[0]["id"] == "synthetic-00003"
    # seed and index are two keys, not a sum: seed 8's item 0 is not seed 7's item 1
    assert not torch.equal(other[0]["image"], a[1]["image"])


def test_mask_is_empty_exactly_for_normal_items_and_labels_match():
    ds = SyntheticUltrasound(num_samples=90, image_size=48, seed=2)
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert labels == ds.labels.tolist()
    assert set(labels) == {0, 1, 2}
    for i, label in enumerate(labels):
        assert (ds[i]["mask"].sum() == 0) == (label == 0)


def test_class_probs_are_followed():
    assert set(SyntheticUltrasound(num_samples=40, class_probs=(0, 0, 1)).labels.tolist()) == {2}
    counts = np.bincount(SyntheticUltrasound(num_samples=3000, class_probs=(0.6, 0.3, 0.1)).labels, minlength=3)
    assert np.allclose(counts / 3000, (0.6, 0.3, 0.1), atol=0.03)


def test_class_probs_are_relative_weights():
    """class_probs need not sum to 1 (only to be non-negative, not all zero): (2, 1, 1) is (0.5, 0.25, 0.25)."""
    weights = SyntheticUltrasound(num_samples=300, class_probs=(2, 1, 1), seed=3).labels
    shares = SyntheticUltrasound(num_samples=300, class_probs=(0.5, 0.25, 0.25), seed=3).labels
    assert weights.tolist() == shares.tolist()
    assert set(weights.tolist()) == {0, 1, 2}


def test_benign_is_wider_than_tall_and_malignant_often_taller():
    ds = SyntheticUltrasound(num_samples=150, image_size=64, seed=4)
    taller = {1: [], 2: []}
    for i in np.nonzero(ds.labels > 0)[0]:
        item = ds.render(int(i))
        rows, cols = np.nonzero(item["mask"])
        taller[item["label"]].append(np.ptp(rows) > np.ptp(cols))
    assert np.mean(taller[1]) < 0.1
    assert 0.3 < np.mean(taller[2]) < 0.9


# --------------------------------------------------------------------------------------------------
# The BI-RADS signs that make benign vs malignant learnable (BI-RADS descriptors). Each test measures one
# sign on the speckle-free `clean` image of the same ~170 lesions (96 px, seed 11, no artifact, which
# would draw over them) and fails if the generator stops drawing it.


@pytest.fixture(scope="module")
def lesions():
    """(label, clean, mask) of every benign or malignant item of a small dataset, (H, W) arrays."""
    ds = SyntheticUltrasound(num_samples=240, image_size=96, seed=11)
    items = [ds.render(int(i), artifact=False) for i in np.nonzero(ds.labels > 0)[0]]
    return [(item["label"], item["clean"], item["mask"] > 0) for item in items]


def _posterior_contrast(clean, mask, depth: int = 0):
    """Mean grey level of a band just below the lesion minus the same band beside it (same depth).

    The band starts 3 px under the lesion's lowest row (clear of its edge), `depth` px deeper still, and
    is 6 px thick; it spans the lesion's columns below, and as many columns on each side (after a 3 px
    gap) beside. None when the band would leave the image.
    """
    rows, cols = np.nonzero(mask)
    top, left, right = rows.max() + 3 + depth, cols.min(), cols.max() + 1
    if top + 6 > clean.shape[0]:
        return None
    band = clean[top : top + 6]  # (6, W)
    x = np.arange(clean.shape[1])
    width = right - left
    beside = ((x >= left - 3 - width) & (x < left - 3)) | ((x >= right + 3) & (x < right + 3 + width))
    return band[:, left:right].mean() - band[:, beside].mean()


def test_posterior_enhancement_behind_benign_and_shadow_behind_malignant(lesions):
    """Posterior features: benign masses let sound through (brighter below), malignant ones shadow it.

    It is one of the signs a classifier should learn (BI-RADS "posterior features"); the generator
    draws enhancement under 75 % of benign and a shadow under 80 % of malignant lesions.
    """
    contrast = {1: [], 2: []}
    for label, clean, mask in lesions:
        contrast[label].append(_posterior_contrast(clean, mask))
    benign, malignant = np.array(contrast[1]), np.array(contrast[2])
    # measured: 0.83 of benign items brighter below, 0.83 of malignant darker (about 0.5 without the sign)
    assert np.mean(benign > 0) > 0.7
    assert np.mean(malignant < 0) > 0.7


def test_a_shadow_persists_with_depth_where_enhancement_fades(lesions):
    """Deeper below the lesion (a third of the image height further), the malignant shadow is as dark as just
    under it, while benign enhancement has faded (measured: 1.02 and 0.43 of the near contrast)."""
    near, deep = {1: [], 2: []}, {1: [], 2: []}
    for label, clean, mask in lesions:
        far = _posterior_contrast(clean, mask, depth=clean.shape[0] * 3 // 10)
        if far is not None:
            near[label].append(_posterior_contrast(clean, mask))
            deep[label].append(far)
    assert min(len(deep[1]), len(deep[2])) > 30
    assert np.mean(deep[2]) / np.mean(near[2]) > 0.8
    assert np.mean(deep[1]) / np.mean(near[1]) < 0.6


def test_malignant_masks_are_less_solid_than_benign(lesions):
    """Margin: malignant outlines are irregular and spiculated, benign ones smooth ovals.

    Solidity = mask area / area of its convex hull: about 1 for an oval, lower when spicules and
    lobes leave gaps in the hull. Shape of the margin is a sign the classifier (and the segmenter)
    should learn, so the generator must draw it.
    """
    solidity = {1: [], 2: []}
    for label, _, mask in lesions:
        solidity[label].append(regionprops(mask.astype(np.uint8))[0].solidity)
    # measured medians: benign 0.96, malignant 0.755 (0.96 with a smooth malignant outline)
    assert np.median(solidity[2]) < np.median(solidity[1]) - 0.1


def _edge_sharpness(clean, mask):
    """Share of the lesion's contrast crossed in one step over the margin: ~1 sharp, lower if soft.

    (outside ring - inside ring) / (ring 3-4 px outside - ring 3-4 px inside), where the rings are
    the 1 px layers just outside and just inside the mask. Only the upper half of the lesion counts:
    posterior enhancement or shadow changes what lies below it.
    """
    grown = [mask] + [ndimage.binary_dilation(mask, iterations=k) for k in (1, 3, 4)]  # 0, 1, 3, 4 px
    shrunk = [mask] + [ndimage.binary_erosion(mask, iterations=k) for k in (1, 3, 4)]  # (iterations=0 repeats)
    upper = np.arange(clean.shape[0])[:, None] < np.nonzero(mask)[0].mean()  # (H, 1)
    level = lambda region: clean[region & upper].mean()
    step = level(grown[1] & ~grown[0]) - level(shrunk[0] & ~shrunk[1])
    contrast = level(grown[3] & ~grown[2]) - level(shrunk[2] & ~shrunk[3])
    return step / contrast


def test_malignant_edges_fade_more_gradually_than_benign(lesions):
    """Margin: benign masses are circumscribed (sharp edge), malignant ones indistinct (blurred edge).

    Within a soft edge the grey level changes gradually, so a smaller share of the lesion's contrast
    lies between the last pixel inside and the first pixel outside. This too is a sign the
    classifier should learn.
    """
    sharpness = {1: [], 2: []}
    for label, clean, mask in lesions:
        sharpness[label].append(_edge_sharpness(clean, mask))
    # measured medians: benign 0.83, malignant 0.64 (0.91 with the benign edge softness for malignant)
    assert np.median(sharpness[2]) < np.median(sharpness[1]) - 0.1


def test_lesions_sit_in_the_gland_away_from_the_sides(lesions):
    """Centres are drawn at 36-58 % of the depth (the gland) and 25-75 % of the width: no lesion in the skin
    or fat, none cut off by the image's side."""
    centres = np.array([ndimage.center_of_mass(mask) for _, _, mask in lesions]) / lesions[0][1].shape  # (N, 2)
    assert 0.3 < centres[:, 0].min() and centres[:, 0].max() < 0.65
    assert 0.2 < centres[:, 1].min() and centres[:, 1].max() < 0.8
    assert not any(mask[:, [0, -1]].any() or mask[[0, -1]].any() for _, _, mask in lesions)  # none touches an edge


def test_lesion_sizes_follow_the_shorter_side_of_the_image():
    """Sizes are given for 128 px and scaled by the shorter side: a wider image shows the same lesions."""
    square, wide = (SyntheticUltrasound(num_samples=30, image_size=size, seed=2) for size in ((48, 48), (48, 80)))
    areas = {name: [ds.render(int(i))["mask"].sum() for i in np.nonzero(ds.labels > 0)[0]]
             for name, ds in (("square", square), ("wide", wide))}
    assert np.mean(areas["wide"]) == pytest.approx(np.mean(areas["square"]), rel=0.05)


def test_echoes_weaken_with_depth():
    """Attenuation (what TGC leaves of it): within the gland of normal images, deeper rows are darker
    (measured: 0.045 of the grey range between rows at 32-40 % and 54-62 % of the depth, in 85 % of images)."""
    ds = SyntheticUltrasound(num_samples=200, image_size=64, seed=3)
    cleans = [ds.render(int(i), artifact=False)["clean"] for i in np.nonzero(ds.labels == 0)[0][:60]]
    drop = [clean[20:26].mean() - clean[34:40].mean() for clean in cleans]
    assert np.mean(drop) > 0.02 and np.mean(np.array(drop) > 0) > 0.7


def test_mask_outlines_the_drawn_lesion(lesions):
    """The mask lies exactly on the hypoechoic mass of the speckle-free image (not shifted or resized).

    Near the lesion (the mask grown by 4 px) the pixels darker than halfway between the lesion's core
    and the tissue around it are the lesion: they must coincide with the mask.
    """
    agreement, offset = {1: [], 2: []}, {1: [], 2: []}
    for label, clean, mask in lesions:
        near = ndimage.binary_dilation(mask, iterations=4)
        ring = near & ~ndimage.binary_dilation(mask, iterations=2)
        core = ndimage.binary_erosion(mask, iterations=2)
        core = core if core.any() else mask
        dark = near & (clean < (np.median(clean[core]) + np.median(clean[ring])) / 2)
        agreement[label].append((dark & mask).sum() / (dark | mask).sum())
        offset[label].append(np.hypot(*np.subtract(ndimage.center_of_mass(mask), ndimage.center_of_mass(dark))))
    # measured: IoU medians 0.99 (benign, sharp edge) and 0.93 (malignant, soft edge), centres 0.05 px
    # apart for benign; a mask shifted by one pixel gives 0.91, 0.80 and 1.0 px
    assert np.median(agreement[1]) > 0.95 and np.median(agreement[2]) > 0.87
    assert np.median(offset[1]) < 0.5


def test_no_global_brightness_shortcut_between_benign_and_malignant():
    ds = SyntheticUltrasound(num_samples=300, image_size=48, seed=5)
    means = {1: [], 2: []}
    for i in np.nonzero(ds.labels > 0)[0]:
        item = ds.render(int(i))
        means[item["label"]].append(item["image"].mean())
    benign, malignant = np.array(means[1]), np.array(means[2])
    auc = np.mean(benign[:, None] > malignant[None, :])  # P(a benign image is brighter than a malignant one)
    assert 0.25 < auc < 0.75


@pytest.mark.parametrize("correlation", [-1.0, -0.5, 0.0, 0.5, 1.0])
def test_artifact_correlation_knob(correlation):
    ds = SyntheticUltrasound(num_samples=3000, seed=0, artifact_correlation=correlation)
    malignant, artifact = ds.labels == 2, ds.artifacts
    measured = np.corrcoef(malignant, artifact)[0, 1]
    if abs(correlation) == 1.0:  # a perfect shortcut (or its reverse)
        assert np.array_equal(artifact.astype(bool), malignant if correlation > 0 else ~malignant)
    else:
        assert abs(measured - correlation) < 0.1
    p_other, p_malignant = ds.artifact_probabilities()
    assert np.isclose(artifact[malignant].mean(), p_malignant, atol=0.05)
    assert np.isclose(artifact[~malignant].mean(), p_other, atol=0.05)


def test_artifact_rate_without_correlation():
    assert SyntheticUltrasound(num_samples=2000, artifact_rate=0.0).artifacts.sum() == 0
    assert np.isclose(SyntheticUltrasound(num_samples=2000, artifact_rate=0.2).artifacts.mean(), 0.2, atol=0.03)


def test_artifact_mask_marks_exactly_what_the_artifact_changes():
    ds = SyntheticUltrasound(num_samples=40, image_size=64, seed=6)
    for i in range(len(ds)):
        with_artifact, without = ds.render(i, artifact=True), ds.render(i, artifact=False)
        assert with_artifact["artifact"] == 1 and without["artifact"] == 0
        assert without["artifact_mask"].sum() == 0 and with_artifact["artifact_mask"].sum() > 0
        assert np.array_equal(with_artifact["mask"], without["mask"])  # same scene
        outside = with_artifact["artifact_mask"] == 0
        assert np.array_equal(with_artifact["image"][outside], without["image"][outside])
        assert ds[i]["artifact"] == int(ds[i]["artifact_mask"].sum() > 0)


def test_every_combination_of_artifact_kinds_is_drawn():
    from mtlearn.data import synthetic

    rng = np.random.default_rng(0)
    drawn = {synthetic._pick_kinds(rng) for _ in range(500)}
    assert len(drawn) == 2 ** len(synthetic.ARTIFACT_KINDS) - 1 and synthetic.ARTIFACT_KINDS in drawn


def test_a_shadow_band_darkens_the_image_where_its_mask_says(monkeypatch):
    from mtlearn.data import synthetic

    monkeypatch.setattr(synthetic, "_pick_kinds", lambda rng: ("shadow_band",))
    ds = SyntheticUltrasound(num_samples=10, image_size=64, seed=4)
    for i in range(len(ds)):
        shadowed, plain = ds.render(i, artifact=True), ds.render(i, artifact=False)
        band = shadowed["artifact_mask"] > 0
        assert (shadowed["clean"][band] - plain["clean"][band]).mean() < -0.1


def test_calipers_mark_the_lesions_two_ends(monkeypatch):
    """Two "+" marks on the lesion's middle row, 2 px beyond its leftmost and rightmost pixels there."""
    from mtlearn.data import synthetic

    monkeypatch.setattr(synthetic, "_pick_kinds", lambda rng: ("calipers",))
    ds = SyntheticUltrasound(num_samples=20, image_size=64, seed=4)
    for i in np.nonzero(ds.labels > 0)[0][:5]:
        item = ds.render(int(i), artifact=True)
        rows, _ = np.nonzero(item["mask"])
        row = int(rows.mean())
        ends = np.nonzero(item["mask"][row])[0]
        marks = item["artifact_mask"]
        assert marks[row, ends.min() - 2] == 1 and marks[row, ends.max() + 2] == 1
        assert marks[row, ends.min() + 1 : ends.max() - 1].sum() == 0  # the arms reach its ends, not its middle


@pytest.mark.parametrize("kind", ["calipers", "text"])
def test_overlays_are_drawn_near_white(monkeypatch, kind):
    """Scanners burn marks and text in near-white (0.85..1), visible on dark tissue: a dark overlay would be a
    cue the shortcut experiment's model could hardly see. render(artifact=True) says so as the int 1."""
    from mtlearn.data import synthetic

    monkeypatch.setattr(synthetic, "_pick_kinds", lambda rng: (kind,))
    ds = SyntheticUltrasound(num_samples=6, image_size=48, seed=2)
    for i in range(len(ds)):
        item = ds.render(i, artifact=True)
        marks = item["artifact_mask"] == 1
        assert marks.any() and item["artifact"] == 1 and type(item["artifact"]) is int
        assert item["image"][marks].min() >= 0.85 and item["clean"][marks].min() >= 0.85
        assert item["image"][marks].max() <= 1 and item["clean"][marks].max() <= 1


def test_overlays_are_burnt_into_the_clean_image_too():
    """Calipers and text are part of the display: without speckle, image and clean agree on them as well."""
    ds = SyntheticUltrasound(num_samples=12, image_size=48, seed=9, noise_level=0.0)
    for i in range(len(ds)):
        item = ds.render(i, artifact=True)
        assert np.array_equal(item["image"], item["clean"])


def test_an_items_clean_is_the_renders_clean_not_its_image():
    ds = SyntheticUltrasound(num_samples=3, image_size=32, seed=1, in_channels=3)
    for i in range(len(ds)):
        item, scene = ds[i], ds.render(i)
        assert torch.equal(item["clean"], torch.from_numpy(scene["clean"]).expand(3, -1, -1))
        assert not torch.equal(item["clean"], item["image"])


def test_noise_level_scales_the_speckle_and_leaves_clean_alone():
    """The residual image - clean at noise_level 0.5 is half that at 1 (measured 0.51 of it); clean is the same."""
    std = {}
    for level in (0.5, 1.0):
        ds = SyntheticUltrasound(num_samples=20, image_size=64, seed=8, noise_level=level)
        items = [ds.render(i) for i in range(len(ds))]
        std[level] = np.concatenate([(it["image"] - it["clean"])[(it["clean"] > 0.2) & (it["clean"] < 0.8)
                                                                 & (it["artifact_mask"] == 0)] for it in items]).std()
        if level == 0.5:
            cleans = [it["clean"] for it in items]
        else:
            assert all(np.array_equal(a, it["clean"]) for a, it in zip(cleans, items))
    assert 0.4 < std[0.5] / std[1.0] < 0.6


def test_clean_is_the_speckle_free_image():
    noiseless = SyntheticUltrasound(num_samples=1, noise_level=0.0)[0]
    assert torch.equal(noiseless["image"], noiseless["clean"])
    ds = SyntheticUltrasound(num_samples=20, image_size=64, seed=8)
    residuals = []
    for i in range(len(ds)):
        item = ds.render(i)
        unclipped = (item["clean"] > 0.2) & (item["clean"] < 0.8) & (item["artifact_mask"] == 0)
        residuals.append((item["image"] - item["clean"])[unclipped])
    residual = np.concatenate(residuals)
    # log-compressed Rayleigh speckle: zero mean, 5.57 dB standard deviation = 0.111 of the 50 dB range
    assert abs(residual.mean()) < 0.01
    assert 0.095 < residual.std() < 0.125


def test_default_collate_batches_items():
    batch = next(iter(DataLoader(SyntheticUltrasound(num_samples=8, image_size=32), batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["label"].shape == (4,)
    assert len(batch["id"]) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"image_size": 16}, "image_size"),
        ({"image_size": (64, 64, 3)}, "image_size"),
        ({"class_probs": (0.5, 0.5)}, "class_probs"),
        ({"class_probs": (1, -1, 1)}, "class_probs"),
        ({"class_probs": (0, 0, 0)}, "class_probs"),
        ({"class_probs": (float("nan"), 1, 1)}, "class_probs must be 3 finite"),  # drew class 0 for every item
        ({"class_probs": (1, 1, float("inf"))}, "class_probs must be 3 finite"),
        ({"seed": 2**32 + 7}, r"below 2\*\*32"),  # would draw seed 7's items, shifted by one
        ({"seed": 2**32}, r"below 2\*\*32"),  # [2**32, i] draws what [0, 1, i] does
        ({"first_index": 2**32 - 2, "num_samples": 3}, r"below 2\*\*32"),
        ({"artifact_correlation": 1.5}, "artifact_correlation"),
        ({"artifact_rate": -0.1}, "artifact_rate"),
        ({"noise_level": -1.0}, "noise_level"),
        ({"noise_level": float("nan")}, "noise_level"),
        ({"noise_level": float("inf")}, "noise_level"),
        ({"in_channels": 2}, "in_channels"),
        ({"in_channels": True}, r"in_channels must be 1 \(grey\) or 3 .*got True"),  # gave 1-channel images
        ({"in_channels": 3.0}, r"in_channels must be 1 \(grey\) or 3 .*got 3.0"),
        # a number as a string (from a config file, the command line) named, not a TypeError from the comparison
        ({"artifact_correlation": "0.5"}, r"artifact_correlation must be a number in \[-1, 1\], got '0.5'; pass it "
                                          "unquoted"),
        ({"artifact_rate": None}, r"artifact_rate must be a number in \[0, 1\], got None"),
        ({"noise_level": "1.0"}, r"noise_level must be a finite number >= 0 .*got '1.0'; pass it unquoted"),
        ({"class_probs": "abc"}, "class_probs must be 3 finite .*got 'abc'; pass numbers, not strings"),
        ({"class_probs": ("0.2", "0.3", "0.5")}, "class_probs must be 3 finite .*pass numbers, not strings"),
        ({"class_probs": [[1, 2], [3]]}, "class_probs must be 3 finite"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticUltrasound(**kwargs)


def test_the_largest_seeds_below_the_limit_are_taken():
    assert len(SyntheticUltrasound(num_samples=2, image_size=32, seed=2**32 - 1, first_index=2**32 - 2)) == 2


def test_load_dataset_names_a_knob_given_as_a_string():
    """The way a learner meets it: load_dataset passes the knobs on, and the error must name the one to fix."""
    from mtlearn.data import load_dataset

    with pytest.raises(ValueError, match="artifact_correlation must be a number in .*got '0.5'"):
        load_dataset("synthetic", artifact_correlation="0.5")


def test_class_probs_of_any_numeric_kind_draw_the_same_items():
    """A tensor, an int array or a tuple of floats with the same ratios: the same classes, item by item."""
    reference = SyntheticUltrasound(num_samples=64, image_size=32, class_probs=(0.25, 0.25, 0.5)).labels
    for probs in (torch.tensor([1.0, 1.0, 2.0]), np.array([1, 1, 2]), (0.25, 0.25, 0.5)):
        assert np.array_equal(SyntheticUltrasound(num_samples=64, image_size=32, class_probs=probs).labels, reference)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticUltrasound(num_samples=3)[3]


def test_negative_index_is_refused():
    """ds[-1] would seed item first_index - 1 of the stream, another dataset's item: an IndexError instead."""
    with pytest.raises(IndexError, match=r"index -1 out of range for a dataset of 3 items \(0 to 2\)"):
        SyntheticUltrasound(num_samples=3, first_index=5)[-1]


@pytest.mark.parametrize("artifact", ["no", 2, 0.0])
def test_render_takes_true_false_or_none_for_the_artifact(artifact):
    """"no" and 2 are truthy: the artifact was drawn, silently."""
    with pytest.raises(ValueError, match=rf"artifact must be True or 1 \(drawn\), False or 0 \(not drawn\), or None "
                                         rf"\(the item's own\), got {artifact!r}"):
        SyntheticUltrasound(num_samples=3).render(0, artifact=artifact)
    data = SyntheticUltrasound(num_samples=3)
    assert data.render(0, artifact=np.bool_(False))["artifact"] == 0
    for flag in (0, 1, torch.tensor(1)):  # an item's own flag, as data[i]["artifact"] holds it (or a batch's)
        assert data.render(0, artifact=flag)["artifact"] == flag


@pytest.mark.parametrize("size", [8, 16, (32, 16)])
def test_load_dataset_names_the_generated_datas_own_minimum_size(size):
    """load_dataset said "ints >= 8" for 7, then "ints >= 32" for 8."""
    with pytest.raises(ValueError, match=r"image_size must be an int or \(H, W\) of ints >= 32"):
        load_dataset("synthetic", split="train", image_size=size)


def test_the_split_all_indexes_counts_and_prints_as_each_split_does():
    """A bare ConcatDataset had no labels or artifacts, took -1, said "list index out of range" and printed as
    <... object at 0x...>."""
    data = load_dataset("synthetic", split="all", num_samples=3, image_size=32)
    parts = [load_dataset("synthetic", split=s, num_samples=3, image_size=32) for s in ("train", "val", "test")]
    assert data.labels.tolist() == [label for part in parts for label in part.labels.tolist()]
    assert data.artifacts.tolist() == [flag for part in parts for flag in part.artifacts.tolist()]
    assert [data[i]["label"] for i in range(9)] == data.labels.tolist() and data[4]["id"] == parts[1][1]["id"]
    for index, message in [(9, r"index 9 out of range for a dataset of 9 items \(0 to 8\)$"),
                           (-1, "count from the start")]:
        with pytest.raises(IndexError, match=message):
            data[index]
    assert repr(data) == "9 items, split 'all' = " + " + ".join(map(repr, parts))
    assert repr(parts[1]) == ("SyntheticUltrasound(num_samples=3, image_size=(32, 32), seed=0, first_index=1000000, "
                              "class_probs=(0.333, 0.333, 0.333), artifact_correlation=0.0, artifact_rate=0.5, "
                              "noise_level=1.0, in_channels=1)")
    # the classes' frequencies change the data: two datasets drawing other labels printed alike
    assert "class_probs=(0.9, 0.05, 0.05)," in repr(SyntheticUltrasound(num_samples=3, class_probs=(18, 1, 1)))


@pytest.mark.parametrize("index", [1.5, True, "1"])
def test_an_index_that_is_not_an_integer_is_refused_before_drawing(index):
    with pytest.raises(TypeError, match="index must be an integer, got "):
        SyntheticUltrasound(num_samples=3)[index]


def test_float_image_size_names_int():
    with pytest.raises(ValueError, match=r"image_size must be an int.*128\.0.*int\(\.\.\.\)"):  # was a TypeError
        SyntheticUltrasound(num_samples=2, image_size=256 / 2)
