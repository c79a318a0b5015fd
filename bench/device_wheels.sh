#!/usr/bin/env bash
# Wheels for running bench/gpu_step.py on a GPU machine that cannot reach a package index
# but has Python 3.12 with torch, transformers, huggingface_hub, anyio, typer and rich:
# downloads (here, where pip works) what wangend needs beyond those into .whl/ (ignored).
# There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 bench/gpu_step.py
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 msgspec==0.22.0 av==18.1.0 \
    jsonschema==4.26.0 jsonschema-specifications referencing rpds-py importlib-metadata
# pure Python, published as sources only: built into wheels here
python3 -m pip wheel --quiet --no-deps -w .whl jsonrpcserver==5.0.9 oslash==0.6.3
du -sh .whl
