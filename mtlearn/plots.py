"""Figures the notebooks share: image grids with mask overlays, curves, confusion and ROC.

Every function returns its matplotlib Figure (titled, axes labelled) so a notebook can show it and
save it with `run.save_figure(fig, name)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def _image(x) -> np.ndarray:
    """(C, H, W) or (H, W) tensor/array -> (H, W) or (H, W, 3) array for imshow."""
    x = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x[:3], 0, -1)
    return x


def overlay(ax, image, mask=None, prediction=None, title: str = "") -> None:
    """Draw `image` in grey with the true `mask` outline (green) and a `prediction` outline (red)."""
    ax.imshow(_image(image), cmap="gray")
    if mask is not None:
        ax.contour(_image(mask), levels=[0.5], colors="lime", linewidths=1.0)
    if prediction is not None:
        ax.contour(_image(prediction), levels=[0.5], colors="red", linewidths=1.0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def show_items(items: Sequence[dict], keys: Sequence[str] = ("image", "mask"), class_names=None,
               title: str = "", max_items: int = 8):
    """A grid: one column per item, one row per key ("image", "mask", "clean", "artifact_mask")."""
    items = list(items)[:max_items]
    fig, axes = plt.subplots(len(keys), len(items), figsize=(1.9 * len(items), 1.9 * len(keys)), squeeze=False)
    for col, item in enumerate(items):
        for row, key in enumerate(keys):
            ax = axes[row, col]
            ax.imshow(_image(item[key]), cmap="gray", vmin=0 if key != "image" else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                label = item.get("label")
                name = class_names[int(label)] if class_names is not None and label is not None else label
                extra = " +artifact" if int(item.get("artifact", 0)) else ""
                ax.set_title(f"{name}{extra}", fontsize=9)
            if col == 0:
                ax.set_ylabel(key)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(histories: dict[str, "object"], metric: str, title: str = ""):
    """Plot `metric` per epoch for several runs.

    histories: {run name: a `History` from `fit`, or its `.records` (a list of per-epoch dicts with
    "epoch")}; epochs without `metric` are left out.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, rows in histories.items():
        rows = getattr(rows, "records", rows)
        xs = [r["epoch"] for r in rows if metric in r]
        ys = [r[metric] for r in rows if metric in r]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_matrix(labels, predictions, class_names: Sequence[str], title: str = "Confusion matrix"):
    """Counts of true (rows) vs predicted (columns) classes, annotated.

    labels, predictions: (N,) integers in 0..len(class_names) - 1.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    k = len(class_names)
    for name, values in (("labels", labels), ("predictions", predictions)):
        # a -1 (an "ignore" label) would be counted silently in the last class
        malformed = values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iu"
        if malformed or not 0 <= values.min() <= values.max() < k:
            raise ValueError(f"{name} must be a non-empty 1-D array of integer classes in 0..{k - 1} "
                             f"({k} class names), got shape {values.shape}, dtype {values.dtype}"
                             + (f", values {values.min()}..{values.max()}" if values.size else ""))
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


def roc_curves(labels, probabilities, class_names: Sequence[str], title: str = "ROC (one vs rest)"):
    """One-vs-rest ROC curve per class with its AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    for c, name in enumerate(class_names):
        positive = labels == c
        if positive.all() or not positive.any():
            continue  # AUC is undefined for a class absent from (or alone in) the labels
        fpr, tpr, _ = roc_curve(positive, probabilities[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, probabilities[:, c]):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bar_table(table, metrics: Sequence[str], title: str = "", errors=None):
    """Grouped bars: rows of `table` (a pandas DataFrame indexed by run) for each metric column.

    Metrics in [0, 1] that are all close (Dice 0.90 vs 0.92) get an axis starting just below the
    lowest bar, so the differences show; read the tick labels, not the bar heights. Negative
    values (e.g. a relative change) always keep 0 and the lowest bar in view.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = table[metric]
        err = errors[metric] if errors is not None else None
        ax.bar(range(len(values)), values, yerr=err, color="tab:blue", alpha=0.8, capsize=3)
        ax.set_xticks(range(len(values)), [str(i) for i in table.index], rotation=35, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.set_ylabel(metric)
        low = float(np.nanmin(values))
        if low < 0:
            ax.axhline(0.0, color="k", lw=0.8)
            ax.set_ylim(low - 0.1 * abs(low), None)
        elif float(np.nanmax(values)) <= 1.0:  # scores in [0, 1]: zoom in on close ones
            ax.set_ylim(max(0.0, low - 0.15), None)
        else:  # counts, times, PSNR: bars from 0, or 100 vs 200 parameters would look like 0 vs 100
            ax.set_ylim(0.0, None)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
