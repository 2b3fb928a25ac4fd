#!/usr/bin/env python3
"""The full-width smoke run, timed: generate the checkpoint, then `chat -i`, `asr`, `tts` through the CLI.

Official widths, one layer a tower, random bf16 weights, on the CPU (see minicpmo_cli/model/full_width.py);
tests/heavy/test_full_width.py checks the same commands' outputs (``python3 -m pytest -m heavy tests/heavy``).
This prints the wall time and peak memory of each step:

    python3 benchmarks/full_width_smoke.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CPU_BF16 = ["--device", "cpu", "--dtype", "bfloat16"]


def step(label: str, args: list, rows: list) -> None:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "NO_COLOR": "1"})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB so far (KiB on Linux)
    rows.append((label, seconds, peak, "ok" if result.returncode == 0 else f"exit {result.returncode}"))
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-2000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temp folder)")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        print("error: espeak-ng is needed to make the speech input", file=sys.stderr)
        return 4
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="minicpmo-full-width-") as tmp:
        work = Path(tmp)
        folder = args.keep or work / "checkpoint"
        image, clip = work / "photo.png", work / "clip.wav"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 300, 3), dtype=np.uint8)).save(image)
        subprocess.run(["espeak-ng", "-w", str(clip), "Good morning and welcome."], check=True)
        model = ["-m", "minicpmo_cli", "--model", folder, *CPU_BF16]
        rows: list = []
        step("generate the checkpoint", ["-m", "minicpmo_cli.model.full_width", folder], rows)
        step("chat -i (3 tokens, greedy)", [*model, "chat", "What is in this picture?", "-i", image,
                                            "--max-new-tokens", "3", "--num-beams", "1"], rows)
        step("asr (3 tokens)", [*model, "asr", clip, "--max-new-tokens", "3"], rows)
        step("tts (0.5 s)", [*model, "tts", "Hello there.", "-o", work / "hello.wav", "--max-audio-seconds", "0.5"],
             rows)
    print(f"# full-width smoke run (CPU, {os.cpu_count()} cores, bf16)\n")
    print("| step | wall s | peak RSS so far (GiB) | result |\n|---|---:|---:|---|")
    for label, seconds, peak, status in rows:
        print(f"| {label} | {seconds:.1f} | {peak:.2f} | {status} |")
    return 0 if all(r[3] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
