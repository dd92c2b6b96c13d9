# Two commands matter on a fresh machine; each sets itself up (a virtual environment in .venv):
#   make course   run the course notebooks on the embedded synthetic data into outputs/
#   make test     run the test suite and every notebook under nbval in the smoke profile
# Options: make course PROFILE=smoke SEED=1; make test TORCH_SPEC=torch (your platform's default build);
#          make test TORCH_INDEX=https://download.pytorch.org/whl/cpu (a CPU build on Linux)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
COLAB_WIDGETS := $(VENV)/colab-ipywidgets
# torch first, pinned to the version CI uses. Which *build* pip takes depends on where it looks:
# on Linux, PyPI's torch wheel bundles CUDA (several GB); TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the CPU build instead. (The project's own machines carry a local CPU wheel of 2.13.0.)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# PROFILE empty: $MTLEARN_PROFILE if set, else course (the notebooks' rule). Set with `=`, not `?=`:
# only the command line (make course PROFILE=smoke) overrides them, never a shell variable named PROFILE.
PROFILE =
# SEED empty: each notebook keeps its own default seed (those of the committed runs)
SEED =

.PHONY: help setup course test test-fast bench clean clean-outputs
# A bare `make` prints the commands above; it used to start setup, a venv and a torch install, unasked.
.DEFAULT_GOAL := help

help:
	@sed -n '1,5s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))
	@echo "Also: make setup (the venv alone), make test-fast (the tests not marked slow), make bench (benchmarks/),"
	@echo "      make clean (the venv; outputs/ stays), make clean-outputs"

setup: $(VENV)/.installed

# The Python version is checked before .venv is made: a venv of an older Python fails later, in pip,
# with "No matching distribution found for torch==2.13.0", and stays behind for the next run.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else "mtlearn needs Python 3.11 or newer, \
	but $(PYTHON) is Python " + sys.version.split()[0] + ": run make again with PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

course: setup
	$(PY) -m mtlearn.course $(if $(PROFILE),--profile $(PROFILE)) $(if $(SEED),--seed $(SEED)) --out outputs

# The notebooks' smoke outputs of an earlier run go first: notebook 06 reuses finished grid runs,
# which would then be checked instead of this code's.
test: setup $(COLAB_WIDGETS)/.installed
	$(PY) -m pytest -q tests
	PYTHONPATH=$(COLAB_WIDGETS) $(PY) -c 'import ipywidgets as w, sys; sys.exit(None if w.__version__ == "7.7.1" \
	else f"$(COLAB_WIDGETS) holds no ipywidgets 7.7.1: {w.__version__} came from {w.__file__}; run make clean")'
	PYTHONPATH=$(COLAB_WIDGETS) $(PY) -m pytest -q -p no:cacheprovider tests/test_widgets.py \
		tests/test_attribution.py -k "viewer or explorer"
	rm -rf notebooks/outputs/*/smoke notebooks/outputs/*/smoke.partial notebooks/outputs/*/smoke.old
	MTLEARN_PROFILE=smoke $(PY) -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider notebooks/[0-9][0-9]_*.ipynb

# The explorers are tested again under Colab's ipywidgets (7.7.1, which pyproject.toml allows), beside the
# venv's 8: a folder put first on PYTHONPATH for the tests of the widgets alone
$(COLAB_WIDGETS)/.installed: $(VENV)/.installed
	rm -rf $(COLAB_WIDGETS)
	$(PY) -m pip install --quiet --no-deps --target $(COLAB_WIDGETS) ipywidgets==7.7.1 ipython_genutils==0.2.0
	touch $@

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m benchmarks

# clean keeps outputs/ (a course run's notebooks, figures and metrics take half an hour to make again)
clean:
	rm -rf $(VENV) .pytest_cache

clean-outputs:
	rm -rf outputs
