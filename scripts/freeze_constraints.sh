#!/usr/bin/env bash
# Rewrite constraints.txt from a virtual environment the whole suite passes in (default .venv/), e.g. after
#     make test-latest && bash scripts/freeze_constraints.sh .venv-latest
# Every installed package at its exact version, except peft-lime itself (editable); torch without its local build
# tag (2.13.0+cpu -> 2.13.0), so the pin holds for the CPU and the CUDA builds alike.
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py="$venv/bin/python"
[ -x "$py" ] || { echo "scripts/freeze_constraints.sh: no virtual environment at $venv/" >&2; exit 1; }
pyver=$("$py" -c 'import platform; print(platform.python_version())')
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
{
  echo "# Exact versions the test suite passes with (CPython $pyver, Linux x86_64). scripts/setup.sh installs with"
  echo "# -c constraints.txt; PEFT_LIME_DEPS=latest ignores this file. Regenerate: bash scripts/freeze_constraints.sh"
  echo "# (pyproject.toml keeps the lower bounds; this file only makes installs reproducible)."
  "$py" -m pip freeze --all --exclude-editable \
    | grep -v '^#' \
    | grep -vi '^peft[-_]lime' \
    | sed -E 's/^(torch[a-z]*)==([^+]+)\+.*$/\1==\2/' \
    | LC_ALL=C sort -f
} >"$tmp"
cat "$tmp" >constraints.txt  # not mv: keep the usual file mode, not mktemp's 0600
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages from $venv/ (Python $pyver)"
