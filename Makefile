# Every install goes through constraints.txt (torch==2.13.0 is the CPU wheel on disk).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# uv resolves and installs in seconds where pip's resolver took minutes; it reads no pip config, so the
# folder of local wheels (the CPU torch wheel here) is passed on from PIP_FIND_LINKS when it is set.
FIND_LINKS ?= $(PIP_FIND_LINKS)
UV     := $(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
PYTEST_ARGS ?=

.PHONY: install test demo lint crd bench clean

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

lint: install
	$(BIN)/ruff check operator trainer-image tests bench
	$(BIN)/mypy operator/finetune_operator

crd: install
	$(BIN)/finetune crd > crds/finetune.dev_finetunejobs.yaml

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
