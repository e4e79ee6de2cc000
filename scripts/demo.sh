#!/usr/bin/env bash
# The main job on the embedded default (no downloads beyond PyPI): set up, then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
CLARA_JAX_EXTRAS="${CLARA_JAX_EXTRAS:-test,torch}" bash scripts/bootstrap.sh
exec .venv/bin/clara-jax demo "$@"
