"""The shapes-on-background benchmark: split counts, combinations, geometry, determinism."""

from collections import Counter

import numpy as np
import pytest
import torch

from mtlearn.data.shapes import SPLIT_COUNTS, ShapesBackground

SMALL = (32, 40)


# (split, n, {(shape, background): count}); shape 0 circle / 1 bar, background 0 black / 1 white
EXPECTED = [
    ("train", 1200, {(0, 1): 600, (1, 1): 100, (1, 0): 500}),
    ("val", 300, {(0, 1): 100, (1, 1): 100, (1, 0): 100}),
    ("test", 300, {(0, 1): 100, (1, 1): 100, (1, 0): 100}),
    ("unseen", 100, {(0, 0): 100}),
    ("all", 1900, {(0, 1): 800, (1, 1): 300, (1, 0): 700, (0, 0): 100}),
]


@pytest.mark.parametrize("split, n, combos", EXPECTED)
def test_split_counts_per_combination(split, n, combos):
    data = ShapesBackground(split, SMALL)
    assert len(data) == n
    pairs = Counter(zip(data.labels.tolist(), data.backgrounds.tolist()))
    assert dict(pairs) == combos


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_no_circle_on_black_outside_unseen(split):
    data = ShapesBackground(split, SMALL)
    circle_on_black = (data.labels == 0) & (data.backgrounds == 0)
    assert not circle_on_black.any()


def test_item_keys_types_and_labels_agree():
    data = ShapesBackground("val", SMALL)
    for i in range(0, len(data), 37):
        item = data[i]
        assert item["image"].shape == (1, *SMALL) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, *SMALL) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
        assert item["label"] == item["shape"] == data.labels[i]
        assert item["background"] == data.backgrounds[i]
        # and the labels say what the pixels show: a bar's mask is 4x wider than high, a circle's square
        rows, cols = item["mask"][0].nonzero(as_tuple=True)
        aspect = (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)
        assert (aspect > 2) == (item["shape"] == 1), (i, float(aspect))
        corner = item["image"][0, 0, 0] > item["image"][0].mean()  # z-scored: a white background is above the mean
        assert bool(corner) == (item["background"] == 1), i
        assert item["id"] == f"val_{i:04d}"
    assert data.class_names == ("circle", "bar")


def test_images_are_z_scored_and_drawn_from_mask_and_background():
    data = ShapesBackground("train", SMALL)
    for i in range(0, 200, 13):
        item = data[i]
        image, mask = item["image"][0], item["mask"][0].bool()
        assert abs(image.mean().item()) < 1e-4
        assert abs(image.std(unbiased=False).item() - 1) < 1e-3
        # the shape (grey 0.5) is brighter than a black background and darker than a white one
        shape_value, background_value = image[mask].mean(), image[~mask].mean()
        assert (shape_value < background_value) == (item["background"] == 1)
        # two grey levels only: shape and background
        assert len(torch.unique(image.round(decimals=4))) == 2


def _unclipped_pixels(item: dict, size: tuple[int, int], pad: int = 50) -> np.ndarray:
    """(row, col) of every pixel of the item's shape on a canvas `pad` pixels larger on each side."""
    ys = np.arange(-pad, size[0] + pad)[:, None] - item["cy"]
    xs = np.arange(-pad, size[1] + pad)[None, :] - item["cx"]
    if item["shape"] == 0:
        inside = ys**2 + xs**2 <= item["half_h"] ** 2
    else:
        inside = (np.abs(ys) <= item["half_h"]) & (np.abs(xs) <= item["half_w"])
    return np.argwhere(inside) - pad


@pytest.mark.parametrize("image_size", [(32, 40), (56, 72), (40, 32), 24, (224, 288)])
def test_shapes_fully_inside_any_image_size(image_size):
    data = ShapesBackground("test", image_size)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    for i in range(0, len(data), 29):
        mask = data[i]["mask"][0]
        assert mask.shape == size
        # every pixel of the full shape lies inside the image, and the mask is exactly that shape
        pixels = _unclipped_pixels(data.items[i], size)
        assert len(pixels) > 0
        assert pixels.min() >= 0 and (pixels < np.array(size)).all()
        assert int(mask.sum()) == len(pixels)


def test_bars_are_elongated_and_circles_round():
    data = ShapesBackground("val", (56, 72))
    for i in range(0, len(data), 11):
        rows, cols = torch.nonzero(data[i]["mask"][0], as_tuple=True)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        if data.items[i]["shape"] == 1:
            assert width >= 3 * height
        else:
            assert abs(int(width) - int(height)) <= 1


def test_sizes_scale_with_image_size():
    small = ShapesBackground("train", (56, 72))
    large = ShapesBackground("train", (224, 288))
    radii_small = np.array([it["half_h"] for it in small.items if it["shape"] == 0])
    radii_large = np.array([it["half_h"] for it in large.items if it["shape"] == 0])
    assert 2.5 - 1e-9 <= radii_small.min() and radii_small.max() <= 20 + 1e-9
    assert 10 - 1e-9 <= radii_large.min() and radii_large.max() <= 80 + 1e-9
    assert radii_large.mean() == pytest.approx(4 * radii_small.mean(), rel=0.05)


def test_bar_half_heights_follow_the_paper():
    """SPEC: bar half-height d in 10..40 at 224 x 288 (limited to what fits: 4 d <= 143, d <= 35.75)."""
    data = ShapesBackground("train", (224, 288))
    d = np.array([it["half_h"] for it in data.items if it["shape"] == 1])
    widths = np.array([it["half_w"] for it in data.items if it["shape"] == 1])
    assert 10 - 1e-9 <= d.min() and d.max() <= 40 and np.allclose(widths, 4 * d)
    assert d.max() > 30 and d.min() < 12  # the range is used, not a corner of it


def test_non_proportional_sizes_scale_by_the_smaller_ratio():
    """scale = min(H / 224, W / 288): at 112 x 288 shapes are half the paper's, not its full size."""
    data = ShapesBackground("train", (112, 288))
    radii = np.array([it["half_h"] for it in data.items if it["shape"] == 0])
    d = np.array([it["half_h"] for it in data.items if it["shape"] == 1])
    assert 5 - 1e-9 <= radii.min() and radii.max() <= 40 + 1e-9 and radii.max() > 35
    assert 5 - 1e-9 <= d.min() and d.max() <= 20 + 1e-9


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_combinations_are_mixed_so_any_prefix_holds_all_of_them(split):
    """A DataLoader without shuffling, or a quick run on the first items, still sees every combination."""
    data = ShapesBackground(split, SMALL)
    first = Counter(zip(data.labels[:30].tolist(), data.backgrounds[:30].tolist()))
    assert set(first) == set(SPLIT_COUNTS[split])


def test_deterministic_by_seed_and_splits_independent():
    a, b = ShapesBackground("train", SMALL, seed=3), ShapesBackground("train", SMALL, seed=3)
    c = ShapesBackground("train", SMALL, seed=4)
    assert torch.equal(a[5]["image"], b[5]["image"]) and a.items == b.items
    assert a.items != c.items
    # val and test have the same combinations but different random streams
    val, test = ShapesBackground("val", SMALL), ShapesBackground("test", SMALL)
    assert [(v["cy"], v["cx"], v["half_h"]) for v in val.items] != [(t["cy"], t["cx"], t["half_h"]) for t in test.items]
    # "all" is the four splits one after the other, each unchanged
    everything = ShapesBackground("all", SMALL)
    assert everything.items[: len(ShapesBackground("train", SMALL))] == ShapesBackground("train", SMALL).items
    assert everything.items[-100:] == ShapesBackground("unseen", SMALL).items


def test_works_with_a_dataloader():
    loader = torch.utils.data.DataLoader(ShapesBackground("unseen", SMALL), batch_size=16)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 1, *SMALL)
    assert batch["shape"].tolist() == [0] * 16 and batch["background"].tolist() == [0] * 16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "training"}, "unknown split 'training'"),
        ({"image_size": (8, 40)}, "image_size"),
        ({"image_size": (32, 40, 3)}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesBackground(**kwargs)


def test_bad_split_message_lists_valid_splits():
    with pytest.raises(ValueError) as info:
        ShapesBackground("holdout")
    for split in (*SPLIT_COUNTS, "all"):
        assert split in str(info.value)


def test_labels_are_the_shapes_as_every_dataset_has_them():
    """`labels` is the items' "label", the shape: what a classifier's sampler or metric reads, an array as the other
    datasets' (np.bincount(ds.labels) worked for synthetic data and failed for shapes, a method there)."""
    data = ShapesBackground("train", SMALL)
    each = [data[i]["label"] for i in range(len(data))]
    assert isinstance(data.labels, np.ndarray) and data.labels.tolist() == each
    assert data.backgrounds.tolist() == [data[i]["background"] for i in range(len(data))] != each
    assert np.bincount(data.labels).tolist() == [each.count(0), each.count(1)]


@pytest.mark.parametrize("seed", [2**32 + 7, 2**32, -1, True, 1.5])
def test_a_seed_that_could_share_another_splits_stream_is_refused(seed):
    """NumPy pads seed lists with zeros: [7 + 2**32, 0] (train) is the generator of [7, 1] (validation of seed 7)."""
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer below 2\*\*32"):
        ShapesBackground("train", SMALL, seed=seed)


def test_shapes_through_load_dataset_refuse_in_channels_true():
    from mtlearn.data import load_dataset

    with pytest.raises(ValueError, match="shapes images are grey: in_channels must be 1, got True"):
        load_dataset("shapes", split="val", image_size=SMALL, in_channels=True)


def test_the_documented_repeats_at_the_course_size_are_the_generated_ones():
    """The module docstring promises exact regeneration and quotes 8 test and 3 validation images equal to a
    training image at 56 x 72, seed 0 (an image is its mask and its background): both are checked here, with
    the first validation items' geometry, so a change to the random streams cannot pass unnoticed."""
    import hashlib

    splits = {s: ShapesBackground(s, (56, 72), seed=0) for s in ("train", "val", "test")}

    def key(item):
        return hashlib.sha1(item["mask"].numpy().tobytes()).hexdigest(), item["shape"], item["background"]

    train = {key(item) for item in splits["train"]}
    assert [sum(key(item) in train for item in splits[s]) for s in ("val", "test")] == [3, 8]
    first = [(item["cy"], item["cx"], round(item["half_h"], 3)) for item in splits["val"].items[:3]]
    assert first == [(31, 31, 5.059), (49, 44, 4.157), (38, 35, 8.341)]
    assert ShapesBackground("val", (56, 72)).items == splits["val"].items  # the default seed is 0


@pytest.mark.parametrize("image_size", [16, (24, 30), (32, 40)])
def test_small_images_still_draw_circles_and_bars(image_size):
    """Below about 45 x 58 the paper's smallest radius scales under 2 pixels: at 16 x 16 one circle
    in seven was a single pixel, a label the image did not show. Every shape is at least 2 pixels
    from its centre to its edge there."""
    data = ShapesBackground("train", image_size)
    width = image_size if isinstance(image_size, int) else image_size[1]
    radii = np.array([it["half_h"] for it in data.items if it["shape"] == 0])
    half_heights = np.array([it["half_h"] for it in data.items if it["shape"] == 1])
    assert radii.min() >= 2 - 1e-9
    assert half_heights.min() >= min(2, (width - 1) // 2 / 4) - 1e-9  # 16 wide: a bar 4 d wide fits d = 1.75
    pixels = [int(data[i]["mask"].sum()) for i in range(len(data))]
    assert min(p for p, s in zip(pixels, data.labels) if s == 0) >= 13  # a radius-2 disc


@pytest.mark.parametrize("index, error", [(1.5, TypeError), (True, TypeError), ("1", TypeError), (-1, IndexError),
                                          (300, IndexError)])
def test_an_index_that_is_not_an_item_number_is_refused(index, error):
    """ds[True] read item 1 and ds[1.5] gave the list's own message; the other datasets refuse both."""
    with pytest.raises(error, match="index must be an integer|out of range for a dataset of 300 items"):
        ShapesBackground("val", SMALL)[index]
