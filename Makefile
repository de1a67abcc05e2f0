# Set-up and the two README commands. `make demo` and `make test` create the virtual
# environment on first use (torch 2.13.0 CPU and the TVM pins come from constraints.txt).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmcompile-installed
DEMO   := build/demo

.PHONY: setup demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO)
	$(PY) examples/late_fusion/export.py -o $(DEMO)/late_fusion.onnx
	$(VENV)/bin/mmcompile inspect $(DEMO)/late_fusion.onnx
	$(VENV)/bin/mmcompile optimize $(DEMO)/late_fusion.onnx -o $(DEMO)/late_fusion.opt.onnx --report
	$(VENV)/bin/mmcompile compile $(DEMO)/late_fusion.onnx -o $(DEMO)/late_fusion.mmc --verbose
	$(VENV)/bin/mmcompile run $(DEMO)/late_fusion.mmc --random --repeat 20

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis
