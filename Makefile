# Two entry points for a fresh machine (see README):  make demo  |  make test
# Both create the virtual environment on first use (CPU torch pinned by constraints/ci.txt).
VENV    ?= .venv
PYTHON  ?= python3
CORES   ?= 2
BIN     := $(abspath $(VENV))/bin
STAMP   := $(VENV)/.installed

$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints/ci.txt -e ".[dev]"
	touch $(STAMP)

.PHONY: install demo test test-fast lint clean slurm-profile
install: $(STAMP)

## Run the whole pipeline on the embedded synthetic default (outputs in results/).
demo: $(STAMP)
	PATH="$(BIN):$$PATH" snakemake --cores $(CORES) --profile profiles/local

## The full test suite, slow end-to-end tests included (what CI runs).
test: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest

## Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest -m "not slow"

## Install profiles/slurm as the profile `slurm`, so that `snakemake --profile slurm` works
## from the repository root: make slurm-profile PARTITION_CPU=cpu PARTITION_GPU=gpu [ACCOUNT=...]
## (or UNET_PIPE_PARTITION_CPU/_GPU in the environment; asked for on a terminal otherwise).
## Uses the unet-pipe on PATH (e.g. the cluster's conda environment), else .venv's.
UNET_PIPE ?= $(shell command -v unet-pipe || echo $(BIN)/unet-pipe)
slurm-profile:
	$(UNET_PIPE) install-profile slurm $(if $(PARTITION_CPU),--partition-cpu $(PARTITION_CPU)) \
	  $(if $(PARTITION_GPU),--partition-gpu $(PARTITION_GPU)) $(if $(ACCOUNT),--account $(ACCOUNT))

## Snakemake's linter, less one advice: it wants every function in common.smk, while each rule file
## holds its own params here (docs/layout.md); any other lint fails the target.
lint: $(STAMP)
	@out=$$(mktemp); PATH="$(BIN):$$PATH" snakemake --lint > "$$out" 2>&1; rc=$$?; \
	if grep -E '^    \* ' "$$out" | grep -qv 'Mixed rules and functions in same snakefile' \
		|| { [ $$rc -ne 0 ] && ! grep -q '^Lints for' "$$out"; }; then \
		cat "$$out"; rm -f "$$out"; exit 1; fi; \
	rm -f "$$out"; echo "snakemake --lint: clean (rule files hold their own params, by design)"

clean:
	rm -rf results .snakemake
