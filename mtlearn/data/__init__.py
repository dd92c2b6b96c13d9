"""Data for the course: generated datasets (synthetic ultrasound, shapes) and real breast ultrasound.

    from mtlearn.data import load_dataset, read_image
    train = load_dataset("synthetic", split="train")          # no download needed
    busi = load_dataset("busi", split="test")                  # after `python -m data_fetch busi`
    x = read_image("scan.png", image_size=128)                 # one image, prepared as the datasets' are

Items are dicts of tensors ("image", "mask", "label", ...; see `load_dataset`). Real datasets live
in `default_data_dir()`: $MTLEARN_DATA, else the user cache.
"""

from data_fetch import default_data_dir
from mtlearn.data.real import (
    DATASETS,
    SPLITS,
    DamagedFileError,
    LayoutError,
    UltrasoundDataset,
    load_dataset,
    read_image,
)
from mtlearn.data.shapes import ShapesBackground
from mtlearn.data.synthetic import SyntheticUltrasound

__all__ = [
    "DATASETS", "SPLITS", "DamagedFileError", "LayoutError", "ShapesBackground", "SyntheticUltrasound",
    "UltrasoundDataset", "default_data_dir", "load_dataset", "read_image",
]
