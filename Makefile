# sae_diff: two commands matter. `make demo` runs the study, `make test` runs the checks.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sae_diff_installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test check lint typecheck pytest demo demo-narrow demo-quick bench clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; torch==2.13.0 (CPU build) first so that
# nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

lint: setup
	$(PY) -m ruff check sae_diff tests benchmarks && $(PY) -m ruff format --check sae_diff tests benchmarks

typecheck: setup
	$(PY) -m mypy

check: lint typecheck

pytest: setup
	@$(PY) -m pytest -n 2 --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

test: setup check pytest

demo: setup
	$(VENV)/bin/sae-diff demo --out demo_output

demo-narrow: setup
	$(VENV)/bin/sae-diff demo --organism narrow --out demo_output_narrow

demo-quick: setup
	$(VENV)/bin/sae-diff demo --quick --out demo_output_quick

# Ratios measured in one run each: kernels and the reference trainer's step (run.py), the data
# pipeline (on the fly ÷ cached, bf16 ÷ fp32 reads), data-parallel training (2 gloo procs ÷ 1) and
# the causal filter (full forward per latent ÷ split forward).
bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/distributed.py --json benchmarks/results/cpu-distributed.json
	$(PY) benchmarks/causal_filter.py

clean:
	rm -rf demo_output demo_output_narrow demo_output_quick .pytest_cache .mypy_cache .ruff_cache
