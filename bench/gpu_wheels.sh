#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on a lent GPU machine, which has python 3.12 and torch but no
# network: this project's dependencies that its image lacks or holds at other versions, fetched here
# into .git-ignored .whl (add `/.whl/` to .git/info/exclude once). Versions as in this venv.
set -eu
rm -rf .whl && mkdir -p .whl
${PY:-.venv/bin/python} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 huggingface_hub==2.4.0 tokenizers==0.23.3 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 \
    grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
    googleapis-common-protos==1.76.0 pyzmq==27.3.0 msgspec==0.23.0 starlette==1.10.0 uvicorn==0.54.0 \
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-exporter-prometheus==0.66b2 \
    opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \
    opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
    pytest==9.2.0 pluggy==1.7.0 pytest-asyncio==1.5.0
du -sh .whl
