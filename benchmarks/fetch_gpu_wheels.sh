#!/usr/bin/env bash
# Here, on a machine with internet: download the wheels benchmarks/gpu_run.sh installs on the GPU machine
# (python 3.12, x86_64, its own torch 2.11 + transformers 5.17 + typer/rich/numpy/pillow/tokenizers, no internet).
# Only what that machine lacks or has too old (about 26 MB): transformers 5.24 (the version this project is
# tested on), soundfile with cffi and pycparser (reading and writing audio), soxr (resampling), silero-vad (the
# asr segmenter's model). --no-deps: everything else is there already, and torch must stay the machine's own.
#
#   bash benchmarks/fetch_gpu_wheels.sh [FOLDER]     # default .gpu-wheels/ in the repo root (gitignored)
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER="${1:-.gpu-wheels}"
mkdir -p "$FOLDER"
python3 -m pip download --no-deps --only-binary=:all: --dest "$FOLDER" \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  "transformers==5.24.0" "soundfile==0.14.0" "cffi==2.1.1" "pycparser==3.12" "soxr==1.1.0" "silero-vad==6.2.3"
du -sh "$FOLDER"
ls "$FOLDER"
