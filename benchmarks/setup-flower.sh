#!/usr/bin/env bash
# Make benchmarks/.venv-flower: a virtualenv holding Flower (flwr) for benchmarks/run.py.
# Flower is installed here only, never into fedsilo's environment. Safe to run twice.
#   PYTHON=python3.11 benchmarks/setup-flower.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-flower"
python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-flower.txt"
"$venv/bin/python" -c "import flwr, numpy; print('flwr', flwr.__version__, 'numpy', numpy.__version__)"
