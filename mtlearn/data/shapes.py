"""The shapes-on-background benchmark of Meng et al. (2019), regenerated exactly from a seed.

Each image shows one grey shape (intensity 0.5) on a black (0) or white (1) background:

    task "shape":       0 circle, 1 elongated bar
    task "background":  0 black,  1 white

The training split never shows a circle on black, and shape and background are strongly
correlated in it (circles are always on white, most bars on black). A model that learns "dark
blob on white = circle" scores perfectly on the seen combinations and fails on the held-out
"unseen" split (100 circles on black). That is the test of a representation that keeps the task
(shape) apart from the nuisance (background).

    split     circle/white  bar/white  bar/black  circle/black
    train          600         100        500          0
    val            100         100        100          0
    test           100         100        100          0
    unseen           0           0          0        100

Each split draws its sizes and centres independently. At the paper's 224 x 288 no two images
coincide; at small sizes the geometry has few distinct values (a large bar at 56 x 72 fits only a
couple of centre columns), so some images repeat across splits: at 56 x 72 (the course preset),
8 of the 300 test and 3 of the 300 validation images equal a training image, labels included
(seed 0). Read seen-test accuracies there as slightly optimistic; the unseen split
(circles on black, never in training) cannot repeat a training image.

Reference: Meng, Pawlowski, Rueckert, Kainz, "Representation Disentanglement for Multi-task
Learning with application to Fetal Ultrasound", MICCAI PIPPI/SUSI workshop 2019, arXiv 1908.07885.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from mtlearn.utils import check_item_index, check_size

# (shape, background) -> number of images, per split. shape: 0 circle, 1 bar; background: 0 black, 1 white.
SPLIT_COUNTS = {
    "train": {(0, 1): 600, (1, 1): 100, (1, 0): 500},
    "val": {(0, 1): 100, (1, 1): 100, (1, 0): 100},
    "test": {(0, 1): 100, (1, 1): 100, (1, 0): 100},
    "unseen": {(0, 0): 100},
}
SPLITS = (*SPLIT_COUNTS, "all")  # "all": the four splits one after the other
REFERENCE_SIZE = (224, 288)  # the paper's image size; shape sizes below are given at this size
CIRCLE_RADIUS = (10.0, 80.0)  # circle radius range, pixels at the reference size
BAR_HALF_HEIGHT = (10.0, 40.0)  # bar half-height d range; the half-width is 4 d
BAR_ASPECT = 4.0  # half-width / half-height of a bar
SHAPE_INTENSITY = 0.5  # grey value of the shape before z-scoring
MIN_SIZE = 16  # smallest height or width that still draws recognisable shapes
MIN_EXTENT = 2.0  # smallest circle radius and bar half-height in pixels (a radius-1 "circle" is a plus sign)


class ShapesBackground(Dataset):
    """Grey shapes on a black or white background, the synthetic benchmark of Meng et al. (2019).

    Why it is built like this: the paper asks whether a network can classify the shape while its
    representation ignores the background. The training set correlates the two tasks and hides
    one combination (circle on black) entirely, so only a representation that keeps shape and
    background apart generalises to the "unseen" split.

    Each item is a dict:
        "image":      (1, H, W) float32, z-scored per image (mean 0, std 1)
        "mask":       (1, H, W) float32, 1 inside the shape
        "shape":      int, 0 circle / 1 bar (also "label")
        "background": int, 0 black / 1 white
        "id":         str, "<split>_<index>"

    Shapes are drawn fully inside the image, axis-aligned, with a random position and size. Sizes
    scale with `image_size` relative to the paper's 224 x 288 (scale = min(H/224, W/288)), so a
    56 x 72 version is the paper's benchmark at a quarter of the resolution. Choice documented here
    (not in the paper): a bar 8 d wide (half-width 4 d) with d up to 40 does not fit in 288 pixels, so the upper
    limit of d is lowered to what fits (about 36 at 224 x 288); circle radii are limited likewise.
    Below about 45 x 58 the smallest radius and half-height would be under 2 pixels (a circle of one
    pixel or a plus sign), so they are at least 2 pixels there (where 2 pixels fit).

    Args:
        split: "train", "val", "test", "unseen" or "all" (the four, concatenated).
        image_size: (H, W) or one int for a square image; at least 16 pixels each.
        seed: the whole split is a function of (seed, split); each split draws from its own random
            stream, so changing one split's size never changes another split.
    """

    class_names = ("circle", "bar")  # the "shape" / "label" classes
    background_names = ("black", "white")  # the "background" classes

    def __init__(self, split: str = "train", image_size: int | tuple[int, int] = REFERENCE_SIZE, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split = split
        self.image_size = check_size(image_size, minimum=MIN_SIZE)
        # below 2**32: NumPy splits a larger seed into 32-bit words, so [7 + 2**32, 0] (train) would
        # draw the stream of [7, 1] (another split of seed 7)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be a non-negative integer below 2**32, got {seed!r}; take e.g. seed % 2**32")
        self.seed = int(seed)
        names = tuple(SPLIT_COUNTS) if split == "all" else (split,)
        self.items = [item for name in names for item in _draw_split(name, self.image_size, self.seed)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[check_item_index(index, len(self.items))]
        mask = _render_mask(self.image_size, item)
        image = np.full(self.image_size, float(item["background"]), dtype=np.float32)
        image[mask] = SHAPE_INTENSITY
        image = (image - image.mean()) / image.std()  # z-score per image, as in the paper
        return {
            "image": torch.from_numpy(image[None]),  # (1, H, W)
            "mask": torch.from_numpy(mask[None].astype(np.float32)),  # (1, H, W)
            "shape": item["shape"],
            "background": item["background"],
            "label": item["shape"],
            "id": item["id"],
        }

    @property
    def labels(self) -> np.ndarray:
        """(N,) shape of every item (its "label", as every dataset's `labels` is), without drawing images."""
        return np.array([item["shape"] for item in self.items], dtype=np.int64)

    @property
    def backgrounds(self) -> np.ndarray:
        """(N,) background of every item, without drawing images."""
        return np.array([item["background"] for item in self.items], dtype=np.int64)

    def __repr__(self) -> str:
        return f"ShapesBackground(split={self.split!r}, image_size={self.image_size}, seed={self.seed}, n={len(self)})"


def _size_ranges(image_size: tuple[int, int]) -> dict[str, tuple[float, float]]:
    """Circle radius and bar half-height ranges at this image size, limited to what fits."""
    height, width = image_size
    scale = min(height / REFERENCE_SIZE[0], width / REFERENCE_SIZE[1])
    # a shape with integer centre c and half-extent e covers c-e..c+e, which must lie in 0..size-1
    max_radius = (min(height, width) - 1) // 2
    max_half_height = min((height - 1) // 2, ((width - 1) // 2) / BAR_ASPECT)
    top_radius = min(CIRCLE_RADIUS[1] * scale, max_radius)
    top_half_height = min(BAR_HALF_HEIGHT[1] * scale, max_half_height)
    # below about 45 x 58 the paper's smallest shapes would be a pixel or two: MIN_EXTENT instead
    radius = (min(max(CIRCLE_RADIUS[0] * scale, MIN_EXTENT), top_radius), top_radius)
    half_height = (min(max(BAR_HALF_HEIGHT[0] * scale, MIN_EXTENT), top_half_height), top_half_height)
    return {"radius": radius, "half_height": half_height}


def _draw_split(split: str, image_size: tuple[int, int], seed: int) -> list[dict]:
    """Shape, background, size and centre of every item of `split` (images are drawn lazily)."""
    stream = list(SPLIT_COUNTS).index(split)
    rng = np.random.default_rng([seed, stream])  # one independent stream per (seed, split)
    combos = [combo for combo, count in SPLIT_COUNTS[split].items() for _ in range(count)]
    order = rng.permutation(len(combos))  # mix the combinations so any prefix holds all of them
    ranges = _size_ranges(image_size)
    height, width = image_size
    items = []
    for index, k in enumerate(order):
        shape, background = combos[k]
        if shape == 0:
            half_h = half_w = rng.uniform(*ranges["radius"])
        else:
            half_h = rng.uniform(*ranges["half_height"])
            half_w = BAR_ASPECT * half_h
        # integer centre at least ceil(extent) from every border: the shape lies fully inside
        cy = int(rng.integers(np.ceil(half_h), height - np.ceil(half_h)))
        cx = int(rng.integers(np.ceil(half_w), width - np.ceil(half_w)))
        items.append({
            "shape": int(shape), "background": int(background), "half_h": float(half_h),
            "half_w": float(half_w), "cy": cy, "cx": cx, "id": f"{split}_{index:04d}",
        })
    return items


def _render_mask(image_size: tuple[int, int], item: dict) -> np.ndarray:
    """Boolean (H, W) mask of the item's shape."""
    ys = np.arange(image_size[0])[:, None] - item["cy"]  # (H, 1)
    xs = np.arange(image_size[1])[None, :] - item["cx"]  # (1, W)
    if item["shape"] == 0:
        return ys**2 + xs**2 <= item["half_h"] ** 2
    return (np.abs(ys) <= item["half_h"]) & (np.abs(xs) <= item["half_w"])
