"""pyproject.toml and environment.yml describe the same environment, torch's range is safe, and the tests'
warning policy holds."""

import re
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pyproject_requirements(extras: tuple[str, ...] = ("dev",)) -> dict[str, Requirement]:
    """The dependencies, with those of `extras` (environment.yml installs the dev tools too)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in extras for d in project["optional-dependencies"][extra]]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def environment_requirements() -> dict[str, Requirement]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml must have exactly one pip: section"
    reqs = [r for r in pip_lists[0] if not r.startswith("-e")]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def test_environment_yml_matches_pyproject():
    pyproject, environment = pyproject_requirements(), environment_requirements()
    assert sorted(pyproject) == sorted(environment)
    for name, req in pyproject.items():
        assert str(req.specifier) == str(environment[name].specifier), name


def test_python_versions_agree():
    """environment.yml's Python satisfies requires-python, which the README states (tests use tomllib: 3.11)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    (pinned,) = [d.split("=", 1)[1] for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert SpecifierSet(requires).contains(Version(pinned)), (requires, pinned)
    assert SpecifierSet(requires).contains(Version("3.11")), "the tests import tomllib (Python 3.11+)"
    assert f"Python {requires.removeprefix('>=')}+" in (ROOT / "README.md").read_text()


def test_environment_yml_installs_the_package_itself():
    assert "- -e .[dev]" in (ROOT / "environment.yml").read_text()


def test_colab_keeps_its_own_jupyter():
    """The notebooks' first cell installs the bare package on Colab, which pins IPython 7.34 and its own
    ipykernel: requiring newer ones upgraded them under the running runtime (a restart, or a crash)."""
    core = pyproject_requirements(extras=())
    assert not {"ipykernel", "jupyterlab", "nbval", "pytest"} & set(core)
    assert core["ipython"].specifier.contains(Version("7.34.0"))
    assert '-e ".[dev]"' in (ROOT / "Makefile").read_text()  # make course and make test get the tools


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu", "2.9.1", "2.10.0", "2.14.1"])
def test_torch_range_admits_ci_and_colab_versions(version):
    spec = pyproject_requirements()["torch"].specifier
    assert spec.contains(Version(version), prereleases=False), f"torch {version} must satisfy {spec}"


def test_monai_floor_builds_swinunetr_without_img_size():
    """mtl.monai_baseline builds SwinUNETR without img_size, which MONAI required until 1.5
    ("missing a required argument: 'img_size'", Project-MONAI/MONAI#8300)."""
    spec = pyproject_requirements()["monai"].specifier
    assert not spec.contains(Version("1.4.0")) and spec.contains(Version("1.5.0"))


@pytest.mark.parametrize("name", ["torch", "monai", "captum", "papermill", "nbval", "jupyterlab",
                                  "ipywidgets", "matplotlib", "scikit-learn", "pooch", "tqdm", "scikit-image",
                                  # imported by course.py, the notebooks and the tests themselves: declared, not
                                  # left to arrive with papermill, ipykernel and nbval
                                  "nbclient", "nbformat", "ipython", "pyyaml", "packaging"])
def test_course_dependencies_declared(name):
    assert name in pyproject_requirements()


def test_what_only_the_tests_import_is_not_installed_on_colab():
    """The bare package is what the notebooks' first cell installs: test-only tools belong to `dev`."""
    core = pyproject_requirements(extras=())
    assert not {"scikit-image", "nbformat", "pyyaml", "packaging"} & set(core)
    assert {"scikit-image", "nbformat", "pyyaml", "packaging"} <= set(pyproject_requirements())


def test_the_license_is_an_spdx_string_that_new_setuptools_still_builds():
    """The table form `license = {text = "MIT"}` is deprecated; setuptools stops building it in 2027."""
    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").is_file()
    setuptools = Requirement(tomllib.loads(text)["build-system"]["requires"][0])
    assert setuptools.name == "setuptools" and not setuptools.specifier.contains("76.1")  # 77: the SPDX string


def test_make_refuses_a_python_older_than_the_package_before_making_the_venv(tmp_path):
    """macOS's /usr/bin/python3 is 3.9: its venv failed in pip ("No matching distribution found for
    torch==2.13.0") and stayed behind. A stand-in that reports 3.9 runs the Makefile's check."""
    import subprocess
    import sys

    old = tmp_path / "python3.9"
    old.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.version_info = (3, 9, 18); "
                   "sys.version = \"3.9.18\"; exec(sys.argv[1])' \"$2\"\n")
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "-C", str(ROOT), "setup", f"VENV={venv}", f"PYTHON={old}"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert f"mtlearn needs Python 3.11 or newer, but {old} is Python 3.9.18: run make again with " \
           "PYTHON=python3.11" in done.stderr
    assert not venv.exists()


def test_python_m_mtlearn_lists_commands_that_each_answer_help():
    """A bare `python -m mtlearn` said "No module named mtlearn.__main__"; it lists the commands, and each exists."""
    import subprocess
    import sys

    from mtlearn.__main__ import COMMANDS

    assert [command for command, _ in COMMANDS] == [f"python -m {module}" for module in (
        "mtlearn.course", "mtlearn.train", "mtlearn.experiments", "data_fetch", "benchmarks")]
    done = subprocess.run([sys.executable, "-m", "mtlearn"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    for command, _ in COMMANDS:
        assert command in done.stdout
        module = command.removeprefix("python -m ")
        helped = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                                timeout=120)
        assert helped.returncode == 0 and "usage:" in helped.stdout, (command, helped.stderr)


def test_the_package_version_is_pyprojects():
    """mtlearn.__version__ is written beside pyproject.toml's, not read from it: the two must not drift apart."""
    import mtlearn

    assert mtlearn.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_a_bare_make_lists_the_commands_and_installs_nothing(tmp_path):
    """A bare `make` ran its first target, setup: a venv and a several-GB torch install, unasked."""
    import subprocess

    venv = tmp_path / "venv"
    done = subprocess.run(["make", "-C", str(ROOT), f"VENV={venv}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "make course   run the course notebooks" in done.stdout and "make test     run the test suite" in done.stdout
    assert not done.stdout.startswith("#") and not venv.exists()


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    # whole lines: "make test" in ci would also accept "make test-fast" (no slow tests, no notebooks)
    assert re.search(r"^make test\s*(#.*)?$", readme, re.M) and re.search(r"^make test$", ci, re.M)
    assert re.search(r"^make course\s*(#.*)?$", readme, re.M)


def test_tab_completion_offers_the_submodules_and_shortcuts_that_load_on_first_use():
    """`mt.<Tab>` offered only what `import mtlearn` had loaded (count_parameters, ..., and importlib's
    import_module), not build_model, fit or data: the module had __getattr__ but no __dir__."""
    import mtlearn

    listed = dir(mtlearn)
    assert set(mtlearn.__all__) <= set(listed) and {"build_model", "fit", "evaluate", "data", "plots"} <= set(listed)
    assert "import_module" not in listed and {"__version__", "__file__", "__path__", "__all__"} <= set(listed)


def test_every_submodule_loads_from_the_package_attribute():
    """`mt.<module>` works for every module of the package (the lazy list must not fall behind)."""
    import mtlearn

    package = Path(mtlearn.__file__).parent
    modules = sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("_"))
    modules += sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file())
    assert sorted(mtlearn._SUBMODULES) == sorted(modules)
    assert all(getattr(mtlearn, name).__name__ == f"mtlearn.{name}" for name in modules)


@pytest.mark.parametrize("environment, arguments, expected", [
    ({}, [], "-m mtlearn.course --out outputs"),  # the course profile, chosen by mtlearn.course itself
    ({"MTLEARN_PROFILE": "smoke"}, [], "-m mtlearn.course --out outputs"),  # ... which reads MTLEARN_PROFILE
    ({"PROFILE": "foo", "SEED": "3"}, [], "-m mtlearn.course --out outputs"),  # a shell's PROFILE stays out
    ({}, ["PROFILE=smoke", "SEED=1"], "-m mtlearn.course --profile smoke --seed 1 --out outputs"),
])
def test_make_course_leaves_the_default_profile_to_mtlearn_course(environment, arguments, expected):
    """`PROFILE ?= course` always passed --profile course, so MTLEARN_PROFILE never reached the runner."""
    import os
    import subprocess

    done = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), "course", *arguments], capture_output=True,
                          text=True, env=os.environ | environment, check=True)
    line = next(line for line in done.stdout.splitlines() if "mtlearn.course" in line)
    assert " ".join(line.split()).endswith(expected)


def test_make_test_removes_earlier_smoke_outputs_before_the_notebooks_run():
    """Notebook 06 skips grid runs that an earlier `make test` finished, so nbval checked their old results."""
    import subprocess

    lines = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), "test"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    clean = next(i for i, line in enumerate(lines) if line.startswith("rm -rf notebooks/outputs/*/smoke "))
    nbval = next(i for i, line in enumerate(lines) if "--nbval-lax" in line)
    assert clean < nbval


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["mtlearn", "mtlearn.data.real", "data_fetch.download", "benchmarks.bench_models",
                                    "tests.test_utils"])
def test_a_deprecated_call_in_the_projects_own_code_fails_its_test(category, module):
    """pyproject's filterwarnings: the warning attributed to one of the project's modules is an error."""
    with pytest.raises(category):
        warnings.warn_explicit("deprecated", category, "x.py", 1, module=module)


@pytest.mark.parametrize("module", ["numpy.core", "torch.nn", "testsuite", "mtlearnx"])
def test_other_packages_deprecations_stay_theirs(module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("deprecated", DeprecationWarning, "x.py", 1, module=module)
    assert caught == []
