#!/usr/bin/env python3
"""asr of one multi-hour file: streamed (api/asr_stream.py) against decoded whole, on the fake engine.

The file: espeak-ng sentences with pauses of 0.3-2.5 s, repeated to --minutes (16 kHz wav, or --mp3). Each
row runs in a child process of its own: the peak RSS growth over the process before the run (model stand-in,
VAD and imports already loaded), the wall time, and whether the records (pieces, texts, cue times) are the
same. The model is tests/fake_engine.py: only the front stages (decode, VAD, pieces) and the records cost.

    python benchmarks/asr_long.py --minutes 120
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["Speech recognition turns spoken words into written text.", "The meeting starts at nine tomorrow.",
             "Please read the first chapter before Monday, and bring your notes.", "One two three four five."]


def make_file(folder: Path, minutes: float, mp3: bool) -> Path:
    import soundfile

    from minicpmo_cli.media.audio import load_audio

    spoken = []
    for index, text in enumerate(SENTENCES):
        path = folder / f"s{index}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        spoken.append(load_audio(path))
    rng = np.random.default_rng(0)
    out = folder / "long.wav"
    total, target = 0, int(minutes * 60 * 16000)
    with soundfile.SoundFile(out, "w", samplerate=16000, channels=1, subtype="PCM_16") as sink:
        while total < target:  # written as it is made: the maker holds no hour of audio either
            clip = spoken[int(rng.integers(len(spoken)))] * (0.5 + 0.5 * rng.random())
            pause = np.zeros(int(float(rng.choice([0.3, 0.6, 1.0, 2.5])) * 16000), np.float32)
            sink.write(np.concatenate([clip, pause]))
            total += len(clip) + len(pause)
    if not mp3:
        return out
    encoded = folder / "long.mp3"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(out), "-b:a", "48k", str(encoded)], check=True)
    return encoded


def child(model: str, path: str, stream: bool) -> None:
    """One row: prints a JSON line (seconds, peak RSS growth in MiB, a digest of the records)."""
    import hashlib

    sys.path.insert(0, str(REPO))
    from minicpmo_cli.api import asr
    from minicpmo_cli.api.asr_pipeline import STREAM_SECONDS, Stages
    from minicpmo_cli.api.engine import DecodeOptions, LoadOptions
    from tests.fake_engine import Recorder

    fake = Recorder().load(LoadOptions(model=model, device="cpu"), vision=False, audio=True, tts=False)
    warm = np.zeros(16000 * 20, np.float32)
    warm[16000:32000] = 0.3 * np.sin(np.arange(16000) * 0.1)
    list(asr.transcribe_many(fake, [asr.AudioInput("warm", warm)]))  # imports, the VAD model
    before = _rss_mib()
    started = time.perf_counter()
    stages = Stages(stream_seconds=STREAM_SECONDS if stream else None)
    records = [r.to_dict() for r in asr.transcribe_many(fake, [asr.AudioInput.from_path(path)], asr.AsrOptions(),
                                                        DecodeOptions(), stages=stages)]
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]
    print(json.dumps({"seconds": seconds, "growth_mib": peak - before, "digest": digest,
                      "pieces": len(records[0]["segments"]), "error": records[0].get("error")}))


def _rss_mib() -> float:
    """The resident set now, in MiB (ru_maxrss is the peak so far: the growth is the peak over this)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--mp3", action="store_true", help="encode the file as mp3 (PyAV's path)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PATH", "STREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "1")
        return 0
    sys.path.insert(0, str(REPO))
    from minicpmo_cli.model.tiny import make_tiny_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="asr-long-"))
    make_tiny_checkpoint(folder / "tiny")
    path = make_file(folder, args.minutes, args.mp3)
    rows = {}
    for name, stream in (("whole decode", "0"), ("streamed", "1")):
        done = subprocess.run([sys.executable, __file__, "--child", str(folder / "tiny"), str(path), stream],
                              check=True, capture_output=True, text=True, cwd=REPO)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"asr of one {args.minutes:g}-minute {'mp3' if args.mp3 else 'wav'} file ({path.stat().st_size / 2**20:.0f} "
          f"MiB), fake engine, CPU; one child process a row\n")
    print("| path | wall s | x real time | peak RSS growth MiB | pieces |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.1f} | {args.minutes * 60 / row['seconds']:.0f} | "
              f"{row['growth_mib']:.0f} | {row['pieces']} |")
    same = rows["whole decode"]["digest"] == rows["streamed"]["digest"]
    print(f"\nrecords identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
