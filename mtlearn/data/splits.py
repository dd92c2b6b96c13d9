"""Train / val / test splits that keep groups together: patients, and near-duplicate images.

Why groups? Two images of the same patient (or two near-identical frames) on both sides of a split
let a model score well by recognising the patient instead of the lesion: leakage. So a split is
drawn over groups, and every group goes whole into one split.

BUSI does not say which images come from one patient, and about a fifth of it are near-duplicates;
a perceptual hash finds them (`difference_hash`, `duplicate_groups`). It groups copies that differ by
overlays (caliper marks, text boxes), noise or a change of scale; a copy cropped by a few percent moves
its edges across the 8 x 9 thumbnail and is not grouped (10-18 bits away for a 3 % border crop of
smooth 600 x 480 test images, against the threshold of 5).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from mtlearn.data.transforms import check_grey
from mtlearn.utils import check_int, is_finite

# Split names and their share of the data, in this order (7:1:2, as BreastMNIST splits BUSI).
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
HASH_SIZE = 8  # difference hash on an 8 x 9 thumbnail: 64 bits
# Hashes at most this many bits apart count as near-duplicates. 5 of 64 is the usual "same picture"
# convention for difference hashes; it was not tuned on BUSI (lower it if groups grow too large).
DUPLICATE_MAX_DISTANCE = 5
# How split_by_group and random_subset draw, for runs that must resume on the images they started with
# (python -m mtlearn.train records it). 3 (2026-12-07): a class's group moved into a split that got none
# of them. 2 (2026-12-07): groups in a hashed order, dealt by their rarest label; random_subset stratified.
# 1: a shuffle, the most common label; the first N images for --limit.
DRAW_VERSION = 3


def split_by_group(
    groups: Sequence, labels: Sequence[int], seed: int, fractions: Sequence[tuple[str, float]] = SPLIT_FRACTIONS
) -> np.ndarray:
    """Split name for every item, (N,) array of str; each group lands whole in one split.

    Stratified: the groups of each class (a group's class is the rarest of its labels in the whole data,
    the smallest of those tied: see _stratum) are put in an order that `seed` chooses and dealt out in it,
    a group joining the split in which its middle item falls (train for the first 70 % of the class's
    items, and so on). Deterministic for a given seed, whatever the order of the items. Stable as the
    data grow: a group's place in the order is a hash of the seed and its own id, not a shuffle of all
    of them, so a group added (a new image, a new patient) leaves the order of the others as it was
    and moves only the odd group beside an edge between two splits into the next; a shuffle
    reshuffled them all, and a model trained before the update was then tested on images it had
    trained on. Two changes still move a group anywhere: a new image that renames its group (a BUSI
    near-duplicate cluster is named by its first image), and new images that change which of two
    classes is the rarer (the class of every group holding both, see _stratum).

    A class whose groups are few and large can leave a split without one of them (8 patients of 11 images:
    no middle falls in validation's 70-80 %); then a group beside that split's place in the order moves
    into it (_fill_empty_splits: never one from two splits away), when the class has a group for every
    split. A class in fewer groups than
    that is missing from some split, and a warning says so: its sensitivity or AUC is undefined there.

    `fractions`: (name, share) pairs in the order the splits are dealt. Shares are relative, divided by
    their sum: (("train", 7), ("val", 1), ("test", 2)) splits as the 0.7 / 0.1 / 0.2 default does, and
    (("train", 0.7), ("val", 0.1)) splits 7:1 (BUS-BRA, whose test fold is fixed).
    """
    groups, labels = np.asarray(groups), np.asarray(labels)
    if groups.ndim != 1 or groups.shape != labels.shape or groups.size == 0:
        raise ValueError(f"groups and labels must be non-empty and one per item, got shapes {groups.shape} "
                         f"and {labels.shape}")
    values = groups.tolist()
    missing = [i for i, g in enumerate(values) if g is None or (isinstance(g, float) and g != g)]
    if missing:  # NaN != NaN: np.unique keeps one NaN that no item then equals; None cannot be sorted
        shown = f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        raise ValueError(f"groups must name a group for every item; items {shown} have {values[missing[0]]!r} (e.g. "
                         "an empty CSV cell): give each such item its own id as its group")
    given = labels.tolist()
    unlabelled = [i for i, label in enumerate(given) if label is None or (isinstance(label, float) and label != label)]
    if unlabelled:  # NaN: a bare KeyError; None: "'<' not supported" (ints, bools, names all stratify)
        raise ValueError(f"labels must give every item its class; item {unlabelled[0]} has {given[unlabelled[0]]!r} "
                         "(e.g. an empty CSV cell): label it, or leave it out")
    check_int("seed", seed, 0)  # None would draw a new split on every call
    if (isinstance(fractions, (str, Mapping)) or not isinstance(fractions, Sequence)
            or not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in fractions)):
        raise ValueError(f"fractions must be a sequence of (name, share) pairs, e.g. {list(SPLIT_FRACTIONS)}; got "
                         f"{fractions!r}")
    names = [name for name, _ in fractions]
    shares = [share for _, share in fractions]
    if (not all(is_finite(share) and share >= 0 for share in shares) or sum(shares) <= 0
            or len(set(names)) != len(names) or not all(isinstance(name, str) and name for name in names)):
        # ((0.7, 0.3),) named a split "0.7" and put every item in it
        raise ValueError(f"fractions must be (name, share) pairs with distinct names (non-empty str) and finite "
                         f"shares >= 0, not all 0, got {fractions!r}")
    edges = np.cumsum(shares) / sum(shares)
    frequency = Counter(labels.tolist())
    try:
        ids = np.unique(groups)
    except TypeError:  # numpy's bare "'<' not supported between instances of 'str' and 'int'"
        kinds = sorted({type(g).__name__ for g in values})
        raise ValueError(f"groups must be ids of one kind (all numbers, or all text), got a mix of {kinds}, e.g. from "
                         "a CSV column read partly as numbers: convert them, e.g. [str(g) for g in groups]") from None
    group_label = {g: _stratum(labels[groups == g].tolist(), frequency) for g in ids}
    split_of_group = {}
    for label in sorted(set(group_label.values())):
        members = sorted((g for g, l in group_label.items() if l == label), key=lambda g: _place(seed, g))
        sizes = np.array([np.sum(groups == g) for g in members])
        middle = (np.cumsum(sizes) - sizes / 2) / sizes.sum()  # where each group's middle item falls
        dealt = [int(np.searchsorted(edges, position, side="right").clip(max=len(names) - 1)) for position in middle]
        for g, k in zip(members, _fill_empty_splits(dealt, middle, sizes, edges)):
            split_of_group[g] = names[k]
    split = np.array([split_of_group[g] for g in groups])
    empty = [name for name, share in fractions if share > 0 and name not in split_of_group.values()]
    if empty:  # else an empty loader, or NaN metrics, far from the cause
        warnings.warn(f"split(s) {empty} got no items: {len(group_label)} group(s) are too few to give every split "
                      f"its share {dict(fractions)}; use more data, or other shares", stacklevel=2)
    lacking = {name: sorted(set(frequency) - set(labels[split == name].tolist()), key=str)
               for name, share in fractions if share > 0 and name not in empty}
    lacking = {name: classes for name, classes in lacking.items() if classes}
    if lacking:  # a class in fewer groups than there are splits: its sensitivity, AUC are undefined there
        selection = " and a best epoch chosen on validation ignores it" if "val" in lacking else ""
        warnings.warn(f"split(s) without an item of some class, {lacking}: the class is in too few groups to give "
                      "every split one (a group holding two classes is dealt with the rarer), so a metric of that "
                      f"class (sensitivity, AUC) is undefined there{selection}; use more data of that class, or "
                      "other shares", stacklevel=2)
    return split


def _fill_empty_splits(dealt: list[int], middle: np.ndarray, sizes: np.ndarray, edges: np.ndarray) -> list[int]:
    """`dealt` (the split index of each group of one class, in the seed's order) with a group moved into each
    split of a share > 0 that got none, when the class has a group for each such split.

    Dealing by middles leaves a split out whenever the class's groups are larger than its share (8 patients
    of 11 malignant images each: every middle falls outside validation's 70-80 %, whatever the seed), and a
    best epoch is then chosen on a validation split without that class.

    Dealt in order, each split holds a run of the order (train's groups, then val's, then test's). A group
    moves only across the edge of such a run, into the next split, as the groups beside an edge do when
    the data grow: the last group of the run before the empty split, or the first after it (from a split
    that keeps another; where the neighbour has only one, the runs beyond it shift by one group each).
    Between the two, the move that brings the splits' sizes nearest their shares (the sum of
    (size - share)^2 / share) wins, then the shorter shift, then the group whose middle is nearer the
    empty split's, then the earlier. So no group jumps a split: one dealt to train never lands in test.
    """
    shares = np.diff(edges, prepend=0.0)
    wanted = [k for k, share in enumerate(shares) if share > 0]
    if len(dealt) < len(wanted) or all(k in dealt for k in wanted):
        return dealt
    runs = [dealt.count(k) for k in wanted]  # dealt never decreases: each split's groups are one run
    target = shares[wanted] * sizes.sum()

    def spread(counts: list[int]) -> float:
        ends = np.cumsum(counts)
        size = np.array([sizes[end - count:end].sum() for count, end in zip(counts, ends)])
        return float(np.sum((size - target) ** 2 / target))

    while 0 in runs:
        empty = runs.index(0)
        centre = edges[wanted[empty]] - shares[wanted[empty]] / 2
        start = sum(runs[:empty])  # the order's index of the first group after the empty split's place
        moves = []
        for step, entering in ((-1, start - 1), (1, start)):
            donors = range(empty + step, -1 if step < 0 else len(runs), step)
            donor = next((i for i in donors if runs[i] > 1), None)
            if donor is not None:
                counts = list(runs)
                counts[donor] -= 1
                counts[empty] += 1
                moves.append((spread(counts), abs(donor - empty), abs(float(middle[entering]) - centre), step, counts))
        runs = min(moves)[-1]
    return [k for k, count in zip(wanted, runs) for _ in range(count)]


def _place(seed: int, group) -> tuple[bytes, str]:
    """Where `group` comes in the order `seed` chooses: a hash of the two (its id breaks the tie that
    a 64-bit hash all but never has)."""
    import hashlib

    name = str(group)
    return hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), name


def random_subset(dataset, size: int | None, seed: int):
    """`size` items of `dataset` drawn at random with `seed`, in their order (all of them: `dataset` itself,
    when size is None or not smaller).

    At random, not the first `size`: the real datasets list their items sorted by name, and so by class
    (BUSI: benign, then malignant, then normal), so the first few hundred would all be benign. Stratified
    when the dataset says its items' classes (a `labels` array, one per item, as the course's datasets
    have): each class keeps its share, rounded (so 2 of 50 benign, 30 malignant and 20 normal images are
    a benign and a malignant one); other datasets (a Subset, a view such as DenoisingPairs, whose
    `labels` is a flag) are drawn from plainly.
    """
    import torch

    if size is None or size >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    labels = np.asarray(getattr(dataset, "labels", None))
    if labels.ndim != 1 or len(labels) != len(dataset):  # none, a flag (DenoisingPairs.labels), or not one each
        chosen = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    else:
        # each class's items in a random order, the k-th of a class of n placed at (k + 1/2) / n: the
        # first `size` places hold every class in proportion, rounded as Webster's (Sainte-Lague's)
        # apportionment rounds seats, and in random order within it
        places = np.empty(len(labels))
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            shuffled = members[torch.randperm(len(members), generator=generator).numpy()]
            places[shuffled] = (np.arange(len(members)) + 0.5) / len(members)
        chosen = np.lexsort((torch.rand(len(labels), generator=generator).numpy(), places))[:size].tolist()
    return torch.utils.data.Subset(dataset, sorted(chosen))


def _stratum(labels: list, frequency: Counter):
    """The class a group is dealt with: the rarest of its labels in the whole data (`frequency`), on a tie
    the smallest (not the first listed: the split must not depend on the order the files were found in).

    Not the group's most common label: a BUS-UCLM patient has mostly normal scans and a few of one
    lesion, so by majority nearly every patient was "normal" and the malignant images fell wherever
    chance put their patients (4 to 19 of 62 in the test split over 20 seeds, none in validation for
    some); dealt by their rarest class, the patients with a malignant lesion share out as a class of
    their own (9 to 16, never none).
    """
    return min(set(labels), key=lambda label: (frequency[label], label))


def difference_hash(grey: np.ndarray, hash_size: int = HASH_SIZE) -> np.ndarray:
    """Perceptual hash of an image, (hash_size**2,) bool: is each thumbnail pixel darker than its right neighbour?

    `grey`: (H, W) array. Rescaling, compression, noise and overlays change few bits, so such copies
    have nearby hashes; a crop of a few percent does not (see the module docstring).
    """
    from PIL import Image

    # an (H, W, 3) image would give 3 x 64 bits, and its distances would mean something else
    grey = check_grey(grey, "difference_hash")
    if not np.isfinite(grey).all():  # one NaN pixel made the hash all False: unrelated images would be duplicates
        raise ValueError(f"difference_hash got an image with {int((~np.isfinite(grey)).sum())} NaN or infinite "
                         "pixels; fill them first, e.g. np.nan_to_num(image)")
    hash_size = check_int("hash_size", hash_size, 1)
    scaled = (255 * (grey - grey.min()) / max(float(np.ptp(grey)), 1e-6)).astype(np.uint8)
    thumbnail = Image.fromarray(scaled).resize((hash_size + 1, hash_size), Image.Resampling.BOX)  # (W, H)
    thumbnail = np.asarray(thumbnail, dtype=np.int16)
    return (thumbnail[:, 1:] > thumbnail[:, :-1]).ravel()


def duplicate_groups(hashes: np.ndarray, max_distance: int = DUPLICATE_MAX_DISTANCE) -> np.ndarray:
    """Group id for every image, (N,) int: images linked by chains of near-identical hashes share one.

    `hashes`: (N, B) bool. Hamming distance = bits set in one hash but not the other, both ways,
    which two matrix products give for all pairs at once.
    """
    from scipy.sparse.csgraph import connected_components

    hashes = np.asarray(hashes)  # a list of difference_hash(...) results
    if hashes.ndim != 2 or hashes.dtype != bool:
        raise ValueError(f"hashes must be an (N, B) bool array, one difference_hash(...) per image, got "
                         f"{hashes.dtype} of shape {hashes.shape}: stack them, np.stack([...])")
    max_distance = check_int("max_distance", max_distance, 0)
    bits = hashes.astype(np.float32)
    distance = bits @ (1 - bits).T + (1 - bits) @ bits.T  # (N, N) Hamming distances
    _, group = connected_components(distance <= max_distance, directed=False)
    return group
