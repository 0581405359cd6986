# Two commands matter (see README):  `make compare`  and  `make test`.
# Both create the virtual environment on first use and install the project from its own files.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the CPU build of torch is enough. On a GPU machine install your CUDA build of torch first.
TORCH_SPEC ?= torch==2.13.0
TASK ?= ie
OUT ?= runs/compare-$(TASK)

.PHONY: setup compare test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,notebooks]"
	touch $@

setup: $(VENV)/.installed

compare: setup
	$(PY) -m helpers compare --model tiny --task $(TASK) --methods freeze,embedding,ptuning_v2,lora --out $(OUT)

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
