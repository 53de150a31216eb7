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

.PHONY: install test demo demo-rag demo-dpo lint crd bench clean lock

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

# Preference tuning as a chain of two FineTuneJobs: SFT on the instruction sample, then DPO (spec.baseModel.fromJob)
# on its preference pairs, starting from the SFT stage's result; preference accuracy and hallucination before and
# after each stage, and a table of both at the end.
demo-dpo: install
	$(BIN)/finetune run examples/healthcare-sft-stage.yaml examples/healthcare-dpo-stage.yaml --local --demo

lint: install
	$(BIN)/ruff check operator trainer-image tests bench
	$(BIN)/mypy operator/finetune_operator
	$(BIN)/hadolint operator/Dockerfile trainer-image/Dockerfile

# The images' lock files (docs/design.md#supply-chain), which both Dockerfiles install with `pip install
# --require-hashes`: every distribution pinned with ==, with the sha256 of each of its files. One per image, as
# the images install different sets: locks/operator.txt, [project].dependencies; locks/trainer.txt, those and the
# `train` extra; both with the build backend (build-system.requires: the project's wheel is built with
# --no-build-isolation, so nothing unhashed is downloaded for it). Resolved through constraints.txt for the
# images' Python (3.11, Linux x86_64; the hashes are those of every file of each version, so the operator's
# arm64 build verifies too), the trainer's torch from FIND_LINKS: the CPU wheel. Its local label is dropped in the
# lock (torch==2.13.0 matches 2.13.0+cpu, and the release base's CUDA build, which pip keeps: no download, no
# hash to check) and put back for uv, which keeps every version the previous lock has unless pyproject.toml or
# constraints.txt rule it out: `make lock` changes only what must change (LOCK_UPGRADE=1: the newest of all).
# tests/unit/test_lockfile.py checks offline that the locks agree with pyproject.toml and constraints.txt.
LOCK_UPGRADE ?=
LOCK := $(BIN)/uv pip compile -q --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	-c constraints.txt --custom-compile-command "make lock" $(if $(LOCK_UPGRADE),--upgrade)
BUILD_REQUIRES := $(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))"

lock: install
	@test -n "$(FIND_LINKS)" || { echo "make lock: set PIP_FIND_LINKS (or FIND_LINKS) to the folder or page of the CPU torch wheel" >&2; exit 1; }
	mkdir -p locks
	$(BUILD_REQUIRES) | $(LOCK) -o locks/operator.txt pyproject.toml -
	rm -f locks/trainer.txt.tmp
	if [ -f locks/trainer.txt ]; then sed -E 's/^torch==([^ +]+) /torch==\1+cpu /' locks/trainer.txt > locks/trainer.txt.tmp; fi
	$(BUILD_REQUIRES) | $(LOCK) --find-links $(FIND_LINKS) --extra train -o locks/trainer.txt.tmp pyproject.toml -
	@if grep -Eq '^(nvidia-|triton==|cuda-)' locks/trainer.txt.tmp; then \
	  echo "make lock: PyPI's CUDA torch, not the CPU wheel: FIND_LINKS ($(FIND_LINKS)) has no torch+cpu wheel" >&2; exit 1; fi
	sed -E 's/^torch==([^ +]+)\+cpu /torch==\1 /' locks/trainer.txt.tmp > locks/trainer.txt && rm locks/trainer.txt.tmp

# The two images, tagged as the Helm chart's defaults: values.yaml `image.repository` with the chart's
# appVersion (the operator) and `trainer.image` (the trainer); tests/unit/test_images.py checks they agree.
# Build context: the repository root (.dockerignore sends only what the Dockerfiles copy). Needs a Docker
# engine; the classic builder and BuildKit both work, `--network host` because the builds' pip needs the network
# and an engine started with `--bridge=none` (tests/node/docker-engine.sh) has no other.
# BASE_IMAGE empty: each Dockerfile's release base (python:3.11-slim-bookworm, the CUDA pytorch image). Where
# the realnode kit is beside this checkout (machines with no image registry), its offline Debian bookworm +
# python3 base is built and used for both, and the CPU torch wheel of $(FIND_LINKS) is served to the trainer's
# pip on 127.0.0.1 for the duration of its build.
IMAGE_TAG      := 0.1.0
OPERATOR_IMAGE := ghcr.io/finetune-dev/finetune-operator
TRAINER_IMAGE  := ghcr.io/finetune-dev/finetune-trainer
DOCKER         ?= docker
REALNODE       ?= ../shared/realnode
BASE_IMAGE     ?=
ifeq ($(BASE_IMAGE),)
ifneq ($(wildcard $(REALNODE)/build-base-image.sh),)
OFFLINE_BASE := 1
BASE_IMAGE   := local/debian-python:bookworm
endif
endif
# A fixed port: a build argument that changes would make every build redo the trainer's pip install.
WHEELS_PORT    ?= 28417
BUILD := $(DOCKER) build --network host $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE))

.PHONY: images
images:
ifeq ($(OFFLINE_BASE),1)
	$(DOCKER) image inspect $(BASE_IMAGE) >/dev/null 2>&1 || $(DOCKER) load -i "$$(bash $(REALNODE)/build-base-image.sh)"
endif
	$(BUILD) -f operator/Dockerfile -t $(OPERATOR_IMAGE):$(IMAGE_TAG) .
ifneq ($(and $(OFFLINE_BASE),$(FIND_LINKS)),)
	$(PYTHON) -m http.server --bind 127.0.0.1 --directory $(FIND_LINKS) $(WHEELS_PORT) >/dev/null 2>&1 & server=$$!; \
	trap 'kill $$server' EXIT; sleep 0.5; \
	kill -0 $$server 2>/dev/null || { echo "make images: port $(WHEELS_PORT) is taken: set WHEELS_PORT" >&2; exit 1; }; \
	$(BUILD) --build-arg EXTRA_FIND_LINKS=http://127.0.0.1:$(WHEELS_PORT)/ -f trainer-image/Dockerfile -t $(TRAINER_IMAGE):$(IMAGE_TAG) .
else
	$(BUILD) -f trainer-image/Dockerfile -t $(TRAINER_IMAGE):$(IMAGE_TAG) .
endif
	@for image in $(OPERATOR_IMAGE):$(IMAGE_TAG) $(TRAINER_IMAGE):$(IMAGE_TAG); do \
	  echo "$$image: $$($(DOCKER) image inspect -f '{{.Size}}' $$image | awk '{printf "%.0f MB", $$1 / 1e6}')"; done

crd: install
	$(BIN)/finetune crd > crds/finetune.dev_finetunejobs.yaml
	$(BIN)/finetune crd finetunepolicy > crds/finetune.dev_finetunepolicies.yaml
	$(BIN)/finetune crd admission-policy > charts/finetune-operator/templates/admission-policy.yaml

# The benchmarks also need the `bench` extra (TRL, the peer in bench/throughput_bench.py).
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml constraints.txt
	$(UV) -e ".[train,test,bench]"
	touch $@

bench: install $(VENV)/.bench-installed
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
