"""Figures the notebooks share: image grids with mask overlays, curves, confusion and ROC.

Every function but `overlay` (which draws into an Axes it is given) returns its matplotlib Figure
(titled, axes labelled) so a notebook can show it and save it with `run.save_figure(fig, name)`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from mtlearn.utils import _kind, as_array, is_int

TASK_COLOURS = {"seg": "tab:blue", "cls": "tab:orange", "recon": "tab:green", "total": "black"}  # in every panel
SPARE_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")  # other names, in order
# Colour alone fails readers with a colour-vision deficiency (orange and green merge in protanopia, blue and
# purple in deuteranopia): each task also has its own marker, and each run of a comparison its own line style
TASK_MARKERS = {"seg": "o", "cls": "s", "recon": "^", "total": "D"}
SPARE_MARKERS = ("v", "P", "X", "*", "h", "<", ">", "p")  # other names, in order
RUN_STYLES = [(ls, m) for m, ls in zip("osD^vP*X", ["-", "--", "-.", ":"] * 2)]  # (line style, marker) per run


def task_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per task name, the same in every panel of a figure: TASK_COLOURS for the course's
    tasks, then SPARE_COLOURS for other names in the order they come."""
    return _per_name(names, TASK_COLOURS, SPARE_COLOURS, "tab:gray")


def task_markers(names: Sequence[str]) -> dict[str, str]:
    """One marker per task name, as task_colours: TASK_MARKERS, then SPARE_MARKERS in order."""
    return _per_name(names, TASK_MARKERS, SPARE_MARKERS, ".")


def _per_name(names: Sequence[str], fixed: dict[str, str], spare: Sequence[str], last: str) -> dict[str, str]:
    """`fixed`'s style for the names it has, `spare`'s in order for the others (then `last`), each name once."""
    spare = iter(spare)
    return {name: fixed.get(name) or next(spare, last) for name in dict.fromkeys(names)}


def _array(x) -> np.ndarray:
    """A tensor (any device, dtype) or array-like as a float32 NumPy array."""
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _image(x, name: str = "image") -> np.ndarray:
    """(C, H, W) or (H, W) tensor/array, C 1 or 3 -> (H, W) or (H, W, 3) array (C 1, or 3 equal
    channels: grey, (H, W); 3 others: RGB). Draw it with `_draw_image`, which scales colour too."""
    x = _array(x)
    if x.ndim == 3 and x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3, 4):  # e.g. an array from a PNG
        raise ValueError(f"{name} must be (C, H, W) or (H, W), got the channels-last shape {x.shape}: "
                         f"pass it as (C, H, W), e.g. torch.as_tensor({name}).permute(2, 0, 1)")
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[0] not in (1, 3)) or min(x.shape[-2:], default=0) == 0:
        # 4 or more "channels" is most often a batch or a seg head's scores, not one picture in colour
        raise ValueError(f"{name} must be a non-empty (C, H, W) array with 1 or 3 channels, or (H, W); got "
                         f"shape {x.shape}: for one image of a batch pass x[i], for class scores x.argmax(0)")
    if x.ndim == 3:  # grey repeated over 3 channels (in_channels=3) stays grey, on the shared grey scale
        grey = x.shape[0] == 1 or (np.array_equal(x[0], x[1], equal_nan=True)
                                   and np.array_equal(x[0], x[2], equal_nan=True))
        x = x[0] if grey else np.moveaxis(x, 0, -1)
    return x


def _draw_image(ax, picture: np.ndarray, low: float | None = None, high: float | None = None):
    """imshow a `_image` picture: grey over [low, high] (None: its own range); colour, which imshow
    would clip to [0, 1] (a uint8 image all white, a normalised one black below 0), scaled from
    [low, high] (None: its own range) when its values leave [0, 1], so both read the same way."""
    if picture.ndim == 2:
        return ax.imshow(picture, cmap="gray", vmin=low, vmax=high)
    low = float(np.nanmin(picture)) if low is None else low
    high = float(np.nanmax(picture)) if high is None else high
    if low < 0 or high > 1:
        picture = (picture - low) / (high - low if high > low else 1.0)
    return ax.imshow(np.clip(np.nan_to_num(picture), 0.0, 1.0))


def _outline(x, name: str, size: tuple[int, int]) -> np.ndarray:
    """A mask or predicted mask, (H, W) or (1, H, W), as the (H, W) array an outline is drawn from."""
    x = _array(x)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:  # e.g. the seg head's (num_classes, H, W) scores
        raise ValueError(f"{name} must be one (H, W) or (1, H, W) mask, got shape {x.shape}; for a seg "
                         f"head's scores pass the classes, out['seg'][i].argmax(0)")
    if x.shape != size:  # drawn at another size, the outline would sit in the wrong place
        raise ValueError(f"{name} is {x.shape[0]}x{x.shape[1]} but the image is {size[0]}x{size[1]}: "
                         f"resize one to the other (nearest neighbour for a mask) before drawing")
    if min(x.shape) < 2:  # matplotlib's contour needs a 2 x 2 grid, and raised a TypeError
        raise ValueError(f"{name} is {x.shape[0]}x{x.shape[1]}: an outline needs an image of at least 2x2 pixels")
    return x


def _class_index(label, where: str, class_names=None) -> int:
    """`label` (an int, a NumPy int or a one-element integer tensor) as an int, checked against
    `class_names`; else a ValueError naming `where` ("item 3") and the fix. 1.7 would be drawn as
    class 1, None or a one-hot vector raised inside int(), -1 would get the last name."""
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    if not is_int(label):
        raise ValueError(f"{where} has label {label!r}; labels are class indices 0, 1, ... (for a one-hot "
                         "vector pass its argmax)")
    label = int(label)
    if class_names is not None and not 0 <= label < len(class_names):  # [] names no class: every label out
        raise ValueError(f"{where} has label {label}, but class_names {list(class_names)} name labels "
                         f"0..{len(class_names) - 1}: pass one name per class")
    return label


def _flag(value, where: str, name: str) -> int:
    """An item's 0/1 flag (artifact, shape, background: an int, a bool, a NumPy one, a 0-d or
    one-element tensor) as an int; else a ValueError naming `where` and `name` (int(None) raised a
    TypeError, int(0.5) drew 0)."""
    if getattr(value, "shape", None) in ((), (1,)):
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if not is_int(value) or value < 0:
        raise ValueError(f"{where} has {name} {value!r}; expected 0 or 1 (a flag), or another class index >= 0")
    return int(value)


def overlay(ax, image, mask=None, prediction=None, title: str = "") -> None:
    """Draw `image` in grey with the true `mask` outline (green, solid) and a `prediction` outline
    (magenta, dashed): told apart by the line as well as the colour, for red-green colour blindness."""
    if not hasattr(ax, "imshow"):  # overlay(image, mask): "'Tensor' object has no attribute 'imshow'"
        raise TypeError(f"overlay draws on the Axes given first, got {_kind(ax)}; e.g. fig, ax = plt.subplots(); "
                        "overlay(ax, image, mask)")
    picture = _image(image)
    size = picture.shape[:2]
    outlines = {key: _outline(value, key, size) for key, value in (("mask", mask), ("prediction", prediction))
                if value is not None}  # checked before anything is drawn
    _draw_image(ax, picture)
    if "mask" in outlines:
        ax.contour(outlines["mask"], levels=[0.5], colors="lime", linewidths=1.0)
    if "prediction" in outlines:
        ax.contour(outlines["prediction"], levels=[0.5], colors="magenta", linewidths=1.2, linestyles="--")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _is_mask(key: str) -> bool:
    """Rows named "mask", "artifact_mask", ... are masks (0 black, 1 white); the rest are intensities."""
    return key.endswith("mask")


def show_items(items: Sequence[dict], keys: Sequence[str] = ("image", "mask"), class_names=None,
               title: str = "", max_items: int = 8):
    """A grid: one column per item, one row per key ("image", "mask", "clean", "artifact_mask").

    The intensity rows of one item ("image", "clean", ...) share one grey scale, the item's range
    over all of them (min to max), so the speckled image and its clean scene can be compared pixel
    for pixel: the same grey is the same value. Rows whose key ends in "mask" are drawn as masks,
    0 black and 1 (or the largest class of any item in the row) white. Colour images are drawn as
    they are when in [0, 1], else over the item's range like grey ones.
    """
    if not is_int(max_items) or max_items < 1:
        raise ValueError(f"max_items must be an int >= 1, got {max_items!r}")
    keys = (keys,) if isinstance(keys, str) else tuple(keys)  # "image" is one row, not five
    if not keys:
        raise ValueError("keys is empty: name the rows to draw, e.g. keys=('image', 'mask')")
    if isinstance(items, Mapping):  # one item: iterating over it would give its keys
        image = items.get("image")
        if isinstance(image, torch.Tensor) and image.dim() == 4:  # a DataLoader's batch: one dict of (B, ...) tensors
            raise ValueError(f"items is a batch (a dict of {image.shape[0]} images); pass the dataset, or items such "
                             "as [dataset[i] for i in range(8)]")
        raise ValueError("items is one item (a dict); pass a list of items, e.g. show_items([item])")
    items = list(itertools.islice(items, max_items))  # a whole dataset is not rendered to show 8 items
    if not items:
        raise ValueError("there are no items to show (an empty list or dataset)")
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):  # a batch or list of image tensors: `key in tensor` raised a RuntimeError
            raise ValueError(f"item {index} is {_kind(item)}, not a dict: pass a dataset, or items such as dataset[i]: "
                             "dicts with an 'image' tensor")
        missing = [key for key in keys if key not in item]
        if missing:  # e.g. the default "mask" row for a classification-only dataset (BreastMNIST)
            raise ValueError(f"item {index} has no {missing}; its keys are {sorted(item)}: pass keys=, "
                             f"e.g. keys=('image',)")
    # every label and picture before the figure: a bad one raises without leaving an empty grid behind
    titles = []
    for index, item in enumerate(items):
        label = item.get("label")
        if label is not None:
            label = _class_index(label, f"item {index}", class_names)
        name = class_names[label] if class_names is not None and label is not None else label
        artifact = _flag(item.get("artifact", 0), f"item {index}", "artifact")
        titles.append(f"{'' if name is None else name}{' +artifact' if artifact else ''}")  # no "None"
    columns = [{key: _image(item[key], name=key) for key in keys} for item in items]
    # one grey scale per mask row, so a class has the same shade in every column
    mask_top = {key: max(1.0, *(float(np.nanmax(pictures[key])) for pictures in columns))
                for key in keys if _is_mask(key)}
    fig, axes = plt.subplots(len(keys), len(items), figsize=(1.9 * len(items), 1.9 * len(keys)), squeeze=False)
    for col, (heading, pictures) in enumerate(zip(titles, columns)):
        intensities = [p for key, p in pictures.items() if not _is_mask(key)]
        low = min(float(np.nanmin(p)) for p in intensities) if intensities else None  # one scale per item
        high = max(float(np.nanmax(p)) for p in intensities) if intensities else None
        for row, key in enumerate(keys):
            ax = axes[row, col]
            picture = pictures[key]
            if _is_mask(key):
                ax.imshow(picture, cmap="gray", vmin=0, vmax=mask_top[key])
            else:
                _draw_image(ax, picture, low, high)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(heading, fontsize=9)
            if col == 0:
                ax.set_ylabel(key)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _finite(value) -> bool:
    """A number to draw: not None, NaN or infinite."""
    return value is not None and math.isfinite(value)


def _per_epoch_records(rows):
    """train_disentangle's {"acc_a": [epoch 1, epoch 2, ...], ...} as records with their epoch; else rows as given."""
    if (isinstance(rows, Mapping) and rows and all(isinstance(v, Sequence) and not isinstance(v, str)
                                                   for v in rows.values())
            and len({len(v) for v in rows.values()}) == 1):
        return [{"epoch": epoch, **dict(zip(rows, values))} for epoch, values in enumerate(zip(*rows.values()), 1)]
    return rows


def learning_curves(histories: dict[str, "object"], metric: str, title: str = "", ylabel: str | None = None,
                    zoom_last: int = 0):
    """Plot `metric` per epoch for several runs.

    histories: {run name: a `History` from `fit`, or its `.records` (a list of per-epoch dicts with
    "epoch"), or a dict of per-epoch lists as `train_disentangle` returns (epochs counted from 1)};
    epochs without `metric` are left out. A run with no finite value of `metric` (it
    diverged, or never recorded it) keeps its legend entry, marked "(no finite values)".
    ylabel: the y axis' label; None: the metric, its "val/" or "train/" prefix spelled out
    ("val/seg/dice" -> "seg/dice (validation)").
    zoom_last: if > 0, a second panel shows the last `zoom_last` epochs (of the longest run) on their
    own y range, where the first epochs' large changes no longer squash the differences between runs;
    a run with no finite value there is named so in the legend. 0, at least as many epochs as the
    longest run has, or a window without a finite value: one panel.
    """
    if not is_int(zoom_last) or zoom_last < 0:
        raise ValueError(f"zoom_last must be a number of epochs >= 0 (0: no zoomed panel), got {zoom_last!r}")
    if not isinstance(histories, Mapping):  # one History or its records: .items() raised an AttributeError
        raise ValueError(f"histories must be {{run name: History or records}}, got {_kind(histories)}; name the run, "
                         "e.g. learning_curves({'mtl': history}, metric)")
    if not isinstance(metric, str):  # a list of metrics: `metric in record` raised "unhashable type"
        raise ValueError(f"metric must be one record key (a str), e.g. 'val/seg/dice', got {metric!r}: draw one "
                         "figure per metric")
    records = {name: _per_epoch_records(getattr(rows, "records", rows)) for name, rows in histories.items()}
    for name, rows in records.items():
        # a dict's keys were read as records (its letters listed as keys), a list of numbers raised a TypeError
        if isinstance(rows, (str, Mapping)) or not isinstance(rows, Sequence):
            got = _kind(rows)
        else:
            got = next((f"a list holding {_kind(r)}" for r in rows if not isinstance(r, Mapping)), None)
        if got is not None:
            raise ValueError(f"histories[{name!r}] must be a History, a list of per-epoch records (dicts) or a dict "
                             f"of per-epoch lists, got {got}")
    if not any(rows for rows in records.values()):
        raise ValueError("histories holds no records: pass {run name: History or records} of runs that trained")
    if not any(metric in r for rows in records.values() for r in rows):  # a misspelt key: empty axes
        keys = sorted({k for rows in records.values() for r in rows for k in r})
        raise ValueError(f"no run recorded {metric!r}; the records hold {keys}")
    if any(metric in r and "epoch" not in r for rows in records.values() for r in rows):
        raise ValueError(f"a record with {metric!r} has no 'epoch': pass History.records of fit, or add the epoch "
                         "(1, 2, ...) to each record")
    points = {}  # run -> [(epoch, value)] in epoch order: a line drawn in list order would double back
    for name, rows in records.items():
        # by epoch alone: a repeated epoch with a None value must reach the check below, not compare None < 0.5
        points[name] = sorted(((r["epoch"], r[metric]) for r in rows if metric in r), key=lambda pair: pair[0])
        epochs = [epoch for epoch, _ in points[name]]
        if len(set(epochs)) != len(epochs):
            twice = sorted({e for e in epochs if epochs.count(e) > 1})
            raise ValueError(f"run {name!r} records epoch(s) {twice} more than once (two fits joined?); pass one "
                             "fit's History per run, or number the epochs of the second fit on")
    if ylabel is None:  # a readable default: "val/seg/dice" -> "seg/dice (validation)"
        split, _, rest = metric.partition("/")
        spelled = {"val": "validation", "train": "training"}.get(split)
        ylabel = f"{rest} ({spelled})" if spelled and rest else metric
    last = max(epoch for pairs in points.values() for epoch, _ in pairs)
    # a second panel when the window leaves epochs out and holds something to draw
    zoom = zoom_last > 0 and any(epoch <= last - zoom_last for pairs in points.values() for epoch, _ in pairs) and any(
        epoch > last - zoom_last and _finite(value) for pairs in points.values() for epoch, value in pairs)
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(10, 3.8) if zoom else (5.5, 3.5), squeeze=False,
                             layout="constrained" if zoom else None)
    window = "the last epoch" if zoom_last == 1 else f"the last {zoom_last} epochs"
    labels = {}  # the legend's (the first panel's): a run without a finite value in a panel says so
    for ax, since in zip(axes[0], (-math.inf, last - zoom_last)):  # the zoomed panel: epochs after `since`
        for k, (name, pairs) in enumerate(points.items()):
            xs, ys = [epoch for epoch, _ in pairs if epoch > since], [value for epoch, value in pairs if epoch > since]
            if not any(map(_finite, ys)):  # never, or not in the window (stopped early, or diverged late)
                labels.setdefault(name, f"{name} (no finite values{'' if since < 0 else f' in {window}'})")
            linestyle, marker = RUN_STYLES[k % len(RUN_STYLES)]  # not colour alone: runs end close together
            ax.plot(xs, ys, linestyle=linestyle, marker=marker, ms=3.5, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for line, name in zip(axes[0, 0].lines, points):
        line.set_label(labels.get(name, name))
    if not zoom:
        axes[0, 0].set_title(title or metric)
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        return fig
    axes[0, 0].set_title("every epoch")
    axes[0, 0].axvspan(last - zoom_last + 0.5, last + 0.5, color="k", alpha=0.06, lw=0)  # where the zoom looks
    axes[0, 1].set_title(f"{window}, zoomed")
    axes[0, 1].xaxis.get_major_locator().set_params(integer=True)  # epochs, not 6.5
    fig.suptitle(title or metric)
    # one legend under both panels, where no line runs
    fig.legend(handles=axes[0, 0].lines, loc="outside lower center", ncols=min(len(points), 5), fontsize=8,
               frameon=False)
    return fig


def _classes(name: str, values, k: int) -> np.ndarray:
    """`values` as a non-empty (N,) integer array of classes in 0..k-1, or a ValueError saying what is wrong.

    A -1 (an "ignore" label) would otherwise be counted silently: in the last class of a confusion
    matrix, as a negative of every class in a ROC curve.
    """
    if k == 0:  # else "classes in 0..-1"
        raise ValueError("class_names is empty; give one name per class, e.g. ['normal', 'benign', 'malignant']")
    values = as_array(values)  # a GPU's tensor too
    malformed = values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iu"
    if malformed or not 0 <= values.min() <= values.max() < k:
        raise ValueError(f"{name} must be a non-empty 1-D array of integer classes in 0..{k - 1} "
                         f"({k} class names), got shape {values.shape}, dtype {values.dtype}"
                         + (f", values {values.min()}..{values.max()}" if values.size else ""))
    return values


def confusion_matrix(labels, predictions, class_names: Sequence[str], title: str = "Confusion matrix"):
    """Counts of true (rows) vs predicted (columns) classes, annotated.

    labels, predictions: (N,) integers in 0..len(class_names) - 1.
    """
    k = len(class_names)
    labels, predictions = _classes("labels", labels, k), _classes("predictions", predictions, k)
    if len(labels) != len(predictions):
        raise ValueError(f"labels and predictions must have one entry per image, got {len(labels)} and "
                         f"{len(predictions)}")
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (labels, predictions), 1)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(counts, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, counts[i, j], ha="center", va="center",
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(k), class_names, rotation=30)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc_curves(labels, scores, class_names: Sequence[str], title: str = "ROC (one vs rest)"):
    """One-vs-rest ROC curve per class with its AUC in the legend.

    scores: (N, K), higher = more likely class k: a MetricAccumulator's `scores` (the one-vs-rest
    log-odds, which rank like the probabilities without their rounding ties) or probabilities.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = _classes("labels", labels, len(class_names))
    scores = as_array(scores)
    if scores.shape != (len(labels), len(class_names)):  # e.g. a binary model's (N,) scores
        raise ValueError(f"scores must be (N, K) = ({len(labels)}, {len(class_names)}): one column per class "
                         f"name, one row per label; got shape {scores.shape}")
    if not np.isfinite(scores).all():  # scikit-learn's own error says only "Input contains NaN"
        raise ValueError(f"{int((~np.isfinite(scores)).any(axis=1).sum())} of {len(scores)} rows of scores are not "
                         "finite (NaN or inf): the model's outputs diverged; evaluate a checkpoint with finite weights")
    fig, ax = plt.subplots(figsize=(4, 3.6))
    linestyles = ["-", "--", "-."]  # not colour alone; dotted is the chance diagonal
    for c, name in enumerate(class_names):
        positive = labels == c
        if positive.all() or not positive.any():  # AUC is undefined: say so rather than drop the class
            ax.plot([], [], " ", label=f"{name} (no AUC: {'every' if positive.all() else 'no'} label)")
            continue
        fpr, tpr, _ = roc_curve(positive, scores[:, c])
        ax.plot(fpr, tpr, linestyle=linestyles[c % len(linestyles)],
                label=f"{name} (AUC {roc_auc_score(positive, scores[:, c]):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bar_range(values: np.ndarray, spans: np.ndarray) -> tuple[float, float, bool]:
    """(bottom, top, zoomed) of a bar axis for the finite `values` and their error bars `spans`.

    Scores in [0, 1] start below the lowest bar by twice the spread of the bars (at least 0.05),
    rounded down to a round number: Dice 0.901 to 0.918 gets an axis from 0.85, where the
    differences show without being blown up. Negative values keep 0 and the lowest bar in view;
    anything else (counts, times, PSNR) starts at 0, or 100 vs 200 parameters would look like
    0 vs 100. The top leaves room for the values written above the bars.
    """
    if values.size == 0:
        return 0.0, 1.0, False
    lo, hi = float(np.min(values - spans)), float(np.max(values + spans))
    zoomed = False
    if lo < 0:
        bottom = lo
    elif float(np.max(values)) <= 1.0:  # scores in [0, 1]: zoom in on close ones
        pad = max(2.0 * (hi - lo), 0.05)
        step = 10.0 ** math.floor(math.log10(pad))
        bottom = max(0.0, round(math.floor((lo - pad) / step + 1e-9) * step, 10))  # 1e-9: 0.85 - 0.05 is 0.8
        zoomed = bottom > 0
    else:
        bottom = 0.0
    top = max(hi, 0.0)
    room = 0.12 * (top - bottom) or 0.1
    return (bottom - room if lo < 0 else bottom), top + room, zoomed


def _break_mark(ax) -> None:
    """Two short slashes across the foot of the y axis: the axis does not start at 0."""
    kwargs = {"transform": ax.transAxes, "color": "k", "lw": 1.0, "clip_on": False}
    for dy in (0.0, 0.035):
        ax.plot([-0.025, 0.025], [0.0 + dy, 0.03 + dy], **kwargs)


def bar_table(table, metrics: Sequence[str], title: str = "", errors=None, fmt: str = "{:.3f}"):
    """Grouped bars: rows of `table` (a pandas DataFrame indexed by run) for each metric column.

    Every bar carries its value (`fmt`, e.g. "{:.1f}"). A missing value (NaN: a task the run does
    not have, such as the accuracy of a segmentation-only model) gets no bar and an "n/a" mark;
    do not fill it with 0, or it would look like a score and drag the axis down to 0.
    The y range comes from the values present (see `_bar_range`): scores in [0, 1] that are close
    get an axis that starts above 0, marked by a break (//) at the foot of the axis and by its label
    ("dice (axis from 0.85)"); compare the written values, not the bar heights. Negative values
    (e.g. a relative change) keep 0 and the lowest bar in view.
    errors: a DataFrame like `table` (e.g. the std over seeds), drawn as error bars.
    A table of `mtlearn.experiments.summarise` (columns (metric, "mean" / "std" / "count")) draws the
    means, with the standard deviations as error bars unless `errors` is given. A dict of runs'
    metrics ({"mtl": evaluate(...), ...}) is a table with one row per run.
    """
    from matplotlib.transforms import blended_transform_factory

    import pandas as pd

    if isinstance(table, Mapping) and table and all(isinstance(row, Mapping) for row in table.values()):
        table = pd.DataFrame.from_dict(table, orient="index")  # {"mtl": {"seg/dice": ...}, ...}: a row per run
    if isinstance(table, pd.Series):  # one run's metrics, e.g. a row of a table
        table = table.to_frame().T
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a pandas DataFrame with a row per run (or a dict of runs' metrics), got a "
                        f"{type(table).__name__}")
    said = ""  # what the error bars are, when bar_table knows (a bar of 2 runs looked like one of 3)
    if isinstance(table.columns, pd.MultiIndex) and "mean" in table.columns.get_level_values(-1):
        if errors is None and "std" in table.columns.get_level_values(-1):  # summarise's (metric, statistic)
            errors = table.xs("std", axis=1, level=-1)
            said = "error bars: ±1 sample standard deviation"
            if "count" in table.columns.get_level_values(-1):
                counts = table.xs("count", axis=1, level=-1).to_numpy(dtype=float)
                low, high = int(np.nanmin(counts)), int(np.nanmax(counts))
                said += f" over {low} runs" if low == high else f" over {low}-{high} runs"
        table = table.xs("mean", axis=1, level=-1)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)  # "dice" is one metric, not four
    if not metrics:
        raise ValueError("metrics is empty: name the columns to draw, e.g. metrics=['dice', 'accuracy']")
    for name, frame in (("table", table), ("errors", errors)):
        missing = [metric for metric in metrics if frame is not None and metric not in frame.columns]
        if missing:  # checked before a figure is opened, so a failed call leaves none behind
            raise ValueError(f"{name} has no column {missing}; its columns are {list(frame.columns)}")
        for metric in metrics if frame is not None else ():
            try:
                np.asarray(frame[metric], dtype=float)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{name}'s column {metric!r} is not numbers ({error}); convert it, e.g. with "
                                 "pd.to_numeric") from None
    if errors is not None:
        twice = sorted({str(i) for frame in (table, errors) for i in frame.index[frame.index.duplicated()]})
        if twice:  # the error bars are matched to the bars by row name
            raise ValueError(f"table and errors must name each row once (error bars are matched by name); "
                             f"named twice: {twice}")
        absent = [str(i) for i in table.index if i not in errors.index]
        if absent:  # its bar would have no error bar, silently (a NaN std, of one seed, is drawn as none too)
            raise ValueError(f"errors has no row {absent} of the table; give every row an error (NaN for none)")
        negative = [metric for metric in metrics if (np.asarray(errors[metric], dtype=float) < 0).any()]
        if negative:
            raise ValueError(f"errors in column(s) {negative} are negative; an error bar's half-length is >= 0 "
                             "(e.g. a standard deviation)")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = np.asarray(table[metric], dtype=float)
        x = np.arange(len(values))
        present = np.isfinite(values)
        # matched to the bars by row name, not position: a std table from summarise comes out sorted
        err = errors[metric].reindex(table.index).to_numpy(dtype=float)[present] if errors is not None else None
        spans = np.nan_to_num(np.abs(err)) if err is not None else np.zeros(int(present.sum()))
        ax.bar(x[present], values[present], yerr=err, color="tab:blue", alpha=0.8, capsize=3)
        bottom, top, zoomed = _bar_range(values[present], spans)
        ax.set_ylim(bottom, top)
        if bottom < 0 < top:
            ax.axhline(0.0, color="k", lw=0.8)
        for i, value, span in zip(x[present], values[present], spans):  # the value beside the bar's end
            end, align = (value + span, "bottom") if value >= 0 else (value - span, "top")
            ax.text(i, end, fmt.format(value), ha="center", va=align, fontsize=7)
        x_data_y_axes = blended_transform_factory(ax.transData, ax.transAxes)
        for i in x[~present]:
            ax.text(i, 0.03, "n/a", transform=x_data_y_axes, ha="center", va="bottom", fontsize=9,
                    color="dimgrey", fontstyle="italic")
        ax.set_xticks(x, [str(i) for i in table.index], rotation=35, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(values) - 0.4)
        ax.set_title(metric)
        ax.set_ylabel(f"{metric} (axis from {bottom:g})" if zoomed else metric)
        if zoomed:
            _break_mark(ax)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("\n".join(part for part in (title, said) if part), fontsize="medium" if said else None)
    fig.tight_layout()
    return fig
