"""Every dataset of the course behind one function: `load_dataset(name, split=...)`.

  name         what                                          labels                      split
  synthetic    SyntheticUltrasound, generated on the fly     normal/benign/malignant     fixed index ranges
  shapes       ShapesBackground (Meng et al. 2019)           circle/bar (+ background)   the paper's
  busi         BUSI, 780 PNGs                                normal/benign/malignant     ours, by duplicate cluster
  busi_npz     BUSI pre-resized by MedSegBench (128/256 px)  benign/malignant            official
  bus_bra      BUS-BRA, 1,875 PNGs of 1,064 patients         benign/malignant            official test, ours by patient
  bus_uclm     BUS-UCLM, 683 PNGs of 38 patients             normal/benign/malignant     ours, by patient
  breastmnist  BreastMNIST, 28 or 224 px, no masks           normal-or-benign/malignant  official

Real datasets are downloaded by `python -m data_fetch NAME` into `data_fetch.default_data_dir()`;
`root` points elsewhere. Items are dicts: "image" (C, H, W) float32 in [0, 1], "mask" (1, H, W)
0/1 (not for BreastMNIST), "label" int, "id" str (the source file's stem; for the .npz releases
`breastmnist-<split>-<index>` and `busi_npz-<split>-<C1|C2>-<index>`), and "artifact" 0/1
where the data say so (BUS-UCLM: Doppler overlay or caliper marks). Shapes differs, as in its
paper: (1, H, W) images z-scored per image (mean 0, std 1), and "shape" and "background" labels
(see ShapesBackground). Every dataset has `labels`, the (N,) class of every item.

Splits are deterministic for a seed and never split a group: a patient (BUS-BRA, BUS-UCLM) or a
cluster of near-duplicate images (BUSI, which does not identify patients). BreastMNIST and busi_npz
come with their publishers' splits, drawn image by image from BUSI: near-duplicates can straddle them.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from data_fetch import SOURCES, completion_marker, default_data_dir, get_source, missing_files
from mtlearn.data.splits import (
    DUPLICATE_MAX_DISTANCE, SPLIT_FRACTIONS, difference_hash, duplicate_groups, split_by_group,
)
from mtlearn.data.synthetic import MIN_SIZE as SYNTHETIC_MIN_SIZE, SyntheticUltrasound
from mtlearn.data.transforms import (
    augment_item,
    augmentation,
    check_in_channels,
    random_states,
    reseed,
    resize_image,
    resize_mask,
)
from mtlearn.utils import (
    check_bool,
    check_folder,
    check_int,
    check_item_index,
    check_size,
    is_int,
    world_and_rank,
)

DATASETS = ("synthetic", "shapes", "busi", "busi_npz", "bus_bra", "bus_uclm", "breastmnist")
SPLITS = ("train", "val", "test", "all")
DEFAULT_IMAGE_SIZE = 128  # all ultrasound datasets; shapes keeps its own default (224, 288)
SYNTHETIC_SIZES = {"train": 2000, "val": 200, "test": 400}  # default number of items per split
# Synthetic splits are disjoint index ranges of one deterministic stream.
SYNTHETIC_FIRST_INDEX = {"train": 0, "val": 1_000_000, "test": 2_000_000}
SIZE_MISMATCH_POLICIES = ("skip", "resize")


@dataclass(frozen=True)
class Record:
    """One image of a real dataset, before loading."""

    id: str  # source file stem (npz: "breastmnist-test-0007", "busi_npz-test-C2-0007"), unique in the dataset
    label: int  # index into the dataset's class_names
    image: Path | np.ndarray  # a file, or an (H, W) array (npz datasets)
    masks: tuple[Path, ...] | np.ndarray | None  # files OR-merged (() = empty mask), an array, None = no masks
    group: str  # patient or duplicate cluster: a split never separates a group
    artifact: int | None = None  # 1 = nuisance overlay in the image, None = not recorded
    colour_coded: bool = False  # masks are BUS-UCLM colour masks: lesion = red or green pixels


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int | Sequence[int] | None = None,
    seed: int = 0,
    augment: bool = False,
    cache: bool = True,
    in_channels: int = 1,
    on_size_mismatch: str = "skip",
    **kwargs,
) -> Dataset:
    """One split of dataset `name` (see the module docstring for the names).

    Args:
        root: the dataset's folder (what `python -m data_fetch NAME --dest DIR` filled); default
            `default_data_dir() / <folder>`. Ignored by the generated datasets.
        split: "train", "val", "test" or "all" (shapes also has "unseen").
        image_size: int or (H, W); default 128 px, and (224, 288) for shapes. Every image is resized to
            it whatever its own shape (a non-square scan is stretched: pass (H, W) near its ratio to keep
            a lesion's height-to-width ratio).
        seed: chooses our splits (not the official ones) and the generated data; augmentations
            follow torch's random generator (torch.manual_seed), which DataLoader workers and
            checkpoints carry. With workers, each draws from its own generator, so another
            num_workers draws other augmentations (the same again for the same num_workers).
        augment: random left-right flips and +-25 degree rotations of image and mask (real data).
        cache: keep resized images in memory after their first use (real data). A DataLoader
            worker holds its own copy of the dataset, gone when the worker ends (every epoch unless
            persistent_workers=True, which a resumable fit warns against): with workers every epoch
            reads the images again, in parallel.
        in_channels: 1 (grey) or 3 (grey repeated, for ImageNet-style encoders); shapes: 1.
        on_size_mismatch: what to do with images whose mask has another size: "skip" them, or
            "resize" both to `image_size` anyway. Either way they are listed in `size_mismatches`.
            A mask of another size was drawn on another crop (BUS-UCLM), so a resized one does not
            line up with its image: "resize" suits uses that ignore the masks (classification,
            denoising).
        **kwargs: dataset options. synthetic: those of SyntheticUltrasound, plus `num_samples`
            per split; busi: `duplicate_distance`; bus_bra: `fold` (official test fold);
            busi_npz / breastmnist: `resolution` (128/256; 28/224), which file is read; the images
            are resized to `image_size` all the same (pass both for the file's own size).

    Raises FileNotFoundError (a LayoutError when the folder is there) naming the data_fetch command
    when the dataset is not downloaded, its files are not where they should be, or `split` would
    be empty (a partial copy); DamagedFileError when a file it needs whole (a CSV, an npz) cannot be
    read. Unreadable images are skipped, with a warning naming them.
    """
    if name not in DATASETS:
        call = _load_call(name)
        hint = f" ({name} is data_fetch's name for it; load it with {call})" if call else ""
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}{hint}")
    # seed=None would draw a new split at every call: the train and test splits of two calls would overlap
    seed = check_int("seed", seed, 0)
    augment, cache = check_bool("augment", augment), check_bool("cache", cache)
    if on_size_mismatch not in SIZE_MISMATCH_POLICIES:  # for every dataset: a typo must not pass unseen
        raise ValueError(f"on_size_mismatch must be one of {SIZE_MISMATCH_POLICIES}, got {on_size_mismatch!r}")
    if name == "shapes":
        return _shapes(split, image_size, seed, augment, in_channels, **kwargs)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    # the generated data's own minimum for it, else "ints >= 8" and then, for 8, "ints >= 32"
    size = check_size(DEFAULT_IMAGE_SIZE if image_size is None else image_size,
                      minimum=SYNTHETIC_MIN_SIZE if name == "synthetic" else 8)
    if name == "synthetic":
        if augment:
            raise ValueError("augment=True applies to real datasets; every synthetic item is already new")
        _check_options(name, SyntheticUltrasound, kwargs, fixed=("image_size", "seed", "in_channels", "first_index"))
        return _synthetic(split, size, seed, in_channels, **kwargs)
    if augment and split in ("val", "test"):  # metrics of flipped, turned images: not the data's own
        warnings.warn(f"augment=True on the {split!r} split: its metrics would be those of randomly flipped and "
                      "turned images, different on every pass; augment the training split only", stacklevel=2)

    _check_options(name, READERS[name], kwargs)
    fetch_name = _fetch_name(name, kwargs.get("resolution"))
    if root is not None and not isinstance(root, (str, os.PathLike)):  # Path(5): "expected str, bytes or os.PathLike"
        raise TypeError(f"root must be the dataset's folder, a str or pathlib.Path, got {root!r}; e.g. "
                        f"root='data/{get_source(fetch_name).folder}', or None for the default")
    folder = Path(root).expanduser() if root is not None else default_data_dir() / get_source(fetch_name).folder
    command = f"python -m data_fetch {fetch_name}" + (f' --dest "{folder}"' if root is not None else "")
    if folder.is_file():  # e.g. root="data/breastmnist.npz": the file, not the folder that holds it
        hint = f", here root={str(folder.parent)!r}" if folder.name == get_source(fetch_name).filename else ""
        raise ValueError(f"root {folder} is a file, not a folder; pass the dataset's folder (what "
                         f"`python -m data_fetch {fetch_name} --dest DIR` fills){hint}")
    # a file above it (root="notes.txt/busi"): else the advice would be a data_fetch --dest that cannot succeed
    check_folder(folder, "root", f"the dataset, from `python -m data_fetch {fetch_name} --dest DIR`", write=False)
    source = get_source(fetch_name)
    if not folder.is_dir():
        if root is not None and folder.name == folder.parent.name == source.folder and (
                completion_marker(folder.parent, fetch_name).exists()):  # data/busi/busi: its folder named twice
            raise FileNotFoundError(f"{folder} does not exist, but {folder.parent} holds {name}: pass "
                                    f"root={str(folder.parent)!r}, the dataset's own folder")
        raise FileNotFoundError(f"{name} is not downloaded: {folder} does not exist. Fetch it with `{command}`")
    marker = completion_marker(folder, fetch_name)
    if source.extract and (folder / source.filename).exists() and not marker.exists():
        raise LayoutError(
            f"{folder} holds {source.filename} but its unpacking did not finish (no {marker.name}). "
            f"Run `{command}`: it checks the archive and unpacks it again, without downloading"
        )
    try:
        records, class_names, problems = READERS[name](folder, split, seed, **kwargs)
    except _TwoCopiesError as error:
        raise LayoutError(str(error)) from None
    except LayoutError as error:
        inside = folder / source.folder
        if root is not None and completion_marker(inside, fetch_name).exists():  # the folder holding the datasets
            raise LayoutError(f"{error}. {folder} holds the datasets' folders, {name}'s among them: pass "
                              f"root={str(inside)!r}, the dataset's own folder") from None
        others = [n for n in SOURCES if get_source(n).folder != source.folder and completion_marker(folder, n).exists()]
        if others:  # fetching `name` into another dataset's folder would only mix the two
            raise LayoutError(f"{error}. It holds data_fetch's download of {others[0]!r}, not {name}: pass "
                              f"{name}'s own folder as root (or load that one from it: "
                              f"{_load_call(others[0]) or f'load_dataset({others[0]!r})'})") from None
        raise LayoutError(f"{error}. If the download is incomplete, fetch it again with `{command}`") from None
    except DamagedFileError as error:  # fetching again alone would keep it: data_fetch only checks files exist
        raise DamagedFileError(f"{error}; delete it and run `{command}` again") from None
    # said once here, not only kept in a list nobody reads; unreadable files first, with their fix
    unreadable = [note for note in problems if NOT_AN_IMAGE in note]
    others = [note for note in problems if NOT_AN_IMAGE not in note]
    if unreadable:
        warnings.warn(f"{name}: skipped {len(unreadable)} unreadable image file(s), e.g. {unreadable[0]!r}; "
                      f"delete them and run `{command}` again", stacklevel=2)
    if others:
        warnings.warn(f"{name}: {len(others)} note(s) on the files, e.g. {others[:2]}; see dataset.problems",
                      stacklevel=2)
    # data_fetch's marker lists every file it unpacked: any gone since (deleted, a partial copy of the
    # folder) would silently shrink the dataset. A hand-unpacked folder has no marker and no list.
    missing = missing_files(folder, fetch_name)
    if missing:
        warnings.warn(f"{name}: {len(missing)} file(s) of the download are missing from {folder} (e.g. "
                      f"{missing[0]}); `{command}` restores them", stacklevel=2)
    if not records:  # a partial copy: an empty split would fail later, in a sampler or a mean, or score nothing
        usable = len(READERS[name](folder, "all", seed, **kwargs)[0]) if split != "all" else 0
        why = (f"the folder holds {usable} usable image(s) in all, too few for a {split} split"
               if usable else f"the folder holds no usable image ({problems[0] if problems else 'none found'})")
        if usable and "duplicate_distance" in kwargs:  # a large one joins every image into one group, one split
            why += (f" (or duplicate_distance={kwargs['duplicate_distance']} joined them into too few groups of "
                    f"near-duplicates: the default is {DUPLICATE_MAX_DISTANCE})")
        raise LayoutError(f"{name}'s {split!r} split in {folder} is empty: {why}. A partial copy? Fetch the "
                          f"whole dataset with `{command}`" + (", or load split='all'" if usable else ""))
    return UltrasoundDataset(
        name, split, records, class_names, size, in_channels, augment, cache, seed, on_size_mismatch, problems,
        fetch_command=command,
    )


class LayoutError(FileNotFoundError):
    """The dataset folder exists but does not hold the files the loader expects."""


class _TwoCopiesError(LayoutError):
    """The dataset folder holds the dataset twice: fetching it again would not help."""


class DamagedFileError(ValueError):
    """A file of the dataset is there but cannot be read: a download or copy cut short, or a host's
    error page saved under the file's name."""


class UltrasoundDataset(Dataset):
    """One split of a real dataset: records -> resized, cached, optionally augmented tensors.

    Attributes: `class_names`, `tasks` (("seg", "cls") or ("cls",) without masks), `records`,
    `labels` (N,), `size_mismatches` (ids whose image and mask sizes differ), `problems` (notes
    on files the loader skipped or found odd).
    """

    def __init__(
        self,
        name: str,
        split: str,
        records: list[Record],
        class_names: tuple[str, ...],
        image_size: tuple[int, int] = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE),
        in_channels: int = 1,
        augment: bool = False,
        cache: bool = True,
        seed: int = 0,
        on_size_mismatch: str = "skip",
        problems: Sequence[str] = (),
        fetch_command: str | None = None,  # said with the fix when a file turns out damaged while loading
    ):
        in_channels, augment = check_in_channels(in_channels), check_bool("augment", augment)
        cache = check_bool("cache", cache)
        self.name, self.split, self.class_names = name, split, tuple(class_names)
        self.image_size, self.in_channels = check_size(image_size, minimum=8), in_channels
        self.problems, self.fetch_command = list(problems), fetch_command
        self.size_mismatches = [r.id for r in records if _sizes_differ(r)]
        if self.size_mismatches:
            skipped = on_size_mismatch == "skip"
            if skipped:
                mismatched = set(self.size_mismatches)
                records = [r for r in records if r.id not in mismatched]
                self.problems += [f"{item}: image and mask sizes differ, skipped" for item in self.size_mismatches]
            warnings.warn(
                f"{name}: {len(self.size_mismatches)} image/mask pairs differ in size "
                f"(e.g. {self.size_mismatches[:3]}); "
                + ("skipped them (on_size_mismatch='resize' keeps them)" if skipped
                   else "resized both, so those masks do not line up with their images")
                + "; see dataset.size_mismatches",
                stacklevel=3,
            )
        self.records = list(records)
        unmasked = [r.id for r in self.records if r.masks is None]
        if 0 < len(unmasked) < len(self.records):  # items with and without "mask": the batches would not collate
            raise ValueError(f"{name}: {len(unmasked)} of {len(self.records)} records have masks=None (e.g. "
                             f"{unmasked[:3]}) and the others have masks; give every record its mask files (() for "
                             "an image without a lesion), or none of them (a classification-only dataset)")
        self.tasks = ("cls",) if unmasked else ("seg", "cls")
        self._augment = augmentation() if augment else None  # reseeded per item: _reseed_augmentation
        self._random_states = random_states(self._augment) if augment else []
        self._cache: dict[int, tuple] | None = {} if cache else None

    @property
    def labels(self) -> np.ndarray:
        """(N,) class index of every item."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        summary = ", ".join(f"{c}: {n}" for c, n in zip(self.class_names, counts))
        return f"UltrasoundDataset({self.name!r}, split={self.split!r}, {len(self)} items: {summary})"

    def __getitem__(self, index: int) -> dict:
        index = check_item_index(index, len(self.records))  # also the cache's key: ds[-1] would be a second copy
        record = self.records[index]
        image, mask = self._resized(index)
        if self._augment is not None:
            self._reseed_augmentation()
            image, mask = augment_item(self._augment, image, mask)
        item = {"image": image.repeat(self.in_channels, 1, 1), "label": record.label, "id": record.id}  # (C, H, W)
        if mask is not None:
            # (1, H, W); never the cached tensor: an augmentation that neither flips nor turns returns its input
            item["mask"] = mask.clone()
        if record.artifact is not None:
            item["artifact"] = record.artifact
        return item

    def _reseed_augmentation(self) -> None:
        """Draw this item's flip and angle from torch's random generator.

        Why: every DataLoader worker (and every torchrun rank) holds a copy of this dataset; with
        one fixed random state inside, worker k's i-th item would be flipped and turned exactly like
        every other worker's i-th item. torch's generator is seeded per worker by the DataLoader
        and saved in the trainer's checkpoints, so a resumed run draws the same augmentations.
        """
        _, rank = world_and_rank()
        seed = int(torch.randint(0, 2**31 - 1, ()))
        reseed(self._random_states, seed + 1_000_003 * rank)

    def _resized(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image (1, H, W) and mask (1, H, W) or None at `image_size`, from the cache if possible."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        record = self.records[index]
        try:  # files are read here, not when the dataset is made: one cut short is found now
            image = resize_image(_read_image(record.image), self.image_size)
            parts = [] if record.masks is None else _read_masks(record.masks, record.colour_coded)
        except DamagedFileError as error:
            fix = f"run `{self.fetch_command}` again" if self.fetch_command else "fetch the dataset again"
            raise DamagedFileError(f"{error}; delete it and {fix}") from None
        mask = None
        if record.masks is not None:
            mask = torch.zeros_like(image)  # () = an empty mask (BUSI normal images may lack the file)
            for part in parts:  # extra masks are OR-merged
                mask = torch.maximum(mask, resize_mask(part, self.image_size))
        if self._cache is not None:
            self._cache[index] = (image, mask)
        return image, mask


# --------------------------------------------------------------------------------------------------
# Readers: folder -> (records of the split, class names, problems)

BUSI_CLASSES = ("normal", "benign", "malignant")
BUSI_MASK_NAME = re.compile(r"(?P<stem>.+)_mask(?:_\d+)?")  # "benign (4)_mask", "benign (4)_mask_1"


def _read_busi(folder: Path, split: str, seed: int, duplicate_distance: int = DUPLICATE_MAX_DISTANCE):
    """BUSI: <class>/<class> (N).png + <class> (N)_mask.png [+ _mask_1.png, _mask_2.png]."""
    # before reading any image; -1 would group nothing, and near-duplicates could land in train and test
    duplicate_distance = check_int("duplicate_distance", duplicate_distance, 0)
    base = _locate(
        folder, lambda d: (d / "benign").is_dir() and (d / "malignant").is_dir(),
        "Dataset_BUSI_with_GT/{benign,malignant,normal}/ holding '<class> (N).png' and '<class> (N)_mask.png'",
    )
    missing = [name for name in BUSI_CLASSES if not (base / name).is_dir()]
    if missing:  # a partial copy would load, with a class silently empty
        raise LayoutError(f"{base} has no {', '.join(missing)}/ folder; BUSI has one folder per class {BUSI_CLASSES}")
    records, problems, found = [], [], 0
    for label, class_name in enumerate(BUSI_CLASSES):
        images, masks = {}, defaultdict(list)
        for path in _pngs(base / class_name):
            match = BUSI_MASK_NAME.fullmatch(path.stem)
            if match:
                masks[match["stem"]].append(path)
            else:
                images[path.stem] = path
        found += len(images)
        for stem, path in images.items():
            if not masks[stem] and class_name != "normal":
                problems.append(f"{stem}: no mask file, skipped")
                continue
            if _unreadable((path, *masks[stem]), problems):
                continue
            records.append(Record(stem, label, path, tuple(sorted(masks[stem])), group=""))
        problems += [f"{stem}: mask without image, ignored" for stem in masks if stem not in images]
    # near-duplicates (same hash within a few bits) form one group, so one split; hashing reads every
    # image whole, so one cut short after its header is skipped here too
    hash_of = {}
    for r in records:
        try:
            hash_of[r.id] = _file_hash(r.image, r.image.stat().st_mtime_ns)  # (64,)
        except DamagedFileError as error:
            problems.append(f"{error}, skipped")
    records = [r for r in records if r.id in hash_of]
    if not records:  # rather than np.stack's "need at least one array to stack"
        raise LayoutError(
            f"no images found under {base}: its {'/, '.join(BUSI_CLASSES)}/ folders hold no '<class> (N).png'"
            if not found else f"none of the {found} images under {base} can be used, e.g. {problems[:2]}"
        )
    hashes = np.stack([hash_of[r.id] for r in records])  # (N, 64)
    groups = duplicate_groups(hashes, duplicate_distance)
    # a cluster is named after its first image, not numbered: the numbers follow the order of the files
    # found, so one image added renamed every cluster after it (and the split dealt them anew)
    first = {}
    for r, g in zip(records, groups):
        first[g] = min(first.get(g, r.id), r.id)
    records = [Record(r.id, r.label, r.image, r.masks, group=f"cluster-{first[g]}") for r, g in zip(records, groups)]
    return _take_split(records, split, seed), BUSI_CLASSES, problems


BUS_BRA_CLASSES = ("benign", "malignant")


def _read_bus_bra(folder: Path, split: str, seed: int, fold: int | str | None = None):
    """BUS-BRA: Images/bus_0001-l.png, Masks/mask_0001-l.png, bus_data.csv, 5-fold-cv.csv.

    The official folds are patient-level: `fold` (default: the first) is the test split, the
    other patients are split into train and val (7:1) by patient.
    """
    expected = "BUSBRA/bus_data.csv, BUSBRA/5-fold-cv.csv, BUSBRA/Images/bus_0001-l.png, BUSBRA/Masks/mask_0001-l.png"
    base = _locate(folder, lambda d: (d / "bus_data.csv").is_file(), expected)
    for needed in ("5-fold-cv.csv", "Images", "Masks"):
        if not (base / needed).exists():
            raise LayoutError(f"{base} has bus_data.csv but no {needed}; expected {expected}")
    # stripped: a hand-edited "bus_0001-l " would silently fall out of its fold (and into train)
    fold_rows = [(row["ID"].strip(), row["kFold"].strip())
                 for row in _read_csv(base / "5-fold-cv.csv", ("ID", "kFold"))]
    folds = {image_id: name for image_id, name in fold_rows if image_id and name}
    if not folds:
        raise DamagedFileError(f"{base / '5-fold-cv.csv'} gives no image a fold (every row lacks an ID or a kFold)")
    # a blank row (a spreadsheet's last line) made "" the first fold name, so the default test split was empty
    blank = [i for i, (image_id, name) in enumerate(fold_rows, start=1) if not (image_id and name)]
    records, problems = [], [f"5-fold-cv.csv row {i} (empty lines not counted): no ID or no kFold, skipped"
                             for i in blank]
    rows = _read_csv(base / "bus_data.csv", ("ID", "Case", "Pathology"))
    for row in rows:
        image_id = row["ID"].strip()
        image, mask = _png(base / "Images", image_id), _png(base / "Masks", f"mask_{image_id[4:]}")
        pathology = row["Pathology"].strip().lower()
        if pathology not in BUS_BRA_CLASSES or not image.is_file() or not mask.is_file():
            problems.append(f"{image_id}: pathology {row['Pathology']!r} or its image/mask file missing, skipped")
            continue
        if _unreadable((image, mask), problems):
            continue
        if image_id not in folds:
            problems.append(f"{image_id}: not in 5-fold-cv.csv, so in no test fold (train or val)")
        case = row["Case"].strip()
        if not case:  # else every image without one would be one "patient", kept together in one split
            problems.append(f"{image_id}: no Case (patient) in bus_data.csv, a patient of its own")
        records.append(Record(image_id, BUS_BRA_CLASSES.index(pathology), image, (mask,), group=case or image_id))
    listed = {row["ID"].strip() for row in rows}  # an image the table does not name has no label: said, not used
    problems += [f"{p.stem}: in Images/ but not in bus_data.csv, ignored" for p in _pngs(base / "Images")
                 if p.stem not in listed]
    fold_names = sorted(set(folds.values()), key=lambda f: (len(f), f))
    fold = fold_names[0] if fold is None else str(fold)
    if fold not in fold_names:
        raise ValueError(f"fold {fold!r} is not in 5-fold-cv.csv; expected one of {fold_names}")
    records.sort(key=lambda r: r.id)
    if split == "all":
        return records, BUS_BRA_CLASSES, problems
    # a patient with any image in the test fold goes wholly to test
    test_patients = {r.group for r in records if folds.get(r.id) == fold}
    if split == "test":
        return [r for r in records if r.group in test_patients], BUS_BRA_CLASSES, problems
    rest = [r for r in records if r.group not in test_patients]
    return _take_split(rest, split, seed, fractions=(("train", 0.7), ("val", 0.1))), BUS_BRA_CLASSES, problems


BUS_UCLM_CLASSES = ("normal", "benign", "malignant")


def bus_uclm_patient(image_id: str) -> str:
    """The patient of a BUS-UCLM image, from its file stem ("ALWI_000" -> "ALWI"): splits keep a patient's
    images together, and so must any cross-validation over them (mtlearn.probes.cross_validated_probe)."""
    return image_id.rsplit("_", 1)[0]


def _read_bus_uclm(folder: Path, split: str, seed: int):
    """BUS-UCLM: images/<PATIENT>_<NNN>.png, masks/ (same names, colour-coded), INFO.csv (';').

    Mask colours give the class: green benign, red malignant (also beside green), none = normal. INFO.csv's
    Doppler and Marks (caliper) flags give the "artifact" label.
    """
    base = _locate(
        folder, lambda d: (d / "INFO.csv").is_file() and (d / "images").is_dir() and (d / "masks").is_dir(),
        "BUS-UCLM/INFO.csv (Image;Label;Doppler;Marks), BUS-UCLM/images/<PATIENT>_<NNN>.png, "
        "BUS-UCLM/masks/<same name>",
    )
    info = {Path(row["Image"]).stem: row for row in _read_csv(base / "INFO.csv", ("Image", "Doppler", "Marks"), ";")}
    records, problems = [], []
    images = _pngs(base / "images")
    if not images:  # rather than an empty dataset that fails later, in a sampler or a mean
        raise LayoutError(f"no images found under {base / 'images'}: BUS-UCLM has <PATIENT>_<NNN>.png files there")
    for image in images:
        mask, row = _png(base / "masks", image.stem), info.get(image.stem)
        if not mask.is_file():
            problems.append(f"{image.stem}: no mask file, skipped")
            continue
        if _unreadable((image, mask), problems):
            continue
        if row is None:
            problems.append(f"{image.stem}: not in INFO.csv, artifact flag unknown (0)")
        try:  # the mask's pixels are read here: one cut short is skipped like an empty one, not fatal
            label = _colour_class(mask, mask.stat().st_mtime_ns)
        except DamagedFileError as error:
            problems.append(f"{error}, skipped")
            continue
        stated = (row or {}).get("Label", "").strip().lower()
        if stated in BUS_UCLM_CLASSES and BUS_UCLM_CLASSES.index(stated) != label:
            problems.append(f"{image.stem}: INFO.csv says {stated}, the mask colour says {BUS_UCLM_CLASSES[label]}")
        flags = {key: _flag(row[key]) for key in ("Doppler", "Marks")} if row is not None else {}
        unread = [f"{key}={row[key]!r}" for key, flag in flags.items() if flag is None]
        if unread:  # counted as not set, but said: a misread flag would change the artifact experiment
            problems.append(f"{image.stem}: INFO.csv flag(s) {', '.join(unread)} unreadable, taken as 0")
        artifact = int(any(flags.values()))
        records.append(Record(
            image.stem, label, image, (mask,), group=bus_uclm_patient(image.stem), artifact=artifact, colour_coded=True,
        ))
    found = {image.stem for image in images}
    problems += [f"{stem}: in INFO.csv but its image is missing" for stem in info if stem not in found]
    problems += [f"{mask.stem}: mask without image, ignored" for mask in _pngs(base / "masks")
                 if mask.stem not in found]
    return _take_split(records, split, seed), BUS_UCLM_CLASSES, problems


# MedMNIST labels 0 malignant, 1 normal + benign; flipped here so that, as in every other set, the
# last class is malignant and a binary metric's positive class (1) is the one to catch
BREASTMNIST_CLASSES = ("normal_or_benign", "malignant")


def _read_breastmnist(folder: Path, split: str, seed: int, resolution: int = 28):
    """BreastMNIST npz: {train,val,test}_images (N, H, W) uint8 and _labels (N, 1); official splits.
    (N, H, W, 1) or (N, H, W, 3) images, as a hand-converted or other MedMNIST file may hold, become grey
    (_grey_stack).

    Labels are flipped from MedMNIST's (0 malignant) to 1 malignant, see BREASTMNIST_CLASSES.
    """
    path = _locate_npz(folder, "breastmnist", resolution)
    records = []
    with _npz(path) as data:
        _require_keys(path, data, [f"{s}_{k}" for s in SPLITS[:3] for k in ("images", "labels")])
        for part in _official_parts(split):
            key = f"{part}_images"
            images, labels = _grey_stack(data[key], path, key), data[f"{part}_labels"].reshape(-1)
            _check_counts(path, {key: images, f"{part}_labels": labels})
            if not np.isin(labels, (0, 1)).all():  # 1 - label would make a class -1, or 2 a class 2 of 2
                raise LayoutError(f"{path.name}: {part}_labels holds {np.setdiff1d(labels, (0, 1)).tolist()}; "
                                  "BreastMNIST's labels are 0 (malignant) and 1 (normal or benign), so it may be "
                                  "another MedMNIST set's file saved under this name")
            records += [
                Record(f"breastmnist-{part}-{i:04d}", 1 - int(labels[i]), images[i], None, group="")
                for i in range(len(labels))
            ]
    return records, BREASTMNIST_CLASSES, []


BUSI_NPZ_CLASSES = ("benign", "malignant")


def _read_busi_npz(folder: Path, split: str, seed: int, resolution: int = 128):
    """MedSegBench's BUSI npz: {split}_images_C1/_C2 (benign/malignant) and {split}_label_C1/_C2 (masks)."""
    path = _locate_npz(folder, "busi_npz", resolution)
    records = []
    with _npz(path) as data:
        _require_keys(path, data, [f"{s}_{k}_C{c}" for s in SPLITS[:3] for k in ("images", "label") for c in (1, 2)])
        for part in _official_parts(split):
            for label, code in enumerate(("C1", "C2")):
                keys = (f"{part}_images_{code}", f"{part}_label_{code}")
                images, masks = (_grey_stack(data[key], path, key) for key in keys)
                _check_counts(path, dict(zip(keys, (images, masks))), same_size=True)
                masks = masks > masks.max() / 2  # 0/1 or 0/255: binary either way
                records += [
                    Record(f"busi_npz-{part}-{code}-{i:04d}", label, images[i], masks[i], group="")
                    for i in range(len(images))
                ]
    return records, BUSI_NPZ_CLASSES, []


READERS: dict[str, Callable] = {
    "busi": _read_busi, "busi_npz": _read_busi_npz, "bus_bra": _read_bus_bra,
    "bus_uclm": _read_bus_uclm, "breastmnist": _read_breastmnist,
}


# --------------------------------------------------------------------------------------------------
# Generated datasets


class _Concatenated(ConcatDataset):
    """ConcatDataset that keeps the class names, tasks, labels and artifact flags of its parts, and indexes as
    they do (no negative indices, a message naming the range)."""

    def __init__(self, datasets):
        super().__init__(datasets)
        self.class_names, self.tasks = datasets[0].class_names, datasets[0].tasks

    @property
    def labels(self) -> np.ndarray:
        """(N,) class of every item."""
        return np.concatenate([d.labels for d in self.datasets])

    @property
    def artifacts(self) -> np.ndarray:
        """(N,) artifact flag of every item."""
        return np.concatenate([d.artifacts for d in self.datasets])

    def __getitem__(self, index: int) -> dict:
        return super().__getitem__(check_item_index(index, len(self)))

    def __repr__(self) -> str:
        return f"{len(self)} items, split 'all' = " + " + ".join(repr(d) for d in self.datasets)


def _synthetic(split: str, image_size, seed: int, in_channels: int, num_samples: int | None = None, **kwargs):
    """SyntheticUltrasound for one split; `num_samples` (default SYNTHETIC_SIZES) sets each split's size."""
    if split == "all":
        return _Concatenated([_synthetic(s, image_size, seed, in_channels, num_samples, **kwargs) for s in SPLITS[:3]])
    size = SYNTHETIC_SIZES[split] if num_samples is None else num_samples
    if not is_int(size) or not 1 <= size <= 1_000_000:
        raise ValueError(f"num_samples must be an integer in [1, 1000000], got {size!r}")
    return SyntheticUltrasound(
        num_samples=size, image_size=image_size, seed=seed, in_channels=in_channels,
        first_index=SYNTHETIC_FIRST_INDEX[split], **kwargs,
    )


def _shapes(split: str, image_size, seed: int, augment: bool, in_channels: int, **kwargs):
    from mtlearn.data.shapes import ShapesBackground

    if augment:  # flips would be harmless, but intensity tricks would defeat the benchmark: keep it as published
        raise ValueError("augment=True is not available for shapes: the benchmark is used as published")
    if not is_int(in_channels) or in_channels != 1:  # True == 1
        raise ValueError(f"shapes images are grey: in_channels must be 1, got {in_channels!r}")
    _check_options("shapes", ShapesBackground, kwargs, fixed=("split", "image_size", "seed"))
    if image_size is not None:
        kwargs["image_size"] = image_size
    return ShapesBackground(split=split, seed=seed, **kwargs)


# --------------------------------------------------------------------------------------------------
# Helpers


def _take_split(records: list[Record], split: str, seed: int, fractions=SPLIT_FRACTIONS) -> list[Record]:
    """The records of `split` under a group-aware, stratified split (all of them for "all")."""
    records = sorted(records, key=lambda r: r.id)  # independent of the order the file system lists them
    if split == "all" or not records:
        return records
    names = split_by_group([r.group or r.id for r in records], [r.label for r in records], seed, fractions)
    return [r for r, name in zip(records, names) if name == split]


def _official_parts(split: str) -> tuple[str, ...]:
    return SPLITS[:3] if split == "all" else (split,)


def _check_options(name: str, reader: Callable, options: dict,
                   fixed: Sequence[str] = ("folder", "split", "seed")) -> None:
    """Raise ValueError naming the options `reader` accepts if `options` holds another one.

    `fixed`: the parameters of `reader` that load_dataset sets itself (not options).
    """
    import inspect

    accepted = [p for p in inspect.signature(reader).parameters if p not in fixed]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(map(repr, unknown))}; its options: {accepted or 'none'}")


# dataset: (default resolution, {resolution: data_fetch name})
NPZ_RESOLUTIONS = {
    "busi_npz": (128, {128: "busi_128", 256: "busi_256"}),
    "breastmnist": (28, {28: "breastmnist", 224: "breastmnist_224"}),
}


def dataset_folder(name: str, data_root: str | Path | None = None, option: str = "data_root") -> Path:
    """The folder of real dataset `name` in `data_root`, the folder that holds one folder per dataset
    (as `$MTLEARN_DATA` does; None: default_data_dir()). It is the `root` that load_dataset takes.

    option: what the caller calls data_root (a notebook parameter, the command line's --data-root),
    for the message when data_root looks like the dataset's own folder instead.
    """
    root = Path(data_root).expanduser() if data_root is not None else default_data_dir()
    # a file there: "not found in FILE/busi" with a data_fetch command into that path could not succeed
    check_folder(root, option, "one folder per dataset, from python -m data_fetch", write=False)
    fetch_name = _fetch_name(name, None)
    folder = root / get_source(fetch_name).folder

    def passing(value: Path) -> str:  # how the caller writes the option: --data-root "PATH" or data_root='PATH'
        return f'{option} "{value}"' if option.startswith("--") else f"{option}={str(value)!r}"

    given = passing(root.parent)
    if root.name == folder.name and root.is_dir() and any(root.iterdir()) and not folder.is_dir():
        raise FileNotFoundError(f"{option} {root} looks like the {name!r} folder itself; {option} is the folder "
                                f"that holds one folder per dataset: pass {given}")
    # deeper inside it, e.g. ~/data/busi/Dataset_BUSI_with_GT: "not found in .../Dataset_BUSI_with_GT/busi", and a
    # data_fetch command that downloaded the dataset again into a folder nested in its own. A folder of that
    # name may also be something else (a project called busi): both ways on are named
    inside = next((parent for parent in root.parents if parent.name == folder.name), None)
    if inside is not None and not folder.is_dir():
        raise FileNotFoundError(f"dataset {name!r} was not found in {folder}, and {option} {root} lies inside a "
                                f"folder named {folder.name!r} ({inside}). If that folder is the dataset, pass "
                                f"{passing(inside.parent)} ({option} is the folder that holds one folder per "
                                f"dataset); if not, download it with python -m data_fetch {fetch_name} --dest "
                                f"\"{folder}\"")
    archive = root / get_source(fetch_name).filename
    if archive.is_file() and not folder.is_dir():  # downloaded by hand into data_root: "download it first" misled
        raise FileNotFoundError(
            f"{option} {root} holds {archive.name}, the {name!r} archive, but no {folder.name}/ folder: move the "
            f"archive into {folder} (make the folder) and run python -m data_fetch {fetch_name} --dest \"{folder}\", "
            "which checks it and unpacks it without downloading")
    marker = completion_marker(root, fetch_name)
    if marker.is_file() and not folder.is_dir():  # e.g. fetched with --dest ~/data instead of --dest ~/data/busi
        raise FileNotFoundError(
            f"{option} {root} holds the {name!r} dataset itself (its {marker.name}), not a folder per dataset; "
            f"rename {root} to {root.parent / folder.name} and pass {given}, or move its contents into {folder}")
    # another dataset's own folder (UMS-Rep reads BUS-BRA first from a data_root meant for BUSI's folder)
    other = next((n for n in SOURCES if completion_marker(root, n).is_file()), None)
    holds_folders = any((root / get_source(n).folder).is_dir() for n in SOURCES)  # a stray marker beside them
    if other is not None and not folder.is_dir() and not holds_folders:
        raise FileNotFoundError(f"{option} {root} is the {other!r} dataset's own folder, not the folder that holds "
                                f"one folder per dataset (where {name!r} would be {folder.name}/): pass {given}")
    return folder


def _load_call(fetch_name: str) -> str | None:
    """The load_dataset call of a data_fetch name that is not a dataset's own name (busi_128 ->
    "load_dataset('busi_npz', resolution=128)"); None for every other name."""
    return next((f"load_dataset({dataset!r}, resolution={resolution})"
                 for dataset, (_, names) in NPZ_RESOLUTIONS.items()
                 for resolution, fetched in names.items() if fetched == fetch_name and fetched != dataset), None)


def _fetch_name(name: str, resolution: int | None) -> str:
    """data_fetch name of a dataset; the npz ones come in several resolutions."""
    if name not in NPZ_RESOLUTIONS:
        return name
    default, names = NPZ_RESOLUTIONS[name]
    resolution = default if resolution is None else resolution
    if resolution not in names:
        raise ValueError(f"{name} comes in resolution {tuple(names)}, got {resolution!r}")
    return names[resolution]


def _locate_npz(folder: Path, name: str, resolution: int) -> Path:
    """The npz file of `name` at `resolution`; when only another resolution's file is there, say
    to ask for that one rather than to download this one."""
    filename = get_source(_fetch_name(name, resolution)).filename
    if not (folder / filename).is_file():
        others = {r: get_source(n).filename for r, n in NPZ_RESOLUTIONS[name][1].items() if r != resolution}
        present = [(r, f) for r, f in others.items() if (folder / f).is_file()]
        if present:
            r, f = present[0]
            raise LayoutError(f"{folder} has no {filename} (resolution {resolution}) but has {f}: pass "
                              f"resolution={r} to load that one, or fetch resolution {resolution} with "
                              f"`python -m data_fetch {_fetch_name(name, resolution)}`")
    return _locate_file(folder, filename)


def _locate(folder: Path, is_base: Callable[[Path], bool], expected: str, depth: int = 3) -> Path:
    """`folder` or the folder below it (up to `depth` levels) for which `is_base` holds; LayoutError
    when two at the same depth do (two copies, e.g. an archive extracted twice): picking one would load
    whichever sorts first, and a half-deleted or edited copy could be the one."""
    candidates = [folder]
    for _ in range(depth + 1):
        found = [candidate for candidate in candidates if is_base(candidate)]
        if len(found) > 1:
            listed = ", ".join(str(f.relative_to(folder)) for f in found)
            raise _TwoCopiesError(f"{folder} holds {len(found)} copies of the dataset ({listed}); "
                                  f"move all but one out of {folder}")
        if found:
            return found[0]
        candidates = sorted(  # hidden folders and macOS zip debris (__MACOSX) are never the dataset
            d for c in candidates for d in c.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX"))
        )
    raise LayoutError(f"{folder} does not hold the expected files: {expected}")


def _locate_file(folder: Path, filename: str) -> Path:
    path = folder / filename
    if not path.is_file():
        raise LayoutError(f"{folder} has no {filename}")
    return path


def _pngs(folder: Path) -> list[Path]:
    """PNG files of a folder, sorted; hidden files (macOS "._" copies) and folders named *.png excluded."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() == ".png" and not p.name.startswith(".") and not p.is_dir())


def _png(folder: Path, stem: str) -> Path:
    """folder/<stem>.png, or <stem>.PNG where only that exists (as _pngs lists both); the .png path
    when neither does, for the caller's "missing" note."""
    path = folder / f"{stem}.png"
    upper = folder / f"{stem}.PNG"
    return upper if not path.is_file() and upper.is_file() else path


def _csv_text(path: Path) -> str:
    """A CSV file's text: UTF-8 (with or without a byte-order mark), else Windows-1252, the encoding a
    spreadsheet exported on a Spanish or Portuguese Windows uses ("Sí" as one byte); binary data is a
    damaged file, named as one (it was a bare UnicodeDecodeError naming neither the file nor the fix)."""
    data = path.read_bytes()
    if b"\0" not in data:
        for encoding in ("utf-8-sig", "cp1252"):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                continue
    raise DamagedFileError(f"{path} is not a text (CSV) file: a download cut short, or a host's error page or a "
                           "spreadsheet saved under its name?")


def _read_csv(path: Path, required: Sequence[str], delimiter: str = ",") -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(_csv_text(path), newline=""), delimiter=delimiter)
    rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]  # trim header spaces
    columns = [(c or "").strip() for c in reader.fieldnames or []]
    if not columns:
        raise DamagedFileError(f"{path} is empty")
    missing = [c for c in required if c not in columns]
    if missing:
        raise LayoutError(f"{path.name} lacks the column(s) {missing} (delimiter {delimiter!r}); found {columns}")
    if not rows:
        raise DamagedFileError(f"{path} has its header ({', '.join(columns)}) but no rows")
    return rows


@contextmanager
def _npz(path: Path) -> Iterator[np.lib.npyio.NpzFile]:
    """np.load(path) of an .npz file; DamagedFileError naming it if it is not one, or one cut short.

    Never with allow_pickle (numpy's advice for a file it cannot read): a pickle can run any code.
    """
    damaged = DamagedFileError(f"{path} is not a valid .npz file ({path.stat().st_size:,} bytes): a download "
                               "cut short, or an error page saved under its name")
    with open(path, "rb") as f:  # opened here: np.load leaves its own handle open when the file is no zip
        try:
            data = np.load(f)  # an error page: ValueError (with numpy's advice to allow pickles)
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error):
            raise damaged from None
        with data:
            try:
                yield data  # arrays are read when indexed: a member cut short fails in the caller's body
            except (EOFError, zipfile.BadZipFile, zlib.error):  # not ValueError: the caller's own, e.g. max()
                raise damaged from None


def _require_keys(path: Path, data, keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in data.files]
    if missing:
        raise LayoutError(f"{path.name} lacks the arrays {missing}; found {sorted(data.files)}")


NOT_AN_IMAGE = "is not a readable image"  # in the notes on skipped files: load_dataset warns about them apart


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """Image.open(path); DamagedFileError naming the file if it is empty, cut short or not an image."""
    try:
        with Image.open(path) as img:  # pixels are decoded when used: the errors can come from the body
            yield img
    except Image.DecompressionBombError as error:  # Pillow's message names no file
        raise DamagedFileError(
            f"{path} is larger than Pillow opens ({error}); if the file is yours and meant to be that large, set "
            "PIL.Image.MAX_IMAGE_PIXELS = None before loading, or downscale it (the datasets here are ~500 px)"
        ) from None
    except (OSError, SyntaxError) as error:
        if isinstance(error, IsADirectoryError):  # a folder where the dataset's layout has an image file
            raise DamagedFileError(f"{path} is a folder, not an image file") from None
        if getattr(error, "errno", None) is not None:  # the file system's (not found, no permission), not the file's
            raise
        raise DamagedFileError(
            f"{path} {NOT_AN_IMAGE} ({path.stat().st_size:,} bytes: empty, cut short, or an error page)"
        ) from None


def _unreadable(paths: Sequence[Path], problems: list[str]) -> bool:
    """Whether one of `paths` is no image at all (empty, an error page); noted in `problems`.

    Only the headers are read, as cheap as the size check every record gets; a file cut short
    further on is found when its pixels are read.
    """
    for path in paths:
        try:
            with _opened(path):
                pass
        except DamagedFileError as error:
            problems.append(f"{error}, skipped")
            return True
    return False


def read_image(image: str | os.PathLike | np.ndarray, image_size: int | Sequence[int], in_channels: int = 1
               ) -> torch.Tensor:
    """One image prepared as the datasets here prepare theirs, for a model to predict on: a file (PNG, JPEG ...;
    colour and alpha dropped) or an (H, W) array -> (in_channels, *image_size) float32 in [0, 1] (resized
    as resize_image does: area-averaged when shrinking, bilinear when enlarging; 8-bit divided by 255,
    16-bit by its own maximum: see _read_image).

        model = mt.load_model("runs/a/best.pt")
        x = read_image("scan.png", model.config.image_size, model.config.in_channels)
        outputs = model(x[None])  # a batch of one
    """
    in_channels = check_in_channels(in_channels)
    if isinstance(image, torch.Tensor):  # Path() said "expected str, bytes or os.PathLike object, not Tensor"
        raise TypeError("read_image takes a file or an (H, W) NumPy array; a tensor is already an image: give it "
                        "to the model as it is, or as image.numpy() to be prepared (scaled and resized) here")
    image = image if isinstance(image, np.ndarray) else Path(image).expanduser()
    return resize_image(_read_image(image), check_size(image_size, minimum=8)).repeat(in_channels, 1, 1)


def _read_image(image: Path | np.ndarray) -> np.ndarray:
    """A file or an array -> (H, W) float32 grey in [0, 1]. Colour and alpha are dropped.

    8-bit images are divided by 255. 16-bit PNGs and non-uint8 arrays are divided by their own
    maximum when it exceeds 1 (arrays already in [0, 1] are kept): their true bit depth is not
    recorded (a 12-bit scan saved in 16 bits would stay nearly black divided by 65535), so their
    brightness is relative to the image. The datasets loaded here ship 8-bit files; this path is for
    images converted by hand.
    """
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        return array / 255.0 if image.dtype == np.uint8 else array / max(float(array.max()), 1.0)
    with _opened(image) as img:
        if img.mode.startswith("I"):  # 16-bit PNG
            array = np.asarray(img, dtype=np.float32)
            return array / max(float(array.max()), 1.0)
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


MASK_THRESHOLD = 127  # 8-bit mask levels above this are lesion


def _read_masks(masks: tuple[Path, ...] | np.ndarray, colour_coded: bool = False) -> list[np.ndarray]:
    """Mask files (or an array) -> list of (H, W) 0/1 float32 arrays, to be OR-merged.

    Each pixel's brightest channel is read, so white, red or green lesions on black, in grey, RGB or
    RGBA files, come out alike. A mask of two levels, 0 and one other (0/255, 0/1 saved unscaled, 0/2
    as a class index), is that level's lesion. Any other mask (anti-aliased edges, compression noise)
    is lesion above half the 8-bit range (MASK_THRESHOLD), not above half its own maximum: that read
    the faint noise of a normal scan's mask (a few grey levels) as a lesion; 16-bit masks are brought to
    the 8-bit range first (65535 -> 255) when a level exceeds 255. Colour-coded masks
    (BUS-UCLM) give their lesion pixels by `_lesion_colours`, the rule that gives the class.
    """
    if isinstance(masks, np.ndarray):
        return [masks.astype(np.float32)]
    binary = []
    for path in masks:
        if colour_coded:
            red, green = _lesion_colours(path)
            binary.append((red | green).astype(np.float32))
            continue
        with _opened(path) as img:
            if img.mode.startswith("I"):  # 16 or 32 bits: convert() would clip every value over 255 to 255 first
                levels = np.asarray(img, dtype=np.float64)
                levels = levels / 257 if levels.max() > 255 else levels  # 65535 -> 255; 0/1, 0/255 as they are
            else:
                levels = np.asarray(img.convert("RGB")).max(axis=-1)  # (H, W): the brightest channel, 0..255
        values = np.unique(levels)
        two_levels = len(values) == 2 and values[0] == 0
        threshold = 0 if two_levels or values[-1] <= 1 else MASK_THRESHOLD
        binary.append((levels > threshold).astype(np.float32))
    return binary


@lru_cache(maxsize=None)
def _file_hash(path: Path, modified: int) -> np.ndarray:
    """Perceptual hash of an image file; remembered (per modification time) across splits."""
    return difference_hash(_read_image(path))


# A BUS-UCLM mask pixel is red (green) when that channel exceeds both others by more than this. The
# masks are drawn in saturated colours, but a margin rather than a brightness cut also keeps dark
# fills (0, 120, 0) and anti-aliased or JPEG-blurred edges, while black, grey and white pixels and
# compression noise (a few levels) are never a lesion.
LESION_COLOUR_MARGIN = 64


def _lesion_colours(mask: Path) -> tuple[np.ndarray, np.ndarray]:
    """BUS-UCLM colour mask -> (red, green): (H, W) bool maps of malignant and benign lesion pixels."""
    with _opened(mask) as img:
        r, g, b = np.moveaxis(np.asarray(img.convert("RGB"), dtype=np.int16), -1, 0)
    red = r - np.maximum(g, b) > LESION_COLOUR_MARGIN
    green = g - np.maximum(r, b) > LESION_COLOUR_MARGIN
    return red, green


@lru_cache(maxsize=None)
def _colour_class(mask: Path, modified: int) -> int:
    """BUS-UCLM mask colour -> 0 normal (no lesion), 1 benign (green only), 2 malignant (any red); remembered.

    Malignant dominates: an image that shows a cancer is a malignant case whatever else it shows,
    and counting pixels would let a large benign lesion outvote a small cancer.
    """
    red, green = _lesion_colours(mask)
    return 2 if red.any() else (1 if green.any() else 0)


FLAG_YES = {"yes", "y", "true", "si", "sí", "x"}
FLAG_NO = {"", "no", "n", "false", "-"}


def _flag(value: str) -> bool | None:
    """An INFO.csv flag: True, False, or None when it cannot be read ('maybe'). A number counts by its value,
    so "1.0" (a spreadsheet's export) and "2" (a count of marks) are set and "0.0" is not."""
    text = str(value).strip().lower()
    if text in FLAG_YES or text in FLAG_NO:
        return text in FLAG_YES
    try:
        number = float(text)
    except ValueError:
        return None
    return None if number != number else number != 0  # NaN: unknown


def _sizes_differ(record: Record) -> bool:
    if not isinstance(record.image, Path) or not record.masks:
        return False
    with _opened(record.image) as img:
        size = img.size
    for path in record.masks:
        with _opened(path) as img:
            if img.size != size:
                return True
    return False


def _check_counts(path: Path, arrays: dict[str, np.ndarray], same_size: bool = False) -> None:
    """LayoutError unless the arrays of `path` hold as many items each (and, `same_size`, images of one size):
    one cut short would drop its partner's last items silently, or fail on the first missing one."""
    shapes = {key: array.shape[:3] if same_size else array.shape[:1] for key, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{key} {shape}" for key, shape in shapes.items())
        raise LayoutError(f"{path.name} is inconsistent: {listed} should match")


def _grey_stack(array: np.ndarray, path: Path, key: str) -> np.ndarray:
    """(N, H, W), (N, H, W, 1) or (N, H, W, 3) array `key` of `path` -> (N, H, W); colour becomes its luminance
    with the weights PIL's convert("L") gives a PNG (ITU-R 601), rounded for integer types. Anything else,
    e.g. channels first (N, 1, H, W) or RGBA, is a LayoutError: taken as it is it would be resized into noise."""
    if array.ndim == 3:
        return array
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise LayoutError(f"{path.name}: {key} has shape {array.shape}; expected images (N, H, W), (N, H, W, 1) "
                          "or (N, H, W, 3)")
    if array.shape[-1] == 1:
        return array[..., 0]
    red, green, blue = (array[..., c].astype(np.float32) for c in range(3))
    grey = np.float32(0.299) * red + np.float32(0.587) * green + np.float32(0.114) * blue
    return (np.rint(grey) if np.issubdtype(array.dtype, np.integer) else grey).astype(array.dtype)
