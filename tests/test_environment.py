"""pyproject.toml and environment.yml describe the same environment, and torch's range is safe."""

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
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
    assert "- -e ." in (ROOT / "environment.yml").read_text()


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu", "2.9.1", "2.10.0", "2.14.1"])
def test_torch_range_admits_ci_and_colab_versions(version):
    spec = pyproject_requirements()["torch"].specifier
    assert spec.contains(Version(version), prereleases=False), f"torch {version} must satisfy {spec}"


@pytest.mark.parametrize("name", ["torch", "monai", "captum", "papermill", "nbval", "jupyterlab",
                                  "ipywidgets", "matplotlib", "scikit-learn", "pooch", "tqdm", "scikit-image"])
def test_course_dependencies_declared(name):
    assert name in pyproject_requirements()


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
    assert "make course" in readme


def test_every_submodule_loads_from_the_package_attribute():
    """`mt.<module>` works for every module of the package (the lazy list must not fall behind)."""
    import mtlearn

    package = Path(mtlearn.__file__).parent
    modules = sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("_"))
    modules += sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file())
    assert sorted(mtlearn._SUBMODULES) == sorted(modules)
    assert all(getattr(mtlearn, name).__name__ == f"mtlearn.{name}" for name in modules)
