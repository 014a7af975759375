# raywatch: `make demo` runs the platform's story, `make test` runs the test suite.
# Both create .venv when missing and install raywatch with the pinned set in constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(firstword $(wildcard ../shared/data shared/data))

.PHONY: install demo test lint clean bench-compression bench-drift

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raywatch demo --data $(DATA)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# trains the three detectors into runs/bench (its own MLflow store) when missing, then compresses them
bench-compression: $(STAMP)
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/compression.py --workdir runs/bench

# drift tests (false-drift rate, detection delay), then the timed retraining loop on a local head
bench-drift: $(STAMP)
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/drift.py
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/drift_loop.py --workdir runs/bench-loop

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
