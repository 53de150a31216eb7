# Every install goes through constraints.txt (torch==2.13.0 is the CPU wheel on disk).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
PYTEST_ARGS ?=

.PHONY: install test demo lint crd bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e ".[train,test]"
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
