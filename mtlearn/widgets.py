"""Interactive explorers for the notebooks (ipywidgets).

They build without a browser: the figure is put into an `Output` widget, so a test can construct
an explorer, move its controls programmatically and read what was drawn (`explorer.state`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping

import ipywidgets as widgets
import matplotlib.pyplot as plt

from mtlearn.plots import _class_index, _draw_image, _flag, _image, _outline
from mtlearn.utils import _kind, find_class_names


def show_in(output: widgets.Output, fig) -> None:
    """Make `fig` the only thing `output` shows, and close it (no figure piles up over redraws).

    Why not `with output: plt.show()`: inside that block a headless runner (papermill's nbclient)
    plays the frontend and sends the widget's state back to the kernel on the shell channel while it
    waits there for the cell's reply, which now and then never comes (jupyter/nbclient#312; notebook
    00 hung 3 times in 19 papermill runs). Setting `outputs` from the kernel involves no reply.
    """
    from IPython.core.interactiveshell import InteractiveShell

    if InteractiveShell.initialized():  # Jupyter, IPython: their formatters (PNG under the inline backend)
        data, metadata = InteractiveShell.instance().display_formatter.format(fig)
    else:  # a script, a test: .instance() would make a shell, writing ~/.ipython and starting its history thread
        data, metadata = {"text/plain": repr(fig)}, {}
    if "image/png" not in data:  # no inline backend (a script, a test): the picture all the same, as the
        buffer = io.BytesIO()    # explorer's static view (Explorer) shows it
        fig.savefig(buffer, format="png", bbox_inches="tight")
        data = {**data, "image/png": base64.b64encode(buffer.getvalue()).decode("ascii")}
    output.outputs = ({"output_type": "display_data", "data": data, "metadata": metadata},)
    plt.close(fig)


def say_in(output: widgets.Output, text: str) -> None:
    """Make `text` (what a control's change could not draw) the only thing `output` shows, as stderr:
    an error raised in a widget's callback would go to the kernel's log, which students do not see."""
    output.outputs = ({"output_type": "stream", "name": "stderr", "text": text + "\n"},)


def _widget_bundle(widget: widgets.Widget) -> dict:
    """What displays `widget`: ipywidgets 8 gives it as `_repr_mimebundle_`; 7 (Colab's, 7.7.1) publishes
    the same bundle from `_ipython_display_`, which leaves nothing to add a picture to."""
    if hasattr(widget, "_repr_mimebundle_"):
        return dict(widget._repr_mimebundle_())
    view = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return {"text/plain": repr(widget), "application/vnd.jupyter.widget-view+json": view}


class Explorer:
    """What an explorer is when displayed (`explorer` as a cell's last line, or `display(explorer)`): its
    widget where widgets run (Jupyter, Colab, VS Code), and for viewers without them (GitHub, a notebook
    whose widget state was not saved) a picture of its current view and a line saying what it is, where
    the widget alone leaves its repr, "VBox(children=(HBox(children=(IntSlider(...".

    A subclass sets `widget` (the controls and the Output) and `output` (where its figure is drawn).
    """

    widget: widgets.Widget
    output: widgets.Output
    ARGUMENTS = ""  # what comes before the dataset in a call, for the advice in errors: "model, "
    closed = False

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        if self.closed:
            return {"text/plain": f"{type(self).__name__}: closed; build a new one to explore again"}
        data = _widget_bundle(self.widget)
        data["text/plain"] = f"{type(self).__name__}: interactive, run the notebook to use its controls"
        for shown in self.output.outputs:  # the current figure (none after an item it could not draw)
            if "image/png" in shown.get("data", {}):
                data["image/png"] = shown["data"]["image/png"]
        return data

    def close(self) -> None:
        """Close the explorer's widgets and let go of what it holds (the data; AttributionExplorer's copy of
        the model and its cached views). Before building an explorer again, e.g. at the top of its cell:

            if "explorer" in globals(): explorer.close()   # (notebook 05's is called `viewer`)

        Why: ipywidgets keeps every widget until it is closed, and each control keeps its explorer through
        the function it calls on a change, so an explorer built again (its cell run again) left the earlier
        one in memory, with all it holds (6-8 MB each for AttributionExplorer and the notebooks' model).
        """
        stack = [self.widget]
        while stack:  # the controls, the rows that hold them, the output, and the layout and style of each
            widget = stack.pop()
            stack.extend(getattr(widget, "children", ()))
            stack.extend(part for part in (getattr(widget, "layout", None), getattr(widget, "style", None))
                         if isinstance(part, widgets.Widget))
            widget.close()
        self._release()
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"this {type(self).__name__} was closed (close() let go of its data); build a new "
                               "one to explore again")

    def _release(self) -> None:
        """Drop what the explorer holds besides its widgets (a subclass adds its own)."""
        self.dataset = None
        self.figure = None

    def _check_dataset(self, dataset) -> Mapping:
        """Refuse what an explorer cannot browse (it reads dict items by index); returns item 0."""
        name, arguments = type(self).__name__, self.ARGUMENTS
        if isinstance(dataset, Mapping):  # {"train": ..., "test": ...}: dataset[0] was a bare KeyError: 0
            raise ValueError(f"{name} needs one dataset, got a dict of {len(dataset)} ({list(dataset)[:4]}): "
                             f"pass one of them, e.g. {name}({arguments}data[{next(iter(dataset), 'train')!r}])")
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):  # a DataLoader: dataset[0] raised
            fix = (f": pass the loader's dataset, {name}({arguments}loader.dataset)" if hasattr(dataset, "dataset")
                   else f": pass a list of its items, {name}({arguments}list(items))" if hasattr(dataset, "__iter__")
                   else "")
            raise ValueError(f"{name} needs a dataset (items read by index, dataset[i]), got {_kind(dataset)}{fix}")
        if len(dataset) == 0:
            raise ValueError(f"{name} needs a non-empty dataset")
        first = dataset[0]
        if not isinstance(first, Mapping):  # a batch or list of image tensors: `"image" in tensor` raised
            raise ValueError(f"{name} draws dataset items, dicts with an 'image' tensor, but item 0 is "
                             f"{_kind(first)}: pass a dataset, or a list of items such as dataset[i]")
        return first


class DatasetExplorer(Explorer):
    """Browse a dataset of dict items: image, mask outline, clean target, artifact region, labels.

    explorer = DatasetExplorer(train); display(explorer)
    """

    LAYERS = ("image", "clean", "mask", "artifact_mask")

    def __init__(self, dataset, class_names=None):
        first = self._check_dataset(dataset)
        self.dataset = dataset
        # a NumPy array of names has no truth value: `class_names or ...` raised; a dict {0: "benign", ...}
        # is looked up by label as it is (list() would keep its keys, not its names)
        if class_names is None:
            class_names = find_class_names(dataset)
        self.class_names = class_names if class_names is None or isinstance(class_names, Mapping) else list(class_names)
        layers = [k for k in ("image", "clean") if k in first]
        if not layers:  # an empty dropdown drew item[None]: a bare KeyError: None
            raise ValueError(f"DatasetExplorer draws an item's 'image' (or 'clean'), but the first item has only "
                             f"{sorted(first)}; pass a dataset of dict items with an 'image'")
        self.index = widgets.IntSlider(0, 0, len(dataset) - 1, description="item", continuous_update=False)
        self.show = widgets.Dropdown(options=layers, description="show")
        self.outline = widgets.Checkbox(value="mask" in first, description="lesion outline",
                                        disabled="mask" not in first)
        self.artifact = widgets.Checkbox(value=False, description="artifact region",
                                         disabled="artifact_mask" not in first)
        self.output = widgets.Output()
        self.state: dict = {}
        self.figure = None  # the last figure drawn (closed after display; still readable, e.g. to save)
        for control in (self.index, self.show, self.outline, self.artifact):
            control.observe(lambda _change: self._redraw(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.index, self.show]),
                                    widgets.HBox([self.outline, self.artifact]), self.output])
        self.draw()

    def describe(self, item: dict) -> str:
        parts = [str(item.get("id", ""))]
        where = f"item {item.get('id', '')!r}"
        if "label" in item:
            label = _class_index(item["label"], where, self.class_names or None)
            parts.append(str(self.class_names[label]) if self.class_names else f"label {label}")  # names 0, 1 too
        for key in ("artifact", "shape", "background"):
            if key in item:  # None or 0.5 is named, not drawn as 0 (or a TypeError); True is 1
                parts.append(f"{key}={_flag(item[key], where, key)}")
        return "  ".join(p for p in parts if p)

    def _redraw(self) -> None:
        """draw() for a control's change: an item it cannot draw is said where its picture would be (an
        error raised in a widget's callback goes to the kernel's log, which students do not see), whatever
        the error: a dataset's own (a damaged file) as well as the checks' ValueErrors."""
        try:
            self.draw()
        except Exception as error:  # noqa: BLE001 (shown to the user, not swallowed)
            if isinstance(error, KeyError):
                what = f"has no {error.args[0]!r}"
            elif isinstance(error, ValueError):
                what = f"cannot be drawn: {error}"
            else:
                what = f"cannot be drawn: {type(error).__name__}: {error}"
            text = f"item {self.index.value} {what}"
            say_in(self.output, text)
            self.figure, self.state = None, {"index": self.index.value, "error": text}

    def draw(self) -> None:
        self._check_open()
        item = self.dataset[self.index.value]
        # the layers this item has (the first one's set them for all: a later item's mask could never be shown)
        self.outline.disabled, self.artifact.disabled = "mask" not in item, "artifact_mask" not in item
        title = self.describe(item)
        # every picture before the figure: a bad one raises without leaving a figure open
        picture = _image(item[self.show.value])
        size = picture.shape[:2]  # an outline of another size or of several channels is refused, not misdrawn
        outline = _outline(item["mask"], "mask", size) if self.outline.value and "mask" in item else None
        region = (_outline(item["artifact_mask"], "artifact_mask", size)
                  if self.artifact.value and "artifact_mask" in item else None)
        fig, ax = plt.subplots(figsize=(4, 4))
        try:
            _draw_image(ax, picture)
            if outline is not None:
                ax.contour(outline, levels=[0.5], colors="lime", linewidths=1)
            if region is not None:
                ax.contour(region, levels=[0.5], colors="orange", linewidths=1, linestyles="--")  # not colour alone
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
        except Exception:
            plt.close(fig)  # not left open behind the error, one more per failed redraw
            raise
        show_in(self.output, fig)
        self.figure = fig
        self.state = {"index": self.index.value, "layer": self.show.value, "title": title,
                      "outline": self.outline.value, "artifact": self.artifact.value}
