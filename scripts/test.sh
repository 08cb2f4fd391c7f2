#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -gt 0 ]; then exec .venv/bin/python -m pytest -q "$@"; fi
.venv/bin/python -m pytest -q
# The engine's Triton kernels (skipped above without a GPU) under Triton's interpreter, on CPU; Gluon's need CUDA.
TRITON_INTERPRET=1 PYTHONPATH=.venv/triton-interpreter exec .venv/bin/python -m pytest -q tests/engine/test_kernels.py
