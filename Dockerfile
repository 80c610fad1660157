# syntax=docker/dockerfile:1
# modelserve's image: `modelserve serve` as a non-root user (uid 10001), the model mounted at /models/model.
#
#   CPU (the default):  docker build -t modelserve:0.1.0 .
#   CUDA:               docker build -t modelserve:0.1.0-cuda \
#                         --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
#   run:                docker run --rm -p 50051:50051 -p 8000:8000 -p 9464:9464 \
#                         -v /path/to/model:/models/model:ro modelserve:0.1.0
#                       (--gpus all for the CUDA image; `... modelserve:0.1.0 serve` alone serves the demo model)
#
# The CUDA image needs no CUDA base image: torch's CUDA wheels bring the CUDA runtime, cuBLAS and cuDNN as
# pip packages, and the NVIDIA container toolkit (or Kubernetes' device plugin) mounts the host's driver.
# BASE_IMAGE stays an argument for a mirror or a digest-pinned base (python:3.11-slim-bookworm@sha256:...).
# tests/test_deploy.py lints this file with hadolint; docker is not needed for that.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment in /opt/modelserve, copied whole into the runtime stage -------------
FROM ${BASE_IMAGE} AS build
# The torch the Makefile pins (its TORCH_SPEC), as the CPU build from PyTorch's CPU index: PyPI's Linux
# torch is the CUDA build, gigabytes of GPU libraries a CPU image would carry for nothing.
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, in a layer of its own: most of the image's bytes, and what changes least often.
# TORCH_SPEC is split into words on purpose (a requirement, then pip options).
RUN python -m venv /opt/modelserve \
    && /opt/modelserve/bin/pip install ${TORCH_SPEC}
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY clients/python clients/python
COPY src src
# The versions the test suite runs with (constraints.txt); torch is already there and is kept.
RUN /opt/modelserve/bin/pip install --constraint constraints.txt ./clients/python .
# The CPU paged decode kernel (src/modelserve/engine/paged_decode_cpu.py), compiled here because the
# runtime stage has no compiler, for the compiler's baseline instructions (MODELSERVE_KERNEL_MARCH empty)
# so that the image runs on any CPU of its architecture; without it the engine would gather instead.
ENV MODELSERVE_KERNEL_DIR=/opt/modelserve/kernels \
    MODELSERVE_KERNEL_MARCH=""
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && /opt/modelserve/bin/python -m modelserve.engine.paged_decode_cpu \
    && test -n "$(ls /opt/modelserve/kernels)"

# --- runtime: the base image, the environment, a user; no compiler, no pip cache, no source tree -------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="modelserve" \
      org.opencontainers.image.description="Serve Hugging Face causal language models over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can check it and fsGroup can match it.
RUN groupadd --system --gid 10001 modelserve \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/modelserve modelserve \
    && mkdir /models
COPY --from=build /opt/modelserve /opt/modelserve
# Everything the process writes lies under $HOME (the demo model and hub caches in ~/.cache) or /tmp (the
# engine core's private ipc:// sockets): Kubernetes mounts emptyDirs there and keeps the root read-only.
# No NVIDIA_VISIBLE_DEVICES=all (as CUDA base images set): on a node whose default runtime is NVIDIA's it
# hands every GPU to a pod that requested none. Which GPUs a container gets is the device plugin's call.
ENV PATH=/opt/modelserve/bin:$PATH \
    MODELSERVE_KERNEL_DIR=/opt/modelserve/kernels \
    MODELSERVE_KERNEL_MARCH="" \
    HOME=/home/modelserve \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/modelserve
# gRPC (GenerationService, grpc.health.v1, reflection), the OpenAI-compatible HTTP API, Prometheus /metrics.
EXPOSE 50051 8000 9464
# No HEALTHCHECK: Kubernetes ignores it and probes grpc.health.v1 natively (deploy/kubernetes/base/),
# and a HEALTHCHECK would start a Python process every interval beside the engine. Under plain docker:
#   python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
#     r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3); \
#     sys.exit(r.status != h.HealthCheckResponse.SERVING)"
# Exec form: modelserve is PID 1 and gets SIGTERM itself, which starts its drain (--grace-s).
ENTRYPOINT ["modelserve"]
CMD ["serve", "--model", "/models/model"]
