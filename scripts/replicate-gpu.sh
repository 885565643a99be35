#!/usr/bin/env bash
# The replication's GPU plan (configs/replication-gpu.yaml, docs/replication.md): the paper's
# K = 1..32 grid with its controls and ablations, JOBS simulations at once on one GPU, then the
# report. Results are files: the MLflow store is a sqlite database plus an artifact folder beside
# it, no server; copy them back and `fedsilo report` reads them anywhere.
#
#   bash scripts/replicate-gpu.sh
#
# Environment: JOBS (cells at once; default: the file's), OUT (report folder; default
# results/replication-gpu), FEDSILO_SWEEP (another sweep file, e.g. a tiny one to check the
# wiring on a CPU), SKIP_SETUP=1 with PYTHON (use that Python's fedsilo and the data as they are).
# A stopped run continues where it stopped: run the script again.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep_file=${FEDSILO_SWEEP:-configs/replication-gpu.yaml}
out=${OUT:-results/replication-gpu}
py=${PYTHON:-.venv/bin/python}
if [ "${SKIP_SETUP:-0}" != 1 ]; then
    bash scripts/setup.sh
    [ -f data/rotten_tomatoes_train4096.csv ] || "$py" scripts/prepare_data.py --out data
fi
fedsilo() { "$py" -m fedsilo "$@"; }
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
# the experiment and store as the sweep reads them (the experiment defaults to the file's name)
read -r experiment store < <("$py" -c 'import sys; from pathlib import Path; from fedsilo.sweep import read_spec
p = Path(sys.argv[1]); s = read_spec(p); print(s.experiment or p.stem, s.tracking_uri)' "$sweep_file")
echo "replicate-gpu: sweep $sweep_file (experiment $experiment, store $store) at $(date -u +%FT%TZ)"
started=$(date +%s)
fedsilo sweep --config "$sweep_file" ${JOBS:+--jobs "$JOBS"}
echo "replicate-gpu: sweep done in $(( $(date +%s) - started )) s"
fedsilo report --experiment "$experiment" --tracking-uri "$store" --out "$out"
echo "replicate-gpu: report in $out"
