#!/usr/bin/env bash
# Regenerate the lock files from setup.py (requirements/lock.in) with `uv pip compile`.
# Run it after changing a dependency in setup.py, or to move to newer releases on purpose
# (`bash scripts/lock.sh --upgrade`); then run the whole suite (`bash scripts/test.sh`) before
# committing the new lock. Without --upgrade, versions already in the lock are kept where possible.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=(uv)
if ! command -v uv >/dev/null; then
  if [ -x .venv/bin/uv ]; then UV=(.venv/bin/uv); else echo "lock.sh: needs uv (pip install uv)" >&2; exit 2; fi
fi
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels
        --custom-compile-command "bash scripts/lock.sh" --quiet "$@")
"${UV[@]}" pip compile requirements/lock.in "${common[@]}" -o requirements/lock.txt
"${UV[@]}" pip compile requirements/nodeps.in "${common[@]}" --no-deps -o requirements/nodeps.txt
echo "lock.sh: wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages) and requirements/nodeps.txt"
