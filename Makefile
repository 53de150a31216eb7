# Every install goes through constraints.txt (torch==2.13.0 is the CPU wheel on disk).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# uv resolves and installs in seconds where pip's resolver took minutes; it reads no pip config, so the
# folder of local wheels (the CPU torch wheel here) is passed on from PIP_FIND_LINKS when it is set.
FIND_LINKS ?= $(PIP_FIND_LINKS)
# --compile-bytecode: the installed packages' .pyc files are written once, here. Without them every Python
# process compiles what it imports again where PYTHONDONTWRITEBYTECODE is set (as on this project's
# machines): `import peft` (which imports torch and bitsandbytes) took 22 s that way and 8 s with them, in
# every trainer process the tests, the demo and the benchmarks start.
UV     := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
PYTEST_ARGS ?=

.PHONY: install test demo demo-rag lint crd bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q "uv>=0.9,<1"
	$(UV) -e ".[train,test]"
	touch $@

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/finetune run examples/healthcare-lora.yaml --local --demo

# The same demo with retrieval augmentation (spec.retrieval): hallucination with and without retrieval.
demo-rag: install
	$(BIN)/finetune run examples/healthcare-rag.yaml --local --demo

lint: install
	$(BIN)/ruff check operator trainer-image tests bench
	$(BIN)/mypy operator/finetune_operator
	$(BIN)/hadolint operator/Dockerfile trainer-image/Dockerfile

# The two images, tagged as the Helm chart's defaults: values.yaml `image.repository` with the chart's
# appVersion (the operator) and `trainer.image` (the trainer); tests/unit/test_images.py checks they agree.
# Build context: the repository root. Needs a Docker engine (BuildKit); CI has none and does not build them.
IMAGE_TAG      := 0.1.0
OPERATOR_IMAGE := ghcr.io/finetune-dev/finetune-operator
TRAINER_IMAGE  := ghcr.io/finetune-dev/finetune-trainer
DOCKER         ?= docker

.PHONY: images
images:
	$(DOCKER) build -f operator/Dockerfile -t $(OPERATOR_IMAGE):$(IMAGE_TAG) .
	$(DOCKER) build -f trainer-image/Dockerfile -t $(TRAINER_IMAGE):$(IMAGE_TAG) .

crd: install
	$(BIN)/finetune crd > crds/finetune.dev_finetunejobs.yaml

# The benchmarks also need the `bench` extra (TRL, the peer in bench/throughput_bench.py).
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml constraints.txt
	$(UV) -e ".[train,test,bench]"
	touch $@

bench: install $(VENV)/.bench-installed
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
