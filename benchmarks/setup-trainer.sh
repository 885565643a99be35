#!/usr/bin/env bash
# Make benchmarks/.deps-trainer: accelerate (which transformers.Trainer needs) for the Trainer
# side of benchmarks/run.py, without adding it to fedsilo's environment. Safe to run twice.
#   PYTHON=.venv/bin/python benchmarks/setup-trainer.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
  --target "$here/.deps-trainer" -r "$here/requirements-trainer.txt"
PYTHONPATH="$here/.deps-trainer" "$python" -c "import accelerate; print('accelerate', accelerate.__version__)"
