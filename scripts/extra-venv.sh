#!/usr/bin/env bash
# Builds .venv-NAME, a separate environment for an optional stack whose pins conflict with the development
# environment's (litert-torch pins older typing_extensions and pydantic; nvidia-pytriton needs numpy<2):
# torch's CPU build from requirements/torch-cpu.txt, then normscope itself (editable) with the given extras.
# Usage: bash scripts/extra-venv.sh NAME EXTRAS      e.g.  bash scripts/extra-venv.sh edge edge,demo,hf
#                                                         bash scripts/extra-venv.sh triton triton-server,demo,hf
# Tests that need such an environment find it at .venv-NAME (run by .ci/run; skipped locally when absent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ]; then
    echo "usage: bash scripts/extra-venv.sh NAME EXTRAS" >&2
    exit 2
fi
venv=".venv-$1"
stamp="$venv/.installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt requirements/torch-cpu.txt ]; then
    exit 0
fi
${PYTHON:-python3} -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --retries 1 -r requirements/torch-cpu.txt
"$venv/bin/python" -m pip install --quiet -e ".[$2]"
touch "$stamp"
