#!/usr/bin/env python3
"""Video decoding: our PyAV path vs the guide's decord (frames) + moviepy (audio track).

Measures, on a generated clip (ffmpeg testsrc + a sine tone), the two things describe-video/omni need:
frames sampled at 1 fps (the guide's `encode_video`) and the audio track at 16 kHz mono.

    python benchmarks/decoders.py                               # 60 s, 1280x720, 30 fps clip
    python benchmarks/decoders.py --deps /tmp/benchdeps         # where decord/moviepy were installed:
    pip install --target /tmp/benchdeps decord moviepy          # (not project dependencies)

decord and moviepy are optional: a library that cannot be imported is reported as such.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000  # Hz
MAX_NUM_FRAMES = 64


def make_clip(path: Path, seconds: int, size: str, fps: int) -> None:
    video = ["-f", "lavfi", "-i", f"testsrc=duration={seconds}:size={size}:rate={fps}"]
    audio = ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}:sample_rate=44100"]
    subprocess.run(["ffmpeg", "-v", "error", "-y", *video, *audio, "-c:v", "libx264", "-preset", "veryfast",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2", str(path)], check=True)


def pyav_frames(path: Path):
    from minicpmo_cli.media.video import sample_frames

    return sample_frames(path, fps=1.0, max_frames=MAX_NUM_FRAMES)


def pyav_audio(path: Path):
    from minicpmo_cli.media.video import load_video_audio

    return load_video_audio(path, sr=SAMPLE_RATE)


def decord_frames(path: Path):
    """The guide's encode_video, step for step."""
    from decord import VideoReader, cpu
    from PIL import Image

    reader = VideoReader(str(path), ctx=cpu(0))
    step = round(reader.get_avg_fps() / 1)
    indices = list(range(0, len(reader), step))
    if len(indices) > MAX_NUM_FRAMES:
        gap = len(indices) / MAX_NUM_FRAMES
        indices = [indices[int(i * gap + gap / 2)] for i in range(MAX_NUM_FRAMES)]
    return [Image.fromarray(frame.astype("uint8")) for frame in reader.get_batch(indices).asnumpy()]


def moviepy_audio(path: Path):
    """The guide's get_video_chunk_content audio: moviepy writes a 16 kHz wav, librosa reads it."""
    import librosa

    try:
        from moviepy import VideoFileClip  # moviepy 2.x
    except ImportError:
        from moviepy.editor import VideoFileClip  # moviepy 1.x, as in the guide

    clip = VideoFileClip(str(path))
    try:
        with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
            clip.audio.write_audiofile(wav.name, codec="pcm_s16le", fps=SAMPLE_RATE, logger=None)
            samples, _ = librosa.load(wav.name, sr=SAMPLE_RATE, mono=True)
    finally:
        clip.close()
    return samples


def library_versions(names: list[str]) -> str:
    from importlib import metadata

    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


LIBRARIES = {
    "PyAV (minicpmo)": (pyav_frames, pyav_audio),
    "decord + moviepy (guide)": (decord_frames, moviepy_audio),
}


def measure_all(path: Path, repeats: int) -> list[tuple[str, str, str, str, str]]:
    """Median times per library; rounds alternate between libraries so background load hits both alike."""
    times = {label: ([], []) for label in LIBRARIES}
    results: dict[str, tuple] = {}
    failed: dict[str, str] = {}
    for _ in range(repeats):
        for label, functions in LIBRARIES.items():
            if label in failed:
                continue
            try:
                outputs = []
                for function, bucket in zip(functions, times[label]):
                    start = time.perf_counter()
                    outputs.append(function(path))
                    bucket.append(time.perf_counter() - start)
                results[label] = tuple(outputs)
            except ImportError as exc:
                failed[label] = f"not importable: {exc}"
    rows = []
    for label in LIBRARIES:
        if label in failed:
            rows.append((label, "-", "-", "-", failed[label]))
            continue
        frames_time, audio_time = (statistics.median(bucket) for bucket in times[label])
        frames, audio = results[label]
        note = f"{len(frames)} frames, {len(audio) / SAMPLE_RATE:.2f} s audio"
        seconds = (frames_time, audio_time, frames_time + audio_time)
        rows.append((label, *(f"{value:.3f}" for value in seconds), note))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deps", type=Path, help="extra folder with decord/moviepy (appended to sys.path)")
    args = parser.parse_args()
    if args.deps:
        sys.path.append(str(args.deps))  # appended: the project's own numpy/Pillow keep priority
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    with tempfile.TemporaryDirectory() as temp:
        clip = Path(temp) / "clip.mp4"
        make_clip(clip, args.seconds, args.size, args.fps)
        rows = measure_all(clip, args.repeats)
    print(f"clip: {args.seconds} s, {args.size}, {args.fps} fps, H.264 + AAC; median of {args.repeats} runs;"
          f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(library_versions(["av", "decord", "moviepy", "librosa"]))
    header = ("library", "frames (s)", "audio (s)", "total (s)", "notes")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
