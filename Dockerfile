# syntax=docker/dockerfile:1
# foundry-local-py server image, CPU (the CUDA build: Dockerfile.cuda).
#   docker build -t foundry-local-py .
#   docker run -p 5273:5273 -e FOUNDRY_LOCAL_API_KEY=change-me foundry-local-py
# The default model (SmolLM2-135M-Instruct) ships inside, so the container serves with no download.
# Inside the container the server listens on 0.0.0.0, so it starts only with an API key
# (FOUNDRY_LOCAL_API_KEY or FOUNDRY_LOCAL_API_KEY_FILE) or the explicit opt-out
# FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE=true (deploy/docker/entrypoint.sh).
# Build arguments: EXTRAS (pip extras, e.g. "onnx,gemma" to add Gemma 3 270M to the image).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
# GGML_NATIVE=OFF: llama.cpp is compiled for any x86-64 with AVX2, not for this build machine's CPU.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=4
RUN python -m venv /opt/foundry-local
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY foundry_local_py ./foundry_local_py
ARG EXTRAS=onnx
# llama-cpp-python compiles here (several minutes).
RUN /opt/foundry-local/bin/pip install ".[${EXTRAS}]"
# The embedded model is present and intact (sha256 checked).
RUN FOUNDRY_LOCAL_CACHE=/tmp/smoke /opt/foundry-local/bin/foundry-local model download smollm2-135m \
    && rm -rf /tmp/smoke

FROM ${PYTHON_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 foundry \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/foundry --shell /usr/sbin/nologin foundry \
    && mkdir -p /var/cache/foundry-local \
    && chown 10001:10001 /var/cache/foundry-local
COPY --from=build /opt/foundry-local /opt/foundry-local
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/foundry-local-entrypoint
ENV PATH=/opt/foundry-local/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/foundry \
    FOUNDRY_LOCAL_CACHE=/var/cache/foundry-local \
    HF_HOME=/var/cache/foundry-local/hf \
    FOUNDRY_LOCAL_HOST=0.0.0.0 \
    FOUNDRY_LOCAL_PORT=5273 \
    FOUNDRY_LOCAL_ALLOWED_HOSTS='["*"]'
USER 10001:10001
WORKDIR /home/foundry
VOLUME ["/var/cache/foundry-local"]
EXPOSE 5273
# /health needs no API key: 200 once the default model is loaded, 503 while it loads.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('FOUNDRY_LOCAL_PORT', '5273'); sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + port + '/health', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["foundry-local-entrypoint"]
CMD ["serve"]
