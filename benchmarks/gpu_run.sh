#!/usr/bin/env bash
# On the GPU machine (no internet): install the wheels benchmarks/gpu_wheels.sh downloaded, offline, into the
# python3 that has torch, then run the full-size benchmark and keep its table.
#
#   bash benchmarks/gpu_run.sh [FOLDER] [-- extra gpu_full_size.py options]
#   e.g. bash benchmarks/gpu_run.sh .gpu-wheels -- --skip memory
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER=".gpu-wheels"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then FOLDER="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
if [ ! -d "$FOLDER" ]; then
  echo "error: no wheel folder $FOLDER: run benchmarks/gpu_wheels.sh on a machine with internet first" >&2
  exit 4
fi
# --no-deps: every wheel needed is in the folder, and pip must not try to resolve (or replace) torch.
python3 -m pip install -q --no-index --no-deps --find-links "$FOLDER" "$FOLDER"/*.whl
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/results
OUT="benchmarks/results/gpu_full_size-$(date -u +%Y%m%dT%H%M%SZ).md"
python3 benchmarks/gpu_full_size.py "$@" | tee "$OUT"
echo "table saved in $OUT" >&2
