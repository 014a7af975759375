# raywatch: `make demo` runs the platform's story, `make test` runs the test suite.
# Both create .venv when missing and install raywatch with the pinned set in constraints.txt.
# TORCH_INDEX (optional) is an extra package index for torch, e.g. the CPU-only wheels:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data
TORCH_INDEX ?=
PIP_TORCH_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: install demo test lint clean bench-attribution bench-stacking bench-compression bench-drift bench-replay bench-rate-limit bench-spot bench-scale bench-graduation bench-ingress-memory bench-alert-book bench-no-hop bench bench-tools soak

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_TORCH_INDEX) -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raywatch demo --data $(DATA)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# the reliability suite with the long variant: 60 s of load at 80% of capacity, 5,000 generated requests,
# repeated replica kills (`make test` runs the same suite short)
soak: $(STAMP)
	RAYWATCH_SOAK=1 $(BIN)/python -m pytest -q tests/reliability

# HitRate of the held root-cause attribution for several half-lives, shipped and synthetic entities (about 3 min)
bench-attribution: $(STAMP)
	$(BIN)/python benchmarks/attribution.py --data $(abspath $(DATA))

# SPOT's tail refit against the fit it replaced, on the same tails (a few seconds)
bench-spot: $(STAMP)
	$(BIN)/python benchmarks/spot_refit.py

# the ensemble against the sequence detectors and stacked variants of it, PR-AUC on second halves (about 10 min)
bench-stacking: $(STAMP)
	$(BIN)/python benchmarks/stacking.py --data $(abspath $(DATA))

# trains the three detectors into runs/bench (its own MLflow store) when missing, then compresses them
bench-compression: $(STAMP)
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/compression.py --workdir runs/bench

# drift tests (false-drift rate, detection delay), then the timed retraining loop on a local head
bench-drift: $(STAMP)
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/drift.py
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/drift_loop.py --workdir runs/bench-loop

# the self-retraining loop against a static champion on real entities (every entity in $(DATA); ENTITIES=
# dataset/entity,... for some): benchmarks/results/replay.{json,md}. Mind the time: see the script's docstring.
ENTITIES ?=
bench-replay: $(STAMP)
	$(BIN)/python benchmarks/replay.py --data $(abspath $(DATA)) $(if $(ENTITIES),--entities $(ENTITIES))

# fleets of 10 to 10,000 synthetic machines on one Serve app, beside the same models in process (about
# 25 minutes on 2 cores; SIZES=10,100 for a quick look): benchmarks/results/scale.{json,md}
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py --workdir runs/bench-scale $(if $(SIZES),--sizes $(SIZES))

# a fleet of new machines graduating to their own models: one retraining job each against shared jobs, with
# real Ray jobs (about 3 min): benchmarks/results/graduation.{json,md}
bench-graduation: $(STAMP)
	$(BIN)/python benchmarks/graduation.py --workdir runs/bench-graduation

# what the ingress keeps per machine: live bytes and resident-memory growth of its state, no Serve (about 6 min)
bench-ingress-memory: $(STAMP)
	$(BIN)/python benchmarks/ingress_memory.py

bench-alert-book: $(STAMP)
	$(BIN)/python benchmarks/alert_book.py

# single rows with and without the ingress-to-detector hop (in_ingress), beside echo and the FastAPI peer
bench-no-hop: $(STAMP) bench-tools
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/no_hop.py --workdir $(BENCH_DIR)

# what the shared rate limit costs per check, against the per-replica bucket: benchmarks/results/rate_limit.md
bench-rate-limit: $(STAMP)
	$(BIN)/python benchmarks/rate_limit.py

# serving (Ray Serve in both modes, echo, in-process ONNX Runtime, a FastAPI peer), dynamic batching,
# Ray Train and ASHA benchmarks side by side, then benchmarks/results/README.md; small models are
# trained into $(BENCH_DIR) (its own MLflow store) when missing. About 20 minutes on 2 cores.
BENCH_DIR ?= runs/bench-serve
BENCH_POINT_S ?= 5
bench: $(STAMP) bench-tools
	@mkdir -p $(BENCH_DIR) && date +%s > $(BENCH_DIR)/started
	@echo "== bench 1/6: models on smd/machine-1-6 in $(BENCH_DIR) (reused when present)"
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/serving.py prepare --workdir $(BENCH_DIR)
	@echo "== bench 2/6: serving (in-process ONNX Runtime, FastAPI peer, Serve default and high-throughput)"
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/serving.py run --workdir $(BENCH_DIR) --duration $(BENCH_POINT_S)
	@echo "== bench 3/6: dynamic batching (handle path and HTTP)"
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/batching.py --workdir $(BENCH_DIR) --duration $(BENCH_POINT_S)
	@echo "== bench 4/6: Ray Train, 1 and 2 workers"
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/training.py --workdir $(BENCH_DIR)
	@echo "== bench 5/6: Ray Tune, ASHA against no early stopping"
	RAYWATCH_DATA=$(abspath $(DATA)) $(BIN)/python benchmarks/tune_asha.py --workdir $(BENCH_DIR)
	@echo "== bench 6/6: benchmarks/results/README.md"
	$(BIN)/python benchmarks/report.py --started $$(cat $(BENCH_DIR)/started)

# the load generator of the serving benchmarks: wrk, installed with apt-get when missing (as root)
bench-tools:
	@bash benchmarks/ensure_wrk.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
