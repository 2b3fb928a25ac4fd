#!/usr/bin/env bash
# Download, on a machine with internet, the wheels benchmarks/gpu_run.sh installs offline on the GPU machine
# (python 3.12, x86_64 Linux, torch + transformers 5.17 + typer + rich already there, no internet).
# Not torch: the GPU machine's CUDA build stays. transformers 5.24 is the version this project is tested on.
#
#   bash benchmarks/gpu_wheels.sh [FOLDER]        # default: .gpu-wheels/ in the repo (gitignored)
#   then copy the repo (with the folder) to the GPU machine and run: bash benchmarks/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER="${1:-.gpu-wheels}"
mkdir -p "$FOLDER"

# What the package needs beyond torch/typer/rich (pyproject.toml), minus librosa and scipy, which no
# module imports; soundfile/av/soxr are only for reading audio files (the benchmark makes its own audio).
PACKAGES=(
  "transformers==5.24.*" "safetensors>=0.4" "huggingface_hub>=0.30" "tokenizers>=0.20"
  "numpy>=1.24" "Pillow>=10" "soundfile>=0.12" "soxr>=0.3" "av>=12"
)
# --platform: the wheel tags of a manylinux x86_64 machine (newer packages ship only manylinux_2_28 builds).
python3 -m pip download --only-binary=:all: --dest "$FOLDER" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "${PACKAGES[@]}"
# Dependencies that must not come along: the GPU machine keeps its own torch (and nothing pulls CUDA wheels).
rm -f "$FOLDER"/torch-*.whl "$FOLDER"/nvidia_*.whl "$FOLDER"/triton-*.whl
du -sh "$FOLDER"
ls "$FOLDER"
