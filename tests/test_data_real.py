"""load_dataset on fake copies of each real dataset (tests/fixtures_real.py): quirks, splits, errors."""

import dataclasses
import math
import os
import re
import shutil
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlearn.data import (
    SPLITS,
    LayoutError,
    ShapesBackground,
    SyntheticUltrasound,
    load_dataset,
)
from mtlearn.data import real
from mtlearn.data.real import DamagedFileError
from mtlearn.data.splits import (
    DUPLICATE_MAX_DISTANCE,
    SPLIT_FRACTIONS,
    difference_hash,
    duplicate_groups,
    random_subset,
    split_by_group,
)
from tests.fixtures_real import (
    QUIRK_REPORTS,
    box_mask,
    make_breastmnist,
    make_bus_bra,
    make_bus_uclm,
    make_busi,
    make_busi_npz,
    random_image,
    save_png,
)

SIZE = 32  # image_size for the tests: the fixtures are 40 x 48

# The tests about the quirk reports catch them with pytest.warns (which sees ignored warnings too); the
# others need not print them by the dozen.
pytestmark = pytest.mark.filterwarnings(QUIRK_REPORTS)


@pytest.fixture(scope="module")
def busi(tmp_path_factory):
    root = tmp_path_factory.mktemp("busi")
    return root, make_busi(root)


def by_id(dataset):
    return {dataset[i]["id"]: dataset[i] for i in range(len(dataset))}


def expected_mask(mask: np.ndarray) -> torch.Tensor:
    """What a (40, 48) fixture mask should become at SIZE (the source pixel at each output pixel's centre)."""
    rows = ((np.arange(SIZE) + 0.5) * mask.shape[0] / SIZE).astype(int)
    cols = ((np.arange(SIZE) + 0.5) * mask.shape[1] / SIZE).astype(int)
    return torch.from_numpy(mask[np.ix_(rows, cols)].astype(np.float32))


@pytest.mark.parametrize("side", [12, 23, 40])
def test_a_resized_mask_stays_on_its_lesion(side):
    """A square lesion in a 500 px scan, resized to 128 px: the mask lies where the image shows it.

    The image is area-averaged; the mask must take the pixel at each output pixel's centre, not
    each block's top-left one (torch's "nearest"), which shifted it by about half a pixel (mean
    centroid error 0.57 px against 0.33 from rounding alone) and cost the smallest lesions Dice
    down to 0.47 against the lesion as the resized image shows it.
    """
    from mtlearn.data.transforms import resize_image, resize_mask

    grid = torch.stack(torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij"))
    errors, dices = [], []
    for offset in range(8):  # every sub-pixel position of the lesion on the output grid (500/128 ~ 4)
        mask = np.zeros((500, 500), np.float32)
        mask[201 + offset:201 + offset + side, 303 + offset:303 + offset + side] = 1
        image, resized = resize_image(mask, (128, 128))[0], resize_mask(mask, (128, 128))[0]
        centre_image = (grid * image).flatten(1).sum(1) / image.sum()
        centre_mask = (grid * resized).flatten(1).sum(1) / resized.sum()
        errors.append(float((centre_mask - centre_image).abs().max()))
        shown = (image >= 0.5).float()  # the lesion as the resized image shows it
        dices.append(float(2 * (shown * resized).sum() / (shown.sum() + resized.sum())))
    assert np.mean(errors) < 0.4 and min(dices) >= 0.9, (errors, dices)


def test_an_enlarged_image_is_interpolated_not_repeated_in_uneven_blocks():
    """BreastMNIST's 28 px at 128: "area" repeated each pixel 4 or 5 times with an averaged seam between blocks. A
    ramp stays a ramp now (even steps), its mask on the lesion the image shows; shrinking still averages."""
    from mtlearn.data.transforms import resize_image, resize_mask

    ramp = np.tile(np.linspace(0.0, 1.0, 28, dtype=np.float32), (28, 1))
    steps = np.diff(resize_image(ramp, (128, 128))[0, 0].numpy())[16:-16]  # away from the borders
    assert steps.min() > 0 and steps.max() < 1.5 * steps.mean()  # "area": 0 inside a block, a jump at its seam
    lesion = np.zeros((28, 28), np.float32)
    lesion[9:15, 13:21] = 1
    image, mask = resize_image(lesion, (128, 128))[0], resize_mask(lesion, (128, 128))[0]
    assert float(((image >= 0.5).float() != mask).float().mean()) < 0.01  # the mask lies where the image shows it
    assert 0 <= float(image.min()) and float(image.max()) <= 1  # no overshoot (bicubic would)
    speckle = np.random.default_rng(0).random((512, 256)).astype(np.float32)
    blocks = speckle.reshape(128, 4, 64, 4).mean((1, 3))  # shrinking: exactly the 4 x 4 block means, rows and columns
    assert np.allclose(resize_image(speckle, (128, 64))[0].numpy(), blocks, atol=1e-6)
    # one side grows, the other shrinks (28 x 200 at 128 x 128): a flat image stays flat to its edges (a blur
    # padded with zeros darkened them), a ramp along the growing side stays a ramp
    assert np.allclose(resize_image(np.full((28, 200), 0.7, np.float32), (128, 128)).numpy(), 0.7, atol=1e-5)
    ramp = np.tile(np.linspace(0.0, 1.0, 28, dtype=np.float32)[:, None], (1, 200))
    steps = np.diff(resize_image(ramp, (128, 128))[0, :, 64].numpy())[16:-16]
    assert steps.min() > 0 and steps.max() < 1.5 * steps.mean()


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
        if info["masks"][stem].any():
            assert iou(item["mask"][0], expected_mask(info["masks"][stem])) > 0.9, stem
        else:  # a normal image: no lesion
            assert item["mask"].sum() == 0, stem
    # _mask.png, _mask_1.png and _mask_2.png (left, middle, right part) are OR-merged into the whole
    # lesion, and no extra mask is taken for an image of its own
    assert torch.equal(items["benign (1)"]["mask"][0], expected_mask(info["masks"]["benign (1)"]))
    assert not any("_mask" in stem for stem in items)
    # RGB and RGBA masks are binarised, not dropped
    assert items["benign (2)"]["mask"].sum() > 0 and items["malignant (1)"]["mask"].sum() > 0
    # normal images: empty masks, also where the mask file is missing
    assert all(items[f"normal ({n})"]["mask"].sum() == 0 for n in range(1, 11))
    assert [items[s]["label"] for s in ("normal (1)", "benign (1)", "malignant (1)")] == [0, 1, 2]


def test_busi_duplicate_distance_option_sets_the_groups(busi):
    """duplicate_distance reaches the grouping: 64 of 64 bits makes every image a near-duplicate of every other."""
    root, _ = busi
    records = load_dataset("busi", root=root, split="all", duplicate_distance=64).records
    assert len(records) == 30 and len({r.group for r in records}) == 1
    # one group lands whole in one split: the others are empty, and the message names the option, not only a copy
    with pytest.raises(LayoutError, match=r"or duplicate_distance=64 joined them into too few groups of "
                                          r"near-duplicates: the default is 5\)"), \
            pytest.warns(UserWarning, match=r"split\(s\) \['val', 'test'\] got no items"):
        load_dataset("busi", root=root, split="val", duplicate_distance=64)


def test_load_dataset_checks_on_size_mismatch_for_every_dataset_and_warns_of_augmented_evaluation(busi):
    with pytest.raises(ValueError, match=r"on_size_mismatch must be one of .*, got 'bogus'"):
        load_dataset("synthetic", split="train", on_size_mismatch="bogus")  # was accepted without a word
    with pytest.raises(ValueError, match=r"on_size_mismatch must be one of .*, got 'bogus'"):
        load_dataset("shapes", split="unseen", image_size=16, on_size_mismatch="bogus")  # and still was for shapes
    root, _ = busi
    with pytest.warns(UserWarning, match=r"augment=True on the 'test' split: its metrics would be those of randomly "
                                         r"flipped and turned images"):
        load_dataset("busi", root=root, split="test", augment=True)


def test_busi_groups_near_duplicates_up_to_the_default_distance(tmp_path, monkeypatch):
    """Without duplicate_distance, hashes DUPLICATE_MAX_DISTANCE bits apart share a group and one bit more do not
    (a looser default would merge images that are no duplicates, and the splits would follow)."""
    d = DUPLICATE_MAX_DISTANCE
    lesion = np.zeros((40, 48), np.uint8)
    lesion[6:20, 10:30] = 255
    make_small_busi(tmp_path, {f"benign ({n})": lesion for n in (1, 2, 3)})
    # hashes 0, d and d + 1 bits from the first (the last two 2d + 1 apart: no chain joins them)
    hashes = {"benign (1)": np.zeros(64, bool), "benign (2)": np.arange(64) < d, "benign (3)": np.arange(64) >= 63 - d}
    monkeypatch.setattr(real, "_file_hash", lambda path, modified: hashes[path.stem])
    group = {r.id: r.group for r in load_dataset("busi", root=tmp_path, split="all").records}
    assert group["benign (1)"] == group["benign (2)"] != group["benign (3)"]


def test_busi_near_duplicates_follow_an_image_replaced_on_disk(tmp_path):
    """The hashes are remembered per file and modification time: an image overwritten in the same session
    (here with a copy of another) is hashed again, and joins that one's group."""
    lesion = np.zeros((40, 48), np.uint8)
    lesion[6:20, 10:30] = 255
    make_small_busi(tmp_path, {"benign (1)": lesion, "benign (2)": lesion})
    folder = tmp_path / "Dataset_BUSI_with_GT" / "benign"

    def groups():
        records = load_dataset("busi", root=tmp_path, split="all").records
        return len({r.group for r in records if r.id in ("benign (1)", "benign (2)")})

    assert groups() == 2  # two random images
    replaced = folder / "benign (2).png"
    modified = replaced.stat().st_mtime_ns
    replaced.write_bytes((folder / "benign (1).png").read_bytes())
    os.utime(replaced, ns=(modified + 10**9, modified + 10**9))  # a second later, whatever the clock's resolution
    assert groups() == 1


def test_busi_an_image_without_its_mask_is_skipped_in_both_lesion_classes(tmp_path):
    """Only normal images may lack a mask (no lesion); a benign or malignant one without it would train the
    segmentation on an empty mask for an image with a lesion."""
    lesion = np.zeros((40, 48), np.uint8)
    lesion[6:20, 10:30] = 255
    make_small_busi(tmp_path, {f"{c} ({n})": lesion for c in ("benign", "malignant") for n in (1, 2)})
    base = tmp_path / "Dataset_BUSI_with_GT"
    (base / "benign" / "benign (2)_mask.png").unlink()
    (base / "malignant" / "malignant (2)_mask.png").unlink()
    dataset = load_dataset("busi", root=tmp_path, split="all")
    assert sorted(r.id for r in dataset.records) == ["benign (1)", "malignant (1)"]
    assert {"benign (2): no mask file, skipped", "malignant (2): no mask file, skipped"} <= set(dataset.problems)


@pytest.mark.parametrize("mask_shape", [(20, 24), (20, 48), (40, 24)], ids=["both", "height", "width"])
def test_busi_extra_mask_of_another_size_is_a_size_mismatch(tmp_path, mask_shape):
    """Every mask of an image is checked against it, not only the first: an extra _mask_1.png of another size
    would be stretched onto the image (a size that differs in one side only, too)."""
    lesion = np.zeros((40, 48), np.uint8)
    lesion[6:20, 10:30] = 255
    make_small_busi(tmp_path, {"benign (1)": lesion, "malignant (1)": lesion})
    save_png(tmp_path / "Dataset_BUSI_with_GT" / "benign" / "benign (1)_mask_1.png", np.zeros(mask_shape, np.uint8))
    with pytest.warns(UserWarning, match="differ in size"):
        dataset = load_dataset("busi", root=tmp_path, split="all")
    assert dataset.size_mismatches == ["benign (1)"] and [r.id for r in dataset.records] == ["malignant (1)"]


def test_busi_problems_are_reported(busi):
    root, _ = busi
    dataset = load_dataset("busi", root=root, split="all", image_size=SIZE)
    assert dataset.class_names == ("normal", "benign", "malignant")
    assert any("benign (99)" in note for note in dataset.problems)
    assert not any("_mask" in note for note in dataset.problems)  # every mask file found its image


def test_busi_mask_without_its_image_is_noted(tmp_path):
    base = make_busi(tmp_path, per_class=2)["base"]
    save_png(base / "benign" / "benign (7)_mask.png", np.zeros((40, 48), np.uint8))  # its image deleted
    dataset = load_dataset("busi", root=tmp_path, split="all", image_size=SIZE)
    assert "benign (7): mask without image, ignored" in dataset.problems


def test_a_mask_file_of_ones_only_is_lesion_everywhere(tmp_path):
    """A 0/1 mask whose lesion fills the image has the one level 1: it is lesion, not an 8-bit level 1 of 255."""
    base = make_busi(tmp_path, per_class=2)["base"]
    save_png(base / "benign" / "benign (1)_mask.png", np.ones((40, 48), np.uint8))
    for extra in ("_1", "_2"):
        (base / "benign" / f"benign (1)_mask{extra}.png").unlink()
    mask = by_id(load_dataset("busi", root=tmp_path, split="all", image_size=SIZE))["benign (1)"]["mask"]
    assert bool((mask == 1).all())


def test_without_the_cache_each_read_takes_the_file_as_it_is_now(tmp_path):
    base = make_busi(tmp_path, per_class=2)["base"]
    path = base / "benign" / "benign (2).png"
    items = {cache: load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48), cache=cache)
             for cache in (True, False)}
    index = [r.id for r in items[True].records].index("benign (2)")
    before = {cache: dataset[index]["image"] for cache, dataset in items.items()}
    save_png(path, np.full((40, 48), 255, np.uint8), mode="RGB")  # the file changed on disk meanwhile
    assert torch.equal(items[True][index]["image"], before[True])  # kept in memory
    now = items[False][index]["image"]
    assert bool((now == 1).all()) and not torch.equal(before[False], now)


def test_images_are_the_files_grey_levels_in_0_1_area_averaged(busi):
    """"image" is the PNG's grey level / 255: unchanged at the file's own size, and shrunk by averaging
    ("area": each output pixel is the mean of the pixels it covers, so speckle does not alias)."""
    from PIL import Image

    root, info = busi
    path = info["base"] / "benign" / "benign (5).png"
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"), dtype=np.float32) / 255  # (40, 48)
    native = by_id(load_dataset("busi", root=root, split="all", image_size=(40, 48)))["benign (5)"]["image"][0]
    assert native.min() >= 0 and native.max() <= 1 and grey.max() > 0.5
    assert np.allclose(native.numpy(), grey, atol=1e-6)
    half = by_id(load_dataset("busi", root=root, split="all", image_size=(20, 24)))["benign (5)"]["image"][0]
    assert np.allclose(half.numpy(), grey.reshape(20, 2, 24, 2).mean(axis=(1, 3)), atol=1e-5)


def test_images_shrunk_by_four_average_each_block():
    """"area" at any factor: each output pixel is the mean of its whole 4 x 4 block (bilinear would
    take only the middle 2 x 2 of it, and alias the speckle)."""
    from mtlearn.data.transforms import resize_image

    grey = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    resized = resize_image(grey, (10, 12))[0].numpy()
    assert np.allclose(resized, grey.reshape(10, 4, 12, 4).mean(axis=(1, 3)), atol=1e-5)


BAD_RESIZES = [
    ("resize_image", np.zeros((40, 48, 3)), (32, 32), r"resize_image needs a grey \(H, W\) image, got shape "
     r"\(40, 48, 3\): convert it to grey"),  # MONAI: "len(spatial_size) must be greater or equal to ..."
    ("resize_mask", np.zeros((40, 48, 3)), (32, 32), r"resize_mask needs a grey \(H, W\) image"),
    ("resize_image", np.zeros((0, 48)), (32, 32), r"resize_image got an empty image \(shape \(0, 48\)\)"),
    ("resize_mask", np.full((40, 48), 255), (32, 32), r"needs a 0/1 mask, got values \[255\.0\]: pass mask > 0"),
    ("resize_image", np.zeros((40, 48)), (0, 32), r"image_size must be an int or \(H, W\) of ints >= 1, got \(0, 32\)"),
    ("resize_image", np.zeros((40, 48)), (32, 32, 32), r"image_size must be an int or \(H, W\)"),  # a volume
]


@pytest.mark.parametrize("function, picture, size, match", BAD_RESIZES)
def test_resizing_refuses_what_it_cannot_resize(function, picture, size, match):
    from mtlearn.data import transforms

    with pytest.raises(ValueError, match=match):
        getattr(transforms, function)(picture, size)


def test_resizing_takes_an_int_as_a_square_size_as_build_model_does():
    from mtlearn.data.transforms import resize_image, resize_mask

    assert resize_image(np.zeros((40, 48)), 32).shape == resize_mask(np.ones((40, 48), bool), 32).shape == (1, 32, 32)
    assert resize_image(np.zeros((40, 48)), np.int64(32)).shape == (1, 32, 32)  # a NumPy int, as from a sweep


def test_augment_item_refuses_an_image_and_a_mask_of_other_sizes():
    from mtlearn.data.transforms import augment_item, augmentation, random_states, reseed

    image = torch.rand(1, 32, 32)
    for mask in (torch.ones(1, 16, 16), torch.ones(32, 32)):  # returned unaligned / MONAI's "applying transform"
        shape = re.escape(str(tuple(mask.shape)))
        with pytest.raises(ValueError, match=rf"same H, W; got image \(1, 32, 32\) and mask {shape}"):
            augment_item(augmentation(0), image, mask)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got None"):  # a new stream on every run
        augmentation(None)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, got -1"):
        reseed(random_states(augmentation(0)), -1)
    for mask in (torch.ones(1, 32, 32), None):  # an image without its channel axis
        with pytest.raises(ValueError, match=r"needs an image \(C, H, W\).*got image \(32, 32\)"):
            augment_item(augmentation(0), torch.rand(32, 32), mask)
    assert [t.shape for t in augment_item(augmentation(0), image, torch.ones(1, 32, 32))] == [(1, 32, 32)] * 2


def make_small_busi(root, masks: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None) -> None:
    """Dataset_BUSI_with_GT with the three class folders and the given "<stem>": mask arrays, saved as is."""
    rng = np.random.default_rng(1)
    base = root / "Dataset_BUSI_with_GT"
    for class_name in ("normal", "benign", "malignant"):
        (base / class_name).mkdir(parents=True, exist_ok=True)
    for stem, mask in masks.items():
        folder = base / stem.split(" ")[0]
        save_png(folder / f"{stem}.png", (images or {}).get(stem, random_image(rng)))
        save_png(folder / f"{stem}_mask.png", mask)


def test_masks_stored_as_0_1_are_binarised_like_0_255(tmp_path):
    """A mask saved with values 0 and 1 (not 0 and 255) is the same lesion, not an empty mask."""
    lesion = np.zeros((40, 48), np.uint8)
    lesion[6:20, 10:30] = 1
    make_small_busi(tmp_path, {"benign (1)": lesion, "malignant (1)": lesion * 255, "normal (1)": 0 * lesion})
    items = by_id(load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48)))
    for stem in ("benign (1)", "malignant (1)"):
        assert torch.equal(items[stem]["mask"][0], torch.from_numpy(lesion.astype(np.float32))), stem
    assert items["normal (1)"]["mask"].sum() == 0


def test_16_bit_masks_are_read_on_their_own_range_not_clipped_to_8_bits(tmp_path):
    """Pillow's 8-bit conversion clipped every level over 255 to 255 before the threshold: a faint blob (600 of
    65535) and an anti-aliased edge (20000) became lesion."""
    lesion = np.zeros((40, 48), np.uint16)
    lesion[6:20, 10:30] = 65535
    mask = lesion.copy()
    mask[30:34, 30:34] = 600
    mask[20, 10:30] = 20000
    make_small_busi(tmp_path, {"benign (1)": mask, "malignant (1)": (lesion > 0).astype(np.uint16)})
    items = by_id(load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48)))
    for stem in ("benign (1)", "malignant (1)"):  # and 0/1 saved in 16 bits is the same lesion
        assert torch.equal(items[stem]["mask"][0], torch.from_numpy((lesion > 0).astype(np.float32))), stem


def test_a_16_bit_mask_of_8_bit_levels_keeps_the_8_bit_threshold_and_32_bit_masks_their_range(tmp_path):
    """Levels within 0..255 saved in 16 bits (a mask written from a uint16 array) are read as 8-bit ones: the faint
    level 3 is no lesion. A 32-bit mask (mode I, a TIFF) is brought to the 8-bit range as a 16-bit one is."""
    lesion = np.zeros((40, 48), np.uint16)
    lesion[6:20, 10:30] = 255
    noisy = lesion.copy()
    noisy[30:34, 30:34] = 3
    make_small_busi(tmp_path, {"benign (1)": noisy, "malignant (1)": np.zeros((40, 48), np.uint8)})
    wide = (lesion.astype(np.int32) * 257)  # 65535 in the lesion
    wide[20, 10:30] = 20000  # an anti-aliased edge below half the range
    folder = tmp_path / "Dataset_BUSI_with_GT" / "malignant"
    Image.fromarray(wide, mode="I").save(folder / "malignant (1)_mask.png", format="TIFF")  # found by its content
    assert Image.open(folder / "malignant (1)_mask.png").mode == "I"
    items = by_id(load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48)))
    for stem in ("benign (1)", "malignant (1)"):
        assert torch.equal(items[stem]["mask"][0], torch.from_numpy((lesion > 0).astype(np.float32))), stem


def test_an_image_larger_than_pillow_opens_is_named_with_the_way_out(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError came bare: "Image size (182250000 pixels) exceeds limit", no file."""
    make_small_busi(tmp_path, {"benign (1)": np.zeros((40, 48), np.uint8)})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 48 // 3)  # over twice the limit: an error, not a warning
    path = tmp_path / "Dataset_BUSI_with_GT" / "benign" / "benign (1).png"
    with pytest.raises(DamagedFileError, match=re.escape(f"{path} is larger than Pillow opens (Image size (1920 "
                                                         "pixels) exceeds limit") + r".*MAX_IMAGE_PIXELS = None"):
        real._read_image(path)


def test_16_bit_images_keep_their_grey_levels(tmp_path):
    """A 16-bit PNG (values beyond 255) comes out in [0, 1] with its grey levels in order, not clipped
    to white by an 8-bit conversion."""
    raw = (np.arange(40 * 48).reshape(40, 48) * 2).astype(np.uint16)  # 0 .. 3838
    make_small_busi(tmp_path, {"benign (1)": np.zeros((40, 48), np.uint8)}, images={"benign (1)": raw})
    image = load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48))[0]["image"][0].numpy()
    assert image.min() >= 0 and image.max() <= 1
    order = np.argsort(raw, axis=None)
    assert np.all(np.diff(image.ravel()[order]) > 0)  # brighter in the file, brighter in the image


def test_16_bit_images_are_scaled_by_their_own_maximum(tmp_path):
    """Their bit depth is not recorded (a 12-bit scan saved in 16 bits), so the brightest pixel becomes 1,
    not 3838 / 65535 (a nearly black image)."""
    raw = (np.arange(40 * 48).reshape(40, 48) * 2).astype(np.uint16)  # 0 .. 3838
    make_small_busi(tmp_path, {"benign (1)": np.zeros((40, 48), np.uint8)}, images={"benign (1)": raw})
    image = load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48))[0]["image"][0].numpy()
    assert np.allclose(image, raw / raw.max(), atol=1e-6)


def test_hidden_macos_copies_are_not_read_as_images(tmp_path):
    """Zips made on a Mac carry '._<name>' AppleDouble files beside every PNG: not images, not masks."""
    make_busi(tmp_path, per_class=2)
    plain = load_dataset("busi", root=tmp_path, split="all")
    for path in list((tmp_path / "Dataset_BUSI_with_GT").rglob("*.png")):
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    dataset = load_dataset("busi", root=tmp_path, split="all", image_size=SIZE)
    assert [r.id for r in dataset.records] == [r.id for r in plain.records] and dataset.problems == plain.problems
    assert dataset[0]["image"].shape == (1, SIZE, SIZE)


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
    assert groups["benign (4)"] == "cluster-benign (3)"  # named by its first image: later copies do not rename it


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_busi_splits_are_7_1_2_within_each_class(busi, seed):
    root, _ = busi
    records = load_dataset("busi", root=root, split="all").records
    split_of = {r.id: s for s in ("train", "val", "test")
                for r in load_dataset("busi", root=root, split=s, seed=seed).records}
    # 10 images per class: 7 train, 1 val, 2 test, give or take the near-duplicate pair in benign
    assert_class_shares([split_of[r.id] for r in records], [r.group for r in records], [r.label for r in records])


def test_busi_split_sizes_are_7_1_2_of_each_class(busi):
    """10 images per class: 7 train, 1 val, 2 test (benign: the near-duplicate pair counts as one group
    of two, so its class may be off by one)."""
    root, _ = busi
    for seed in (0, 1):
        counts = {s: np.bincount(load_dataset("busi", root=root, split=s, seed=seed).labels, minlength=3)
                  for s in ("train", "val", "test")}
        for label in (0, 2):  # normal (10 single images) and malignant (10)
            assert [counts[s][label] for s in ("train", "val", "test")] == [7, 1, 2], (seed, counts)
        assert abs(counts["train"][1] - 7) <= 1 and counts["train"][1] + counts["val"][1] + counts["test"][1] == 10


def test_seed_chooses_the_split(busi):
    """Another seed deals the groups out differently (and train is not just the first 70 % by name)."""
    root, _ = busi
    trains = {seed: tuple(r.id for r in load_dataset("busi", root=root, split="train", seed=seed).records)
              for seed in range(4)}
    assert len(set(trains.values())) > 1
    groups = [f"g{k:03d}" for k in range(100)]
    by_seed = [split_by_group(groups, [0] * 100, seed=seed).tolist() for seed in range(3)]
    assert by_seed[0] != by_seed[1] and by_seed[1] != by_seed[2]
    assert by_seed[0][:70] != ["train"] * 70  # shuffled, not dealt in sorted order


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


def test_torchrun_ranks_draw_their_own_augmentations(tmp_path, monkeypatch):
    """Every rank seeds torch alike (same seed, same code); the rank must still change the flips and turns,
    or all ranks would augment their i-th items identically."""
    lesion = np.zeros((40, 48), np.uint8)
    lesion[4:28, 6:20] = 255  # off-centre, so every flip and turn shows
    make_small_busi(tmp_path, {"benign (1)": lesion, "malignant (1)": lesion})
    dataset = load_dataset("busi", root=tmp_path, split="all", image_size=32, augment=True)
    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr("mtlearn.data.real.world_and_rank", lambda rank=rank: (2, rank))
        torch.manual_seed(0)
        draws[rank] = [dataset[i % 2]["mask"] for i in range(8)]
    assert not all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))


def _orientation_degrees(mask: torch.Tensor) -> float:
    """Angle of the long axis of a 0/1 (H, W) mask against the horizontal, in (-90, 90]."""
    rows, cols = np.nonzero(mask.numpy())
    cov = np.cov(np.stack([cols, rows]).astype(float))
    return float(np.degrees(0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])))


def test_augmentation_flips_left_right_and_turns_at_most_25_degrees(tmp_path):
    """The paper's augmentation: left-right flips (depth has a direction in ultrasound: never upside
    down) and rotations within +-25 degrees, each with probability 1/2, independently. A thin
    horizontal bar in the upper left must stay in the upper half and within 25 degrees of horizontal;
    the draws must use the whole range and include plain flips and untouched items."""
    bar = np.zeros((48, 48), np.uint8)
    bar[8:12, 4:36] = 255  # 4 x 32, 14 px above and 4.5 px left of the centre
    both = {"benign (1)": bar, "malignant (1)": bar}
    make_small_busi(tmp_path, both, images=both)
    dataset = load_dataset("busi", root=tmp_path, split="all", image_size=48, augment=True)
    plain = torch.from_numpy(bar > 0).float()
    torch.manual_seed(0)
    angles, flipped_only, untouched = [], 0, 0
    for _ in range(60):
        for i in range(len(dataset)):
            mask = dataset[i]["mask"][0]
            assert np.nonzero(mask.numpy())[0].mean() < 24 - 8  # still near the top: no up-down flip
            angles.append(_orientation_degrees(mask))
            flipped_only += torch.equal(mask, plain.flip(-1))
            untouched += torch.equal(mask, plain)
    assert max(abs(a) for a in angles) <= 25 + 3  # (+3: the rotated bar's pixel grid)
    assert max(abs(a) for a in angles) > 20  # the whole +-25 degrees is drawn
    # a quarter each of the 120 draws (30 +- 15; p = 0.3 gives 19 and 54): flip and turn are independent, p = 1/2
    assert 15 < flipped_only < 45 and 15 < untouched < 45


def test_augmentation_fills_the_corners_it_turns_in_with_black(tmp_path):
    """Rotated images get black (0) corners, not copies of the border pixels."""
    white = np.full((40, 48), 255, np.uint8)
    make_small_busi(tmp_path, {"benign (1)": 0 * white, "malignant (1)": 0 * white},
                    images={"benign (1)": white, "malignant (1)": white})
    dataset = load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48), augment=True)
    torch.manual_seed(0)
    turned = [image for image in (dataset[i % 2]["image"][0] for i in range(20)) if image.min() < 1]
    assert turned and all(min(image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]) < 1 for image in turned)
    assert max(int((image == 0).sum()) for image in turned) > 20  # black, where the turn brought nothing in


def test_augmented_items_do_not_share_the_cached_mask(tmp_path):
    lesion = np.zeros((40, 48), np.uint8)
    lesion[4:28, 6:20] = 255
    make_small_busi(tmp_path, {"benign (1)": lesion, "malignant (1)": lesion})
    dataset = load_dataset("busi", root=tmp_path, split="all", image_size=32, augment=True)
    torch.manual_seed(0)
    for _ in range(20):  # about a quarter of the draws neither flip nor turn
        mask = dataset[0]["mask"]
        assert mask.sum() > 0  # the lesion, flipped or turned by at most 25 degrees
        mask.zero_()  # what a user's in-place transform would do: must not reach the next draw


def test_items_do_not_share_the_cached_tensors(busi):
    root, _ = busi
    dataset = load_dataset("busi", root=root, split="val", image_size=SIZE)
    index = next(i for i in range(len(dataset)) if dataset[i]["mask"].sum() > 0)
    dataset[index]["mask"].zero_()
    dataset[index]["image"].zero_()
    assert dataset[index]["mask"].sum() > 0 and dataset[index]["image"].abs().sum() > 0


@pytest.mark.parametrize("index, error, message", [(1.5, TypeError, "index must be an integer, got 1.5"),
                                                   (True, TypeError, "index must be an integer, got True"),
                                                   (-1, IndexError, "index -1 out of range for a dataset of"),
                                                   (10**6, IndexError, "out of range")])
def test_an_index_that_is_not_an_item_number_is_refused(busi, index, error, message):
    """ds[True] and ds[1.5] read item 1, ds[-1] the last one (cached a second time under -1)."""
    root, _ = busi
    with pytest.raises(error, match=message):
        load_dataset("busi", root=root, split="val", image_size=SIZE)[index]


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


def test_real_datasets_refuse_other_channel_counts(busi):
    root, _ = busi
    with pytest.raises(ValueError, match=r"in_channels must be 1 \(grey\) or 3"):
        load_dataset("busi", root=root, split="val", in_channels=2)


def test_the_dataset_class_takes_a_side_as_every_loader_does(busi):
    """UltrasoundDataset is public: image_size=64 was "'int' object is not iterable"."""
    from mtlearn.data.real import UltrasoundDataset

    root, _ = busi
    records = load_dataset("busi", root=root, split="val").records
    dataset = UltrasoundDataset("busi", "val", records, ("normal", "benign", "malignant"), image_size=SIZE)
    assert dataset.image_size == (SIZE, SIZE) and dataset[0]["image"].shape == (1, SIZE, SIZE)


# --------------------------------------------------------------------------------------------------
# BUS-BRA


@pytest.fixture(scope="module")
def bus_bra(tmp_path_factory):
    root = tmp_path_factory.mktemp("bus_bra")
    return root, make_bus_bra(root)


def test_bus_bra_splits_by_patient(bus_bra):
    root, info = bus_bra
    # the patient from the fixture, not from the loader's own idea of a group (split_by_group keeps those whole)
    cases = {s: {info["cases"][r.id] for r in load_dataset("bus_bra", root=root, split=s).records}
             for s in ("train", "val", "test")}
    assert all(cases.values())
    assert not (cases["train"] & cases["val"] or cases["train"] & cases["test"] or cases["val"] & cases["test"])
    assert set.union(*cases.values()) == set(info["cases"].values())
    # test is the official fold 1 (patients 1, 6, 11, 16 in the fixture); fold=2 gives another one
    assert cases["test"] == {"1", "6", "11", "16"}
    assert {info["cases"][r.id] for r in load_dataset("bus_bra", root=root, split="test", fold=2).records} == {
        "2", "7", "12", "17"}
    # the 24 images outside the test fold go 7:1 to train and val, give or take a patient per class
    sizes = {s: len(load_dataset("bus_bra", root=root, split=s).records) for s in ("train", "val")}
    assert abs(sizes["train"] - 24 * 7 / 8) <= 2 * 2 and abs(sizes["val"] - 24 / 8) <= 2 * 2


@pytest.mark.parametrize("seed", [0, 1])
def test_bus_bra_patients_outside_the_test_fold_go_7_to_1_to_train_and_val(tmp_path_factory, seed):
    root = tmp_path_factory.mktemp("bus_bra_80")
    info = make_bus_bra(root, patients=80)  # fold 1: 16 patients; the other 64 split 56 : 8
    patients = {s: {info["cases"][r.id] for r in load_dataset("bus_bra", root=root, split=s, seed=seed).records}
                for s in ("train", "val", "test")}
    assert len(patients["test"]) == 16
    assert abs(len(patients["train"]) - 56) <= 2 and abs(len(patients["val"]) - 8) <= 2


def test_bus_bra_patient_with_any_image_in_the_test_fold_goes_wholly_to_test(tmp_path):
    """Should an official fold list one of a patient's images in another fold, the patient still must
    not straddle train and test: the whole patient goes to test."""
    info = make_bus_bra(tmp_path, patients=10)
    csv_path = info["base"] / "5-fold-cv.csv"
    csv_path.write_text(csv_path.read_text().replace("bus_0002-r,2", "bus_0002-r,1"))  # patient 2: folds 2 and 1
    placed = [(r.id, s) for s in ("train", "val", "test")
              for r in load_dataset("bus_bra", root=tmp_path, split=s).records]
    split_of = dict(placed)
    assert len(split_of) == len(placed) == len(info["cases"])  # every image in exactly one split
    assert split_of["bus_0002-r"] == "test" and split_of["bus_0002-l"] == "test"
    for case in set(info["cases"].values()):
        assert len({split_of[i] for i, c in info["cases"].items() if c == case}) == 1, case


def test_bus_bra_ids_with_spaces_keep_their_fold_and_an_image_in_no_fold_is_noted(tmp_path):
    """A hand-edited "bus_0001-l " fell out of the test fold, into train, without a word; so did an
    image that 5-fold-cv.csv does not list."""
    info = make_bus_bra(tmp_path, patients=10)
    path = info["base"] / "5-fold-cv.csv"
    text = path.read_text().replace("bus_0001-l,1", " bus_0001-l , 1 ")
    path.write_text(text.replace("bus_0006-l,1\n", "").replace("bus_0006-r,1\n", ""))  # patient 6: in no fold
    data = info["base"] / "bus_data.csv"
    data.write_text(data.read_text().replace("bus_0001-l,", "bus_0001-l ,"))  # and in the other file
    with pytest.warns(UserWarning, match="2 note"):
        test = load_dataset("bus_bra", root=tmp_path, split="test", fold=1)
    assert {r.id for r in test.records} == {"bus_0001-l"}
    assert test.problems == [f"bus_0006-{side}: not in 5-fold-cv.csv, so in no test fold (train or val)"
                             for side in "lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rest = [r.id for s in ("train", "val") for r in load_dataset("bus_bra", root=tmp_path, split=s).records]
    assert "bus_0006-l" in rest and "bus_0001-l" not in rest


def test_bus_bra_case_numbers_with_spaces_are_one_patient(tmp_path):
    """" 2" and "2" were two patients, whose images could then land on both sides of a split."""
    info = make_bus_bra(tmp_path, patients=4)
    data = info["base"] / "bus_data.csv"
    data.write_text(data.read_text().replace("bus_0002-r,2,", "bus_0002-r, 2 ,"))
    groups = {r.id: r.group for r in load_dataset("bus_bra", root=tmp_path, split="all").records}
    assert groups["bus_0002-r"] == groups["bus_0002-l"] == "2"
    data.write_text(data.read_text().replace("bus_0003-l,3,", "bus_0003-l,,").replace("bus_0004-l,4,", "bus_0004-l,,"))
    with pytest.warns(UserWarning, match="2 note"):
        dataset = load_dataset("bus_bra", root=tmp_path, split="all")
    groups = {r.id: r.group for r in dataset.records}  # two images without a Case were one patient ""
    assert groups["bus_0003-l"] == "bus_0003-l" and groups["bus_0004-l"] == "bus_0004-l"
    assert "bus_0003-l: no Case (patient) in bus_data.csv, a patient of its own" in dataset.problems


def test_bus_bra_blank_rows_of_the_fold_list_are_skipped_not_the_default_test_fold(tmp_path):
    """A spreadsheet's trailing "," row made "" the first fold name: the default test split was empty, and the
    test patients trained."""
    info = make_bus_bra(tmp_path, patients=10)
    path = info["base"] / "5-fold-cv.csv"
    before = [r.id for r in load_dataset("bus_bra", root=tmp_path, split="test").records]
    path.write_text(path.read_text() + ",\n")
    with pytest.warns(UserWarning, match="1 note"):
        test = load_dataset("bus_bra", root=tmp_path, split="test")
    assert [r.id for r in test.records] == before and len(before) > 0  # fold 1, as without the blank row
    assert test.problems == [f"5-fold-cv.csv row {len(info['cases']) + 1} (empty lines not counted): no ID or no "
                             "kFold, skipped"]
    path.write_text("ID,kFold\n,\n,\n")
    with pytest.raises(DamagedFileError, match=r"5-fold-cv.csv gives no image a fold"):
        load_dataset("bus_bra", root=tmp_path, split="test")


def test_png_files_named_in_capitals_are_found_by_their_csv_or_image_name(tmp_path):
    """The folders are listed whatever the extension's case; the files named from a CSV row (BUS-BRA's
    image and mask) or from the image (BUS-UCLM's mask) were looked for as .png only."""
    info = make_bus_bra(tmp_path / "bra", patients=5)
    for path in (info["base"] / "Images" / "bus_0002-l.png", info["base"] / "Masks" / "mask_0003-l.png"):
        path.rename(path.with_suffix(".PNG"))
    bra = load_dataset("bus_bra", root=tmp_path / "bra", split="all")
    assert len(bra) == 7 and not bra.problems
    uclm = make_bus_uclm(tmp_path / "uclm", patients=4)
    mask = uclm["base"] / "masks" / "PAT01_001.png"
    mask.rename(mask.with_suffix(".PNG"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PAT00_001's size mismatch
        dataset = load_dataset("bus_uclm", root=tmp_path / "uclm", split="all")
    assert "PAT01_001" in {r.id for r in dataset.records}
    assert not [p for p in dataset.problems if "PAT01_001" in p]


def test_csv_files_with_a_byte_order_mark_or_spaced_headers_are_read(tmp_path):
    """CSVs saved by Excel ("CSV UTF-8") start with a byte order mark; hand-edited headers gain spaces."""
    info = make_bus_bra(tmp_path / "bra", patients=5)
    for name in ("bus_data.csv", "5-fold-cv.csv"):
        path = info["base"] / name
        path.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    assert len(load_dataset("bus_bra", root=tmp_path / "bra", split="all")) == 7
    uclm = make_bus_uclm(tmp_path / "uclm", patients=4)
    path = uclm["base"] / "INFO.csv"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(["\ufeffImage ; Label ; Doppler ; Marks", *rows[1:]]) + "\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PAT00_001's size mismatch
        items = by_id(load_dataset("bus_uclm", root=tmp_path / "uclm", split="all", image_size=SIZE))
    assert {stem: item["artifact"] for stem, item in items.items()} == {
        stem: truth["artifact"] for stem, truth in uclm["truth"].items() if stem in items
    }
    assert sum(item["artifact"] for item in items.values()) > 0


def test_bus_bra_items(bus_bra):
    root, _ = bus_bra
    dataset = load_dataset("bus_bra", root=root, split="all", image_size=SIZE)
    assert dataset.class_names == ("benign", "malignant") and len(dataset) == 30
    item = by_id(dataset)["bus_0003-l"]  # case 3: malignant; its mask is Masks/mask_0003-l.png
    assert item["label"] == 1 and item["mask"].sum() > 0 and "artifact" not in item


def test_bus_bra_mask_that_is_no_png_is_skipped_and_noted_when_the_dataset_is_made(tmp_path):
    info = make_bus_bra(tmp_path, patients=4)
    mask = info["base"] / "Masks" / "mask_0003-l.png"
    mask.write_bytes(ERROR_PAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load_dataset("bus_bra", root=tmp_path, split="all", image_size=SIZE)
    assert "bus_0003-l" not in {r.id for r in dataset.records}
    assert any(note.startswith(f"{mask} is not a readable image") for note in dataset.problems)


def test_bus_bra_pathology_is_read_whatever_its_case(tmp_path):
    """'Malignant' or ' Benign ' in a hand-edited bus_data.csv is the same class, not a skipped image."""
    info = make_bus_bra(tmp_path, patients=6)
    path = info["base"] / "bus_data.csv"
    path.write_text(path.read_text().replace(",malignant,", ",Malignant,").replace(",benign,", ", Benign ,"))
    dataset = load_dataset("bus_bra", root=tmp_path, split="all")
    assert not dataset.problems
    assert {r.id: r.label for r in dataset.records} == {i: int(int(c) % 3 == 0) for i, c in info["cases"].items()}


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
    # the mask colour wins (it is drawn on the image); the disagreement is noted, only for that image
    assert dataset.problems == ["PAT03_001: INFO.csv says malignant, the mask colour says benign",
                                "PAT00_001: image and mask sizes differ, skipped"]  # the skipped one too
    assert by_id(dataset)["PAT03_001"]["label"] == 1


def test_bus_uclm_info_csv_label_disagreeing_is_noted_whatever_its_case(tmp_path):
    info = make_bus_uclm(tmp_path, patients=4)
    csv = info["base"] / "INFO.csv"
    csv.write_text(csv.read_text().replace("PAT03_001.png;malignant;", "PAT03_001.png;Malignant;"))
    dataset = load_dataset("bus_uclm", root=tmp_path, split="all", on_size_mismatch="resize")
    assert "PAT03_001: INFO.csv says malignant, the mask colour says benign" in dataset.problems


def test_bus_uclm_flags_are_read_by_value_and_unreadable_ones_and_missing_images_are_noted(tmp_path):
    """'1.0' (a spreadsheet's export) and '2' (a count) were read as 0 without a word, and a row of INFO.csv
    whose image was missing vanished silently."""
    info = make_bus_uclm(tmp_path)
    csv = info["base"] / "INFO.csv"
    rows = csv.read_text().splitlines()
    written = {"PAT04_000": ("1.0", "0"), "PAT04_001": ("0.0", "2"), "PAT04_002": ("maybe", "0"),
               "PAT05_000": (" Yes ", "no")}
    for i, row in enumerate(rows):
        stem = row.split(";")[0].removesuffix(".png")
        if stem in written:
            rows[i] = ";".join([*row.split(";")[:2], *written[stem]])
    csv.write_text("\n".join(rows) + "\n")
    (info["base"] / "images" / "PAT05_001.png").unlink()
    with pytest.warns(UserWarning, match=r"bus_uclm: \d+ note\(s\) on the files"):
        dataset = load_dataset("bus_uclm", root=tmp_path, split="all", image_size=SIZE)
    items = by_id(dataset)
    assert [items[s]["artifact"] for s in ("PAT04_000", "PAT04_001", "PAT04_002", "PAT05_000")] == [1, 1, 0, 1]
    assert "PAT04_002: INFO.csv flag(s) Doppler='maybe' unreadable, taken as 0" in dataset.problems
    assert "PAT05_001: in INFO.csv but its image is missing" in dataset.problems
    csv.write_text("\n".join(r for r in rows if not r.startswith("PAT04_000")) + "\n")  # one image unlisted
    with pytest.warns(UserWarning):
        again = load_dataset("bus_uclm", root=tmp_path, split="all", image_size=SIZE)
    assert by_id(again)["PAT04_000"]["artifact"] == 0  # a key like every other item's, or a batch fails to collate
    assert "PAT04_000: not in INFO.csv, artifact flag unknown (0)" in again.problems
    # NaN: unknown; any other number but 0 is a yes (a count, or -1 from a tool's "present")
    assert [real._flag(v) for v in ("nan", "NaN", " 1 ", "0", "-1", "-2.0")] == [None, None, True, False, True, True]


def test_a_bus_uclm_patient_is_the_stem_before_its_last_underscore():
    assert real.bus_uclm_patient("ALWI_000") == "ALWI" and real.bus_uclm_patient("AB_CD_001") == "AB_CD"


def test_masks_are_read_by_their_brightest_channel_and_two_levels_need_a_zero(tmp_path):
    """A red mask with anti-aliased edges is the white one (its grey luminance, 76 for pure red, fell below the
    threshold); a grey mask of 40 and 255 is lesion at 255 only (two levels count as 0/lesion only with 0)."""
    soft = np.zeros((8, 8), np.uint8)
    soft[2:6, 2:6], soft[1, 2:6] = 255, 128
    white, red = tmp_path / "white.png", tmp_path / "red.png"
    save_png(white, soft)
    save_png(red, np.stack([soft, np.zeros_like(soft), np.zeros_like(soft)], axis=-1))
    (from_white,), (from_red,) = real._read_masks((white,)), real._read_masks((red,))
    assert np.array_equal(from_red, from_white) and from_white.sum() == 16 + 4
    for channel in (1, 2):  # green or blue on black: the brightest channel, not the red one
        coloured = np.zeros((8, 8, 3), np.uint8)
        coloured[..., channel] = soft
        save_png(tmp_path / "coloured.png", coloured)
        assert np.array_equal(real._read_masks((tmp_path / "coloured.png",))[0], from_white)
    faint = tmp_path / "faint.png"
    save_png(faint, np.where(soft == 255, 255, 40).astype(np.uint8))
    assert real._read_masks((faint,))[0].sum() == 16


def test_colour_images_load_as_their_grey_luminance(tmp_path):
    path = tmp_path / "red.png"
    save_png(path, np.tile(np.array([255, 0, 0], np.uint8), (4, 4, 1)))
    assert real._read_image(path) == pytest.approx(np.full((4, 4), 76 / 255))  # ITU-R 601: 0.299 of red


@pytest.mark.parametrize("colours, label, lesion_pixels", [
    ({(5, 5): (255, 0, 0)}, 2, 100),
    ({(5, 5): (0, 255, 0)}, 1, 100),
    ({(5, 5): (0, 120, 0)}, 1, 100),  # dark green: benign, not normal
    ({(5, 5): (250, 0, 0), (22, 30): (0, 255, 0)}, 2, 200),  # both lesions kept; malignant dominates
    ({(5, 5): (0, 255, 0), (22, 30): (110, 8, 4)}, 2, 200),  # a dim, JPEG-ish red still counts
    ({(5, 5): (6, 3, 0)}, 0, 0),  # compression noise on black is no lesion
    ({(5, 5): (0, 255, 255)}, 0, 0),  # cyan: green must stand out from blue too
    ({(5, 5): (255, 0, 255)}, 0, 0),  # magenta: and red from blue
], ids=["red", "green", "dark-green", "red-and-green", "dim-red-and-green", "noise", "cyan", "magenta"])
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


def test_bus_uclm_image_without_its_mask_is_skipped_and_noted(tmp_path):
    """A mask file lost from masks/ costs that image only (was FileNotFoundError for the whole dataset)."""
    info = make_bus_uclm(tmp_path, patients=2)
    (info["base"] / "masks" / "PAT01_002.png").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load_dataset("bus_uclm", root=tmp_path, split="all", on_size_mismatch="resize")
    assert {r.id for r in dataset.records} == set(info["truth"]) - {"PAT01_002"}
    assert "PAT01_002: no mask file, skipped" in dataset.problems


def test_bus_uclm_mask_cut_short_is_skipped_and_noted_and_a_mask_without_image_is_noted(tmp_path):
    """A mask whose header reads but whose pixels are cut short stopped the whole load (DamagedFileError),
    where an empty one was skipped; a mask of no image was ignored without a word (BUSI notes it)."""
    info = make_bus_uclm(tmp_path, patients=2)
    cut = info["base"] / "masks" / "PAT01_001.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    save_png(info["base"] / "masks" / "PAT09_000.png", np.zeros((8, 8, 3), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load_dataset("bus_uclm", root=tmp_path, split="all", on_size_mismatch="resize")
    assert {r.id for r in dataset.records} == set(info["truth"]) - {"PAT01_001"}
    assert any(note.startswith(f"{cut} ") and note.endswith(", skipped") for note in dataset.problems)
    assert "PAT09_000: mask without image, ignored" in dataset.problems


def test_bus_bra_image_the_table_does_not_name_is_noted(tmp_path):
    info = make_bus_bra(tmp_path, patients=3)
    save_png(info["base"] / "Images" / "bus_9999-l.png", np.zeros((8, 8), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load_dataset("bus_bra", root=tmp_path, split="all")
    assert "bus_9999-l" not in {r.id for r in dataset.records}
    assert "bus_9999-l: in Images/ but not in bus_data.csv, ignored" in dataset.problems


def test_a_root_holding_another_fetched_dataset_says_so_not_to_fetch_into_it(tmp_path):
    """It said to run `python -m data_fetch busi --dest <the BUS-UCLM folder>`: two datasets in one folder."""
    from data_fetch import completion_marker

    make_bus_uclm(tmp_path, patients=2)
    completion_marker(tmp_path, "bus_uclm").write_text("{}")
    with pytest.raises(LayoutError, match=r"It holds data_fetch's download of 'bus_uclm', not busi: pass busi's own "
                                          r"folder as root") as error:
        load_dataset("busi", root=tmp_path)
    assert "data_fetch busi" not in str(error.value)
    assert "(or load that one from it: load_dataset('bus_uclm'))" in str(error.value)
    for marker in tmp_path.glob(".*.complete"):
        marker.unlink()
    completion_marker(tmp_path, "busi").write_text("{}")  # its own download, unpacked and since damaged
    with pytest.raises(LayoutError, match=r"If the download is incomplete, fetch it again with `python -m data_fetch "
                                          r"busi") as error:
        load_dataset("busi", root=tmp_path)
    assert "It holds" not in str(error.value)


def test_a_root_one_level_off_names_the_dataset_folder(tmp_path):
    # notebook.start's data_root holds one folder per dataset, load_dataset's root is one of them: passed the
    # holding folder it said to fetch BUSI into it, passed busi/busi to fetch into the nested folder
    from data_fetch import completion_marker
    from mtlearn.data.real import dataset_folder

    make_breastmnist(tmp_path / "breastmnist")
    completion_marker(tmp_path / "breastmnist", "breastmnist").write_text("{}")
    own = str(tmp_path / "breastmnist")
    load_dataset("breastmnist", root=own, split="all", resolution=28)  # the dataset's own folder
    with pytest.raises(LayoutError, match=rf"{re.escape(str(tmp_path))} holds the datasets' folders, breastmnist's "
                                          rf"among them: pass root='{re.escape(own)}'"):
        load_dataset("breastmnist", root=tmp_path, resolution=28)  # (the image folders' readers search below root)
    with pytest.raises(FileNotFoundError, match=rf"breastmnist{re.escape(os.sep)}breastmnist does not exist, but .* "
                                                rf"holds breastmnist: pass root='{re.escape(own)}'"):
        load_dataset("breastmnist", root=tmp_path / "breastmnist" / "breastmnist", resolution=28)
    with pytest.raises(FileNotFoundError, match="breastmnist is not downloaded"):  # no download there: no hint
        load_dataset("breastmnist", root=tmp_path / "elsewhere" / "breastmnist" / "breastmnist", resolution=28)
    # a folder holding the datasets' folders, with a stray marker of one fetched into it directly: still that
    (tmp_path / "busi").mkdir()
    completion_marker(tmp_path, "busi_128").write_text("{}")
    assert dataset_folder("breastmnist", tmp_path) == tmp_path / "breastmnist"
    assert dataset_folder("bus_uclm", tmp_path) == tmp_path / "bus_uclm"  # load_dataset: "is not downloaded"


def test_a_root_holding_an_npz_download_names_the_load_call_that_reads_it(tmp_path):
    """It advised to "load 'busi_128' from this one", and load_dataset('busi_128') is refused: busi_128 is
    data_fetch's name of busi_npz at resolution 128."""
    from data_fetch import completion_marker

    make_busi_npz(tmp_path, resolution=128, counts=(2, 2, 2))
    completion_marker(tmp_path, "busi_128").write_text("{}")
    with pytest.raises(LayoutError, match=r"It holds data_fetch's download of 'busi_128', not busi: pass busi's own "
                                          r"folder as root \(or load that one from it: "
                                          r"load_dataset\('busi_npz', resolution=128\)\)"):
        load_dataset("busi", root=tmp_path)
    assert len(load_dataset("busi_npz", root=tmp_path, resolution=128, split="val", image_size=64)) == 2 + 3  # C1, C2


@pytest.mark.parametrize("encoding", ["utf-8", "cp1252"])
def test_bus_uclm_flags_in_words_are_read(tmp_path, encoding):
    """INFO.csv flags may be words, in any case and in Spanish: "Yes", "TRUE", "Sí" mark an artifact. A
    spreadsheet exported on a Spanish Windows writes "Sí" in Windows-1252: a bare UnicodeDecodeError before."""
    base = tmp_path / "BUS-UCLM"
    flags = {"P_000": ("Yes", "No", 1), "P_001": ("no", "TRUE", 1), "P_002": ("Sí", "", 1), "P_003": ("0", "NO", 0)}
    for stem in flags:
        save_png(base / "masks" / f"{stem}.png", np.zeros((40, 48, 3), np.uint8))
        save_png(base / "images" / f"{stem}.png", random_image(np.random.default_rng(0)))
    rows = [f"{stem}.png;normal;{doppler};{marks}" for stem, (doppler, marks, _) in flags.items()]
    (base / "INFO.csv").write_text("\n".join(["Image;Label;Doppler;Marks", *rows]) + "\n", encoding=encoding)
    dataset = load_dataset("bus_uclm", root=tmp_path, split="all")
    assert {r.id: r.artifact for r in dataset.records} == {stem: flag for stem, (_, _, flag) in flags.items()}
    (base / "INFO.csv").write_bytes(b"PK\x03\x04\x00\x00\xff\xfe")  # binary: an archive or a cut download
    with pytest.raises(ValueError, match=r"INFO.csv is not a text \(CSV\) file: a download cut short.*python -m "
                                         r"data_fetch bus_uclm"):
        load_dataset("bus_uclm", root=tmp_path, split="all")


def test_bus_uclm_size_mismatch_reported_not_fatal(bus_uclm):
    root, info = bus_uclm
    with pytest.warns(UserWarning, match="PAT00_001"):
        skipped = load_dataset("bus_uclm", root=root, split="all", image_size=SIZE)
    assert skipped.size_mismatches == info["mismatched"] and "PAT00_001" not in by_id(skipped)
    with pytest.warns(UserWarning, match="resized both, so those masks do not line up with their images"):
        kept = load_dataset("bus_uclm", root=root, split="all", image_size=SIZE, on_size_mismatch="resize")
    assert by_id(kept)["PAT00_001"]["image"].shape == (1, SIZE, SIZE)
    with pytest.raises(ValueError, match="on_size_mismatch"):
        load_dataset("bus_uclm", root=root, on_size_mismatch="crash")


def test_bus_uclm_splits_by_patient(bus_uclm):
    root, info = bus_uclm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patients = {s: {info["truth"][r.id]["patient"] for r in load_dataset("bus_uclm", root=root, split=s).records}
                    for s in ("train", "val", "test")}
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
    # shares are relative: 7:1:2 in whole numbers is the default split itself
    whole = tuple((name, round(10 * share)) for name, share in SPLIT_FRACTIONS)
    assert split_by_group(groups, labels, seed=seed, fractions=whole).tolist() == split_of.tolist()


@pytest.mark.parametrize("groups, labels, fractions, match", [
    (["a", "b", "c", "d"], [0, 1, 0], SPLIT_FRACTIONS, r"one per item, got shapes \(4,\) and \(3,\)"),
    ([], [], SPLIT_FRACTIONS, "non-empty"),
    (["a", "b"], [0, 1], (("train", 1.2), ("test", -0.2)), "shares >= 0"),  # dealt out as if valid
    (["a", "b"], [0, 1], (("train", 0), ("test", 0)), "not all 0"),
    (["a", "b"], [0, 1], (("train", math.inf), ("test", 1.0)), "finite shares"),  # NaN edges: all in train
    (["a", "b"], [0, 1], (("train", 10**400), ("test", 1.0)), "finite shares"),  # was math.isfinite's OverflowError
    (["a", "b"], [0, 1], (("train", "0.8"), ("test", 0.2)), "finite shares"),  # a config's string: was a TypeError
    (["a", "b"], [0, 1], (("train", 0.5), ("train", 0.5)), "distinct names"),
    # "max() arg is an empty sequence" / "too many values to unpack" / TypeError: '<' not supported
    ([1.0, math.nan, 2.0], [0, 1, 0], SPLIT_FRACTIONS, r"must name a group for every item; items \[1\] have nan"),
    (["a", None, "b"], [0, 1, 0], SPLIT_FRACTIONS, r"items \[1\] have None \(e.g. an empty CSV cell\)"),
    (["a", "b"], [0, 1], {"train": 0.8, "test": 0.2}, r"fractions must be a sequence of \(name, share\) pairs"),
    (["a", "b"], [0, 1], "train", r"fractions must be a sequence of \(name, share\) pairs"),
    (["a", "b"], [0, 1], {}, r"fractions must be a sequence of \(name, share\) pairs"),
    (["a", "b"], [0, 1], "", r"fractions must be a sequence of \(name, share\) pairs"),
    (["a", "b"], [0, 1], [("train", 0.8, 1), ("test", 0.2)], r"fractions must be a sequence of \(name, share\)"),
    (["a", "b"], [0, 1], ((0.7, 0.3),), r"distinct names \(non-empty str\)"),  # every item in a split named 0.7
    (["a", "b"], [0, 1], (("", 0.7), ("test", 0.3)), r"distinct names \(non-empty str\)"),
    (["a", "b", "c"], [0, math.nan, 1], SPLIT_FRACTIONS,  # a KeyError
     r"labels must give every item its class; item 1 has nan \(e\.g\. an empty CSV cell\)"),
    (["a", "b", "c"], [0, None, 1], SPLIT_FRACTIONS, r"item 1 has None"),  # '<' not supported
    # a pandas column of patient ids read partly as numbers: numpy's "'<' not supported between 'int' and 'str'"
    (np.array(["p1", 2, "p3"], dtype=object), [0, 1, 0], SPLIT_FRACTIONS,
     r"groups must be ids of one kind \(all numbers, or all text\), got a mix of \['int', 'str'\]"),
])
def test_split_by_group_refuses_what_it_cannot_split(groups, labels, fractions, match):
    with pytest.raises(ValueError, match=match):
        split_by_group(groups, labels, seed=0, fractions=fractions)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_group_keeps_its_splits_when_a_group_is_added(seed):
    """A shuffle of all groups dealt them anew when one more came (a new patient, a new image): 10 of 72
    BUSI-like images changed split, test images went to train, and a model trained before the update
    was tested on images it had trained on."""
    groups, labels = [f"patient-{k}" for k in range(60)], [k % 3 for k in range(60)]
    before = dict(zip(groups, split_by_group(groups, labels, seed=seed)))
    after = dict(zip(groups + ["patient-new"], split_by_group(groups + ["patient-new"], labels + [0], seed=seed)))
    moved = [g for g in groups if before[g] != after[g]]
    assert len(moved) <= 2  # at most the one beside each edge between two splits
    assert all(int(g.split("-")[1]) % 3 == 0 for g in moved)  # of the new group's class; the others stay


def test_busi_keeps_its_splits_when_an_image_is_added(tmp_path):
    """Its near-duplicate clusters were numbered in the order the files were found: an image added renamed
    every cluster after it."""
    make_busi(tmp_path, per_class=10)

    def ids(split):
        return set(by_id(load_dataset("busi", root=tmp_path, split=split, image_size=SIZE)))

    before = {split: ids(split) for split in ("train", "val", "test")}
    benign = tmp_path / "Dataset_BUSI_with_GT" / "benign"
    image = np.random.default_rng(5).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(benign / "benign (0).png")  # first by name: before every cluster
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(benign / "benign (0)_mask.png")
    moved = sum(len(kept - ids(split)) for split, kept in before.items())
    assert moved <= 2


def test_random_subset_draws_from_the_whole_split():
    ordered = list(range(100))  # a split sorted by file name: "benign (N)" before every "malignant"
    subset = random_subset(ordered, 30, seed=0)
    picked = [subset[i] for i in range(len(subset))]
    assert len(picked) == 30 and max(picked) > 60 and picked == sorted(picked)
    assert random_subset(ordered, 30, seed=0).indices == subset.indices and random_subset(ordered, None, 0) is ordered
    assert random_subset(ordered, 100, seed=0) is ordered  # all of them: no Subset
    assert random_subset(ordered, 30, seed=1).indices != subset.indices


def test_random_subset_keeps_each_classs_share_when_the_dataset_names_the_classes():
    class Listed(list):  # sorted by class, as a real split is listed
        labels = np.array([0] * 60 + [1] * 30 + [2] * 10)

    ordered = Listed(range(100))
    for size, counts in ((2, [1, 1, 0]), (10, [6, 3, 1]), (50, [30, 15, 5])):
        subset = random_subset(ordered, size, seed=0)
        assert np.bincount(Listed.labels[subset.indices], minlength=3).tolist() == counts
        assert subset.indices == sorted(subset.indices)
    assert random_subset(ordered, 10, seed=1).indices != random_subset(ordered, 10, seed=0).indices

    class Flagged(list):  # DenoisingPairs.labels says whether it keeps the labels: no len() (a TypeError)
        labels = True

    assert len(random_subset(Flagged(range(100)), 10, seed=0)) == 10

    class Short(list):  # labels that are not one per item: not used to stratify
        labels = np.arange(3)

    assert len(random_subset(Short(range(100)), 10, seed=0)) == 10

    class Unequal(list):  # shares that do not divide evenly (1.5, 0.9, 0.6 of 3): Webster rounds them to 1, 1, 1
        labels = np.array([0] * 50 + [1] * 30 + [2] * 20)

    assert np.bincount(Unequal.labels[random_subset(Unequal(range(100)), 3, seed=0).indices]).tolist() == [1, 1, 1]


def test_split_by_group_draws_as_draw_version_3():
    """Pinned: a change of the draw (the hash, its size, the dealing) changes every split of every real dataset,
    and must come with a new DRAW_VERSION, which python -m mtlearn.train's --resume checks."""
    from mtlearn.data.splits import DRAW_VERSION

    assert DRAW_VERSION == 3
    # draw 3: the malignant patients' middles all fell outside validation's 70-80 %; one of them is moved there
    groups, labels = [f"p{k}" for k in range(8) for _ in range(11)], [1] * 88
    split = split_by_group(groups, labels, 0).reshape(8, 11)[:, 0].tolist()
    assert split == ["train", "train", "train", "val", "train", "train", "test", "test"]
    for sizes, seed, expected in [([25, 1, 1, 4], 0, ["train", "val", "train", "test"]),  # test's first moves
                                  ([9, 2, 12, 3, 8], 5, ["test", "train", "train", "train", "val"])]:  # train's last
        groups = [f"p{k}" for k, n in enumerate(sizes) for _ in range(n)]
        split = split_by_group(groups, [1] * len(groups), seed)
        assert [split[groups.index(f"p{k}")] for k in range(len(sizes))] == expected
    groups = [f"g{k}" for k in range(10)]
    assert split_by_group(groups, [0] * 10, 0).tolist() == \
        ["train", "val", "train", "test", "train", "train", "test", "train", "train", "train"]
    assert split_by_group(groups, [0] * 5 + [1] * 5, 3).tolist() == \
        ["train", "val", "test", "train", "train", "train", "train", "test", "val", "train"]


def test_split_by_group_stratifies_by_any_label_that_names_a_class():
    """Whole-number floats (a CSV column that once held a blank), bools and class names are classes too."""
    groups = [f"g{k}" for k in range(20)]
    ints = split_by_group(groups, [k % 2 for k in range(20)], seed=0).tolist()
    for labels in ([float(k % 2) for k in range(20)], [bool(k % 2) for k in range(20)],
                   [("benign", "malignant")[k % 2] for k in range(20)]):
        assert split_by_group(groups, labels, seed=0).tolist() == ints


def test_split_by_group_warns_when_a_split_gets_nothing():
    """Two patients cannot fill 7:1:2: a split came out empty, and only an empty loader or NaN metrics said so."""
    with pytest.warns(UserWarning, match=r"split\(s\) \['test'\] got no items: 2 group\(s\) are too few") as caught:
        split = split_by_group(["a", "b"], [0, 0], seed=0)
    assert len(caught) == 1  # not also "without an item of some class" for the split that has none at all
    assert sorted(split) == ["train", "val"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # three can: one each (dealt by their middles, val got none)
        assert sorted(split_by_group(["a", "b", "c"], [0, 0, 0], seed=0)) == ["test", "train", "val"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a split asked for with share 0 is empty on purpose
        split_by_group(["a", "b", "c"], [0, 0, 0], seed=0, fractions=(("train", 0.7), ("val", 0), ("test", 0.3)))


@pytest.mark.parametrize("seed", range(20))
def test_split_by_group_gives_every_split_a_group_of_a_class_with_few_large_groups(seed):
    """8 malignant patients of 11 images each among 22 others of 20: every malignant patient's middle fell
    outside validation's 70-80 %, for every seed, so a best epoch was chosen on a validation split without a
    malignant image (its sensitivity NaN, its AUC over the benign class alone), and nothing said so."""
    groups = [f"b{k}" for k in range(22) for _ in range(20)] + [f"m{k}" for k in range(8) for _ in range(11)]
    labels = np.array([0] * 440 + [1] * 88)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = split_by_group(groups, labels, seed)
    for name in ("train", "val", "test"):
        assert set(labels[split == name]) == {0, 1}, name
    assert all(len(set(split[np.asarray(groups) == g])) == 1 for g in set(groups))  # groups stay whole
    assert (split[labels == 1] == "train").sum() == 55  # 5 of the 8 patients: train keeps most, as 7:1:2 asks


def test_split_by_group_fills_an_empty_split_with_the_group_that_keeps_the_shares_best():
    from mtlearn.data.splits import _fill_empty_splits

    edges = np.array([0.7, 0.8, 1.0])
    # three patients of 50 images and one of 1: middles 0.17, 0.50, 0.83, 1.00 -> train, train, test, test.
    # Only the groups beside validation's empty place may move (the 1-image patient, at the far end of test's
    # run, would keep the shares best but jump over a neighbour): test's first (100 / 50 / 1 against shares of
    # 106 / 15 / 30) beats train's last (50 / 50 / 51)
    sizes = np.array([50, 50, 50, 1])
    middle = (np.cumsum(sizes) - sizes / 2) / sizes.sum()
    assert _fill_empty_splits([0, 0, 2, 2], middle, sizes, edges) == [0, 0, 1, 2]
    # the last split empty and its neighbour holding one group: the runs shift by one group each (train's last
    # into val, val's one into test), no group jumping a split
    sizes = np.array([30, 30, 30, 9])
    middle = (np.cumsum(sizes) - sizes / 2) / sizes.sum()
    assert _fill_empty_splits([0, 0, 0, 1], middle, sizes, edges) == [0, 0, 1, 2]
    # equal patients, 6 in train and 2 in test: moving one from either costs the same; the middle nearest
    # validation's (0.6875 and 0.8125 are as near) and then the first in the seed's order decide
    sizes = np.full(8, 11)
    middle = (np.cumsum(sizes) - sizes / 2) / sizes.sum()
    assert _fill_empty_splits([0] * 6 + [2] * 2, middle, sizes, edges) == [0] * 5 + [1] + [2] * 2
    # fewer groups than splits: nothing to move (split_by_group warns instead)
    assert _fill_empty_splits([0, 2], np.array([0.25, 0.75]), np.array([1, 1]), edges) == [0, 2]
    # a split with share 0 is not filled
    edges = np.array([0.7, 0.7, 1.0])
    assert _fill_empty_splits([0, 0, 2], np.array([0.17, 0.5, 0.83]), np.array([1, 1, 1]), edges) == [0, 0, 2]


def test_filling_an_empty_split_moves_no_group_across_a_split_when_the_data_grow(monkeypatch):
    """A group dealt to train must not land in test after a data update (a model trained before it would then be
    tested on a patient it trained on). A fill that picked any group by the shares it gave did that: one class
    of groups of 2, 5, 7 and 15 images (seed 65), then a fifth of 7: a train group moved to test. The fill moves
    only groups beside the empty split's place, so over many updates it adds no such jump to the few that the
    dealing itself makes (a large new group shifts every later middle)."""
    from mtlearn.data import splits

    def dealt(sizes, seed):
        groups = [f"g{k}" for k, n in enumerate(sizes) for _ in range(n)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # splits left empty by the smallest classes
            return dict(zip(groups, split_by_group(groups, [0] * len(groups), seed)))

    def jumps(cases):
        count = 0
        for sizes, extra, seed in cases:
            before, after = dealt(sizes, seed), dealt([*sizes, extra], seed)
            count += sum({before[g], after[g]} == {"train", "test"} for g in before)
        return count

    assert jumps([([2, 5, 7, 15], 7, 65)]) == 0
    rng = np.random.default_rng(0)
    cases = [(rng.integers(1, 20, rng.integers(6, 15)).tolist(), int(rng.integers(1, 20)), int(rng.integers(1000)))
             for _ in range(300)]
    filled = jumps(cases)
    monkeypatch.setattr(splits, "_fill_empty_splits", lambda dealt, *_: dealt)
    assert filled <= jumps(cases)


def test_split_by_group_warns_when_a_split_lacks_a_class():
    """Two malignant patients cannot be in three splits: a class metric would be undefined where they are not."""
    groups = [f"b{k}" for k in range(20)] + ["m0", "m1"]
    labels = [0] * 20 + [1, 1]
    with pytest.warns(UserWarning, match=r"split\(s\) without an item of some class, \{'test': \[1\]\}: "
                                         "the class is in too few groups") as caught:
        split = split_by_group(groups, labels, 0)
    assert sorted(split[-2:]) == ["train", "val"]
    assert "best epoch" not in str(caught[0].message)  # validation has the class: the choice of epoch sees it
    # a patient of 1 malignant image and one of 5, in the order m1, m0: middles 5/12 and 11/12, train and test
    groups, labels = [f"b{k}" for k in range(20)] + ["m0"] + ["m1"] * 5, [0] * 20 + [1] * 6
    with pytest.warns(UserWarning, match=r"\{'val': \[1\]\}.* undefined there and a best epoch "
                                         "chosen on validation ignores it"):
        split_by_group(groups, labels, 0)


def test_split_by_group_needs_a_seed():
    """seed=None drew a new split on every call, against the docstring's "deterministic for a given seed"."""
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got None"):
        split_by_group(["a", "b"], [0, 1], seed=None)


def test_split_by_group_does_not_depend_on_the_order_of_tied_items():
    """A group whose labels tie (one benign and one malignant near-duplicate) took the class of the item
    listed first, so the same files found in another order were split differently."""
    groups = np.repeat(np.arange(20), 2)
    labels = np.tile([0, 1], 20)
    swapped = labels.copy()
    swapped[:20] = 1 - swapped[:20]  # the first ten groups list their items the other way round
    for seed in range(3):
        assert split_by_group(groups, labels, seed).tolist() == split_by_group(groups, swapped, seed).tolist()


def test_split_by_group_does_not_depend_on_the_order_of_the_items():
    """The same files listed in another order (another file system, another glob) must split the same way."""
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{k:02d}" for k in range(30)], rng.integers(1, 4, 30))
    labels = np.array([int(g[1:]) % 3 for g in groups])
    order = rng.permutation(len(groups))
    for seed in range(3):
        assert split_by_group(groups[order], labels[order], seed).tolist() == \
            split_by_group(groups, labels, seed)[order].tolist()


def test_a_tied_group_is_dealt_with_the_rarest_of_its_labels():
    """A pair labelled 1 and 0 counts as class 0, the rarer in the data. Alone in class 0, the pair's middle
    falls in train for every seed; dealt with the ten class-1 groups it would land in val or test for some."""
    groups, labels = ["tie", "tie"] + [f"g{k}" for k in range(10)], [1, 0] + [1] * 10
    for seed in range(10):
        with pytest.warns(UserWarning, match=r"without an item of some class, \{'val': \[0\], 'test': \[0\]\}"):
            split_of = split_by_group(groups, labels, seed=seed)
        assert split_of[:2].tolist() == ["train"] * 2
        assert [np.sum(split_of[2:] == name) for name in ("train", "val", "test")] == [7, 1, 2]


def test_patients_with_a_rare_lesion_are_dealt_as_a_class_of_their_own():
    """BUS-UCLM-like: each patient has mostly normal scans and a few of one lesion. By majority every patient
    counted as normal, and the malignant images fell wherever chance put their patients (4 to 19 of 62 in
    test over 20 seeds, none in validation for some)."""
    rng = np.random.default_rng(0)
    groups, labels = [], []
    for patient in range(38):
        normal, lesion = rng.integers(6, 16), rng.integers(2, 8)
        groups += [f"p{patient}"] * (normal + lesion)
        labels += [0] * normal + [2 if patient % 3 == 0 else 1] * lesion
    groups, labels = np.array(groups), np.array(labels)
    malignant = labels == 2
    for seed in range(20):
        split_of = split_by_group(groups, labels, seed)
        in_test, in_val = np.sum(malignant & (split_of == "test")), np.sum(malignant & (split_of == "val"))
        assert 0.1 < in_test / malignant.sum() < 0.3 and in_val > 0


def test_a_group_whose_middle_falls_on_an_edge_joins_the_later_split():
    """Five pairs (patients with two images): middles at 0.1, 0.3, 0.5, 0.7, 0.9 against edges 0.7 and 0.8;
    the one at 0.7 opens val (6/2/2), where the earlier split would take it and leave val empty (8/0/2)."""
    groups = np.repeat([f"p{k}" for k in range(5)], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "got no items"
        for seed in range(3):
            split_of = split_by_group(groups, [0] * 10, seed=seed)
            assert [int(np.sum(split_of == name)) for name in ("train", "val", "test")] == [6, 2, 2]


def test_difference_hash_groups_a_noisy_or_rescaled_copy():
    """Speckle of another acquisition and a copy saved at 90 % size stay within the duplicate threshold:
    the thumbnail averages over each of its cells (a nearest-pixel thumbnail put the noisy copy 6 bits away)."""
    y, x = np.mgrid[0:480, 0:600] / 100.0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        smooth = sum(np.sin(a * x + b * y + c) for a, b, c in rng.uniform(0.2, 1.5, (4, 3)))
        smooth = (smooth - smooth.min()) / np.ptp(smooth)
        reference = difference_hash(smooth)
        noisy = smooth + rng.normal(0, 0.3, smooth.shape)
        smaller = np.asarray(Image.fromarray((255 * smooth).astype(np.uint8)).resize((540, 432)), np.float32)
        for copy in (noisy, smaller):
            assert np.sum(difference_hash(copy) != reference) <= DUPLICATE_MAX_DISTANCE


def test_difference_hash_refuses_a_colour_image():
    """An (H, W, 3) image gave 192 bits, against which DUPLICATE_MAX_DISTANCE means something else."""
    with pytest.raises(ValueError, match=r"grey \(H, W\) image, got shape \(32, 32, 3\)"):
        difference_hash(np.zeros((32, 32, 3)))


def test_hashing_refuses_what_it_cannot_hash():
    with pytest.raises(ValueError, match=r"difference_hash got an empty image"):
        difference_hash(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"hash_size must be an integer >= 1, got 0"):
        difference_hash(np.zeros((30, 30)), 0)
    hashes = [difference_hash(np.eye(20)), difference_hash(np.eye(20)[::-1])]
    assert duplicate_groups(hashes).tolist() == [0, 1]  # a list of hashes is stacked (was: no attribute 'astype')
    with pytest.raises(ValueError, match=r"\(N, B\) bool array.*got bool of shape \(64,\): stack them"):
        duplicate_groups(hashes[0])  # scipy: "graph should have two dimensions"
    with pytest.raises(ValueError, match=r"max_distance must be an integer >= 0, got '5'"):
        duplicate_groups(hashes, "5")  # numpy: "ufunc 'less_equal' did not contain a loop"
    image = np.eye(20)
    image[3, 4] = np.nan  # made the hash all False, so unrelated images with a NaN were all "duplicates"
    with pytest.raises(ValueError, match=r"difference_hash got an image with 1 NaN or infinite pixels; fill them"):
        difference_hash(image)


def test_difference_hash_compares_each_pixel_with_its_right_neighbour():
    """64 bits, each "brighter than the pixel to its left": a left-to-right ramp sets all of them, a
    top-to-bottom one none (a vertical comparison would give 63 bits and the opposite answers)."""
    across = np.tile(np.arange(90.0), (80, 1))
    assert difference_hash(across).shape == (64,) and difference_hash(across).all()
    assert not difference_hash(across.T.copy()).any()


def test_a_group_counts_as_its_rarest_label():
    """A near-duplicate cluster of mixed labels (0, 1, 1) is dealt out as class 1, the rarer in the data.

    Alone in class 1, its middle item falls in train for every seed, and the ten class-0 images split
    exactly 7:1:2; dealt with class 0 (its first label), it would land in val or test for some seeds.
    """
    groups, labels = ["mixed"] * 3 + [f"g{k}" for k in range(10)], [0, 1, 1] + [0] * 10
    for seed in range(10):
        with pytest.warns(UserWarning, match=r"without an item of some class, \{'val': \[1\], 'test': \[1\]\}"):
            split_of = split_by_group(groups, labels, seed=seed)
        assert split_of[:3].tolist() == ["train"] * 3
        assert [np.sum(split_of[3:] == name) for name in ("train", "val", "test")] == [7, 1, 2]


def test_duplicate_groups_join_hashes_at_most_the_threshold_apart_and_chain():
    """"Hashes at most DUPLICATE_MAX_DISTANCE bits apart count as near-duplicates", through chains."""
    d = DUPLICATE_MAX_DISTANCE
    base = np.zeros(64, bool)

    def flipped(first, count):
        h = base.copy()
        h[first : first + count] = True
        return h
    hashes = np.stack([base, flipped(0, d), flipped(0, 2 * d), flipped(40, d + 1)])
    groups = duplicate_groups(hashes, d)
    # 0-1 and 1-2 are d apart (one chain, although 0-2 are 2d apart); 3 is d+1 from 0 and further from 1, 2
    assert groups[0] == groups[1] == groups[2] and groups[3] != groups[0]


def test_difference_hash_ignores_brightness_and_contrast():
    """The same picture darker or with less contrast (another gain setting) is still a near-duplicate."""
    for seed in range(5):
        grey = random_image(np.random.default_rng(seed)).astype(np.float32) / 255
        reference = difference_hash(grey)
        for changed in (0.1 * grey + 0.5, 0.02 * grey):
            assert np.sum(difference_hash(changed) != reference) <= 2


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


def test_npz_uint8_images_are_divided_by_255(tmp_path):
    """uint8 arrays are 0..255 grey levels: a dark image stays dark (not stretched to its own maximum)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 100, (3, 28, 28), dtype=np.uint8)  # dark: max < 100
        arrays[f"{split}_labels"] = np.zeros((3, 1), np.uint8)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    dataset = load_dataset("breastmnist", root=tmp_path, split="test", image_size=28)
    for i in range(3):
        assert np.allclose(dataset[i]["image"][0].numpy(), arrays["test_images"][i] / 255, atol=1e-6)


def _breastmnist_with_images(folder, images):
    """breastmnist.npz holding `images` in every split, labels all 0."""
    arrays = {f"{split}_{kind}": value for split in ("train", "val", "test")
              for kind, value in (("images", images), ("labels", np.zeros((len(images), 1), np.uint8)))}
    np.savez(folder / "breastmnist.npz", **arrays)


def test_npz_colour_images_load_as_their_grey_luminance_as_pngs_do(tmp_path):
    """The weights PIL's convert("L") gives a PNG (ITU-R 601), rounded: pure red 255 is 76, as in
    test_colour_images_load_as_their_grey_luminance; (1, 1, 2) is 1.11, so 1; yellow (255, 255, 0) is 225.93, so 226
    (not 225: rounded, not cut)."""
    images = np.zeros((3, 28, 28, 3), np.uint8)
    images[:, :14, :, 0] = 255  # red top half
    images[:, 14:20] = (1, 1, 2)
    images[:, 20:] = (255, 255, 0)
    _breastmnist_with_images(tmp_path, images)
    image = load_dataset("breastmnist", root=tmp_path, split="test", image_size=28)[0]["image"][0]
    assert torch.allclose(image[:14], torch.tensor(76 / 255)) and torch.allclose(image[14:20], torch.tensor(1 / 255))
    assert torch.allclose(image[20:], torch.tensor(226 / 255))
    _breastmnist_with_images(tmp_path, images[..., :1])  # (N, H, W, 1): the one channel
    image = load_dataset("breastmnist", root=tmp_path, split="test", image_size=28)[0]["image"][0]
    assert torch.allclose(image[:14], torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (3, 28, 28, 4)], ids=["channels-first", "rgba"])
def test_npz_images_of_another_layout_are_named_not_resized_into_noise(tmp_path, shape):
    _breastmnist_with_images(tmp_path, np.zeros(shape, np.uint8))
    with pytest.raises(LayoutError, match=re.escape(f"breastmnist.npz: train_images has shape {shape}; expected "
                                                    "images (N, H, W), (N, H, W, 1) or (N, H, W, 3)")):
        load_dataset("breastmnist", root=tmp_path, split="train", image_size=28)


@pytest.mark.parametrize("labels", [[0, 2, 1], [0, 1, -1]])
def test_breastmnist_labels_other_than_0_and_1_are_named(tmp_path, labels):
    """1 - label made class -1 (or 2 of 2): an error only when the dataset was printed, long after loading."""
    path = make_breastmnist(tmp_path, counts=(3, 3, 3))
    arrays = dict(np.load(path))
    arrays["val_labels"] = np.array(labels, np.int64)[:, None]
    np.savez(path, **arrays)
    assert len(load_dataset("breastmnist", root=tmp_path, split="test", image_size=28)) == 3
    bad = [label for label in labels if label not in (0, 1)]
    with pytest.raises(LayoutError, match=re.escape(f"breastmnist.npz: val_labels holds {bad}; BreastMNIST's labels "
                                                    "are 0 (malignant) and 1 (normal or benign)")):
        load_dataset("breastmnist", root=tmp_path, split="val", image_size=28)


@pytest.mark.parametrize("name, maker, key, cut", [
    ("breastmnist", make_breastmnist, "test_labels", "test_images (6,), test_labels (4,)"),
    ("breastmnist", make_breastmnist, "test_images", "test_images (4,), test_labels (6,)"),
    ("busi_npz", make_busi_npz, "test_label_C2", "test_images_C2 (7, 128, 128), test_label_C2 (5, 128, 128)"),
])
def test_npz_arrays_cut_short_are_named_not_dropped_or_an_index_error(tmp_path, name, maker, key, cut):
    """Images without labels were dropped silently (BreastMNIST), masks missing failed with IndexError (BUSI npz)."""
    path = maker(tmp_path, counts=(6, 6, 6))
    arrays = dict(np.load(path))
    arrays[key] = arrays[key][:-2]
    np.savez(path, **arrays)
    with pytest.raises(LayoutError, match=re.escape(f"{path.name} is inconsistent: {cut} should match")):
        load_dataset(name, root=tmp_path, split="test", image_size=28)


def test_busi_npz_masks_of_another_size_than_their_images_are_named(tmp_path):
    path = make_busi_npz(tmp_path, counts=(2, 2, 2))
    arrays = dict(np.load(path))
    arrays["val_label_C1"] = arrays["val_label_C1"][:, :64]
    np.savez(path, **arrays)
    with pytest.raises(LayoutError, match=re.escape("val_images_C1 (2, 128, 128), val_label_C1 (2, 64, 128) should")):
        load_dataset("busi_npz", root=tmp_path, split="val", image_size=64)


@pytest.mark.parametrize("dtype, top", [(np.uint16, 4000), (np.float32, 37.5)])
def test_npz_images_of_other_types_are_scaled_to_0_1_by_their_maximum(tmp_path, dtype, top):
    """A hand-converted npz (16-bit or float grey levels): brightness relative to the image, never above 1."""
    images = np.zeros((2, 28, 28), dtype)
    images[:, 3:9, 4:12] = top
    images[:, 10:14, 4:12] = top / 2
    _breastmnist_with_images(tmp_path, images)
    image = load_dataset("breastmnist", root=tmp_path, split="test", image_size=28)[0]["image"][0]
    assert float(image.max()) == 1.0 and float(image[12, 5]) == pytest.approx(0.5)


def test_busi_npz(tmp_path):
    make_busi_npz(tmp_path, resolution=128, counts=(5, 2, 3))
    dataset = load_dataset("busi_npz", root=tmp_path, split="val", image_size=SIZE)
    assert len(dataset) == 5 and dataset.labels.tolist() == [0, 0, 1, 1, 1]
    assert dataset[0]["id"] == "busi_npz-val-C1-0000" and dataset[4]["id"] == "busi_npz-val-C2-0002"
    assert set(dataset[0]["mask"].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(LayoutError, match="busi_256.npz.*python -m data_fetch busi_256"):
        load_dataset("busi_npz", root=tmp_path, resolution=256)
    with pytest.raises(ValueError, match="resolution"):
        load_dataset("busi_npz", root=tmp_path, resolution=64)


def test_busi_npz_masks_of_0_255_with_faint_noise_are_cut_at_half_their_maximum(tmp_path):
    path = make_busi_npz(tmp_path, resolution=128, counts=(1, 1, 1))
    with np.load(path) as data:
        arrays = dict(data)
    for key in [k for k in arrays if "_label_" in k]:
        arrays[key] = np.where(arrays[key] > 0, 255, 3).astype(np.uint8)  # lesion 255, background a faint 3
    np.savez(path, **arrays)
    mask = load_dataset("busi_npz", root=tmp_path, split="test", image_size=128)[0]["mask"][0]
    assert int(mask.sum()) == 16 * 24 and bool(mask[4:20, 6:30].all())  # the lesion box of make_busi_npz only


# --------------------------------------------------------------------------------------------------
# generated datasets through load_dataset


def test_synthetic_splits_are_disjoint_index_ranges():
    splits = {s: load_dataset("synthetic", split=s, image_size=32, num_samples=4, artifact_correlation=1.0)
              for s in SPLITS}
    assert isinstance(splits["train"], SyntheticUltrasound) and splits["train"].artifact_correlation == 1.0
    ids = {s: [d["id"] for d in splits[s]] for s in SPLITS}
    assert ids["val"][0] == "synthetic-1000000"
    in_order = ids["train"] + ids["val"] + ids["test"]
    assert len(set(in_order)) == 12 and ids["all"] == in_order
    assert splits["all"].class_names == ("normal", "benign", "malignant")
    assert len(load_dataset("synthetic", split="val")) == 200


def test_synthetic_splits_stay_disjoint_at_any_size():
    """Train, val and test are disjoint index ranges for every allowed size (up to 1,000,000 per split),
    so the defaults (2000 / 200 / 400) and any larger choice never share an item."""
    first_last = {}
    for split in ("train", "val", "test"):
        dataset = load_dataset("synthetic", split=split, image_size=32, num_samples=1_000_000)
        first_last[split] = [int(dataset[i]["id"].split("-")[1]) for i in (0, len(dataset) - 1)]
    assert first_last["train"][1] < first_last["val"][0] and first_last["val"][1] < first_last["test"][0]


def test_shapes_through_load_dataset():
    default = load_dataset("shapes", split="unseen")
    assert isinstance(default, ShapesBackground) and default[0]["image"].shape == (1, 224, 288)
    assert load_dataset("shapes", split="test", image_size=(56, 72))[0]["image"].shape == (1, 56, 72)


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"name": "isic"}, ValueError, r"unknown dataset 'isic'.*busi.*'breastmnist'\)$"),
        ({"name": "busi_128"}, ValueError, r"busi_128 is data_fetch's name for it; load it with "
                                           r"load_dataset\('busi_npz', resolution=128\)"),
        ({"name": "breastmnist_224"}, ValueError, r"load_dataset\('breastmnist', resolution=224\)"),
        ({"name": "synthetic", "split": "dev"}, ValueError, "unknown split 'dev'.*train"),
        ({"name": "synthetic", "image_size": 0}, ValueError, "image_size"),
        ({"name": "synthetic", "augment": True}, ValueError, "augment"),
        ({"name": "synthetic", "num_samples": 0}, ValueError, "num_samples"),
        ({"name": "synthetic", "num_samples": 1_000_001}, ValueError, "num_samples"),  # would reach into val
        ({"name": "shapes", "in_channels": 3}, ValueError, "in_channels"),
        ({"name": "breastmnist", "resolution": 64}, ValueError, "resolution"),
        ({"name": "bus_bra", "folds": 2}, ValueError, r"bus_bra has no option 'folds'; its options: \['fold'\]"),
        ({"name": "busi", "resolution": 128}, ValueError, "busi has no option 'resolution'.*duplicate_distance"),
        # seed=None drew a new split at every call, so two calls' train and test overlapped
        ({"name": "busi", "seed": None}, ValueError, r"seed must be an integer >= 0, got None"),
        ({"name": "bus_uclm", "seed": -1}, ValueError, r"seed must be an integer >= 0, got -1"),
        ({"name": "busi", "seed": 1.5}, ValueError, r"seed must be an integer >= 0, got 1.5; pass an int"),
        ({"name": "busi", "seed": True}, ValueError, r"seed must be an integer >= 0, got True"),
        ({"name": "busi", "augment": "False"}, ValueError, r"augment must be True or False, got .False.; pass it unq"),
        ({"name": "busi", "cache": "False"}, ValueError, r"cache must be True or False, got 'False'"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_dataset(**kwargs)


def test_missing_data_names_the_download_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f'python -m data_fetch bus_uclm --dest "{tmp_path / "nowhere"}"'):
        load_dataset("bus_uclm", root=tmp_path / "nowhere")
    monkeypatch.setenv("MTLEARN_DATA", str(tmp_path))  # default root: <data root>/<folder>
    with pytest.raises(FileNotFoundError,
                       match=r"busi_npz does not exist\. Fetch it with `python -m data_fetch busi_256`"):
        load_dataset("busi_npz", resolution=256)


def test_wrong_layout_names_the_expected_files(tmp_path):
    save_png(tmp_path / "stray.png", random_image(np.random.default_rng(0)))
    for name, expected in [("busi", "Dataset_BUSI_with_GT"), ("bus_bra", "bus_data.csv"), ("bus_uclm", "INFO.csv"),
                           ("breastmnist", "breastmnist.npz")]:
        with pytest.raises(LayoutError, match=expected):
            load_dataset(name, root=tmp_path)


@pytest.mark.parametrize("name, maker, inner", [("busi", make_busi, "Dataset_BUSI_with_GT"),
                                                ("bus_bra", make_bus_bra, "BUSBRA"),
                                                ("bus_uclm", make_bus_uclm, "dataset/BUS-UCLM")])
def test_two_copies_of_a_dataset_are_named_not_one_picked(tmp_path, name, maker, inner):
    """An archive extracted twice (or a copy kept beside an edited one) loaded whichever sorted first."""
    maker(tmp_path / "extracted")
    maker(tmp_path / "extracted (1)", seed=1)
    copies = f"extracted/{inner}, extracted (1)/{inner}"
    with pytest.raises(LayoutError, match=re.escape(f"{tmp_path} holds 2 copies of the dataset ({copies}); move all "
                                                    f"but one out of {tmp_path}") + "$"):  # fetching again: no help
        load_dataset(name, root=tmp_path)
    shutil.rmtree(tmp_path / "extracted (1)")
    assert len(load_dataset(name, root=tmp_path, split="all")) > 0


def test_datasets_pickle_for_dataloader_workers(busi):
    """Spawned DataLoader workers (macOS, Windows) receive the dataset pickled."""
    import pickle

    root, _ = busi
    dataset = load_dataset("busi", root=root, split="train", image_size=SIZE, augment=True)
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


def test_an_empty_split_of_a_partial_copy_is_refused_naming_the_fix(tmp_path):
    """Three usable images (one per class; the fixture skips its masked-less ones) give a train split of three
    and empty val and test splits, which loaded with a warning only and failed later, or scored nothing."""
    make_busi(tmp_path, per_class=1)
    with pytest.warns(UserWarning, match=r"split\(s\) \['val', 'test'\] got no items"):
        assert len(load_dataset("busi", root=tmp_path, split="train")) == 3
    for split in ("val", "test"):
        says = (rf"busi's '{split}' split in .* is empty: the folder holds 3 usable image\(s\) in all, too few for "
                rf"a {split} split.*python -m data_fetch busi --dest .*, or load split='all'")
        with pytest.warns(UserWarning, match="got no items"), pytest.raises(LayoutError, match=says):
            load_dataset("busi", root=tmp_path, split=split)


def cut_short(data: bytes) -> bytes:
    return data[: len(data) // 2]


ERROR_PAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>"  # what a host may serve under the file's name


@pytest.mark.parametrize("name, make, damage", [
    ("breastmnist", make_breastmnist, lambda data: ERROR_PAGE),
    ("breastmnist", make_breastmnist, cut_short),
    ("busi_npz", make_busi_npz, cut_short),
], ids=["breastmnist-error-page", "breastmnist-cut-short", "busi_npz-cut-short"])
def test_a_damaged_npz_names_the_file_and_the_fix(tmp_path, name, make, damage):
    """Was numpy's advice to pass allow_pickle=True (unsafe) or a bare zipfile.BadZipFile."""
    path = make(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a valid .npz file") + r".*error page.*"
                       + re.escape(f"delete it and run `python -m data_fetch {path.stem} --dest")) as caught:
        load_dataset(name, root=tmp_path)
    assert "allow_pickle" not in str(caught.value)


def test_an_error_of_the_reader_itself_is_not_blamed_on_the_npz(tmp_path):
    from mtlearn.data.real import _npz

    path = make_breastmnist(tmp_path)
    with pytest.raises(ValueError, match="^zero-size array") as caught, _npz(path) as data:
        data["train_images"][:0].max()  # a reader's bug (an empty class, say), not a damaged download
    assert "not a valid .npz" not in str(caught.value)


@pytest.mark.parametrize("damage", [lambda data: b"", lambda data: ERROR_PAGE, cut_short],
                         ids=["empty", "error-page", "cut-short"])
def test_unreadable_busi_files_are_skipped_and_named(tmp_path, damage):
    """Like an image without its mask, an image or mask that cannot be read is skipped, with a warning
    naming it and the fix (was PIL's UnidentifiedImageError, and no dataset at all)."""
    base = make_busi(tmp_path, per_class=3)["base"]
    for path in (base / "benign" / "benign (2).png", base / "malignant" / "malignant (3)_mask.png"):
        path.write_bytes(damage(path.read_bytes()))
    # every image is hashed (read whole) when the dataset is made, a mask only by its header: a mask
    # cut short after its header is found when its item is read
    skipped = 1 if damage is cut_short else 2
    with pytest.warns(UserWarning, match=rf"busi: skipped {skipped} unreadable image file\(s\), e\.g\. .*"
                      + re.escape("is not a readable image") + r".*delete them and run `python -m data_fetch busi"):
        dataset = load_dataset("busi", root=tmp_path, split="all", image_size=SIZE)
    kept = {r.id for r in dataset.records}
    assert kept == {f"{c} ({n})" for c in ("normal", "benign", "malignant") for n in (1, 2, 3)} - {
        "benign (2)", *(["malignant (3)"] if skipped == 2 else [])}
    assert sum(" is not a readable image " in note for note in dataset.problems) == skipped
    errors = []
    for i in range(len(dataset)):
        try:
            dataset[i]
        except ValueError as error:
            errors.append(str(error))
    assert len(errors) == 2 - skipped
    assert all("malignant (3)_mask.png is not a readable image" in e and "delete it and run `python -m data_fetch "
               "busi --dest" in e for e in errors)


def test_a_file_cut_short_names_itself_when_its_item_is_read(tmp_path):
    """Images are read lazily: the error of one cut short names the file and the fix, not only PIL's words."""
    info = make_bus_bra(tmp_path, patients=3)
    image = info["base"] / "Images" / "bus_0002-l.png"
    image.write_bytes(cut_short(image.read_bytes()))
    dataset = load_dataset("bus_bra", root=tmp_path, split="all", image_size=SIZE)
    index = [r.id for r in dataset.records].index("bus_0002-l")
    with pytest.raises(ValueError, match=re.escape(f"{image} is not a readable image") + ".*"
                       + re.escape(f'delete it and run `python -m data_fetch bus_bra --dest "{tmp_path}"` again')):
        dataset[index]


def test_busi_without_any_image_says_so(tmp_path):
    for class_name in ("normal", "benign", "malignant"):
        (tmp_path / "Dataset_BUSI_with_GT" / class_name).mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"no images found under .*Dataset_BUSI_with_GT.*"
                       r"If the download is incomplete, fetch it again with `python -m data_fetch busi --dest"):
        load_dataset("busi", root=tmp_path)  # was numpy's "need at least one array to stack"


def test_bus_uclm_without_any_image_says_so(tmp_path):
    base = make_bus_uclm(tmp_path)["base"]
    for image in (base / "images").glob("*.png"):
        image.unlink()
    with pytest.raises(LayoutError, match=r"no images found under .*images: BUS-UCLM has <PATIENT>_<NNN>\.png"):
        load_dataset("bus_uclm", root=tmp_path)  # it was an empty dataset, failing later in a sampler


def test_root_that_is_a_file_is_named_as_such(tmp_path):
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    with pytest.raises(ValueError, match=r"root .*notes\.txt is a file, not a folder"):  # was "does not exist"
        load_dataset("busi", root=stray)
    with pytest.raises(TypeError, match=r"root must be the dataset's folder, a str or pathlib\.Path, got 5; e\.g\. "
                                        r"root='data/busi'"):
        load_dataset("busi", root=5)  # "expected str, bytes or os.PathLike object, not int"
    path = make_breastmnist(tmp_path)  # the dataset's file itself: its folder is meant
    with pytest.raises(ValueError, match=r"is a file, not a folder.*" + re.escape(f"root={str(tmp_path)!r}")):
        load_dataset("breastmnist", root=path)
    with pytest.raises(ValueError, match=re.escape(f"root {stray / 'busi'} cannot be a folder: {stray} is a file. "
                                                   "Choose another root (it receives the dataset, from `python -m "
                                                   "data_fetch busi --dest DIR`)")):
        load_dataset("busi", root=stray / "busi")  # was "not downloaded", with a --dest that could not succeed


@pytest.mark.parametrize("text, says", [
    ("ID,kFold\n", r"5-fold-cv\.csv has its header \(ID, kFold\) but no rows"),
    ("", r"5-fold-cv\.csv is empty"),
], ids=["header-only", "empty"])
def test_a_csv_without_rows_says_so(tmp_path, text, says):
    """Was "lacks the column(s) ['ID', 'kFold']; found []" although the header was there."""
    info = make_bus_bra(tmp_path, patients=3)
    (info["base"] / "5-fold-cv.csv").write_text(text)
    with pytest.raises(ValueError, match=says + r".*delete it and run `python -m data_fetch bus_bra --dest"):
        load_dataset("bus_bra", root=tmp_path)


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


@pytest.mark.parametrize("kwargs, message", [
    ({"in_channels": 3.0}, r"in_channels must be 1 \(grey\) or 3 \(grey repeated\), got 3.0"),
    ({"duplicate_distance": -1}, r"duplicate_distance must be an integer >= 0, got -1"),  # would group nothing
    ({"duplicate_distance": "5"}, r"duplicate_distance must be an integer >= 0, got '5'"),
])
def test_bad_arguments_of_a_real_dataset(busi, kwargs, message):
    root, _ = busi
    with pytest.raises(ValueError, match=message):
        load_dataset("busi", root=root, **kwargs)


@pytest.mark.parametrize("name, make, saved, asked", [
    ("busi_npz", make_busi_npz, 256, None), ("busi_npz", make_busi_npz, 128, 256),
    ("breastmnist", make_breastmnist, 224, None),
])
def test_a_file_of_another_resolution_names_the_resolution_to_ask_for(tmp_path, name, make, saved, asked):
    """The folder holds the 256-px file and the default (128) was asked for: the fix is resolution=256,
    not a download of the 128-px file."""
    make(tmp_path, resolution=saved, counts=(2, 1, 1))
    options = {} if asked is None else {"resolution": asked}
    with pytest.raises(LayoutError, match=rf"but has \S+: pass resolution={saved} to load that one"):
        load_dataset(name, root=tmp_path, **options)
    assert len(load_dataset(name, root=tmp_path, split="all", resolution=saved)) > 0


def test_a_file_the_system_will_not_let_us_read_is_not_called_damaged(tmp_path, monkeypatch):
    """A PermissionError is the file system's, not the file's: "not a readable image ... delete it and fetch
    again" would send the user to delete a good file."""
    import PIL.Image

    make_busi(tmp_path, per_class=3)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(PIL.Image, "open", denied)
    with pytest.raises(PermissionError, match="Permission denied"):
        load_dataset("busi", root=tmp_path, split="all", image_size=SIZE)


def test_a_normal_scans_faint_mask_noise_is_not_a_lesion(tmp_path):
    """The threshold was half the mask's own maximum: a normal mask with a few grey levels of noise (JPEG
    history, a careless export) became a lesion of every pixel above 2. A dark red lesion stays a lesion."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 5, (40, 48)).astype(np.uint8)  # 0..4: no lesion
    lesion = np.zeros((40, 48), np.uint8)
    lesion[6:20, 10:30] = 1
    red = np.zeros((40, 48, 3), np.uint8)
    red[..., 0] = lesion * 160  # a red lesion, darker than half of white in grey (0.30 * 160 = 48)
    masks = {"normal (1)": noise, "benign (1)": lesion * 200 + noise, "malignant (1)": red,
             "benign (2)": lesion * 2, "benign (3)": lesion * 100}  # two levels: a class index, a dim lesion
    make_small_busi(tmp_path, masks)
    items = by_id(load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48)))
    assert items["normal (1)"]["mask"].sum() == 0
    for stem in ("benign (1)", "malignant (1)", "benign (2)", "benign (3)"):
        assert torch.equal(items[stem]["mask"][0], torch.from_numpy(lesion.astype(np.float32))), stem


def test_a_folder_named_like_an_image_is_no_image(tmp_path):
    """A folder "normal (2).png" (an unzip tool's leftover) was read as BUSI's image, and ended the load with a
    bare IsADirectoryError; read where a file is expected, a folder is named as such."""
    make_small_busi(tmp_path, {"normal (1)": np.zeros((40, 48), np.uint8)})
    folder = tmp_path / "Dataset_BUSI_with_GT" / "normal" / "normal (2).png"
    folder.mkdir()
    dataset = load_dataset("busi", root=tmp_path, split="all", image_size=(40, 48))
    assert list(by_id(dataset)) == ["normal (1)"] and not dataset.problems
    with pytest.raises(DamagedFileError, match=r"normal \(2\)\.png is a folder, not an image file"):
        real._read_image(folder)


def test_the_readmes_own_images_example_trains_on_patient_level_splits(tmp_path):
    """README, "Your own images": the example runs as printed (its folder here, one epoch) on the layout it names."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = textwrap.dedent(readme.split("**Your own images**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0])
    folder_line = 'folder = Path("~/data/mine").expanduser()'
    assert folder_line in example and 'epochs=20, out_dir="runs/mine")' in example
    example = example.replace(folder_line, f"folder = Path({str(tmp_path)!r})").replace(
        'epochs=20, out_dir="runs/mine")', f"epochs=1, out_dir={str(tmp_path / 'run')!r}, progress=False)")
    rng = np.random.default_rng(0)
    rows = ["id,label,patient"]
    for i in range(40):
        save_png(tmp_path / "images" / f"case{i:02d}.png", random_image(rng))
        save_png(tmp_path / "masks" / f"case{i:02d}.png", box_mask(5, 5 + i % 9, 12, 14).astype(np.uint8) * 255)
        rows.append(f"case{i:02d},{('benign', 'malignant')[i % 2]},p{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    names = {}
    exec(example, names)
    data = names["data"]
    assert sum(len(d) for d in data.values()) == 40 and min(len(d) for d in data.values()) > 0
    assert data["train"].tasks == ("seg", "cls") and data["train"].class_names == ("benign", "malignant")
    patients = [{int(r.id[4:]) // 2 for r in d.records} for d in data.values()]  # p{i // 2}
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    item = data["train"][0]
    assert item["image"].shape == item["mask"].shape == (1, 128, 128) and set(item["mask"].unique().tolist()) <= {0, 1}
    assert len(names["history"]) == 1 and (tmp_path / "run" / "best.pt").is_file()  # for mt.load_model


def test_records_with_and_without_masks_in_one_dataset_are_refused(tmp_path):
    """Items with a "mask" and items without it: the DataLoader failed later in default_collate's KeyError."""
    save_png(tmp_path / "a.png", random_image(np.random.default_rng(0)))
    records = [real.Record(id=f"{i}", label=0, image=tmp_path / "a.png", masks=masks, group=f"{i}")
               for i, masks in enumerate([(), None, ()])]
    with pytest.raises(ValueError, match=r"mine: 1 of 3 records have masks=None \(e\.g\. \['1'\]\) and the others "
                                         r"have masks; give every record its mask files \(\(\) for an image without"):
        real.UltrasoundDataset("mine", "train", records, ("benign",), image_size=(SIZE, SIZE))
    many = records + [dataclasses.replace(r, id=f"{i}", masks=None) for i, r in enumerate(records * 2, 3)]
    with pytest.raises(ValueError, match=r"mine: 7 of 9 records have masks=None \(e\.g\. \['1', '3', '4'\]\) and"):
        real.UltrasoundDataset("mine", "train", many, ("benign",), image_size=(SIZE, SIZE))
    unmasked = [dataclasses.replace(r, masks=None) for r in records]
    assert real.UltrasoundDataset("mine", "train", unmasked, ("benign",), image_size=(SIZE, SIZE)).tasks == ("cls",)
