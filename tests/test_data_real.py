"""load_dataset on fake copies of each real dataset (tests/fixtures_real.py): quirks, splits, errors."""

import re
import warnings

import numpy as np
import pytest
import torch

from mtlearn.data import SPLITS, LayoutError, ShapesBackground, SyntheticUltrasound, load_dataset
from mtlearn.data.splits import SPLIT_FRACTIONS, split_by_group
from tests.fixtures_real import (
    make_breastmnist, make_bus_bra, make_bus_uclm, make_busi, make_busi_npz, random_image, save_png,
)

SIZE = 32  # image_size for the tests: the fixtures are 40 x 48


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    root = tmp_path_factory.mktemp("busi")
    return root, make_busi(root)


def by_id(dataset):
    return {dataset[i]["id"]: dataset[i] for i in range(len(dataset))}


def expected_mask(mask: np.ndarray) -> torch.Tensor:
    """What a (40, 48) fixture mask should become at SIZE (nearest-neighbour resize)."""
    rows = (np.arange(SIZE) * mask.shape[0] / SIZE).astype(int)
    cols = (np.arange(SIZE) * mask.shape[1] / SIZE).astype(int)
    return torch.from_numpy(mask[np.ix_(rows, cols)].astype(np.float32))


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / ((a + b) > 0).sum())


def assert_class_shares(split_of, groups, labels, fractions=SPLIT_FRACTIONS):
    """Each split holds its share of each class, off by less than its largest group (groups of one label).

    split_by_group deals a class's groups out in order and a group joins the split in which its
    middle item falls, so each edge of a split is off by at most half a group (with single images,
    the shares come out exact: 10 images give 7, 1, 2).
    """
    split_of, groups, labels = np.asarray(split_of), np.asarray(groups), np.asarray(labels)
    total = sum(share for _, share in fractions)
    for label in np.unique(labels):
        in_class = labels == label
        largest = max(np.sum(groups == g) for g in np.unique(groups[in_class]))
        for name, share in fractions:
            count = np.sum(in_class & (split_of == name))
            expected = share / total * in_class.sum()
            assert abs(count - expected) < largest, f"class {label}: {count} items in {name}, expected {expected:g}"


# --------------------------------------------------------------------------------------------------
# BUSI


def test_busi_quirks(busi):
    root, info = busi
    items = by_id(load_dataset("busi", root=root, split="all", image_size=SIZE))
    # names with spaces and parentheses are kept as ids; "benign (99)" has no mask and is skipped
    assert "benign (1)" in items and "normal (10)" in items and "benign (99)" not in items
    for stem, item in items.items():
        assert item["image"].shape == item["mask"].shape == (1, SIZE, SIZE)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert iou(item["mask"][0], expected_mask(info["masks"][stem])) > 0.9 if info["masks"][stem].any() else True
    # _mask.png, _mask_1.png and _mask_2.png (left, middle, right part) are OR-merged into the whole
    # lesion, and no extra mask is taken for an image of its own
    assert torch.equal(items["benign (1)"]["mask"][0], expected_mask(info["masks"]["benign (1)"]))
    assert not any("_mask" in stem for stem in items)
    # RGB and RGBA masks are binarised, not dropped
    assert items["benign (2)"]["mask"].sum() > 0 and items["malignant (1)"]["mask"].sum() > 0
    # normal images: empty masks, also where the mask file is missing
    assert all(items[f"normal ({n})"]["mask"].sum() == 0 for n in range(1, 11))
    assert [items[s]["label"] for s in ("normal (1)", "benign (1)", "malignant (1)")] == [0, 1, 2]


def test_busi_problems_are_reported(busi):
    root, _ = busi
    dataset = load_dataset("busi", root=root, split="all", image_size=SIZE)
    assert dataset.class_names == ("normal", "benign", "malignant")
    assert any("benign (99)" in note for note in dataset.problems)
    assert not any("_mask" in note for note in dataset.problems)  # every mask file found its image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_busi_splits_deterministic_disjoint_and_duplicate_aware(busi, seed):
    root, _ = busi
    ids = {split: [r.id for r in load_dataset("busi", root=root, split=split, seed=seed).records] for split in SPLITS}
    again = [r.id for r in load_dataset("busi", root=root, split="train", seed=seed).records]
    assert ids["train"] == again
    parts = [set(ids[s]) for s in ("train", "val", "test")]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(ids["all"])
    # the near-duplicate pair always lands in the same split
    assert [("benign (3)" in p) for p in parts] == [("benign (4)" in p) for p in parts]
    groups = {r.id: r.group for r in load_dataset("busi", root=root, split="all").records}
    assert groups["benign (3)"] == groups["benign (4)"] and len(set(groups.values())) == len(groups) - 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_busi_splits_are_7_1_2_within_each_class(busi, seed):
    root, _ = busi
    records = load_dataset("busi", root=root, split="all").records
    split_of = {r.id: s for s in ("train", "val", "test")
                for r in load_dataset("busi", root=root, split=s, seed=seed).records}
    # 10 images per class: 7 train, 1 val, 2 test, give or take the near-duplicate pair in benign
    assert_class_shares([split_of[r.id] for r in records], [r.group for r in records], [r.label for r in records])


def test_augmentation_moves_image_and_mask_together(tmp_path):
    base = tmp_path / "Dataset_BUSI_with_GT"
    (base / "normal").mkdir(parents=True)  # BUSI's three class folders; this test needs no normal image
    rng = np.random.default_rng(0)
    for class_name in ("benign", "malignant"):
        for n in range(1, 4):
            lesion = np.zeros((40, 48), np.uint8)
            top, left = rng.integers(2, 10, 2)
            lesion[top : top + 24, left : left + 14] = 255  # image == mask, off-centre on purpose
            save_png(base / class_name / f"{class_name} ({n}).png", lesion)
            save_png(base / class_name / f"{class_name} ({n})_mask.png", lesion)
    plain = load_dataset("busi", root=tmp_path, split="all", image_size=48)
    augmented = load_dataset("busi", root=tmp_path, split="all", image_size=48, augment=True)
    torch.manual_seed(3)
    moved = []
    for _ in range(4):
        for i in range(len(augmented)):
            item = augmented[i]
            assert iou((item["image"][0] > 0.5).float(), item["mask"][0]) > 0.8  # still on top of each other
            assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
            moved.append(iou(item["mask"][0], plain[i]["mask"][0]))
    assert min(moved) < 0.5 and max(moved) == 1.0  # some items flipped or rotated away, some untouched


def test_dataloader_workers_draw_their_own_augmentations(tmp_path):
    """Every worker holds a copy of the dataset; each must flip and turn its items its own way."""
    from torch.utils.data import DataLoader

    base = tmp_path / "Dataset_BUSI_with_GT"
    lesion = np.zeros((40, 48), np.uint8)
    lesion[4:28, 6:20] = 255  # off-centre, so every flip and turn shows
    for class_name in ("normal", "benign", "malignant"):
        for n in range(1, 9):
            save_png(base / class_name / f"{class_name} ({n}).png", lesion)
            save_png(base / class_name / f"{class_name} ({n})_mask.png", lesion)
    dataset = load_dataset("busi", root=tmp_path, split="all", image_size=32, augment=True, seed=0)
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)  # batches alternate between the two workers
    batches = [batch["image"] for batch in loader]
    assert len(batches) == 6
    assert not torch.equal(batches[0], batches[1])  # worker 0's first batch vs worker 1's first batch
    torch.manual_seed(0)
    assert all(torch.equal(a, b["image"]) for a, b in zip(batches, DataLoader(dataset, batch_size=4, num_workers=2)))
    # in the main process too, the draws follow torch's generator (what a checkpoint restores)
    torch.manual_seed(1)
    first = [dataset[i]["image"] for i in range(8)]
    torch.manual_seed(1)
    assert all(torch.equal(a, dataset[i]["image"]) for i, a in enumerate(first))
    assert not all(torch.equal(a, dataset[i]["image"]) for i, a in enumerate(first))  # and move on


def test_items_do_not_share_the_cached_tensors(busi):
    root, _ = busi
    dataset = load_dataset("busi", root=root, split="val", image_size=SIZE)
    index = next(i for i in range(len(dataset)) if dataset[i]["mask"].sum() > 0)
    dataset[index]["mask"].zero_()
    dataset[index]["image"].zero_()
    assert dataset[index]["mask"].sum() > 0 and dataset[index]["image"].abs().sum() > 0


def test_in_channels_and_cache(busi, tmp_path):
    root, _ = busi
    rgb = load_dataset("busi", root=root, split="val", image_size=SIZE, in_channels=3)[0]["image"]
    assert rgb.shape == (3, SIZE, SIZE) and torch.equal(rgb[0], rgb[1])
    # a cached item survives the deletion of its files; an uncached one does not
    copy = tmp_path / "copy"
    make_busi(copy, per_class=10)
    cached = load_dataset("busi", root=copy, split="all", image_size=SIZE, cache=True)
    uncached = load_dataset("busi", root=copy, split="all", image_size=SIZE, cache=False)
    first = cached[0]
    cached.records[0].image.unlink()
    assert torch.equal(cached[0]["image"], first["image"])
    with pytest.raises(FileNotFoundError):
        uncached[0]


# --------------------------------------------------------------------------------------------------
# BUS-BRA


@pytest.fixture(scope="module")
def bus_bra(tmp_path_factory):
    root = tmp_path_factory.mktemp("bus_bra")
    return root, make_bus_bra(root)


def test_bus_bra_splits_by_patient(bus_bra):
    root, info = bus_bra
    cases = {s: {r.group for r in load_dataset("bus_bra", root=root, split=s).records} for s in ("train", "val", "test")}
    assert all(cases.values())
    assert not (cases["train"] & cases["val"] or cases["train"] & cases["test"] or cases["val"] & cases["test"])
    assert set.union(*cases.values()) == set(info["cases"].values())
    # test is the official fold 1 (patients 1, 6, 11, 16 in the fixture); fold=2 gives another one
    assert cases["test"] == {"1", "6", "11", "16"}
    assert {r.group for r in load_dataset("bus_bra", root=root, split="test", fold=2).records} == {"2", "7", "12", "17"}
    # the 24 images outside the test fold go 7:1 to train and val, give or take a patient per class
    sizes = {s: len(load_dataset("bus_bra", root=root, split=s).records) for s in ("train", "val")}
    assert abs(sizes["train"] - 24 * 7 / 8) <= 2 * 2 and abs(sizes["val"] - 24 / 8) <= 2 * 2


def test_bus_bra_items(bus_bra):
    root, _ = bus_bra
    dataset = load_dataset("bus_bra", root=root, split="all", image_size=SIZE)
    assert dataset.class_names == ("benign", "malignant") and len(dataset) == 30
    item = by_id(dataset)["bus_0003-l"]  # case 3: malignant; its mask is Masks/mask_0003-l.png
    assert item["label"] == 1 and item["mask"].sum() > 0 and "artifact" not in item


def test_bus_bra_layout_errors(tmp_path):
    info = make_bus_bra(tmp_path, patients=5)
    with pytest.raises(ValueError, match="fold '9'"):
        load_dataset("bus_bra", root=tmp_path, split="test", fold=9)
    (info["base"] / "5-fold-cv.csv").unlink()
    with pytest.raises(LayoutError, match="5-fold-cv.csv.*python -m data_fetch bus_bra --dest"):
        load_dataset("bus_bra", root=tmp_path)
    (info["base"] / "5-fold-cv.csv").write_text("ID;kFold\nbus_0001-l;1\n")  # wrong delimiter
    with pytest.raises(LayoutError, match="lacks the column"):
        load_dataset("bus_bra", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# BUS-UCLM


@pytest.fixture(scope="module")
def bus_uclm(tmp_path_factory):
    root = tmp_path_factory.mktemp("bus_uclm")
    return root, make_bus_uclm(root, patients=20)


def test_bus_uclm_colour_masks_give_class_and_binary_mask(bus_uclm):
    root, info = bus_uclm
    with pytest.warns(UserWarning, match="differ in size"):
        dataset = load_dataset("bus_uclm", root=root, split="all", image_size=SIZE)
    assert dataset.class_names == ("normal", "benign", "malignant")
    for stem, item in by_id(dataset).items():
        truth = info["truth"][stem]
        assert item["label"] == truth["label"]
        assert item["artifact"] == truth["artifact"]  # Doppler or Marks
        assert set(item["mask"].unique().tolist()) <= ({0.0, 1.0} if truth["label"] else {0.0})
        assert (item["mask"].sum() > 0) == (truth["label"] > 0)
        assert torch.equal(item["mask"][0], expected_mask(truth["mask"]))  # the red and the green lesions
    # red beside green is malignant; a dark green (0, 120, 0) lesion is benign, not normal
    assert by_id(dataset)["PAT02_000"]["label"] == 2 and by_id(dataset)["PAT01_000"]["label"] == 1


def test_bus_uclm_info_csv_disagreeing_with_the_mask_colour_is_reported(bus_uclm):
    root, info = bus_uclm
    with pytest.warns(UserWarning, match="differ in size"), \
            pytest.warns(UserWarning, match=r"bus_uclm: 1 note\(s\) on the files, e\.g\. \['PAT03_001: INFO.csv says"):
        dataset = load_dataset("bus_uclm", root=root, split="all", image_size=SIZE)
    assert info["info_disagrees"] == {"PAT03_001": "malignant"}
    # the mask colour wins (it is drawn on the image); the disagreement is noted, only for that image
    assert dataset.problems == ["PAT03_001: INFO.csv says malignant, the mask colour says benign"]
    assert by_id(dataset)["PAT03_001"]["label"] == 1


@pytest.mark.parametrize("colours, label, lesion_pixels", [
    ({(5, 5): (255, 0, 0)}, 2, 100),
    ({(5, 5): (0, 255, 0)}, 1, 100),
    ({(5, 5): (0, 120, 0)}, 1, 100),  # dark green: benign, not normal
    ({(5, 5): (250, 0, 0), (22, 30): (0, 255, 0)}, 2, 200),  # both lesions kept; malignant dominates
    ({(5, 5): (0, 255, 0), (22, 30): (110, 8, 4)}, 2, 200),  # a dim, JPEG-ish red still counts
    ({(5, 5): (6, 3, 0)}, 0, 0),  # compression noise on black is no lesion
], ids=["red", "green", "dark-green", "red-and-green", "dim-red-and-green", "noise"])
def test_bus_uclm_one_colour_rule_gives_class_and_mask(tmp_path, colours, label, lesion_pixels):
    base = tmp_path / "BUS-UCLM"
    mask = np.zeros((40, 48, 3), np.uint8)
    for (top, left), colour in colours.items():
        mask[top : top + 10, left : left + 10] = colour  # 100 pixels each
    save_png(base / "masks" / "P_000.png", mask)
    save_png(base / "images" / "P_000.png", random_image(np.random.default_rng(0)))
    (base / "INFO.csv").write_text("Image;Label;Doppler;Marks\nP_000.png;;0;0\n")
    item = load_dataset("bus_uclm", root=tmp_path, split="all", image_size=(40, 48))[0]
    assert item["label"] == label and item["mask"].sum() == lesion_pixels


def test_bus_uclm_size_mismatch_reported_not_fatal(bus_uclm):
    root, info = bus_uclm
    with pytest.warns(UserWarning, match="PAT00_001"):
        skipped = load_dataset("bus_uclm", root=root, split="all", image_size=SIZE)
    assert skipped.size_mismatches == info["mismatched"] and "PAT00_001" not in by_id(skipped)
    with pytest.warns(UserWarning, match="resized"):
        kept = load_dataset("bus_uclm", root=root, split="all", image_size=SIZE, on_size_mismatch="resize")
    assert by_id(kept)["PAT00_001"]["image"].shape == (1, SIZE, SIZE)
    with pytest.raises(ValueError, match="on_size_mismatch"):
        load_dataset("bus_uclm", root=root, on_size_mismatch="crash")


def test_bus_uclm_splits_by_patient(bus_uclm):
    root, _ = bus_uclm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patients = {s: {r.group for r in load_dataset("bus_uclm", root=root, split=s).records} for s in ("train", "val", "test")}
    assert all(patients.values()) and sum(map(len, patients.values())) == len(set.union(*patients.values()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bus_uclm_patients_never_straddle_splits_and_train_holds_70_percent(bus_uclm, seed):
    root, info = bus_uclm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size mismatch of PAT00_001
        splits = {s: load_dataset("bus_uclm", root=root, split=s, seed=seed).records for s in ("train", "val", "test")}
    # the patient comes from the fixture, not from the loader's own idea of a group
    splits_of_patient = {}
    for name, records in splits.items():
        for r in records:
            splits_of_patient.setdefault(info["truth"][r.id]["patient"], set()).add(name)
    assert len(splits_of_patient) == 20 and all(len(names) == 1 for names in splits_of_patient.values())
    # 59 images of 20 patients in groups of 3: the shares are 7:1:2 give or take one patient per class
    total = sum(map(len, splits.values()))
    for name, share in SPLIT_FRACTIONS:
        assert abs(len(splits[name]) - share * total) <= 3 * 3, (name, len(splits[name]))
        assert {r.label for r in splits[name]} == {0, 1, 2}  # stratified: every split sees every class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_group_deals_7_1_2_of_each_class_and_keeps_groups_whole(seed):
    """About 170 items in groups of 1 to 4, three classes of unequal size: the documented split, directly."""
    rng = np.random.default_rng(100 + seed)
    groups, labels = [], []
    for g, label in enumerate([0] * 35 + [1] * 20 + [2] * 12):  # one label per group
        size = int(rng.integers(1, 5))
        groups += [f"g{g}"] * size
        labels += [label] * size
    split_of = split_by_group(groups, labels, seed=seed)
    assert set(split_of) == {"train", "val", "test"}
    assert all(len(set(split_of[np.asarray(groups) == g])) == 1 for g in set(groups))  # no group straddles
    assert_class_shares(split_of, groups, labels)
    assert split_of.tolist() == split_by_group(groups, labels, seed=seed).tolist()  # deterministic
    # other fractions are honoured too (BUS-BRA splits what its test fold leaves 7:1)
    two_way = (("train", 0.7), ("val", 0.1))
    assert_class_shares(split_by_group(groups, labels, seed=seed, fractions=two_way), groups, labels, two_way)


# --------------------------------------------------------------------------------------------------
# npz datasets


@pytest.mark.parametrize("resolution", [28, 224])
def test_breastmnist_official_splits(tmp_path, resolution):
    path = make_breastmnist(tmp_path, resolution=resolution, counts=(6, 2, 3))
    sizes = {s: len(load_dataset("breastmnist", root=tmp_path, split=s, resolution=resolution)) for s in SPLITS}
    assert sizes == {"train": 6, "val": 2, "test": 3, "all": 11}
    dataset = load_dataset("breastmnist", root=tmp_path, split="test", image_size=28, resolution=resolution)
    item = dataset[0]
    assert dataset.tasks == ("cls",) and "mask" not in item and item["image"].shape == (1, 28, 28)
    # MedMNIST's 0 (malignant) becomes 1, so that a binary metric's positive class is malignant, as elsewhere
    assert dataset.class_names == ("normal_or_benign", "malignant")
    with np.load(path) as raw:
        assert dataset.labels.tolist() == (1 - raw["test_labels"].reshape(-1)).tolist()
    assert item["id"] == "breastmnist-test-0000"


def test_busi_npz(tmp_path):
    make_busi_npz(tmp_path, resolution=128, counts=(5, 2, 3))
    dataset = load_dataset("busi_npz", root=tmp_path, split="val", image_size=SIZE)
    assert len(dataset) == 5 and dataset.labels.tolist() == [0, 0, 1, 1, 1]
    assert set(dataset[0]["mask"].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(LayoutError, match="busi_256.npz.*python -m data_fetch busi_256"):
        load_dataset("busi_npz", root=tmp_path, resolution=256)
    with pytest.raises(ValueError, match="resolution"):
        load_dataset("busi_npz", root=tmp_path, resolution=64)


# --------------------------------------------------------------------------------------------------
# generated datasets through load_dataset


def test_synthetic_splits_are_disjoint_index_ranges():
    splits = {s: load_dataset("synthetic", split=s, image_size=32, num_samples=4, artifact_correlation=1.0) for s in SPLITS}
    assert isinstance(splits["train"], SyntheticUltrasound) and splits["train"].artifact_correlation == 1.0
    ids = {s: [d["id"] for d in splits[s]] for s in SPLITS}
    assert ids["val"][0] == "synthetic-1000000"
    assert len(set(ids["train"] + ids["val"] + ids["test"])) == 12 and ids["all"] == ids["train"] + ids["val"] + ids["test"]
    assert splits["all"].class_names == ("normal", "benign", "malignant")
    assert len(load_dataset("synthetic", split="val")) == 200


def test_shapes_through_load_dataset():
    default = load_dataset("shapes", split="unseen")
    assert isinstance(default, ShapesBackground) and default[0]["image"].shape == (1, 224, 288)
    assert load_dataset("shapes", split="test", image_size=(56, 72))[0]["image"].shape == (1, 56, 72)


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"name": "isic"}, ValueError, "unknown dataset 'isic'.*busi"),
        ({"name": "synthetic", "split": "dev"}, ValueError, "unknown split 'dev'.*train"),
        ({"name": "synthetic", "image_size": 0}, ValueError, "image_size"),
        ({"name": "synthetic", "augment": True}, ValueError, "augment"),
        ({"name": "synthetic", "num_samples": 0}, ValueError, "num_samples"),
        ({"name": "shapes", "in_channels": 3}, ValueError, "in_channels"),
        ({"name": "breastmnist", "resolution": 64}, ValueError, "resolution"),
        ({"name": "bus_bra", "folds": 2}, ValueError, r"bus_bra has no option 'folds'; its options: \['fold'\]"),
        ({"name": "busi", "resolution": 128}, ValueError, "busi has no option 'resolution'.*duplicate_distance"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_dataset(**kwargs)


def test_missing_data_names_the_download_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f'python -m data_fetch bus_uclm --dest "{tmp_path / "nowhere"}"'):
        load_dataset("bus_uclm", root=tmp_path / "nowhere")
    monkeypatch.setenv("MTLEARN_DATA", str(tmp_path))  # default root: <data root>/<folder>
    with pytest.raises(FileNotFoundError, match=r"busi_npz does not exist\. Fetch it with `python -m data_fetch busi_256`"):
        load_dataset("busi_npz", resolution=256)


def test_wrong_layout_names_the_expected_files(tmp_path):
    save_png(tmp_path / "stray.png", random_image(np.random.default_rng(0)))
    for name, expected in [("busi", "Dataset_BUSI_with_GT"), ("bus_bra", "bus_data.csv"), ("bus_uclm", "INFO.csv"),
                           ("breastmnist", "breastmnist.npz")]:
        with pytest.raises(LayoutError, match=expected):
            load_dataset(name, root=tmp_path)


def test_datasets_pickle_for_dataloader_workers(busi):
    """Spawned DataLoader workers (macOS, Windows) receive the dataset pickled."""
    import pickle

    root, _ = busi
    dataset = load_dataset("busi", root=root, split="val", image_size=SIZE, augment=True)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy[0]["id"] == dataset[0]["id"] and copy[0]["image"].shape == (1, SIZE, SIZE)


def test_a_fetched_folder_missing_files_warns(tmp_path):
    """data_fetch's marker lists what it unpacked: a file deleted since is named, a hand-made folder
    (no marker) is not checked."""
    import json

    from data_fetch import completion_marker

    make_busi(tmp_path, per_class=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_dataset("busi", root=tmp_path, split="all")
    assert not [w for w in caught if "missing" in str(w.message)]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    completion_marker(tmp_path, "busi").write_text(json.dumps({"name": "busi", "files": files}))
    (tmp_path / files[0]).unlink()  # e.g. an image deleted by hand after the fetch
    with pytest.warns(UserWarning, match=r"busi: 1 file\(s\) of the download are missing .*e\.g\. "
                      + re.escape(files[0]) + r".*`python -m data_fetch busi --dest"):
        load_dataset("busi", root=tmp_path, split="all")


def test_partial_copies_are_refused_not_loaded(busi, tmp_path):
    import shutil

    root, _ = busi
    copy = tmp_path / "busi"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "Dataset_BUSI_with_GT" / "normal")  # a class folder lost: not a smaller dataset
    with pytest.raises(LayoutError, match="no normal/ folder"):
        load_dataset("busi", root=copy)
    # the archive beside the files but no marker: data_fetch died while unpacking
    shutil.copytree(root, tmp_path / "unpacking", ignore=shutil.ignore_patterns(".*"))
    (tmp_path / "unpacking" / "Dataset_BUSI.zip").write_bytes(b"zip")
    with pytest.raises(LayoutError, match="unpacking did not finish.*python -m data_fetch busi"):
        load_dataset("busi", root=tmp_path / "unpacking")


@pytest.mark.parametrize("name, fix", [
    ("synthetic", r"synthetic has no option 'foo'; its options: \['num_samples', 'class_probs', .*'noise_level'\]"),
    ("shapes", r"shapes has no option 'foo'; its options: none"),
])
def test_generated_datasets_list_their_options(name, fix):
    with pytest.raises(ValueError, match=fix):  # was a bare TypeError from the dataset's constructor
        load_dataset(name, foo=1)


@pytest.mark.parametrize("image_size", [256 / 2, (64, 64.0)])
def test_float_image_size_names_int(image_size):
    with pytest.raises(ValueError, match=r"image_size must be an int.*int\(\.\.\.\)"):  # was "'float' ... not iterable"
        load_dataset("synthetic", image_size=image_size, num_samples=2)
