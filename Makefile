# megatron-mhc: `make test` and `make pretrain` set up .venv (Python 3.12) on first use.

VENV := .venv
# The first interpreter that really is Python 3.12: plain names (a pyenv shim that is not
# set to 3.12 fails the check and is skipped), then pyenv's installs, then the system's.
PYTHON312 := $(shell for p in python3.12 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12 python3 python; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)

.PHONY: install test
install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 found (tried python3.12, pyenv versions, /usr/bin)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON312) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test,hf]'
	@touch $@

# Lint and format checks first (ruff.toml), then every test.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest tests

# The tiny mHC GPT on the embedded corpus: 2 processes (TP=1, PP=2), CPU or GPU.
# Checkpoints go to runs/gpt_tiny_mhc; a second run resumes from them.
PRETRAIN_CONFIG ?= configs/gpt_tiny_mhc.yaml
NPROC ?= 2
.PHONY: pretrain
pretrain: install
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node $(NPROC) --master-port $${MASTER_PORT:-29500} \
		pretrain_gpt_mhc.py --config $(PRETRAIN_CONFIG) $(ARGS)

# The baseline / HC / mHC comparison of docs/results.md: 9 runs (13 with SEEDS="1 2 3 4"), one
# process each, then the figures (settings as environment variables: tools/reproduce.sh).
.PHONY: reproduce
reproduce: install
	tools/reproduce.sh $(or $(REPRODUCE_OUT),runs/reproduce)
