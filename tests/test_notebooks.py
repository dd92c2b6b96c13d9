"""The notebook contract (README, "The notebooks"), checked on every committed notebook.

nbval runs the notebooks; these tests check what running them cannot: the shape of each notebook
(setup cell first, one `parameters` cell of literals, goal, summary, exercises, metrics written
last) and that the committed copies carry the outputs of a real `course` run.
"""
import ast
import json
import re
from pathlib import Path

import pytest

from mtlearn.notebook import PROFILES

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
COMMON_PARAMETERS = {"profile", "dataset", "data_root", "seed", "device", "out_dir"}


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def outputs_text(cell: dict) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append("".join(output.get("text", "")))
        parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def test_the_course_has_its_numbered_notebooks():
    numbers = [path.name[:2] for path in NOTEBOOKS]
    assert numbers == [f"{i:02d}" for i in range(len(numbers))], numbers
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_validates_under_nbformat_with_a_unique_id_per_cell(path):
    """A cell added by hand without an id made every reader of the notebook warn MissingIDFieldWarning,
    which future nbformat versions will make an error."""
    import warnings

    import nbformat
    from nbformat.warnings import DuplicateCellId, MissingIDFieldWarning

    with warnings.catch_warnings():
        for warning in (MissingIDFieldWarning, DuplicateCellId):  # only warnings today
            warnings.simplefilter("error", warning)
        notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        nbformat.validate(notebook)
    ids = [cell.get("id") for cell in notebook.cells]
    assert None not in ids and len(set(ids)) == len(ids)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_comes_first_and_installs_only_when_needed(path):
    first = load(path)[0]
    assert first["cell_type"] == "code"
    text = source(first)
    assert "find_spec(\"mtlearn\") is None" in text and "pip" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_literals(path):
    cells = [c for c in load(path) if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, "exactly one cell must be tagged `parameters`"
    values = {}
    for statement in ast.parse(source(cells[0])).body:
        assert isinstance(statement, ast.Assign) and len(statement.targets) == 1, ast.unparse(statement)
        values[statement.targets[0].id] = ast.literal_eval(statement.value)  # raises unless a literal
    assert COMMON_PARAMETERS <= set(values), COMMON_PARAMETERS - set(values)
    assert values["profile"] is None or values["profile"] in PROFILES
    assert values["device"] == "auto" and values["dataset"] == "synthetic"
    # papermill reads the cell with its own line parser (the grid's --set and `papermill --help-notebook`
    # ask it); brackets in a comment made it skip the line, so the grid refused `dataset` in notebook 06
    import papermill

    assert sorted(papermill.inspect_notebook(str(path))) == sorted(values)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_goal_summary_exercises_and_metrics_at_the_end(path):
    cells = load(path)
    assert any("**Goal.**" in source(c) for c in cells[:3] if c["cell_type"] == "markdown")
    markdown = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    assert "## Summary" in markdown and "## Exercises" in markdown
    assert "run.finish(" in source([c for c in cells if c["cell_type"] == "code"][-1])
    assert any(source(c).startswith("# NBVAL_CHECK_OUTPUT") for c in cells), "no cell is marked for output checking"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_come_from_a_course_run(path):
    cells = [c for c in load(path) if c["cell_type"] == "code"]
    printed = "\n".join(outputs_text(c) for c in cells)
    started = re.findall(r"profile=(\w+)", printed)
    assert started and started[0] == "course", f"{path.name} was last executed in profile {started[:1]}, not course"
    assert re.search(r"\[course\] finished on \w+ in \d+ s", printed), "device and wall time are not printed"
    figures = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
    assert figures >= 1, f"{path.name} shows no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_progress_bars_show_where_they_ended(path, tmp_path):
    """Viewers without widgets (GitHub) show a bar's plain-text copy, which tqdm writes at 0 %."""
    from mtlearn.course import freeze_progress_bars

    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    assert freeze_progress_bars(copy) == 0, f"{path.name} shows progress bars at their start; run " \
        f"mtlearn.course.freeze_progress_bars on it"


@pytest.mark.slow
def test_notebook_04_runs_its_ultrasound_section_on_bus_uclm_flags(tmp_path):
    """nbval runs every notebook on the synthetic data; this runs notebook 04's real-data branch
    (dataset="bus_uclm": section 4 on the recorded Doppler/caliper flags) on a fixture with
    BUS-UCLM's layout, in the smoke profile (about a minute)."""
    from mtlearn.course import run_notebook
    from tests.fixtures_real import make_bus_uclm

    make_bus_uclm(tmp_path / "data" / "bus_uclm", patients=40)
    result = run_notebook(NOTEBOOK_DIR / "04_disentanglement.ipynb", tmp_path / "out",
                          {"profile": "smoke", "dataset": "bus_uclm", "data_root": str(tmp_path / "data")})
    assert result.ok, result.error
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["dataset"] == "bus_uclm" and record["profile"] == "smoke"
    ultrasound = record["metrics"]["ultrasound"]
    assert set(ultrasound) == {"shared", "disentangle"}
    for metrics in ultrasound.values():
        assert {"class_acc_test_artifact", "class_acc_test_no_artifact", "probe_artifact_a",
                "probe_artifact_a_normal", "probe_artifact_a_benign", "probe_artifact_a_malignant"} <= set(metrics)
        assert "class_acc_reversed" not in metrics  # the synthetic test sets do not exist for real data
    assert (tmp_path / "out" / "ultrasound_accuracy.png").is_file()


@pytest.mark.slow
def test_notebook_00_records_a_real_dataset_under_its_own_name(tmp_path):
    """Its metrics.json said "dataset": "busi" beside the synthetic set's item and class counts."""
    import warnings

    from mtlearn.course import run_notebook
    from mtlearn.data import load_dataset
    from tests.fixtures_real import make_busi

    make_busi(tmp_path / "data" / "busi")
    result = run_notebook(NOTEBOOK_DIR / "00_setup_and_data.ipynb", tmp_path / "out",
                          {"profile": "smoke", "dataset": "busi", "data_root": str(tmp_path / "data")})
    assert result.ok, result.error
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's quirks, said by the notebook
        busi = load_dataset("busi", root=tmp_path / "data" / "busi", split="train", image_size=32)
    assert metrics["busi"]["train_items"] == len(busi)
    assert metrics["busi"]["class_counts"] == {"benign": 7, "malignant": 7, "normal": 7}
    assert set(metrics["synthetic"]) >= {"train_items", "class_counts", "artifact_phi"}


@pytest.mark.slow
def test_notebook_03_looks_for_the_representations_datasets_before_it_loads_busi(tmp_path):
    """With BUSI fetched alone, the set-up cell passed and the data cell failed a minute later on BUS-BRA; and
    bus_bra itself was refused without the reason (it is used, inside dataset='busi')."""
    from mtlearn.course import run_notebook
    from tests.fixtures_real import make_busi

    make_busi(tmp_path / "data" / "busi")
    notebook = NOTEBOOK_DIR / "03_ums_rep_finetuning.ipynb"
    result = run_notebook(notebook, tmp_path / "out", {"profile": "smoke", "dataset": "busi",
                                                       "data_root": str(tmp_path / "data")})
    assert not result.ok and "dataset 'bus_bra' was not found in" in result.error
    assert "python -m data_fetch bus_bra --dest" in result.error
    assert "load_strategy_data" not in result.error  # the set-up cell's check, not the data cell's failure
    result = run_notebook(notebook, tmp_path / "out", {"profile": "smoke", "dataset": "bus_bra"})
    assert "'busi' runs the tasks on BUSI and learns the representation from BUS-BRA and BUS-UCLM" in result.error


@pytest.mark.slow
@pytest.mark.parametrize("model_preset", ["", ["tiny"]])
def test_notebook_01_names_a_model_preset_that_is_no_preset(model_preset, tmp_path):
    """"" (or 0) silently meant the profile's default, a list failed with "unhashable type" (about 10 s)."""
    from mtlearn.course import run_notebook

    result = run_notebook(NOTEBOOK_DIR / "01_resformer_mtl.ipynb", tmp_path / "out",
                          {"profile": "smoke", "model_preset": model_preset})
    assert not result.ok
    assert f"model_preset={model_preset!r} is not a preset; choose one of ('paper', 'course', 'tiny')" in result.error


@pytest.mark.slow
@pytest.mark.parametrize("notebook, parameters, message", [
    # passed the set-up cell's multiple-of-16 check, then failed in the data cell on the synthetic images' minimum
    ("01_resformer_mtl", {"image_size": 16}, "image_size must be a multiple of 16 (the network's stride) and at "
                                             "least 32 (the smallest synthetic image), got 16"),
    # allowed by the comment (0..4), they made partial frozen or full, and the check "frozen < partial < full" False
    *[("03_ums_rep_finetuning", {"partial_stages": n}, f"parameter partial_stages must be an integer >= 1 and <= 3, "
                                                       f"got {n}") for n in (0, 4)],
])
def test_a_knob_value_a_later_cell_cannot_take_is_refused_by_the_set_up_cell(notebook, parameters, message, tmp_path):
    from mtlearn.course import run_notebook

    result = run_notebook(NOTEBOOK_DIR / f"{notebook}.ipynb", tmp_path / "out", {"profile": "smoke", **parameters})
    assert not result.ok and message in result.error
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_notebook_02_refuses_seeds_past_numpys_limit_before_training(tmp_path):
    """The third of three seeds from 2**32 - 2 used to fail only after the first two had trained."""
    from mtlearn.course import run_notebook

    result = run_notebook(NOTEBOOK_DIR / "02_loss_weighting.ipynb", tmp_path / "out",
                          {"profile": "smoke", "seed": 2**32 - 2, "num_seeds": 3})
    assert not result.ok and "the 3 seeds from seed=4294967294 (num_seeds) end at 4294967296" in result.error
    assert "take seed <= 4294967293" in result.error


@pytest.mark.slow
def test_notebook_06_ends_with_an_error_naming_the_failed_grid_runs(tmp_path):
    """A failed grid run is recorded and the others go on, but the notebook must not report success:
    `make course` and CI read its exit status. Its metrics are still written (about 30 s)."""
    from mtlearn.course import run_notebook

    grid_values = {"weightings": [["fixed"], ["bogus"]], "num_seeds": [1]}
    result = run_notebook(NOTEBOOK_DIR / "06_experiments.ipynb", tmp_path / "out",
                          {"profile": "smoke", "grid_values": grid_values})
    assert not result.ok and "RuntimeError: 1 of 2 grid runs failed: " in result.error
    assert "weightings=['bogus']" in result.error and "error.txt" in result.error
    record = json.loads((result.out_dir / "metrics.json").read_text())
    assert (record["metrics"]["ran"], record["metrics"]["failed"]) == (1, 1)
    errors = list((result.out_dir / "grid").rglob("error.txt"))
    assert len(errors) == 1 and "bogus" in errors[0].read_text()
    assert not (tmp_path / "out").exists()  # a failed run never takes the final folder


@pytest.mark.slow
def test_notebook_06_passes_data_root_on_and_keeps_datasets_apart(tmp_path):
    """A grid over datasets: data_root was dropped ("unused here"), so a real dataset was looked for in the
    default folder; given in grid_values, the runs of both datasets were averaged as seeds of one weighting."""
    from mtlearn.course import run_notebook
    from tests.fixtures_real import make_busi

    make_busi(tmp_path / "data" / "busi")
    grid_values = {"weightings": [["fixed"]], "num_seeds": [1], "dataset": ["synthetic", "busi"]}
    result = run_notebook(NOTEBOOK_DIR / "06_experiments.ipynb", tmp_path / "out",
                          {"profile": "smoke", "grid_values": grid_values, "data_root": str(tmp_path / "data")})
    assert result.ok, result.error
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(record["metrics"]["delta_m_by_weighting_smoke_grid"]) == {"busi · fixed", "synthetic · fixed"}


@pytest.mark.slow
def test_notebook_06_stops_at_the_grid_when_no_run_finished(tmp_path):
    """With nothing to tabulate the next cells failed with a pandas KeyError: 'run', far from the cause."""
    from mtlearn.course import run_notebook

    result = run_notebook(NOTEBOOK_DIR / "06_experiments.ipynb", tmp_path / "out",
                          {"profile": "smoke", "grid_values": {"weightings": [["bogus"]], "num_seeds": [1]}})
    assert not result.ok and "RuntimeError: none of the 1 grid runs finished; the first: failed: " in result.error
    assert "bogus" in result.error and "KeyError" not in result.error
