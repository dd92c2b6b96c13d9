"""SyntheticUltrasound: item contract, determinism, class semantics, artifact knob, bad arguments."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtlearn.data import SyntheticUltrasound


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
    a, b = SyntheticUltrasound(num_samples=5, seed=7, image_size=48), SyntheticUltrasound(num_samples=50, seed=7, image_size=48)
    other = SyntheticUltrasound(num_samples=5, seed=8, image_size=48)
    for i in range(5):
        assert torch.equal(a[i]["image"], b[i]["image"])  # does not depend on num_samples
        assert torch.equal(a[i]["mask"], b[i]["mask"])
    assert not torch.equal(a[0]["image"], other[0]["image"])
    shifted = SyntheticUltrasound(num_samples=5, seed=7, image_size=48, first_index=3)
    assert torch.equal(shifted[0]["image"], b[3]["image"]) and shifted[0]["id"] == "synthetic-00003"


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


def test_benign_is_wider_than_tall_and_malignant_often_taller():
    ds = SyntheticUltrasound(num_samples=150, image_size=64, seed=4)
    taller = {1: [], 2: []}
    for i in np.nonzero(ds.labels > 0)[0]:
        item = ds.render(int(i))
        rows, cols = np.nonzero(item["mask"])
        taller[item["label"]].append(np.ptp(rows) > np.ptp(cols))
    assert np.mean(taller[1]) < 0.1
    assert 0.3 < np.mean(taller[2]) < 0.9


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


def test_clean_is_the_speckle_free_image():
    assert torch.equal(*(lambda it: (it["image"], it["clean"]))(SyntheticUltrasound(num_samples=1, noise_level=0.0)[0]))
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
        ({"artifact_correlation": 1.5}, "artifact_correlation"),
        ({"artifact_rate": -0.1}, "artifact_rate"),
        ({"noise_level": -1.0}, "noise_level"),
        ({"in_channels": 2}, "in_channels"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticUltrasound(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticUltrasound(num_samples=3)[3]


def test_float_image_size_names_int():
    with pytest.raises(ValueError, match=r"image_size must be an int.*128\.0.*int\(\.\.\.\)"):  # was a TypeError
        SyntheticUltrasound(num_samples=2, image_size=256 / 2)
