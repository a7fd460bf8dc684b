# syntax=docker/dockerfile:1
#
# vidflow images, one Dockerfile:
#
#   builder  installs vidflow with the `torch` extra and exports EfficientNet-Lite0 to a
#            self-describing ONNX file (class names and preprocessing in its metadata).
#   worker   the Prefect worker that runs the flows (depth-extraction, stream-benchmark): the
#            whole project with every extra (torch, Ray, Prefect, transformers, Lance, Kafka
#            client, the FFmpeg binary of the imageio-ffmpeg wheel), the source tree at
#            /opt/vidflow (prefect.yaml's pull step changes into $VIDFLOW_PROJECT_DIR there).
#   runtime  (default, last stage) the inference service: a separate venv with only the core
#            dependencies, the exported model, a non-root user. No torch, no compilers, no
#            source tree.
#
# Build (BuildKit is needed for the secret and bind mounts; it is the default since Docker 23).
# With no --target the last stage, the inference service, is built:
#   docker build --target runtime -t vidflow-inference .
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:8000:8000 vidflow-inference
# (127.0.0.1: the service has no authentication; a bare -p would publish it on every interface.)
#   docker build --target worker -t vidflow-worker .
# docker-compose.yml builds both (`docker compose build`).
#
# Behind a TLS-inspecting proxy, hand pip a CA bundle; it is mounted only while pip runs and
# never lands in a layer:
#   docker build --secret id=pip_ca,src=/path/to/ca-bundle.pem -t vidflow-inference .
# pip inside the build uses PyPI where it is reachable, through the proxy or not. Where a
# mirror must be used, hand pip its config file the same way (index URL, credentials; mounted
# only while pip runs, never in the image's history; a --build-arg PIP_INDEX_URL is not read):
#   docker build --secret id=pip_conf,src=$HOME/.config/pip/pip.conf -t vidflow-inference .
#
# Without Docker (podman/buildah, as tests/test_container.py does): `--format docker`, else the
# OCI image format drops HEALTHCHECK; and a local base where no registry can be pulled:
#   podman build --format docker --build-arg BASE_IMAGE=localhost/debian:bookworm-slim \
#     --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt --target runtime -t vidflow-inference .
# (ci/podman-setup.sh builds localhost/debian:bookworm-slim with debootstrap.)
#
# Smaller builder and worker: PyPI's torch is a CUDA build of several GB. The ONNX export and the
# CPU worker need only the CPU wheels; where download.pytorch.org is reachable:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ...
#
# CUDA variant: ONNX Runtime's GPU package plus a base image with the CUDA and cuDNN runtime
# libraries of the major version that package was built for (see onnxruntime.ai's CUDA
# requirements table). Stock nvidia/cuda images have no Python; each stage installs python3 and
# python3-venv from the distribution when the base lacks them (Ubuntu 24.04: Python 3.12).
#   docker build \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg ONNXRUNTIME_PACKAGE=onnxruntime-gpu==1.32.0 \
#     -t vidflow-inference:cuda .
#   docker run --rm --gpus all -p 127.0.0.1:50051:50051 -p 127.0.0.1:8000:8000 vidflow-inference:cuda
# `--device auto` (the default) then picks the CUDAExecutionProvider and says so in the log.
# The worker on the same CUDA base (without TORCH_INDEX_URL) gets PyPI's CUDA torch for depth.
#
# Stopping: the server drains calls in flight for up to VIDFLOW_INFERENCE_SHUTDOWN_GRACE_S
# (default 30 s) after SIGTERM; give `docker stop` more than that: `docker stop -t 40 ...`.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------
# What both stages share: Python and an empty virtual environment on PATH.
FROM ${BASE_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Only bases without Python (nvidia/cuda) need this; python:*-slim skips it. Distribution
# packages are not version-pinned (DL3008): the pins would differ per base image and break as
# soon as the archive drops the old version.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# --------------------------------------------------------------------------------------------
FROM base AS builder

# Optional extra package index for torch/torchvision (e.g. the CPU-only wheels).
ARG TORCH_INDEX_URL=""

WORKDIR /src

# Dependencies first, from the project metadata alone, so that this (large) layer is rebuilt
# only when pyproject.toml or constraints.txt change. With no source present setuptools builds
# an empty vidflow distribution; the real one replaces it below. pyproject.toml names README.md
# as the long description: an empty stand-in, so that editing the README does not rebuild
# (and store again) this layer of several GB.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=secret,id=pip_conf,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && touch README.md \
    && pip install --no-cache-dir -c constraints.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[torch]"

COPY . .
# vidflow itself, and its wheel for the runtime stage (which has no source tree).
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=secret,id=pip_conf,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && pip install --no-cache-dir --no-deps --force-reinstall . \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /opt/wheel .

# The EfficientNet-Lite0 ImageNet weights ship in a PyPI wheel: no download happens here.
RUN vidflow export-onnx --cache-dir /tmp/vidflow-export \
        --output /opt/model/efficientnet_lite0.onnx \
    && rm -rf /tmp/vidflow-export

# --------------------------------------------------------------------------------------------
# The Prefect worker: `prefect worker start` polls the vidflow-compose work pool and runs each
# flow run as a child process from the source tree in /opt/vidflow. Not the default stage:
# `--target worker`.
FROM base AS worker

# Optional extra package index for torch/torchvision (e.g. the CPU-only wheels).
ARG TORCH_INDEX_URL=""
ARG VERSION=0.1.0
ARG SOURCE_URL=https://github.com/vidflow/vidflow

LABEL org.opencontainers.image.title="vidflow-worker" \
      org.opencontainers.image.description="vidflow Prefect worker: depth-extraction and stream-benchmark flows on Ray" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# tini as PID 1: forwards SIGTERM to the worker and reaps the flow-run processes (a flow on Ray
# starts and leaves many). /data is where the flows write and ~/.cache holds model weights
# (volumes in docker-compose.yml); made here so that a fresh named volume takes the vidflow
# user as its owner (a folder the image lacks comes out root's, and the worker cannot write).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vidflow \
    && useradd --system --uid 10001 --gid vidflow --home-dir /home/vidflow --create-home \
        --shell /usr/sbin/nologin vidflow \
    && install -d -o vidflow -g vidflow /data /home/vidflow/.cache

WORKDIR /opt/vidflow

# Dependencies first (every extra the flows use), from the project metadata alone, so that this
# (large) layer is rebuilt only when pyproject.toml or constraints.txt change (README.md: an
# empty stand-in, as in the builder).
COPY pyproject.toml constraints.txt ./
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=secret,id=pip_conf,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && touch README.md \
    && pip install --no-cache-dir -c constraints.txt \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[all]"

# The checkout the flow runs execute from (entrypoints, prefect.yaml, relative paths). Editable,
# so that `vidflow` resolves to /opt/vidflow/vidflow and its sample paths to /opt/shared/data
# (mounted by docker-compose.yml). Owned by root: the worker reads it, never writes it.
COPY . .
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=secret,id=pip_conf,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && pip install --no-cache-dir --no-deps --editable . \
    && python -c "import flows.depth_extraction, flows.stream_benchmark, imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())"

ENV VIDFLOW_PROJECT_DIR=/opt/vidflow \
    VIDFLOW_DEPTH_OUTPUT=/data/depth-extraction \
    VIDFLOW_STREAM_OUTPUT_DIR=/data/stream-benchmark \
    PREFECT_HOME=/home/vidflow/.prefect \
    PREFECT_WORKER_WEBSERVER_PORT=8080 \
    HF_HOME=/home/vidflow/.cache/huggingface

USER 10001:10001

# `--with-healthcheck` serves /health on PREFECT_WORKER_WEBSERVER_PORT: 200 while the worker
# polls its work pool, 503 once it has stopped polling.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('PREFECT_WORKER_WEBSERVER_PORT', '8080') + '/health', timeout=5)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "vidflow-compose", "--type", "process", "--with-healthcheck"]

# --------------------------------------------------------------------------------------------
# The inference service; the last stage, so the default of a build without --target.
FROM base AS runtime

# `onnxruntime` (CPU) or `onnxruntime-gpu[==VERSION]` for the CUDA variant (see the top).
ARG ONNXRUNTIME_PACKAGE=onnxruntime
ARG VERSION=0.1.0
# Placeholder: pass the real repository, e.g. --build-arg SOURCE_URL="$(git remote get-url origin)".
ARG SOURCE_URL=https://github.com/vidflow/vidflow

LABEL org.opencontainers.image.title="vidflow-inference" \
      org.opencontainers.image.description="vidflow gRPC image-classification service (EfficientNet-Lite0 on ONNX Runtime)" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 vidflow \
    && useradd --system --uid 10001 --gid vidflow --home-dir /home/vidflow --create-home \
        --shell /usr/sbin/nologin vidflow \
    && install -d -o vidflow -g vidflow /var/cache/vidflow

# The core dependencies only (no extras), from the project metadata alone as in the builder
# (an empty vidflow distribution, replaced below): an edit to the code rebuilds only the small
# layer after. Then vidflow from the builder's wheel: COPY is keyed by content in every engine,
# where a bind mount of the build context was not (podman 4 reused the layer and shipped the
# previous code; BuildKit reinstalled every dependency for a README edit). No source tree
# stays in the image. The last check keeps torch out.
COPY pyproject.toml constraints.txt /tmp/deps/
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=secret,id=pip_conf,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi \
    && touch /tmp/deps/README.md \
    && pip install --no-cache-dir -c /tmp/deps/constraints.txt /tmp/deps \
    && if [ "$ONNXRUNTIME_PACKAGE" != "onnxruntime" ]; then \
        pip uninstall --yes onnxruntime \
        && pip install --no-cache-dir -c /tmp/deps/constraints.txt "$ONNXRUNTIME_PACKAGE"; \
    fi \
    && rm -rf /tmp/deps
COPY --from=builder /opt/wheel/ /tmp/wheel/
RUN pip install --no-cache-dir --no-deps --force-reinstall /tmp/wheel/*.whl \
    && rm -rf /tmp/wheel \
    && python -c "import onnxruntime, grpc, cv2, vidflow.cli" \
    && if python -c "import torch" >/dev/null 2>&1; then \
        echo "torch must not be in the runtime image" >&2; exit 1; \
    fi

COPY --from=builder /opt/model/ /opt/model/

ENV VIDFLOW_INFERENCE_HOST=0.0.0.0 \
    VIDFLOW_INFERENCE_PORT=50051 \
    VIDFLOW_INFERENCE_HTTP_PORT=8000 \
    VIDFLOW_INFERENCE_BACKEND=onnx \
    VIDFLOW_INFERENCE_ONNX_MODEL=/opt/model/efficientnet_lite0.onnx \
    VIDFLOW_INFERENCE_CACHE_DIR=/var/cache/vidflow/models \
    VIDFLOW_LOG_LEVEL=INFO

WORKDIR /home/vidflow
# The `vidflow` user, by number so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# gRPC, then HTTP (/healthz, /readyz, /metrics).
EXPOSE 50051 8000

# /readyz answers 503 while the model loads and warms up and while draining, 200 when serving
# (as gRPC health's NOT_SERVING and SERVING). Over plain HTTP, so it holds with TLS on the gRPC
# port too (a plaintext gRPC probe failed there and the container read unhealthy); on the
# address VIDFLOW_INFERENCE_HOST names where it names one (a pod's own IP), then 127.0.0.1,
# then ::1 (VIDFLOW_INFERENCE_HOST=:: binds IPv6 alone). Exit 1 when not ready
# (Docker reserves 2). The port the server bound is followed (it writes it to the file below),
# so `serve --http-port 9000` or 0 stays healthy.
ENV VIDFLOW_INFERENCE_HTTP_PORT_FILE=/tmp/vidflow-inference-http-port
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-m", "services.inference.ready_probe"]

# Exec form: `vidflow serve` runs as PID 1 and receives SIGTERM directly. The server installs
# its own SIGTERM/SIGINT handlers (set NOT_SERVING, refuse new calls, drain, exit 0) and starts
# no child processes, so no init process (tini) is needed to forward signals or reap zombies.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vidflow"]
CMD ["serve"]
