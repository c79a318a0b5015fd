# Every target bootstraps .venv itself, so `make demo` and `make test` work on a fresh clone.
#
# torch: on a machine without an NVIDIA driver we pin the CPU-friendly torch==2.13.0;
# with one, pip picks the CUDA build for this platform. Override with
#   make TORCH_SPEC='torch==2.13.0' TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_NVIDIA),torch>=2.4,torch==2.13.0)
TORCH_PIP_ARGS ?=
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench torture clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (torch: $(TORCH_SPEC)); log: $(VENV)/install.log"
	@$(PIP) $(TORCH_PIP_ARGS) '$(TORCH_SPEC)' >$(VENV)/install.log 2>&1 \
		|| { tail -20 $(VENV)/install.log; echo "torch failed to install"; exit 1; }
	@$(PIP) -e '.[dev]' >>$(VENV)/install.log 2>&1 \
		|| { tail -20 $(VENV)/install.log; echo "install failed"; exit 1; }
	@$(PY) -W ignore -c 'import wangend, wangenctl, torch, diffusers, av, jsonrpcserver' \
		|| { echo "install incomplete; see $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	@VENV=$(VENV) bash scripts/demo.sh

test: $(STAMP)
	$(VENV)/bin/ruff check wangend wangenctl tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check wangend wangenctl tests bench
	$(VENV)/bin/ruff format --check wangend wangenctl tests bench

bench: $(STAMP)
	$(PY) bench/control_plane.py
	$(PY) bench/daemon_load.py
	$(PY) bench/job_overhead.py
	$(PY) bench/resume_points.py

# The long crash torture: many jobs, many kill -9s at seeded random moments.
TORTURE_JOBS ?= 40
TORTURE_KILLS ?= 25
TORTURE_SEED ?= 20261124
torture: $(STAMP)
	WANGEN_TORTURE_JOBS=$(TORTURE_JOBS) WANGEN_TORTURE_KILLS=$(TORTURE_KILLS) \
		WANGEN_TORTURE_SEED=$(TORTURE_SEED) \
		$(PY) -m pytest -q -s -p no:cacheprovider tests/reliability/test_crash_torture.py

clean:
	rm -rf .demo .bench .pytest_cache .ruff_cache
