#!/usr/bin/env bash
# Release check: build the wheel and the sdist once, then for each Python interpreter install the wheel into a
# fresh virtual environment outside the repository and run a smoke test there (the ops against torch's,
# `normscope --version`, `normscope env`, and `normscope audit` of the bundled model).
#
# Usage: bash scripts/check-python-versions.sh [PYTHON ...]
#   PYTHON: interpreters to check (default: python3.10 python3.11 python3.12 python3.13, found on PATH or
#   under pyenv). TORCH_REQ (default: requirements/torch-cpu.txt) says which torch build each venv gets first.
# Exit status: 0 when every interpreter passed, 1 otherwise; a summary line per interpreter at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_REQ=${TORCH_REQ:-$ROOT/requirements/torch-cpu.txt}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/normscope-pycheck.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

find_python() {  # an interpreter that runs (a pyenv shim of a version that is not selected does not)
  local name=$1 v cand
  v=${name#python}
  for cand in $(command -v "$name" 2>/dev/null) "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
    if [ -x "$cand" ] && "$cand" -c pass >/dev/null 2>&1; then echo "$cand"; return 0; fi
  done
  return 1
}

pythons=("$@")
[ ${#pythons[@]} -eq 0 ] && pythons=(python3.10 python3.11 python3.12 python3.13)

echo "== building the wheel and the sdist"
BUILD_PY=$(find_python python3.11 || command -v python3)
"$BUILD_PY" -m venv "$WORK/build" && "$WORK/build/bin/pip" install -q build >/dev/null \
  && "$WORK/build/bin/python" -m build -q --outdir "$WORK/dist" "$ROOT" >/dev/null || { echo "build failed"; exit 1; }
WHEEL=$(ls "$WORK"/dist/normscope-*.whl)
ls "$WORK"/dist/normscope-*.tar.gz >/dev/null || { echo "no sdist built"; exit 1; }
echo "built $(basename "$WHEEL") and $(basename "$WORK"/dist/normscope-*.tar.gz)"

SMOKE=$(cat <<'PY'
import sys, torch, normscope
x = torch.randn(64, 384)
w, b = torch.randn(384), torch.randn(384)
torch.testing.assert_close(normscope.layer_norm(x, 384, w, b), torch.nn.functional.layer_norm(x, (384,), w, b))
torch.testing.assert_close(normscope.rms_norm(x, 384, w), torch.nn.functional.rms_norm(x, (384,), w))
print(f"ops ok on Python {sys.version.split()[0]}, torch {torch.__version__}, normscope {normscope.__version__}")
PY
)

declare -a summary
status=0
for name in "${pythons[@]}"; do
  py=$(find_python "$name") || { summary+=("$name: not found"); status=1; continue; }
  echo "== $name ($py)"
  venv="$WORK/venv-$name"
  ok=1
  { "$py" -m venv "$venv" \
    && "$venv/bin/pip" install -q -r "$TORCH_REQ" \
    && "$venv/bin/pip" install -q "$WHEEL[demo]" \
    && (cd "$WORK" && "$venv/bin/python" -c "$SMOKE") \
    && (cd "$WORK" && "$venv/bin/normscope" --version) \
    && (cd "$WORK" && "$venv/bin/normscope" env >/dev/null) \
    && (cd "$WORK" && HF_HUB_OFFLINE=1 "$venv/bin/normscope" audit --skip export --skip quantization --no-report --quiet \
        --json "$WORK/audit-$name.json" >/dev/null) ; } || ok=0
  if [ $ok = 1 ]; then summary+=("$name: ok"); else summary+=("$name: FAILED"); status=1; fi
  rm -rf "$venv"
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
