"""Linear probes, feature extraction, 2-D embeddings and the probe plots."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtlearn.probes import (
    EMBEDDINGS,
    cross_validated_probe,
    embed_2d,
    extract_features,
    linear_probe,
    plot_adversary_accuracy,
    OKABE_ITO,
    plot_embedding,
    plot_probe_matrix,
    probe_matrix,
)


def synthetic_features(n: int = 400, dim: int = 16, seed: int = 0):
    """Features where label "coded" is written along one direction and "random" is not at all."""
    rng = np.random.default_rng(seed)
    coded = rng.integers(0, 2, n)
    random = rng.integers(0, 2, n)
    features = rng.normal(size=(n, dim))
    features[:, 3] += 3.0 * (2 * coded - 1)  # linearly separable along feature 3 (with some overlap)
    return features, coded, random


def test_probe_recovers_a_linearly_coded_label():
    features, coded, _ = synthetic_features()
    scores = linear_probe(features[:300], coded[:300], features[300:], coded[300:])
    assert scores["balanced_accuracy"] > 0.95
    assert scores["chance"] == 0.5


def test_probe_is_at_chance_on_a_random_label():
    features, _, random = synthetic_features()
    scores = linear_probe(features[:300], random[:300], features[300:], random[300:])
    assert abs(scores["balanced_accuracy"] - 0.5) < 0.12


def test_probe_balanced_accuracy_ignores_class_imbalance():
    # 90 % of one class and no signal: plain accuracy can look high, balanced accuracy stays near 0.5
    rng = np.random.default_rng(1)
    features = rng.normal(size=(1000, 8))
    labels = (rng.random(1000) < 0.1).astype(int)
    scores = linear_probe(features[:700], labels[:700], features[700:], labels[700:])
    assert abs(scores["balanced_accuracy"] - 0.5) < 0.1


def test_probe_balanced_accuracy_is_the_mean_per_class_recall():
    # 90/10 classes split along feature 0 at -3 / +3; in the test set 6 of the 10 minority points sit
    # among the majority, so the probe must call them class 0: plain accuracy 0.94, balanced 0.7
    rng = np.random.default_rng(0)

    def blob(center, n):
        return np.c_[center + 0.3 * rng.normal(size=n), rng.normal(size=n)]

    train = np.r_[blob(-3, 90), blob(3, 10)]
    test = np.r_[blob(-3, 90), blob(3, 4), blob(-3, 6)]
    y = np.r_[np.zeros(90, int), np.ones(10, int)]  # same labels for train and test
    scores = linear_probe(train, y, test, y)
    recall = [90 / 90, 4 / 10]  # class 0 all right; class 1 only the 4 on its own side
    assert scores["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert scores["accuracy"] == pytest.approx(94 / 100)


def test_probe_standardises_the_features():
    # features in tiny units (x 1e-4) read as well as the originals: the regularisation sees standardised ones
    features, coded, _ = synthetic_features()
    original = linear_probe(features[:300], coded[:300], features[300:], coded[300:])
    tiny = linear_probe(features[:300] * 1e-4, coded[:300], features[300:] * 1e-4, coded[300:])
    assert tiny == pytest.approx(original)


def test_probe_chance_is_one_over_the_number_of_classes():
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    features = rng.normal(size=(90, 4)) + 3.0 * np.eye(4)[labels]
    assert linear_probe(features[:60], labels[:60], features[60:], labels[60:])["chance"] == pytest.approx(1 / 3)


def test_probe_weights_the_classes_by_inverse_frequency():
    # one feature with two values: at x = +1 sit 10 class-1 and 20 class-0 points, at x = -1 70 class-0 points.
    # Unweighted, class 1 is the minority even at x = +1 (1/3); weighted by inverse frequency (x5 vs x0.56)
    # it is the majority there, so the probe predicts it and gets both test points right
    train = np.r_[np.ones(10), np.ones(20), -np.ones(70)][:, None]
    y_train = np.r_[np.ones(10, int), np.zeros(90, int)]
    scores = linear_probe(train, y_train, np.array([[1.0], [-1.0]]), np.array([1, 0]))
    assert scores["balanced_accuracy"] == 1.0


def test_cross_validated_probe_is_the_mean_over_stratified_folds():
    from sklearn.model_selection import StratifiedKFold

    features, _, random = synthetic_features(n=100)
    splits = StratifiedKFold(n_splits=4, shuffle=True, random_state=3).split(features, random)
    per_fold = [linear_probe(features[tr], random[tr], features[te], random[te]) for tr, te in splits]
    assert len({s["balanced_accuracy"] for s in per_fold}) > 1  # folds differ: the mean is not any one of them
    scores = cross_validated_probe(features, random, folds=4, seed=3)
    for key in ("balanced_accuracy", "accuracy", "chance"):
        assert scores[key] == pytest.approx(np.mean([s[key] for s in per_fold]))


def test_cross_validated_probe_separates_coded_and_random_labels():
    features, coded, random = synthetic_features()
    assert cross_validated_probe(features, coded)["balanced_accuracy"] > 0.95
    assert cross_validated_probe(features, random)["balanced_accuracy"] < 0.62


@pytest.mark.parametrize(
    "args, match",
    [
        # two classes, so that only the length check can refuse it ("y_train" would match "train" too)
        ((np.zeros((10, 3)), np.r_[np.zeros(5), np.ones(4)], np.zeros((5, 3)), np.zeros(5)),
         r"train: expected features \(N, D\) and labels \(N,\)"),
        ((np.zeros((10, 3)), np.r_[np.zeros(5), np.ones(5)], np.zeros((5, 4)), np.zeros(5)), "width"),
        ((np.zeros((10, 4)), np.r_[np.zeros(5), np.ones(5)], np.zeros((5, 3)), np.zeros(5)), "width: 4 vs 3"),
        ((np.zeros((10, 3)), np.zeros(10), np.zeros((5, 3)), np.zeros(5)), "two classes"),
        ((np.zeros(10), np.r_[np.zeros(5), np.ones(5)], np.zeros((5, 3)), np.zeros(5)),
         r"train: expected features \(N, D\)"),
    ],
)
def test_linear_probe_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        linear_probe(*args)


@pytest.mark.parametrize("options, says", [
    (dict(C=0), r"C must be a finite number > 0 \(the inverse regularisation strength"),  # was sklearn's own error
    (dict(max_iter=0), r"max_iter must be"),
])
def test_linear_probe_checks_its_options(options, says):
    with pytest.raises(ValueError, match=says):
        linear_probe(np.ones((4, 2)), [0, 1, 0, 1], np.ones((2, 2)), [0, 1], **options)


def _diverged(n=20, bad=float("nan")):
    features = np.random.default_rng(0).normal(size=(n, 4))
    features[3, 1] = bad
    return features


@pytest.mark.parametrize("call, says", [
    (lambda: linear_probe(np.ones((10, 4)), np.r_[np.zeros(5), np.ones(5)], _diverged(), np.r_[np.zeros(10),
                                                                                                np.ones(10)]),
     r"test features hold 1 NaN or inf value\(s\) of 80: the encoder that made them diverged"),
    (lambda: cross_validated_probe(_diverged(bad=float("inf")), np.r_[np.zeros(10), np.ones(10)]),
     r"features hold 1 NaN or inf value\(s\) of 80: .*retrain it, e.g. with a lower lr, before probing"),
    (lambda: embed_2d(_diverged()), r"features hold 1 NaN or inf"),
    (lambda: cross_validated_probe(np.zeros((20, 0)), np.r_[np.zeros(10), np.ones(10)]),
     r"features have no columns \(shape \(20, 0\)\)"),
    (lambda: linear_probe(np.full((10, 2), "a"), np.r_[np.zeros(5), np.ones(5)], np.zeros((4, 2)), [0, 1, 0, 1]),
     r"train features must be numbers, got an array of <U1"),
])
def test_features_a_diverged_encoder_made_are_blamed_on_it(call, says):
    """sklearn said "Input X contains NaN ... consider HistGradientBoostingClassifier": another estimator, when
    the encoder that made the features is what went wrong."""
    with pytest.raises(ValueError, match=says):
        call()
    linear_probe(np.r_[np.zeros((5, 2)), np.ones((5, 2))] > 0, np.r_[np.zeros(5), np.ones(5)],  # booleans are numbers
                 np.eye(2, dtype=bool), [0, 1])


def _patients(n_patients=38, per_patient=18, seed=0):
    """Features that say who the patient is (a centre each, plus noise) and a flag drawn per patient that no
    feature direction encodes: only a probe that sees a patient on both sides of a fold can read it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_patients, 16)) * 3
    flags = rng.integers(0, 2, n_patients)
    features = np.concatenate([c + rng.normal(size=(per_patient, 16)) for c in centres])
    return features, np.repeat(flags, per_patient), np.repeat(np.arange(n_patients), per_patient)


def test_cross_validated_probe_keeps_each_patient_on_one_side_of_every_fold():
    from sklearn.model_selection import StratifiedGroupKFold

    features, flags, patients = _patients()
    leaky = cross_validated_probe(features, flags)["balanced_accuracy"]
    grouped = cross_validated_probe(features, flags, groups=patients)["balanced_accuracy"]
    assert leaky > 0.7 and grouped < 0.55  # the flag read through the patient's identity, and not at all
    splits = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0).split(features, flags, patients)
    expected = np.mean([linear_probe(features[tr], flags[tr], features[te], flags[te])["balanced_accuracy"]
                        for tr, te in splits])
    assert grouped == pytest.approx(expected)


def test_cross_validated_probe_checks_its_groups():
    features, flags, patients = _patients(n_patients=8)
    with pytest.raises(ValueError, match=r"groups must name one group per item \(144\), got shape \(143,\)"):
        cross_validated_probe(features, flags, groups=patients[:-1])
    rare = np.isin(patients, [0, 1, 2, 3, 4, 5])  # only patients 6 and 7 left to carry class 1 below
    flags = np.where(rare, 0, 1)
    with pytest.raises(ValueError, match=r"class 1 has 2 group\(s\) \(e\.g\. patients\), fewer than folds=5: "
                                         r".*pass folds=2 or fewer"):
        cross_validated_probe(features, flags, groups=patients)  # 36 images of class 1, but 2 patients
    assert 0 <= cross_validated_probe(features, flags, folds=2, groups=patients)["balanced_accuracy"] <= 1


class LopsidedFolds:
    """A stand-in for StratifiedGroupKFold: below `good_from` as random_state, its first test fold holds class
    0's items only (y sorted); from it on, fold k tests the items k, k + n_splits, ... (y alternating)."""

    good_from = None  # None: never a good split
    flip_odd = False  # True: an odd random_state sorts y the other way (its first test fold then lacks class 0)
    tried = []

    def __init__(self, n_splits, shuffle, random_state):
        self.n_splits, self.random_state = n_splits, random_state
        LopsidedFolds.tried.append(random_state)

    def split(self, features, y, groups):
        good = self.good_from is not None and self.random_state >= self.good_from
        flip = self.flip_odd and self.random_state % 2
        order = np.arange(len(y)) if good else np.argsort(-y if flip else y, kind="stable")
        for fold in range(self.n_splits):
            te = order[fold::self.n_splits] if good else np.array_split(order, self.n_splits)[fold]
            yield np.setdiff1d(np.arange(len(y)), te), te


def test_grouped_folds_that_miss_a_class_are_shuffled_again(monkeypatch):
    """A class spread unevenly over a few patients can leave a test fold without it (its balanced accuracy is
    then the other class's recall alone), and which shuffles do depends on the scikit-learn version: the
    probe of the same patients failed on one version and passed on the next. The next seeds are tried."""
    import sklearn.model_selection

    from mtlearn.probes import _grouped_folds

    monkeypatch.setattr(sklearn.model_selection, "StratifiedGroupKFold", LopsidedFolds)
    monkeypatch.setattr(LopsidedFolds, "good_from", 5)
    monkeypatch.setattr(LopsidedFolds, "tried", [])
    y = np.array([0, 1] * 10)
    splits = _grouped_folds(y, np.arange(20), 5, seed=3)
    assert LopsidedFolds.tried == [3, 4, 5]  # the first seed whose folds all hold both classes is taken
    assert [te.tolist() for _, te in splits] == [list(range(k, 20, 5)) for k in range(5)]


def test_grouped_folds_keep_patients_apart_and_hold_every_class():
    """scikit-learn's own splitter, through cross_validated_probe's choice: 10 patients of 3 images each."""
    from mtlearn.probes import _grouped_folds

    groups = np.repeat(np.arange(10), 3)
    y = np.repeat(np.arange(10) % 2, 3)  # a patient's images share the label
    splits = _grouped_folds(y, groups, 5, seed=0)
    assert len(splits) == 5 and all(set(y[te]) == {0, 1} for _, te in splits)
    assert all(not set(groups[tr]) & set(groups[te]) for tr, te in splits)  # no patient on both sides
    assert sorted(np.concatenate([te for _, te in splits]).tolist()) == list(range(30))  # each image tested once


def test_grouped_folds_that_always_miss_a_class_are_refused(monkeypatch):
    """When no shuffle gives every test fold every class, the probe is refused, naming the first gap."""
    import sklearn.model_selection

    monkeypatch.setattr(sklearn.model_selection, "StratifiedGroupKFold", LopsidedFolds)
    monkeypatch.setattr(LopsidedFolds, "tried", [])
    y = np.array([0, 1] * 10)
    with pytest.raises(ValueError, match=r"test fold 1 of 5 holds no item of class 1 \(nor did the folds of the next "
                                         r"19 seeds hold every class\): .*pass fewer folds"):
        cross_validated_probe(np.random.default_rng(0).normal(size=(20, 3)), y, folds=5, seed=7, groups=np.arange(20))
    assert LopsidedFolds.tried == list(range(7, 27))
    monkeypatch.setattr(LopsidedFolds, "flip_odd", True)  # the gap of the caller's own seed is the one named
    with pytest.raises(ValueError, match=r"test fold 1 of 5 holds no item of class 0 \(nor did"):
        cross_validated_probe(np.random.default_rng(0).normal(size=(20, 3)), y, folds=5, seed=7, groups=np.arange(20))
    monkeypatch.setattr(LopsidedFolds, "tried", [])
    with pytest.raises(ValueError, match=r"holds no item"):  # scikit-learn takes random states below 2**32 only
        cross_validated_probe(np.random.default_rng(0).normal(size=(20, 3)), y, folds=5, seed=2**32 - 1,
                              groups=np.arange(20))
    assert LopsidedFolds.tried[:3] == [2**32 - 1, 0, 1]


def test_cross_validated_probe_names_a_length_mismatch():
    features, coded, _ = synthetic_features(n=20)
    with pytest.raises(ValueError, match=r"same N, got features \(20, 16\) and labels \(15,\)"):
        cross_validated_probe(features, coded[:15])


def test_cross_validated_probe_refuses_a_class_rarer_than_the_folds():
    """37 of one class, 3 of the other, 5 folds: two test folds held no item of the rare class and scored
    the common one alone; noise features read 0.74 against a chance of 0.5."""
    features = np.random.default_rng(0).normal(size=(40, 4))
    y = np.r_[np.zeros(37, int), np.ones(3, int)]
    with pytest.raises(ValueError, match=r"class 1 has 3 item\(s\), fewer than folds=5: .*pass folds=3 or fewer"):
        cross_validated_probe(features, y)
    assert 0 <= cross_validated_probe(features, y, folds=3)["balanced_accuracy"] <= 1
    with pytest.raises(ValueError, match=r"class 1 has 1 item\(s\).*; probe more images$"):
        cross_validated_probe(features, np.r_[np.zeros(39, int), 1])  # was: "only [0] in y_train"
    with pytest.raises(ValueError, match=r"at least two classes in y, got only \[0\]"):
        cross_validated_probe(features, np.zeros(40, int))
    with pytest.raises(ValueError, match=r"folds must be an int >= 2, got 1"):
        cross_validated_probe(features, y, folds=1)


class TinyData(Dataset):
    """Images whose mean encodes "coded"; "noise" is unrelated to the image."""

    def __init__(self, n: int = 120, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.coded = torch.randint(0, 2, (n,), generator=g)
        self.noise = torch.randint(0, 2, (n,), generator=g)
        self.images = torch.randn(n, 1, 8, 8, generator=g) + 2.0 * self.coded[:, None, None, None]

    def __len__(self):
        return len(self.coded)

    def __getitem__(self, i):
        return {"image": self.images[i], "coded": int(self.coded[i]), "noise": int(self.noise[i]), "id": f"x{i}",
                "mask": torch.zeros(1, 8, 8)}


def test_extract_features_pools_maps_and_collects_integer_labels():
    loader = DataLoader(TinyData(50), batch_size=16)
    encoder = nn.Conv2d(1, 4, 3, padding=1)
    features, labels = extract_features(encoder, loader, device="cpu")
    assert features.shape == (50, 4) and features.dtype == np.float32
    assert set(labels) == {"coded", "noise"}  # "id" (strings) and "mask" (floats) are not labels
    assert labels["coded"].shape == (50,) and labels["coded"].dtype == np.int64
    assert encoder.training  # the module's mode is restored


class ScoredData(TinyData):
    """TinyData plus "score", a float per item: a measurement, not a class label."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "score": 0.3 * i}


def test_extract_features_does_not_collect_float_values_as_labels():
    # a 1-D float batch key (collated to float64) would be cast to int64 and probed as if it were classes
    loader = DataLoader(ScoredData(20), batch_size=8)
    _, labels = extract_features(lambda x: x.mean(dim=(2, 3)), loader, device="cpu")
    assert set(labels) == {"coded", "noise"}


def test_extract_features_collects_only_one_label_per_image_and_as_int64():
    """An integer mask (B, H, W) is no label of the image; a bool flag is one, returned as int64 like the rest."""
    batches = [{"image": torch.zeros(4, 1, 8, 8), "label": torch.tensor([0, 1, 2, 1]),
                "mask": torch.zeros(4, 8, 8, dtype=torch.long), "flag": torch.tensor([True, False, True, True])}]
    _, labels = extract_features(lambda x: x.mean(dim=(2, 3)), batches, device="cpu")
    assert set(labels) == {"label", "flag"}
    assert labels["flag"].tolist() == [1, 0, 1, 1] and labels["flag"].dtype == np.int64
    _, labels = extract_features(lambda x: x.mean(dim=(2, 3)), batches, device="cpu", label_keys="flag")
    assert labels["flag"].dtype == np.int64


def test_extract_features_leaves_a_frozen_batchnorm_frozen():
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    encoder[1].eval()  # frozen by the user: extracting features must not unfreeze it
    extract_features(encoder, DataLoader(TinyData(8), batch_size=8), device="cpu")
    assert encoder.training and not encoder[1].training


def test_extract_features_moves_the_model_back_where_it_was():
    """The caller's model runs on `device` and then returns to its own device (here both are the CPU:
    the test records the moves, which is what a GPU run would see)."""
    moves = []

    class Tracked(nn.Conv2d):
        def to(self, *args, **kwargs):
            moves.append(torch.device(args[0] if args else kwargs["device"]))
            return super().to(*args, **kwargs)

    extract_features(Tracked(1, 4, 3), DataLoader(TinyData(8), batch_size=8), device="cpu")
    assert moves == [torch.device("cpu"), torch.device("cpu")]  # to the extraction's device, then back


def test_extract_features_takes_functions_and_stage_lists():
    loader = DataLoader(TinyData(20), batch_size=8)
    features, _ = extract_features(lambda x: x.flatten(1), loader, device="cpu", label_keys=("coded",))
    assert features.shape == (20, 64)
    features, _ = extract_features(lambda x: [x, x.mean(dim=(2, 3))], loader, device="cpu", label_keys=("coded",))
    assert features.shape == (20, 1)
    for dtype in (torch.float64, torch.float16):  # an encoder run in double or half: float32 for sklearn, always
        features, _ = extract_features(lambda x: x.to(dtype).flatten(1), loader, device="cpu", label_keys=("coded",))
        assert features.dtype == np.float32
    with pytest.raises(ValueError, match="not in the batch"):
        extract_features(lambda x: x.flatten(1), loader, device="cpu", label_keys=("artifact",))


def test_extract_features_refuses_the_pair_of_encoders_of_net_encode():
    """net.encode returns (features_a, features_b): keeping the last would probe encoder B as if it were A."""
    import mtlearn.disentangle as D

    net = D.build_model("disentangle", D.disentangle_config("smoke"))
    loader = DataLoader(TinyData(8), batch_size=8)
    with pytest.raises(TypeError, match=r"a tuple of 2 .*pick one, e\.g\. lambda x: net\.encode\(x\)\[0\]"):
        extract_features(net.encode, loader, device="cpu", model=net)
    features, _ = extract_features(lambda x: net.encode(x)[0], loader, device="cpu", model=net)
    assert features.shape == (8, net.encoder_a.out_channels)


def test_extract_features_average_pools_the_last_stage():
    data = TinyData(20)
    loader = DataLoader(data, batch_size=8)
    pooled, _ = extract_features(lambda x: x, loader, device="cpu", label_keys=("coded",))
    np.testing.assert_allclose(pooled, data.images.mean(dim=(2, 3)).numpy(), rtol=1e-6)  # (N, 1): image means
    # a list of stages: the last is read (here 2 channels), not the first
    last, _ = extract_features(lambda x: [x, torch.cat([x, -x], dim=1)], loader, device="cpu", label_keys=("coded",))
    means = data.images.mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(last, np.c_[means, -means], rtol=1e-6)


def test_a_function_with_its_model_runs_in_eval_mode():
    loader = DataLoader(TinyData(20), batch_size=8)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    first, _ = extract_features(lambda x: net(x), loader, device="cpu", label_keys=("coded",), model=net)
    again, _ = extract_features(lambda x: net(x), loader, device="cpu", label_keys=("coded",), model=net)
    np.testing.assert_array_equal(first, again)  # running statistics untouched, batch statistics unused
    assert torch.equal(net[1].running_mean, torch.zeros(4)) and net.training  # and the mode restored


def test_probe_matrix_rows_encoders_columns_labels():
    train, test = DataLoader(TinyData(160, seed=0), batch_size=40), DataLoader(TinyData(80, seed=1), batch_size=40)
    encoders = {"mean": lambda x: x.mean(dim=(2, 3)), "flat": lambda x: x.flatten(1)}
    table = probe_matrix(encoders, train, test, label_keys=("coded", "noise"), device="cpu")
    assert list(table.index) == ["mean", "flat"] and list(table.columns) == ["coded", "noise"]
    assert table.loc["mean", "coded"] > 0.9
    assert abs(table.loc["mean", "noise"] - 0.5) < 0.15
    cross_validated = probe_matrix(encoders, train, label_keys=("coded",), device="cpu", folds=3)
    assert cross_validated.loc["mean", "coded"] > 0.9
    with pytest.raises(ValueError, match="encoders is empty"):
        probe_matrix({}, train)


def test_probe_matrix_gives_one_encoder_under_two_names_one_row_twice():
    """Two rows differ by their encoders only: one encoder under two names gets one row twice, the one
    cross_validated_probe gives with the same folds and seed (other folds per row would add split noise
    of a few points, on the noise label here, to every gap the table shows)."""
    train = DataLoader(TinyData(60, seed=0), batch_size=20)

    def flat(x):
        return x.flatten(1)

    table = probe_matrix({"one": flat, "again": flat}, train, label_keys=("noise",), device="cpu", folds=3, seed=4)
    features, labels = extract_features(flat, train, device="cpu", label_keys=("noise",))
    expected = cross_validated_probe(features, labels["noise"], 3, 4)["balanced_accuracy"]
    assert table["noise"].tolist() == pytest.approx([expected, expected])


def test_probe_matrix_errors_name_the_encoder_and_the_label():
    train = DataLoader(TinyData(16), batch_size=8)
    with pytest.raises(ValueError, match=r"^probing encoder 'mean' for 'coded': .*fewer than folds=12"):
        probe_matrix({"mean": lambda x: x.mean(dim=(2, 3))}, train, label_keys=("coded",), device="cpu", folds=12)


def test_probe_matrix_scores_on_the_test_loader():
    # 64 raw pixels for 40 training images: the probe fits the unrelated "noise" label perfectly on its
    # own training set, so only a score on the test loader's features is an honest one
    train, test = DataLoader(TinyData(40, seed=0), batch_size=20), DataLoader(TinyData(40, seed=1), batch_size=20)
    flat = lambda x: x.flatten(1)  # noqa: E731
    f_train, y_train = extract_features(flat, train, device="cpu", label_keys=("noise",))
    f_test, y_test = extract_features(flat, test, device="cpu", label_keys=("noise",))
    expected = linear_probe(f_train, y_train["noise"], f_test, y_test["noise"])["balanced_accuracy"]
    on_train = linear_probe(f_train, y_train["noise"], f_train, y_train["noise"])["balanced_accuracy"]
    assert on_train == 1.0 and expected < 0.8  # the two differ: the check below can tell them apart
    table = probe_matrix({"flat": flat}, train, test, label_keys=("noise",), device="cpu")
    assert table.loc["flat", "noise"] == pytest.approx(expected)


class WholeModel(nn.Module):
    """Stands in for a DisentangleNet passed where an encoder is expected: its forward returns a dict."""

    def __init__(self):
        super().__init__()
        self.encoder_a = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        features = self.encoder_a(x)
        return {"logits_a": features.mean(dim=(2, 3)), "features_a": features}


def test_probe_matrix_names_a_model_that_returns_a_dict():
    train = DataLoader(TinyData(16), batch_size=8)
    with pytest.raises(TypeError, match=r"feature tensor \(B, C, \.\.\.\), e\.g\. model\.encoder_a.*"
                                        r"got a dict with keys \['features_a', 'logits_a'\]"):
        probe_matrix({"a": WholeModel()}, train, label_keys=("coded",), device="cpu")
    table = probe_matrix({"a": WholeModel().encoder_a}, train, label_keys=("coded",), device="cpu", folds=2)
    assert table.shape == (1, 1)  # the encoder itself is what the probe takes


def test_a_whole_multitask_unet_is_pointed_to_its_own_encoder():
    """The advice named model.encoder_a for every model; a MultiTaskUNet has none: its encoder is model.encoder."""
    from mtlearn.mtl import build_model

    model = build_model("tiny", tasks=("seg", "cls"), image_size=32)
    loader = DataLoader([{"image": torch.randn(1, 32, 32), "label": i % 2} for i in range(4)], batch_size=4)
    with pytest.raises(TypeError, match=r"e\.g\. model\.encoder \(not the whole model\)"):
        extract_features(model, loader, device="cpu")
    features, labels = extract_features(model.encoder, loader, device="cpu")
    assert features.shape[0] == 4 and labels["label"].tolist() == [0, 1, 0, 1]  # the advice, followed
    with pytest.raises(TypeError, match=r"e\.g\. model\.encoder_a of a DisentangleNet, model\.encoder of a "
                                        r"MultiTaskUNet \(not the whole model\)"):  # a function, no model to look at
        extract_features(lambda x: {"features": x}, loader, device="cpu")


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embed_2d_shapes(method):
    features, _, _ = synthetic_features(n=60)
    embedding = embed_2d(features, method=method, seed=0)
    assert embedding.shape == (60, 2) and np.isfinite(embedding).all()


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embed_2d_standardises_the_features_first(method):
    # a feature in other units (x 1000) must not take over the embedding: the result is the same
    features, _, _ = synthetic_features(n=60)
    scaled = features * np.r_[1000.0, np.ones(features.shape[1] - 1)]
    np.testing.assert_allclose(embed_2d(scaled, method=method), embed_2d(features, method=method), atol=1e-4)


def test_embed_2d_tsne_works_on_a_small_set():
    # t-SNE refuses a perplexity >= N: for 12 points the default 30 must come down (to (N - 1) / 3)
    features, _, _ = synthetic_features(n=12)
    embedding = embed_2d(features, method="tsne", seed=0)
    assert embedding.shape == (12, 2) and np.isfinite(embedding).all()


@pytest.mark.parametrize("n, perplexity", [(200, 30.0), (12, 11 / 3)])
def test_embed_2d_tsne_uses_the_usual_perplexity_where_the_set_allows_it(n, perplexity, monkeypatch):
    import sklearn.manifold

    asked = []

    class Recorder(sklearn.manifold.TSNE):
        def __init__(self, **kwargs):
            asked.append(kwargs["perplexity"])
            super().__init__(**kwargs)

    monkeypatch.setattr(sklearn.manifold, "TSNE", Recorder)
    features, _, _ = synthetic_features(n=n, dim=4)
    embed_2d(features, method="tsne")
    assert asked == [pytest.approx(perplexity)]


def test_embed_2d_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        embed_2d(np.zeros((10, 3)), method="umap")
    with pytest.raises(ValueError, match="N >= 3"):
        embed_2d(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"D >= 2, got \(10, 1\)"):  # was scikit-learn's n_components error
        embed_2d(np.random.default_rng(0).normal(size=(10, 1)))
    for method in EMBEDDINGS:  # PCA gave zeros with a warning, t-SNE "array must not contain infs or NaNs"
        with pytest.raises(ValueError, match=r"the features are the same for every image, so there is nothing to "
                                             r"embed \(a collapsed or untrained encoder\?\)"):
            embed_2d(np.ones((10, 4)), method)


def test_plots_have_titles_and_axis_labels():
    features, coded, random = synthetic_features(n=60)
    fig = plot_embedding(embed_2d(features), {"coded": coded, "random": random}, title="toy",
                         class_names={"coded": ("no", "yes")})
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() == "PCA 1" and ax.get_ylabel() == "PCA 2"
    history = {"adv_acc_a": [0.9, 0.7, 0.6], "adv_acc_b": [0.95, 0.8, 0.55], "loss_a": [1.0, 0.5, 0.2]}
    fig = plot_adversary_accuracy(history)
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() == "epoch" and ax.get_ylabel() == "adversary accuracy"
    assert len(ax.get_lines()) == 3  # two adversaries + the chance line
    with pytest.raises(ValueError, match="no adversary accuracies"):
        plot_adversary_accuracy({"loss_a": [1.0]})
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_embedding(features, {"coded": coded})


def test_each_label_of_an_embedding_plot_has_its_own_colours_and_tsne_no_coordinates():
    """Shape and background were both blue and orange, read as if "circle" and "black" were one class."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    features, coded, random = synthetic_features(n=60)
    fig = plot_embedding(embed_2d(features), {"coded": coded, "random": random}, method="t-SNE")
    colours = [{mcolors.to_hex(c.get_facecolor()[0]) for c in ax.collections} for ax in fig.axes]
    assert len(colours[0]) == 2 and len(colours[1]) == 2 and not colours[0] & colours[1]
    assert colours[0] | colours[1] <= {c.lower() for c in OKABE_ITO}  # not tab10's green and red, for instance
    shapes = [{c.get_paths()[0].vertices.round(3).tobytes() for c in ax.collections} for ax in fig.axes]
    assert len(shapes[0]) == len(shapes[1]) == 2  # each class its own marker as well,
    assert not shapes[0] & shapes[1]  # not another label's ("circle" and "black" were both o)
    assert all(not ax.get_xticks().size and not ax.get_yticks().size for ax in fig.axes)  # t-SNE: no scale
    pca = plot_embedding(embed_2d(features), {"coded": coded})
    assert pca.axes[0].get_xticks().size  # PCA's axes are directions of variance: keep their scale
    # embed_2d's own names: notebook 04 translated them with a dict of its own ("pca 1" otherwise)
    tsne = plot_embedding(embed_2d(features), {"coded": coded}, method="tsne")
    assert tsne.axes[0].get_xlabel() == "t-SNE 1" and not tsne.axes[0].get_xticks().size
    assert plot_embedding(embed_2d(features), {"coded": coded}, method="pca").axes[0].get_xlabel() == "PCA 1"
    six = np.arange(60) % 6  # 12 classes in all: more than the 10 colours of the cycle, still none repeated
    many = plot_embedding(embed_2d(features), {"a": six, "b": (six + 1) % 6})
    colours = [{mcolors.to_hex(c.get_facecolor()[0]) for c in ax.collections} for ax in many.axes]
    assert len(colours[0]) == len(colours[1]) == 6 and not colours[0] & colours[1]
    plt.close("all")


def test_adversary_plot_labels_its_reference_line():
    fig = plot_adversary_accuracy({"adv_acc_b": [0.9, 0.7]}, chance=2 / 3, chance_label="label prior")
    reference = fig.axes[0].get_lines()[-1]
    assert reference.get_label() == "label prior" and reference.get_ydata()[0] == pytest.approx(2 / 3)
    fig = plot_adversary_accuracy({"adv_acc_b": [0.6, 0.6], "adv_fit_acc_b": [1.0, 1.0]})
    scored, fitted = fig.axes[0].get_lines()[:2]  # the fit drawn beside its curve, dotted, same colour
    assert list(fitted.get_ydata()) == [1.0, 1.0] and fitted.get_linestyle() == ":"
    assert fitted.get_color() == scored.get_color() and fitted.get_marker() in (None, "None", "")  # lines join them
    fig = plot_adversary_accuracy({"adv_acc_b": [0.6], "adv_fit_acc_b": [1.0]})  # one epoch (smoke)
    assert fig.axes[0].get_lines()[1].get_marker() == "."  # a dotted line of one point was not drawn at all


def test_adversary_plot_says_in_words_which_label_each_adversary_reads_from_which_features():
    """adv_acc_b is adv_b(features_a): task B (background) read from task A's (shape) features."""
    history = {"adv_acc_a": [0.6, 0.6], "adv_acc_b": [0.5, 0.6], "adv_fit_acc_b": [1.0, 0.9],
               "val_adv_acc_b": [0.55, 0.6]}
    ax = plot_adversary_accuracy(history).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == ["shape read from background features (adv_acc_a)",
                          "background read from shape features (adv_acc_b)",
                          "   same, on the batch it was fitted to (adv_fit_acc_b)",
                          "background read from shape features, validation (val_adv_acc_b)"]
    lines = {line.get_label(): line for line in ax.get_lines()}  # one colour per adversary
    assert lines[labels[1]].get_color() == lines[labels[2]].get_color() == lines[labels[3]].get_color()
    assert lines[labels[0]].get_color() != lines[labels[1]].get_color()
    ax = plot_adversary_accuracy({"adv_acc_b": [0.5]}, task_keys=("digit", "colour")).axes[0]
    assert ax.get_legend().get_texts()[0].get_text() == "colour read from digit features (adv_acc_b)"
    for keys in [("shape", "shape"), "ab"]:  # a string of two letters is not two names
        with pytest.raises(ValueError, match="two different label names"):
            plot_adversary_accuracy({"adv_acc_b": [0.5]}, task_keys=keys)


@pytest.mark.parametrize("epochs", [20, 1])  # 1: a smoke run
def test_adversary_plot_has_whole_epochs_and_its_legend_off_the_curves(epochs):
    fig = plot_adversary_accuracy({"adv_acc_a": list(np.linspace(0.6, 0.7, epochs)), "adv_acc_b": [0.6] * epochs})
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # no epoch 2.5 (or 0.96)
    assert ax.get_xlim() == (0.5, epochs + 0.5)  # half an epoch either side: one epoch is no empty range
    assert ax.get_ylim()[0] == 0  # a chance level of 1/3 (three classes) and a failing adversary stay in view
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 < ax.get_window_extent().y0  # below the axes


def test_plot_probe_matrix_annotates_every_cell():
    table = pd.DataFrame({"shape": [1.0, 0.98], "background": [1.0, 0.55]}, index=["shared", "disentangle A"])
    fig = plot_probe_matrix(table, title="probes")
    ax = fig.axes[0]
    assert ax.get_title() == "probes" and ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.texts] == ["1.00", "1.00", "0.98", "0.55"]  # row by row
    assert [t.get_text() for t in ax.get_xticklabels()] == ["shape", "background"]  # columns: labels
    assert [t.get_text() for t in ax.get_yticklabels()] == ["shared", "disentangle A"]
    with pytest.raises(ValueError, match="non-empty"):
        plot_probe_matrix(pd.DataFrame())
    ax = plot_probe_matrix({"shared": {"shape": 1.0, "background": 0.9}}).axes[0]  # a dict of dicts: a TypeError
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.90"] and ax.get_yticklabels()[0].get_text() == "shared"
    with pytest.raises(TypeError, match=r"table must be a DataFrame as probe_matrix returns .*got a ndarray"):
        plot_probe_matrix(np.ones((2, 2)))  # no names for its rows and columns


# ------------------------------------------------------------------------------------------ pinned by mutation


def test_probe_matrix_runs_a_function_encoder_with_its_model_in_eval_mode():
    """Without model= reaching extract_features, BatchNorm ran in training mode: batch statistics, and the
    studied network's running statistics overwritten."""
    loader = DataLoader(TinyData(40), batch_size=8)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    probe_matrix({"f": lambda x: net(x).mean((2, 3))}, loader, model=net, label_keys=("coded",), folds=2, device="cpu")
    assert torch.equal(net[1].running_mean, torch.zeros(4)) and net.training


def test_probe_matrix_uses_its_seed_for_the_folds():
    loader = DataLoader(TinyData(90), batch_size=30)

    def flat(x):  # 64 raw pixels: the noise label's score depends on the folds
        return x.flatten(1)

    features, labels = extract_features(flat, loader, device="cpu", label_keys=("noise",))
    for seed in (0, 5):
        table = probe_matrix({"flat": flat}, loader, label_keys=("noise",), folds=3, seed=seed, device="cpu")
        expected = cross_validated_probe(features, labels["noise"], 3, seed=seed)["balanced_accuracy"]
        assert table.loc["flat", "noise"] == pytest.approx(expected)


def test_linear_probe_passes_its_regularisation_to_the_regression(monkeypatch):
    import sklearn.linear_model

    seen = []

    class Recording(sklearn.linear_model.LogisticRegression):
        def __init__(self, **kwargs):
            seen.append({k: kwargs.get(k) for k in ("C", "max_iter")})
            super().__init__(**kwargs)

    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", Recording)
    features, y = synthetic_features(n=60)[:2]
    linear_probe(features, y, features, y, C=0.25, max_iter=321)
    assert seen == [{"C": 0.25, "max_iter": 321}]


def test_plots_name_the_classes_and_start_the_colour_scale_at_chance():
    embedding, labels = np.random.default_rng(0).normal(size=(20, 2)), {"coded": np.array([0, 1] * 10)}
    fig = plot_embedding(embedding, labels, class_names={"coded": ["no", "yes"]})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["coded = no", "coded = yes"]
    table = pd.DataFrame({"shape": [1.0, 0.9], "background": [0.55, 1.0]}, index=["A", "shared"])
    fig = plot_probe_matrix(table, chance=0.5)
    assert fig.axes[0].images[0].get_clim() == (0.5, 1.0)


def test_linear_probe_refuses_a_test_class_the_training_set_lacks():
    """Class 2 only in the test set: it can never be predicted, and chance was reported as 1/2, not 1/3."""
    features, y, _ = synthetic_features(60)
    with pytest.raises(ValueError, match=r"y_test holds class\(es\) \[2\] that y_train lacks.*train classes: \[0, 1\]"):
        linear_probe(features[:40], y[:40], features[40:], np.r_[y[40:50], np.full(10, 2)])


def test_linear_probe_refuses_a_test_set_without_one_of_the_classes():
    """A test set of class 0 only (e.g. the "unseen" split, circles on black): balanced accuracy averaged
    the classes present, so uninformative features predicting class 0 scored 1.0 against chance 0.5."""
    features, y, _ = synthetic_features(60)
    with pytest.raises(ValueError, match=r"y_test has no item of class\(es\) \[1\] \(train classes: \[0, 1\]\)"):
        linear_probe(np.zeros((40, 3)), y[:40], np.zeros((20, 3)), np.zeros(20, int))
    assert linear_probe(features[:40], y[:40], features[40:], y[40:])["chance"] == 0.5  # both classes: scored


def test_a_single_label_name_is_one_label_not_its_letters():
    loader = DataLoader(TinyData(40), batch_size=20)
    _, labels = extract_features(nn.Conv2d(1, 4, 3, padding=1), loader, device="cpu", label_keys="coded")
    assert list(labels) == ["coded"]  # was: "label 'c' is not in the batch"
    table = probe_matrix({"mean": lambda x: x.mean(dim=(2, 3))}, loader, label_keys="coded", device="cpu", folds=2)
    assert list(table.columns) == ["coded"]
    for bad in ((), ("coded", 3)):
        with pytest.raises(ValueError, match=r"label_keys must be a label name or a tuple of them"):
            probe_matrix({"mean": lambda x: x.mean(dim=(2, 3))}, loader, label_keys=bad, device="cpu")


def test_probe_matrix_cross_validates_every_encoder_on_the_same_folds():
    """A shuffling loader gave every row other items in each fold: the rows were not comparable."""
    data = TinyData(60)
    encoders = {"mean": lambda x: x.mean(dim=(2, 3)), "flat": lambda x: x.flatten(1)}
    with pytest.raises(ValueError, match=r"train_loader shuffles \(shuffle=True, or a random sampler\).*pass a "
                                          r"loader with shuffle=False"):
        probe_matrix(encoders, DataLoader(data, batch_size=20, shuffle=True), label_keys="coded", device="cpu")

    class Reshuffled:  # a loader that hides its sampler: caught by its labels' order
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.passes))
            return iter(DataLoader(torch.utils.data.Subset(data, order.tolist()), batch_size=20))

    with pytest.raises(ValueError, match=r"gave encoder 'flat' its items in another order than the first encoder"):
        probe_matrix(encoders, Reshuffled(), label_keys="coded", device="cpu")
    test = DataLoader(TinyData(40, seed=1), batch_size=20)  # scored on a test set, the training order does not matter
    assert probe_matrix(encoders, DataLoader(data, batch_size=20, shuffle=True), test, label_keys="coded",
                        device="cpu").shape == (2, 1)


def test_plot_embedding_refuses_labels_of_another_length():
    """A label array of another length raised NumPy's "boolean index did not match" (or, one the same
    length as another split's, would colour the points by other images' labels)."""
    from mtlearn.probes import plot_embedding

    with pytest.raises(ValueError, match=r"labels must be one \(N,\) array per name with N = 5 .*\{'shape': 4\}"):
        plot_embedding(np.zeros((5, 2)), {"background": np.zeros(5, int), "shape": np.zeros(4, int)})
    with pytest.raises(TypeError, match=r"labels must be a dict \{label name: \(N,\) ints\}, got a ndarray; name it"):
        plot_embedding(np.zeros((5, 2)), np.zeros(5, int))  # "'numpy.ndarray' object has no attribute 'items'"
    import matplotlib.pyplot as plt

    plt.close("all")


def test_plot_embedding_names_classes_it_cannot_name_and_lets_string_labels_name_themselves():
    """Two names for three classes was an IndexError while drawing; string labels a TypeError ("list indices")."""
    import matplotlib.pyplot as plt

    from mtlearn.probes import plot_embedding

    points = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"class_names\['label'\] names 2 classes, but 'label' holds the classes "
                                         r"\[0, 1, 2\]; give one name per class"):
        plot_embedding(points, {"label": np.array([0, 1, 2])}, class_names={"label": ["benign", "malignant"]})
    with pytest.raises(TypeError, match=r"class_names must be a dict \{label name: class names\}, got a list"):
        plot_embedding(points, {"label": np.array([0, 1, 0])}, class_names=["benign", "malignant"])
    fig = plot_embedding(points, {"label": np.array(["benign", "malignant", "benign"])},
                         class_names={"label": ["benign", "malignant"]})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["label = benign", "label = malignant"]
    plt.close("all")


def test_a_label_named_twice_is_refused_not_collected_twice():
    loader = DataLoader(TinyData(40), batch_size=20)
    with pytest.raises(ValueError, match=r"label_keys names \['coded'\] more than once"):
        probe_matrix({"mean": lambda x: x.mean(dim=(2, 3))}, loader, label_keys=("coded", "coded"), device="cpu")


def test_float_labels_become_classes_only_when_whole():
    loader = DataLoader(ScoredData(20), batch_size=8)  # "score" is 0.3 * i: not classes
    with pytest.raises(ValueError, match=r"label 'score' must be whole numbers \(class indices\), "
                                         r"got \[0.3, 0.6, 0.899"):
        extract_features(lambda x: x.mean(dim=(2, 3)), loader, device="cpu", label_keys=("coded", "score"))
    batches = [{"image": torch.zeros(4, 1, 8, 8), "flag": torch.tensor([0.0, 1.0, 1.0, 0.0])}]  # 0/1 read as floats
    _, labels = extract_features(lambda x: x.mean(dim=(2, 3)), batches, device="cpu", label_keys="flag")
    assert labels["flag"].tolist() == [0, 1, 1, 0] and labels["flag"].dtype == np.int64
    batches[0]["flag"] = torch.tensor([0.0, 1.0, float("nan"), 0.0])  # was class -2**63, with a cast warning
    with pytest.raises(ValueError, match=r"label 'flag' must be whole numbers \(class indices\), got \[nan\]"):
        extract_features(lambda x: x.mean(dim=(2, 3)), batches, device="cpu", label_keys="flag")


def test_probes_name_nan_labels():
    features, coded, _ = synthetic_features(n=60)
    y = coded.astype(float)
    y[7] = np.nan  # was "class nan has 0 item(s)... probe more images": y == nan is never true
    with pytest.raises(ValueError, match=r"label 'y' must be whole numbers \(class indices\), got \[nan\]"):
        cross_validated_probe(features, y, folds=2)
    with pytest.raises(ValueError, match=r"label 'y_train' must be whole numbers \(class indices\), got \[nan\]"):
        linear_probe(features[:40], y[:40], features[40:], coded[40:])
    soft = coded[40:].astype(float)
    soft[3] = 0.7  # would be class 0
    with pytest.raises(ValueError, match=r"label 'y_test' must be whole numbers \(class indices\), got \[0.7\]"):
        linear_probe(features[:40], coded[:40], features[40:], soft)
    y[7] = np.inf  # NaN != NaN caught it; inf is whole to np.round, and would be cast to a garbage class
    with pytest.raises(ValueError, match=r"label 'y' must be whole numbers \(class indices\), got \[inf\]"):
        cross_validated_probe(features, y, folds=2)
    names = np.where(coded == 1, "benign", "malignant")  # class names are classes to scikit-learn as they are
    assert cross_validated_probe(features, names, folds=2)["balanced_accuracy"] > 0.9
    whole = cross_validated_probe(features, coded.astype(float), folds=2)
    assert whole == cross_validated_probe(features, coded, folds=2)


def test_probes_and_embeddings_take_tensors_as_a_model_returns_them():
    """bf16 features ("unsupported ScalarType BFloat16") and features that require grad failed in np.asarray."""
    features, coded, _ = synthetic_features(n=120)
    x, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(coded)
    reference = linear_probe(x[:80].numpy(), y[:80].numpy(), x[80:].numpy(), y[80:].numpy())
    for tensor in (x.bfloat16(), x.clone().requires_grad_()):
        probed = linear_probe(tensor[:80], y[:80], tensor[80:], y[80:])
        assert probed["balanced_accuracy"] == pytest.approx(reference["balanced_accuracy"], abs=0.05)
        assert cross_validated_probe(tensor, y, folds=3)["balanced_accuracy"] > 0.9
        assert embed_2d(tensor).shape == (120, 2)


def test_as_array_widens_half_precision_only_and_embed_2d_works_in_float64():
    from mtlearn.probes import as_array

    assert as_array(torch.zeros(2, dtype=torch.float64)).dtype == np.float64  # not cut to float32
    assert as_array(torch.zeros(2, dtype=torch.bfloat16)).dtype == np.float32
    assert as_array(torch.zeros(2, dtype=torch.int64)).dtype == np.int64
    features, _, _ = synthetic_features(n=30)
    assert embed_2d(torch.as_tensor(features).bfloat16()).dtype == np.float64
