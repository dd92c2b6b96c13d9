"""MONAI transforms for the real datasets: resizing, and the augmentation of the ResFormer paper.

Augmentation (Bui et al. 2024): random flips and rotations of up to +-25 degrees, applied to image
and mask together so that the mask still outlines the lesion. Flips are left-right only: depth has
a direction in ultrasound (skin at the top, shadows below a mass), so an upside-down image is not
a plausible scan.

MONAI takes a few seconds to import, so each function imports it when first called: importing
`mtlearn.data` stays quick for notebooks that only use the generated datasets.
"""

from __future__ import annotations

import numpy as np
import torch

from mtlearn.utils import check_int, check_size, is_int

MAX_ROTATION_DEGREES = 25.0  # the paper's rotation range
AUGMENT_PROBABILITY = 0.5  # chance of a flip, and independently of a rotation


def check_in_channels(in_channels) -> int:
    """The channels a dataset gives its grey images: 1, or 3 (the grey repeated, for networks made for RGB)."""
    if not is_int(in_channels) or in_channels not in (1, 3):  # True is 1 and 3.0 is 3 to `in`
        raise ValueError(f"in_channels must be 1 (grey) or 3 (grey repeated), got {in_channels!r}")
    return int(in_channels)


def resize_image(image: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
    """(H, W) grey image in [0, 1] -> (1, *image_size) float32.

    Shrinking, "area" interpolation averages the pixels that fall into each output pixel, so the
    speckle does not alias. Enlarging (BreastMNIST's 28 px at 128), "area" repeats each pixel 4 or 5
    times with averaged seams between: uneven blocks. Bilinear interpolation is used then, on pixel
    centres (align_corners=False, as the masks' "nearest-exact"); a side that shrinks while the other
    grows (28 x 200 at 128 x 128) is area-averaged first.
    """
    from monai.transforms import Resize
    from monai.utils import convert_to_tensor

    image = check_grey(image, "resize_image")
    size = check_size(image_size)
    smaller = (min(size[0], image.shape[0]), min(size[1], image.shape[1]))
    resized = image[None]
    if smaller != image.shape:
        resized = Resize(smaller, mode="area")(resized)
    if smaller != size:
        resized = Resize(size, mode="bilinear")(resized)
    return convert_to_tensor(resized, dtype=torch.float32, track_meta=False)


def resize_mask(mask: np.ndarray, image_size: tuple[int, int]) -> torch.Tensor:
    """(H, W) 0/1 mask -> (1, *image_size) float32 0/1 (nearest neighbour keeps it binary).

    "nearest-exact" takes the source pixel at each output pixel's centre, so the mask stays on the
    lesion of the resized image (area-averaged or bilinear, both on pixel centres); torch's plain
    "nearest" takes each block's top-left pixel and shifts the mask by up to half an output pixel,
    which costs small lesions Dice that no model could earn back.
    """
    from monai.transforms import Resize
    from monai.utils import convert_to_tensor

    mask = check_grey(mask, "resize_mask")
    if not np.isin(mask, (0, 1)).all():  # a PNG's 0/255 came back as 0/255, not the 0/1 promised
        raise ValueError(f"resize_mask needs a 0/1 mask, got values {np.unique(mask)[:6].tolist()}: pass mask > 0")
    resized = Resize(check_size(image_size), mode="nearest-exact")(mask[None])
    return convert_to_tensor(resized, dtype=torch.float32, track_meta=False)


def check_grey(image, what: str) -> np.ndarray:
    """`image` as an (H, W) float32 array with pixels, or a ValueError naming `what` and the fix."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:  # an (H, W, 3) picture failed inside MONAI ("len(spatial_size) must be greater...")
        raise ValueError(f"{what} needs a grey (H, W) image, got shape {image.shape}: convert it to grey first "
                         "(e.g. PIL's .convert('L'))")
    if image.size == 0:
        raise ValueError(f"{what} got an empty image (shape {image.shape})")
    return image


def augmentation(seed: int = 0):
    """Random left-right flip and rotation, the same for "image" and "mask" (if the item has one).

    Works on dicts of (C, H, W) tensors: `augment({"image": x, "mask": m})`. The image is rotated
    with bilinear interpolation, the mask with nearest neighbour; corners are filled with black.
    """
    from monai.transforms import Compose, RandFlipd, RandRotated

    check_int("seed", seed, 0)  # None drew a new random stream on every run
    keys = ("image", "mask")
    return Compose(
        [
            RandFlipd(keys, prob=AUGMENT_PROBABILITY, spatial_axis=1, allow_missing_keys=True),  # axis 1 = W
            RandRotated(
                keys,
                range_x=np.deg2rad(MAX_ROTATION_DEGREES),  # in-plane angle, drawn from +-25 degrees
                prob=AUGMENT_PROBABILITY,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                allow_missing_keys=True,
            ),
        ]
    ).set_random_state(seed=seed)


def random_states(augment) -> list:
    """Every numpy RandomState inside a MONAI transform (and the transforms it wraps), once each."""
    from monai.transforms import Randomizable

    found, stack = {}, [augment]
    while stack:
        obj = stack.pop()
        if isinstance(obj, Randomizable):
            found.setdefault(id(obj.R), obj.R)
        stack += [v for v in vars(obj).values() if isinstance(v, Randomizable)]
        stack += list(getattr(obj, "transforms", ()))
    return list(found.values())


def reseed(states: list, seed: int) -> None:
    """Re-seed the RandomStates of `random_states(augment)` from one seed.

    Why not MONAI's set_random_state: it builds new RandomState objects, about 0.3 ms for this
    pipeline, paid on every item; re-seeding the existing ones costs microseconds.
    """
    check_int("seed", seed, 0)
    for k, state in enumerate(states):
        state.seed((seed + 7919 * k) % 2**32)


def augment_item(augment, image: torch.Tensor, mask: torch.Tensor | None):
    """Apply `augment` to an image (C, H, W) and optional mask (1, H, W); return plain tensors."""
    from monai.utils import convert_to_tensor

    if image.dim() != 3 or (mask is not None and (mask.dim() != 3 or mask.shape[-2:] != image.shape[-2:])):
        # else MONAI's "applying transform <RandFlipd ...>", or a mask flipped but no longer on its image
        got = "" if mask is None else f" and mask {tuple(mask.shape)}"
        raise ValueError(f"augment_item needs an image (C, H, W) and a mask (1, H, W) of the same H, W; got image "
                         f"{tuple(image.shape)}{got} (add a channel with x[None])")
    data = augment({"image": image} if mask is None else {"image": image, "mask": mask})
    image = convert_to_tensor(data["image"], dtype=torch.float32, track_meta=False)
    mask = None if mask is None else convert_to_tensor(data["mask"], dtype=torch.float32, track_meta=False)
    return image, mask
