# minillm: every target sets up what it needs. A fresh clone needs no step before `make test`.
# Override the interpreter or the torch build:  make test PYTHON=python3.12 TORCH='torch==2.13.0'

PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHAPTER ?=
TIMEOUT ?= 60

NBVAL_FLAGS := --nbval --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg

.DEFAULT_GOAL := help
.PHONY: help install test test-fast pdf figures notebooks lab clean corpus student grade llm

help:  ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,book]"
	touch $@

install: $(STAMP)  ## create .venv: torch (pinned by TORCH), then minillm[dev,book] in editable mode

test: $(STAMP)  ## run the unit tests, then every chapter and solutions notebook under nbval
	$(PY) -m pytest -q $(NBVAL_FLAGS) tests chapters

test-fast: $(STAMP)  ## unit tests only, skipping the slow PDF and notebook checks
	$(PY) -m pytest -q -m "not slow" tests

corpus: $(STAMP)  ## summarize the built-in corpus
	$(PY) -m minillm corpus

llm: $(STAMP)  ## tokenizer, pretraining, SFT, DPO and the held-out rates of each stage, on the standard library (~15 min on 2 cores): runs/
	$(PY) -m minillm train --config configs/tiny.toml --force
	$(PY) -m minillm sft --from runs/tiny --config configs/sft-tiny.toml --force
	$(PY) -m minillm dpo-pairs --from runs/sft-tiny --out runs/dpo-pairs.jsonl --limit 256 --force
	$(PY) -m minillm dpo --config configs/dpo-tiny.toml --force
	$(PY) -m minillm eval --checkpoint runs/tiny --checkpoint runs/sft-tiny --checkpoint runs/dpo-tiny \
		--functions-only --show 1 --json runs/eval-test.json

pdf: $(STAMP)  ## build/book.pdf, solutions.pdf and exercises.pdf from the stored notebooks (CHAPTER=04 for one)
	$(PY) book/build.py $(if $(CHAPTER),--chapter $(CHAPTER))

student: $(STAMP)  ## write build/student/: the chapters, and exercise notebooks with the solutions stripped
	$(PY) book/student.py

grade: $(STAMP)  ## grade exercise notebooks: make grade SUBMISSIONS=dir [TIMEOUT=60]
	@test -n "$(SUBMISSIONS)" || { echo "make grade: set SUBMISSIONS to the folder that holds one folder per student, e.g. make grade SUBMISSIONS=submissions" >&2; exit 2; }
	$(PY) book/grade.py "$(SUBMISSIONS)" --timeout $(TIMEOUT) --out build/grades

figures: $(STAMP)  ## regenerate every figure under figures/
	$(PY) book/figures.py

notebooks: $(STAMP)  ## re-execute every chapter and solutions notebook in place, in order
	$(PY) book/execute.py $(if $(CHAPTER),--chapter $(CHAPTER))

lab: $(STAMP)  ## open JupyterLab on chapters/
	$(VENV)/bin/jupyter lab chapters

clean:  ## remove build outputs (keeps .venv; `rm -rf .venv` for a full reset)
	rm -rf build .pytest_cache .hypothesis
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
