#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt into .whl/ at the repo root, for the GPU machine
# (Python 3.12, manylinux x86_64, no network there). Then, on that machine, from the repo root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PYTHONPATH && python3 bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^\s*#' bench/gpu_wheels.txt | grep -v '^\s*$' | xargs python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  --platform any -d .whl
# deepspeed: no wheel on the index; build a pure-Python one from its source package. Its setup imports torch:
# run this with the project's virtual environment active (. .venv/bin/activate) or set PYTHON.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "fetch_gpu_wheels.sh: $PYTHON has no torch, which building the deepspeed wheel needs:" \
    ". .venv/bin/activate first" >&2
  exit 1
fi
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
du -ch .whl/*.whl | tail -1
