"""The main-job runner: papermill execution, failure reporting, summary table."""

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from mtlearn import course
from mtlearn.course import course_notebooks, headline_table, notebook_parameters, run_notebook


def write_notebook(path, body):
    params = new_code_cell("profile = None\nseed = 0\nout_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


GOOD = """import json, pathlib
pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
json.dump({"profile": profile, "metrics": {"dice": 0.5 + seed}}, open(pathlib.Path(out_dir) / "metrics.json", "w"))"""


def test_run_notebook_passes_parameters_and_reads_metrics(tmp_path, monkeypatch):
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    # a limit from a NumPy sweep is a number like any other
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke", "seed": 2}, cell_timeout=np.int64(600))
    assert result.ok, result.error
    # nbclient takes whole seconds: --cell-timeout 1.5 failed every notebook with a TraitError
    assert run_notebook(nb, tmp_path / "out", {"profile": "smoke", "seed": 2}, cell_timeout=90.5).ok
    asked = []
    monkeypatch.setattr("papermill.execute_notebook", lambda *a, **kw: asked.append(kw["execution_timeout"]))
    run_notebook(nb, tmp_path / "short", {}, cell_timeout=0.5)  # rounded up: 0 would mean no limit at all
    assert asked == [1]
    assert result.metrics == {"profile": "smoke", "metrics": {"dice": 2.5}}
    assert (tmp_path / "out" / "01_good.ipynb").exists()
    assert result.out_dir == tmp_path / "out"  # where the results are now, not the staging folder they ran in
    assert "01_good" in headline_table([result]) and "dice=2.5" in headline_table([result])


def test_the_kernels_own_error_log_stays_out_of_the_callers_output(tmp_path, capfd):
    """A grid run's kernel logs "KeyboardInterrupt caught in kernel" as an error when it is shut down after a run
    that succeeded; it landed in notebook 06's output, where it read like a failure."""
    body = GOOD + "\nget_ipython().kernel.log.error('a line of the kernel log, not of the notebook')"
    assert run_notebook(write_notebook(tmp_path / "01_log.ipynb", body), tmp_path / "out", {"profile": "smoke"}).ok
    captured = capfd.readouterr()
    assert "a line of the kernel log" not in captured.out + captured.err


def test_run_notebook_keeps_braces_in_its_paths_literal(tmp_path):
    """papermill formats its paths with the parameters: "{seed}" in a folder name became the seed, and
    "{'a': 1}" (a grid's dict value) failed with "Missing parameter"."""
    folder = tmp_path / "{profile}"
    folder.mkdir()
    nb = write_notebook(folder / "01_good.ipynb", GOOD)
    for name in ("flags={'a': 1}", "{seed}"):
        result = run_notebook(nb, tmp_path / name, {"profile": "smoke", "seed": 2})
        assert result.ok, result.error
        assert (tmp_path / name / "01_good.ipynb").exists() and result.metrics["metrics"] == {"dice": 2.5}


@pytest.mark.parametrize("written", ["[0.5]", '{"metrics": [0.5]}'])
def test_a_metrics_json_that_is_not_a_dict_of_metrics_fails_the_run(tmp_path, written):
    """It was published as a success, and the headline table then crashed the whole course with an AttributeError."""
    body = f"import pathlib\npathlib.Path(out_dir, 'metrics.json').write_text({written!r})"
    result = run_notebook(write_notebook(tmp_path / "01_list.ipynb", body), tmp_path / "out", {"profile": "smoke"})
    assert not result.ok and "metrics.json must hold a dict whose 'metrics' is a dict" in result.error
    assert not (tmp_path / "out").exists() and "01_list" in headline_table([result])


def test_a_run_folder_that_cannot_be_made_fails_that_run_only(tmp_path):
    (tmp_path / "outputs").write_text("a file where the runs' folder should be")
    result = run_notebook(write_notebook(tmp_path / "01_good.ipynb", GOOD), tmp_path / "outputs" / "01_good",
                          {"profile": "smoke"})
    assert not result.ok and "cannot make the run's folder" in result.error  # was a raw NotADirectoryError


def test_run_notebook_refuses_a_parameter_the_notebook_does_not_have(tmp_path):
    """papermill logged "Passed unknown parameter: epoch" and ran the defaults: a run labelled epochs=3 that was not."""
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    with pytest.raises(ValueError, match=r"01_good has no parameter \['epoch'\]; its parameters: \['out_dir', "
                                         r"'profile', 'seed'\]"):
        run_notebook(nb, tmp_path / "out", {"profile": "smoke", "epoch": 3})
    with pytest.raises(TypeError, match=r"parameters must be a dict of the notebook's parameters.*got NoneType"):
        run_notebook(nb, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()
    assert run_notebook(str(nb), str(tmp_path / "out"), {"profile": "smoke"}).ok  # paths as text, as typed


def test_run_notebook_refuses_an_out_dir_that_holds_the_notebook(tmp_path):
    """Publishing replaces out_dir: the notebook's own folder (and every other notebook in it) was deleted."""
    (tmp_path / "nbs").mkdir()
    nb = write_notebook(tmp_path / "nbs" / "01_good.ipynb", GOOD)
    for out_dir in (tmp_path / "nbs", tmp_path):
        with pytest.raises(ValueError, match=r"holds the notebook 01_good.ipynb itself"):
            run_notebook(nb, out_dir, {"profile": "smoke"})
    assert nb.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["nbs"]


def test_run_notebook_refuses_an_out_dir_name_too_long_for_its_staging_twin(tmp_path):
    """A folder name of 248 to 255 bytes is one the file system takes, but not with '.partial' after it: the
    run failed on its lock file with "File name too long", naming neither the folder nor the fix."""
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    longest = "r" * (255 - len(".partial"))
    with pytest.raises(ValueError, match=r"out_dir's name 'r{60}'... would be 256 bytes with its '.partial' suffix, "
                                         r"over the 255 a file name may have; give a shorter name"):
        run_notebook(nb, tmp_path / (longest + "r"), {"profile": "smoke"})
    with pytest.raises(ValueError, match=r"would be 256 bytes with its '.partial' suffix"):  # bytes, not characters
        run_notebook(nb, tmp_path / ("é" * 124), {"profile": "smoke"})  # 124 characters, 248 bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_good.ipynb"]
    assert run_notebook(nb, tmp_path / longest, {"profile": "smoke"}).ok  # the longest name that fits


def test_headline_table_keeps_one_line_per_notebook_for_a_multi_line_error():
    error = "cell [4] raised FileNotFoundError: dataset 'busi' was not found in /d/busi. Download it first with\n" \
            "    python -m data_fetch busi --dest \"/d/busi\""
    table = headline_table([course.NotebookResult("01_x", None, False, 1.0, error)])
    assert table.splitlines()[1].endswith("was not found in /d/busi. Download it first with ...")
    assert len(table.splitlines()) == 2


def test_headline_table_shows_a_nan_metric():
    """metrics.json stores NaN as null; a broken metric must show, not vanish from the table."""
    result = course.NotebookResult("01_x", None, True, 1.0, metrics={"metrics": {"auc": None, "f1": float("nan"),
                                                                                   "dice": 0.5,
                                                                                   "converged": True}})
    assert "auc=NaN, f1=NaN, dice=0.5" in headline_table([result])
    assert "converged" not in headline_table([result])  # a flag is not a number to compare


def test_headline_table_rounds_to_three_digits_and_shows_the_first_six_metrics():
    """One readable line per notebook: 0.333, not 0.3333333333333333, and at most six numbers."""
    metrics = {f"m{i}": 1 / 3 + i for i in range(7)}
    line = headline_table([course.NotebookResult("01_x", None, True, 1.0, metrics={"metrics": metrics})])
    assert "m0=0.333, m1=1.33, m2=2.33, m3=3.33, m4=4.33, m5=5.33" in line and "m6" not in line


CONTRACT = """from mtlearn.notebook import start
run = start("04_contract", profile=profile, dataset="synthetic", data_root=None, seed=seed, device="cpu",
            out_dir=out_dir, verbose=False)
run.finish({"dice": 0.5})"""


def test_a_notebook_using_the_contract_runs_where_its_executed_copy_is_written(tmp_path):
    # run_notebook saves the executed copy (a .ipynb) into the very out_dir the notebook writes to
    nb = write_notebook(tmp_path / "04_contract.ipynb", CONTRACT)
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke", "seed": 1})
    assert result.ok, result.error
    assert result.metrics["metrics"] == {"dice": 0.5} and result.metrics["seed"] == 1
    assert (tmp_path / "out" / "04_contract.ipynb").exists()


def test_the_notebook_writes_beside_its_executed_copy_whatever_the_parameters_say(tmp_path):
    """An out_dir among the parameters must not send the figures and metrics.json away from the executed copy."""
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    result = run_notebook(nb, tmp_path / "out", {"seed": 0, "out_dir": str(tmp_path / "elsewhere")})
    assert result.ok, result.error
    assert (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "elsewhere").exists()


FIGURE_THEN_METRICS = """import json, pathlib
pathlib.Path(out_dir, name + ".png").write_text("figure")
print("out_dir", out_dir)
json.dump({"metrics": {"dice": 0.5}}, open(pathlib.Path(out_dir) / "metrics.json", "w"))
if name == "bad":
    raise RuntimeError("failed after writing metrics")"""


def test_a_rerun_replaces_the_old_results_only_when_it_succeeds(tmp_path):
    nb = write_notebook(tmp_path / "01_rerun.ipynb", FIGURE_THEN_METRICS)
    nb.write_text(nb.read_text().replace("out_dir = None", "out_dir = None\\nname = 'first'"))
    out = tmp_path / "out"
    assert run_notebook(nb, out, {"name": "first"}).ok
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert str(out) in before["01_rerun.ipynb"].decode() and ".partial" not in before["01_rerun.ipynb"].decode()

    failed = run_notebook(nb, out, {"name": "bad"})  # fails after writing its metrics and a figure
    assert not failed.ok and failed.out_dir == tmp_path / "out.partial"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the good run, untouched
    assert (failed.out_dir / "bad.png").exists() and (failed.out_dir / "01_rerun.ipynb").exists()

    assert run_notebook(nb, out, {"name": "second"}).ok
    assert sorted(p.name for p in out.iterdir()) == ["01_rerun.ipynb", "done", "metrics.json", "second.png"]
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.old").exists()


@pytest.mark.parametrize("name", ["out é 日本", 'out "quoted" \\ back'])
def test_the_published_notebook_names_its_folder_whatever_characters_it_has(tmp_path, name):
    """papermill writes the injected out_dir as a Python literal (é as \\xe9): the staging folder stayed there."""
    nb = write_notebook(tmp_path / "01_names.ipynb", FIGURE_THEN_METRICS)
    nb.write_text(nb.read_text().replace("out_dir = None", "out_dir = None\\nname = 'first'"))
    out = tmp_path / name
    assert run_notebook(nb, out, {"name": "first"}).ok
    executed = nbformat.read(str(out / "01_names.ipynb"), as_version=4)
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    namespace = {}
    exec(injected.source, namespace)  # the cell as the kernel read it
    assert namespace["out_dir"] == str(out)
    assert f"out_dir {out}" in executed.cells[-1].outputs[0]["text"]
    assert ".partial" not in (out / "01_names.ipynb").read_text(encoding="utf-8")


def test_notebooks_a_run_wrote_inside_its_folder_name_the_published_folder_too(tmp_path):
    """Notebook 06's grid runs are notebooks inside its out_dir: they kept naming the staging folder
    (<out>.partial/grid/...), gone once the run was published."""
    body = GOOD + """
import nbformat
from nbformat.v4 import new_code_cell, new_notebook
inner = pathlib.Path(out_dir) / "grid" / "run_a"
inner.mkdir(parents=True)
nbformat.write(new_notebook(cells=[new_code_cell(f"print({str(inner)!r})")]), str(inner / "run.ipynb"))
(inner / "other.ipynb").write_bytes(b"\\xff not UTF-8 " + str(inner).encode())  # not a notebook: bytes kept"""
    out = tmp_path / "out"
    assert run_notebook(write_notebook(tmp_path / "06_outer.ipynb", body), out, {}).ok
    inner_out = out / "grid" / "run_a"
    inner = nbformat.read(str(inner_out / "run.ipynb"), as_version=4)
    assert inner.cells[0].source == f"print({str(inner_out)!r})"
    assert (out / "grid" / "run_a" / "other.ipynb").read_bytes() == b"\xff not UTF-8 " + str(inner_out).encode()


def test_a_previous_run_that_cannot_be_moved_aside_fails_the_run_without_raising(tmp_path, monkeypatch):
    """On Windows a file held open (a figure in a viewer) keeps rmtree from removing <out>.old, and the rename
    that follows raised out of run_notebook, which promises to report failures; the new run is kept."""
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    out = tmp_path / "out"
    assert run_notebook(nb, out, {"seed": 0}).ok
    (tmp_path / "out.old").mkdir()
    (tmp_path / "out.old" / "held.png").write_bytes(b"open elsewhere")
    # rmtree, in course.py only (papermill and Jupyter use it too), removes no .old folder, as a held file stops it
    import shutil
    import types

    keeps_old = types.SimpleNamespace(**{**vars(shutil), "rmtree": lambda path, *args, **kwargs: None if str(
        path).endswith(".old") else shutil.rmtree(path, *args, **kwargs)})
    monkeypatch.setattr(course, "shutil", keeps_old)
    result = run_notebook(nb, out, {"seed": 1})
    assert not result.ok and f"could not be put in place of {out}" in result.error
    assert "close any program using files in" in result.error
    assert json.loads((result.out_dir / "metrics.json").read_text())["metrics"] == {"dice": 1.5}  # the new run, kept
    assert json.loads((out / "metrics.json").read_text())["metrics"] == {"dice": 0.5}  # the previous one, untouched


def test_a_full_disk_while_publishing_says_to_free_space_and_keeps_the_notebook_whole(tmp_path, full_disk):
    """The executed notebook was rewritten in place (its paths pointed at the published folder): a full disk left
    it empty; and the advice to close programs holding files open is no help there."""
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    full_disk()  # this process's writes only: the kernel writes its metrics.json as usual
    result = run_notebook(nb, tmp_path / "out", {"seed": 0})
    assert not result.ok and "the disk is full" in result.error and "free some space and run it again" in result.error
    assert "close any program" not in result.error and result.out_dir == tmp_path / "out.partial"
    assert nbformat.read(str(result.out_dir / "01_good.ipynb"), as_version=4).cells  # whole, not emptied


def test_failing_notebook_is_reported_with_its_cell(tmp_path):
    nb = write_notebook(tmp_path / "02_bad.ipynb", "raise RuntimeError('boom in cell two')")
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"})
    assert not result.ok
    assert "RuntimeError" in result.error and "boom in cell two" in result.error
    # the cell's execution count, as shown in the executed copy (parameters, injected parameters, this one)
    assert result.error.startswith("cell [3] raised RuntimeError")
    assert not (result.out_dir / "done").exists() and not (tmp_path / "out").exists()
    assert "FAIL" in headline_table([result])


def test_notebook_without_metrics_counts_as_failed(tmp_path):
    nb = write_notebook(tmp_path / "03_silent.ipynb", "x = 1")
    result = run_notebook(nb, tmp_path / "out", {})
    assert not result.ok and "metrics.json" in result.error
    assert not (result.out_dir / course.DONE).exists()  # the marker says: a whole successful run
    # ... also where an earlier run left its metrics.json: they are not this run's
    assert run_notebook(write_notebook(tmp_path / "01_good.ipynb", GOOD), tmp_path / "again", {"seed": 0}).ok
    silent_again = run_notebook(write_notebook(tmp_path / "01_good.ipynb", "x = 1"), tmp_path / "again", {})
    assert not silent_again.ok and "metrics.json" in silent_again.error


def test_malformed_metrics_json_is_a_failed_run_not_a_crash(tmp_path):
    body = "import pathlib\npathlib.Path(out_dir, 'metrics.json').write_text('{\"metrics\": {\"dice\": 0.')"
    result = run_notebook(write_notebook(tmp_path / "01_cut.ipynb", body), tmp_path / "out", {})
    assert not result.ok and "metrics.json is not valid JSON" in result.error
    assert not (tmp_path / "out").exists()  # nothing published


def test_command_line_profile_and_device(monkeypatch, capsys):
    from mtlearn.course import main

    def no_notebook(*args, **kwargs):
        raise AssertionError("a notebook started despite a bad argument")

    monkeypatch.setattr(course, "run_notebook", no_notebook)
    monkeypatch.setenv("MTLEARN_PROFILE", "bogus")  # the default profile comes from the environment ...
    with pytest.raises(SystemExit):
        main(["--only", "00"])
    assert "unknown profile 'bogus' (from $MTLEARN_PROFILE)" in capsys.readouterr().err
    monkeypatch.delenv("MTLEARN_PROFILE")
    with pytest.raises(SystemExit):  # named as the option it came from, not as a notebook's parameter
        main(["--profile", "fast", "--only", "00"])
    assert "unknown profile 'fast' (from the --profile option)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # ... and a misspelt device fails before any notebook starts
        main(["--device", "cdua", "--only", "00"])
    assert "unknown device 'cdua'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # ... and so does a bad seed, with the notebooks' own message
        main(["--seed", "-1", "--only", "00"])
    assert "seed must be a non-negative integer below 2**32, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bare --only (an empty shell variable) ran every notebook
        main(["--only"])
    assert "--only: expected at least one argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # `--only 00 99` ran 00 alone and said nothing of 99
        main(["--only", "00", "99"])
    assert "no notebook matches ['99']; available: ['00_setup_and_data'" in capsys.readouterr().err


def test_command_line_names_an_out_that_is_a_file(tmp_path, monkeypatch, capsys):
    from mtlearn.course import main

    monkeypatch.setattr(course, "run_notebook", lambda *a, **k: pytest.fail("a notebook started"))
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(SystemExit):  # it was a NotADirectoryError traceback from the first notebook
        main(["--profile", "smoke", "--only", "00", "--out", str(tmp_path / "results")])
    said = capsys.readouterr().err
    assert f"--out {tmp_path / 'results'} cannot be a folder: {tmp_path / 'results'} is a file" in said


def test_command_line_takes_an_out_in_the_home_folder_and_says_a_held_notebook_was_not_run(tmp_path, monkeypatch,
                                                                                          capsys):
    """--out=~/runs (the shell leaves "~" after "=" as it is) was checked as ./~/runs; and a notebook another run
    was writing was reported as failed, like one whose cell raised."""
    from mtlearn.course import NotebookResult, main

    seen = []

    def held(nb, out_dir, parameters, cell_timeout):
        seen.append(out_dir)
        return NotebookResult(nb.stem, out_dir, False, 0.0, f"another run is writing {out_dir} (process 1 on x)",
                              busy=True)

    monkeypatch.setattr(course, "run_notebook", held)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["--profile", "smoke", "--only", "00", "--out=~/runs"]) == 1  # this pass did not run it
    assert seen == [tmp_path / "runs" / seen[0].parent.name / "smoke"] and not (tmp_path / "~").exists()
    said = capsys.readouterr()
    assert f"{seen[0].parent.name} not run: another run is writing" in said.err + said.out
    assert any(line.startswith(seen[0].parent.name) and " BUSY " in line for line in said.out.splitlines())
    with pytest.raises(SystemExit) as exit_:  # a user who does not exist: a usage error, not a traceback
        main(["--profile", "smoke", "--only", "00", "--out=~no_such_user_here/runs"])
    assert exit_.value.code == 2 and "--out ~no_such_user_here/" in capsys.readouterr().err


def test_the_repository_notebooks_are_the_course_in_order():
    """The seven the README lists, in course order (a renamed or lost notebook would drop out of the run)."""
    assert [p.name for p in course_notebooks()] == [
        "00_setup_and_data.ipynb", "01_resformer_mtl.ipynb", "02_loss_weighting.ipynb", "03_ums_rep_finetuning.ipynb",
        "04_disentanglement.ipynb", "05_attribution.ipynb", "06_experiments.ipynb"]


def test_notebooks_are_found_in_a_clone_when_the_package_came_from_pip(tmp_path, monkeypatch):
    """A pip install has no notebooks/ beside the package: look in the working directory's."""
    monkeypatch.setattr(course, "NOTEBOOK_DIR", tmp_path / "site-packages" / "notebooks")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="clone it and run from the clone"):
        course_notebooks()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_b.ipynb").write_text("{}")
    (tmp_path / "notebooks" / "00_a.ipynb").write_text("{}")
    assert [p.name for p in course_notebooks()] == ["00_a.ipynb", "01_b.ipynb"]
    monkeypatch.chdir(tmp_path / "notebooks")  # a notebook's own folder (Colab after %cd)
    assert [p.name for p in course_notebooks()] == ["00_a.ipynb", "01_b.ipynb"]


def test_seed_is_passed_only_when_given():
    assert notebook_parameters("course") == {"profile": "course", "device": "auto"}  # notebooks keep their seeds
    assert notebook_parameters("smoke", 3, "cpu") == {"profile": "smoke", "device": "cpu", "seed": 3}
    assert notebook_parameters("smoke", 0)["seed"] == 0  # --seed 0 is a seed, not "each notebook's own"


def test_notebooks_run_in_their_own_folder(tmp_path):
    """A notebook opens files relative to notebooks/ (as in Jupyter), wherever the runner was started."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    body = GOOD.replace('"dice": 0.5 + seed', '"cwd": __import__("os").getcwd()')
    result = run_notebook(write_notebook(folder / "01_cwd.ipynb", body), tmp_path / "out", {"seed": 0})
    assert result.ok, result.error
    assert result.metrics["metrics"]["cwd"] == str(folder.resolve())


def test_an_interruption_between_the_renames_keeps_the_previous_run(tmp_path, monkeypatch):
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    out = tmp_path / "out"
    assert run_notebook(nb, out, {"seed": 1}).ok
    real_rename = Path.rename

    def interrupted(self, target):
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt  # stopped after the old run was set aside, before the new one moved in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_notebook(nb, out, {"seed": 2})
    monkeypatch.undo()
    kept = tmp_path / "out.old"
    assert json.loads((kept / "metrics.json").read_text())["metrics"] == {"dice": 1.5} and (kept / "done").exists()


def test_a_run_left_beside_an_earlier_interrupted_one_is_replaced(tmp_path):
    """An interruption during the last clean-up leaves both `out` and `out.old`: the next run must still publish
    (renaming `out` onto a non-empty `out.old` fails with "Directory not empty")."""
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    out = tmp_path / "out"
    assert run_notebook(nb, out, {"seed": 1}).ok
    (tmp_path / "out.old").mkdir()
    (tmp_path / "out.old" / "metrics.json").write_text("{}")
    result = run_notebook(nb, out, {"seed": 2})
    assert result.ok, result.error
    assert json.loads((out / "metrics.json").read_text())["metrics"] == {"dice": 2.5}
    assert not (tmp_path / "out.old").exists()


def test_course_notebooks_are_only_the_numbered_ones(tmp_path):
    for name in ("01_b.ipynb", "00_a.ipynb", "scratch.ipynb", "1_x.ipynb", "02_c.py"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in course_notebooks(tmp_path)] == ["00_a.ipynb", "01_b.ipynb"]


def test_command_line_runs_each_notebook_into_its_profile_folder_and_fails_on_a_failure(tmp_path, monkeypatch, capsys):
    from mtlearn.course import NotebookResult, main

    calls, timeouts = [], []

    def fake_run(nb, out_dir, parameters, cell_timeout):
        calls.append((nb.stem, out_dir, parameters))
        timeouts.append(cell_timeout)
        ok = not nb.stem.startswith("01")
        return NotebookResult(nb.stem, out_dir, ok, 1.0, "" if ok else "cell [3] raised RuntimeError: boom",
                              {"metrics": {"dice": 0.5}} if ok else None)

    monkeypatch.setattr(course, "run_notebook", fake_run)
    monkeypatch.delenv("MTLEARN_PROFILE", raising=False)
    out = tmp_path / "outputs"
    assert main(["--profile", "smoke", "--seed", "7", "--device", "cpu", "--out", str(out), "--only", "00", "01"]) == 1
    names = [p.stem for p in course_notebooks()]
    expected = [n for n in names if n.startswith(("00", "01"))]
    assert [c[0] for c in calls] == expected
    assert [c[1] for c in calls] == [out / n / "smoke" for n in expected]
    assert all(c[2] == {"profile": "smoke", "device": "cpu", "seed": 7} for c in calls)
    assert timeouts == [3600.0, 3600.0]  # an hour per cell unless asked otherwise
    table = capsys.readouterr().out
    assert any(line.startswith(expected[1]) and "FAIL" in line and "boom" in line for line in table.splitlines())
    calls.clear()
    monkeypatch.setenv("MTLEARN_PROFILE", "paper")  # the default profile: the environment's
    assert main(["--out", str(out), "--only", "00"]) == 0  # every notebook ok
    assert calls == [(expected[0], out / expected[0] / "paper", {"profile": "paper", "device": "auto"})]
    assert timeouts[-1] is None  # paper-scale training cells may run for hours
    assert main(["--out", str(out), "--only", "00", "--cell-timeout", "90"]) == 0 and timeouts[-1] == 90
    assert main(["--out", str(out), "--only", "00", "--cell-timeout", "0"]) == 0 and timeouts[-1] is None


def test_command_line_ctrl_c_says_what_is_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    from mtlearn.course import NotebookResult, main

    def interrupted_in_01(nb, out_dir, parameters, cell_timeout):
        if nb.stem.startswith("01"):
            raise KeyboardInterrupt
        return NotebookResult(nb.stem, out_dir, True, 1.0, "", {"metrics": {"dice": 0.5}})

    monkeypatch.setattr(course, "run_notebook", interrupted_in_01)
    assert main(["--profile", "smoke", "--out", str(tmp_path), "--only", "00", "01", "02"]) == 130
    printed, err = capsys.readouterr()
    assert "dice=0.5" in printed  # the finished notebook's line, not a traceback
    assert f"interrupted during 01_resformer_mtl: the notebooks before it are finished in {tmp_path}" in err
    assert "run the same command with --only 01 02 for the rest" in err


def test_command_line_sigterm_says_what_is_kept_and_how_to_go_on(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's pre-emption) ended the course without a word, exit status 143."""
    import signal

    from mtlearn.course import NotebookResult, main

    def terminated_in_01(nb, out_dir, parameters, cell_timeout):
        if nb.stem.startswith("01"):  # (with no handler, SIGTERM would end the test session)
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "SIGTERM ends the course silently"
            signal.raise_signal(signal.SIGTERM)
        return NotebookResult(nb.stem, out_dir, True, 1.0, "", {"metrics": {"dice": 0.5}})

    monkeypatch.setattr(course, "run_notebook", terminated_in_01)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["--profile", "smoke", "--out", str(tmp_path), "--only", "00", "01", "02"]) == 143
    assert (f"terminated (SIGTERM) during 01_resformer_mtl: the notebooks before it are finished in {tmp_path}"
            in capsys.readouterr().err)
    assert signal.getsignal(signal.SIGTERM) is before


def test_command_line_goes_on_after_a_failing_notebook(tmp_path, monkeypatch, capsys):
    from mtlearn.course import NotebookResult, main

    calls = []

    def fake_run(nb, out_dir, parameters, cell_timeout):
        calls.append(nb.stem)
        ok = not nb.stem.startswith("00")  # the first one fails
        return NotebookResult(nb.stem, out_dir, ok, 1.0, "" if ok else "cell [3] raised RuntimeError: boom",
                              {"metrics": {"dice": 0.5}} if ok else None)

    monkeypatch.setattr(course, "run_notebook", fake_run)
    assert main(["--profile", "smoke", "--out", str(tmp_path), "--only", "00", "01"]) == 1
    assert len(calls) == 2 and calls[0].startswith("00") and calls[1].startswith("01")
    table = capsys.readouterr().out.splitlines()
    assert any(line.startswith(calls[0]) and "FAIL" in line for line in table)
    assert any(line.startswith(calls[1]) and "dice=0.5" in line for line in table)


def test_a_failure_naming_a_path_the_console_cannot_spell_is_printed_escaped(tmp_path, monkeypatch, cp1252_stdout):
    """Windows writes cp1252 to a file or pipe: a report naming a folder of Łukasz's ended in a traceback."""
    from mtlearn.course import NotebookResult, main

    missing = tmp_path / "Łukasz" / "data"
    monkeypatch.setattr(course, "run_notebook", lambda nb, out_dir, parameters, cell_timeout: NotebookResult(
        nb.stem, out_dir, False, 1.0, error=f"no dataset in {missing}"))
    printed = cp1252_stdout()
    assert main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--only", "00"]) == 1
    assert f"no dataset in {tmp_path}{os.sep}\\u0141ukasz" in printed()


def test_command_line_defaults_to_the_course_profile_with_an_hour_per_cell(tmp_path, monkeypatch):
    """The main job with no options: the course profile, its folder, and a cell limit that stops a hung kernel."""
    from mtlearn.course import NotebookResult, main

    calls = []

    def fake_run(nb, out_dir, parameters, cell_timeout):
        calls.append((out_dir, parameters, cell_timeout))
        return NotebookResult(nb.stem, out_dir, True, 1.0, metrics={"metrics": {"dice": 0.5}})

    monkeypatch.setattr(course, "run_notebook", fake_run)
    monkeypatch.delenv("MTLEARN_PROFILE", raising=False)
    assert main(["--out", str(tmp_path), "--only", "00"]) == 0
    [(out_dir, parameters, cell_timeout)] = calls
    assert out_dir.name == "course" and parameters["profile"] == "course" and cell_timeout == 3600


def test_command_line_says_before_the_first_notebook_that_the_paper_profile_wants_a_gpu(tmp_path, monkeypatch, capsys):
    """Each notebook warns inside its kernel, where `python -m mtlearn.course` shows nothing: the paper profile
    on a CPU went straight into weeks of training without a word."""
    from mtlearn.course import NotebookResult, main

    def fake_run(nb, out_dir, parameters, cell_timeout):
        print("notebook ran", file=sys.stderr)
        return NotebookResult(nb.stem, out_dir, True, 1.0, metrics={"metrics": {"dice": 0.5}})

    monkeypatch.setattr(course, "run_notebook", fake_run)
    assert main(["--profile", "paper", "--device", "cpu", "--out", str(tmp_path), "--only", "00"]) == 0
    err = capsys.readouterr().err
    assert err.index("note: the paper profile is sized for a GPU") < err.index("notebook ran")
    assert "or use --profile course on this machine" in err
    assert main(["--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--only", "00"]) == 0
    assert "sized for a GPU" not in capsys.readouterr().err
    import mtlearn.utils

    monkeypatch.setattr(mtlearn.utils, "pick_device", lambda device: torch.device("cuda"))  # what it is sized for
    assert main(["--profile", "paper", "--device", "cuda", "--out", str(tmp_path), "--only", "00"]) == 0
    assert "sized for a GPU" not in capsys.readouterr().err


def test_command_line_only_matches_the_start_of_a_name_and_names_a_miss(tmp_path, monkeypatch, capsys):
    """--only 0 means notebooks 00-09, not 10 too; a filter matching nothing is an error, not an empty green run."""
    from mtlearn.course import NotebookResult, main

    monkeypatch.setattr(course, "course_notebooks", lambda: [tmp_path / f"{n}.ipynb" for n in ("00_a", "01_b", "10_c")])
    ran = []

    def fake_run(nb, out_dir, parameters, cell_timeout):
        ran.append(nb.stem)
        return NotebookResult(nb.stem, out_dir, True, 1.0)

    monkeypatch.setattr(course, "run_notebook", fake_run)
    assert main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--only", "0"]) == 0
    assert ran == ["00_a", "01_b"]
    with pytest.raises(SystemExit) as stop:
        main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--only", "99"])
    assert stop.value.code == 2 and ran == ["00_a", "01_b"]
    assert "no notebook matches ['99']; available: ['00_a', '01_b', '10_c']" in capsys.readouterr().err
    for blank in ("", " "):  # --only "$NB" with NB unset matched every notebook: the whole course
        with pytest.raises(SystemExit) as stop:
            main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--only", "01", blank])
        assert stop.value.code == 2 and ran == ["00_a", "01_b"]
        assert f"no notebook matches [{blank!r}]" in capsys.readouterr().err


def test_command_line_says_where_the_failed_run_and_the_previous_one_are(tmp_path, monkeypatch, capsys):
    """The table only says FAIL: the message says where to look, the failed copy and the run that was kept."""
    from mtlearn.course import NotebookResult, main

    monkeypatch.setattr(course, "course_notebooks", lambda: [tmp_path / "01_b.ipynb"])
    staging = tmp_path / "out" / "01_b" / "smoke.partial"
    staging.mkdir(parents=True)
    (staging / "01_b.ipynb").write_text("{}")  # papermill writes the executed copy as far as it got
    monkeypatch.setattr(course, "run_notebook", lambda nb, out_dir, parameters, cell_timeout: NotebookResult(
        nb.stem, staging, False, 1.0, "cell [3] raised RuntimeError: boom"))
    assert main(["--profile", "smoke", "--out", str(tmp_path / "out")]) == 1
    assert (f"01_b failed: cell [3] raised RuntimeError: boom (executed copy: {staging / '01_b.ipynb'}; the previous "
            f"run, if any, is kept in {tmp_path / 'out' / '01_b' / 'smoke'})") in capsys.readouterr().out
    (staging / "01_b.ipynb").unlink()  # a run that wrote nothing (another run held the folder): no copy named
    assert main(["--profile", "smoke", "--out", str(tmp_path / "out")]) == 1
    assert "01_b failed: cell [3] raised RuntimeError: boom\n" in capsys.readouterr().out


def test_a_second_run_into_the_same_folder_is_refused_and_leaves_the_first_alone(tmp_path):
    """Two runs into one folder (two terminals, a grid beside `make course`): the second deleted the first's
    staging folder under its kernel."""
    import socket

    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "figure.png").write_bytes(b"the first run's")
    lock = tmp_path / "out.lock"
    lock.write_text(f"{os.getppid()} on {socket.gethostname()}\n")  # a live process: this one's parent
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"})
    assert not result.ok and result.out_dir == lock
    assert result.error.startswith(f"another run is writing {tmp_path / 'out'} (process {os.getppid()} on ")
    assert (f"wait for it to finish, or write elsewhere; if no run is writing there (one killed on another "
            f"machine, or on Windows), delete {lock}" in result.error)
    assert (tmp_path / "out.partial" / "figure.png").read_bytes() == b"the first run's" and lock.is_file()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_released(tmp_path):
    """On POSIX; on Windows no process is asked whether it lives (os.kill would end it), so the lock is kept."""
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its process id now names no process (reused only after the kernel's whole range)
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    lock = tmp_path / "out.lock"
    lock.write_text(f"{gone.pid} on {socket.gethostname()}\n")
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"})
    if os.name != "posix":
        assert "another run is writing" in result.error and lock.is_file()
        return
    assert result.ok, result.error
    assert not lock.exists()
    lock.write_text(f"{os.getpid()} on {socket.gethostname()}\n")  # our own id: an earlier process's (a restart)
    assert run_notebook(nb, tmp_path / "out", {"profile": "smoke"}).ok and not lock.exists()
    lock.write_text(f"{gone.pid} on another-machine\n")  # another machine's process cannot be asked: kept
    assert "another run is writing" in run_notebook(nb, tmp_path / "out", {"profile": "smoke"}).error


def test_a_lock_of_another_users_live_process_is_kept(tmp_path, monkeypatch):
    """os.kill(pid, 0) raises PermissionError for another user's process (a shared machine): it lives."""
    import socket

    asked = []

    def not_ours(pid, signal):
        asked.append(pid)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(course.os, "kill", not_ours)
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    lock = tmp_path / "out.lock"
    lock.write_text(f"{os.getpid() + 1} on {socket.gethostname()}\n")
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"})
    assert not result.ok and "another run is writing" in result.error and lock.is_file()
    assert asked == ([os.getpid() + 1] if os.name == "posix" else [])  # the process was asked, and answered


def test_only_runs_the_chosen_notebooks_in_course_order_and_leaves_an_empty_data_root_alone():
    available = [Path(f"{n}.ipynb") for n in ("00_setup", "01_resformer", "02_loss")]
    chosen, unmatched = course.select_notebooks(available, ["02", "00"])
    assert [nb.stem for nb in chosen] == ["00_setup", "02_loss"] and unmatched == []
    # "" is the default data folder: made absolute it would become the caller's folder
    assert course.injected_parameters({"data_root": ""})["data_root"] == ""
    assert course.injected_parameters({"data_root": "data"})["data_root"] == str(Path("data").absolute())
    assert course.injected_parameters({"data_root": Path("data")})["data_root"] == str(Path("data").absolute())


def _take_over_slowly(lock, stale_pid, delay, results):
    """A run that finds `lock` and takes `delay` seconds to learn that process `stale_pid` is gone."""
    from data_fetch import locking

    real = locking._alive
    locking._alive = lambda pid: (time.sleep(delay), pid != stale_pid and real(pid))[1]
    results.put((delay, locking.take_lock(lock)))
    time.sleep(1.5)  # hold it (alive) while the other run looks


@pytest.mark.skipif(os.name != "posix", reason="a stale lock is taken over on POSIX only (see the test above)")
def test_two_runs_finding_one_stale_lock_do_not_both_take_it(tmp_path):
    """The slower one deleted the lock the faster one had just made, and both went on (then the second deleted
    the first's staging folder)."""
    import multiprocessing
    import socket

    lock = tmp_path / "out.lock"
    lock.write_text(f"999999999 on {socket.gethostname()}\n")  # above any pid_max: a killed run's
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    runs = [context.Process(target=_take_over_slowly, args=(lock, 999999999, d, results)) for d in (0.2, 0.8)]
    for run in runs:
        run.start()
    outcomes = dict(results.get(timeout=30) for _ in runs)
    for run in runs:
        run.join(timeout=30)
    assert outcomes[0.2] is None  # the first to learn it took the lock
    assert outcomes[0.8] is not None and outcomes[0.8].startswith("process ")  # the second found it taken
    assert not list(tmp_path.glob("*.takeover"))


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_command_line_names_a_bad_cell_timeout(value, monkeypatch, capsys):
    from mtlearn.course import main

    def no_notebook(*args, **kwargs):
        raise AssertionError("a notebook started despite a bad argument")

    monkeypatch.setattr(course, "run_notebook", no_notebook)
    with pytest.raises(SystemExit):
        main(["--only", "00", "--cell-timeout", value])
    assert "--cell-timeout must be a number of seconds > 0 (0: no limit)" in capsys.readouterr().err


def test_a_cell_past_the_timeout_fails_its_notebook_instead_of_hanging(tmp_path):
    nb = write_notebook(tmp_path / "05_hung.ipynb", "import time\ntime.sleep(120)")
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"}, cell_timeout=3)
    assert not result.ok and result.seconds < 60
    assert result.error.startswith("the cell starting 'import time' ran longer than the cell timeout (3 s)")
    assert "--cell-timeout" in result.error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cell_timeout", [None, 3600])
def test_output_arriving_late_is_not_reported_as_the_cell_timeout(cell_timeout, tmp_path, monkeypatch):
    # nbclient raises the same CellTimeoutError when a finished cell's output is late (papermill's
    # raise_on_iopub_timeout); with no limit set, formatting the limit used to crash run_notebook
    import papermill
    from nbclient.exceptions import CellTimeoutError
    from nbformat.v4 import new_code_cell

    def late_output(*args, **kwargs):
        raise CellTimeoutError.error_from_timeout_and_cell("Timeout waiting for IOPub output", 4,
                                                           new_code_cell("train(model)\nsave(model)"))

    monkeypatch.setattr(papermill, "execute_notebook", late_output)
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"}, cell_timeout=cell_timeout)
    assert not result.ok
    assert result.error == "the cell starting 'train(model)' timed out: Timeout waiting for IOPub output"


def test_a_long_cell_past_the_timeout_is_named_by_its_first_line_not_a_list(tmp_path, monkeypatch):
    """nbclient quotes a cell of 11 lines or more as two Python lists (its first and last 5 lines): the message
    read 'the cell starting "['import time', '', 'import numpy as np', ...]"'."""
    import papermill
    from nbclient.exceptions import CellTimeoutError
    from nbformat.v4 import new_code_cell

    def hung(*args, **kwargs):
        source = "\n".join(["", "import time", "", *[f"step_{i}()" for i in range(12)]])
        raise CellTimeoutError.error_from_timeout_and_cell("Cell execution timed out", 3, new_code_cell(source))

    monkeypatch.setattr(papermill, "execute_notebook", hung)
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"}, cell_timeout=3)
    assert result.error.startswith("the cell starting 'import time' ran longer than the cell timeout (3 s)")

    def hung_on_a_list(*args, **kwargs):  # a short cell that begins with "[" is quoted as written
        raise CellTimeoutError.error_from_timeout_and_cell("Cell execution timed out", 3, new_code_cell("[wait()]"))

    monkeypatch.setattr(papermill, "execute_notebook", hung_on_a_list)
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"}, cell_timeout=3)
    assert result.error.startswith("the cell starting '[wait()]' ran longer")

    def hung_on_numbers(*args, **kwargs):  # a list of numbers, then "...", is no quote of nbclient's
        raise CellTimeoutError.error_from_timeout_and_cell("Cell execution timed out", 3,
                                                           new_code_cell("[1, 2]\n...\n[3]"))

    monkeypatch.setattr(papermill, "execute_notebook", hung_on_numbers)
    result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"}, cell_timeout=3)
    assert result.error.startswith("the cell starting '[1, 2]' ran longer")

    def hung_on(source):
        def execute(*args, **kwargs):
            raise CellTimeoutError.error_from_timeout_and_cell("Cell execution timed out", 3, new_code_cell(source))
        return execute

    for source, first in [("['a']\nx()\ny()", "\"['a']\""),  # not the quote's layout: a list, then code
                          ("[a,\n...\n]", "'[a,'")]:  # the layout, but no Python literal
        monkeypatch.setattr(papermill, "execute_notebook", hung_on(source))
        result = run_notebook(nb, tmp_path / "out", {"profile": "smoke"}, cell_timeout=3)
        assert result.error.startswith(f"the cell starting {first} ran longer"), result.error


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "60"])
def test_run_notebook_refuses_a_bad_cell_timeout(value, tmp_path):
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    with pytest.raises(ValueError, match=r"cell_timeout must be a finite number > 0 \(seconds; None: no limit\), got "):
        run_notebook(nb, tmp_path / "out", {"profile": "smoke"}, cell_timeout=value)


DATA_ROOT = """import json, pathlib
json.dump({"metrics": {}, "data_root": data_root}, open(pathlib.Path(out_dir) / "metrics.json", "w"))"""


def test_a_relative_data_root_means_the_callers_folder_not_the_notebooks(tmp_path, monkeypatch):
    """The kernel runs in the notebook's folder: `--set data_root=data` from the repository root looked in
    notebooks/data, and the fetch command in the error put the data where the next run would not look."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = write_notebook(folder / "01_root.ipynb", DATA_ROOT)
    nb.write_text(nb.read_text().replace("out_dir = None", "out_dir = None\\ndata_root = None"))
    monkeypatch.chdir(tmp_path)
    for given, expected in [("data", str(tmp_path / "data")), (str(tmp_path / "abs"), str(tmp_path / "abs")),
                            (None, None)]:
        result = run_notebook(nb, tmp_path / "out", {"data_root": given})
        assert result.ok, result.error
        assert result.metrics["data_root"] == expected


ENV_ROOT = """import json, os, pathlib
json.dump({"metrics": {}, "env": os.environ.get("MTLEARN_DATA")}, open(pathlib.Path(out_dir) / "metrics.json", "w"))"""


def test_a_relative_mtlearn_data_means_the_callers_folder_too(tmp_path, monkeypatch):
    """`MTLEARN_DATA=data make course` (the default data_root) was read from notebooks/, the kernel's folder."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = write_notebook(folder / "01_env.ipynb", ENV_ROOT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTLEARN_DATA", "data")
    result = run_notebook(nb, tmp_path / "out", {})
    assert result.ok, result.error
    assert result.metrics["env"] == str(tmp_path / "data")
    assert os.environ["MTLEARN_DATA"] == "data"  # the caller's environment is left as it was


def test_a_notebook_that_cannot_start_is_not_reported_as_a_failing_cell(tmp_path):
    nb = write_notebook(tmp_path / "01_good.ipynb", GOOD)
    result = run_notebook(nb, tmp_path / "out", {}, kernel_name="no-such-kernel")
    assert not result.ok
    assert result.error.startswith("the notebook could not run: NoSuchKernel")
    # from a plain install of the wheel: ipykernel is the dev extra's, so the command alone failed too
    assert "python -m pip install ipykernel && python -m ipykernel install --sys-prefix --name python3" in result.error
    missing = run_notebook(tmp_path / "01_missing.ipynb", tmp_path / "out", {})
    assert missing.error.startswith("the notebook could not run: FileNotFoundError")


def test_a_kernel_that_dies_mid_cell_is_named_with_its_cell_and_likely_cause(tmp_path):
    """The kernel process ending (out of memory, a segfault) raises no Python exception: it was reported
    as "the notebook could not run", as if nothing had run."""
    nb = write_notebook(tmp_path / "01_die.ipynb", "import os\nos._exit(1)")
    result = run_notebook(nb, tmp_path / "out", {})
    assert not result.ok
    assert result.error.startswith("the kernel died while the cell starting 'import os' ran (out of memory"), \
        result.error
    assert str(result.out_dir / "01_die.ipynb") in result.error


BAR = """import json, pathlib
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc="loop"):
    pass
json.dump({"metrics": {}}, open(pathlib.Path(out_dir) / "metrics.json", "w"))"""


def test_a_runs_progress_bars_are_saved_at_their_end_for_viewers_without_widgets(tmp_path):
    """tqdm saves a bar's plain-text copy when the bar is made, so GitHub showed every bar at 0 %."""
    nb = write_notebook(tmp_path / "01_bar.ipynb", BAR)
    result = run_notebook(nb, tmp_path / "out", {})
    assert result.ok, result.error
    executed = json.loads((tmp_path / "out" / "01_bar.ipynb").read_text())
    texts = ["".join(output["data"]["text/plain"]) for cell in executed["cells"] for output in cell["outputs"]
             if course.WIDGET_VIEW in output.get("data", {})]
    assert len(texts) == 1 and texts[0].startswith("loop: 100%|██████████| 3/3 [")
    assert course.freeze_progress_bars(tmp_path / "out" / "01_bar.ipynb") == 0  # nothing left to do


def test_freeze_progress_bars_rewrites_only_bars_whose_state_was_saved(tmp_path, monkeypatch, full_disk):
    def bar(prefix, value, most, suffix):
        return {"b": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_p", "IPY_MODEL_f", "IPY_MODEL_s"]}},
                "p": {"model_name": "HTMLModel", "state": {"value": prefix}},
                "f": {"model_name": "FloatProgressModel", "state": {"value": value, "max": most}},
                "s": {"model_name": "HTMLModel", "state": {"value": suffix}}}

    def view(model_id):
        return {"output_type": "display_data", "metadata": {},
                "data": {course.WIDGET_VIEW: {"model_id": model_id}, "text/plain": ["train:   0%|          | 0/4"]}}

    state = bar("train:\u2007\u200750%", 2, 4, "\u20072/4\u2007[00:01&lt;00:01]")
    state["slider"] = {"model_name": "IntSliderModel"}  # a widget that is not a bar
    notebook = {"cells": [{"cell_type": "code", "outputs": [view("b"), view("slider"), view("gone"),
                                                              {"output_type": "stream", "text": "x"}]}],
                "metadata": {"widgets": {course.WIDGET_STATE: {"state": state}}}, "nbformat": 4}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(notebook, indent=1))
    full_disk()  # the notebook is kept as it was (rewritten in place, it was emptied)
    with pytest.raises(OSError, match="the disk is full"):
        course.freeze_progress_bars(path)
    assert json.loads(path.read_text()) == notebook
    monkeypatch.undo()
    assert course.freeze_progress_bars(path) == 1
    outputs = json.loads(path.read_text())["cells"][0]["outputs"]
    assert outputs[0]["data"]["text/plain"] == ["train:  50%|█████     | 2/4 [00:01<00:01]"]
    overshot = bar("train: 100%", 5, 4, " 5/4")  # tqdm's value can pass its total: the bar stays 10 wide
    assert course._bar_text(overshot, "b") == "train: 100%|██████████| 5/4"
    # the bar is full at 100 % only: 29 of 30 fill nine blocks
    assert course._bar_text(bar("train:  97%", 29, 30, " 29/30"), "b") == "train:  97%|█████████ | 29/30"
    assert [o["data"]["text/plain"] for o in outputs[1:3]] == [["train:   0%|          | 0/4"]] * 2  # no bar state
    path.write_text(json.dumps(notebook, indent=1) + "\n")  # a file that ends in a newline keeps it
    assert course.freeze_progress_bars(path) == 1 and path.read_text().endswith("}\n")
    plain = tmp_path / "plain.ipynb"
    plain.write_text(json.dumps({"cells": [], "metadata": {}}))
    before = plain.stat().st_mtime_ns
    assert course.freeze_progress_bars(plain) == 0 and plain.stat().st_mtime_ns == before  # not rewritten
