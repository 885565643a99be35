#!/usr/bin/env bash
# Set up ./.venv and run the default test suite (slow and Docker tests are opt-in: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-deploy-tools.sh
py=${FEDSILO_VENV:-.venv}/bin/python
PATH="$PWD/.tools/bin:$PATH" "$py" -m pytest -p no:cacheprovider "$@"
