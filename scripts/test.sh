#!/usr/bin/env bash
# The test suite (parity tests against transformers/PyTorch included): set up, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
