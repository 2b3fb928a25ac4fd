"""Throughput of `minicpmo asr` on one process, on N worker processes, on Ray, and on 1..K GPUs.

Every mode runs the real command line (a subprocess, as a user runs it: its start-up, model loads and
worker start-up are in the time) on the same folder of clips, into a fresh output folder, and the outputs
of every mode are checked against the single-process run's (byte for byte) before a number is printed.

    python benchmarks/scale.py                                  # tiny random checkpoint, CPU: 1 process,
                                                                # --workers 1, --workers 2, --ray --workers 2
    python benchmarks/scale.py --clips 64 --tokens 32 --repeats 3
    python benchmarks/scale.py --model /path/to/MiniCPM-o-2_6 --gpus   # per GPU count: --devices 0 .. 0,..,K-1

Efficiency = speed-up over one process / number of workers (1.0 = perfect scaling). On a CPU the workers
share the same cores (each gets cores/N torch threads), so expect at most 1x there: the point of --workers on
a CPU is the tests; the point of --devices is one engine per GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_clips(folder: Path, count: int, seconds: float) -> None:
    import soundfile

    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    for i in range(count):
        tone = 0.3 * np.sin(2 * np.pi * (150 + 7 * i) * t) + 0.01 * rng.standard_normal(len(t))
        soundfile.write(folder / f"clip{i:03d}.wav", tone.astype(np.float32), 16000)


def run(model: str, device: str, clips: Path, out: Path, tokens: int, batch: int, extra: list[str]) -> float:
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "minicpmo_cli", "--model", model, "--device", device, "-q", "asr",
               str(clips), "-o", str(out), "-f", "json", "--max-new-tokens", str(tokens),
               "--batch-size", str(batch), *extra]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(extra) or 'one process'} failed ({result.returncode}): {result.stderr[-800:]}")
    return wall


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def modes(args, gpu_count: int) -> list[tuple[str, int, list[str]]]:
    """(label, workers, extra arguments) for every row."""
    if args.gpus:
        return [(f"--devices {','.join(map(str, range(k)))}", k, ["--devices", ",".join(map(str, range(k)))])
                for k in range(1, gpu_count + 1)]
    rows = [("--workers 1", 1, ["--workers", "1"]), ("--workers 2", 2, ["--workers", "2"])]
    if not args.no_ray:
        rows.append(("--ray --workers 2", 2, ["--ray", "--workers", "2"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random one made in a temp folder)")
    parser.add_argument("--device", default="cpu", help="--device of the single-process baseline")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each clip")
    parser.add_argument("--tokens", type=int, default=16, help="--max-new-tokens (random weights use all)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; the median is shown")
    parser.add_argument("--gpus", action="store_true", help="rows per GPU count (--devices) instead of CPU modes")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray row")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        model = args.model
        if model is None:
            from minicpmo_cli.model.tiny import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(scratch_dir / "tiny"))
        clips = scratch_dir / "clips"
        clips.mkdir()
        make_clips(clips, args.clips, args.seconds)
        gpu_count = 0
        if args.gpus:
            import torch

            gpu_count = torch.cuda.device_count()
            if gpu_count == 0:
                raise SystemExit("--gpus: no CUDA GPU here")
        baseline_device = "cuda:0" if args.gpus else args.device

        def timed(extra: list[str], out: Path) -> float:
            return statistics.median(run(model, baseline_device, clips, out, args.tokens, args.batch_size, extra)
                                     for _ in range(args.repeats))

        reference_out = scratch_dir / "out-one"
        one = timed([], reference_out)
        reference = outputs(reference_out)
        rows = [("one process", 1, one, True)]
        for label, workers, extra in modes(args, gpu_count):
            out = scratch_dir / f"out-{len(rows)}"
            rows.append((label, workers, timed(extra, out), outputs(out) == reference))
        print_table(args, rows, one)


def print_table(args, rows, one: float) -> None:
    print(f"\n{args.clips} clips of {args.seconds:g} s, --max-new-tokens {args.tokens}, --batch-size "
          f"{args.batch_size}, {os.cpu_count()} CPU cores, median of {args.repeats}; wall time includes start-up "
          f"and model loads\n")
    print("| mode | workers | wall s | clips/s | speed-up vs one process | efficiency | same files |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, workers, wall, same in rows:
        speedup = one / wall
        print(f"| {label} | {workers} | {wall:.1f} | {args.clips / wall:.2f} | {speedup:.2f}x | "
              f"{speedup / workers:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
