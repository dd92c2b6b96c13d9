"""Shared figures: they draw what they are given, with titles and labelled axes."""

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch

from mtlearn import plots


def test_confusion_matrix_counts():
    fig = plots.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 2], ["a", "b", "c"])
    ax = fig.axes[0]
    counts = ax.images[0].get_array()
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"


@pytest.mark.parametrize("labels, predictions, match", [
    ([0, 1, -1], [0, 1, 2], "labels must be .* in 0..2"),  # -1 used to be counted in the last class
    ([0, 1, 2], [0, 3, 1], "predictions must be .* in 0..2"),
    ([], [], "labels must be a non-empty"),
    ([0.0, 1.0], [0, 1], "integer classes"),
    ([0, 1], [0], "one entry per image"),
])
def test_confusion_matrix_refuses_labels_it_cannot_count(labels, predictions, match):
    with pytest.raises(ValueError, match=match):
        plots.confusion_matrix(labels, predictions, ["a", "b", "c"])


def test_roc_curves_one_line_per_present_class():
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.7, 0.3, 0.0], [0.4, 0.6, 0.0]])
    fig = plots.roc_curves(labels, probs, ["a", "b", "c"])  # class c absent: no curve for it
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["a (AUC 1.00)", "b (AUC 1.00)"]


def test_show_items_grid_shape_and_titles():
    items = [{"image": torch.rand(1, 8, 8), "mask": torch.zeros(1, 8, 8), "label": i, "artifact": 1} for i in range(3)]
    fig = plots.show_items(items, keys=("image", "mask"), class_names=["n", "b", "m"])
    assert len(fig.axes) == 6
    assert fig.axes[0].get_title() == "n +artifact"


def test_learning_curves_and_bars():
    histories = {"mtl": [{"epoch": 1, "val/dice": 0.5}, {"epoch": 2, "val/dice": 0.7}]}
    fig = plots.learning_curves(histories, "val/dice")
    assert fig.axes[0].lines[0].get_ydata().tolist() == [0.5, 0.7]
    table = pd.DataFrame({"dice": [0.8, 0.9]}, index=["a", "b"])
    fig = plots.bar_table(table, ["dice"])
    assert [p.get_height() for p in fig.axes[0].patches] == [0.8, 0.9]
    changes = pd.DataFrame({"delta_m": [-3.0, -1.0, 2.0]}, index=["a", "b", "c"])  # e.g. relative changes, %
    low, high = plots.bar_table(changes, ["delta_m"]).axes[0].get_ylim()
    assert low < -3.0 and high > 2.0  # every bar in view, the negative ones included
