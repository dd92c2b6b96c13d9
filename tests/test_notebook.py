"""The notebook contract: parameter checks, metrics.json, figures."""

import json
import shutil
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from mtlearn.notebook import PROFILES, resolve_profile, start


def test_profile_defaults_to_course(monkeypatch):
    monkeypatch.delenv("MTLEARN_PROFILE", raising=False)
    assert resolve_profile(None) == "course"
    monkeypatch.setenv("MTLEARN_PROFILE", "")  # `export MTLEARN_PROFILE=`, a CI variable left blank: unset
    assert resolve_profile(None) == "course"


def test_profile_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("MTLEARN_PROFILE", "smoke")
    assert resolve_profile(None) == "smoke"
    assert resolve_profile("paper") == "paper"  # an explicit parameter wins


def test_bogus_profile_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        resolve_profile("bogus")
    assert all(p in str(info.value) for p in PROFILES)
    assert "(from the profile parameter)" in str(info.value)
    with pytest.raises(ValueError, match=r"unknown profile 'Smoke' \(from the grid_profile parameter\)"):
        resolve_profile("Smoke", name="grid_profile")  # notebook 06's second profile


def test_bogus_profile_from_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("MTLEARN_PROFILE", "fast")
    with pytest.raises(ValueError, match="MTLEARN_PROFILE"):
        resolve_profile(None)


def test_an_empty_profile_is_an_error_not_the_default(monkeypatch):
    """`-p profile ""` was set, to nothing: it must fail, not quietly run $MTLEARN_PROFILE's (or course's) settings."""
    monkeypatch.setenv("MTLEARN_PROFILE", "smoke")
    with pytest.raises(ValueError, match=r"unknown profile '' \(from the profile parameter\)"):
        resolve_profile("")


def test_bogus_profile_says_what_each_profile_is_for():
    """The names alone do not say which one to pick: the message tells what each profile runs."""
    from mtlearn.notebook import PROFILE_HELP

    with pytest.raises(ValueError) as info:
        resolve_profile("fast")
    assert all(f"{p!r}: {PROFILE_HELP[p]}" in str(info.value) for p in PROFILES)


def start_here(tmp_path, **overrides):
    params = dict(profile="smoke", dataset="synthetic", data_root=None, seed=0, device="cpu",
                  out_dir=tmp_path / "out", verbose=False)
    params.update(overrides)
    return start("99_test", **params)


def test_missing_real_dataset_prints_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m data_fetch busi --dest"):
        start_here(tmp_path, dataset="busi", data_root=tmp_path / "nowhere")


def test_a_data_root_that_is_a_file_is_named_as_one(tmp_path):
    """It read "not found in FILE/busi" with a data_fetch command into that path, which could not succeed."""
    (tmp_path / "data").write_text("")
    with pytest.raises(ValueError, match=r"data_root .*data cannot be a folder: .*data is a file. Choose another "
                                         r"data_root"):
        start_here(tmp_path, dataset="busi", data_root=tmp_path / "data")


def test_a_relative_data_root_is_shown_as_the_folder_it_was_read_from(tmp_path, monkeypatch):
    """In Jupyter the kernel runs in notebooks/, so "data" is notebooks/data: the message and the fetch
    command name that folder in full, so the data lands where the next run looks."""
    monkeypatch.chdir(tmp_path)
    folder = str(tmp_path / "data" / "busi")
    with pytest.raises(FileNotFoundError) as info:
        start_here(tmp_path, dataset="busi", data_root="data")
    assert f"was not found in {folder}." in str(info.value) and f'--dest "{folder}"' in str(info.value)


def test_data_root_given_as_the_dataset_folder_names_its_parent(tmp_path):
    # load_dataset's root is the dataset's own folder; a notebook's data_root is the folder above it
    own = tmp_path / "data" / "busi"
    own.mkdir(parents=True)
    (own / "benign").mkdir()
    with pytest.raises(FileNotFoundError, match=f"data_root={str(tmp_path / 'data')!r}"):
        start_here(tmp_path, dataset="busi", data_root=own)


def test_data_root_inside_the_dataset_folder_names_the_folder_above_it(tmp_path):
    """data_root .../busi/Dataset_BUSI_with_GT (where the images are) asked to download BUSI again, into
    .../Dataset_BUSI_with_GT/busi."""
    inner = tmp_path / "data" / "busi" / "Dataset_BUSI_with_GT"
    (inner / "benign").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"data_root {re.escape(str(inner))} lies inside a folder named "
                                                rf"'busi' .*If that folder is the dataset, pass "
                                                rf"data_root={re.escape(repr(str(tmp_path / 'data')))} .*if not, "
                                                r"download it with python -m data_fetch busi --dest"):
        start_here(tmp_path, dataset="busi", data_root=inner)


def test_a_data_root_under_a_folder_named_like_the_dataset_still_finds_it(tmp_path):
    """A project folder called busi holding data/busi/...: the dataset is where data_root says; no advice."""
    from mtlearn.data.real import dataset_folder

    data = tmp_path / "busi" / "data"
    (data / "busi" / "benign").mkdir(parents=True)
    assert dataset_folder("busi", data) == data / "busi"


def test_an_archive_downloaded_into_data_root_is_named_with_the_way_to_unpack_it(tmp_path):
    """The zip beside where its folder should be was met with "Download it first"."""
    from data_fetch import get_source

    archive = tmp_path / "data" / get_source("busi").filename
    archive.parent.mkdir()
    archive.write_bytes(b"PK\x03\x04")
    folder = tmp_path / "data" / "busi"
    with pytest.raises(FileNotFoundError, match=rf"holds {re.escape(archive.name)}, the 'busi' archive, but no busi/ "
                                                rf"folder: move the archive into {re.escape(str(folder))} .*python -m "
                                                r"data_fetch busi --dest .*without downloading"):
        start_here(tmp_path, dataset="busi", data_root=tmp_path / "data")


def test_data_root_that_holds_a_dataset_itself_says_so(tmp_path):
    """`python -m data_fetch bus_uclm --dest ~/data` fills ~/data itself; data_root ~/data then used to
    read as "not downloaded", with a command that downloads it again."""
    root = tmp_path / "downloads"
    (root / "BUS-UCLM").mkdir(parents=True)
    (root / ".bus_uclm.complete").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds the 'bus_uclm' dataset itself \(its .bus_uclm.complete\)"
                                                 r".* rename .*downloads to .*bus_uclm and pass data_root="):
        start_here(tmp_path, dataset="bus_uclm", data_root=root)


def test_unknown_dataset_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="synthetic"):
        start_here(tmp_path, dataset="imagenet")


def test_a_real_dataset_is_not_blamed_on_masks_where_no_segmentation_is_trained(tmp_path):
    """The lesion-mask reason is only true where the notebook accepts the masked datasets."""
    with pytest.raises(ValueError) as info:
        start_here(tmp_path, dataset="breastmnist", datasets=("synthetic",))
    assert "lesion masks" not in str(info.value) and "choose one of ('synthetic',)" in str(info.value)


def test_generated_datasets_need_no_data_folder(tmp_path, monkeypatch):
    """shapes is generated like synthetic: no download, no folder looked up, whatever $MTLEARN_DATA says."""
    monkeypatch.setenv("MTLEARN_DATA", str(tmp_path / "nowhere"))
    for dataset in ("synthetic", "shapes"):
        assert start_here(tmp_path, dataset=dataset, datasets=("synthetic", "shapes")).data_root is None


def test_run_writes_metrics_and_figures(tmp_path):
    run = start_here(tmp_path, seed=5, dataset="shapes", datasets=("synthetic", "shapes"))
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    run.save_figure(fig, "curve")
    with pytest.warns(RuntimeWarning, match=r"\['acc', 'seg/auc'\] are NaN or inf"):
        run.finish({"dice": torch.tensor(0.5), "acc": float("nan"), "per_class": [1, 2],
                    "confusion": np.array([[3, 1], [0, 4]]), "auc": np.float32(0.75),
                    "seg": {"auc": torch.tensor(float("inf"))}})
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["metrics"] == {"dice": 0.5, "acc": None, "per_class": [1, 2], "confusion": [[3, 1], [0, 4]],
                                 "auc": 0.75, "seg": {"auc": None}}
    assert record["profile"] == "smoke" and record["seed"] == 5 and record["figures"] == ["curve.png"]
    assert record["dataset"] == "shapes"  # a grid compares it before it skips a finished run
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0


def test_figure_names_keep_their_dots_and_a_saved_name_is_replaced(tmp_path):
    run = start_here(tmp_path)
    for name in ("dice_0.3", "dice_0.5", "dice_0.5.png"):  # the last one: a cell run again
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        run.save_figure(fig, name)
        plt.close(fig)
    assert run.figures == ["dice_0.3.png", "dice_0.5.png"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == run.figures
    with pytest.raises(ValueError, match="plain file name"):
        run.save_figure(fig, "../elsewhere")


def test_a_figure_needs_a_name(tmp_path):
    """A name of "" or ".png" would save a hidden `out_dir/.png` that no listing of the figures shows."""
    run = start_here(tmp_path)
    fig, ax = plt.subplots()
    for name in ("", ".png", "..", ".", ".hidden", "a\x00b", "two\nlines"):  # "..": a file "...png"
        with pytest.raises(ValueError, match="figure name must be a plain file name"):
            run.save_figure(fig, name)
    with pytest.raises(ValueError, match=r"figures are saved as PNG \(out_dir/<name>.png\); give the name without "
                                         r"\.pdf, e.g. 'roc'"):
        run.save_figure(fig, "roc.pdf")  # was saved as roc.pdf.png
    assert run.figures == [] and list((tmp_path / "out").iterdir()) == []
    plt.close(fig)


def test_save_figure_names_what_it_was_given_and_takes_an_axes_and_png_in_capitals(tmp_path):
    """A tuple from plt.subplots(), or a number as name, ended in an AttributeError; "a.PNG" became a.PNG.png."""
    run = start_here(tmp_path)
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match=r"needs a matplotlib Figure, got tuple .*fig, ax = plt\.subplots\(\)"):
        run.save_figure(plt.subplots(), "curve")
    with pytest.raises(ValueError, match=r"figure name must be text such as 'loss_curves', got 3"):
        run.save_figure(fig, 3)
    run.save_figure(ax, "from_axes")  # an Axes stands for its figure
    run.save_figure(fig, "capitals.PNG")
    shutil.rmtree(tmp_path / "out")  # a clean-up cell ran: FileNotFoundError, where finish made the folder again
    run.save_figure(plt.subplots(1, 2)[1], "pair")  # the array of Axes: "got ndarray", without a hint
    plt.close("all")
    assert run.figures == ["from_axes.png", "capitals.png", "pair.png"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) == ["pair.png"]


@pytest.mark.parametrize("metrics", [None, [1, 2], 0.9])
def test_finish_needs_a_dict_of_metrics(tmp_path, metrics):
    """None or a list was written as metrics.json's "metrics", and the course runner's table failed on it."""
    run = start_here(tmp_path)
    kind = type(metrics).__name__
    with pytest.raises(ValueError, match=rf"run.finish needs a dict of headline numbers, .*got {kind}"):
        run.finish(metrics)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_pick_chooses_by_profile_and_needs_every_profile(tmp_path):
    run = start_here(tmp_path)
    assert run.pick(smoke=1, course=2, paper=3) == 1
    with pytest.raises(ValueError, match="paper"):
        run.pick(smoke=1, course=2)
    with pytest.raises(ValueError, match=r"missing \['paper'\], unknown \['papr'\]"):
        run.pick(smoke=1, course=2, papr=3)
    with pytest.raises(ValueError, match=r"unknown \['Course'\]"):  # not silently ignored
        run.pick(smoke=1, course=2, paper=3, Course=4)


def test_seeds_are_consecutive_and_refused_before_training_when_the_last_passes_numpy_limit(tmp_path):
    assert start_here(tmp_path, seed=5).seeds(3) == [5, 6, 7]
    run = start_here(tmp_path, seed=2**32 - 2)
    assert run.seeds(2) == [2**32 - 2, 2**32 - 1]
    with pytest.raises(ValueError, match=r"the 3 seeds from seed=4294967294 \(num_seeds\) end at 4294967296, "
                                         r"past 2\*\*32 - 1.*take seed <= 4294967293"):
        run.seeds(3)
    for count in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"parameter repeats must be a positive integer"):
            run.seeds(count, name="repeats")


def test_setting_takes_the_profile_default_only_when_unset(tmp_path):
    run = start_here(tmp_path)  # smoke
    assert run.setting("epochs", None, smoke=1, course=8, paper=150) == 1
    assert run.setting("epochs", 3, smoke=1, course=8, paper=150) == 3
    assert run.setting("lr", 1, smoke=1e-3, course=1e-3, paper=1e-4) == 1  # an int where a float is due
    assert run.setting("offset", -2, positive=False, smoke=0, course=0, paper=0) == -2


def test_setting_takes_numpy_numbers_from_a_sweep_and_hints_at_int(tmp_path):
    run = start_here(tmp_path)
    epochs = run.setting("epochs", np.arange(1, 4)[2], smoke=1, course=8, paper=150)
    assert epochs == 3 and type(epochs) is int
    lr = run.setting("lr", np.float32(0.5), smoke=1e-3, course=1e-3, paper=1e-4)
    assert lr == 0.5 and type(lr) is float
    with pytest.raises(ValueError, match=r"epochs must be a positive int .*got 3.0; pass an int, e.g. int\(...\)"):
        run.setting("epochs", 3.0, smoke=1, course=8, paper=150)


@pytest.mark.parametrize("value", [0, -1, 2.5, "8", True])
def test_setting_refuses_what_the_default_would_hide(tmp_path, value):
    run = start_here(tmp_path)
    with pytest.raises(ValueError, match=r"parameter epochs must be a positive int .*smoke profile's 1"):
        run.setting("epochs", value, smoke=1, course=8, paper=150)


def test_setting_refuses_non_finite_numbers_and_compares_only_numbers_with_zero(tmp_path):
    run = start_here(tmp_path)
    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"parameter lr must be finite"):
            run.setting("lr", value, smoke=1e-3, course=1e-3, paper=1e-4)
    tasks = dict(smoke=("seg", "cls"), course=("seg", "cls"), paper=("seg", "cls"))
    assert run.setting("tasks", ("cls",), **tasks) == ("cls",)  # a tuple is not "> 0": it was a TypeError
    with pytest.raises(ValueError, match=r"parameter tasks must be a tuple \(or None"):
        run.setting("tasks", "cls", **tasks)


@pytest.mark.parametrize("below", [False, True])
def test_an_out_dir_that_is_a_file_is_named(tmp_path, below):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(ValueError, match=re.escape(f"{file} is a file. Choose another out_dir (it receives "
                                                   "metrics.json and the figures)")):
        start_here(tmp_path, out_dir=file / "run" if below else file)
    assert file.read_text() == "mine"


def test_an_out_dir_that_cannot_be_created_is_named_with_the_fix(tmp_path, monkeypatch):
    """mkdir's own error (no permission, a read-only disk) named neither the parameter nor what to do."""
    import errno
    import pathlib

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refused)
    with pytest.raises(PermissionError, match=re.escape(f"out_dir {tmp_path / 'run'} cannot be created (Permission "
                                                        "denied); choose another out_dir, one you can write to")):
        start_here(tmp_path, out_dir=tmp_path / "run")


def test_an_existing_out_dir_no_one_may_write_to_is_refused_at_the_start(tmp_path, unwritable):
    """mkdir(exist_ok=True) passed, and the notebook ran to its end before finish() could not write metrics.json."""
    (tmp_path / "run").mkdir()
    unwritable(tmp_path / "run")
    with pytest.raises(PermissionError, match=re.escape(f"out_dir {tmp_path / 'run'} is not writable: no permission "
                                                        "to create files there, or a read-only disk. Choose another "
                                                        "out_dir")):
        start_here(tmp_path, out_dir=tmp_path / "run")


def test_names_takes_a_list_of_distinct_known_names_and_names_each_mistake(tmp_path):
    run = start_here(tmp_path)
    choices = ("ig", "saliency", "gradcam")
    assert run.names("methods", ("ig", "gradcam"), choices) == ["ig", "gradcam"]
    for value, message in [
        ("ig", r"parameter methods must be a list of names from .*, e.g. \['ig'\] for that one alone; got 'ig'"),
        (None, r"parameter methods must be a list of names"),  # was "'NoneType' object is not iterable"
        ([], r"parameter methods is empty; give a list of distinct names"),  # failed after training, in pandas
        (["ig", "gradcam++"], r"parameter methods names unknown \['gradcam\+\+'\]"),
        (["ig", "ig"], r"parameter methods repeats \['ig'\]"),  # trained twice, silently
    ]:
        with pytest.raises(ValueError, match=message):
            run.names("methods", value, choices)


@pytest.mark.parametrize("value, kwargs, message", [
    (-1, dict(minimum=0, integer=True), r"tolerance must be an integer >= 0, got -1$"),
    (2.5, dict(minimum=0, integer=True), r"tolerance must be an integer >= 0, got 2.5"),
    ("2", dict(minimum=0, integer=True), r"got '2'; pass it unquoted"),
    (0, dict(minimum=0, maximum=1, above=True), r"tolerance must be a number > 0 and <= 1, got 0"),
    (1.5, dict(minimum=0, maximum=1, above=True), r"<= 1, got 1.5$"),  # no "pass an int": a float is due
    (float("nan"), dict(minimum=0), r"must be a number >= 0, got nan"),
    (None, dict(minimum=1, integer=True), r"must be an integer >= 1, got None"),
    (0, dict(minimum=1, integer=True, none=True), r"must be an integer >= 1 or None, got 0"),
    (float("inf"), dict(minimum=0), r"must be a number >= 0, got inf"),  # inf >= 0: a finite check, not the range
    (32.0, dict(minimum=1, integer=True), r"must be an integer >= 1, got 32.0; pass an int, e.g. int\(...\)"),
    pytest.param(10**400, dict(minimum=0, maximum=1), r"must be a number >= 0 and <= 1, got 1000",
                 id="huge-int"),  # was an OverflowError (the default test id would hold its 401 digits)
    pytest.param(10**400, dict(minimum=0, integer=True), r"must be an integer >= 0, got 1000",
                 id="huge-int-seed"),  # no float holds it, no generator takes it as a seed
])
def test_number_names_the_parameter_and_its_range(tmp_path, value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        start_here(tmp_path).number("tolerance", value, **kwargs)


def test_number_returns_good_values_and_none_where_allowed(tmp_path):
    run = start_here(tmp_path)
    assert run.number("tolerance", 2, minimum=0, integer=True) == 2
    assert run.number("train_correlation", 1, minimum=0, maximum=1, above=True) == 1
    assert run.number("threads", None, minimum=1, integer=True, none=True) is None
    batch = run.number("batch_size", np.arange(30, 40)[2], minimum=1, integer=True)  # from a sweep
    assert batch == 32 and type(batch) is int  # a plain int, as setting gives: checkpoints stay loadable
    rate = run.number("rate", np.float32(0.5), minimum=0)
    assert rate == 0.5 and type(rate) is float


def test_setting_hints_at_a_quoted_number(tmp_path):
    with pytest.raises(ValueError, match=r"parameter lr must be a positive float .*got '1e-3'; pass it unquoted"):
        start_here(tmp_path).setting("lr", "1e-3", smoke=1e-3, course=1e-3, paper=1e-4)


def test_the_fetch_command_quotes_a_data_root_with_spaces(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'python -m data_fetch busi --dest ".*my data.*busi"'):
        start_here(tmp_path, dataset="busi", data_root=tmp_path / "my data")


def test_metrics_take_pandas_series_and_frames(tmp_path):
    run = start_here(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"metrics \['dice/dwa'\] are NaN or inf"):
        run.finish({"dice": pd.Series([0.5, 0.25, float("nan")], index=["fixed", "pcgrad", "dwa"]),
                    "table": pd.DataFrame({"acc": [0.75]}, index=["a"])})
    metrics = json.loads((run.out_dir / "metrics.json").read_text())["metrics"]
    assert metrics["dice"] == {"fixed": 0.5, "pcgrad": 0.25, "dwa": None}
    assert metrics["table"] == {"acc": {"a": 0.75}}


def test_metrics_must_be_plain_values(tmp_path):
    with pytest.raises(TypeError, match="metrics must be"):
        start_here(tmp_path).finish({"model": object()})


def test_a_dataset_without_masks_is_refused_where_segmentation_is_trained(tmp_path):
    from mtlearn.notebook import MASKED_DATASETS

    with pytest.raises(ValueError, match="'breastmnist' is not used by this notebook \\(it has no lesion masks"):
        start_here(tmp_path, dataset="breastmnist", datasets=("synthetic", *MASKED_DATASETS))


def test_a_refused_dataset_is_told_the_notebooks_reason(tmp_path):
    """Notebook 05 refused BUSI with "choose one of ('synthetic',)" alone: the reason was only in a comment."""
    with pytest.raises(ValueError, match=r"^dataset 'busi' is not used by this notebook \(it needs artifact masks\); "
                                         r"choose one of \('synthetic',\)$"):
        start_here(tmp_path, dataset="busi", datasets=("synthetic",), why="it needs artifact masks")


def test_a_dataset_no_loader_knows_is_called_unknown_with_where_own_images_go(tmp_path):
    """"'mylesions' is not used by this notebook" suggested that another notebook would take it."""
    with pytest.raises(ValueError, match=r"^unknown dataset 'mylesions'; this notebook takes one of \('synthetic', "
                                         r"'busi'\) \(to train on images of your own, build an UltrasoundDataset and "
                                         r"call mt\.fit: README, \"Your own images\"\)$"):
        start_here(tmp_path, dataset="mylesions", datasets=("synthetic", "busi"))
    for known in ("shapes", "busi_npz"):  # names the loaders know, but not this notebook: not "unknown"
        with pytest.raises(ValueError, match=rf"^dataset '{known}' is not used by this notebook; choose one of"):
            start_here(tmp_path, dataset=known, datasets=("synthetic", "busi"))


# --- behaviour pinned down by the mutation audit of mtlearn/notebook.py ---


def test_default_out_dir_is_outputs_notebook_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = start_here(tmp_path, out_dir=None, profile="smoke")
    assert run.out_dir == Path("outputs") / "99_test" / "smoke"
    assert (tmp_path / "outputs" / "99_test" / "smoke").is_dir()
    monkeypatch.setenv("MTLEARN_PROFILE", "paper")  # the profile from the environment names the folder too
    with pytest.warns(UserWarning, match="the paper profile is sized for a GPU"):  # device="cpu"
        assert start_here(tmp_path, out_dir=None, profile=None).out_dir == Path("outputs") / "99_test" / "paper"


def test_an_explicit_profile_wins_over_the_environment_in_start(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLEARN_PROFILE", "paper")
    assert start_here(tmp_path, profile="smoke").profile == "smoke"
    with pytest.warns(UserWarning, match="the paper profile is sized for a GPU"):  # device="cpu"
        assert start_here(tmp_path, profile=None).profile == "paper"


def test_the_paper_profile_on_a_cpu_warns_before_any_work(tmp_path, monkeypatch):
    """It went straight into weeks of training (notebook 01: 150 epochs of the paper preset at 224 px)."""
    import warnings

    from mtlearn import notebook

    with pytest.warns(UserWarning, match=r"the paper profile is sized for a GPU: on a CPU its trainings take days "
                                         r"to weeks .* or use profile='course' on this machine"):
        start_here(tmp_path, profile="paper", out_dir=tmp_path / "paper")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        start_here(tmp_path, profile="course", out_dir=tmp_path / "course")  # the profiles meant for a CPU
        monkeypatch.setattr(notebook, "pick_device", lambda device: torch.device("cuda"))
        start_here(tmp_path, profile="paper", out_dir=tmp_path / "gpu", device="cuda")  # what it is sized for


def test_metrics_json_records_the_device_and_wall_time_and_the_message_says_them(tmp_path, capsys, monkeypatch):
    from mtlearn import notebook

    run = start_here(tmp_path)
    monkeypatch.setattr(notebook, "time", SimpleNamespace(perf_counter=lambda: run.started + 42.0))  # 42 s later
    run.finish({"dice": 0.5})
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["device"] == "cpu" and record["notebook"] == "99_test" and record["dataset"] == "synthetic"
    assert record["wall_time_s"] == pytest.approx(42.0)
    printed = capsys.readouterr().out
    assert "on cpu" in printed and " 42 s" in printed and str(tmp_path / "out" / "metrics.json") in printed
    gpu = start_here(tmp_path, out_dir=tmp_path / "gpu")
    gpu.device = torch.device("cuda", 1)  # the device the run picked, as the record and the message say it
    gpu.finish({"dice": 0.5})
    assert json.loads((tmp_path / "gpu" / "metrics.json").read_text())["device"] == "cuda:1"
    assert "on cuda:1" in capsys.readouterr().out


def test_metrics_are_rounded_to_six_decimals(tmp_path):
    start_here(tmp_path).finish({"loss": 1 / 3, "nested": {"auc": torch.tensor(2 / 3, dtype=torch.float64)},
                                 "psnr": 24.123456789, "lr": 3.14159265e-7, "zero": 0.0})
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # below 1: six significant digits, not decimals (3e-7 was written as 0.0)
    assert record["metrics"] == {"loss": 0.333333, "nested": {"auc": 0.666667}, "psnr": 24.123457,
                                 "lr": 3.14159e-7, "zero": 0.0}


def test_metrics_whose_keys_collide_as_text_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"keys \['1'\] appear twice once written as text"):
        start_here(tmp_path).finish({1: 0.5, "1": 0.7})  # one of them was dropped, silently


def test_an_empty_out_dir_is_refused_and_a_tilde_means_home(tmp_path, monkeypatch):
    """"" was the kernel's folder, silently; "~/runs" made a folder named "~" there."""
    with pytest.raises(ValueError, match=r"out_dir is empty \(''\); give a folder, or None for outputs/<notebook>/"):
        start_here(tmp_path, out_dir="")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert start_here(tmp_path, out_dir="~/runs").out_dir == tmp_path / "home" / "runs"
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("option, value, message", [
    ("out_dir", 5, r"out_dir must be a folder \(a str or a Path\), or None for outputs/<notebook>/<profile>; got 5"),
    ("out_dir", ["runs"], r"out_dir must be a folder"),  # pathlib's "expected str, bytes or os.PathLike object"
    ("out_dir", "runs ", r"out_dir starts or ends with a space \('runs '\)"),  # made a folder named "runs "
    ("data_root", 5, r"data_root must be a folder \(a str or a Path\), or None for \$MTLEARN_DATA"),
    ("data_root", "  ", r"data_root is empty"),  # "" was the kernel's folder
])
def test_folder_parameters_of_the_wrong_kind_are_named(option, value, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        start_here(tmp_path, **{option: value})
    assert not (tmp_path / "runs ").exists()


def test_finish_names_a_metric_given_twice_before_writing(tmp_path):
    """It was written, and the course's and the grid's tables failed on it later (flatten_metrics)."""
    run = start_here(tmp_path)
    with pytest.raises(ValueError, match=r"the metric 'seg/dice' is given twice .*rename one of them in run.finish"):
        run.finish({"seg": {"dice": 0.1}, "seg/dice": 0.9})
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_finish_takes_any_mapping(tmp_path):
    """A MappingProxyType passed the check, then the JSON writer refused it, after all the training; nested, it
    was refused ("metrics must be numbers, strings, lists or dicts; got mappingproxy")."""
    import types

    run = start_here(tmp_path)
    run.finish(types.MappingProxyType({"dice": 0.5, "per_class": types.MappingProxyType({"benign": 0.4})}))
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert written == {"dice": 0.5, "per_class": {"benign": 0.4}}


@pytest.mark.parametrize("given", ["Smoke", "smoke ", " COURSE"])
def test_a_profile_in_capitals_or_with_spaces_is_named_with_the_one_meant(given, monkeypatch):
    monkeypatch.delenv("MTLEARN_PROFILE", raising=False)
    meant = given.strip().lower()
    with pytest.raises(ValueError, match=rf"unknown profile '{given}' \(from the profile parameter\) \(did you "
                                         rf"mean '{meant}'\? profiles are lower case, without spaces\)"):
        resolve_profile(given)


def test_a_figure_name_with_spaces_around_it_is_refused(tmp_path):
    run = start_here(tmp_path)
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match=r"figure name must be a plain file name such as 'loss_curves', got ' x '"):
        run.save_figure(fig, " x ")  # was written as " x .png"
    plt.close(fig)


def test_a_crash_while_writing_metrics_keeps_the_previous_file(tmp_path, monkeypatch, disk_full_midway):
    run = start_here(tmp_path)
    run.finish({"dice": 0.5})
    before = (tmp_path / "out" / "metrics.json").read_text()
    disk_full_midway()  # the disk fills half-way through the file
    with pytest.raises(OSError, match="disk full"):
        run.finish({"dice": 0.75})
    monkeypatch.undo()
    assert (tmp_path / "out" / "metrics.json").read_text() == before


def test_figures_are_png_files_in_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = start_here(tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = run.save_figure(fig, "curve")
    plt.close(fig)
    assert path == tmp_path / "out" / "curve.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["curve.png"]  # nowhere else


def test_a_run_into_an_out_dir_of_an_earlier_run_sets_that_run_aside(tmp_path, capsys):
    """A second run with other parameters left the first run's figures beside its own, and one that failed left
    the first run's metrics.json, which looked current."""
    first = start_here(tmp_path, seed=3)
    for name in ("curve", "examples"):
        fig, ax = plt.subplots()
        first.save_figure(fig, name)
        plt.close(fig)
    first.finish({"dice": 0.5})
    out = tmp_path / "out"
    (out / "checkpoint.pt").write_bytes(b"kept")  # not the run's record: stays where it is
    (out / "previous").mkdir()
    (out / "previous" / "metrics.json").write_text('{"figures": ["old.png"]}')  # the run kept before: replaced
    (out / "previous" / "old.png").write_bytes(b"old")
    (out / "previous" / "notes.txt").write_text("mine")  # not a run's file: stays
    second = start_here(tmp_path, seed=5, verbose=True)
    assert f"out_dir held an earlier run (profile smoke, dataset synthetic, seed 3): its metrics.json and 2 " \
           f"figure(s) moved to {out / 'previous'}, in place of the run kept there before" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "previous"]
    assert sorted(p.name for p in (out / "previous").iterdir()) == ["curve.png", "examples.png", "metrics.json",
                                                                    "notes.txt"]
    assert json.loads((out / "previous" / "metrics.json").read_text())["seed"] == 3
    fig, ax = plt.subplots()
    second.save_figure(fig, "curve")
    plt.close(fig)
    second.finish({"dice": 0.75})
    assert json.loads((out / "metrics.json").read_text())["figures"] == ["curve.png"]
    # a hand-edited record moves nothing from outside the folder; a folder without a record: nothing to say
    (out / "metrics.json").write_text(json.dumps({"figures": ["../elsewhere.png", "curve.png"]}))
    (tmp_path / "elsewhere.png").write_bytes(b"x")
    start_here(tmp_path)
    assert (tmp_path / "elsewhere.png").is_file() and (out / "previous" / "curve.png").is_file()
    start_here(tmp_path, verbose=True)
    assert "earlier run" not in capsys.readouterr().out
    # only PNG files move (a record listing notes.txt does not take it along); a listed figure the user deleted,
    # or a damaged record, is no reason to fail
    (out / "notes.txt").write_text("mine")
    (out / "metrics.json").write_text(json.dumps({"figures": ["notes.txt", "gone.png"]}))
    start_here(tmp_path, verbose=True)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "metrics.json").exists()
    (out / "metrics.json").write_text("{")
    start_here(tmp_path, verbose=True)
    assert "(its metrics.json unreadable): its metrics.json and 0 figure(s) moved" in capsys.readouterr().out
    assert (out / "previous" / "metrics.json").read_text() == "{"


def test_a_figure_that_cannot_be_saved_keeps_the_one_saved_before(tmp_path, full_disk):
    """savefig wrote straight into curve.png: a full disk left a broken PNG in place of the earlier figure."""
    run = start_here(tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    before = run.save_figure(fig, "curve").read_bytes()
    ax.plot([1, 0])
    full_disk()
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(tmp_path / 'out' / 'curve.png'))}: the disk is "
                                      "full"):
        run.save_figure(fig, "curve")
    plt.close(fig)
    assert (tmp_path / "out" / "curve.png").read_bytes() == before


def test_start_seeds_every_generator(tmp_path):
    import random

    draws = []
    for _ in range(2):
        start_here(tmp_path, seed=3)
        draws.append((random.random(), np.random.rand(), torch.rand(3).tolist()))
        start_here(tmp_path, seed=4)  # something else in between
        random.random(), np.random.rand(), torch.rand(3)
    assert draws[0] == draws[1]


def test_a_numpy_seed_becomes_a_plain_int(tmp_path):
    """A seed from np.arange (a sweep inside a notebook) must not leak a NumPy type into what the notebook saves."""
    run = start_here(tmp_path, seed=np.int64(3))
    assert type(run.seed) is int and json.dumps({"seed": run.seed}) == '{"seed": 3}'


def test_data_root_resolves_to_the_dataset_folder(tmp_path):
    from data_fetch import get_source

    folder = tmp_path / "data" / get_source("busi").folder
    (folder / "benign").mkdir(parents=True)
    run = start_here(tmp_path, dataset="busi", data_root=tmp_path / "data")
    assert run.data_root == folder  # load_dataset's root: the dataset's own folder
    assert start_here(tmp_path, dataset="synthetic").data_root is None


def test_data_root_may_start_with_a_tilde(tmp_path, monkeypatch):
    """data_root="~/data" as typed in a parameters cell: the home folder, not a folder called "~"."""
    from data_fetch import get_source

    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / "data" / get_source("busi").folder
    (folder / "benign").mkdir(parents=True)
    assert start_here(tmp_path, dataset="busi", data_root="~/data").data_root == folder


def test_flatten_metrics_joins_keys_and_leaves_lists_out():
    from mtlearn.notebook import flatten_metrics

    assert flatten_metrics({"seg": {"dice": 0.9, "per_class": [0.8, 1.0]}, "acc": 0.5, "curve": [1, 2]}) == {
        "seg/dice": 0.9, "acc": 0.5}


def test_nan_inside_lists_and_arrays_is_warned_about_by_position(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"\['curve\[1\]', 'seg/per_class\[0\]\[1\]', 'probe\[2\]'\] are NaN"):
        start_here(tmp_path).finish({"curve": [0.5, float("nan")], "seg": {"per_class": [[0.1, float("inf")]]},
                                     "probe": np.array([0.5, 0.6, np.nan]), "fine": torch.tensor([1.0, 2.0])})
    with pytest.warns(RuntimeWarning, match=r"\['loss\[0\]', 'loss\[1\]', 'loss\[2\]', 'loss\[3\]', 'loss\[4\]', "
                                             r"'\.\.\. 9 in all'\]"):  # a long list: the first five and the count
        start_here(tmp_path, out_dir=tmp_path / "again").finish({"loss": [float("nan")] * 9})


def test_up_to_six_non_finite_metrics_are_all_named(tmp_path):
    """The list is cut short only past six names: six broken metrics are all named."""
    names = [f"m{i}" for i in range(6)]
    with pytest.warns(RuntimeWarning, match=re.escape(f"metrics {names} are NaN or inf")):
        start_here(tmp_path).finish(dict.fromkeys(names, float("nan")))


def test_a_nan_numpy_float32_metric_is_warned_about(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"\['iou'\] are NaN or inf"):
        start_here(tmp_path).finish({"iou": np.float32("nan"), "dice": np.float32(0.5)})


def test_a_nan_in_metrics_given_as_another_mapping_is_warned_about(tmp_path):
    """finish takes any Mapping: its NaN was written as null without the warning a dict's gets."""
    from types import MappingProxyType

    with pytest.warns(RuntimeWarning, match=r"\['iou'\] are NaN or inf"):
        start_here(tmp_path).finish(MappingProxyType({"iou": float("nan"), "dice": 0.5}))


def test_an_empty_dataset_folder_counts_as_missing(tmp_path):
    from data_fetch import get_source

    (tmp_path / "data" / get_source("busi").folder).mkdir(parents=True)  # an interrupted or failed download
    with pytest.raises(FileNotFoundError, match=r"python -m data_fetch busi --dest"):
        start_here(tmp_path, dataset="busi", data_root=tmp_path / "data")
