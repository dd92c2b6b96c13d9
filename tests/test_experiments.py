"""Experiment grids: every combination runs once, reruns do nothing, failures are recorded."""

import argparse
import json
import math
import os
import re
import shutil
import statistics
import warnings
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from mtlearn import experiments
from mtlearn.course import injected_parameters
from mtlearn.experiments import _parse_set, collect, grid, main, plot_spread, run_grid, summarise
from tests.test_course import write_notebook

WRITES_METRICS = """import json, pathlib
if scale < 0:
    raise ValueError("negative scale")
record = {"notebook": "nb", "profile": profile, "seed": seed, "metrics": {"score": scale * 10 + seed}}
json.dump(record, open(pathlib.Path(out_dir) / "metrics.json", "w"))"""


@pytest.fixture
def notebooks(tmp_path):
    paths = []
    for name in ("01_a", "02_b"):
        nb = write_notebook(tmp_path / f"{name}.ipynb", WRITES_METRICS)
        text = nb.read_text().replace("out_dir = None", "out_dir = None\\nscale = 1")
        nb.write_text(text)
        paths.append(nb)
    return paths


def test_grid_is_every_combination(notebooks):
    specs = grid(notebooks, {"scale": [1, 2]}, seeds=[0, 1], profile="smoke")
    assert len(specs) == 2 * 2 * 2
    assert specs[0].name == "profile=smoke,scale=1,seed=0"


def test_grid_order_is_notebook_then_sorted_parameter_names_then_seed(tmp_path):
    nb = write_notebook(tmp_path / "01_ab.ipynb", WRITES_METRICS)
    nb.write_text(nb.read_text().replace("out_dir = None", "out_dir = None\\na = 0\\nb = 0"))
    specs = grid([nb], {"b": [1, 2], "a": [3, 4]}, seeds=[0, 1], profile="smoke")
    assert [s.name for s in specs[:5]] == ["a=3,b=1,profile=smoke,seed=0", "a=3,b=1,profile=smoke,seed=1",
                                           "a=3,b=2,profile=smoke,seed=0", "a=3,b=2,profile=smoke,seed=1",
                                           "a=4,b=1,profile=smoke,seed=0"]


def test_grid_runs_once_then_skips_and_collects(notebooks, tmp_path):
    specs = grid(notebooks, {}, seeds=[0, 1], profile="smoke")
    first = run_grid(specs, tmp_path / "grid", progress=False)
    assert list(first["status"]) == ["ok"] * 4
    assert all(seconds > 0 and seconds == round(seconds, 1) for seconds in first["seconds"])  # tenths, for reading
    second = run_grid(specs, tmp_path / "grid", progress=False)
    assert list(second["status"]) == ["skipped (done)"] * 4
    table = collect(tmp_path / "grid")
    assert sorted(table["score"]) == [10, 10, 11, 11]
    # both notebooks record the name "nb": grouped by it, two runs of each seed (said), by run one each
    with pytest.warns(UserWarning, match=r"group\(s\) \['nb'\] hold several runs of one seed"):
        summary = summarise(table, ["notebook"], ["score"])
    assert summary.loc["nb", ("score", "mean")] == 10.5


def test_a_finished_run_of_an_edited_notebook_is_done_again(notebooks, tmp_path):
    """A grid re-run after the notebook's code changed (here the default of a parameter it does not sweep)
    skipped the run as done: the table then showed the old code's result as the new one's."""
    specs = grid(notebooks[:1], {}, seeds=[0], profile="smoke")
    assert list(run_grid(specs, tmp_path / "grid", progress=False)["status"]) == ["ok"]
    notebook = notebooks[0]
    notebook.write_text(notebook.read_text().replace("scale = 1", "scale = 2"))
    assert specs[0].code_changed(tmp_path / "grid")
    with pytest.warns(UserWarning, match=r"1 of 1 runs in the table were made by an earlier version of their "
                                         r"notebook's code: \['profile=smoke,seed=0'\]; run the grid again"):
        assert collect(tmp_path / "grid", specs)["score"].tolist() == [10]  # the old code's, said
    assert list(run_grid(specs, tmp_path / "grid", progress=False)["status"]) == [
        "ok (again: the notebook's code had changed)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert collect(tmp_path / "grid", specs)["score"].tolist() == [20]
    # the run is now of the current code; an edit of the prose or a comment is no reason to run it again
    cells = json.loads(notebook.read_text())
    cells["cells"].append({"cell_type": "markdown", "metadata": {}, "source": ["An added note."]})
    code = next(c for c in cells["cells"] if c["cell_type"] == "code" and "scale = 2" in "".join(c["source"]))
    code["source"] = "".join(code["source"]).replace("scale = 2", "scale = 2  # a note\n\n")
    notebook.write_text(json.dumps(cells))
    assert not specs[0].code_changed(tmp_path / "grid")
    assert list(run_grid(specs, tmp_path / "grid", progress=False)["status"]) == ["skipped (done)"]
    # IPython's lines, which Python cannot tokenize, are compared as lines
    assert experiments._code("!pip install x  # y\n\n") != experiments._code("!pip install z\n")
    assert experiments._code("!pip install x\n\n") == experiments._code("!pip install x")


def test_a_relative_data_root_naming_other_data_here_is_not_the_recorded_run(tmp_path, monkeypatch):
    """The same grid command in two course folders, each with its own `data`, into one out_root: the second
    skipped its run as done and reported the first folder's results as its own."""
    body = """import json, pathlib
json.dump({"profile": profile, "seed": seed, "metrics": {"x": 1}}, open(pathlib.Path(out_dir) / "metrics.json", "w"))"""
    nb = write_notebook(tmp_path / "01_root.ipynb", body)
    nb.write_text(nb.read_text().replace("out_dir = None", "out_dir = None\\ndata_root = None"))
    for course in ("a", "b"):
        (tmp_path / course / "data").mkdir(parents=True)
    specs = grid([nb], {"data_root": ["data"]}, seeds=[0], profile="smoke")
    monkeypatch.chdir(tmp_path / "a")
    assert list(run_grid(specs, tmp_path / "grid", progress=False)["status"]) == ["ok"]
    monkeypatch.chdir(tmp_path / "b")
    assert not specs[0].is_complete(tmp_path / "grid")
    assert list(run_grid(specs, tmp_path / "grid", progress=False)["status"]) == ["ok"]
    executed = json.loads((specs[0].folder(tmp_path / "grid") / nb.name).read_text())
    assert executed["metadata"]["papermill"]["parameters"]["data_root"] == str(tmp_path / "b" / "data")


def test_two_grids_whose_values_share_a_folder_name_do_not_take_each_others_runs(tmp_path):
    """"a/b" and "a_b" both make the folder tag=a_b (and "PCGrad" and "pcgrad" share one where case is ignored):
    the second grid skipped its run as done and collect showed the first grid's result under its name."""
    body = """import json, pathlib
json.dump({"profile": profile, "seed": seed, "metrics": {"slash": int("/" in tag)}},
          open(pathlib.Path(out_dir) / "metrics.json", "w"))"""
    nb = write_notebook(tmp_path / "01_tag.ipynb", body)
    nb.write_text(nb.read_text().replace("out_dir = None", "out_dir = None\\ntag = 'x'"))
    first, second = (grid([nb], {"tag": [tag]}, seeds=[0], profile="smoke") for tag in ("a/b", "a_b"))
    assert first[0].folder(tmp_path) == second[0].folder(tmp_path)
    assert list(run_grid(first, tmp_path / "grid", progress=False)["status"]) == ["ok"]
    assert list(run_grid(second, tmp_path / "grid", progress=False)["status"]) == ["ok"]  # not "skipped (done)"
    assert collect(tmp_path / "grid", second)[["tag", "slash"]].values.tolist() == [["a_b", 0]]
    assert list(run_grid(second, tmp_path / "grid", progress=False)["status"]) == ["skipped (done)"]
    assert not first[0].is_complete(tmp_path / "grid")  # the folder now holds the second grid's run


def test_a_relative_data_root_is_the_same_run_seen_from_another_folder(tmp_path, monkeypatch):
    """run_notebook makes a relative data_root absolute where the grid runs; collecting (or resuming) from
    another folder must still find the run, not rerun it or leave it out of the table."""
    body = """import json, pathlib
json.dump({"profile": profile, "seed": seed, "metrics": {"x": 1}}, open(pathlib.Path(out_dir) / "metrics.json", "w"))"""
    nb = write_notebook(tmp_path / "01_root.ipynb", body)
    nb.write_text(nb.read_text().replace("out_dir = None", "out_dir = None\\ndata_root = None"))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    specs = grid([nb], {"data_root": ["data"]}, seeds=[0], profile="smoke")
    assert list(run_grid(specs, tmp_path / "grid", progress=False)["status"]) == ["ok"]
    monkeypatch.chdir(tmp_path / "sub")
    assert specs[0].is_complete(tmp_path / "grid") and len(collect(tmp_path / "grid", specs)) == 1
    # a hand-built spec may hold NumPy numbers and paths: compared as papermill wrote them, not a TypeError
    numpy_seed = replace(specs[0], parameters=tuple((k, np.int64(v)) if k == "seed" else (k, v)
                                                    for k, v in specs[0].parameters))
    assert numpy_seed.is_complete(tmp_path / "grid")
    as_path = replace(specs[0], parameters=tuple((k, Path("data")) if k == "data_root" else (k, v)
                                                 for k, v in specs[0].parameters))
    assert as_path.is_complete(tmp_path / "grid")
    # the whole relative path must match, not its last folder: "a_b/data" and "a/b/data" share a run folder
    # (data_root=a_b_data), and a run of the one is not a run of the other
    recorded = str(tmp_path / "a_b" / "data")
    assert experiments._same_relative_path("a_b/data", recorded) and experiments._same_relative_path("data", recorded)
    assert not experiments._same_relative_path("a/b/data", recorded)


def test_a_failing_run_is_recorded_and_the_rest_go_on(notebooks, tmp_path):
    specs = grid(notebooks[:1], {"scale": [-1, 1]}, seeds=[0], profile="smoke")
    status = run_grid(specs, tmp_path / "grid", progress=False)
    assert status["status"].iloc[0].startswith("failed") and "negative scale" in status["status"].iloc[0]
    assert status["status"].iloc[1] == "ok"
    failed = specs[0].folder(tmp_path / "grid")
    assert not failed.exists()  # a failed run is kept beside, in its staging folder, with its error
    assert "negative scale" in (failed.with_name(failed.name + ".partial") / "error.txt").read_text()


def test_the_error_of_a_failed_run_is_written_as_utf8_whatever_the_locale(notebooks, tmp_path, monkeypatch):
    """Windows' cp1252 cannot write an error naming a path in another script: the UnicodeEncodeError ended the
    grid. Here the locale is UTF-8, so the test pins the encoding passed instead of the failure."""
    import pathlib

    from mtlearn.course import NotebookResult

    def fails(notebook, folder, parameters, cell_timeout):
        folder.mkdir(parents=True)
        return NotebookResult(notebook.stem, folder, False, 0.0, "cannot read C:/用户/数据.png")

    written, real = [], pathlib.Path.write_text

    def recording(self, text, encoding=None, **kwargs):
        written.append((self.name, encoding))
        return real(self, text, encoding=encoding, **kwargs)

    monkeypatch.setattr("mtlearn.experiments.run_notebook", fails)
    monkeypatch.setattr(pathlib.Path, "write_text", recording)
    run_grid(grid(notebooks[:1], {}, seeds=[0], profile="smoke"), tmp_path / "grid", progress=False)
    assert ("error.txt", "utf-8") in written
    (error,) = (tmp_path / "grid").rglob("error.txt")
    assert error.read_text(encoding="utf-8") == "cannot read C:/用户/数据.png\n"


def test_a_full_disk_at_error_txt_fails_that_run_not_the_grid(notebooks, tmp_path, monkeypatch):
    """A full disk is when runs fail: error.txt's write raised out of run_grid, and the runs after it never ran."""
    import errno
    import pathlib

    real = pathlib.Path.write_text

    def full(self, text, *args, **kwargs):
        if self.name == "error.txt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    table = run_grid(grid(notebooks[:1], {"scale": [-1, 2]}, seeds=[0], profile="smoke"), tmp_path / "grid",
                     progress=False)
    assert table["status"].iloc[0].startswith("failed: ") and "negative scale" in table["status"].iloc[0]
    assert table["status"].iloc[0].endswith(f"(error.txt not written: {os.strerror(errno.ENOSPC)})")
    assert list(table["status"].iloc[1:]) == ["ok"]


def test_bad_grid_arguments():
    with pytest.raises(ValueError, match="seed"):
        grid([__file__], {}, seeds=[], profile="smoke")
    with pytest.raises(argparse.ArgumentTypeError, match="needs a name and at least one value"):
        _parse_set("num_seeds=")  # was zero runs, then KeyError 'status'
    assert _parse_set("weighting=fixed,pcgrad") == ("weighting", ["fixed", "pcgrad"])
    assert _parse_set("lr=0.1,1e-3") == ("lr", [0.1, 0.001])
    assert _parse_set("weightings=['fixed','pcgrad']") == ("weightings", [["fixed", "pcgrad"]])  # one list
    assert _parse_set("weightings=['fixed'],['pcgrad']") == ("weightings", [["fixed"], ["pcgrad"]])
    assert _parse_set("size=(64,64),(96,96)") == ("size", [(64, 64), (96, 96)])
    assert _parse_set("lr = 1e-3,1e-4") == ("lr", [0.001, 0.0001])  # spaces around '=' (a name "lr " is unknown)


def test_an_empty_value_in_set_is_refused_a_last_comma_allowed():
    with pytest.raises(argparse.ArgumentTypeError, match=r"--set 'dataset=busi,,synthetic' has an empty value"):
        _parse_set("dataset=busi,,synthetic")  # was ['busi', '', 'synthetic']: a run with dataset ""
    with pytest.raises(argparse.ArgumentTypeError, match="has an empty value"):
        _parse_set("dataset=,busi")
    assert _parse_set("dataset=busi,synthetic,") == ("dataset", ["busi", "synthetic"])  # as [1, 2,] in Python


def test_grid_refuses_a_notebook_twice_or_two_of_one_name(notebooks, tmp_path):
    """Their runs would share out_root/<name>/...: was "give values that do not hold ',' or '='"."""
    twin = tmp_path / "elsewhere" / notebooks[0].name
    twin.parent.mkdir()
    twin.write_text(notebooks[0].read_text())
    upper = tmp_path / "other" / notebooks[0].name.upper()  # one folder on macOS's and Windows' disks
    upper.parent.mkdir()
    upper.write_text(notebooks[0].read_text())
    for pair in ([notebooks[0], notebooks[0]], [notebooks[0], twin], [notebooks[0], upper]):
        with pytest.raises(ValueError, match=r"share a name, so their runs would share folders"):
            grid(pair, {}, seeds=[0], profile="smoke")


def test_grid_without_notebooks_is_an_error():
    """An empty grid would "finish" at once with no runs and an empty table."""
    with pytest.raises(ValueError, match="the grid needs at least one notebook"):
        grid([], {}, seeds=[0], profile="smoke")
    # an unknown profile failed later, inside every run's kernel, and with no cell timeout
    with pytest.raises(ValueError, match="unknown profile 'fast' .*valid profiles are 'smoke'"):
        grid([__file__], {}, seeds=[0], profile="fast")


def test_set_splits_at_the_first_equals_sign_and_needs_a_name():
    """A value may hold "=" itself; a missing name would only fail later, as an unknown parameter ''."""
    assert _parse_set("tag=a=b") == ("tag", ["a=b"])
    with pytest.raises(argparse.ArgumentTypeError, match="needs a name and at least one value"):
        _parse_set("=1")


def test_a_parameter_the_notebook_lacks_is_refused(notebooks):
    """papermill would only warn and run the defaults: a grid of identical runs, labelled as different."""
    with pytest.raises(ValueError, match=r"01_a has no parameter \['scael'\]; its parameters: .*'scale'"):
        grid(notebooks, {"scael": [1, 2]}, seeds=[0], profile="smoke")


def test_every_notebook_of_the_grid_must_have_the_swept_parameter(notebooks):
    """A parameter only the first notebook has would give the second a grid of identical default runs."""
    notebooks[0].write_text(notebooks[0].read_text().replace("scale = 1", "scale = 1\\nwidth = 8"))
    with pytest.raises(ValueError, match=r"02_b has no parameter \['width'\]"):
        grid(notebooks, {"width": [8, 16]}, seeds=[0], profile="smoke")


@pytest.mark.parametrize("parameters, message", [
    ({"scale": 0.001}, r"'scale' needs a list of values to sweep, got 0.001; write \{'scale': \[0.001\]\}"),
    ({"scale": "abc"}, r"'scale' needs a list"),  # not three runs a, b, c
    ({"scale": []}, r"'scale' has no values"),
    ({"seed": [5]}, r"'seed' is set by the grid.*--seeds"),  # not silently seed 0
    ({"profile": ["paper"]}, r"'profile' is set by the grid.*--profile"),
    ({"out_dir": ["/data"]}, r"'out_dir' is set by the grid.*chooses each run's folder"),
])
def test_grid_refuses_values_it_would_misread(notebooks, parameters, message):
    with pytest.raises(ValueError, match=message):
        grid(notebooks, parameters, seeds=[0], profile="smoke")


def test_grid_refuses_text_where_the_notebook_has_a_list_a_number_or_a_switch(notebooks):
    """A string where the notebook has a list failed in every run, letter by letter ("unknown weighting 'p'")."""
    text = notebooks[0].read_text().replace("scale = 1", "scale = 1\\nnames = ['x']\\nflag = False")
    notebooks[0].write_text(text)
    # what may be meant is left to the notebook: None, a tuple for an int (an image size), numpy numbers
    grid(notebooks[:1], {"names": [["a"], ("b",), None], "flag": [True, None], "scale": [2, 0.5, None, (64, 96),
                                                                                          np.int64(3)]},
         seeds=[0], profile="smoke")
    for parameters, message in [
        ({"names": ["pcgrad"]}, r"01_a's parameter 'names' takes a list \(its default: \['x'\]\); 'pcgrad' is "
                                r"text\. Give one such value per run, e.g. --set \"names=\['a'\],\['b'\]\""),
        ({"flag": ["False"]}, r"'flag' takes True or False .*'False' is text"),
        ({"scale": ["big"]}, r"'scale' takes a number \(its default: 1\); 'big' is text"),
    ]:
        with pytest.raises(ValueError, match=message):
            grid(notebooks[:1], parameters, seeds=[0], profile="smoke")


def test_grid_checks_every_value_and_a_tuple_default_too(notebooks):
    """Text anywhere in the sweep fails before the first run, also where the default is a tuple (an image size)."""
    notebooks[0].write_text(notebooks[0].read_text().replace("scale = 1", "scale = 1\\nsize = (64, 64)"))
    with pytest.raises(ValueError, match=r"'scale' takes a number \(its default: 1\); 'big' is text"):
        grid(notebooks[:1], {"scale": [1, 2, "big"]}, seeds=[0], profile="smoke")
    with pytest.raises(ValueError, match=r"'size' takes a list \(its default: \(64, 64\)\); '96' is text"):
        grid(notebooks[:1], {"size": [(32, 32), "96"]}, seeds=[0], profile="smoke")


@pytest.mark.parametrize("text", ["size=(64,64", "weightings=[fixed],[pcgrad]", "dataset='busi"])
def test_set_refuses_a_malformed_literal_instead_of_splitting_it_into_strings(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"is not a valid Python literal; check its brackets, and "
                                                          r"quote the strings inside"):
        _parse_set(text)
    assert _parse_set("tag=a,'',b") == ("tag", ["a", "", "b"])  # an empty text, quoted, is text, not a broken literal


def test_run_folders_stay_one_level_deep(notebooks, tmp_path):
    notebooks[0].write_text(notebooks[0].read_text().replace("scale = 1", "scale = 1\\ndata_root = None"))
    spec = grid(notebooks[:1], {"data_root": ["/data/runs"]}, seeds=[0], profile="smoke")[0]
    assert spec.folder(tmp_path).parent == tmp_path / "01_a"


FAILS_AFTER_FINISH = WRITES_METRICS.replace('raise ValueError("negative scale")\n', "pass\n") + """
if scale < 0:
    raise ValueError("failed after writing metrics.json")"""


def test_grid_refuses_a_run_folder_named_like_another_runs_staging_folder(notebooks, tmp_path):
    """{"tag": ["x.partial", "x"]}: the run "tag=x" staged in "...tag=x.partial" and deleted the other run's folder."""
    nb = notebooks[0]
    nb.write_text(write_notebook(tmp_path / "tmp.ipynb", WRITES_METRICS).read_text()
                  .replace("out_dir = None", "out_dir = None\\ntag = 'x'"))
    for suffix in (".partial", ".old", ".lock"):
        with pytest.raises(ValueError, match=r"would end like another run's staging, set-aside or lock folder .*; "
                                             r"give 'tag' a value that does not end so"):
            grid([nb], {"tag": [f"x{suffix}", "x"]}, seeds=[0], profile="smoke")
    assert len(grid([nb], {"tag": ["x.partial.y", "x"]}, seeds=[0], profile="smoke")) == 2


def test_a_broken_notebook_is_named_by_its_path(tmp_path):
    broken = tmp_path / "07_conflict.ipynb"
    broken.write_text('{"cells": [ <<<<<<< HEAD')
    with pytest.raises(ValueError, match=rf"cannot read the notebook {re.escape(str(broken))}: NotJSONError"):
        grid([broken], {"tag": ["a"]}, seeds=[0], profile="smoke")


def test_grid_refuses_nan_and_inf_for_a_number(notebooks):
    nb = notebooks[0]  # scale = 1
    for value in (math.nan, math.inf):  # 1e400 on the command line reads as inf
        with pytest.raises(ValueError, match=rf"parameter 'scale' takes a number \(its default: 1\); got {value}"):
            grid([nb], {"scale": [value]}, seeds=[0], profile="smoke")


def test_only_a_successful_run_counts_as_done(notebooks, tmp_path):
    """metrics.json alone is no proof: a notebook can fail (or be stopped) after run.finish wrote it."""
    nb = notebooks[0]
    nb.write_text(write_notebook(tmp_path / "tmp.ipynb", FAILS_AFTER_FINISH).read_text()
                  .replace("out_dir = None", "out_dir = None\\nscale = 1"))
    specs = grid([nb], {"scale": [-1, 1]}, seeds=[0], profile="smoke")
    root = tmp_path / "grid"
    assert list(run_grid(specs, root, progress=False)["status"].str[:6]) == ["failed", "ok"]
    assert list(run_grid(specs, root, progress=False)["status"].str[:6]) == ["failed", "skippe"]
    left_out = re.escape(specs[0].name)
    with pytest.warns(UserWarning, match=rf"1 of 2 runs have no finished, readable result and are not in the table "
                                         rf"\(not run yet, failed, or a damaged metrics\.json\): \['{left_out}'\]"):
        assert list(collect(root, specs)["run"]) == [specs[1].name]  # left out, but not silently
    folder = specs[1].folder(root)
    assert (specs[0].folder(root).with_name(specs[0].folder(root).name + ".partial") / "error.txt").exists()
    (folder / "done").unlink()  # without the marker (stopped before the notebook's last save): not done
    assert not specs[1].is_complete(root) and collect(root).empty
    with pytest.warns(UserWarning, match=r"2 of 2 runs have no finished, readable result"):
        assert collect(root, specs).empty  # ... nor in the grid's own table


def test_collect_keeps_to_the_grid_it_is_given(notebooks, tmp_path):
    root = tmp_path / "grid"
    first = grid(notebooks[:1], {"scale": [1]}, seeds=[0], profile="smoke")
    second = grid(notebooks[:1], {"scale": [2]}, seeds=[0], profile="smoke")
    run_grid(first + second, root, progress=False)
    assert list(collect(root, second)["score"]) == [20]
    assert sorted(collect(root)["score"]) == [10, 20]  # specs=None: every finished run in the folder


def test_command_line_prints_a_path_the_console_cannot_spell_escaped(notebooks, tmp_path, monkeypatch, cp1252_stdout):
    """Windows writes cp1252 to a file or pipe: a grid run into a folder of Łukasz's ended in a traceback after
    every run had finished."""
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    out = tmp_path / "Łukasz" / "grid"
    printed = cp1252_stdout()
    assert main(["--notebooks", "01", "--set", "scale=1", "--out", str(out)]) == 0
    assert f"1 results collected into {tmp_path}{os.sep}\\u0141ukasz{os.sep}grid{os.sep}results.csv" in printed()


def test_command_line_tables_only_its_own_runs_and_keeps_results_on_a_crash(notebooks, tmp_path, monkeypatch, capsys,
                                                                             disk_full_midway):
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    out = tmp_path / "grid"
    with pytest.raises(SystemExit):  # a usage error naming the fix, not a traceback (nor a run of seed 0)
        main(["--notebooks", "01", "--set", "seed=5", "--out", str(out)])
    assert "'seed' is set by the grid" in capsys.readouterr().err
    assert main(["--notebooks", "01", "--set", "scale=1", "--out", str(out)]) == 0
    assert main(["--notebooks", "01", "--set", "scale=2", "--out", str(out)]) == 0
    results = (out / "results.csv").read_text()
    assert list(pd.read_csv(out / "results.csv")["score"]) == [20]  # not the earlier grid's 10

    disk_full_midway()  # the disk fills half-way through the file
    capsys.readouterr()
    assert main(["--notebooks", "01", "--set", "scale=2", "--out", str(out)]) == 1  # said, not a traceback
    assert "disk full\nThe finished runs are kept: once results.csv can be written, run this command again" in \
        capsys.readouterr().err
    assert (out / "results.csv").read_text() == results


def _runs():
    """Five runs of two weightings in first-seen order pcgrad, fixed; one pcgrad run lost its score."""
    return pd.DataFrame({
        "weighting": ["pcgrad", "fixed", "pcgrad", "fixed", "pcgrad", "fixed"],
        "seed": [0, 0, 1, 1, 2, 2],
        "score": [0.5, 0.25, 0.75, 0.5, np.nan, 1.0],
        "dice": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    })


def test_summarise_gives_mean_sample_std_and_count_across_seeds():
    said = (r"^1 of 6 runs have no score \(NaN: undefined for that run, or not recorded\); the mean and std are of "
            r"the other runs, and the 'count' column says how many$")
    with pytest.warns(UserWarning, match=said):
        summary = summarise(_runs(), ["weighting"], ["score", "dice"])
    expected = {  # sample standard deviation (n - 1), as for a spread over a few seeds
        ("fixed", "score"): [0.25, 0.5, 1.0], ("pcgrad", "score"): [0.5, 0.75],  # the missing score is no run
        ("fixed", "dice"): [2.0, 4.0, 6.0], ("pcgrad", "dice"): [1.0, 3.0, 5.0],
    }
    for (group, metric), values in expected.items():
        assert summary.loc[group, (metric, "mean")] == pytest.approx(statistics.mean(values))
        assert summary.loc[group, (metric, "std")] == pytest.approx(statistics.stdev(values))
        assert summary.loc[group, (metric, "count")] == len(values)
    with pytest.raises(ValueError, match=r"columns \['loss'\] are not in the table"):
        summarise(_runs(), ["weighting"], ["loss"])
    # one name, as plot_spread takes it, is one column (it was split into letters: "columns ['w', 'e', ...")
    with pytest.warns(UserWarning, match="1 of 6 runs have no score"):
        assert summarise(_runs(), "weighting", "score").equals(summarise(_runs(), ["weighting"], ["score"]))


def test_collect_warns_when_runs_average_overlapping_seeds(tmp_path):
    """Notebook 06 with num_seeds left at the course's 3: grid seeds 0, 1, 2 ran seeds {0,1,2}, {1,2,3} and
    {2,3,4}, whose means share runs; summarise then gave the spread of overlapping means as one across seeds."""
    def finished(name, seeds):
        folder = tmp_path / "grid" / "02_loss_weighting" / name
        folder.mkdir(parents=True)
        record = {"notebook": "02_loss_weighting", "seed": seeds[0], "metrics": {"seeds": seeds, "score": 1.0}}
        (folder / "metrics.json").write_text(json.dumps(record))
        (folder / "done").write_text("")

    for first in (0, 1):
        finished(f"seed={first}", [first, first + 1, first + 2])
    with pytest.warns(UserWarning, match=r"runs average overlapping seeds \[1, 2\] .* not independent"):
        assert len(collect(tmp_path / "grid")) == 2
    finished("seed=5", [5, 6, 7])  # apart from the others: overlap still said, for the runs that have it
    for name in ("seed=0", "seed=1"):
        shutil.rmtree(tmp_path / "grid" / "02_loss_weighting" / name)
    finished("seed=0", [0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one seed each, or several that no other run shares: nothing to say
        assert len(collect(tmp_path / "grid")) == 2


def test_summarise_warns_when_a_group_pools_another_swept_value_as_seeds():
    """Two learning rates x three seeds grouped by weighting came out as count 6 and the std of a mixture,
    read as a spread across seeds, without a word."""
    table = pd.concat([_runs().assign(lr=1e-3), _runs().assign(lr=1e-4)], ignore_index=True)
    with pytest.warns(UserWarning, match=r"group\(s\) \['fixed', 'pcgrad'\] hold several runs of one seed: .* add it "
                                         r"to by \(now \['weighting'\]\)"):
        pooled = summarise(table, "weighting", "dice")
    assert pooled.loc["fixed", ("dice", "count")] == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = summarise(table, ["weighting", "lr"], "dice")  # grouped by it too: three seeds each
        summarise(_runs(), "weighting", "dice")  # one run per seed: as before
    assert split.loc[("fixed", 1e-3), ("dice", "count")] == 3


def test_plot_spread_draws_every_run_side_by_side_and_the_mean_as_a_line():
    table = _runs().dropna()
    fig = plot_spread(table, "weighting", "score")
    ax = fig.axes[0]
    groups = ["pcgrad", "fixed"]  # the table's order, not sorted
    assert [t.get_text() for t in ax.get_xticklabels()] == groups
    assert not ax.patches  # no bar: with a few seeds a bar up to the mean describes no run
    from matplotlib.collections import LineCollection, PathCollection

    dots = [np.asarray(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]
    assert [d[:, 1].tolist() for d in dots] == [[0.5, 0.75], [0.25, 0.5, 1.0]]  # one dot per run
    for centre, d in enumerate(dots):  # at its group, at distinct x positions, centred on the group
        assert len(set(d[:, 0])) == len(d) and np.all(np.abs(d[:, 0] - centre) < 0.5)
        assert d[:, 0].mean() == pytest.approx(centre)
    again = plot_spread(table, "weighting", "score").axes[0].collections
    assert [np.asarray(c.get_offsets()).tolist() for c in again if isinstance(c, PathCollection)] == \
        [d.tolist() for d in dots]  # no random jitter: the same figure every time
    means = [c.get_segments()[0] for c in ax.collections if isinstance(c, LineCollection)]
    assert len(means) == 2
    for centre, (segment, mean) in enumerate(zip(means, [1.25 / 2, 1.75 / 3])):
        assert segment[:, 1] == pytest.approx([mean, mean])  # a short line at the mean, across the group's dots
        assert segment[0, 0] < centre - 0.15 and segment[1, 0] > centre + 0.15
    assert ax.get_xlabel() == "weighting" and ax.get_ylabel() == "score"
    assert ax.get_title() == "score by weighting (dots: seeds, line: mean)"
    assert plot_spread(table, "weighting", "score", title="spread").axes[0].get_title() == "spread"
    failed_first = pd.DataFrame({"weighting": ["dwa", "fixed"], "score": [np.nan, 0.5]})  # dwa's run failed
    legend = plot_spread(failed_first, "weighting", "score").axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a run (seed)", "mean of the runs"]
    plt.close("all")


def test_plot_spread_says_delta_m_is_in_percent():
    table = pd.DataFrame({"weighting": ["fixed", "fixed", "pcgrad"], "delta_m": [-1.3, -1.3, 0.5]})
    ax = plot_spread(table, "weighting", "delta_m").axes[0]
    assert ax.get_ylabel() == "Δm (%)"
    assert plot_spread(table, "weighting", "delta_m", ylabel="gain").axes[0].get_ylabel() == "gain"
    (dots, *_) = ax.collections
    assert np.asarray(dots.get_offsets())[:, 0].tolist() == pytest.approx([-0.15, 0.15])  # equal values both seen
    plt.close("all")


def _finished_run(folder, record, spec=None):
    """A folder as a successful run leaves it: metrics.json and the `done` marker, and with a spec the executed
    notebook, where papermill records the parameters it injected."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(record))
    (folder / "done").write_text("finished\n")
    if spec is not None:
        parameters = dict(injected_parameters(dict(spec.parameters)), out_dir=str(folder))
        (folder / spec.notebook.name).write_text(json.dumps({"metadata": {"papermill": {"parameters": parameters}}}))
    return folder


RECORD = {"notebook": "01_a", "profile": "smoke", "seed": 0, "dataset": "synthetic", "device": "cpu",
          "wall_time_s": 12.5, "figures": ["curve.png"], "metrics": {"seg": {"dice": 0.8}, "acc": 0.9, "curve": [1, 2]}}


def test_collect_gives_one_row_per_run_with_its_facts_and_flat_metrics(tmp_path):
    _finished_run(tmp_path / "01_a" / "profile=smoke,seed=0", RECORD)
    table = collect(tmp_path)
    assert list(table.columns) == ["notebook", "run", "profile", "seed", "dataset", "device", "wall_time_s",
                                   "seg/dice", "acc"]
    assert table.iloc[0].to_dict() == {"notebook": "01_a", "run": "profile=smoke,seed=0", "profile": "smoke",
                                       "seed": 0, "dataset": "synthetic", "device": "cpu", "wall_time_s": 12.5,
                                       "seg/dice": 0.8, "acc": 0.9}


def test_collect_lists_runs_in_name_order_and_keeps_recorded_facts_over_swept_values(notebooks, tmp_path):
    for seed in (2, 0, 1):
        _finished_run(tmp_path / "01_a" / f"profile=smoke,seed={seed}", dict(RECORD, seed=seed))
    assert list(collect(tmp_path)["seed"]) == [0, 1, 2]  # not the file system's order
    notebooks[0].write_text(notebooks[0].read_text().replace("scale = 1", "scale = 1\\ndevice = 'auto'"))
    spec = grid(notebooks[:1], {"device": ["auto"]}, seeds=[0], profile="smoke")[0]
    _finished_run(spec.folder(tmp_path / "grid"), RECORD, spec)  # RECORD: it ran on the cpu
    assert list(collect(tmp_path / "grid", [spec])["device"]) == ["cpu"]  # what the run used, not "auto"


def test_grid_takes_a_range_of_seeds(notebooks):
    assert [dict(s.parameters)["seed"] for s in grid(notebooks, {}, seeds=range(2), profile="smoke")] == [0, 1, 0, 1]


def test_collect_with_the_grid_has_a_column_per_swept_parameter(notebooks, tmp_path):
    """summarise(table, "scale", ...) failed ("not in the table"): only the folder name held the values."""
    specs = grid(notebooks[:1], {"scale": [2, [64, 64]]}, seeds=[0, 1], profile="smoke")
    for score, spec in enumerate(specs):
        _finished_run(spec.folder(tmp_path), dict(RECORD, seed=dict(spec.parameters)["seed"], metrics={"score": score}),
                      spec)
    table = collect(tmp_path, specs)
    assert table[["scale", "seed", "score"]].values.tolist() == [[2, 0, 0], [2, 1, 1], ["[64, 64]", 0, 2],
                                                                 ["[64, 64]", 1, 3]]  # a list as its text
    assert summarise(table, "scale", "score")[("score", "mean")].tolist() == [0.5, 2.5]
    assert "scale" not in collect(tmp_path).columns  # without the specs: in the run's name only


def test_collect_keeps_the_run_facts_when_a_metric_has_one_of_their_names(tmp_path):
    metrics = {"seed": 0.5, "run": 3, "seg": {"dice": 0.8}}
    _finished_run(tmp_path / "01_a" / "profile=smoke,seed=0", dict(RECORD, metrics=metrics))
    row = collect(tmp_path).iloc[0].to_dict()
    assert (row["seed"], row["run"]) == (0, "profile=smoke,seed=0")
    assert (row["metrics/seed"], row["metrics/run"], row["seg/dice"]) == (0.5, 3, 0.8)
    (tmp_path / "01_a" / "profile=smoke,seed=0" / "metrics.json").write_text(
        json.dumps(dict(RECORD, metrics={"seg": {"dice": 0.1}, "seg/dice": 0.9})))  # one value would be lost
    with pytest.raises(ValueError, match=r"profile=smoke,seed=0.metrics\.json: the metric 'seg/dice' is given twice"):
        collect(tmp_path)


def test_a_done_run_whose_metrics_are_not_a_dict_is_damaged_not_a_crash_of_every_collect(notebooks, tmp_path):
    spec = grid(notebooks[:1], {}, seeds=[0], profile="smoke")[0]
    _finished_run(spec.folder(tmp_path), dict(RECORD, metrics=None), spec)
    with pytest.warns(UserWarning, match=r"1 of 1 runs have no finished, readable result"):
        assert not spec.is_complete(tmp_path) and collect(tmp_path).empty  # AttributeError on None.items()


def test_summarise_and_plot_spread_name_a_text_metric_and_a_missing_column():
    table = pd.DataFrame({"weighting": ["fixed", "pcgrad"], "score": [0.5, 0.7], "device": ["cpu", "cpu"]})
    for call in (lambda: summarise(table, "weighting", "device"), lambda: plot_spread(table, "weighting", "device")):
        with pytest.raises(ValueError, match=r"columns \['device'\] do not hold numbers \(e\.g\. 'cpu'\)"):
            call()
    with pytest.raises(ValueError, match=r"columns \['nope'\] are not in the table; available: \['weighting'"):
        plot_spread(table, "weighting", "nope")  # a bare KeyError "Column not found: nope"
    plt.close("all")


def test_plot_spread_says_when_every_run_of_a_group_has_no_value():
    table = pd.DataFrame({"weighting": ["fixed", "fixed", "dwa", "dwa"], "score": [0.5, 0.6, np.nan, np.nan]})
    ax = plot_spread(table, "weighting", "score").axes[0]
    assert [(t.get_text(), t.get_position()[0]) for t in ax.texts] == [("2 run(s),\nno value", 1)]
    plt.close("all")


def test_plot_spread_counts_the_runs_of_a_group_without_a_value():
    """The mean line of two runs out of three was drawn as if of all three, with nothing to say one was missing."""
    table = pd.DataFrame({"weighting": ["dwa"] * 2 + ["fixed"] * 3, "score": [0.4, 0.6, 0.5, np.nan, 0.7]})
    ax = plot_spread(table, "weighting", "score").axes[0]
    assert [(t.get_text(), t.get_position()[0]) for t in ax.texts] == [("1 of 3:\nno value", 1)]  # under fixed
    assert ax.collections[3].get_segments()[0][0][1] == pytest.approx(0.6)  # fixed's line, after dwa's
    plt.close("all")


def test_collect_leaves_out_staging_and_set_aside_folders(tmp_path):
    """An interrupted move can leave a whole run in `<run>.partial` or `<run>.old` beside the real one."""
    for suffix in ("", ".partial", ".old"):
        _finished_run(tmp_path / "01_a" / f"profile=smoke,seed=0{suffix}", RECORD)
    assert list(collect(tmp_path)["run"]) == ["profile=smoke,seed=0"]


def test_a_finished_run_of_other_parameters_in_the_folder_is_not_complete(notebooks, tmp_path):
    spec = grid(notebooks[:1], {}, seeds=[0], profile="smoke")[0]
    folder = _finished_run(spec.folder(tmp_path), dict(RECORD, profile="course"), spec)  # e.g. a copied-in run
    assert not spec.is_complete(tmp_path)
    (folder / "metrics.json").write_text(json.dumps(dict(RECORD, seed=1)))
    assert not spec.is_complete(tmp_path)
    (folder / "metrics.json").write_text(json.dumps(RECORD))
    assert spec.is_complete(tmp_path)
    (folder / spec.notebook.name).unlink()  # what the run's parameters were is then unknown: run it again
    assert not spec.is_complete(tmp_path)


def test_a_finished_run_whose_notebook_recorded_no_swept_parameter_is_not_complete(notebooks, tmp_path):
    """A run made before `scale` was swept (papermill recorded no scale): run again, not a KeyError."""
    spec = grid(notebooks[:1], {"scale": [2]}, seeds=[0], profile="smoke")[0]
    older = replace(spec, parameters=tuple((k, v) for k, v in spec.parameters if k != "scale"))
    _finished_run(spec.folder(tmp_path), RECORD, older)
    assert not spec.is_complete(tmp_path) and spec.record(tmp_path) is None


def test_a_finished_run_on_another_dataset_is_not_complete(notebooks, tmp_path):
    """A dataset=busi folder holding a synthetic run (copied in, or renamed) must run again, not be skipped."""
    notebooks[0].write_text(notebooks[0].read_text().replace("scale = 1", "scale = 1\\ndataset = 'synthetic'"))
    spec = grid(notebooks[:1], {"dataset": ["busi"]}, seeds=[0], profile="smoke")[0]
    folder = _finished_run(spec.folder(tmp_path), RECORD, spec)  # RECORD's dataset: synthetic
    assert not spec.is_complete(tmp_path)
    (folder / "metrics.json").write_text(json.dumps(dict(RECORD, dataset="busi")))
    assert spec.is_complete(tmp_path)


def test_a_done_run_whose_metrics_are_damaged_runs_again(notebooks, tmp_path):
    """A `done` beside a half-written metrics.json stopped the whole grid (and collect) with JSONDecodeError."""
    spec = grid(notebooks[:1], {}, seeds=[0], profile="smoke")[0]
    folder = _finished_run(spec.folder(tmp_path), RECORD, spec)
    (folder / "metrics.json").write_text('{"notebook": "nb", "prof')
    with pytest.warns(UserWarning, match=r"1 of 1 runs have no finished, readable result"):
        assert not spec.is_complete(tmp_path) and collect(tmp_path).empty
    status = run_grid([spec], tmp_path, progress=False)
    assert list(status["status"]) == ["ok"] and spec.is_complete(tmp_path)


def test_a_run_whose_folder_cannot_be_made_fails_alone(notebooks, tmp_path):
    """run_notebook reports it as a failed run; run_grid then wrote error.txt into the missing folder and
    the whole grid stopped with NotADirectoryError."""
    specs = grid(notebooks[:1], {"scale": [1, 2]}, seeds=[0], profile="smoke")
    (tmp_path / "01_a").mkdir()
    (tmp_path / "01_a" / f"{specs[0].name}.partial").write_text("a file where the staging folder goes")
    status = run_grid(specs, tmp_path, progress=False)
    assert status["status"].iloc[0].startswith("failed") and list(status["status"].iloc[1:]) == ["ok"]


def test_run_folders_hold_no_character_a_file_system_refuses_and_never_clash(notebooks):
    """Only '/' was replaced: ':' '*' '?' ... cannot be in a folder name on Windows, and '\\' nests there."""
    notebooks[0].write_text(notebooks[0].read_text().replace("scale = 1", "scale = 1\\ntag = 'x'\\nnote = 'y'"))
    specs = grid(notebooks[:1], {"tag": ["a:b", "c*d?e", "f\\g", 'h"<i>|j']}, seeds=[0], profile="smoke")
    assert [s.name for s in specs] == ["profile=smoke,seed=0,tag=a_b", "profile=smoke,seed=0,tag=c_d_e",
                                       "profile=smoke,seed=0,tag=f_g", "profile=smoke,seed=0,tag=h__i__j"]
    with pytest.raises(ValueError, match=r"two runs of the grid would share the folder .*give values that do not "
                                         r"hold ',' or '='"):  # four runs, three folders
        grid(notebooks[:1], {"note": ["a", "a,profile=smoke,seed=0,tag=b"], "tag": ["b,profile=smoke,seed=0,tag=c",
                                                                                    "c"]}, seeds=[0], profile="smoke")


def test_command_line_names_a_notebook_that_matches_nothing(notebooks, tmp_path, monkeypatch, capsys):
    """`--notebooks 01 09` ran 01 alone and said nothing of 09."""
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    with pytest.raises(SystemExit):
        main(["--notebooks", "01", "09", "--out", str(tmp_path / "grid")])
    assert "matches ['09']; available: ['01_a', '02_b']" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_command_line_names_an_out_that_is_a_file(notebooks, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    (tmp_path / "grid").write_text("not a folder")
    with pytest.raises(SystemExit):
        main(["--notebooks", "01", "--out", str(tmp_path / "grid" / "a")])
    assert f"{tmp_path / 'grid'} is a file. Choose another --out" in capsys.readouterr().err


def test_command_line_fails_when_a_run_fails(notebooks, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    monkeypatch.delenv("MTLEARN_PROFILE", raising=False)
    assert main(["--notebooks", "01", "--set", "scale=-1", "--out", str(tmp_path / "grid")]) == 1
    said = capsys.readouterr()
    assert "negative scale" in said.out
    # the run left out of the table is a line of the command's output, not a Python warning (none escapes:
    # pytest's filterwarnings would show it), with the way on
    assert ("note: 1 of 1 runs have no finished, readable result and are not in the table" in said.out
            and "run the grid again (the same command" in said.out)
    # the default profile is course, as for python -m mtlearn.course and the notebooks, and it names the folder
    assert (tmp_path / "grid" / "01_a" / "profile=course,scale=-1,seed=0.partial" / "error.txt").exists()
    monkeypatch.setenv("MTLEARN_PROFILE", "smoke")  # the environment's profile, as for the notebooks
    assert main(["--notebooks", "01", "--set", "scale=-2", "--out", str(tmp_path / "grid")]) == 1
    assert (tmp_path / "grid" / "01_a" / "profile=smoke,scale=-2,seed=0.partial" / "error.txt").exists()
    # one failed run among good ones fails the grid too: make and CI must not call it a success
    assert main(["--notebooks", "01", "--set", "scale=-3,1", "--out", str(tmp_path / "grid")]) == 1
    assert (tmp_path / "grid" / "01_a" / "profile=smoke,scale=1,seed=0" / "metrics.json").exists()


@pytest.mark.parametrize("refusal", ["locked", "full"])
def test_command_line_says_what_keeps_it_from_writing_results_csv(notebooks, tmp_path, monkeypatch, capsys,
                                                                   full_disk, refusal):
    """Excel locks an open results.csv on Windows (os.replace: PermissionError), and a disk fills up: the grid
    ended in a traceback after every run had finished."""
    from mtlearn import utils

    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    monkeypatch.delenv("MTLEARN_PROFILE", raising=False)
    out = tmp_path / "grid"
    assert main(["--notebooks", "01", "--set", "scale=1", "--out", str(out)]) == 0
    before = (out / "results.csv").read_text()
    replace = os.replace

    def locked(src, dst):
        if str(dst).endswith("results.csv"):
            raise PermissionError(13, "Permission denied")
        return replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", locked) if refusal == "locked" else full_disk()
    capsys.readouterr()
    assert main(["--notebooks", "01", "--set", "scale=1,2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    said = (f"cannot replace {out / 'results.csv'} (Permission denied); close any program that has it open"
            if refusal == "locked" else f"cannot write {out / 'results.csv'}: the disk is full")
    assert said in err and "\nThe finished runs are kept: once results.csv can be written, run this command" in err
    assert (out / "results.csv").read_text() == before
    run = out / "01_a" / "profile=course,scale=2,seed=0"  # the new run is kept (on the full disk, unpublished)
    assert (run if refusal == "locked" else run.with_name(run.name + ".partial")).joinpath("metrics.json").exists()


def test_command_line_ctrl_c_says_what_is_kept_and_how_to_go_on(notebooks, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    monkeypatch.setattr(experiments, "run_grid", interrupted)
    assert main(["--notebooks", "01", "--set", "scale=1", "--profile", "smoke", "--out", str(tmp_path / "g")]) == 130
    assert (f"interrupted: the finished runs are kept in {tmp_path / 'g'}; run the same command again to go on"
            in capsys.readouterr().err)


def test_command_line_sigterm_says_what_is_kept_and_how_to_go_on(notebooks, tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's pre-emption) ended the grid without a word, exit status 143."""
    import signal

    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)

    def terminated(*args, **kwargs):  # (with no handler, SIGTERM would end the test session)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "SIGTERM ends the grid silently"
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(experiments, "run_grid", terminated)
    assert main(["--notebooks", "01", "--set", "scale=1", "--profile", "smoke", "--out", str(tmp_path / "g")]) == 143
    assert (f"terminated (SIGTERM): the finished runs are kept in {tmp_path / 'g'}; run the same command again to "
            "go on" in capsys.readouterr().err)


def test_command_line_refuses_a_repeated_set(notebooks, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    with pytest.raises(SystemExit) as stop:
        main(["--notebooks", "01", "--set", "lr=1", "--set", "lr=2", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "--set lr given more than once; list the values in one --set" in capsys.readouterr().err


def test_command_line_refuses_a_bad_profile_and_notebooks_that_match_nothing(notebooks, tmp_path, monkeypatch, capsys):
    """Both are usage errors before any run: not a grid of runs that each fail, nor a match inside a name."""
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    monkeypatch.setattr(experiments, "run_notebook", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as stop:
        main(["--notebooks", "01", "--profile", "fast", "--out", str(tmp_path / "grid")])
    assert stop.value.code == 2 and "unknown profile 'fast' (from the --profile option)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # "1" is not the start of 01_a's name
        main(["--notebooks", "1", "--out", str(tmp_path / "grid")])
    assert stop.value.code == 2
    assert f"no notebook in {tmp_path} matches ['1']" in capsys.readouterr().err


@pytest.mark.parametrize("seeds, parameters, message", [
    ([0, 0], {}, r"seeds repeat: \[0\]; give each once"),  # one run counted twice: n 2, std 0
    (3, {}, r"seeds must be a list of integers, e.g. seeds=\[0, 1\], got 3"),
    (np.array([0, 0]), {}, r"seeds repeat: \[0\]"),  # an array of two: its truth is ambiguous, not a usage error
    ([-1], {}, r"seeds must be integers in 0\.\.2\*\*32 - 1, got \[-1\]"),
    ([1.5], {}, r"seeds must be integers in 0\.\.2\*\*32 - 1, got \[1.5\]"),
    ([2**32], {}, r"seeds must be integers in 0\.\.2\*\*32 - 1, got \[4294967296\]"),  # seed_everything's limit
    ([0], {"scale": [1, 1]}, r"parameter 'scale' repeats a value \(\[1\]\)"),
    # one value to the notebook, two folders: the same run twice in every mean
    ([0], {"scale": [1, 1.0]}, r"parameter 'scale' repeats a value \(\[1\.0\]\)"),
    ([0], {"scale": [0.0, -0.0]}, r"parameter 'scale' repeats a value \(\[-0\.0\]\)"),
    ([0], {"size": [[64, 64], [64.0, 64]]}, r"parameter 'size' repeats a value"),
    # one folder on macOS and Windows, whose file systems ignore case
    ([0], {"w": ["PCGrad", "pcgrad"]}, r"values \['PCGrad', 'pcgrad'\] of parameter 'w' would share one run folder"),
    # different values, one folder name: the second run would be skipped as done, its row the first's
    ([0], {"scale": [1, "1"]}, r"values \[1, '1'\] of parameter 'scale' would share one run folder \(scale=1\)"),
    ([0], {"scale": ["a/b", "a_b"]}, r"values \['a/b', 'a_b'\] .* one run folder \(scale=a_b\)"),
])
def test_grid_refuses_seeds_and_values_that_repeat_or_cannot_seed(notebooks, seeds, parameters, message):
    with pytest.raises(ValueError, match=message):
        grid(notebooks, parameters, seeds=seeds, profile="smoke")


def test_a_switch_and_a_count_are_two_values_and_folders_that_differ_only_in_case_clash(notebooks):
    """True == 1 in Python, yet a notebook may treat them apart; "A" and "a" are one folder on macOS and Windows."""
    assert len(grid(notebooks[:1], {"scale": [True, 1]}, seeds=[0], profile="smoke")) == 2
    notebooks[0].write_text(notebooks[0].read_text().replace("scale = 1", "scale = 1\\ntag = 'x'\\nnote = 'y'"))
    with pytest.raises(ValueError, match=r"two runs of the grid would share the folder"):  # across two parameters
        grid(notebooks[:1], {"note": ["a", "A,profile=smoke,seed=0,tag=b"], "tag": ["b,profile=smoke,seed=0,tag=c",
                                                                                    "c"]}, seeds=[0], profile="smoke")


def test_summarise_names_every_metric_with_runs_without_a_value():
    table = _runs().assign(dice=[1.0, np.nan, 3.0, np.nan, 5.0, 6.0])
    with pytest.warns(UserWarning, match=r"^1 of 6 runs have no score; 2 of 6 runs have no dice \(NaN: "):
        summarise(table, "weighting", ["score", "dice"])


def test_summarise_takes_a_metric_no_run_recorded():
    """A column of None (object dtype): every run failed to give it, which is a count of 0, not text."""
    table = pd.DataFrame({"weighting": ["fixed", "pcgrad"], "score": [None, None], "dice": [0.5, 0.7]})
    with pytest.warns(UserWarning, match="2 of 2 runs have no score"):
        assert summarise(table, "weighting", "score")[("score", "count")].tolist() == [0, 0]


def test_set_drops_the_spaces_after_commas():
    assert _parse_set("dataset=busi, synthetic") == ("dataset", ["busi", "synthetic"])


def test_runs_whose_group_is_missing_are_kept_in_the_summary_and_the_plot():
    """A run whose weighting could not be read (NaN) is a run: pandas' groupby would drop it silently."""
    table = pd.DataFrame({"weighting": ["fixed", None, "fixed"], "score": [1.0, 3.0, 2.0]})
    summary = summarise(table, ["weighting"], ["score"])
    assert summary[("score", "count")].sum() == 3 and summary[("score", "mean")].isna().sum() == 0
    from matplotlib.collections import PathCollection

    ax = plot_spread(table, "weighting", "score").axes[0]
    dots = [np.asarray(c.get_offsets())[:, 1].tolist() for c in ax.collections if isinstance(c, PathCollection)]
    assert dots == [[1.0, 2.0], [3.0]] and [t.get_text() for t in ax.get_xticklabels()] == ["fixed", "nan"]
    plt.close("all")


def test_command_line_removes_an_earlier_grids_results_when_no_run_finished(notebooks, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    out = tmp_path / "grid"
    assert main(["--notebooks", "01", "--set", "scale=1", "--out", str(out)]) == 0
    assert (out / "results.csv").exists()
    assert main(["--notebooks", "01", "--set", "scale=-1", "--out", str(out)]) == 1
    assert not (out / "results.csv").exists() and "removed the earlier grid's" in capsys.readouterr().out
    # held open in Excel (Windows): said, not a traceback
    assert main(["--notebooks", "01", "--set", "scale=1", "--out", str(out)]) == 0
    real_unlink = Path.unlink

    def held(self, *args, **kwargs):
        if self.name == "results.csv":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", held)
    capsys.readouterr()
    assert main(["--notebooks", "01", "--set", "scale=-2", "--out", str(out)]) == 1
    assert (f"no run of this grid finished, and the earlier grid's {out / 'results.csv'} could not be removed "
            in capsys.readouterr().err)


def test_a_run_another_grid_is_writing_is_running_elsewhere_not_a_failure(notebooks, tmp_path, monkeypatch, capsys,
                                                                           held_by_another_run):
    """The same grid started twice: each listed the run the other was writing as failed, pointed at an error.txt
    that was never written, and exited 1 although every run finished."""
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    out = tmp_path / "grid"
    specs = grid(notebooks[:1], {}, seeds=[0, 1], profile="smoke")
    held = specs[0].folder(out)
    lock = held.with_name(held.name + ".lock")
    held_by_another_run(lock=lock)
    assert main(["--notebooks", "01", "--seeds", "0", "1", "--profile", "smoke", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"running elsewhere: another run is writing {held}" in said and "failed: " not in said
    assert ("1 run was being written by another grid (the same command running twice?): run this command again "
            "once that grid has ended") in said
    assert not any(out.rglob("error.txt")) and lock.is_file()
    assert len(pd.read_csv(out / "results.csv")) == 1  # the run it ran
    other = specs[1].folder(out)  # both runs elsewhere now
    other_lock = other.with_name(other.name + ".lock")
    shutil.rmtree(other)
    held_by_another_run(lock=other_lock)
    assert main(["--notebooks", "01", "--seeds", "0", "1", "--profile", "smoke", "--out", str(out)]) == 0
    assert (out / "results.csv").is_file()  # the other grid's to replace: kept, not removed as an earlier one's
    assert "2 runs were being written by another grid" in capsys.readouterr().out
    other_lock.unlink()
    lock.unlink()  # the other grid ended (without finishing that run): the same command runs it
    assert main(["--notebooks", "01", "--seeds", "0", "1", "--profile", "smoke", "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "results.csv")) == 2


def test_an_out_folder_in_the_home_folder_is_the_same_grid_each_time(notebooks, tmp_path, monkeypatch, capsys):
    """--out=~/exp (no shell expands a "~" after "="): the runs went to the home folder, were never found done
    there, so every run ran again, and no results.csv was written."""
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    monkeypatch.setenv("HOME", str(tmp_path))
    for status in ("ok", "skipped (done)"):
        assert main(["--notebooks", "01", "--profile", "smoke", "--out=~/exp"]) == 0
        assert status in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "exp" / "results.csv")) == 1 and not (tmp_path / "~").exists()
    with pytest.raises(SystemExit) as exit_:  # a user who does not exist: a usage error, not a traceback
        main(["--notebooks", "01", "--profile", "smoke", "--out=~no_such_user_here/exp"])
    assert exit_.value.code == 2 and "--out ~no_such_user_here/" in capsys.readouterr().err
    specs = grid(notebooks[:1], {}, seeds=[0], profile="smoke")
    assert list(run_grid(specs, "~/exp", progress=False)["status"]) == ["skipped (done)"]
    assert len(collect("~/exp", specs)) == 1


def test_every_run_of_a_grid_has_its_profiles_cell_timeout(notebooks, tmp_path, monkeypatch):
    """A kernel whose reply is lost would hang the whole grid: each run gets the course runner's limit."""
    seen = []

    def fake_run(notebook, out_dir, parameters, cell_timeout=None):
        seen.append((parameters["profile"], cell_timeout))
        raise KeyboardInterrupt  # stop after the first run: only the limit it was given matters here

    monkeypatch.setattr(experiments, "run_notebook", fake_run)
    for profile, expected in (("smoke", 3600.0), ("paper", None)):
        with pytest.raises(KeyboardInterrupt):
            run_grid(grid(notebooks[:1], {}, seeds=[0], profile=profile), tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid(notebooks[:1], {}, seeds=[0], profile="smoke"), tmp_path, progress=False, cell_timeout=5)
    assert seen == [("smoke", 3600.0), ("paper", None), ("smoke", 5)]


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_command_line_names_a_bad_cell_timeout(notebooks, tmp_path, monkeypatch, capsys, value):
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    monkeypatch.setattr(experiments, "run_notebook", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit):
        main(["--notebooks", "01", "--cell-timeout", value, "--out", str(tmp_path)])
    assert "--cell-timeout must be a number of seconds > 0 (0: no limit)" in capsys.readouterr().err


def test_collect_leaves_out_a_finished_run_of_other_parameters_in_a_grid_folder(notebooks, tmp_path):
    """is_complete reruns such a folder; if the rerun fails, collect took the stale run as this grid's."""
    spec = grid(notebooks[:1], {}, seeds=[0], profile="smoke")[0]
    folder = _finished_run(spec.folder(tmp_path), dict(RECORD, seed=3), spec)  # copied in from another grid
    with pytest.warns(UserWarning, match=r"1 of 1 runs have no finished, readable result"):
        assert collect(tmp_path, [spec]).empty
    (folder / "metrics.json").write_text(json.dumps(RECORD))
    assert list(collect(tmp_path, [spec])["seed"]) == [0]


def test_grid_refuses_run_folder_names_too_long_for_the_file_system(notebooks):
    many = [[f"weighting_{i}" for i in range(25)], ["other"]]  # one name of ~300 characters
    with pytest.raises(ValueError, match=r"over the 255 a file name may have; sweep fewer or shorter values"):
        grid(notebooks, {"scale": many}, seeds=[0], profile="smoke")
    with pytest.raises(ValueError, match=r"would be 2\d\d bytes .* over the 255"):  # bytes, not characters
        grid(notebooks, {"scale": [["\u00e9" * 120]]}, seeds=[0], profile="smoke")  # 120 characters, 240 bytes
    # the staging twin counts: a name of 250 bytes fits, "<name>.partial" (258) does not; 247 + 8 = 255 does
    fits = grid(notebooks[:1], {"scale": [["x" * 216]]}, seeds=[0], profile="smoke")[0]
    assert len(f"{fits.name}.partial".encode()) == 255
    with pytest.raises(ValueError, match=r"would be 258 bytes with its '.partial' suffix, over the 255"):
        grid(notebooks[:1], {"scale": [["x" * 219]]}, seeds=[0], profile="smoke")


@pytest.mark.parametrize("value, message", [
    (0, "cell_timeout must be a finite number > 0"),
    ("autp", "cell_timeout must be 'auto', None \\(no limit\\) or seconds > 0, got 'autp'"),
])
def test_run_grid_checks_its_cell_timeout_before_any_run_even_when_all_are_done(notebooks, tmp_path, monkeypatch,
                                                                                value, message):
    specs = grid(notebooks[:1], {}, seeds=[0], profile="smoke")
    _finished_run(specs[0].folder(tmp_path), RECORD, specs[0])
    monkeypatch.setattr(experiments, "run_notebook", lambda *a, **k: pytest.fail("no run should start"))
    with pytest.raises(ValueError, match=message):
        run_grid(specs, tmp_path, progress=False, cell_timeout=value)


def test_notebooks_get_tuples_as_lists_and_numpy_numbers_as_python_ones(tmp_path):
    """papermill writes a value it does not know as its text: (32, 32) reached the notebook as the string
    "(32, 32)", a NumPy seed as "0", so every run failed (or computed with text)."""
    body = """import json, pathlib
kinds = {"scale": type(scale).__name__, "seed": type(seed).__name__, "size": size, "flags": flags}
record = {"metrics": {"score": scale * 10 + seed}, "kinds": kinds}
json.dump(record, open(pathlib.Path(out_dir) / "metrics.json", "w"))"""
    nb = write_notebook(tmp_path / "03_c.ipynb", body)
    nb.write_text(nb.read_text().replace("out_dir = None", "out_dir = None\\nscale = 1\\nsize = [8, 8]\\nflags = {}"))
    parameters = {"scale": [np.int64(2), np.float32(0.5)], "size": [(32, 32)], "flags": [{"a": (np.bool_(True),)}]}
    specs = grid([nb], parameters, seeds=np.arange(1), profile="smoke")
    assert parameters["size"] == [(32, 32)]  # the caller's dict is left as it was
    # a list of NumPy integers too, not only an array (whose tolist() gives ints): papermill wrote "0"
    listed = grid([nb], parameters, seeds=list(np.arange(1)), profile="smoke")
    assert [type(dict(spec.parameters)["seed"]) for spec in listed] == [int, int]
    status = run_grid(specs, tmp_path / "grid", progress=False)
    assert list(status["status"]) == ["ok", "ok"], status["status"].tolist()
    kinds = [json.loads((spec.folder(tmp_path / "grid") / "metrics.json").read_text())["kinds"] for spec in specs]
    assert kinds == [{"scale": "int", "seed": "int", "size": [32, 32], "flags": {"a": [True]}},
                     {"scale": "float", "seed": "int", "size": [32, 32], "flags": {"a": [True]}}]
    assert specs[0].name == "flags={'a'_ [True]},profile=smoke,scale=2,seed=0,size=[32, 32]"


@pytest.mark.parametrize("value, kind", [({1, 2}, "set"), ({1: "a"}, "dict"), (object(), "object")])
def test_grid_refuses_a_value_papermill_would_pass_as_text(notebooks, value, kind):
    with pytest.raises(ValueError, match=rf"a value of parameter 'scale': .* \({kind}\) cannot be passed to a "
                                         r"notebook, which takes None, True/False, numbers, strings, lists and dicts"):
        grid(notebooks[:1], {"scale": [1, value]}, seeds=[0], profile="smoke")


def test_grid_takes_one_notebook_path_as_a_list_of_one(notebooks):
    """A str was iterated letter by letter: "notebooks ['.', '/', '_', ...] share a name"."""
    expected = grid(notebooks[:1], {}, seeds=[0], profile="smoke")
    assert grid(str(notebooks[0]), {}, seeds=[0], profile="smoke") == expected
    assert grid(notebooks[0], {}, seeds=[0], profile="smoke") == expected


def test_grid_names_a_notebook_that_is_not_a_file_and_the_path_a_number_stands_for(notebooks, tmp_path, monkeypatch):
    """`02`, as --notebooks takes it, failed in papermill: a warning, then FileNotFoundError '02'."""
    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    suggestion = re.escape(repr(str(notebooks[1])))  # the path, as course.select_notebooks finds "02"
    with pytest.raises(ValueError, match=r"notebooks \['02'\] are not notebook files .*e\.g\. " + suggestion):
        grid(["02"], {}, seeds=[0], profile="smoke")
    for missing in (tmp_path / "09_typo.ipynb", tmp_path):  # nothing there; a folder
        with pytest.raises(ValueError, match=r"are not notebook files .*e\.g\. 'notebooks/02_loss_weighting\.ipynb'"):
            grid([notebooks[0], missing], {}, seeds=[0], profile="smoke")
    with pytest.raises(ValueError, match=r"notebooks must be paths of notebooks, .*got \[2\]"):
        grid([2], {}, seeds=[0], profile="smoke")  # TypeError inside pathlib


def test_collect_names_a_folder_that_does_not_exist_or_is_a_file(tmp_path):
    """Was an empty table, and then summarise said only "available: []"."""
    with pytest.raises(ValueError, match=r"out_root .*typo does not exist; give the folder run_grid wrote"):
        collect(tmp_path / "typo")
    (tmp_path / "results.csv").write_text("")
    with pytest.raises(ValueError, match=r"out_root .*results\.csv is a file; give the folder run_grid wrote"):
        collect(tmp_path / "results.csv", [])
    assert collect(tmp_path).empty  # a folder with no finished run: nothing yet, not an error
    with pytest.raises(ValueError, match=r"not in the table: it is empty \(collect found no finished run\)"):
        summarise(collect(tmp_path), "weighting", "score")


def test_plot_spread_takes_one_column_as_a_list_like_summarise():
    """`by=["weighting"]` was TypeError: unhashable type: 'list'."""
    table = _runs().dropna()
    ax = plot_spread(table, ["weighting"], ["score"]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pcgrad", "fixed"] and ax.get_xlabel() == "weighting"
    with pytest.raises(ValueError, match=r"plot_spread draws one column per axis; give by one name, .*'seed'\]"):
        plot_spread(table, ["weighting", "seed"], "score")
    plt.close("all")


def test_summarise_needs_a_group_and_a_metric():
    """Raw pandas errors: "No group keys passed!" and "No objects to concatenate"."""
    with pytest.raises(ValueError, match=r"summarise needs a column to group the runs by, e\.g\. by='weighting'"):
        summarise(_runs(), [], "score")
    with pytest.raises(ValueError, match=r"summarise needs at least one metric column, e\.g\. metrics="):
        summarise(_runs(), "weighting", [])


def test_command_line_reports_a_grid_whose_runs_could_not_make_their_folders(notebooks, tmp_path, monkeypatch,
                                                                            capsys):
    """No run made --out: collect() refuses a missing folder, so the command line must not ask it."""
    from mtlearn.course import NotebookResult

    monkeypatch.setattr(experiments, "course_notebooks", lambda: notebooks)
    monkeypatch.setattr(experiments, "run_notebook", lambda notebook, folder, parameters, cell_timeout: NotebookResult(
        notebook.stem, folder, False, 0.0, "the notebook could not run: PermissionError"))
    assert main(["--notebooks", "01", "--profile", "smoke", "--out", str(tmp_path / "grid")]) == 1
    assert "failed: the notebook could not run" in capsys.readouterr().out and not (tmp_path / "grid").exists()
