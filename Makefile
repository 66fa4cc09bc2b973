# Quick start: `make demo` (set up + run the default experiment), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on disk here; GPU users: install your CUDA torch into
# the venv first (see README) and set TORCH_SPEC= to keep it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Wheels the package registries lack (Tutel, built for torch 2.13.0 CPU): installed when the
# folder is there (CI and these machines); GPU users install Tutel from its repository (README).
WHEELS ?= ../shared/wheels

.PHONY: setup demo test figures clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml examples/moepipe_example/pyproject.toml $(wildcard $(WHEELS)/*.whl) | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet -e ".[dev]"
	# the worked plug-in package (README, "Write your own placer"); tests/test_plugins.py runs it
	$(PY) -m pip install --quiet -e examples/moepipe_example
	$(if $(wildcard $(WHEELS)/tutel-*.whl),$(PY) -m pip install --quiet --no-deps $(wildcard $(WHEELS)/tutel-*.whl))
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moepipe-train

test: $(STAMP)
	$(PY) -m pytest -q

# Paper reproductions (issues 7 and 16: figures 1-10): each script runs its small CPU variant from a clean worktree of
# HEAD (experiments/rerun_all.sh: results record a clean commit; commit first), writes
# results/fig_*.json and .csv, and figures/ is redrawn from results/ alone (also
# figures/fig_sim_vs_measured.png from results/bench_sim.json). About 16 minutes on 2 cores.
FIGURE_SCRIPTS := fig_bubble fig_memory fig_interleaved fig_zero_bubble fig_capacity fig_balance fig_placement fig_2bw fig_chimera fig_tp_mesh

figures: $(STAMP)
	PY=$(abspath $(PY)) experiments/rerun_all.sh $(FIGURE_SCRIPTS)

clean:
	rm -rf runs results/*.tmp .pytest_cache
