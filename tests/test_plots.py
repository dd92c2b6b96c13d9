"""Shared figures: they draw what they are given, with titles and labelled axes."""

import matplotlib

matplotlib.use("Agg")
import math
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from mtlearn import plots


@pytest.fixture(autouse=True)
def close_figures():
    """Each test's figures are closed after it (pyplot keeps every open figure alive)."""
    yield
    plt.close("all")


def test_confusion_matrix_counts():
    fig = plots.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 2], ["a", "b", "c"])
    ax = fig.axes[0]
    counts = ax.images[0].get_array()
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    written = {tuple(t.get_position()): t.get_text() for t in ax.texts}  # (column, row) = (predicted, true)
    assert written[(1, 0)] == "1" and written[(0, 1)] == "0"  # true a, predicted b: one; not the other way
    # columns and rows named in class order; the more images, the darker ("Blues", not reversed)
    names = [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]
    assert names == (["a", "b", "c"], ["a", "b", "c"])
    assert ax.images[0].get_cmap().name == "Blues"


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


def test_no_class_names_are_named_as_such():
    """The message read "integer classes in 0..-1 (0 class names)"."""
    for draw in (lambda: plots.confusion_matrix([0, 1], [0, 1], []), lambda: plots.roc_curves([0, 1], np.eye(2), [])):
        with pytest.raises(ValueError, match=r"class_names is empty; give one name per class"):
            draw()
    assert not plt.get_fignums()


def test_roc_curves_one_line_per_present_class():
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.7, 0.3, 0.0], [0.4, 0.6, 0.0]])
    fig = plots.roc_curves(labels, probs, ["a", "b", "c"])  # class c absent: no curve, but a legend entry
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["a (AUC 1.00)", "b (AUC 1.00)", "c (no AUC: no label)"]
    assert len([line for line in fig.axes[0].lines if len(line.get_xdata())]) == 3  # two curves + the diagonal
    # one class in every label (a filtered test set): scikit-learn's AUC would raise
    fig = plots.roc_curves(np.zeros(4, int), probs[:, :2], ["a", "b"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a (no AUC: every label)",
                                                                            "b (no AUC: no label)"]


def test_show_items_grid_shape_and_titles():
    items = [{"image": torch.rand(1, 8, 8), "mask": torch.zeros(1, 8, 8), "label": i, "artifact": 1} for i in range(3)]
    fig = plots.show_items(items, keys=("image", "mask"), class_names=["n", "b", "m"])
    assert len(fig.axes) == 6
    assert fig.axes[0].get_title() == "n +artifact"
    assert fig.get_size_inches() == pytest.approx((3 * 1.9, 2 * 1.9))  # a column per item, a row per key


def test_learning_curves_and_bars():
    histories = {"mtl": [{"epoch": 1, "val/dice": 0.5}, {"epoch": 2, "val/dice": 0.7}]}
    fig = plots.learning_curves(histories, "val/dice")
    assert fig.axes[0].lines[0].get_ydata().tolist() == [0.5, 0.7]
    assert fig.axes[0].get_ylabel() == "dice (validation)"
    assert plots.learning_curves({"mtl": [{"epoch": 1, "val": 0.5}]}, "val").axes[0].get_ylabel() == "val"
    table = pd.DataFrame({"dice": [0.8, 0.9]}, index=["a", "b"])
    fig = plots.bar_table(table, ["dice"])
    assert [p.get_height() for p in fig.axes[0].patches] == [0.8, 0.9]
    changes = pd.DataFrame({"delta_m": [-3.0, -1.0, 2.0]}, index=["a", "b", "c"])  # e.g. relative changes, %
    low, high = plots.bar_table(changes, ["delta_m"]).axes[0].get_ylim()
    assert low < -3.0 and high > 2.0  # every bar in view, the negative ones included


# --- behaviour pinned down by the mutation audit of mtlearn/plots.py ---


def _square(top, size=4, n=16):
    mask = np.zeros((n, n), dtype=np.float32)
    mask[top:top + size, top:top + size] = 1
    return mask


def test_overlay_outlines_the_mask_solid_green_and_the_prediction_dashed_magenta():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    fig, ax = plt.subplots()
    plots.overlay(ax, torch.rand(1, 16, 16), mask=torch.from_numpy(_square(2))[None],
                  prediction=_square(8, size=6), title="case 1")
    truth, predicted = ax.collections
    assert tuple(truth.get_edgecolor()[0]) == to_rgba("lime")
    assert tuple(predicted.get_edgecolor()[0]) == to_rgba("magenta")
    # told apart by the line too (red-green colour blindness): solid truth, dashed prediction
    assert truth.get_linestyle()[0][1] is None and predicted.get_linestyle()[0][1] is not None
    # each outline sits around its own square (contour at 0.5: half a pixel outside)
    assert truth.get_paths()[0].vertices.min(axis=0).tolist() == [1.5, 1.5]
    assert predicted.get_paths()[0].vertices.min(axis=0).tolist() == [7.5, 7.5]
    assert ax.get_title() == "case 1" and ax.images[0].get_cmap().name == "gray"
    plt.close(fig)


def test_roc_curve_axes_are_false_then_true_positive_rate():
    labels = np.array([1, 1, 0, 0])
    p1 = np.array([0.8, 0.3, 0.6, 0.1])  # 3 of the 4 (positive, negative) pairs ranked right: AUC 0.75
    fig = plots.roc_curves(labels, np.stack([1 - p1, p1], axis=1), ["a", "b"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "false positive rate" and ax.get_ylabel() == "true positive rate"
    assert ax.get_xscale() == ax.get_yscale() == "linear"  # the chance diagonal stays straight
    curve_b = ax.lines[1]
    assert curve_b.get_label() == "b (AUC 0.75)"
    x, y = curve_b.get_xdata(), curve_b.get_ydata()
    assert np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) == pytest.approx(0.75)  # area under tpr(fpr), not fpr(tpr)
    assert (x[0], y[0], x[-1], y[-1]) == (0, 0, 1, 1)


def test_learning_curves_plot_against_the_epoch_with_a_legend_per_run():
    histories = {"mtl": [{"epoch": 1, "train/loss": 2.0}, {"epoch": 2, "val/dice": 0.5}, {"epoch": 3, "val/dice": 0.7}],
                 "seg only": [{"epoch": 1, "val/dice": 0.4}]}
    fig = plots.learning_curves(histories, "val/dice")
    ax = fig.axes[0]
    assert ax.lines[0].get_xdata().tolist() == [2, 3]  # epochs that have the metric, not 0, 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mtl", "seg only"]
    # the y axis read the raw key "val/dice"
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "dice (validation)" and ax.get_title() == "val/dice"
    assert plots.learning_curves(histories, "val/dice", ylabel="Dice").axes[0].get_ylabel() == "Dice"
    assert plots.learning_curves({"a": [{"epoch": 1, "loss": 1.0}]}, "loss").axes[0].get_ylabel() == "loss"


def test_learning_curves_take_a_history_from_fit_as_well_as_its_records():
    from mtlearn.engine import History

    history = History(monitor="val/dice")
    for epoch, dice in [(1, 0.4), (2, 0.6)]:
        history.append({"epoch": epoch, "val/dice": dice})
    fig = plots.learning_curves({"mtl": history, "records": history.records}, "val/dice")
    assert [line.get_ydata().tolist() for line in fig.axes[0].lines] == [[0.4, 0.6], [0.4, 0.6]]


def test_learning_curves_take_the_per_epoch_lists_of_train_disentangle():
    """Its history is {"acc_a": [epoch 1, epoch 2, ...], ...}: refused as "a dict" next to a History of fit."""
    fig = plots.learning_curves({"disentangle": {"acc_a": [0.5, 0.7, 0.9], "loss_a": [1.0, 0.6, 0.3]}}, "acc_a")
    line = fig.axes[0].lines[0]
    assert line.get_xdata().tolist() == [1, 2, 3] and line.get_ydata().tolist() == [0.5, 0.7, 0.9]


def test_learning_curves_and_roc_curves_tell_their_lines_apart_without_colour():
    # colour alone: in notebook 01, runs ending near Dice 0.9 merged for colour-blind readers (blue and purple in
    # deuteranopia, orange and green in protanopia), as did the ROC curves of two classes
    histories = {f"run {k}": [{"epoch": e, "val/dice": 0.9} for e in (1, 2, 3)] for k in range(8)}
    fig = plots.learning_curves(histories, "val/dice", zoom_last=2)
    every, zoomed = fig.axes
    styles = [(line.get_linestyle(), line.get_marker()) for line in every.lines]
    assert len(set(styles)) == 8 and len({style for style, _ in styles}) == 4  # line styles and markers both vary
    assert [(line.get_linestyle(), line.get_marker()) for line in zoomed.lines] == styles  # a run keeps its style
    labels = np.repeat([0, 1, 2], 4)
    fig = plots.roc_curves(labels, np.eye(3)[labels] + 0.1 * np.arange(12)[:, None], ["normal", "benign", "malignant"])
    *classes, chance = fig.axes[0].lines  # one curve per class, then the chance diagonal
    drawn = {line.get_linestyle() for line in classes}
    assert len(drawn) == 3 and chance.get_linestyle() == ":" and ":" not in drawn
    plt.close("all")


def test_learning_curves_zoom_on_the_last_epochs_in_a_second_panel():
    # notebook 01's validation Dice spans 0.1-0.95 over its first epochs, which squashed the last epochs' gaps
    histories = {"mtl": [{"epoch": e, "val/dice": d} for e, d in enumerate([0.1, 0.8, 0.90, 0.91, 0.92], start=1)],
                 "single": [{"epoch": e, "val/dice": d} for e, d in enumerate([0.2, 0.7, 0.88, 0.89], start=1)]}
    fig = plots.learning_curves(histories, "val/dice", title="Dice", zoom_last=3)
    every, zoomed = fig.axes
    assert all(ax.get_xlabel() == "epoch" and ax.get_ylabel() == "dice (validation)" and ax.xaxis.get_gridlines()[0]
               .get_visible() for ax in (every, zoomed))  # both panels labelled and gridded
    assert [line.get_xdata().tolist() for line in every.lines] == [[1, 2, 3, 4, 5], [1, 2, 3, 4]]
    assert [line.get_xdata().tolist() for line in zoomed.lines] == [[3, 4, 5], [3, 4]]  # epochs after the 2nd
    assert [a.get_color() for a in every.lines] == [z.get_color() for z in zoomed.lines]  # a run keeps its colour
    low, high = zoomed.get_ylim()
    assert 0.8 < low < 0.88 and 0.92 < high < 0.95  # its own range, not the first epochs'
    assert [t.get_text() for t in fig.texts] == ["Dice"] and "last 3 epochs" in zoomed.get_title()  # the suptitle
    spans = [p.get_patch_transform().transform(p.get_path().vertices)[:, 0] for p in every.patches]  # x in epochs
    assert [(xs.min(), xs.max()) for xs in spans] == [(2.5, 5.5)]  # the whole panel marks the window
    assert plots.learning_curves(histories, "val/dice", zoom_last=1).axes[1].get_title() == "the last epoch, zoomed"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["mtl", "single"]  # one legend for both
    plt.close(fig)
    # a run stopped early has nothing in the window of the longest run's last epochs: the legend says so
    short = {**histories, "stopped": [{"epoch": 1, "val/dice": 0.3}]}
    fig = plots.learning_curves(short, "val/dice", zoom_last=3)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "mtl", "single", "stopped (no finite values in the last 3 epochs)"]
    plt.close(fig)
    late = {"fine": histories["mtl"], "diverged": [{"epoch": e, "val/dice": d} for e, d in
                                                   enumerate([0.1, 0.5, math.nan, math.nan, math.nan], start=1)]}
    assert plots.learning_curves(late, "val/dice", zoom_last=3).legends[0].get_texts()[1].get_text() == (
        "diverged (no finite values in the last 3 epochs)")  # it did reach the window
    assert len(plots.learning_curves({"diverged": late["diverged"]}, "val/dice", zoom_last=3).axes) == 1  # empty
    # nothing before the window (one epoch of a smoke run): one panel, as without zoom_last
    assert len(plots.learning_curves(histories, "val/dice", zoom_last=5).axes) == 1
    for bad in (-1, 1.5, "3"):
        message = rf"zoom_last must be a number of epochs >= 0 .* got {re.escape(repr(bad))}"
        with pytest.raises(ValueError, match=message):
            plots.learning_curves(histories, "val/dice", zoom_last=bad)
    plt.close("all")


def test_bar_table_zooms_in_on_close_scores_and_draws_the_error_bars():
    table = pd.DataFrame({"dice": [0.8, 0.9]}, index=["a", "b"])
    errors = pd.DataFrame({"dice": [0.05, 0.01]}, index=["a", "b"])
    ax = plots.bar_table(table, ["dice"], errors=errors).axes[0]
    low, _ = ax.get_ylim()
    assert low == pytest.approx(0.4)  # below the lowest error bar (0.75) by twice the spread, rounded: 0.8 vs 0.9 shows
    from matplotlib.container import ErrorbarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    spans = [sorted(segment[:, 1].tolist()) for segment in bars.lines[2][0].get_segments()]
    assert spans == [pytest.approx([0.75, 0.85]), pytest.approx([0.89, 0.91])]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"] and ax.get_ylabel() == "dice (axis from 0.4)"


def test_bar_table_draws_a_summary_of_seeds_as_means_with_their_spread():
    """summarise's (metric, "mean"/"std"/"count") columns failed with "too many indices for array"."""
    from matplotlib.container import ErrorbarContainer

    from mtlearn.experiments import summarise

    runs = pd.DataFrame({"weighting": ["fixed", "fixed", "dwa", "dwa"], "dice": [0.7, 0.9, 0.6, 0.6]})
    ax = plots.bar_table(summarise(runs, "weighting", ["dice"]), "dice").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["dwa", "fixed"]  # summarise sorts the groups
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([0.6, 0.8])
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    spans = [sorted(segment[:, 1].tolist()) for segment in bars.lines[2][0].get_segments()]
    assert spans == [pytest.approx([0.6, 0.6]), pytest.approx([0.8 - 0.1414, 0.8 + 0.1414], abs=1e-4)]
    # and it says what the bars are, and over how many runs (they looked like any error bars, of any count)
    assert ax.figure._suptitle.get_text() == "error bars: ±1 sample standard deviation over 2 runs"
    uneven = pd.concat([runs, pd.DataFrame({"weighting": ["dwa"], "dice": [0.9]})], ignore_index=True)
    fig = plots.bar_table(summarise(uneven, "weighting", ["dice"]), "dice", title="Dice")
    assert fig._suptitle.get_text() == "Dice\nerror bars: ±1 sample standard deviation over 2-3 runs"
    plain = plots.bar_table(pd.DataFrame({"dice": [0.8]}, index=["mtl"]), "dice", title="Dice")
    assert plain._suptitle.get_text() == "Dice"  # no error bars, nothing said about them


def test_bar_table_takes_a_dict_of_runs_metrics_and_one_run_as_a_series():
    ax = plots.bar_table({"mtl": {"dice": 0.8, "acc": 0.7}, "seg": {"dice": 0.75}}, ["dice"]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mtl", "seg"]  # was: no attribute 'columns'
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([0.8, 0.75])
    ax = plots.bar_table(pd.Series({"dice": 0.8}, name="mtl"), "dice").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mtl"]
    with pytest.raises(TypeError, match=r"table must be a pandas DataFrame with a row per run .*got a list"):
        plots.bar_table([0.8, 0.75], "dice")
    plt.close("all")


def test_bar_table_matches_the_error_bars_to_the_rows_by_name():
    """A std table from summarise comes out sorted: pcgrad's spread must not land on fixed's bar."""
    table = pd.DataFrame({"dice": [0.5, 0.8]}, index=["fixed", "pcgrad"])
    errors = pd.DataFrame({"dice": [0.3, 0.01]}, index=["pcgrad", "fixed"])
    from matplotlib.container import ErrorbarContainer

    ax = plots.bar_table(table, ["dice"], errors=errors).axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    spans = [sorted(segment[:, 1].tolist()) for segment in bars.lines[2][0].get_segments()]
    assert spans == [pytest.approx([0.49, 0.51]), pytest.approx([0.5, 1.1])]


def test_learning_curves_draw_each_run_in_epoch_order_and_refuse_repeated_epochs():
    """Records out of order were drawn in list order, a line that doubled back; two fits joined restart at 1."""
    fig = plots.learning_curves({"run": [{"epoch": 2, "loss": 0.5}, {"epoch": 1, "loss": 0.9},
                                         {"epoch": 3, "loss": 0.4}]}, "loss")
    line = fig.axes[0].lines[0]
    assert line.get_xdata().tolist() == [1, 2, 3] and line.get_ydata().tolist() == [0.9, 0.5, 0.4]
    joined = [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.5}, {"epoch": 1, "loss": 0.8}]
    with pytest.raises(ValueError, match=r"run 'b' records epoch\(s\) \[1\] more than once \(two fits joined\?\)"):
        plots.learning_curves({"a": joined[:2], "b": joined}, "loss")
    unset = [{"epoch": 1, "loss": None}, {"epoch": 1, "loss": 0.5}]  # sorting the pairs compared None with 0.5
    with pytest.raises(ValueError, match=r"run 'c' records epoch\(s\) \[1\] more than once"):
        plots.learning_curves({"c": unset}, "loss")


@pytest.mark.parametrize("errors, message", [
    (pd.DataFrame({"dice": [0.01]}, index=["fixed"]), r"errors has no row \['pcgrad'\] of the table"),
    (pd.DataFrame({"dice": [0.01, -0.02]}, index=["fixed", "pcgrad"]),
     r"errors in column\(s\) \['dice'\] are negative"),
])
def test_bar_table_refuses_errors_it_cannot_draw(errors, message):
    """A row missing from errors silently lost its error bar; a negative one got matplotlib's message about 'yerr'."""
    table = pd.DataFrame({"dice": [0.5, 0.8]}, index=["fixed", "pcgrad"])
    with pytest.raises(ValueError, match=message):
        plots.bar_table(table, ["dice"], errors=errors)
    assert not plt.get_fignums()  # refused before a figure was opened
    plots.bar_table(table, ["dice"], errors=pd.DataFrame({"dice": [0.01, np.nan]}, index=["fixed", "pcgrad"]))


def test_show_items_names_a_missing_row_and_leaves_no_none_title():
    items = [{"image": torch.rand(1, 8, 8)}]  # BreastMNIST-like: no mask, and here no label
    with pytest.raises(ValueError, match=r"item 0 has no \['mask'\]; .* pass keys=, e.g. keys=\('image',\)"):
        plots.show_items(items)
    fig = plots.show_items(items, keys=("image",))
    assert fig.axes[0].get_title() == ""


def test_show_items_checks_every_item_before_drawing_and_refuses_a_single_item():
    import matplotlib.pyplot as plt

    good = {"image": torch.rand(1, 8, 8), "mask": torch.zeros(1, 8, 8)}
    plt.close("all")
    with pytest.raises(ValueError, match=r"item 2 has no \['mask'\]"):
        plots.show_items([good, good, {"image": torch.rand(1, 8, 8)}])
    with pytest.raises(ValueError, match=r"channels-last shape"):  # a bad picture in a later item
        plots.show_items([good, {"image": torch.rand(8, 8, 3), "mask": torch.zeros(1, 8, 8)}])
    assert plt.get_fignums() == []  # no empty grid left behind under the error
    with pytest.raises(ValueError, match=r"one item \(a dict\); pass a list of items, e.g. show_items\(\[item\]\)"):
        plots.show_items(good)
    with pytest.raises(ValueError, match=r"items is a batch \(a dict of 4 images\); pass the dataset, or items such"):
        plots.show_items({"image": torch.rand(4, 1, 8, 8), "label": torch.zeros(4)})  # next(iter(loader))


def test_grey_repeated_over_three_channels_is_drawn_grey_on_the_shared_scale():
    grey = torch.rand(1, 8, 8) * 0.4 + 0.1  # values 0.1..0.5
    assert np.array_equal(plots._image(grey.repeat(3, 1, 1)), grey[0].numpy())  # (H, W), not RGB
    fig = plots.show_items([{"image": grey.repeat(3, 1, 1), "clean": grey}], keys=("image", "clean"))
    image, clean = (ax.images[0] for ax in fig.axes)
    assert image.get_clim() == clean.get_clim() == pytest.approx((grey.min().item(), grey.max().item()))


def test_confusion_matrix_and_roc_take_tensors_that_track_gradients():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.randn(4, 3, requires_grad=True)  # straight from a model, not detached
    fig = plots.confusion_matrix(labels, logits.argmax(1), ["a", "b", "c"])
    assert int(np.asarray(fig.axes[0].images[0].get_array()).sum()) == 4
    fig = plots.roc_curves(labels, logits.softmax(1), ["a", "b", "c"])
    assert len(fig.axes[0].get_legend().get_texts()) == 3


def test_bar_table_keeps_zero_in_view_for_values_above_one():
    """Parameter counts 100 vs 200: zooming to just below 100 would draw them as about 0 vs 100."""
    table = pd.DataFrame({"params": [100.0, 200.0], "psnr": [30.1, 30.4]}, index=["a", "b"])
    axes = plots.bar_table(table, ["params", "psnr"]).axes
    assert [ax.get_ylim()[0] for ax in axes] == [0.0, 0.0]


def test_bar_table_keeps_zero_in_view_and_marks_it_for_negative_values():
    """Changes against a baseline: all below 0, the axis still reaches 0 (plus room for the values
    written at the bars' ends, 12 % of the span each side); with 0 inside the axis, a line marks it."""
    table = pd.DataFrame({"all below": [-3.0, -1.0], "both sides": [-3.0, 2.0]}, index=["a", "b"])
    below, both = plots.bar_table(table, ["all below", "both sides"]).axes
    assert below.get_ylim() == pytest.approx((-3.36, 0.36))
    assert both.get_ylim() == pytest.approx((-3.6, 2.6))
    for ax in (below, both):
        assert [line for line in ax.lines if list(line.get_ydata()) == [0.0, 0.0]], ax.get_title()  # the zero line


def test_show_items_titles_each_column_with_its_class_and_labels_each_row():
    items = [{"image": torch.rand(1, 8, 8), "mask": torch.ones(1, 8, 8), "label": i, "artifact": i % 2}
             for i in (2, 1, 0)]
    fig = plots.show_items(items * 4, keys=("image", "mask"), class_names=["n", "b", "m"], title="train")
    axes = np.array(fig.axes).reshape(2, -1)
    assert axes.shape == (2, 8)  # max_items=8 columns of the 12 items
    assert [ax.get_title() for ax in axes[0, :3]] == ["m", "b +artifact", "n"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["image", "mask"]
    assert axes[1, 0].images[0].get_clim() == (0, 1)  # an all-lesion mask shows white, not mid-grey
    assert axes[1, 0].images[0].get_cmap().name == "gray"  # white lesion on black, as the images' grey
    assert fig._suptitle.get_text() == "train"
    assert fig.get_size_inches() == pytest.approx((8 * 1.9, 2 * 1.9))  # 8 columns, not 12 or 3


def test_an_rgb_image_is_shown_in_colour():
    rgb = torch.rand(3, 8, 8)
    assert np.array_equal(plots._image(rgb), rgb.permute(1, 2, 0).numpy())
    assert plots._image(torch.rand(1, 8, 8)).shape == (8, 8)
    green = torch.zeros(3, 8, 8)
    green[1] = 1  # red and blue equal, green not: colour, not grey
    assert plots._image(green).shape == (8, 8, 3)
    blue = torch.zeros(3, 8, 8)
    blue[2] = 1  # red and green equal, blue not: colour too
    assert plots._image(blue).shape == (8, 8, 3)


def test_colour_outside_zero_one_is_scaled_not_clipped_and_inside_it_drawn_as_it_is():
    """imshow clips colour to [0, 1]: a uint8 image was drawn white, a normalised one black below 0."""
    uint8 = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    normalised = torch.randn(3, 8, 8)
    inside = torch.rand(3, 8, 8) * 0.5 + 0.2
    fig = plots.show_items([{"image": x} for x in (uint8, normalised, inside)], keys=("image",))
    for ax, x in zip(fig.axes, (uint8.float(), normalised, inside)):
        drawn, x = np.asarray(ax.images[0].get_array()), x.permute(1, 2, 0).numpy()
        scaled = (x - x.min()) / (x.max() - x.min()) if x.min() < 0 or x.max() > 1 else x
        assert np.allclose(drawn, scaled)
    fig, ax = plt.subplots()
    plots.overlay(ax, normalised)
    assert np.asarray(ax.images[0].get_array()).min() == 0 and np.asarray(ax.images[0].get_array()).max() == 1
    plt.close("all")


def test_four_or_more_channels_are_refused_not_drawn_as_false_colour():
    """A batch of grey images (N, H, W) or a seg head's (C, H, W) scores drew their first three as RGB."""
    for shape in ((2, 8, 8), (4, 8, 8), (8, 8, 8)):
        with pytest.raises(ValueError, match=r"1 or 3 channels.*got shape .*x\[i\].*argmax\(0\)"):
            plots._image(np.zeros(shape))


@pytest.mark.parametrize("label, message", [
    (1.7, r"item 1 has label 1.7; labels are class indices"),
    (torch.tensor([0.0, 1.0]), r"item 1 has label tensor\(\[0., 1.\]\).*one-hot vector pass its argmax"),
    (5, r"item 1 has label 5, but class_names \['a', 'b'\] name labels 0..1"),
])
def test_show_items_refuses_a_label_that_is_not_a_class_index(label, message):
    """1.7 was titled as class 1; a one-hot label raised torch's "only one element tensors ..."."""
    items = [{"image": torch.rand(1, 8, 8), "label": 0}, {"image": torch.rand(1, 8, 8), "label": label}]
    plt.close("all")
    with pytest.raises(ValueError, match=message):
        plots.show_items(items, keys=("image",), class_names=["a", "b"])
    assert plt.get_fignums() == []
    assert plots.show_items(items[:1] + [{"image": torch.rand(1, 8, 8), "label": torch.tensor(1)}],
                            keys=("image",), class_names=["a", "b"]).axes[1].get_title() == "b"


@pytest.mark.parametrize("artifact", [None, "yes", [0, 1], -1])
def test_show_items_refuses_an_artifact_flag_that_is_not_0_or_1(artifact):
    items = [{"image": torch.rand(1, 8, 8), "artifact": artifact}]
    with pytest.raises(ValueError, match=r"item 0 has artifact .*; expected 0 or 1"):
        plots.show_items(items, keys=("image",))
    for flag in (torch.tensor(1), torch.tensor([1])):  # 0-d or one element, as a collated batch's item has
        assert plots.show_items([{"image": torch.rand(1, 8, 8), "artifact": flag}],
                                keys=("image",)).axes[0].get_title() == " +artifact"
    plt.close("all")


def test_a_mask_row_has_one_shade_per_class_in_every_column():
    one, two = torch.ones(1, 8, 8), torch.ones(1, 8, 8) * 2
    fig = plots.show_items([{"image": torch.rand(1, 8, 8), "mask": m} for m in (one, two)])
    assert [fig.axes[i].images[0].get_clim() for i in (2, 3)] == [(0, 2), (0, 2)]  # class 1 mid-grey in both


def test_confusion_matrix_writes_dark_cells_in_white():
    ax = plots.confusion_matrix([0, 0, 0, 1], [0, 0, 0, 1], ["a", "b"]).axes[0]
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    assert colours == {"3": "white", "0": "black", "1": "black"}


# --- figure review: missing values, written values, an honest zoom, one grey scale per item ---


TEST_TABLE = pd.DataFrame({"seg/dice": [0.907, 0.901, np.nan, 0.918], "cls/acc": [0.950, np.nan, 0.944, 0.975]},
                          index=["mtl", "seg only", "cls only", "no attention"])


def _bar_centres(ax):
    return [p.get_x() + p.get_width() / 2 for p in ax.patches]


def test_bar_table_draws_no_bar_but_an_n_a_mark_where_a_value_is_missing():
    dice, acc = plots.bar_table(TEST_TABLE, ["seg/dice", "cls/acc"]).axes
    assert _bar_centres(dice) == pytest.approx([0, 1, 3]) and _bar_centres(acc) == pytest.approx([0, 2, 3])
    assert all(np.isfinite(p.get_height()) for ax in (dice, acc) for p in ax.patches)
    marks = [t for t in dice.texts if t.get_text() == "n/a"]
    assert len(marks) == 1 and marks[0].get_position()[0] == 2  # at the run without a Dice ("cls only")
    assert [t.get_position()[0] for t in acc.texts if t.get_text() == "n/a"] == [1]
    # a panel per metric, each as wide as before; every run's slot in view, half a slot either side
    assert dice.figure.get_size_inches() == pytest.approx((2 * 3.2, 3.4))
    assert plots.bar_table(TEST_TABLE, ["seg/dice"]).get_size_inches() == pytest.approx((3.2, 3.4))
    assert dice.get_xlim() == acc.get_xlim() == pytest.approx((-0.6, 3.6))


def test_bar_table_writes_each_value_on_its_bar():
    dice = plots.bar_table(TEST_TABLE, ["seg/dice"]).axes[0]
    written = {t.get_position()[0]: t.get_text() for t in dice.texts if t.get_text() != "n/a"}
    assert written == {0: "0.907", 1: "0.901", 3: "0.918"}
    assert plots.bar_table(TEST_TABLE, ["seg/dice"], fmt="{:.1%}").axes[0].texts[0].get_text() == "90.7%"


def test_bar_table_writes_a_value_beyond_the_end_of_its_bar_and_error_bar():
    """Below a negative bar (and its error bar), above a positive one: never on the bar itself."""
    table = pd.DataFrame({"gain": [0.3, -0.3]}, index=["up", "down"])
    errors = pd.DataFrame({"gain": [0.05, 0.1]}, index=["up", "down"])
    up, down = plots.bar_table(table, ["gain"], errors=errors).axes[0].texts[:2]
    assert up.get_position() == pytest.approx((0, 0.35)) and up.get_va() == "bottom"
    assert down.get_position() == pytest.approx((1, -0.4)) and down.get_va() == "top"


def test_bar_table_zooms_in_on_close_scores_from_the_values_present_and_says_so():
    """Dice 0.901-0.918: an axis from 0 (or from a 0 filled in for a missing value) shows no difference."""
    dice, acc = plots.bar_table(TEST_TABLE, ["seg/dice", "cls/acc"]).axes
    low, high = dice.get_ylim()
    assert 0.85 <= low < 0.901 and high > 0.918  # every bar's top in view, the bottom well above 0
    assert acc.get_ylim()[0] > 0.8
    assert dice.get_ylabel() == f"seg/dice (axis from {low:g})"  # the axis not starting at 0 is said ...
    assert len(dice.get_lines()) == 2  # ... and drawn: two slashes across the foot of the y axis
    assert all(line.get_transform() == dice.transAxes for line in dice.get_lines())
    far = pd.DataFrame({"acc": [0.1, 0.9]})  # far apart: from 0, no break mark
    ax = plots.bar_table(far, ["acc"]).axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylabel() == "acc" and not ax.get_lines()
    equal = pd.DataFrame({"acc": [0.85, 0.85]})  # bottom 0.85 - 0.05 rounds down to 0.8, not 0.79 (float error)
    assert plots.bar_table(equal, ["acc"]).axes[0].get_ylim()[0] == pytest.approx(0.8)


def test_bar_table_survives_a_metric_no_run_has():
    ax = plots.bar_table(pd.DataFrame({"auc": [np.nan, np.nan]}, index=["a", "b"]), ["auc"]).axes[0]
    assert not ax.patches and [t.get_text() for t in ax.texts] == ["n/a", "n/a"]


def test_show_items_gives_the_intensity_rows_of_an_item_one_grey_scale():
    """The speckled image and its clean scene: the same grey must be the same value in both rows."""
    image = torch.linspace(0.1, 0.9, 64).reshape(1, 8, 8)
    clean = torch.linspace(0.0, 0.5, 64).reshape(1, 8, 8)
    items = [{"image": image, "clean": clean, "mask": torch.zeros(1, 8, 8), "label": 0},
             {"image": image * 0.5, "clean": clean * 0.5, "mask": torch.ones(1, 8, 8), "label": 1}]
    fig = plots.show_items(items, keys=("image", "clean", "mask"))
    axes = np.array(fig.axes).reshape(3, 2)
    for col, (low, high) in enumerate([(0.0, 0.9), (0.0, 0.45)]):
        image_clim, clean_clim = (axes[row, col].images[0].get_clim() for row in (0, 1))
        assert image_clim == clean_clim == (pytest.approx(low), pytest.approx(high))  # the item's range
        assert axes[2, col].images[0].get_clim() == (0, 1)  # a mask, empty or full, shown as a mask
    item = {"image": image * 0.5, "artifact_mask": torch.ones(1, 8, 8)}
    fig = plots.show_items([item], keys=("image", "artifact_mask"))
    image_ax, artifact_ax = fig.axes  # artifact_mask is a mask too: 0/1, outside the image's grey scale
    assert image_ax.images[0].get_clim() == (pytest.approx(0.05), pytest.approx(0.45))
    assert artifact_ax.images[0].get_clim() == (0, 1)


def test_task_markers_are_fixed_for_the_course_tasks_and_distinct_for_others():
    # every other task had the same marker, "v", where markers are what tells tasks apart without colour
    assert plots.task_markers(["cls", "seg", "recon", "total"]) == {"cls": "s", "seg": "o", "recon": "^", "total": "D"}
    assert plots.task_markers(["depth", "seg", "lr", "depth"]) == {"depth": "v", "seg": "o", "lr": "P"}


def test_task_colours_are_fixed_for_the_course_tasks():
    assert plots.task_colours(["cls", "seg", "recon", "total"]) == {
        "cls": "tab:orange", "seg": "tab:blue", "recon": "tab:green", "total": "black"}
    assert plots.task_colours(["depth", "seg", "lr"]) == {"depth": "tab:red", "seg": "tab:blue", "lr": "tab:purple"}
    assert plots.task_colours(["a", "a", "b"]) == {"a": "tab:red", "b": "tab:purple"}  # a repeat takes no colour
    many = plots.task_colours([f"t{i}" for i in range(8)])  # more names than spare colours: grey, not an error
    assert many["t5"] == "tab:cyan" and many["t6"] == many["t7"] == "tab:gray"


def test_learning_curves_name_a_metric_no_run_recorded():
    records = [{"epoch": 1, "val/seg/dice": 0.5}, {"epoch": 2, "val/seg/dice": 0.6}]
    with pytest.raises(ValueError, match=r"no run recorded 'val/seg/dic'; the records hold \['epoch', 'val/seg/"):
        plots.learning_curves({"run": records}, "val/seg/dic")


def test_roc_curves_say_that_the_scores_are_not_finite():
    scores = np.array([[0.1, 0.9], [np.nan, np.nan], [0.8, 0.2]])
    with pytest.raises(ValueError, match=r"1 of 3 rows of scores are not finite"):
        plots.roc_curves([1, 0, 0], scores, ["benign", "malignant"])


@pytest.mark.parametrize("labels, scores, match", [
    ([0, 1, -1], np.full((3, 3), 0.5), "labels must be .* in 0..2"),  # -1 would be a negative of every class
    ([0.0, 1.0, 2.0], np.full((3, 3), 0.5), "integer classes"),
    ([0, 1, 2], np.full(3, 0.5), r"scores must be \(N, K\) = \(3, 3\).*shape \(3,\)"),  # a binary model's
    ([0, 1, 2], np.full((3, 2), 0.5), r"one column per class name.*shape \(3, 2\)"),
])
def test_roc_curves_refuse_labels_and_scores_they_cannot_read(labels, scores, match):
    import matplotlib.pyplot as plt

    plt.close("all")
    with pytest.raises(ValueError, match=match):
        plots.roc_curves(labels, scores, ["a", "b", "c"])
    assert plt.get_fignums() == []  # checked before the figure is opened


def test_overlay_refuses_an_outline_of_another_size_or_the_seg_scores():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    image, mask = torch.rand(1, 16, 16), torch.zeros(1, 16, 16)
    with pytest.raises(ValueError, match=r"prediction is 8x8 but the image is 16x16: resize"):
        plots.overlay(ax, image, mask, torch.zeros(8, 8))  # would be drawn in the top-left quarter
    with pytest.raises(ValueError, match=r"prediction must be one \(H, W\).*argmax\(0\)"):
        plots.overlay(ax, image, mask, torch.rand(2, 16, 16))  # the seg head's scores before argmax
    with pytest.raises(ValueError, match=r"mask is 16x12"):
        plots.overlay(ax, image, torch.zeros(16, 12))
    assert len(ax.images) == 0 and len(ax.collections) == 0  # nothing half drawn
    with pytest.raises(TypeError, match=r"overlay draws on the Axes given first, got a Tensor of shape \(1, 16, 16\); "
                                        r"e\.g\. fig, ax = plt\.subplots\(\); overlay\(ax, image, mask\)"):
        plots.overlay(image, mask)  # "'Tensor' object has no attribute 'imshow'"
    plt.close(fig)


def test_a_channels_last_image_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"channels-last shape \(12, 16, 3\).*permute\(2, 0, 1\)"):
        plots._image(np.zeros((12, 16, 3)))  # used to draw its first three rows as a 16 x 3 strip
    with pytest.raises(ValueError, match=r"channels-last shape \(8, 8, 4\)"):
        plots._image(np.zeros((8, 8, 4)))  # an RGBA PNG read as an array
    with pytest.raises(ValueError, match=r"non-empty"):
        plots._image(np.zeros((1, 0, 8)))
    with pytest.raises(ValueError, match=r"1 or 3 channels"):
        plots._image(np.zeros((2, 8, 8)))
    assert plots._image(np.random.rand(3, 12, 16)).shape == (12, 16, 3)  # 3 different channels: RGB


def test_show_items_renders_only_the_items_it_shows():
    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.rendered = 0

        def __len__(self):
            return 500

        def __getitem__(self, index):
            if index >= len(self):
                raise IndexError(index)
            self.rendered += 1
            return {"image": torch.rand(1, 8, 8), "label": 0}

    data = Counting()
    fig = plots.show_items(data, keys=("image",), max_items=3)
    assert len(fig.axes) == 3 and data.rendered == 3  # was 500: every item drawn to keep 3


@pytest.mark.parametrize("items, kwargs, match", [
    ([], {}, "no items to show"),
    ([{"image": torch.rand(1, 8, 8)}], {"keys": ()}, "keys is empty"),
    ([{"image": torch.rand(1, 8, 8)}], {"keys": ("image",), "max_items": 0}, "max_items must be an int >= 1"),
])
def test_show_items_refuses_an_empty_grid_before_opening_a_figure(items, kwargs, match):
    import matplotlib.pyplot as plt

    plt.close("all")
    with pytest.raises(ValueError, match=match):
        plots.show_items(items, **kwargs)
    assert plt.get_fignums() == []


def test_bar_table_names_a_missing_column_before_opening_a_figure():
    import matplotlib.pyplot as plt

    plt.close("all")
    mine = plt.figure()  # a student's own figure stays open
    table = pd.DataFrame({"dice": [0.9, 0.8]}, index=["mtl", "seg"])
    with pytest.raises(ValueError, match=r"table has no column \['acc'\]; its columns are \['dice'\]"):
        plots.bar_table(table, ["dice", "acc"])
    with pytest.raises(ValueError, match=r"errors has no column \['dice'\]"):
        plots.bar_table(table, ["dice"], errors=pd.DataFrame({"acc": [0.1, 0.1]}, index=["mtl", "seg"]))
    with pytest.raises(ValueError, match="metrics is empty"):
        plots.bar_table(table, [])
    assert plt.get_fignums() == [mine.number]
    plt.close(mine)
    fig = plots.bar_table(table, "dice")  # one name, not the letters d, i, c, e
    assert [ax.get_title() for ax in fig.axes] == ["dice"]


def test_bad_rows_labels_and_columns_are_named_before_a_figure_opens():
    """Each failed after opening its figure, with a pandas or Python error naming no fix (or no error:
    show_items titled label -1 with the last class name)."""
    plt.close("all")
    item = {"image": torch.rand(1, 8, 8)}
    for label in (-1, 5):
        with pytest.raises(ValueError, match=rf"item 0 has label {label}, but class_names \['benign', 'malignant'\]"):
            plots.show_items([{**item, "label": label}], keys=("image",), class_names=["benign", "malignant"])
    with pytest.raises(ValueError, match="a record with 'dice' has no 'epoch'"):
        plots.learning_curves({"run": [{"dice": 0.5}]}, "dice")
    table = pd.DataFrame({"dice": [0.9, 0.8], "name": ["a", "b"]}, index=["mtl", "seg"])
    with pytest.raises(ValueError, match="table's column 'name' is not numbers"):
        plots.bar_table(table, ["dice", "name"])
    twice = pd.DataFrame({"dice": [0.9, 0.8]}, index=["mtl", "mtl"])
    with pytest.raises(ValueError, match=r"named twice: \['mtl'\]"):
        plots.bar_table(twice, "dice", errors=twice)
    assert plt.get_fignums() == []


def test_learning_curves_mark_a_run_with_nothing_to_draw_and_refuse_no_records():
    histories = {"diverged": [{"epoch": 1, "val/dice": float("nan")}, {"epoch": 2, "val/dice": float("nan")}],
                 "fine": [{"epoch": 1, "val/dice": 0.5}, {"epoch": 2, "val/dice": 0.6}],
                 "cls only": [{"epoch": 1, "val/acc": 0.7}]}
    legend = plots.learning_curves(histories, "val/dice").axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "diverged (no finite values)", "fine", "cls only (no finite values)"]
    with pytest.raises(ValueError, match="histories holds no records"):
        plots.learning_curves({"a": []}, "val/dice")


def test_show_items_with_no_class_names_names_the_label_it_cannot_name():
    with pytest.raises(ValueError, match=r"item 0 has label 1, but class_names \[\] name labels"):  # an IndexError
        plots.show_items([{"image": torch.rand(1, 8, 8), "label": 1}], keys=("image",), class_names=[])
    plt.close("all")


@pytest.mark.parametrize("histories, metric, match", [
    ({"a": {"loss": 1.0}}, "dice",  # its keys were read as records: "the records hold ['l', 'o', 's']"
     r"histories\['a'\] must be a History, a list of per-epoch records \(dicts\) or a dict of per-epoch lists, "
     r"got a dict$"),
    ({"a": {"loss": [1, 2], "acc": [0.5]}}, "dice", r"got a dict$"),  # lists of different lengths: no epochs
    ({"a": [1, 2, 3]}, "dice", r"histories\['a'\] must be .*, got a list holding an int$"),  # was a TypeError
    ({"a": "loss"}, "dice", r"histories\['a'\] must be .*, got a str$"),
    ([{"epoch": 1, "dice": 0.5}], "dice",  # one run's records, unnamed: an AttributeError on .items()
     r"histories must be \{run name: History or records\}, got a list; name the run, e.g. learning_curves\("),
    ({"a": [{"epoch": 1, "dice": 0.5}]}, ["dice"], r"metric must be one record key \(a str\).*got \['dice'\]"),
])
def test_learning_curves_refuse_histories_of_another_shape_before_opening_a_figure(histories, metric, match):
    with pytest.raises(ValueError, match=match):
        plots.learning_curves(histories, metric)
    assert not plt.get_fignums()


def test_learning_curves_name_a_bare_history_that_is_not_in_a_dict():
    from mtlearn.engine import History

    history = History()
    history.append({"epoch": 1, "val/seg/dice": 0.5})
    with pytest.raises(ValueError, match=r"got a History; name the run, e.g. learning_curves\(\{'mtl': history\}"):
        plots.learning_curves(history, "val/seg/dice")


@pytest.mark.parametrize("items, match", [
    ([torch.rand(1, 8, 8)], r"item 0 is a Tensor of shape \(1, 8, 8\), not a dict"),  # a RuntimeError of torch's
    (torch.rand(2, 1, 8, 8), r"item 0 is a Tensor of shape \(1, 8, 8\), not a dict"),  # a batch of images
    ([(torch.rand(1, 8, 8), 0)], r"item 0 is a tuple, not a dict"),  # (image, label), as torchvision's datasets
])
def test_show_items_refuses_items_that_are_not_dicts(items, match):
    with pytest.raises(ValueError, match=match + r": pass a dataset, or items such as dataset\[i\]: dicts with an "
                                                 r"'image' tensor"):
        plots.show_items(items)
    assert not plt.get_fignums()


def test_show_items_takes_one_key_as_a_str():
    fig = plots.show_items([{"image": torch.rand(1, 8, 8)}], keys="image")  # was the rows 'i', 'm', 'a', ...
    assert [ax.get_ylabel() for ax in fig.axes] == ["image"]


# ---------------------------------------------------------------- found unpinned by a mutation sweep


def _extent(collection):
    """(x min, x max, y min, y max) of a contour's outline, in pixels: x the column, y the row."""
    xy = np.concatenate([path.vertices for path in collection.get_paths()])
    return xy[:, 0].min(), xy[:, 0].max(), xy[:, 1].min(), xy[:, 1].max()


def _off_diagonal_mask():
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[2:5, 8:13] = 1  # rows 2-4, columns 8-12: transposed, it would sit at rows 8-12, columns 2-4
    return mask


def test_bar_table_names_each_bar_by_its_own_row_in_the_tables_order():
    """The tick labels were sorted while the bars kept the table's order: "mtl" stood under seg's bar."""
    ax = plots.bar_table(pd.DataFrame({"dice": [0.8, 0.9]}, index=["seg", "mtl"]), "dice").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["seg", "mtl"]
    assert ax.get_xticks().tolist() == pytest.approx(_bar_centres(ax))  # each name under its bar
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([0.8, 0.9])


def test_overlay_outlines_a_mask_where_it_is_not_transposed():
    """A mask off the diagonal was outlined at its mirror image (rows for columns)."""
    _, ax = plt.subplots()
    mask = _off_diagonal_mask()
    plots.overlay(ax, torch.rand(1, 16, 16), mask=mask, prediction=torch.from_numpy(mask)[None])
    for outline in ax.collections:  # the truth and the prediction
        assert _extent(outline) == pytest.approx((7.5, 12.5, 1.5, 4.5))


def test_overlay_draws_the_image_as_it_is_not_transposed():
    """A square test image looks the same transposed: this one has 6 rows and 10 columns."""
    image = torch.rand(1, 6, 10)
    _, ax = plt.subplots()
    plots.overlay(ax, image, mask=np.zeros((6, 10)))
    assert np.array_equal(np.asarray(ax.images[0].get_array()), image[0].numpy())


def test_show_items_draws_a_mask_the_same_way_up_as_its_image():
    """A mask drawn from the bottom up (origin="lower") showed the lesion of the top row at the bottom."""
    image, mask = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    image[:, 0], mask[:, 0] = 1, 1  # the top row bright in both
    fig = plots.show_items([{"image": image, "mask": mask}], keys=("image", "mask"))
    drawn = [ax.images[0] for ax in fig.axes]  # the image's panel, then the mask's
    assert [im.origin for im in drawn] == ["upper", "upper"]  # row 0 at the top in both
    assert drawn[0].get_extent() == drawn[1].get_extent()
    assert np.array_equal(np.asarray(drawn[1].get_array()) > 0, mask[0].numpy() > 0)


def test_learning_curves_spell_out_a_training_metric_as_training():
    """A training metric labelled "(validation)" would pass training scores off as held-out ones."""
    histories = {"mtl": [{"epoch": 1, "train/seg/dice": 0.5}, {"epoch": 2, "train/seg/dice": 0.6}]}
    assert plots.learning_curves(histories, "train/seg/dice").axes[0].get_ylabel() == "seg/dice (training)"


def test_bar_table_draws_the_errors_given_over_a_summarys_standard_deviations():
    """errors= is documented to replace summarise's std; the std was drawn all the same."""
    from matplotlib.container import ErrorbarContainer

    from mtlearn.experiments import summarise

    runs = pd.DataFrame({"weighting": ["fixed", "fixed", "dwa", "dwa"], "dice": [0.7, 0.9, 0.6, 0.6]})
    errors = pd.DataFrame({"dice": [0.05, 0.02]}, index=["dwa", "fixed"])  # e.g. a confidence interval
    ax = plots.bar_table(summarise(runs, "weighting", ["dice"]), "dice", errors=errors).axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    spans = [sorted(segment[:, 1].tolist()) for segment in bars.lines[2][0].get_segments()]
    assert spans == [pytest.approx([0.55, 0.65]), pytest.approx([0.78, 0.82])]  # not the std's 0 and 0.14


@pytest.mark.parametrize("low, high, scaled", [
    (-0.5, 0.9, True),  # below 0 only: was clipped to black below 0, not scaled
    (0.2, 1.0, False),  # in [0, 1] up to exactly 1: drawn as it is, not stretched to [0, 1]
])
def test_a_colour_image_is_scaled_exactly_when_it_leaves_zero_one(low, high, scaled):
    x = torch.linspace(low, high, 3 * 4 * 4).reshape(3, 4, 4)  # three different channels: colour
    _, ax = plt.subplots()
    plots.overlay(ax, x)
    drawn, x = np.asarray(ax.images[0].get_array()), x.permute(1, 2, 0).numpy()
    assert np.allclose(drawn, (x - low) / (high - low) if scaled else x)


@pytest.mark.parametrize("values, errors", [([0.5, 0.6], [0.3, 0.3]), ([100.0, 200.0], [50.0, 80.0])])
def test_bar_table_keeps_every_error_bar_and_its_value_in_view(values, errors):
    """The top was set from the bars alone: a long error bar and the value written above it were cut off."""
    table = pd.DataFrame({"m": values}, index=["a", "b"])
    ax = plots.bar_table(table, "m", errors=pd.DataFrame({"m": errors}, index=["a", "b"])).axes[0]
    top = ax.get_ylim()[1]
    assert all(top > value + error for value, error in zip(values, errors))
    assert all(text.get_position()[1] < top for text in ax.texts)


def test_bar_table_zooms_in_on_close_scores_that_reach_one():
    """An accuracy of exactly 1.0 is a score too: 0.97 vs 1.0 was drawn from 0, where they look equal."""
    ax = plots.bar_table(pd.DataFrame({"acc": [0.97, 1.0]}, index=["a", "b"]), "acc").axes[0]
    low = ax.get_ylim()[0]
    assert 0 < low < 0.97 and ax.get_ylabel() == f"acc (axis from {low:g})"


def test_bar_table_writes_the_value_of_a_zero_bar_above_the_axis():
    """A value of exactly 0 was written hanging below 0, under the axis' foot, among the tick labels."""
    ax = plots.bar_table(pd.DataFrame({"gain": [0.0, 0.5]}, index=["none", "some"]), "gain").axes[0]
    zero = ax.texts[0]
    assert zero.get_text() == "0.000" and zero.get_va() == "bottom" and zero.get_position()[1] == 0


def test_learning_curves_zoomed_say_a_run_with_no_finite_value_at_all_has_none():
    """A run that never had a finite value was said to have none "in the last 3 epochs", as if it had before."""
    histories = {"fine": [{"epoch": e, "val/dice": 0.5 + e / 100} for e in range(1, 6)],
                 "diverged": [{"epoch": e, "val/dice": math.nan} for e in range(1, 6)]}
    fig = plots.learning_curves(histories, "val/dice", zoom_last=3)
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fine", "diverged (no finite values)"]
