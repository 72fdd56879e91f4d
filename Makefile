# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs everything on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vitcompact-installed
OUT ?= runs/demo

.PHONY: setup demo test bench-latency bench-compact bench-accuracy clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision pinned to the pair that installs from this machine kind's local files
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/vitcompact demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Benchmarks (not tests): they print measured figures; see README "Results".
bench-latency: $(STAMP)
	$(BIN)/python -m vitcompact.bench.suite_latency

bench-compact: $(STAMP)
	$(BIN)/python -m vitcompact.bench.compact_latency

bench-accuracy: $(STAMP)
	$(BIN)/python -m vitcompact.bench.accuracy_fashion --patch-size 7 --limit 12000 --dense-epochs 10 \
		--lr 1e-3 --prune-lr 5e-4 --states 2 --epochs-per-state 1 --finetune-epochs 1 \
		--lambda-schedule exp_custom_exponents --lambda-exponent 5 --lambda-max 10 --lambda-base 10 \
		--seeds 0,1,2 --batch-size 128 --out runs/accuracy_fashion

clean:
	rm -rf build dist *.egg-info runs
