"""The explorer builds without a browser and redraws when a control changes."""

import matplotlib

matplotlib.use("Agg")
import re

import numpy as np
import pytest
import torch

from mtlearn.widgets import DatasetExplorer


def fake_items(n=3):
    items = []
    for i in range(n):
        mask = torch.zeros(1, 16, 16)
        mask[:, 4:8, 4:8] = 1
        items.append({"image": torch.rand(1, 16, 16), "clean": torch.rand(1, 16, 16), "mask": mask,
                      "artifact_mask": torch.zeros(1, 16, 16), "label": i % 3, "artifact": i % 2,
                      "id": f"item-{i}"})
    return items


def test_explorer_redraws_on_control_changes():
    explorer = DatasetExplorer(fake_items(), class_names=("normal", "benign", "malignant"))
    assert explorer.state["index"] == 0 and "normal" in explorer.state["title"]
    assert explorer.index.continuous_update is False  # one redraw where the slider stops, not one per step
    assert not explorer.figure.axes[0].axison  # an image, not a plot: no pixel ticks or frame
    explorer.index.value = 2
    assert explorer.state["index"] == 2 and "malignant" in explorer.state["title"]
    assert "item-2" in explorer.state["title"] and "artifact=0" in explorer.state["title"]
    explorer.show.value = "clean"
    assert explorer.state["layer"] == "clean"
    explorer.artifact.value = True
    assert explorer.state["artifact"] is True
    assert explorer.index.max == 2


def test_a_closed_explorer_closes_every_widget_and_is_let_go():
    """ipywidgets keeps every widget until it is closed, and each control kept its explorer: built again (its cell
    run again), an explorer left the earlier one in memory with all it held."""
    import gc
    import weakref

    explorer = DatasetExplorer(fake_items())
    controls = [explorer.widget, *explorer.widget.children, explorer.index, explorer.show, explorer.outline,
                explorer.artifact, explorer.output]
    made = [*controls, *(c.layout for c in controls), *(c.style for c in controls if hasattr(c, "style"))]
    assert all(widget.comm is not None for widget in made)
    gone = weakref.ref(explorer)
    explorer.close()
    explorer.close()  # twice: nothing more to do
    assert all(widget.comm is None for widget in made)  # every widget it made, their layouts and styles too
    assert explorer.dataset is None
    assert explorer._repr_mimebundle_() == {"text/plain": "DatasetExplorer: closed; build a new one to explore again"}
    with pytest.raises(RuntimeError, match="this DatasetExplorer was closed"):  # not a TypeError of None[index]
        explorer.draw()
    del explorer, controls, made
    gc.collect()
    assert gone() is None


def test_explorer_draws_the_chosen_layer_and_outlines():
    items = fake_items()
    items[1]["artifact_mask"][:, 10:14, 10:14] = 1
    explorer = DatasetExplorer(items, class_names=("normal", "benign", "malignant"))
    explorer.index.value = 1
    explorer.show.value = "clean"
    ax = explorer.figure.axes[0]
    assert np.array_equal(ax.images[0].get_array(), items[1]["clean"][0].numpy())  # the clean image, not the noisy one
    assert len(ax.collections) == 1  # one contour: the lesion outline
    explorer.artifact.value = True
    assert len(explorer.figure.axes[0].collections) == 2  # ... and the artifact's
    # solid and dashed, not green and orange alone (they merge for a colour-blind reader)
    lesion, artifact = explorer.figure.axes[0].collections
    assert lesion.get_linestyle()[0][1] is None and artifact.get_linestyle()[0][1] is not None
    explorer.outline.value = False
    assert len(explorer.figure.axes[0].collections) == 1  # the artifact's alone


def test_redraws_do_not_pile_up_figures():
    import matplotlib.pyplot as plt

    plt.close("all")
    explorer = DatasetExplorer(fake_items(), class_names=("normal", "benign", "malignant"))
    for index in (1, 2, 0, 1):
        explorer.index.value = index
    assert plt.get_fignums() == []


def test_an_item_it_cannot_draw_is_named_in_the_output_and_leaves_no_figure_open():
    """The figure was opened before the picture was read: moving to an item without the chosen layer left a
    figure open per try, the old picture and state on show, and the KeyError in the kernel's log."""
    import matplotlib.pyplot as plt

    items = fake_items()
    del items[1]["clean"]
    explorer = DatasetExplorer(items, class_names=("normal", "benign", "malignant"))
    explorer.show.value = "clean"
    plt.close("all")
    explorer.index.value = 1
    assert explorer.state == {"index": 1, "error": "item 1 has no 'clean'"} and explorer.figure is None
    assert explorer.output.outputs[0]["text"] == "item 1 has no 'clean'\n"
    assert explorer.output.outputs[0]["name"] == "stderr"  # shown as an error, not as printed text
    assert plt.get_fignums() == []
    explorer.index.value = 2  # a good item draws again
    assert explorer.state["index"] == 2 and explorer.figure is not None


@pytest.mark.parametrize("bad, message", [
    ({"label": None}, r"item 1 cannot be drawn: item 'item-1' has label None; labels are class indices"),
    ({"label": 1.7}, r"item 1 cannot be drawn: item 'item-1' has label 1.7; labels are class indices"),
    ({"mask": torch.zeros(3, 16, 16)}, r"item 1 cannot be drawn: mask must be one \(H, W\) or \(1, H, W\) mask"),
    ({"mask": torch.zeros(1, 8, 8)}, r"item 1 cannot be drawn: mask is 8x8 but the image is 16x16"),
])
def test_a_bad_label_or_outline_is_named_in_the_output(bad, message):
    """A None label (TypeError) and a 3-channel mask (raised by contour after the figure opened) went to the kernel
    log, the second leaving a figure open; a mask of another size was drawn in the wrong place."""
    import matplotlib.pyplot as plt

    items = fake_items()
    items[1].update(bad)
    explorer = DatasetExplorer(items, class_names=("normal", "benign", "malignant"))
    plt.close("all")
    explorer.index.value = 1
    assert re.fullmatch(message + ".*", explorer.state["error"]) and plt.get_fignums() == []
    assert explorer.describe({"label": torch.tensor(2)}) == "malignant"  # a 0-d tensor is a class index too


@pytest.mark.parametrize("bad, message", [
    ({"artifact": None}, r"item 1 cannot be drawn: item 'item-1' has artifact None; expected 0 or 1"),
    ({"image": torch.rand(1, 1, 16), "mask": torch.zeros(1, 1, 16)},
     r"item 1 cannot be drawn: mask is 1x16: an outline needs an image of at least 2x2 pixels"),
])
def test_a_bad_flag_or_a_one_row_image_is_named_in_the_output(bad, message):
    """int(None) raised a TypeError and contour on one row a TypeError after the figure opened: both went
    to the kernel's log, leaving the old picture and state on show (and, the second, a figure open)."""
    import matplotlib.pyplot as plt

    items = fake_items()
    items[1].update(bad)
    explorer = DatasetExplorer(items)
    plt.close("all")
    explorer.index.value = 1
    assert re.fullmatch(message + ".*", explorer.state["error"]) and plt.get_fignums() == []


def test_an_error_of_the_dataset_itself_is_named_in_the_output():
    """A damaged file raises whatever its reader raises; the explorer says so instead of going quiet."""
    import matplotlib.pyplot as plt

    class Damaged(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            if index == 1:
                raise RuntimeError("corrupt PNG")
            return fake_items()[index]

    explorer = DatasetExplorer(Damaged())
    plt.close("all")
    explorer.index.value = 1
    assert explorer.state == {"index": 1, "error": "item 1 cannot be drawn: RuntimeError: corrupt PNG"}
    assert explorer.output.outputs[0]["text"] == "item 1 cannot be drawn: RuntimeError: corrupt PNG\n"
    assert plt.get_fignums() == [] and explorer.figure is None


def test_an_error_while_drawing_closes_its_figure(monkeypatch):
    """Raised after the figure was opened (matplotlib itself, say): it was left open, one per redraw."""
    import matplotlib.pyplot as plt

    import mtlearn.widgets

    explorer = DatasetExplorer(fake_items())
    plt.close("all")

    def broken(ax, picture):
        raise RuntimeError("imshow failed")

    monkeypatch.setattr(mtlearn.widgets, "_draw_image", broken)
    explorer.index.value = 1
    assert explorer.state["error"] == "item 1 cannot be drawn: RuntimeError: imshow failed"
    assert plt.get_fignums() == []


def test_a_colour_image_is_drawn_in_colour_over_its_range():
    """imshow clips colour to [0, 1]: a uint8 image (what torchvision's read_image gives) was all white."""
    items = fake_items()
    rgb = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    items[0]["image"] = rgb
    drawn = np.asarray(DatasetExplorer(items).figure.axes[0].images[0].get_array())
    expected = (rgb.permute(1, 2, 0).float().numpy() - float(rgb.min())) / float(rgb.max() - rgb.min())
    assert drawn.shape == (16, 16, 3) and np.allclose(drawn, expected)


def test_explorer_without_masks_disables_the_outline():
    items = [{"image": torch.rand(1, 8, 8), "label": 0}]
    explorer = DatasetExplorer(items)
    assert explorer.outline.disabled and explorer.artifact.disabled
    assert explorer.show.options == ("image",)
    masked = DatasetExplorer([{"image": torch.rand(1, 8, 8), "mask": torch.zeros(1, 8, 8)}])  # shapes-like items
    assert not masked.outline.disabled and masked.artifact.disabled  # each box follows its own key


def test_an_item_without_the_masks_of_the_first_is_drawn_without_them():
    items = [{"image": torch.rand(1, 8, 8), "mask": torch.zeros(1, 8, 8), "artifact_mask": torch.zeros(1, 8, 8)},
             {"image": torch.rand(1, 8, 8)}]
    explorer = DatasetExplorer(items)
    explorer.artifact.value = True
    explorer.index.value = 1
    assert "error" not in explorer.state and explorer.figure is not None
    assert explorer.outline.disabled and explorer.artifact.disabled  # this item has neither


def test_each_items_masks_can_be_shown_when_the_first_has_none():
    """The boxes followed item 0 only: a later item's lesion could never be outlined."""
    items = [{"image": torch.rand(1, 8, 8)}, {"image": torch.rand(1, 8, 8), "mask": torch.ones(1, 8, 8)}]
    explorer = DatasetExplorer(items)
    assert explorer.outline.disabled
    explorer.index.value = 1
    assert not explorer.outline.disabled and explorer.artifact.disabled
    explorer.outline.value = True
    assert explorer.state["outline"] is True and "error" not in explorer.state


def test_explorer_finds_the_class_names_through_a_subset():
    from torch.utils.data import Subset

    class Named(list):
        class_names = ("normal", "benign", "malignant")

    explorer = DatasetExplorer(Subset(Subset(Named(fake_items()), [2, 1]), [0, 1]))  # e.g. train.py's --limit
    assert list(explorer.class_names) == ["normal", "benign", "malignant"]
    explorer.index.value = 1
    assert "benign" in explorer.figure.axes[0].get_title()


def test_explorer_rejects_an_empty_dataset():
    with pytest.raises(ValueError, match="non-empty"):
        DatasetExplorer([])


# --- behaviour pinned down by the mutation audit of mtlearn/widgets.py ---


class NamedItems(list):
    class_names = ("normal", "benign", "malignant")


def test_state_follows_each_checkbox_and_the_title_is_drawn():
    explorer = DatasetExplorer(fake_items(), class_names=("normal", "benign", "malignant"))
    assert explorer.state["outline"] is True and explorer.state["artifact"] is False
    explorer.outline.value = False
    assert explorer.state["outline"] is False and explorer.state["artifact"] is False
    explorer.artifact.value = True
    assert explorer.state["outline"] is False and explorer.state["artifact"] is True
    assert explorer.figure.axes[0].get_title() == explorer.state["title"] == "item-0  normal  artifact=0"


def test_labels_are_named_by_the_dataset_or_by_number():
    named = DatasetExplorer(NamedItems(fake_items()))  # class names from the dataset itself
    named.index.value = 1
    assert named.state["title"] == "item-1  benign  artifact=1"
    plain = DatasetExplorer(fake_items())
    plain.index.value = 1
    assert plain.state["title"] == "item-1  label 1  artifact=1"
    unnamed = DatasetExplorer(fake_items(), class_names=[])  # no names given: numbers, not an IndexError
    unnamed.index.value = 1
    assert unnamed.state["title"] == "item-1  label 1  artifact=1"


def test_the_artifact_outline_is_drawn_around_the_artifact():
    items = fake_items()
    items[0]["artifact_mask"][:, 10:14, 10:14] = 1
    explorer = DatasetExplorer(items)
    explorer.outline.value = False
    explorer.artifact.value = True
    (outline,) = explorer.figure.axes[0].collections
    assert outline.get_paths()[0].vertices.min(axis=0).tolist() == [9.5, 9.5]  # the artifact, not the lesion at 4


def test_with_both_boxes_ticked_each_outline_has_its_own_region_and_colour():
    from matplotlib.colors import to_rgba

    items = fake_items()
    items[0]["artifact_mask"][:, 10:14, 10:14] = 1  # apart from the lesion at 4:8
    explorer = DatasetExplorer(items)
    explorer.artifact.value = True
    lesion, artifact = explorer.figure.axes[0].collections
    assert lesion.get_paths()[0].vertices.min(axis=0).tolist() == [3.5, 3.5]
    assert artifact.get_paths()[0].vertices.min(axis=0).tolist() == [9.5, 9.5]
    assert tuple(lesion.get_edgecolor()[0]) == to_rgba("lime")
    assert tuple(artifact.get_edgecolor()[0]) == to_rgba("orange")


def test_explorer_takes_class_names_as_a_numpy_array():
    """`class_names or ...` raised "truth value of an array is ambiguous"."""
    explorer = DatasetExplorer(fake_items(), class_names=np.array(["normal", "benign", "malignant"]))
    explorer.index.value = 2
    assert explorer.class_names == ["normal", "benign", "malignant"]


@pytest.mark.parametrize("label", [3, -1])
def test_a_label_without_a_class_name_is_named(label):
    """It was an IndexError from inside the widget (3), or the last name for the wrong class (-1)."""
    items = fake_items(1)
    items[0]["label"] = label
    with pytest.raises(ValueError, match=rf"item 'item-0' has label {label}, but class_names \['a', 'b'\] name "
                                         r"labels 0..1: pass one name per class"):
        DatasetExplorer(items, class_names=("a", "b"))


def test_the_figure_is_set_as_the_only_output_not_captured_in_a_with_block():
    """`with output: plt.show()` made papermill's client answer on the shell channel mid-cell, which
    hung notebook 00 now and then (jupyter/nbclient#312); the kernel now sets `outputs` itself."""
    explorer = DatasetExplorer(fake_items())
    for index in (1, 2):
        explorer.index.value = index
        (output,) = explorer.output.outputs  # one figure, the last one drawn, not one per redraw
        assert output["output_type"] == "display_data" and "text/plain" in output["data"]
        assert explorer.output.msg_id == ""  # never in capturing mode
    assert not matplotlib.pyplot.get_fignums()  # closed after each draw


def test_the_explorer_opens_on_the_input_image_and_names_shape_and_background():
    """The shapes benchmark's items carry their two labels; the title must show both."""
    explorer = DatasetExplorer(fake_items(), class_names=("normal", "benign", "malignant"))
    assert explorer.state["layer"] == "image" and list(explorer.show.options) == ["image", "clean"]
    shapes = [{"image": torch.rand(1, 16, 16), "shape": 1, "background": 0, "id": "s0"}]
    assert DatasetExplorer(shapes).state["title"].endswith("s0  shape=1  background=0")


def test_flags_may_be_booleans_as_show_items_takes_them():
    items = fake_items()
    items[0]["artifact"], items[1]["artifact"] = True, torch.tensor(False)
    explorer = DatasetExplorer(items)
    assert "artifact=1" in explorer.state["title"]
    explorer.index.value = 1
    assert "artifact=0" in explorer.state["title"] and "error" not in explorer.state


def test_class_names_that_are_numbers_or_a_dict_name_every_label():
    explorer = DatasetExplorer(fake_items(), class_names=np.array([0, 7, 9]))  # join() raised on numbers
    assert explorer.state["title"].split("  ")[:2] == ["item-0", "0"]  # a name 0 was dropped as empty
    explorer.index.value = 1
    assert "error" not in explorer.state and explorer.state["title"].split("  ")[1] == "7"
    explorer = DatasetExplorer(fake_items(), class_names={0: "normal", 1: "benign", 2: "malignant"})
    explorer.index.value = 2
    assert explorer.state["title"].split("  ")[1] == "malignant"  # not its key, 2


def test_items_without_an_image_are_refused_naming_the_keys():
    items = [{"mask": torch.zeros(1, 8, 8), "label": 0}]
    with pytest.raises(ValueError, match=r"'image' \(or 'clean'\), but the first item has only \['label', 'mask'\]"):
        DatasetExplorer(items)  # was a bare KeyError: None


@pytest.mark.parametrize("dataset, match", [
    ([torch.zeros(1, 8, 8)], r"item 0 is a Tensor of shape \(1, 8, 8\): pass a dataset"),  # a RuntimeError of torch's
    (torch.zeros(2, 1, 8, 8), r"item 0 is a Tensor of shape \(1, 8, 8\)"),  # a batch of images
    ([(torch.zeros(1, 8, 8), 0)], r"item 0 is a tuple"),  # (image, label), as torchvision's datasets
])
def test_items_that_are_not_dicts_are_refused_naming_what_they_are(dataset, match):
    with pytest.raises(ValueError, match=r"DatasetExplorer draws dataset items, dicts with an 'image' tensor, but "
                                         + match):
        DatasetExplorer(dataset)


def test_a_data_loader_is_refused_with_the_fix():
    loader = torch.utils.data.DataLoader(fake_items(), batch_size=2)
    with pytest.raises(ValueError, match=r"needs a dataset \(items read by index, dataset\[i\]\), got a DataLoader: "
                                         r"pass the loader's dataset, DatasetExplorer\(loader.dataset\)"):
        DatasetExplorer(loader)  # was "TypeError: 'DataLoader' object is not subscriptable"


def test_a_dict_of_splits_is_refused_naming_one_to_pass():
    with pytest.raises(ValueError, match=r"needs one dataset, got a dict of 2 \(\['train', 'test'\]\): pass one of "
                                         r"them, e.g. DatasetExplorer\(data\['train'\]\)"):
        DatasetExplorer({"train": fake_items(), "test": fake_items()})  # was a bare KeyError: 0


def test_a_generator_of_items_is_refused_with_the_fix():
    items = (item for item in fake_items())
    with pytest.raises(ValueError, match=r"got a generator: pass a list of its items, "
                                         r"DatasetExplorer\(list\(items\)\)"):
        DatasetExplorer(items)
    assert len(DatasetExplorer(list(fake_items())).dataset) == len(fake_items())  # the fix works


def test_explorers_outside_ipython_make_no_shell(tmp_path, monkeypatch):
    # InteractiveShell.instance() made one in a script or a test: it wrote ~/.ipython (history.sqlite) and left
    # its history-saving thread running
    from IPython.core.interactiveshell import InteractiveShell

    assert not InteractiveShell.initialized()  # pytest runs no IPython
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    explorer = DatasetExplorer(fake_items())
    explorer.index.value = 1
    assert not InteractiveShell.initialized() and not (tmp_path / "ipython").exists()
    assert explorer.output.outputs[0]["data"]["image/png"]  # the picture all the same


def test_under_ipywidgets_7_an_explorer_displays_the_bundle_its_widget_would():
    """ipywidgets 7 (Colab's 7.7.1) has no _repr_mimebundle_: the explorer builds the bundle its widget's
    _ipython_display_ publishes, which is ipywidgets 8's _repr_mimebundle_ (make test also runs these tests
    under 7.7.1)."""
    import ipywidgets

    from mtlearn.widgets import _widget_bundle

    widget = ipywidgets.IntSlider()

    class Seven:  # a widget as ipywidgets 7 makes it: a model id, no _repr_mimebundle_
        model_id = widget.model_id

    view = "application/vnd.jupyter.widget-view+json"
    expected = ({"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
                if not hasattr(widget, "_repr_mimebundle_") else widget._repr_mimebundle_()[view])
    assert _widget_bundle(Seven())[view] == expected == _widget_bundle(widget)[view]


def test_a_displayed_explorer_is_its_widget_with_a_picture_for_viewers_without_widgets():
    """GitHub showed the widget's repr, "VBox(children=(HBox(children=(IntSlider(...", where the explorer was."""
    import base64
    import io

    from IPython.core.formatters import DisplayFormatter
    from PIL import Image

    explorer = DatasetExplorer(fake_items())
    formatter = DisplayFormatter()  # display(explorer)'s, without an IPython shell (which writes ~/.ipython)
    data, _ = formatter.format(explorer)  # what display(explorer) sends
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.widget.model_id
    assert data["text/plain"].startswith("DatasetExplorer: interactive") and "VBox" not in data["text/plain"]
    picture = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))  # the figure the widget shows
    assert picture.width > 100 and picture.height > 100
    explorer.index.value = 2  # the picture follows the controls
    again, _ = formatter.format(explorer)
    assert again["image/png"] != data["image/png"]
    explorer.dataset = [{"id": "broken"}] * 3  # an item it cannot draw: no picture, the widget says why
    explorer.index.value = 1
    assert "image/png" not in formatter.format(explorer)[0]


def test_outlines_sit_where_the_masks_are_not_transposed():
    """Off the diagonal, the lesion and artifact outlines were drawn at their mirror images (rows for columns)."""
    items = fake_items()
    items[0]["mask"].zero_()
    items[0]["mask"][:, 2:5, 8:13] = 1  # rows 2-4, columns 8-12
    items[0]["artifact_mask"][:, 10:12, 2:7] = 1  # rows 10-11, columns 2-6
    explorer = DatasetExplorer(items)
    explorer.artifact.value = True
    lesion, artifact = explorer.figure.axes[0].collections
    for outline, (columns, rows) in ((lesion, ((7.5, 12.5), (1.5, 4.5))), (artifact, ((1.5, 6.5), (9.5, 11.5)))):
        xy = np.concatenate([path.vertices for path in outline.get_paths()])  # x the column, y the row
        assert (xy[:, 0].min(), xy[:, 0].max()) == pytest.approx(columns)
        assert (xy[:, 1].min(), xy[:, 1].max()) == pytest.approx(rows)
