#!/usr/bin/env python3
"""The batched Silero VAD (media/vad_batch.py) on a GPU: 10 files of 10 minutes, the GPU row of issue 23.

Checks that the model really runs on cuda and that its fixed-shape batches keep the per-file result there
(the files together == each alone, bit for bit), compares the regions with the CPU's (the devices round
differently: edges within two windows), and times both. Prints a markdown table; without CUDA it says so
and exits 0 (the GPU script runs it as a part of its own under a time limit).

    python benchmarks/gpu_vad.py --files 10 --minutes 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "examples" / "long_speech.mp3"


def make_files(count: int, minutes: float) -> list[np.ndarray]:
    """Each file: the example recording cut at different places, with pauses of 0.3-3 s between the cuts."""
    from minicpmo_cli.media.audio import load_audio

    speech = load_audio(SPEECH)
    rng = np.random.default_rng(0)
    files = []
    for _ in range(count):
        parts, total = [], 0
        while total < minutes * 60 * 16000:
            start = int(rng.integers(0, len(speech) // 2))
            part = speech[start:start + int(rng.integers(16000 * 3, 16000 * 20))]
            pause = np.zeros(int(rng.uniform(0.3, 3.0) * 16000), np.float32)
            parts += [part, pause]
            total += len(part) + len(pause)
        files.append(np.concatenate(parts))
    return files


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    if not torch.cuda.is_available():
        print("gpu_vad: no CUDA device here: nothing measured")
        return 0
    from minicpmo_cli.media.vad import WINDOW
    from minicpmo_cli.media.vad_batch import BatchVAD

    files = make_files(args.files, args.minutes)
    gpu, cpu = BatchVAD("cuda"), BatchVAD("cpu")
    gpu.probabilities([files[0][:16000 * 60]])  # CUDA context, kernels
    torch.cuda.synchronize()
    gpu_seconds, together = timed(gpu.probabilities, files)
    alone = [gpu.probabilities([samples])[0] for samples in files]
    cpu_seconds, cpu_probs = timed(cpu.probabilities, files)
    from minicpmo_cli.media.vad import regions_from_probabilities

    gpu_regions = [regions_from_probabilities(p, len(s)) for p, s in zip(together, files)]
    cpu_regions = [regions_from_probabilities(p, len(s)) for p, s in zip(cpu_probs, files)]
    same_count = all(len(a) == len(b) for a, b in zip(gpu_regions, cpu_regions))
    worst = max((abs(x - y) for a, b in zip(gpu_regions, cpu_regions) if len(a) == len(b)
                 for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0)
    audio = args.files * args.minutes * 60
    print(f"VAD of {args.files} files of {args.minutes:g} min ({torch.cuda.get_device_name(0)}; model on "
          f"{next(iter(gpu.model.parameters())).device}, {gpu.rows} rows a batch)\n")
    print("| device | seconds | x real time |")
    print("|---|---:|---:|")
    print(f"| cuda | {gpu_seconds:.2f} | {audio / gpu_seconds:.0f} |")
    print(f"| cpu | {cpu_seconds:.2f} | {audio / cpu_seconds:.0f} |")
    print(f"\ncuda: files together == each alone (bit for bit): "
          f"{all(np.array_equal(a, b) for a, b in zip(together, alone))}")
    diff = max(float(np.abs(a - b).max()) for a, b in zip(together, cpu_probs))
    print(f"cuda vs cpu: probabilities max diff {diff:.2e}; region counts equal: {same_count}; "
          f"worst edge {worst / WINDOW:.1f} windows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
