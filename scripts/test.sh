#!/usr/bin/env bash
# Set up ./.venv, check the code (ruff lint and format, mypy: strict on the core modules), then
# run the default test suite (slow and Docker tests are opt-in: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-deploy-tools.sh
venv=${FEDSILO_VENV:-.venv}
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
PATH="$PWD/.tools/bin:$PATH" "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
